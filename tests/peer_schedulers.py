"""diffusers' schedulers as the independent peers of our samplers, for the tests that run them side by side.

diffusers' DPM2 and DPM2 a walk k-diffusion's levels as they are; A1111 and ComfyUI (and ldm/k_samplers.py) walk
those of one step more without the last above 0. `OnA1111Levels` hands diffusers' own DPM2 step those levels,
computed here from the model's σ as diffusers computes its own, so the step and the levels are both checked
against code that is not ours.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# A sampler → diffusers' scheduler of it and that scheduler's settings, with whether it starts from noise·σ_max
# (k-diffusion's samplers; DDIM and PLMS start from the noise itself).
PEERS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}, False),  # how diffusers reproduces the original's PLMS
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, True),
    "euler_a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}, True),
    "heun": ("HeunDiscreteScheduler", {"timestep_spacing": "linspace"}, True),
    "dpm2": ("KDPM2DiscreteScheduler", {"timestep_spacing": "linspace"}, True),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {"timestep_spacing": "linspace"}, True),
}
# The samplers that walk A1111's levels: one step more, without the last above 0.
ON_A1111_LEVELS = ("dpm2", "dpm2_a")


def peer_scheduler(sampler: str, config: Any) -> Any:
    """diffusers' scheduler for our `sampler` (a `_karras` name: its base sampler on Karras' levels), made from a
    pipeline's scheduler `config`, the model's β."""
    import diffusers

    base = sampler.removesuffix("_karras")
    kind, settings, _ = PEERS[base]
    scheduler = getattr(diffusers, kind)
    karras = base != sampler
    if base in ON_A1111_LEVELS:
        return _on_a1111_levels(scheduler, karras).from_config(config, **settings, use_exponential_sigmas=True)
    return scheduler.from_config(config, **settings, **({"use_karras_sigmas": True} if karras else {}))


def starts_from_sigma_max(sampler: str) -> bool:
    return PEERS[sampler.removesuffix("_karras")][2]


def _on_a1111_levels(kind: type, karras: bool) -> type:
    """`kind` on A1111's levels for its DPM2 samplers: the model's σ at the timesteps of S + 1 steps (or Karras'
    S + 1 levels), without the last; diffusers appends the 0. They go in through the hook for exponential levels,
    the one after which diffusers leaves the timesteps fractional, as k-diffusion's are (its Karras levels it rounds
    to whole timesteps)."""

    class OnA1111Levels(kind):  # type: ignore[misc, valid-type]
        def _convert_to_exponential(self, in_sigmas: Any, num_inference_steps: int) -> np.ndarray:
            steps = num_inference_steps + 1
            alphas = self.alphas_cumprod.double().numpy()
            model = ((1 - alphas) / alphas) ** 0.5
            timesteps = np.linspace(0, len(model) - 1, steps)[::-1]
            levels = np.interp(timesteps, np.arange(len(model)), model)
            if karras:
                levels = self._convert_to_karras(in_sigmas=levels, num_inference_steps=steps)
            return levels[:-1]

    return OnA1111Levels
