"""The merge kernel: registered merge methods, per-block recipes, and an in-place flat-buffer merger.

Public API::

    get_method(name) -> MergeMethod; available_methods() -> list[str]; @merge_method(...)
    MergeRecipe.uniform(method=, layout=, **params); MergeRecipe.from_mbw(method=, layout=, mbw=, param=)
    ParentBank.build(state_dicts=, layout=, device=, dtype=) -> ParentBank
    Merger(bank).state_dict() / .merge(recipe, generator_seed=None) -> MergeStats
    merge_state_dicts_reference(state_dicts=, layout=, recipe=) -> dict (slow, for tests)
"""

from optimizer.merge import average_methods, task_methods  # noqa: E402,F401,I001  (register their methods)
from optimizer.merge.errors import MergeError, MergeMethodError, ParentMismatchError, RecipeError
from optimizer.merge.flat import NON_MERGEABLE_PATTERNS, ParentBank, Segment, Span, is_mergeable
from optimizer.merge.kernel import Merger, MergeStats
from optimizer.merge.methods import MergeMethod, ParamRange, available_methods, get_method, merge_method, tensor_seed
from optimizer.merge.recipe import VAE_PARAMS_BLOCK, MergeRecipe
from optimizer.merge.reference import merge_state_dicts_reference

__all__ = [
    "NON_MERGEABLE_PATTERNS", "VAE_PARAMS_BLOCK", "MergeError", "MergeMethod", "MergeMethodError", "MergeRecipe",
    "MergeStats", "Merger", "ParamRange", "ParentBank", "ParentMismatchError", "RecipeError", "Segment", "Span",
    "available_methods", "get_method", "is_mergeable", "merge_method", "merge_state_dicts_reference", "tensor_seed",
]
