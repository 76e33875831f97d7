"""Normalization recalibration after a merge: REPAIR / AdaBN for GroupNorm and LayerNorm.

Merging two models averages their weights, and the merged network's activation statistics drift
away from both parents; across unrelated initialisations the per-channel variance collapses with
depth (REPAIR, Jordan et al. 2022, arXiv 2211.08403). AdaBN (Li et al. 2016) fixes BatchNorm by
re-estimating its running statistics; SD UNets have GroupNorm and LayerNorm, which keep no running
statistics, so the correction goes into their affine parameters instead.

Math. A norm layer computes, per channel ``c``, ``y_c = gamma_c * xhat_c + beta_c`` where ``xhat``
is the normalised input (GroupNorm: per sample and group; LayerNorm: per token), which does not
depend on ``gamma`` or ``beta``. On a calibration batch let ``(mu_M, sigma_M)`` be the merged
model's per-channel mean and std of ``y`` and ``(mu_t, sigma_t)`` the target: the interpolation of
the parents' per-channel statistics at the same layer on the same batch, ::

    mu_t = sum_i w_i mu_i,        sigma_t = sum_i w_i sigma_i

with ``w`` the merge's interpolation weights for the block that owns the layer (``(1 - alpha,
alpha)`` for ``weighted_sum``). With ``s = sigma_t / sigma_M``::

    gamma' = gamma * s,           beta' = (beta - mu_M) * s + mu_t

so ``y' = s * (y - mu_M) + mu_t``: the layer's output has mean ``mu_t`` and std ``sigma_t`` exactly,
given its input. Channels with ``sigma_M <= eps`` keep scale 1 and are only shifted (``beta' = beta
- mu_M + mu_t``). Channels are dim 1 of a GroupNorm output ``[B, C, H, W]`` (statistics over ``B, H,
W``) and the trailing ``normalized_shape`` dims of a LayerNorm output ``[B, T, C]`` (statistics over
``B, T``). Every std here is the population std (``correction=0``), computed in float32 whatever
the model's dtype.

Sequential correction. Correcting a layer changes the input of every later layer, so
:func:`recalibrate_norms` corrects all layers in ONE forward pass, in execution order: a forward
hook on each target layer measures its output (which already reflects every upstream correction,
because each hook returns its corrected output), rewrites ``gamma``/``beta`` in place and returns
the layer's output recomputed with the new parameters. A later forward of the same batch therefore
reproduces the corrected activations and every layer's statistics equal its targets (up to
rounding; :func:`collect_norm_statistics` measures them).

Usage::

    batch = make_calibration_batch(encoder_hidden_states=ehs, timesteps=[999, 750, 500, 250], latent_shape=(4, 8, 8), seed=0)
    parents = [collect_norm_statistics(unet=u, batch=batch) for u in (unet_a, unet_b)]
    targets = interpolate_statistics(parents=parents, weights={name: (1 - alpha, alpha) for name in parents[0]})
    stats = recalibrate_norms(unet=merged_unet, batch=batch, targets=targets)

Parameters are rewritten in place (``copy_`` under ``no_grad``): the same ``Parameter`` objects, the
same storage, the same dtype. A model whose parameters are views into the
:class:`~optimizer.merge.kernel.Merger` buffer thus receives the correction in that buffer, and the
next :meth:`~optimizer.merge.kernel.Merger.merge` overwrites it (recalibrate after every merge).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from optimizer.merge.errors import MergeError

#: the norm layer types this module corrects (their subclasses included)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm)


class RecalibrationError(MergeError):
    """A layer that cannot be recalibrated, statistics that do not fit, or a bad calibration batch."""


# ---------------------------------------------------------------- calibration batch


@dataclass(frozen=True)
class CalibrationBatch:
    """The UNet inputs that statistics are measured on.

    ``sample``: latents ``[B, C, h, w]``; ``timestep``: ``[B]`` integers; ``encoder_hidden_states``:
    text conditioning ``[B, T, D]``; ``added_cond_kwargs``: passed to the UNet as is (SDXL's
    ``text_embeds`` / ``time_ids``), ``None`` for SD1/SD2.

    When the parents' text encoders differ, each model must be measured on ITS OWN conditioning of
    the same prompts, with the same latents and timesteps: use
    :meth:`with_encoder_hidden_states` for the per-model override (the merged model's conditioning
    comes from the merged text encoder). Tensors are kept as given; the functions of this module
    move them to the UNet's device and floating dtype.
    """

    sample: Tensor
    timestep: Tensor
    encoder_hidden_states: Tensor
    added_cond_kwargs: Mapping[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.sample.dim() != 4:
            raise RecalibrationError(f"calibration sample must be [B, C, h, w], got shape {tuple(self.sample.shape)}")
        b = self.sample.shape[0]
        if b == 0:
            raise RecalibrationError("calibration batch is empty")
        if self.timestep.shape != (b,):
            raise RecalibrationError(f"calibration timestep must be [B] = [{b}], got shape {tuple(self.timestep.shape)}")
        self._check_conditioning(self.encoder_hidden_states)

    def _check_conditioning(self, encoder_hidden_states: Tensor) -> None:
        b = self.sample.shape[0]
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != b:
            raise RecalibrationError(
                f"encoder_hidden_states must be [B, T, D] with B = {b}, got shape {tuple(encoder_hidden_states.shape)}"
            )

    @property
    def size(self) -> int:
        """The batch size ``B``."""
        return int(self.sample.shape[0])

    def with_encoder_hidden_states(self, encoder_hidden_states: Tensor) -> CalibrationBatch:
        """The same latents and timesteps with another model's conditioning ``[B, T', D']``."""
        return replace(self, encoder_hidden_states=encoder_hidden_states)

    def unet_inputs(self, *, device: torch.device, dtype: torch.dtype) -> tuple[tuple[Tensor, Tensor], dict[str, Any]]:
        """``(args, kwargs)`` for ``unet(*args, **kwargs)`` on ``device``, floats in ``dtype``."""
        kwargs: dict[str, Any] = {
            "encoder_hidden_states": self.encoder_hidden_states.to(device=device, dtype=dtype),
            "return_dict": False,
        }
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = {
                k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in self.added_cond_kwargs.items()
            }
        return (self.sample.to(device=device, dtype=dtype), self.timestep.to(device)), kwargs


def make_calibration_batch(
    *, encoder_hidden_states: Tensor, timesteps: Sequence[int], latent_shape: Sequence[int], seed: int
) -> CalibrationBatch:
    """A batch of ``B = len(timesteps)`` seeded Gaussian latents, float32 on the CPU.

    ``latent_shape`` is ``(C, h, w)`` of one latent (SD1 at 512 px: ``(4, 64, 64)``).
    ``encoder_hidden_states`` is ``[B, T, D]``, or ``[1, T, D]`` / ``[T, D]`` (one prompt, repeated).

    Latents are ``x_t ~ N(0, I)``, which approximates noisy latents: ``x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) eps`` has roughly unit variance at every ``t`` for scaled SD latents, and is
    exactly ``N(0, I)`` at the last timestep. Image content is missing, but the merged model and
    the parents are measured on the same batch, so only the comparison between them matters.
    The same ``seed`` gives the same latents on every machine (CPU generator).
    """
    steps = [int(t) for t in timesteps]
    if not steps:
        raise RecalibrationError("timesteps is empty: a calibration batch needs at least one sample")
    if any(t < 0 for t in steps):
        raise RecalibrationError(f"timesteps must be non-negative, got {steps}")
    shape = tuple(int(d) for d in latent_shape)
    if len(shape) != 3 or any(d <= 0 for d in shape):
        raise RecalibrationError(f"latent_shape must be (C, h, w) with positive sizes, got {tuple(latent_shape)}")
    b = len(steps)
    ehs = encoder_hidden_states
    if ehs.dim() == 2:
        ehs = ehs.unsqueeze(0)
    if ehs.dim() == 3 and ehs.shape[0] == 1 and b > 1:
        ehs = ehs.expand(b, -1, -1)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    sample = torch.randn((b, *shape), generator=generator, dtype=torch.float32)
    return CalibrationBatch(sample=sample, timestep=torch.tensor(steps, dtype=torch.long), encoder_hidden_states=ehs)


# ---------------------------------------------------------------- layers and statistics


@dataclass(frozen=True)
class NormStats:
    """Per-channel mean and population std of one norm layer's output, float32, shaped like its gamma."""

    mean: Tensor
    std: Tensor


def _is_affine(module: nn.Module) -> bool:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return isinstance(weight, Tensor) and isinstance(bias, Tensor)


def norm_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every GroupNorm/LayerNorm with affine parameters (both ``weight`` and
    ``bias``), in ``named_modules`` order; non-affine ones (and LayerNorms without a bias, which
    cannot be shifted) are skipped. A module registered under two names appears once, first name."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, NORM_TYPES) and _is_affine(m)}


def _resolve_layers(unet: nn.Module, names: Sequence[str] | None) -> dict[str, nn.Module]:
    """The affine norm layers ``names`` (default: all of :func:`norm_layers`), with clear errors."""
    affine = norm_layers(unet)
    if names is None:
        return affine
    if isinstance(names, str):
        raise RecalibrationError(f"layers must be a sequence of layer names, got the string {names!r}")
    modules = dict(unet.named_modules(remove_duplicate=False))
    out: dict[str, nn.Module] = {}
    owner: dict[int, str] = {}
    for name in names:
        module = modules.get(name)
        if module is None:
            raise RecalibrationError(f"the model has no module {name!r}")
        if not isinstance(module, NORM_TYPES):
            raise RecalibrationError(f"layer {name!r} is a {type(module).__name__}, not a GroupNorm or LayerNorm")
        if not _is_affine(module):
            raise RecalibrationError(f"layer {name!r} ({type(module).__name__}) has no affine weight and bias to recalibrate")
        first = owner.setdefault(id(module), name)
        if first != name:
            raise RecalibrationError(f"layers {first!r} and {name!r} are the same module: name it once")
        out[name] = module
    return out


def _channel_dims(module: nn.Module, ndim: int) -> list[int]:
    """Output dims reduced over: all but dim 1 for GroupNorm, all but the trailing
    ``normalized_shape`` dims for LayerNorm."""
    if isinstance(module, nn.GroupNorm):
        return [0, *range(2, ndim)]
    return list(range(ndim - len(module.normalized_shape)))


def _channel_stats(module: nn.Module, output: Tensor) -> NormStats:
    """Per-channel float32 mean and population std of ``output``."""
    var, mean = torch.var_mean(output.float(), dim=_channel_dims(module, output.dim()), correction=0)
    return NormStats(mean=mean, std=var.sqrt())


def _model_placement(unet: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in unet.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise RecalibrationError("the model has no floating-point parameters")


def _forward(unet: nn.Module, batch: CalibrationBatch) -> None:
    device, dtype = _model_placement(unet)
    args, kwargs = batch.unet_inputs(device=device, dtype=dtype)
    unet(*args, **kwargs)


def _repeated_call(name: str) -> RecalibrationError:
    return RecalibrationError(
        f"layer {name!r} ran more than once in one forward pass; its statistics are ambiguous and it would be "
        "corrected twice: leave it out of the layers / targets"
    )


def _forward_once_each(
    unet: nn.Module,
    batch: CalibrationBatch,
    modules: Mapping[str, nn.Module],
    on_output: Callable[..., Any],
    *,
    context: Callable[[], Any],
    with_kwargs: bool = False,
) -> None:
    """One forward of ``batch`` under ``context()`` with ``on_output(name, module, args[, kwargs],
    output)`` as a forward hook on each of ``modules`` (its return value replaces the output).
    Hooks are removed even if the forward raises. Raises :class:`RecalibrationError` when a module
    runs twice in the forward or never."""
    seen: set[str] = set()

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, *rest: Any) -> Any:
            if name in seen:
                raise _repeated_call(name)
            seen.add(name)
            return on_output(name, module, args, *rest)

        return hook

    handles = [m.register_forward_hook(make_hook(name), with_kwargs=with_kwargs) for name, m in modules.items()]
    try:
        with context():
            _forward(unet, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in seen]
    if missing:
        raise RecalibrationError(f"the forward pass never ran layer(s) {missing}")


def collect_norm_statistics(
    *, unet: nn.Module, batch: CalibrationBatch, layers: Sequence[str] | None = None
) -> dict[str, NormStats]:
    """Per-channel output statistics of the affine norm layers ``layers`` (default: all of
    :func:`norm_layers`) on ``batch``, from one forward pass under ``torch.inference_mode``.

    Returns ``{name: NormStats}`` in ``layers`` order, float32 on the model's device. Forward hooks
    are removed even if the forward raises. Raises :class:`RecalibrationError` when a name is not an
    affine GroupNorm/LayerNorm of ``unet``, a layer is not reached by the forward, or a layer runs
    more than once in it.
    """
    modules = _resolve_layers(unet, layers)
    measured: dict[str, NormStats] = {}

    def measure(name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        measured[name] = _channel_stats(module, output)

    _forward_once_each(unet, batch, modules, measure, context=torch.inference_mode)
    return {name: measured[name] for name in modules}


def interpolate_statistics(
    *, parents: Sequence[Mapping[str, NormStats]], weights: Mapping[str, Sequence[float]]
) -> dict[str, NormStats]:
    """The targets ``mu_t = sum_i w_i mu_i``, ``sigma_t = sum_i w_i sigma_i`` of every layer.

    ``parents[i]`` are parent ``i``'s statistics (:func:`collect_norm_statistics` on the same batch,
    parent 0 first as in the merge); ``weights[name]`` are the merge's interpolation weights for the
    block that owns layer ``name``, one per parent (``(1 - alpha, alpha)`` for ``weighted_sum``).
    Every parent must have exactly the layers of ``weights``, with equal shapes. Weights need not
    sum to 1 but must give non-negative stds. Result: float32 on parent 0's device, ``weights`` order.
    """
    if not parents:
        raise RecalibrationError("interpolate_statistics needs at least one parent")
    n = len(parents)
    for i, stats in enumerate(parents):
        missing = [name for name in weights if name not in stats]
        if missing:
            raise RecalibrationError(f"parent {i} has no statistics for layer(s) {missing}")
        unweighted = [name for name in stats if name not in weights]
        if unweighted:
            raise RecalibrationError(f"no interpolation weights for layer(s) {unweighted} (parent {i} has statistics for them)")
    out: dict[str, NormStats] = {}
    for name, w in weights.items():
        w = [float(x) for x in w]
        if len(w) != n:
            raise RecalibrationError(f"layer {name!r}: {len(w)} weight(s) for {n} parents")
        if not all(math.isfinite(x) for x in w):
            raise RecalibrationError(f"layer {name!r}: weights must be finite, got {w}")
        first = parents[0][name]
        mean = torch.zeros_like(first.mean, dtype=torch.float32)
        std = torch.zeros_like(first.std, dtype=torch.float32)
        for i, (stats, wi) in enumerate(zip(parents, w)):
            s = stats[name]
            if s.mean.shape != first.mean.shape or s.std.shape != first.std.shape:
                raise RecalibrationError(
                    f"layer {name!r}: parent {i} has statistics of shape {tuple(s.mean.shape)}, parent 0 {tuple(first.mean.shape)}"
                )
            mean.add_(s.mean.to(mean.device, torch.float32), alpha=wi)
            std.add_(s.std.to(std.device, torch.float32), alpha=wi)
        if (std < 0).any():
            raise RecalibrationError(f"layer {name!r}: weights {w} give a negative target std (extrapolation)")
        out[name] = NormStats(mean=mean, std=std)
    return out


# ---------------------------------------------------------------- recalibration


@dataclass(frozen=True)
class RecalibrationStats:
    """What one :func:`recalibrate_norms` did. ``s`` is a channel's total scale over all passes."""

    seconds: float  # wall time, including a device synchronize on CUDA
    layers: int  # layers corrected
    mean_abs_log_scale: float  # mean over every channel of every layer of |log s|
    max_abs_log_scale: float
    passes: int = 1
    guarded_channels: int = 0  # channels with sigma_M <= eps in the last pass: shifted only, scale 1


def recalibrate_norms(
    *,
    unet: nn.Module,
    batch: CalibrationBatch,
    targets: Mapping[str, NormStats],
    layers: Sequence[str] | None = None,
    eps: float = 1e-6,
    passes: int = 1,
) -> RecalibrationStats:
    """Rewrite the affine parameters of ``layers`` (default: every layer of :func:`norm_layers`) so
    that their output statistics on ``batch`` equal ``targets`` (see the module docstring).

    One pass = one forward of ``batch`` under ``torch.no_grad``, with a forward hook on every layer:
    in execution order each hook measures the layer's output (upstream corrections included), sets
    ``gamma *= s`` and ``beta = (beta - mu_M) * s + mu_t`` in place (fp32 arithmetic, one rounding to
    the parameter's dtype; same Parameter objects, same storage) and returns the layer's output
    recomputed with the new parameters. One pass is exact up to rounding; each further pass of
    ``passes`` re-measures and corrects what rounding left (fp16), and is otherwise a no-op.
    ``eps``: channels with ``sigma_M <= eps`` keep their scale and are only shifted.

    Raises :class:`RecalibrationError`, before any change, when a layer is not an affine
    GroupNorm/LayerNorm of ``unet``, has no target, or a target that is not finite, has a negative
    std or a shape other than its gamma's, or a target names no such layer; and, with every parameter restored, when a layer is not reached
    by the forward or runs more than once in it (a module shared under two names must be named
    once). Keys of ``targets`` outside ``layers`` but naming affine norm layers are ignored.
    """
    if passes < 1:
        raise RecalibrationError(f"passes must be at least 1, got {passes}")
    if not eps >= 0:
        raise RecalibrationError(f"eps must be non-negative, got {eps}")
    modules = _resolve_layers(unet, layers)
    known = norm_layers(unet)
    strangers = [name for name in targets if name not in modules and name not in known]
    if strangers:
        _resolve_layers(unet, strangers)  # raises why a name is no affine norm layer (a shared module's alias is not)
    missing = [name for name in modules if name not in targets]
    if missing:
        raise RecalibrationError(f"targets have no statistics for layer(s) {missing}")
    prepared: dict[str, NormStats] = {}
    for name, module in modules.items():
        target = targets[name]
        shape = module.weight.shape
        if target.mean.shape != shape or target.std.shape != shape:
            raise RecalibrationError(
                f"layer {name!r}: target statistics of shape {tuple(target.mean.shape)} / {tuple(target.std.shape)}, "
                f"the layer has {tuple(shape)} channels"
            )
        if not (torch.isfinite(target.mean).all() and torch.isfinite(target.std).all() and (target.std >= 0).all()):
            raise RecalibrationError(f"layer {name!r}: target statistics must be finite, with non-negative stds")
        device = module.weight.device
        prepared[name] = NormStats(mean=target.mean.to(device, torch.float32), std=target.std.to(device, torch.float32))

    saved = {name: (m.weight.detach().clone(), m.bias.detach().clone()) for name, m in modules.items()}
    log_scale = {name: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for name, m in modules.items()}
    started = time.perf_counter()
    guarded = 0
    try:
        for _ in range(passes):
            guarded = _recalibration_pass(unet, batch, modules, prepared, log_scale, eps)
    except BaseException:
        with torch.no_grad():
            for name, m in modules.items():
                m.weight.copy_(saved[name][0])
                m.bias.copy_(saved[name][1])
        raise
    device, _ = _model_placement(unet)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    flat = torch.cat([v.abs().flatten().cpu() for v in log_scale.values()]) if log_scale else torch.zeros(1)
    return RecalibrationStats(
        seconds=seconds,
        layers=len(modules),
        mean_abs_log_scale=float(flat.mean()) if flat.numel() else 0.0,
        max_abs_log_scale=float(flat.max()) if flat.numel() else 0.0,
        passes=passes,
        guarded_channels=guarded,
    )


def _recalibration_pass(
    unet: nn.Module,
    batch: CalibrationBatch,
    modules: Mapping[str, nn.Module],
    targets: Mapping[str, NormStats],
    log_scale: Mapping[str, Tensor],
    eps: float,
) -> int:
    """One forward with correcting hooks; accumulates ``log s`` per channel; returns guarded channels."""
    guarded: list[Tensor] = []  # per-layer counts, summed once at the end (no device sync per layer)

    def correct(name: str, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        measured = _channel_stats(module, output)
        target = targets[name]
        ok = measured.std > eps
        scale = torch.where(ok, target.std / measured.std.clamp_min(max(eps, torch.finfo(torch.float32).tiny)), 1.0)
        guarded.append((~ok).sum())
        weight, bias = module.weight, module.bias
        new_weight = weight.detach().float() * scale
        new_bias = (bias.detach().float() - measured.mean) * scale + target.mean
        weight.copy_(new_weight)  # in place: same Parameter, same storage, dtype kept
        bias.copy_(new_bias)
        log_scale[name].add_(torch.log(scale))
        return module.forward(*args, **kwargs)  # .forward: no hooks, so no recursion

    _forward_once_each(unet, batch, modules, correct, context=torch.no_grad, with_kwargs=True)
    return int(torch.stack(guarded).sum()) if guarded else 0


__all__ = [
    "NORM_TYPES",
    "CalibrationBatch",
    "NormStats",
    "RecalibrationError",
    "RecalibrationStats",
    "collect_norm_statistics",
    "interpolate_statistics",
    "make_calibration_batch",
    "norm_layers",
    "recalibrate_norms",
]
