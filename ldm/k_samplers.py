"""The σ-space samplers of k-diffusion (Karras et al. 2022) on an ε-prediction model, as optimizedSD and other SD
tools run them: Euler, Euler ancestral, Heun, DPM2, DPM2 ancestral and LMS.

Why: these are the samplers optimizedSD's `--sampler` offers beside DDIM and PLMS, and the ones users of other SD
tools pick by name. They see the model as a denoiser of x = x₀ + σ·ε (the variance-exploding view of the same
diffusion: σ_t = √((1 − ᾱ_t)/ᾱ_t), and x = x_t/√ᾱ_t), and integrate dx/dσ = ε from σ_max down to 0.

As k-diffusion's `CompVisDenoiser` (not quantized) wraps a CompVis model:
- The S noise levels are σ at t = linspace(T − 1, 0, S), read between the integer timesteps by interpolating log σ
  linearly, then 0 (so, unlike DDIM's, the schedule starts at the last timestep, T − 1).
- The model sees x·c_in with c_in = 1/√(σ² + 1) (that is x_t) at the timestep whose σ it is, fractional in
  general (the same interpolation, inverted), and its ε is the derivative dx/dσ.
- The starting latent is the image's noise times σ_0. The ancestral samplers (η = 1) add noise at every step but
  the last, drawn from each image's own generator (GENERATION.md's order: after the starting noise, in step order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from numpy.polynomial import Polynomial

from ldm.ddim import EpsFn, StepCallback
from ldm.noise import per_image_noise

# LMS combines the derivatives of this many steps (fewer at the start).
LMS_ORDER = 4


class SigmaSchedule:
    """σ of every training timestep of a model, and the map between σ and (fractional) timesteps."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        alphas = alphas_cumprod.double()
        self.log_sigmas = (((1.0 - alphas) / alphas) ** 0.5).log()

    def sigma(self, t: float) -> float:
        """σ at timestep t ∈ [0, T − 1]: log σ linear between the neighbouring integers."""
        low = min(math.floor(t), len(self.log_sigmas) - 2)
        w = t - low
        return math.exp((1.0 - w) * float(self.log_sigmas[low]) + w * float(self.log_sigmas[low + 1]))

    def timestep(self, sigma: float) -> float:
        """The fractional timestep whose σ is `sigma`: `sigma`'s inverse, clamped to [0, T − 1]."""
        log_sigma = math.log(sigma)
        # The last integer timestep at or below log σ (log σ grows with t), kept one short of the end.
        low = int(torch.searchsorted(self.log_sigmas, torch.tensor(log_sigma, dtype=torch.float64), right=True)) - 1
        low = min(max(low, 0), len(self.log_sigmas) - 2)
        below, above = float(self.log_sigmas[low]), float(self.log_sigmas[low + 1])
        w = min(max((log_sigma - below) / (above - below), 0.0), 1.0)
        return low + w

    def sigmas(self, steps: int) -> list[float]:
        """The S noise levels of an S-step run, largest first, then 0."""
        last = len(self.log_sigmas) - 1
        return [self.sigma(float(t)) for t in np.linspace(last, 0, steps)] + [0.0]


# derivative(x, σ) → dx/dσ, which for an ε-prediction model is its ε at (x·c_in, t(σ)).
Derivative = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass
class _Run:
    """What a step needs besides x: the derivative, the noise levels, each image's generator, LMS's history."""

    derivative: Derivative
    sigmas: list[float]
    generators: Sequence[torch.Generator]
    history: list[torch.Tensor] = field(default_factory=list)  # LMS: earlier derivatives, newest last

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return per_image_noise(x, self.generators, [True] * len(self.generators))


def ancestral_step(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step at η = 1: down to σ_down deterministically, then σ_up of fresh noise, so
    the step ends at σ_to with the variance the forward process has there."""
    sigma_up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def geometric_mean(a: float, b: float) -> float:
    """DPM2's midpoint: halfway from a to b in log σ."""
    return math.exp((math.log(a) + math.log(b)) / 2)


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """Weights of the derivatives at σ_i, σ_{i−1}, …, σ_{i−order+1} (newest first) in the linear multistep step
    from σ_i to σ_{i+1}: the integrals over that step of the Lagrange basis polynomials through those nodes, taken
    exactly (k-diffusion integrates them numerically). In σ − σ_i, so the integral is the antiderivative at the
    step's length, with nothing to cancel on the short last steps."""
    nodes = [sigmas[i - k] - sigmas[i] for k in range(order)]
    length = sigmas[i + 1] - sigmas[i]
    weights = []
    for j, node in enumerate(nodes):
        basis = Polynomial([1.0])  # 1 at this node, 0 at the others
        for other in nodes[:j] + nodes[j + 1 :]:
            basis = basis * Polynomial([-other, 1.0]) / (node - other)
        weights.append(float(basis.integ()(length)))  # integ()'s antiderivative is 0 at 0
    return weights


def _euler(run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
    """The derivative at the step's start, for the whole step."""
    sigma, following = run.sigmas[i], run.sigmas[i + 1]
    return x + run.derivative(x, sigma) * (following - sigma)


def _euler_ancestral(run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
    """Euler down to σ_down, then fresh noise up to σ_{i+1}."""
    sigma, following = run.sigmas[i], run.sigmas[i + 1]
    down, up = ancestral_step(sigma, following)
    x = x + run.derivative(x, sigma) * (down - sigma)
    return x + run.noise(x) * up if following > 0 else x


def _heun(run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
    """The trapezoid rule: the derivative averaged over both ends of the step (Euler alone on the step to 0)."""
    sigma, following = run.sigmas[i], run.sigmas[i + 1]
    d = run.derivative(x, sigma)
    if following == 0:
        return x + d * (following - sigma)
    d_end = run.derivative(x + d * (following - sigma), following)
    return x + (d + d_end) / 2 * (following - sigma)


def _dpm2_to(run: _Run, x: torch.Tensor, sigma: float, target: float) -> torch.Tensor:
    """A step from σ to `target` with the derivative taken at their log-midpoint (Euler alone when `target` is 0)."""
    d = run.derivative(x, sigma)
    if target == 0:
        return x + d * (target - sigma)
    middle = geometric_mean(sigma, target)
    return x + run.derivative(x + d * (middle - sigma), middle) * (target - sigma)


def _dpm2(run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
    """A midpoint step to σ_{i+1}."""
    return _dpm2_to(run, x, run.sigmas[i], run.sigmas[i + 1])


def _dpm2_ancestral(run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
    """A midpoint step down to σ_down, then fresh noise up to σ_{i+1}."""
    down, up = ancestral_step(run.sigmas[i], run.sigmas[i + 1])
    x = _dpm2_to(run, x, run.sigmas[i], down)
    return x + run.noise(x) * up if down > 0 else x


def _lms(run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
    """Linear multistep: this step's derivative and up to three before it, weighted to integrate their
    interpolating polynomial over the step (one model call per step, like Euler, at higher order)."""
    run.history = [*run.history[-(LMS_ORDER - 1) :], run.derivative(x, run.sigmas[i])]
    weights = lms_coefficients(run.sigmas, i, min(i + 1, LMS_ORDER))
    return x + sum(w * d for w, d in zip(weights, reversed(run.history), strict=True))


STEPS: dict[str, Callable[[_Run, torch.Tensor, int], torch.Tensor]] = {
    "euler": _euler,
    "euler_a": _euler_ancestral,
    "heun": _heun,
    "dpm2": _dpm2,
    "dpm2_a": _dpm2_ancestral,
    "lms": _lms,
}


def sample(
    name: str,
    eps_fn: EpsFn,
    noise: torch.Tensor,
    schedule: SigmaSchedule,
    steps: int,
    generators: Sequence[torch.Generator],
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run sampler `name` for `steps` steps from each image's starting `noise`; returns the clean latents.

    `callback` gets each step's x as the model sees it (x·c_in, which is x_t), so previews look as DDIM's do.
    """
    sigmas = schedule.sigmas(steps)

    def derivative(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return eps_fn(x / (sigma**2 + 1.0) ** 0.5, schedule.timestep(sigma))

    run = _Run(derivative, sigmas, generators)
    step = STEPS[name]
    x = noise * sigmas[0]
    for i in range(steps):
        x = step(run, x, i)
        if callback is not None:
            callback(i + 1, steps, x / (sigmas[i + 1] ** 2 + 1.0) ** 0.5)
    return x
