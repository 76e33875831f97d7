"""Sampler names users know, mapped to diffusers schedulers.

The names follow the A1111 sampler list (``euler_a`` is "Euler a", ``dpmpp_2m_karras`` is
"DPM++ 2M Karras", ...). A scheduler is always built with :meth:`from_config` of the pipeline's own
scheduler config, so the noise schedule (betas, prediction type, timestep spacing) stays the
checkpoint's and only the sampling algorithm changes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SCHEDULERS", "make_scheduler"]

#: name -> (diffusers class name, keyword overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}


def make_scheduler(name: str, *, base_config: Any):
    """A fresh scheduler ``name`` over ``base_config`` (a pipeline's ``scheduler.config``).

    Raises ``ValueError`` listing the known names for an unknown one.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)
