"""Block layouts: which merge block owns each checkpoint key.

A layout is a data file (``layouts/<name>.yaml``) validated at load time. It lists the blocks in
merge-block-weighted (MBW) order and a set of rules, each a regular expression anchored at the
start of an LDM key and the block it assigns (``'IN{0:02d}'`` formats the first capture group).
Keys matched by a *component* rule (the VAE) are not part of the MBW string.

Contract: when a layout is bound to a set of keys (:meth:`BlockLayout.assign`), every key is owned
by exactly one block or component. A key that no rule matches, or that two rules match, is an
error that names the key; a rule that produces a block name not in ``blocks`` is an error too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from optimizer.errors import EvomergeError


class LayoutError(EvomergeError, ValueError):
    """A layout file is invalid, or a key cannot be assigned to exactly one block."""


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    match: str
    block: str

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
        return value


class _Component(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    match: str
    name: str


class _Identify(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    all: tuple[str, ...] = ()
    none: tuple[str, ...] = ()
    context_dim: int | None = None


class _Module(BaseModel):
    """A diffusers pipeline module stored in the checkpoint under ``prefix`` (canonical key names).

    ``scheme`` says how its keys become the diffusers module's: ``rename`` (strip the prefix: HF
    CLIP / T5 text encoders), ``ldm_vae`` (diffusers' LDM VAE converter), ``key_rules`` (the
    layout's ``key_rules``, for DiT denoisers such as Flux and SD3), or the SD1/SD2/SDXL schemes
    of :mod:`optimizer.checkpoint.keymap`: ``ldm_unet``, ``ldm_clip`` (HF CLIP under an LDM prefix)
    and ``openclip`` (an OpenCLIP text tower, q/k/v fused in ``in_proj``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    prefix: str
    scheme: Literal["rename", "ldm_vae", "key_rules", "ldm_unet", "ldm_clip", "openclip"]
    #: the diffusers / transformers class built from the module's config (``diffusers.X`` or ``transformers.X``)
    cls: str


#: module schemes converted by diffusers' LDM converters (:mod:`optimizer.checkpoint.keymap`)
LDM_SCHEMES = frozenset({"ldm_unet", "ldm_clip", "openclip"})


class _Alias(BaseModel):
    """Another file format's prefix for the same tensors; rewritten to ``canonical`` on load."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefix: str
    canonical: str


class _KeyRule(BaseModel):
    """One canonical denoiser key (without the module prefix) -> its diffusers key(s).

    ``match`` is a full-match regular expression; ``to`` names one diffusers key (``rename``,
    ``swap_halves``) or several (``split``: the tensor's dim 0 cut into parts in proportion to
    ``ratios``, default equal parts), with ``\\1``-style group references.
    ``swap_halves``: the first and second half of dim 0 are exchanged (BFL/SAI ``shift, scale`` vs
    diffusers ``scale, shift`` of the final AdaLayerNormContinuous).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    match: str
    to: tuple[str, ...] = Field(min_length=1)
    op: Literal["rename", "split", "swap_halves"] = "rename"
    ratios: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> _KeyRule:
        try:
            re.compile(self.match)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {self.match!r}: {exc}") from exc
        if self.op != "split" and len(self.to) != 1:
            raise ValueError(f"rule {self.match!r}: {self.op} names exactly one target")
        if self.op == "split" and len(self.to) < 2:
            raise ValueError(f"rule {self.match!r}: split names two or more targets")
        if self.ratios and (self.op != "split" or len(self.ratios) != len(self.to) or min(self.ratios) < 1):
            raise ValueError(f"rule {self.match!r}: ratios must be positive, one per split target")
        return self


class _Variant(BaseModel):
    """A variant of the architecture (Flux dev / schnell, SD3 / SD3.5): key prefixes present / absent."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    all: tuple[str, ...] = ()
    none: tuple[str, ...] = ()
    #: the shipped config folder of this variant, when it is not the record's
    diffusers_config: str | None = None


class _ComfyInput(BaseModel):
    """One float input of ComfyUI's merge node and the evomerge block whose alpha it carries;
    with ``count``, ``{i}`` in both names runs over ``range(count)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    input: str
    block: str
    count: int | None = Field(default=None, ge=1)

    def expand(self) -> list[tuple[str, str]]:
        if self.count is None:
            return [(self.input, self.block)]
        return [(self.input.format(i=i), self.block.format(i=i)) for i in range(self.count)]


class _ComfyUI(BaseModel):
    """The architecture's ComfyUI model-specific merge node (``comfy_extras/nodes_model_merging_model_specific.py``):
    its float inputs in the node's order, and the block whose alpha ``CLIPMergeSimple`` gets (the text encoders)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    node: str
    inputs: tuple[_ComfyInput, ...] = Field(min_length=1)
    clip: str | None = None

    def expanded(self) -> list[tuple[str, str]]:
        """``(ComfyUI input name, evomerge block)`` in the node's input order."""
        return [pair for item in self.inputs for pair in item.expand()]


class LayoutSpec(BaseModel):
    """The validated content of an architecture record (``layouts/<name>.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    title: str
    diffusers_config: str
    blocks: tuple[str, ...] = Field(min_length=1)
    rules: tuple[_Rule, ...] = Field(min_length=1)
    components: tuple[_Component, ...] = ()
    identify: _Identify
    #: regexes of keys that inference never reads and that some formats omit (SD2 single files carry
    #: the last OpenCLIP layer, diffusers folders do not). Parents may differ in these keys only; a
    #: pattern with a ``(?P<layer>\d+)`` group matches only the highest layer present.
    inference_unused: tuple[str, ...] = ()
    #: the diffusers pipeline class that renders this architecture
    pipeline: str
    #: the pipeline's denoiser module (``unet`` or ``transformer``)
    denoiser: Literal["unet", "transformer"] = "unet"
    #: the pipeline modules in the checkpoint (DiT architectures; SD1/SD2/SDXL use ``keymap``)
    modules: tuple[_Module, ...] = ()
    #: other formats' prefixes, rewritten to the canonical ones on load (first match wins)
    aliases: tuple[_Alias, ...] = ()
    #: the prefix a bare denoiser file (Black Forest Labs' ``flux1-dev.safetensors``) lacks
    bare_prefix: str | None = None
    #: regexes of keys in real files that are not weights of any module (dropped on load)
    ignore: tuple[str, ...] = ()
    key_rules: tuple[_KeyRule, ...] = ()
    variants: tuple[_Variant, ...] = ()
    #: the LoRA block-weight layout of ``optimizer/adapters/layouts`` (None: no LBW presets)
    lbw_layout: str | None = None
    #: ComfyUI's merge node for this architecture (``export --format comfyui``); None: no such node
    comfyui: _ComfyUI | None = None

    @field_validator("inference_unused", "ignore")
    @classmethod
    def _valid_patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns

    @field_validator("blocks")
    @classmethod
    def _unique_blocks(cls, blocks: tuple[str, ...]) -> tuple[str, ...]:
        dupes = sorted({b for b in blocks if blocks.count(b) > 1})
        if dupes:
            raise ValueError(f"blocks listed twice: {dupes}")
        return blocks

    @model_validator(mode="after")
    def _literal_blocks_exist(self) -> LayoutSpec:
        for rule in self.rules:
            if "{" not in rule.block and rule.block not in self.blocks:
                raise ValueError(f"rule {rule.match!r} assigns unknown block {rule.block!r}")
        if self.modules and not self.key_rules and any(m.scheme == "key_rules" for m in self.modules):
            raise ValueError("a module uses scheme key_rules but the record has no key_rules")
        component_names = {c.name for c in self.components}
        clash = component_names & set(self.blocks)
        if clash:
            raise ValueError(f"component names clash with block names: {sorted(clash)}")
        if self.comfyui is not None:
            named = [b for _, b in self.comfyui.expanded()] + ([self.comfyui.clip] if self.comfyui.clip else [])
            unknown = sorted({b for b in named if b not in self.blocks})
            if unknown:
                raise ValueError(f"comfyui names unknown blocks: {unknown}")
        return self


@dataclass(frozen=True)
class KeyAssignment:
    """Result of binding a layout to concrete keys: ``owner[key]`` is a block or component name."""

    owner: Mapping[str, str]
    layout: BlockLayout

    def keys_of(self, name: str) -> list[str]:
        """Keys owned by block or component ``name``, in the order they were given."""
        return [k for k, v in self.owner.items() if v == name]

    def merged_keys(self) -> list[str]:
        """Keys owned by MBW blocks (not components), grouped by block in MBW order."""
        order = {b: i for i, b in enumerate(self.layout.blocks)}
        keys = [k for k, v in self.owner.items() if v in order]
        return sorted(keys, key=lambda k: order[self.owner[k]])


class BlockLayout:
    """A block layout: MBW block order plus key -> block rules. Build with :func:`load_layout`."""

    def __init__(self, spec: LayoutSpec) -> None:
        self.spec = spec
        self._rules = [(re.compile(r.match), r.block) for r in spec.rules]
        self._components = [(re.compile(c.match), c.name) for c in spec.components]
        self.inference_unused = tuple(re.compile(p) for p in spec.inference_unused)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def blocks(self) -> tuple[str, ...]:
        return self.spec.blocks

    @property
    def ldm(self) -> bool:
        """True for SD1 / SD2 / SDXL records: their modules convert through :mod:`optimizer.checkpoint.keymap`."""
        return any(m.scheme in LDM_SCHEMES for m in self.spec.modules)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.spec.components)

    def __repr__(self) -> str:
        return f"BlockLayout({self.name!r}, {len(self.blocks)} blocks)"

    def owner_of(self, key: str) -> str:
        """The single block or component that owns ``key``; raises :class:`LayoutError` otherwise."""
        owners: list[tuple[str, str]] = []
        for pattern, block in self._rules:
            m = pattern.match(key)
            if m:
                name = block.format(*(int(g) if g.isdigit() else g for g in m.groups()))
                owners.append((pattern.pattern, name))
        for pattern, name in self._components:
            if pattern.match(key):
                owners.append((pattern.pattern, name))
        if not owners:
            raise LayoutError(f"{self.name}: no block owns key {key!r}")
        if len(owners) > 1:
            raise LayoutError(
                f"{self.name}: key {key!r} is owned by several rules: "
                + ", ".join(f"{p!r} -> {n}" for p, n in owners)
            )
        name = owners[0][1]
        if name not in self.blocks and name not in self.components:
            raise LayoutError(f"{self.name}: key {key!r} maps to {name!r}, which is not a block of this layout")
        return name

    def assign(self, keys: Iterable[str]) -> KeyAssignment:
        """Bind the layout to ``keys``: every key must be owned by exactly one block or component."""
        return KeyAssignment(owner={k: self.owner_of(k) for k in keys}, layout=self)


def available_layouts() -> list[str]:
    """Names of the layouts shipped in ``optimizer/architectures/layouts``."""
    root = resources.files("optimizer.architectures") / "layouts"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def parse_layout(text: str, *, source: str = "<string>") -> BlockLayout:
    """Parse and validate layout YAML; errors name the file and the offending field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LayoutError(f"{source}: not valid YAML: {exc}") from exc
    try:
        return BlockLayout(LayoutSpec.model_validate(data))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise LayoutError(f"{source}: invalid layout: {problems}") from exc


@cache
def load_layout(name: str) -> BlockLayout:
    """Load a shipped layout by name (``sd1``, ``sd2``, ``sdxl``)."""
    names = available_layouts()
    if name not in names:
        raise LayoutError(f"unknown architecture {name!r}; known: {', '.join(names)}")
    path = resources.files("optimizer.architectures") / "layouts" / f"{name}.yaml"
    return parse_layout(path.read_text(encoding="utf-8"), source=f"layouts/{name}.yaml")
