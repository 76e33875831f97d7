"""Tiny models of every architecture, with diffusers' and transformers' own classes (real block
counts, tiny widths), as canonical single-file state dicts. A new architecture record needs an
entry here: the contract tests iterate the shipped records and fail naming one without it."""

from __future__ import annotations

import torch

#: architecture record -> (builder module, variant or architecture name passed to it)
TINY = {"sd1": ("sd", "sd1"), "sd2": ("sd", "sd2"), "sdxl": ("sd", "sdxl"), "sd3": ("dit", "sd3.5"), "sd35_large": ("dit", "sd35_large"),
        "flux": ("dit", "flux-dev")}


def tiny_state_dict(architecture: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The canonical state dict of a tiny ``architecture`` model built from ``seed``."""
    if architecture not in TINY:
        raise KeyError(f"no tiny model for architecture {architecture!r}: add one to tests/tiny_archs.py")
    kind, name = TINY[architecture]
    if kind == "sd":
        from optimizer.testing import tiny_models

        build = {"sd1": tiny_models.tiny_sd1_components, "sd2": tiny_models.tiny_sd2_components, "sdxl": tiny_models.tiny_sdxl_components}[name]
        return tiny_models.tiny_ldm_state_dict(build(seed), name)
    from optimizer.testing.tiny_dit import tiny_dit_canonical_state_dict, tiny_dit_components

    return tiny_dit_canonical_state_dict(tiny_dit_components(name, seed), name)
