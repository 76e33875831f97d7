"""Output ensembles of Stable Diffusion models: a weighted sum of the parents' noise predictions.

The baseline the merge optimizer is compared against. Where a merge mixes the parents' *weights*
once, an output ensemble runs every parent at every sampler step and mixes their *outputs*::

    eps(x_t, t, c) = sum_i w_i * eps_i(x_t, t, c_i)

(``eps_i`` is member ``i``'s UNet prediction, whatever its ``prediction_type``; the members of one
ensemble must agree on it). An ensemble of N members costs N UNet calls per sampler step instead of
one: :attr:`EnsembleUNet.calls` counts them so the compute per image can be reported.

* :class:`EnsembleUNet` is a drop-in ``unet`` for a diffusers ``StableDiffusionPipeline``; its
  weights are a plain tuple of floats, changed per trial with :meth:`EnsembleUNet.set_weights`
  (no module is rebuilt). The weights need not sum to 1 and may be negative; a member whose weight
  is exactly 0 is not called at all.
* :class:`EnsembleTextEncoder` runs members with *different* text encoders on the same token ids
  and concatenates their last hidden states along the feature axis (``c = [c_0 | c_1 | ...]``);
  :class:`EnsembleUNet` with ``split_encoder_hidden_states=True`` hands each member its own slice
  ``c_i`` (of width its ``cross_attention_dim``). Members that share one text encoder (the same
  module or equal tensors) use it directly: ``c_i = c``.
* :func:`ensemble_pipeline` builds the pipeline: ``type(pipes[0])``, sharing every component of
  ``pipes[0]`` (tokenizer, scheduler, VAE, safety checker) except the ensembled ``unet`` (and
  ``text_encoder`` where the members' differ), via
  :func:`~optimizer.render.pipelines.replace_components` (nothing copied, nothing cast).

Stable Diffusion 1.x / 2.x pipelines only; SDXL (two text encoders, pooled embeddings and
``text_time`` conditioning) is rejected with :class:`EnsembleError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from optimizer.errors import EvomergeError
from optimizer.render.pipelines import replace_components

__all__ = [
    "SCHEDULE_FIELDS",
    "UNET_FIELDS",
    "VAE_FIELDS",
    "EnsembleError",
    "EnsembleTextEncoder",
    "EnsembleUNet",
    "ensemble_pipeline",
]

#: UNet config fields every member must agree on (the pipeline reads them from member 0's config).
#: ``cross_attention_dim`` may differ when each member gets its own slice of the text embedding.
UNET_FIELDS = (
    "in_channels",
    "out_channels",
    "sample_size",
    "cross_attention_dim",
    "time_cond_proj_dim",
    "addition_embed_type",
    "class_embed_type",
)
#: VAE config fields that define the latent space; every member's must agree (member 0's VAE decodes).
VAE_FIELDS = ("latent_channels", "scaling_factor", "shift_factor")
#: scheduler config fields that define what a UNet output means at a timestep; must agree where present.
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


class EnsembleError(EvomergeError, ValueError):
    """The models cannot be ensembled, or the ensemble was given invalid weights or inputs."""


def _validate_weights(weights: Sequence[float], *, count: int) -> tuple[float, ...]:
    try:
        if isinstance(weights, (str, bytes)):
            raise TypeError
        weights = tuple(weights)  # any iterable: list, tuple, numpy array
    except TypeError:
        raise EnsembleError(f"weights must be a sequence of {count} numbers, got {weights!r}") from None
    if len(weights) != count:
        raise EnsembleError(f"expected {count} weights (one per member), got {len(weights)}: {tuple(weights)!r}")
    values = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, Real):
            raise EnsembleError(f"weights[{i}] must be a real number, got {w!r}")
        value = float(w)
        if not math.isfinite(value):
            raise EnsembleError(f"weights[{i}] must be finite, got {value}")
        values.append(value)
    if all(v == 0.0 for v in values):
        raise EnsembleError(f"at least one weight must be non-zero, got {tuple(values)!r}")
    return tuple(values)


def _agree(values: Sequence[Any], *, what: str) -> None:
    """Raise naming ``what`` when ``values`` (one per member) are not all equal."""
    if any(v != values[0] for v in values[1:]):
        listed = ", ".join(f"member {i}: {v!r}" for i, v in enumerate(values))
        raise EnsembleError(f"ensemble members disagree on {what} ({listed})")


def _placement(members: Sequence[torch.nn.Module], *, kind: str) -> None:
    _agree([str(m.device) for m in members], what=f"{kind} device")
    _agree([m.dtype for m in members], what=f"{kind} dtype")


class _Members(torch.nn.Module):
    """An ensemble module whose ``dtype`` and ``device`` are its first member's (they all agree)."""

    members: torch.nn.ModuleList

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].dtype

    @property
    def device(self) -> torch.device:
        return self.members[0].device


class EnsembleUNet(_Members):
    """A weighted sum of N ``UNet2DConditionModel`` predictions: ``eps = sum_i w_i * eps_i``.

    Every member is called with the same ``sample``, ``timestep`` and keyword arguments; with
    ``split_encoder_hidden_states=False`` (members share a text encoder) with the same
    ``encoder_hidden_states`` too, and with ``True`` member ``i`` gets the feature slice
    ``encoder_hidden_states[..., o_i : o_i + d_i]`` where ``d_i`` is its ``cross_attention_dim`` and
    ``o_i = d_0 + ... + d_{i-1}`` (the layout :class:`EnsembleTextEncoder` produces).

    * The weights are a plain tuple of floats (:attr:`weights`, :meth:`set_weights`), read at every
      call, so changing them per trial is free. They need not sum to 1 and may be negative
      (extrapolation); at least one must be non-zero, all must be finite.
    * A member whose weight is exactly ``0.0`` is *skipped* (not called): the sum runs over the
      members with ``w_i != 0`` only, which saves its compute and means its output (even NaN/inf)
      cannot affect the result. ``set_weights((1, 0))`` therefore gives member 0's prediction
      bit for bit.
    * The sum is accumulated in float32 (float64 for float64 members) and returned in the
      members' dtype.
    * :attr:`calls` counts member forward calls (one per member with a non-zero weight per
      :meth:`forward`; a classifier-free-guidance step is one batched call). Reset it by
      assigning 0.

    For a diffusers pipeline it exposes what ``StableDiffusionPipeline`` reads: :attr:`config`
    (member 0's; the members are checked to agree on :data:`UNET_FIELDS`), :attr:`dtype` and
    :attr:`device` (member 0's; all members must agree at construction). ``pipe.to(...)`` moves
    every member (they are submodules). Adapters that reach into UNet internals (IP-Adapter,
    LoRA loading, attention processors) are not supported.
    """

    def __init__(
        self,
        *,
        members: Sequence[torch.nn.Module],
        weights: Sequence[float],
        split_encoder_hidden_states: bool = False,
    ) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__()
        members = list(members)
        if not members:
            raise EnsembleError("an ensemble needs at least one member UNet")
        for i, member in enumerate(members):
            if not isinstance(member, UNet2DConditionModel):
                raise EnsembleError(f"members[{i}] must be a diffusers UNet2DConditionModel, got {type(member).__name__}")
        fields = [f for f in UNET_FIELDS if not (split_encoder_hidden_states and f == "cross_attention_dim")]
        for field in fields:
            _agree([m.config.get(field) for m in members], what=f"UNet config field {field!r}")
        if split_encoder_hidden_states:
            for i, member in enumerate(members):
                dim = member.config.cross_attention_dim
                if isinstance(dim, bool) or not isinstance(dim, int):
                    raise EnsembleError(f"member {i}: cannot split encoder_hidden_states by cross_attention_dim {dim!r}")
        _placement(members, kind="UNet")
        self.members = torch.nn.ModuleList(members)
        self.split_encoder_hidden_states = bool(split_encoder_hidden_states)
        self._weights = _validate_weights(weights, count=len(members))
        self.calls = 0
        self.training = False  # only the flag: the shared members keep their own mode

    # ------------------------------------------------------------------ what a pipeline reads
    @property
    def config(self):
        """Member 0's config (a diffusers ``FrozenDict``); the members agree on :data:`UNET_FIELDS`."""
        return self.members[0].config

    # ------------------------------------------------------------------ weights
    @property
    def weights(self) -> tuple[float, ...]:
        """The members' weights ``w_i`` (a tuple of floats, one per member)."""
        return self._weights

    def set_weights(self, weights: Sequence[float]) -> None:
        """Replace the weights (one finite number per member, not all zero); nothing else changes."""
        self._weights = _validate_weights(weights, count=len(self.members))

    @property
    def widths(self) -> tuple[int, ...]:
        """Each member's ``cross_attention_dim`` (its slice width when splitting)."""
        return tuple(m.config.cross_attention_dim for m in self.members)

    def extra_repr(self) -> str:
        return f"weights={self._weights}, split_encoder_hidden_states={self.split_encoder_hidden_states}"

    # ------------------------------------------------------------------ forward
    def _conditions(self, encoder_hidden_states: Tensor) -> list[Tensor]:
        if not self.split_encoder_hidden_states:
            return [encoder_hidden_states] * len(self.members)
        widths = self.widths
        if encoder_hidden_states.shape[-1] != sum(widths):
            raise EnsembleError(
                f"encoder_hidden_states has {encoder_hidden_states.shape[-1]} features; the members' "
                f"cross_attention_dims {widths} need their concatenation ({sum(widths)} features)"
            )
        return [part.contiguous() for part in torch.split(encoder_hidden_states, widths, dim=-1)]

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        *,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        """``sum_i w_i * unet_i(sample, timestep, c_i, **kwargs)`` over the members with ``w_i != 0``.

        Returns a ``UNet2DConditionOutput`` (or a 1-tuple when ``return_dict=False``), like
        ``UNet2DConditionModel.forward``; ``kwargs`` (``timestep_cond``, ``cross_attention_kwargs``,
        ``added_cond_kwargs``, ...) are passed to every member unchanged.
        """
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        weights = self._weights
        conditions = self._conditions(encoder_hidden_states)
        total: Tensor | None = None
        out_dtype: torch.dtype | None = None
        for member, weight, condition in zip(self.members, weights, conditions):
            if weight == 0.0:
                continue
            eps = member(sample, timestep, condition, return_dict=False, **kwargs)[0]
            self.calls += 1
            if out_dtype is None:
                out_dtype = eps.dtype
            term = eps.to(torch.promote_types(eps.dtype, torch.float32)) * weight
            total = term if total is None else total + term
        assert total is not None and out_dtype is not None  # at least one weight is non-zero
        result = total.to(out_dtype)
        if not return_dict:
            return (result,)
        return UNet2DConditionOutput(sample=result)


class EnsembleTextEncoder(_Members):
    """N CLIP text encoders on the same token ids, last hidden states concatenated on the feature axis.

    ``forward(input_ids)[0] = [h_0 | h_1 | ... | h_{N-1}]`` of shape ``[batch, tokens, sum_i d_i]``
    where ``h_i = text_encoder_i(input_ids).last_hidden_state`` and ``d_i`` is member ``i``'s
    ``hidden_size`` (:attr:`widths`); ``pooler_output`` is concatenated the same way. Pair it with
    ``EnsembleUNet(split_encoder_hidden_states=True)``, which gives UNet ``i`` back its ``h_i``.
    Every member runs, whatever the UNet weights (a text encoder runs once per prompt, not per step);
    :attr:`calls` counts member calls.

    For ``StableDiffusionPipeline.encode_prompt``: :attr:`config` is a copy of member 0's config with
    ``hidden_size`` set to the concatenated width (the members must agree on
    ``use_attention_mask``), :attr:`dtype` / :attr:`device` are member 0's (all must agree).
    ``clip_skip`` (``output_hidden_states=True``) is not supported and raises :class:`EnsembleError`.
    Prompt embeddings passed to the pipeline directly must be concatenated the same way.
    """

    def __init__(self, *, members: Sequence[torch.nn.Module]) -> None:
        import copy

        super().__init__()
        members = list(members)
        if not members:
            raise EnsembleError("an ensemble text encoder needs at least one member")
        for i, member in enumerate(members):
            if not hasattr(member, "config") or not isinstance(getattr(member.config, "hidden_size", None), int):
                raise EnsembleError(f"members[{i}] ({type(member).__name__}) is not a CLIP text encoder with a hidden_size")
        _agree([bool(getattr(m.config, "use_attention_mask", False)) for m in members], what="text encoder use_attention_mask")
        _placement(members, kind="text encoder")
        self.members = torch.nn.ModuleList(members)
        self._config = copy.deepcopy(members[0].config)
        self._config.hidden_size = sum(self.widths)
        self.calls = 0
        self.training = False

    @property
    def config(self):
        """Member 0's config with ``hidden_size`` = the concatenated width."""
        return self._config

    @property
    def widths(self) -> tuple[int, ...]:
        """Each member's ``hidden_size`` (the width of its slice of the output)."""
        return tuple(int(m.config.hidden_size) for m in self.members)

    @property
    def text_model(self):
        raise EnsembleError("clip_skip is not supported by an ensemble of different text encoders")

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        """``[h_0 | ... | h_{N-1}]`` (``BaseModelOutputWithPooling``, or a tuple when ``return_dict=False``)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if output_hidden_states:
            raise EnsembleError(
                "clip_skip / output_hidden_states is not supported by an ensemble of different text encoders"
            )
        hidden, pooled = [], []
        for member in self.members:
            out = member(input_ids, attention_mask=attention_mask, **kwargs)
            self.calls += 1
            hidden.append(out[0])
            pooled.append(out[1])
        last = torch.cat(hidden, dim=-1)
        pooler = torch.cat(pooled, dim=-1)
        if not return_dict:
            return (last, pooler)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooler)


def _comparable_config(module: torch.nn.Module) -> dict[str, Any]:
    ignored = {"transformers_version", "architectures", "torch_dtype", "dtype", "name_or_path"}
    return {k: v for k, v in module.config.to_dict().items() if not k.startswith("_") and k not in ignored}


def _same_text_encoder(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether ``a`` and ``b`` are one module, or compute the same function (same class, config, tensors)."""
    if a is b:
        return True
    if type(a) is not type(b) or _comparable_config(a) != _comparable_config(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device and torch.equal(sa[k], sb[k])
        for k in sa
    )


def _check_pipes(pipes: Sequence[Any]) -> None:
    from diffusers import StableDiffusionPipeline

    for i, pipe in enumerate(pipes):
        if not isinstance(pipe, StableDiffusionPipeline):
            raise EnsembleError(
                f"pipes[{i}] is a {type(pipe).__name__}: only Stable Diffusion 1.x/2.x pipelines "
                "(StableDiffusionPipeline) can be ensembled; SDXL and other families are not supported"
            )
        for name in ("unet", "text_encoder", "tokenizer", "vae", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise EnsembleError(f"pipes[{i}] has no {name}")
    sizes = [len(p.tokenizer) for p in pipes]
    _agree(sizes, what="tokenizer vocabulary size")
    vocab = pipes[0].tokenizer.get_vocab()
    for i, pipe in enumerate(pipes[1:], start=1):
        if pipe.tokenizer is not pipes[0].tokenizer and pipe.tokenizer.get_vocab() != vocab:
            raise EnsembleError(f"member {i}'s tokenizer maps tokens to different ids than member 0's (same size {sizes[0]})")
    _agree([p.vae_scale_factor for p in pipes], what="VAE downsampling factor")
    for field in VAE_FIELDS:
        _agree([p.vae.config.get(field) for p in pipes], what=f"VAE config field {field!r}")
    for field in SCHEDULE_FIELDS:
        present = [p.scheduler.config[field] for p in pipes if field in p.scheduler.config]
        if len(present) == len(pipes):
            _agree(present, what=f"scheduler config field {field!r}")


def ensemble_pipeline(*, pipes: Sequence[Any], weights: Sequence[float]):
    """A pipeline of ``type(pipes[0])`` whose noise prediction is ``sum_i w_i * eps_i`` of the pipes' UNets.

    Everything but the ``unet`` (an :class:`EnsembleUNet`) and, where the members' text encoders
    differ, the ``text_encoder`` (an :class:`EnsembleTextEncoder`) is ``pipes[0]``'s own module:
    its tokenizer encodes every prompt, its scheduler samples, and **its VAE decodes** (the members
    must agree on the latent space, :data:`VAE_FIELDS` and the downsampling factor, but their VAE
    weights may differ). The pipes must be Stable Diffusion 1.x/2.x pipelines agreeing on the
    tokenizer (vocabulary size and ids), the noise schedule and prediction type
    (:data:`SCHEDULE_FIELDS`) and the UNet fields of :data:`UNET_FIELDS`; otherwise
    :class:`EnsembleError` names the disagreement. Nothing is copied or cast: the members' modules
    are shared with ``pipes``.

    Text encoders that are one module or have equal tensors are shared (the embedding is computed
    once and every UNet gets it); otherwise each member's UNet gets its own text encoder's embedding
    (``cross_attention_dim`` must equal that text encoder's ``hidden_size``). Change the weights
    per trial with ``pipe.unet.set_weights(...)``.
    """
    pipes = list(pipes)
    if not pipes:
        raise EnsembleError("ensemble_pipeline needs at least one pipeline")
    _validate_weights(weights, count=len(pipes))
    _check_pipes(pipes)
    encoders = [p.text_encoder for p in pipes]
    unets = [p.unet for p in pipes]
    if all(_same_text_encoder(encoders[0], e) for e in encoders[1:]):
        return replace_components(pipes[0], unet=EnsembleUNet(members=unets, weights=weights))
    for i, (encoder, unet) in enumerate(zip(encoders, unets)):
        hidden, cross = getattr(encoder.config, "hidden_size", None), unet.config.cross_attention_dim
        if hidden != cross:
            raise EnsembleError(f"member {i}: text encoder hidden_size {hidden} != UNet cross_attention_dim {cross}")
    return replace_components(
        pipes[0],
        unet=EnsembleUNet(members=unets, weights=weights, split_encoder_hidden_states=True),
        text_encoder=EnsembleTextEncoder(members=encoders),
    )
