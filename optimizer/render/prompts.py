"""Prompt sets: what a candidate renders, split into search and held-out prompts.

A prompt set is data (YAML, validated by pydantic; errors name the field)::

    search:                        # rendered for every trial; the objectives see only these
      - a red digit 3 on a blue background
      - {prompt: a thin digit 7, negative: thick}
    held_out:                      # never rendered by the search; used to choose and report
      - a green digit 5 on a white background
    negative: ""                   # negative prompt of entries without their own
    seeds: [0, 1]                  # every prompt is rendered once per seed (or a count: 2 -> 0, 1)
    steps: 20
    guidance: 4.0                  # classifier-free guidance scale (<= 1 disables it)
    width: 32                      # optional; default the UNet's sample size x the VAE factor
    height: 32
    scheduler: dpmpp_2m            # see optimizer.render.schedulers; null keeps the pipeline's

Instead of ``search``/``held_out`` a set may give one ``prompts`` list and ``held_out_fraction``
(with ``split_seed``): the split is then a seeded shuffle, the same on every machine. Either way a
prompt text may not be in both halves.

The images of a split are ``prompts x seeds`` in that order (:meth:`PromptSet.jobs`): job ``i`` is
prompt ``i // len(seeds)`` with seed ``seeds[i % len(seeds)]``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from optimizer.config_errors import describe_validation_error, read_yaml_file
from optimizer.errors import EvomergeError
from optimizer.render.schedulers import SCHEDULERS

__all__ = ["PromptItem", "PromptSet", "PromptSetError", "RenderJob", "Split", "load_prompt_set", "parse_prompt_set"]

Split = Literal["search", "held_out"]


class PromptSetError(EvomergeError, ValueError):
    """A prompt set file is missing, is not YAML, or fails validation (the message names the field)."""


@dataclass(frozen=True)
class RenderJob:
    """One image to render: a prompt, its negative prompt and the seed of its initial noise."""

    prompt: str
    negative: str
    seed: int


class PromptItem(BaseModel):
    """A prompt with an optional negative prompt of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: str = Field(min_length=1)
    negative: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"prompt": value} if isinstance(value, str) else value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a prompt may not be blank")
        return value


class PromptSet(BaseModel):
    """Prompts x seeds and the sampling settings they are rendered with (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    search: list[PromptItem] = Field(min_length=1)
    held_out: list[PromptItem] = Field(default_factory=list)
    negative: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    steps: int = Field(default=20, ge=1, le=1000)
    guidance: float = Field(default=7.0, ge=0.0, le=100.0)
    width: int | None = Field(default=None, ge=8, multiple_of=8)
    height: int | None = Field(default=None, ge=8, multiple_of=8)
    scheduler: str | None = "dpmpp_2m"

    @model_validator(mode="before")
    @classmethod
    def _split_prompts(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "prompts" not in data:
            if isinstance(data, dict) and ("held_out_fraction" in data or "split_seed" in data):
                raise ValueError("held_out_fraction/split_seed go with a single `prompts` list, not with search/held_out")
            return data
        data = dict(data)
        if "search" in data or "held_out" in data:
            raise ValueError("give either `prompts` (+ held_out_fraction) or `search`/`held_out`, not both")
        prompts = data.pop("prompts")
        fraction = data.pop("held_out_fraction", 0.0)
        seed = data.pop("split_seed", 0)
        if not isinstance(prompts, list):
            raise ValueError("prompts: expected a list of prompts")
        if not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ValueError(f"held_out_fraction: expected a number in [0, 1), got {fraction!r}")
        order = list(range(len(prompts)))
        random.Random(int(seed)).shuffle(order)
        n_held = round(len(prompts) * fraction)
        held = sorted(order[:n_held])
        data["held_out"] = [prompts[i] for i in held]
        data["search"] = [prompts[i] for i in sorted(order[n_held:])]
        return data

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("a seed count must be at least 1")
            return list(range(value))
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds must be distinct")
        if any(s < 0 or s >= 2**63 for s in value):
            raise ValueError("seeds must be in [0, 2**63)")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        if value is not None and value not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {value!r}; known: {', '.join(SCHEDULERS)}")
        return value

    @model_validator(mode="after")
    def _disjoint(self) -> PromptSet:
        for name in ("search", "held_out"):
            seen: set[str] = set()
            for i, item in enumerate(getattr(self, name)):
                if item.prompt in seen:
                    raise ValueError(f"{name}[{i}]: duplicate prompt {item.prompt!r}")
                seen.add(item.prompt)
        search = {item.prompt for item in self.search}
        for i, item in enumerate(self.held_out):
            if item.prompt in search:
                raise ValueError(f"held_out[{i}]: {item.prompt!r} is also a search prompt; held-out prompts must be unseen")
        return self

    def prompts(self, split: Split = "search") -> list[PromptItem]:
        if split not in ("search", "held_out"):
            raise ValueError(f"unknown split {split!r}; expected 'search' or 'held_out'")
        return list(self.search if split == "search" else self.held_out)

    def jobs(self, split: Split = "search") -> list[RenderJob]:
        """``prompts x seeds`` of ``split``, prompt-major (see the module docstring)."""
        return [
            RenderJob(prompt=item.prompt, negative=self.negative if item.negative is None else item.negative, seed=seed)
            for item in self.prompts(split)
            for seed in self.seeds
        ]


def parse_prompt_set(data: Any, *, source: str = "prompt set") -> PromptSet:
    """Validate ``data`` (parsed YAML) as a :class:`PromptSet`; :class:`PromptSetError` names the field."""
    try:
        return PromptSet.model_validate(data)
    except ValidationError as exc:
        raise PromptSetError(f"{source}: {describe_validation_error(exc)}") from None


def load_prompt_set(path: str | os.PathLike[str]) -> PromptSet:
    """Read and validate a prompt set YAML file."""
    data = read_yaml_file(path, error=PromptSetError, missing="no prompt set file")
    if not isinstance(data, dict):
        raise PromptSetError(f"{path}: expected a mapping with search/held_out (or prompts), seeds, steps, ...")
    return parse_prompt_set(data, source=str(path))
