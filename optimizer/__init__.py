"""evomerge: per-block merge-ratio optimization for Stable Diffusion checkpoints."""

__version__ = "0.1.0"
