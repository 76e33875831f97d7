"""Merging checkpoint files into one file: the job behind ``evomerge merge``.

Data flow: parent files -> :class:`Checkpoint` (LDM keys) -> :class:`ParentBank` (flat buffers on
the device) -> :class:`Merger` (one in-place merge) -> atomic save with merge metadata.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optimizer.architectures.detect import check_compatible, detect_architecture
from optimizer.architectures.layout import BlockLayout
from optimizer.architectures.mbw import parse_mbw
from optimizer.checkpoint.load import cast_floats, load_checkpoint, parse_dtype
from optimizer.checkpoint.prediction import prediction_metadata
from optimizer.checkpoint.reconcile import fill_inference_unused
from optimizer.checkpoint.save import merge_metadata, save_safetensors
from optimizer.checkpoint.types import Checkpoint, CheckpointError
from optimizer.merge import Merger, MergeRecipe, ParentBank


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> cuda when available, else cpu; anything else is passed to torch."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise CheckpointError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but CUDA is not available")
    return resolved


def recipe_from_strings(
    *, method: str, layout: BlockLayout, params: dict[str, str], seed: int = 0, merge_vae: bool = False
) -> MergeRecipe:
    """A recipe from command-line text: each value is one number for every block, or an MBW string.

    Parameters not given take the method's defaults (uniform over blocks).
    """
    uniform: dict[str, float] = {}
    per_block: dict[str, dict[str, float]] = {}
    for name, text in params.items():
        if any(sep in text.strip() for sep in ", "):
            per_block[name] = parse_mbw(text, layout=layout)
        else:
            try:
                uniform[name] = float(text)
            except ValueError:
                raise CheckpointError(f"parameter {name}: {text!r} is neither a number nor an MBW string") from None
            per_block[name] = {}
    base = MergeRecipe.uniform(method=method, layout=layout, seed=seed, merge_vae=merge_vae, **uniform, **dict.fromkeys(
        (n for n in per_block if n not in uniform), 0.0))
    merged = {name: dict(values) for name, values in base.params.items()}
    for name, values in per_block.items():
        if values:
            merged[name] = values
    return MergeRecipe(method=method, params=merged, seed=seed, merge_vae=merge_vae)


def check_parent_count(n: int) -> None:
    """:class:`CheckpointError` unless there are at least two parents."""
    if n < 2:
        raise CheckpointError("a merge needs at least two parent checkpoints")


def nonfinite_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors that hold a NaN or an infinity, sorted."""
    return sorted(k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def check_finite(state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """:class:`CheckpointError` naming ``source`` and its first keys if any tensor is not finite."""
    bad = nonfinite_keys(state_dict)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(
            f"{source}: {len(bad)} tensor(s) hold NaN or Inf values ({shown}); a merge would spread them into the output "
            "(--allow-nonfinite / allow_nonfinite: true merges it anyway)"
        )


@dataclass(frozen=True)
class LoadedParents:
    """Parents loaded once: their provenance (tensors dropped) and the bank on the device."""

    checkpoints: list[Checkpoint]
    bank: ParentBank
    notes: tuple[str, ...] = ()  # e.g. keys that inference never reads, copied between formats

    @property
    def prediction_type(self) -> str | None:
        """What the parents predict where any file says (they agree: :func:`load_parents` checks)."""
        return next((c.prediction_type for c in self.checkpoints if c.prediction_type), None)

    @property
    def stored_dtype(self) -> str:
        """The dtype the parents are stored in (``float16``): their common one, else the promoted one;
        the bank's when no file says."""
        named = [getattr(torch, c.stored_dtype) for c in self.checkpoints if c.stored_dtype]
        if not named:
            return str(self.bank.dtype).removeprefix("torch.")
        dtype = named[0]
        for other in named[1:]:
            dtype = torch.promote_types(dtype, other)
        return str(dtype).removeprefix("torch.")


def load_parents(
    *,
    paths: Sequence[str | os.PathLike[str]],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "auto",
    placement: str = "device",
    allow_nonfinite: bool = False,
    minimum: int = 2,
) -> LoadedParents:
    """Load parent checkpoints, check they can be merged, and build the bank: on the device
    (``placement="device"``), or in host memory streamed to the device per merge (``"host"``).
    ``minimum=1`` loads one checkpoint as a bank of one (to render it, not to merge it).

    A parent holding NaN or infinite values is refused (the error names its file and keys: a
    merge would spread them into the output) unless ``allow_nonfinite``.

    The returned checkpoints keep path, hashes and metadata but no tensors: the bank holds the
    only copy of the weights.
    """
    if minimum >= 2 or not paths:
        check_parent_count(len(paths))
    if placement not in ("device", "host"):
        raise CheckpointError(f"unknown bank placement {placement!r}; use device or host")
    target = parse_dtype(dtype)
    checkpoints = [load_checkpoint(p, dtype=target) for p in paths]
    names = [str(c.path) for c in checkpoints]
    if not allow_nonfinite:
        for checkpoint, name in zip(checkpoints, names, strict=True):
            check_finite(checkpoint.state_dict, source=name)
    known = [(c.prediction_type, n) for c, n in zip(checkpoints, names, strict=True) if c.prediction_type]
    if len({p for p, _ in known}) > 1:
        (p0, n0), (p1, n1) = known[0], next(k for k in known if k[0] != known[0][0])
        raise CheckpointError(
            f"cannot merge {n0} ({p0}) with {n1} ({p1}): they predict different targets (SD2 768-v vs 512-base)"
        )
    first_layout = detect_architecture(checkpoints[0].state_dict, source=names[0])
    notes = fill_inference_unused([c.state_dict for c in checkpoints], layout=first_layout, names=names)
    layout = check_compatible([c.state_dict for c in checkpoints], names=names)
    bank = ParentBank.build(
        state_dicts=[c.state_dict for c in checkpoints], layout=layout, device=resolve_device(device), dtype=target,
        placement=placement,
    )
    light = [
        Checkpoint(path=c.path, state_dict={}, layout=c.layout, sha256=c.sha256, source_format=c.source_format, metadata=c.metadata,
                   prediction_type=c.prediction_type, stored_dtype=c.stored_dtype)
        for c in checkpoints
    ]
    return LoadedParents(checkpoints=light, bank=bank, notes=tuple(notes))


def default_config_dir(parents: LoadedParents) -> Path:
    """The diffusers config folder of merged weights when none is given: the first parent's own
    folder (diffusers), or its zoo's ``config/`` (a zoo model in its zoo), else the shipped config
    of the architecture."""
    first = parents.checkpoints[0]
    own = own_config_dir(first.path)
    if own is not None:
        return own
    from optimizer.architectures.detect import shipped_config_name
    from optimizer.checkpoint.config_dir import diffusers_config_dir

    return Path(diffusers_config_dir(shipped_config_name(parents.bank.layout, parents.bank.keys)))


def own_config_dir(path: str | os.PathLike[str]) -> Path | None:
    """The config folder a checkpoint brings along, found from its path alone: a diffusers folder
    is its own; a zoo model inside its zoo uses the zoo's ``config/``; else ``None``."""
    path = Path(path)
    if path.is_dir() and (path / "model_index.json").is_file():
        return path
    zoo = path.resolve().parent.parent
    if (zoo / "manifest.json").is_file() and (zoo / "config" / "model_index.json").is_file():
        return zoo / "config"
    return None


def config_hint(parents: LoadedParents) -> str:
    """What to do when the weights do not fit the default config folder (a non-standard model)."""
    for checkpoint in parents.checkpoints:
        zoo_name = checkpoint.metadata.get("evomerge_zoo_model")
        if zoo_name:
            return (f"{checkpoint.path} is the zoo model {zoo_name!r} outside its zoo folder: give its zoo's config/ "
                    "folder as config_dir (study file) or --config")
    return "a model of non-standard size needs its own diffusers config folder: give it as config_dir (study file) or --config"


def check_merged_output(output: str | os.PathLike[str], *, output_format: str, overwrite: bool) -> Path:
    """``output`` if merged weights in ``output_format`` can be written there (see
    :func:`optimizer.atomic.check_output`: a diffusers folder replaces only a diffusers folder)."""
    from optimizer.atomic import check_output
    from optimizer.checkpoint.diffusers_folder import is_diffusers_folder

    folder = output_format == "diffusers"
    return check_output(output, overwrite=overwrite, folder=folder, replaceable=is_diffusers_folder if folder else None,
                        what="diffusers folder" if folder else "checkpoint")


def equal_parents(merger: Merger) -> list[int]:
    """Indices of the parents whose weights (every merged tensor) equal ``merger``'s output exactly."""
    out = merger.output
    return [i for i, buf in enumerate(merger.bank.buffers) if torch.equal(out, buf.to(out.device))]


def merge_to_file(
    *,
    parents: LoadedParents,
    recipe: MergeRecipe,
    output: str | os.PathLike[str],
    output_format: str = "safetensors",
    config_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    loras: Sequence[Any] = (),
    warn: Callable[[str], None] | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Merge once in memory and write the result atomically (safetensors or a diffusers folder).

    ``warn`` is told when the merged weights equal a parent's exactly (a merge that changed nothing).

    ``loras``: :class:`~optimizer.adapters.lora.Lora` objects the recipe's ``loras`` strengths name,
    added in place after the merge (baked into the output).

    A diffusers folder needs component configs that match the weights: ``config_dir``, else the
    first parent when it is a diffusers folder, else the shipped config of the architecture.
    """
    output = check_merged_output(output, output_format=output_format, overwrite=overwrite)
    merger = Merger(parents.bank, loras=loras)
    merger.merge(recipe)
    same = equal_parents(merger)
    if same and warn is not None:
        names = ", ".join(f"parent {i} ({parents.checkpoints[i].path.name})" for i in same)
        warn(f"the merged weights equal {names}: this recipe changes nothing (check alpha / the per-block weights)")
    return write_merged(
        state_dict=merger.state_dict(), parents=parents, recipe=recipe, output=output, output_format=output_format,
        config_dir=config_dir, overwrite=overwrite, dtype=dtype,
    )


def write_merged(
    *,
    state_dict: dict,
    parents: LoadedParents,
    recipe: MergeRecipe,
    output: str | os.PathLike[str],
    output_format: str = "safetensors",
    config_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write merged weights atomically: ``safetensors`` (canonical single file, ComfyUI / A1111
    names, the recipe in its metadata), ``bare`` (Flux / SD3: the transformer alone with Black
    Forest Labs' / Stability's names, as ``flux1-dev.safetensors``) or ``diffusers`` (a folder).
    ``dtype``: floating-point tensors are cast to it first (a study computed in fp32 on CPU writes
    its fp16 parents' dtype); None writes them as they are."""
    output = check_merged_output(output, output_format=output_format, overwrite=overwrite)
    state_dict = cast_floats(state_dict, dtype=parse_dtype(dtype))
    if output_format == "safetensors":
        metadata = merge_metadata(recipe=recipe.model_dump(mode="json"), parents=parents.checkpoints)
        metadata.update(prediction_metadata(parents.prediction_type))
        return save_safetensors(state_dict=state_dict, path=output, metadata=metadata)
    if output_format == "bare":
        prefix = parents.bank.layout.spec.bare_prefix
        if prefix is None:
            raise CheckpointError(f"{parents.bank.layout.name} has no bare transformer format; use safetensors or diffusers")
        metadata = merge_metadata(recipe=recipe.model_dump(mode="json"), parents=parents.checkpoints)
        metadata.update(prediction_metadata(parents.prediction_type))
        bare = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        return save_safetensors(state_dict=bare, path=output, metadata=metadata)
    if output_format == "diffusers":
        from optimizer.checkpoint.diffusers_folder import write_diffusers_folder

        layout = parents.bank.layout
        given = config_dir is not None
        try:
            write_diffusers_folder(
                state_dict=state_dict, architecture=layout.name, path=output, config_dir=config_dir or default_config_dir(parents),
                overwrite=overwrite, prediction_type=parents.prediction_type,
            )
        except CheckpointError as exc:
            if given or "expects" not in str(exc):
                raise
            raise CheckpointError(f"{exc}; {config_hint(parents)}") from None
        return output
    raise CheckpointError(f"unknown output format {output_format!r}; use safetensors, bare or diffusers")
