"""Hypernetworks in a diffusers UNet: an attention processor (diffusers' ``AttnProcessor2_0`` with the key and value
contexts from a :class:`HypernetworkStack`) installed and removed through ``set_attn_processor``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from optimizer.adapters.hypernetwork.stack import HypernetworkStack
from optimizer.adapters.hypernetwork.structure import _listing

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention



class HypernetworkAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with the key and value computed from ``stack``'s contexts.

    Same steps as ``AttnProcessor2_0`` (spatial norm, 4-D input flattening, attention mask,
    group norm, ``norm_cross``, ``norm_q`` / ``norm_k``, ``scaled_dot_product_attention``, output
    projection and dropout, residual connection, ``rescale_output_factor``), except
    ``key = to_k(stack.apply_k(context))`` and ``value = to_v(stack.apply_v(context))``, with
    ``context`` the (normalised) encoder hidden states, or the hidden states for self-attention.
    With no hypernetwork matching the width (or all strengths 0) the result is bit-identical to
    ``AttnProcessor2_0``. A plain object, not a module: the stack is not registered in the UNet.
    Extra positional / keyword arguments (diffusers' deprecated ``scale``) are ignored.
    """

    def __init__(self, stack: HypernetworkStack) -> None:
        if not isinstance(stack, HypernetworkStack):
            raise TypeError(f"stack must be a HypernetworkStack, not {type(stack).__name__}")
        self.stack = stack

    # Copied from diffusers.models.attention_processor.AttnProcessor2_0.__call__ (diffusers 0.42), with
    # key = attn.to_k(context_k) and value = attn.to_v(context_v), the contexts from self.stack
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,  # noqa: ARG002
        **kwargs: Any,  # noqa: ARG002
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention expects (batch, heads, source_length, target_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        context_k, context_v = self.stack(encoder_hidden_states)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _processors(unet: nn.Module) -> dict[str, Any]:
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise TypeError(f"{type(unet).__name__} is not a diffusers model with attention processors")
    return dict(unet.attn_processors)


def install_hypernetworks(unet: nn.Module, stack: HypernetworkStack) -> int:
    """Make every attention layer of ``unet`` apply ``stack``; returns the number of layers.

    Uses ``unet.set_attn_processor`` with one shared :class:`HypernetworkAttnProcessor`. Each
    layer must currently use diffusers' ``AttnProcessor2_0`` (the default) or a
    :class:`HypernetworkAttnProcessor` (reinstalling replaces the stack); any other processor
    (xformers, fused QKV, IP-Adapter, ...) raises :class:`ValueError` rather than being dropped.
    Later strength changes on ``stack`` need no reinstall.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    current = _processors(unet)
    if not current:
        raise ValueError(f"{type(unet).__name__} has no attention layers to apply hypernetworks to")
    foreign = [
        f"{name} ({type(p).__name__})"
        for name, p in current.items()
        if type(p) is not AttnProcessor2_0 and not isinstance(p, HypernetworkAttnProcessor)
    ]
    if foreign:
        raise ValueError(
            f"cannot install hypernetworks: {len(foreign)} attention layer(s) use a processor other than "
            f"diffusers' AttnProcessor2_0, which installing would drop: {_listing(foreign)}"
        )
    processor = HypernetworkAttnProcessor(stack)
    unet.set_attn_processor(dict.fromkeys(current, processor))
    return len(current)


def remove_hypernetworks(unet: nn.Module) -> int:
    """Put ``AttnProcessor2_0`` back on every layer that has a :class:`HypernetworkAttnProcessor`;
    returns how many layers changed (other processors are left alone)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    current = _processors(unet)
    ours = [name for name, p in current.items() if isinstance(p, HypernetworkAttnProcessor)]
    if ours:
        unet.set_attn_processor(
            {name: AttnProcessor2_0() if isinstance(p, HypernetworkAttnProcessor) else p for name, p in current.items()}
        )
    return len(ours)
