"""PLMS sampling (Liu et al. 2022, "pseudo linear multi-step"), as the original CompVis `PLMSSampler` runs it.

Why: PLMS is the default sampler of the original txt2img script and of optimizedSD, so the images its users know
came from it. It walks the same S timesteps as DDIM (ldm/ddim.py) and takes the same deterministic (η = 0) DDIM
update, but with ε replaced by a multi-step extrapolation of the ε predicted at the last steps (Adams–Bashforth of
orders 2 to 4), which needs fewer steps for the same quality. The first step has no history: it takes a
pseudo-improved-Euler step, averaging ε at x_t and at the DDIM estimate of the next x, so S steps cost S + 1 model
evaluations.

The original has no noise (η must be 0) and no img2img; neither has this.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.ddim import DDIMStep, EpsFn, StepCallback, ddim_step

# Adams–Bashforth weights of the current ε and the ones before it (newest first) over a common denominator, by how
# many earlier ε there are; integers, so the sums round as the original's `(55 * e_t - 59 * old_eps[-1] ...) / 24`.
MULTISTEP_WEIGHTS = {1: ((3, -1), 2), 2: ((23, -16, 5), 12), 3: ((55, -59, 37, -9), 24)}


def sample(
    eps_fn: EpsFn, x: torch.Tensor, steps: Sequence[DDIMStep], callback: StepCallback | None = None
) -> torch.Tensor:
    """Denoise `x` through `steps` (largest t first), calling `callback` after each of the S steps."""
    deterministic = torch.zeros((), dtype=x.dtype, device=x.device)
    history: list[torch.Tensor] = []  # ε at x_t of the steps taken so far, newest last, at most three
    for index, step in enumerate(steps):
        eps = eps_fn(x, step.t)
        if history:
            weights, denominator = MULTISTEP_WEIGHTS[len(history)]
            combined = weights[0] * eps
            for weight, earlier in zip(weights[1:], reversed(history), strict=True):
                combined = combined + weight * earlier
            combined = combined / denominator
        else:
            # The original evaluates the next timestep (this one again at the last step) at the DDIM estimate.
            following = steps[min(index + 1, len(steps) - 1)]
            estimate = ddim_step(x, eps, step, deterministic, None)
            combined = (eps + eps_fn(estimate, following.t)) / 2
        x = ddim_step(x, combined, step, deterministic, None)
        history = [*history[-2:], eps]
        if callback is not None:
            callback(index + 1, len(steps), x)
    return x
