"""Rendering: prompt sets, schedulers, batched deterministic image generation, decoders, grids."""
