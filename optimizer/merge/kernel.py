"""The in-memory merge kernel: parents in a :class:`ParentBank`, candidates written into one buffer.

Usage::

    bank = ParentBank.build(state_dicts=[a, b], layout=load_layout("sd1"), device="cuda", dtype=torch.float16)
    del a, b                                   # the bank holds its own copies
    merger = Merger(bank)
    model.load_state_dict(merger.state_dict(), assign=True)   # once: the model now views the buffer
    stats = merger.merge(recipe)               # every trial: rewrites the buffer in place

Per merge, an elementwise method is called once per block segment with that block's parameters
(26 calls for SD1; ``weighted_sum`` of two parents is one ``torch.lerp`` per segment: one read of
each parent and one write), a tensor method once per tensor. No allocation proportional to the
model happens for elementwise methods; tensor methods allocate temporaries the size of one tensor.
Stochastic methods (DARE) get a generator on the bank's device seeded with
:func:`~optimizer.merge.methods.tensor_seed` ``(seed, key)``, so a merge is reproducible and equals
:func:`~optimizer.merge.reference.merge_state_dicts_reference` on the same device.

Backends: ``"torch"`` is the per-segment path above. ``"triton"`` computes linear methods
(``weighted_sum``, ``add_difference``: see ``MergeMethod.coefficients``) with ONE fused Triton launch
over every block (:mod:`optimizer.merge.fused`: each parent read once, the output written once,
fp32 arithmetic); other methods still take the torch path. ``"auto"`` (default) is ``"triton"`` on a
CUDA device where Triton imports, else ``"torch"``.

LoRAs (``loras=``, :class:`~optimizer.adapters.lora.LoraSet`): after the blocks are merged, each LoRA
the recipe names is added in place with its per-block strengths (``recipe.loras``), one ``addmm_``
per adapted weight. Every merge rewrites every block from the parents first, so nothing accumulates.

Components (VAE): copied from parent 0 unless ``recipe.merge_vae``, then merged with the BASE
block's parameters. Passthrough tensors (integer, ``position_ids``) are parent 0's, never merged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from optimizer.adapters.lora import Lora, LoraApplyStats, LoraSet
from optimizer.adapters.lora_format import LoraError
from optimizer.merge.errors import MergeError, RecipeError
from optimizer.merge.flat import ParentBank, Segment
from optimizer.merge.fused import FusedLinear, fused_available
from optimizer.merge.methods import MergeMethod, tensor_seed
from optimizer.merge.recipe import VAE_PARAMS_BLOCK, MergeRecipe


@dataclass(frozen=True)
class MergeStats:
    """What one :meth:`Merger.merge` did."""

    method: str
    seconds: float  # wall time, including a device synchronize on CUDA
    calls: int  # method calls (segments for elementwise methods, tensors for tensor methods; 1 per fused launch)
    merged_elements: int
    copied_elements: int  # components copied from parent 0 in this merge
    merged_vae: bool
    backend: str = "torch"  # what computed this merge: "torch" or "triton"
    lora_layers: int = 0  # adapted weights updated by LoRAs (non-zero strength)
    lora_seconds: float = 0.0  # part of ``seconds`` spent adding LoRAs


Backend = Literal["auto", "torch", "triton"]


class Merger:
    """Owns ONE flat output buffer, the same size as a parent buffer, initialised to parent 0.

    ``backend``: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module docstring); asking for
    ``"triton"`` where it cannot run raises :class:`~optimizer.merge.errors.MergeError`.
    """

    def __init__(self, bank: ParentBank, *, backend: Backend = "auto", loras: Sequence[Lora] = ()) -> None:
        if backend not in ("auto", "torch", "triton"):
            raise MergeError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        self.bank = bank
        # A normal (non-inference) tensor even if built under inference_mode, so that its views
        # can back nn.Parameters via load_state_dict(..., assign=True).
        with torch.inference_mode(False):
            if bank.placement == "host":
                self.output = bank.buffers[0].to(bank.device, copy=True)
            else:
                self.output = bank.buffers[0].clone()
        views: dict[str, Tensor] = {}
        for span in bank.spans:
            views[span.key] = span.view(self.output)
        for key, tensor in bank.passthrough.items():
            views[key] = tensor
        self._views = {key: views[key] for key in bank.keys}
        self.loras = LoraSet(loras, views={span.key: span.view(self.output) for span in bank.spans}) if loras else None
        self._component_is_parent0 = {name: True for name, seg in bank.segments.items() if seg.component}
        if backend == "triton" and bank.placement == "host":
            raise MergeError("the fused Triton kernel reads parents on the device; a host bank streams them (use backend 'torch')")
        use_triton = backend == "triton" or (
            backend == "auto" and bank.placement == "device" and bank.device.type == "cuda" and fused_available(bank.device)
        )
        from optimizer.merge.streaming import SegmentStager

        self._stager = SegmentStager(bank) if bank.placement == "host" else None
        self._fused = FusedLinear(bank=bank, output=self.output) if use_triton else None
        self._listeners: list[Callable[[], None]] = []
        self.backend = "triton" if use_triton else "torch"

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every merge and every :meth:`add_loras` (once the buffer holds
        the new weights): a render binding refreshes the few tensors it keeps outside the buffer
        (swapped Flux / SD3 modulation halves) there."""
        self._listeners.append(listener)

    def notify_changed(self) -> None:
        """Tell the listeners the buffer changed (for code that writes into it directly)."""
        for listener in self._listeners:
            listener()

    def __repr__(self) -> str:
        return f"Merger({self.bank!r}, backend={self.backend!r})"

    def state_dict(self) -> dict[str, Tensor]:
        """``{key: view}`` in parent 0's key order; the same tensor objects on every call, so a
        model loaded with ``load_state_dict(views, assign=True)`` sees each merge without a copy.
        Passthrough tensors are the bank's copies of parent 0's (shared, do not modify)."""
        return dict(self._views)

    def merge(self, recipe: MergeRecipe, *, generator_seed: int | None = None, with_loras: bool = True) -> MergeStats:
        """Write the candidate of ``recipe`` into the output buffer in place.

        ``generator_seed`` overrides ``recipe.seed`` for stochastic methods. ``with_loras=False``
        merges without adding the recipe's LoRAs (a post-merge step, such as norm recalibration,
        then runs before :meth:`add_loras`). Raises
        :class:`~optimizer.merge.errors.RecipeError` / ``MergeMethodError`` before touching the
        buffer when the recipe does not fit the bank's layout and parent count.
        """
        bank = self.bank
        recipe.validate_for(bank.layout, bank.n_parents)
        self._check_loras(recipe)
        method = recipe.merge_method
        names = method.param_names(bank.n_parents)
        seed = recipe.seed if generator_seed is None else int(generator_seed)
        started = time.perf_counter()
        if self._fused is not None and method.coefficients is not None:
            return self._merge_fused(recipe, names, started, with_loras=with_loras)
        calls = merged = 0
        work = [(bank.segments[b], b) for b in bank.layout.blocks]
        if recipe.merge_vae:
            work += [(seg, VAE_PARAMS_BLOCK) for seg in bank.segments.values() if seg.component]
        params_of = {seg.name: _block_params(recipe, names, block) for seg, block in work}
        with torch.inference_mode():
            if self._stager is None:
                for seg, _ in work:
                    calls += self._merge_segment(method, seg, params_of[seg.name], seed)
                    merged += seg.numel
            else:
                for seg, staged in self._stager.stream([seg for seg, _ in work]):
                    calls += self._merge_segment(method, seg, params_of[seg.name], seed, staged=staged)
                    merged += seg.numel
            copied = self._settle_components(merged_vae=recipe.merge_vae)
        return self._stats(recipe, started, calls=calls, merged=merged, copied=copied, backend="torch", with_loras=with_loras)

    def load_parent(self, index: int) -> None:
        """Write parent ``index`` as it is (every block and component, no LoRA) into the output
        buffer: what the sanity gate renders as "the parents". The next :meth:`merge` writes every
        block again and restores parent 0's components."""
        bank = self.bank
        if not 0 <= index < bank.n_parents:
            raise MergeError(f"parent index {index} out of range: the bank holds {bank.n_parents} parents")
        with torch.inference_mode():
            self.output.copy_(bank.buffers[index], non_blocking=bank.placement == "host")
        for name in self._component_is_parent0:
            self._component_is_parent0[name] = index == 0
        self.notify_changed()
        if self.output.device.type == "cuda":
            torch.cuda.synchronize(self.output.device)

    def add_loras(self, recipe: MergeRecipe) -> LoraApplyStats | None:
        """Add ``recipe``'s LoRAs to the buffer in place (after a ``merge(..., with_loras=False)``);
        ``None`` when the recipe names none. Raises :class:`RecipeError` before touching the buffer."""
        self._check_loras(recipe)
        if not recipe.loras or self.loras is None:
            return None
        with torch.inference_mode():
            stats = self.loras.apply(recipe.loras)
        self.notify_changed()
        return stats

    def _check_loras(self, recipe: MergeRecipe) -> None:
        if not recipe.loras:
            return
        if self.loras is None:
            raise RecipeError(f"the recipe names LoRA(s) {sorted(recipe.loras)} but this merger holds none")
        try:
            self.loras.check(recipe.loras)
        except LoraError as exc:
            raise RecipeError(str(exc)) from None

    def _merge_fused(self, recipe: MergeRecipe, names: tuple[str, ...], started: float, *, with_loras: bool) -> MergeStats:
        """All blocks (and, with ``merge_vae``, components) in one launch; components otherwise
        copied from parent 0 once, as in the torch path."""
        bank, fused = self.bank, self._fused
        assert fused is not None and recipe.merge_method.coefficients is not None
        coefficients = recipe.merge_method.coefficients
        rows = []
        merged = 0
        for name in fused.segment_names:
            seg = bank.segments[name]
            if seg.component and not recipe.merge_vae:
                break
            block = VAE_PARAMS_BLOCK if seg.component else name
            rows.append(coefficients(bank.n_parents, _block_params(recipe, names, block)))
            merged += seg.numel
        with torch.inference_mode():
            fused(rows)
            copied = self._settle_components(merged_vae=recipe.merge_vae)
        return self._stats(recipe, started, calls=1, merged=merged, copied=copied, backend="triton", with_loras=with_loras)

    def _settle_components(self, *, merged_vae: bool) -> int:
        """After a merge: components (VAE) that were not merged this time must hold parent 0's
        weights; copy them back only if an earlier merge overwrote them. Returns elements copied."""
        bank = self.bank
        copied = 0
        for name, seg in bank.segments.items():
            if not seg.component:
                continue
            if merged_vae:
                self._component_is_parent0[name] = False
            elif not self._component_is_parent0[name]:
                seg.view(self.output).copy_(seg.view(bank.buffers[0]), non_blocking=bank.placement == "host")
                copied += seg.numel
                self._component_is_parent0[name] = True
        return copied

    def _stats(
        self, recipe: MergeRecipe, started: float, *, calls: int, merged: int, copied: int, backend: str, with_loras: bool
    ) -> MergeStats:
        """Add the recipe's LoRAs (``with_loras``), wait for the device (so ``seconds`` is the merge's real duration) and report."""
        lora = self.add_loras(recipe) if with_loras else None
        if lora is None:
            self.notify_changed()  # add_loras notified otherwise
        if self.output.device.type == "cuda":
            torch.cuda.synchronize(self.output.device)
        return MergeStats(
            method=recipe.merge_method.name,
            seconds=time.perf_counter() - started,
            calls=calls,
            merged_elements=merged,
            copied_elements=copied,
            merged_vae=recipe.merge_vae,
            backend=backend,
            lora_layers=lora.layers if lora else 0,
            lora_seconds=lora.seconds if lora else 0.0,
        )

    def _merge_segment(
        self, method: MergeMethod, seg: Segment, params: dict[str, float], seed: int, *, staged: Sequence[Tensor] | None = None
    ) -> int:
        """Merge one segment; ``staged``: the parents' copies of it on the device (host banks)."""
        if seg.numel == 0:
            return 0
        parents = list(staged) if staged is not None else [seg.view(b) for b in self.bank.buffers]
        if method.granularity == "elementwise":
            method.fn(parents, out=seg.view(self.output), generator=None, **params)
            return 1
        for span in seg.spans:
            generator = None
            if method.stochastic:
                generator = torch.Generator(device=self.output.device).manual_seed(tensor_seed(seed, span.key))
            start = span.offset - seg.start
            views = [p[start : start + span.numel].view(span.shape) for p in parents]
            method.fn(views, out=span.view(self.output), generator=generator, **params)
        return len(seg.spans)


def _block_params(recipe: MergeRecipe, names: tuple[str, ...], block: str) -> dict[str, float]:
    """The method parameters ``names`` of ``recipe`` for one block (or ``VAE_PARAMS_BLOCK``)."""
    return {p: float(recipe.params[p][block]) for p in names}
