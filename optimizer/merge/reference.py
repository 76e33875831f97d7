"""A plain per-key reference merge, for tests: no flat buffers, no segments.

For each key of parent 0: passthrough keys (see :func:`~optimizer.merge.flat.is_mergeable`) and,
unless ``recipe.merge_vae``, component keys are cloned from parent 0; every other key is merged by
calling the method on that key's tensors with its block's parameters (components: the BASE
block's), seeding stochastic methods with ``tensor_seed(recipe.seed, key)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from optimizer.architectures.layout import BlockLayout
from optimizer.merge.flat import is_mergeable
from optimizer.merge.methods import tensor_seed
from optimizer.merge.recipe import VAE_PARAMS_BLOCK, MergeRecipe


def merge_state_dicts_reference(
    *,
    state_dicts: Sequence[Mapping[str, Tensor]],
    layout: BlockLayout,
    recipe: MergeRecipe,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Merge key by key. Mergeable tensors are computed in ``dtype`` (default: the promoted dtype
    of that key's parents); the result has parent 0's keys, in its order."""
    n = len(state_dicts)
    recipe.validate_for(layout, n)
    method = recipe.merge_method
    names = method.param_names(n)
    first = state_dicts[0]
    result: dict[str, Tensor] = {}
    with torch.inference_mode():
        for key, tensor in first.items():
            owner = layout.owner_of(key)
            is_component = owner in layout.components
            if not is_mergeable(key, tensor) or (is_component and not recipe.merge_vae):
                result[key] = tensor.clone()
                continue
            block = VAE_PARAMS_BLOCK if is_component else owner
            params = {p: float(recipe.params[p][block]) for p in names}
            parents = [sd[key] for sd in state_dicts]
            key_dtype = dtype
            if key_dtype is None:
                key_dtype = parents[0].dtype
                for p in parents[1:]:
                    key_dtype = torch.promote_types(key_dtype, p.dtype)
            parents = [p.to(key_dtype).contiguous() for p in parents]
            out = torch.empty_like(parents[0])
            generator = None
            if method.stochastic:
                generator = torch.Generator(device=out.device).manual_seed(tensor_seed(recipe.seed, key))
            method.fn(parents, out=out, generator=generator, **params)
            result[key] = out
    return result
