"""The learning-rate schedule every zoo trainer uses: linear warm-up, then cosine decay."""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, steps: int, warmup: int, floor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Factor ``(s + 1) / warmup`` for the first ``warmup`` steps, then
    ``floor + (1 - floor) * (1 + cos(pi * progress)) / 2`` with ``progress`` going 0 -> 1 over the rest."""
    warmup = max(1, warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
