"""The σ-space samplers of k-diffusion 0.1.1 (Karras et al. 2022) on an ε-prediction model, as other SD tools run
them: Euler, Euler ancestral, Heun, DPM2, DPM2 ancestral, LMS, DPM-Solver++(2M) and its SDE form, DPM-Solver++(2S)
ancestral, DPM-Solver++ SDE; each also on Karras' schedule.
(optimizedSD carries a copy of an older k-diffusion, whose DPM2 takes its midpoint in σ^(1/3) and ends with a
second-order step; the others are the same.)

Why: these are the samplers optimizedSD's `--sampler` offers beside DDIM and PLMS, and the ones users of other SD
tools pick by name (DPM++ 2M Karras among them). They see the model as a denoiser of x = x₀ + σ·ε (the
variance-exploding view of the same diffusion: σ_t = √((1 − ᾱ_t)/ᾱ_t), and x = x_t/√ᾱ_t), and integrate dx/dσ = ε
from σ_max down to 0.

As k-diffusion's `CompVisDenoiser` (not quantized) wraps a CompVis model:
- The S noise levels are σ at t = linspace(T − 1, 0, S), read between the integer timesteps by interpolating log σ
  linearly, then 0 (so, unlike DDIM's, the schedule starts at the last timestep, T − 1). The Karras schedule
  instead spaces σ^(1/7) evenly from the model's largest σ to its smallest, then 0. DPM2 and DPM2 a take those of
  S + 1 steps without the last above 0, as A1111 and ComfyUI do (`noise_levels`).
- The model sees x·c_in with c_in = 1/√(σ² + 1) (that is x_t) at the timestep whose σ it is, fractional in
  general (the same interpolation, inverted), and its ε is the derivative dx/dσ.
- The starting latent is the image's noise times σ_0; img2img's is z₀ + noise·σ at the first of the last m
  levels (what diffusers' img2img does too; other tools start one level higher). The ancestral samplers (η = 1)
  and the SDE ones add noise at every step but the last, drawn from each image's own generator
  (tests/fixtures/GENERATION.md's order: after the starting noise, in step order). k-diffusion's SDE samplers draw
  their noise from a Brownian tree instead, so that a seed's image changes little with the step count; Gaussian
  draws per step (two for DPM++ SDE, pieces of one Brownian path) keep every sampler's noise to one rule, with the
  law k-diffusion's has.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from numpy.polynomial import Polynomial

from ldm.ddim import EpsFn, StepCallback, StepHook
from ldm.noise import per_image_noise

# LMS combines the derivatives of this many steps (fewer at the start).
LMS_ORDER = 4
# ρ of the Karras schedule: the paper's, k-diffusion's and other SD tools'.
KARRAS_RHO = 7.0


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

    def karras_sigmas(self, steps: int) -> list[float]:
        """The S levels of Karras et al.'s schedule (their eq. 5): even in σ^(1/ρ) from the largest σ to the
        smallest, so more of the steps go to the low noise levels where the image's details form; then 0."""
        top, bottom = (math.exp(float(self.log_sigmas[i])) ** (1 / KARRAS_RHO) for i in (-1, 0))
        return [(top + ramp * (bottom - top)) ** KARRAS_RHO for ramp in np.linspace(0, 1, steps)] + [0.0]


# derivative(x, σ) → dx/dσ, which for an ε-prediction model is its ε at (x·c_in, t(σ)).
Derivative = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass
class _Run:
    """What a step needs besides x: the derivative, the noise levels, each image's generator, LMS's history."""

    derivative: Derivative
    sigmas: list[float]
    generators: Sequence[torch.Generator]
    # What the multistep samplers keep of earlier steps, newest last: LMS its derivatives, DPM++ 2M its denoised.
    history: list[torch.Tensor] = field(default_factory=list)

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


def _dpmpp_2m(run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): the exact solution of the ODE in log σ for a denoised image that is
    constant over the step (first order), or linear through this step's and the last one's (second order, from the
    second step on; the step to σ = 0 lands on the denoised image itself)."""
    sigma, following = run.sigmas[i], run.sigmas[i + 1]
    denoised = x - sigma * run.derivative(x, sigma)
    target = denoised
    if run.history and following > 0:
        # r: the last step's length over this one's, both in log σ.
        r = math.log(run.sigmas[i - 1] / sigma) / math.log(sigma / following)
        target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * run.history[-1]
    run.history = [denoised]
    ratio = following / sigma
    return ratio * x + (1 - ratio) * target


def _dpmpp_2m_sde(run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (η = 1, midpoint correction): DPM++ 2M's step solves the ODE; this one the reverse SDE,
    whose exact solution over a step of h in log σ moves twice as far toward the denoised image (e^(−2h) of x's
    own direction is kept where the ODE keeps e^(−h)) and then adds fresh noise of the variance that lands it at
    σ_{i+1}. From the second step on, the denoised image's change since the last step corrects it, as in 2M."""
    sigma, following = run.sigmas[i], run.sigmas[i + 1]
    denoised = x - sigma * run.derivative(x, sigma)
    if following == 0:
        return denoised
    h = math.log(sigma / following)
    toward = -math.expm1(-2 * h)  # 1 − e^(−2h): how far toward the denoised image
    x = (following / sigma) * math.exp(-h) * x + toward * denoised
    if run.history:
        r = math.log(run.sigmas[i - 1] / sigma) / h  # the last step's length over this one's, in log σ
        x = x + 0.5 * toward / r * (denoised - run.history[-1])
    run.history = [denoised]
    return x + run.noise(x) * following * math.sqrt(toward)


def _dpmpp_2s_ancestral(run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral (k-diffusion's `sample_dpmpp_2s_ancestral`, η = 1): a single-step second-order
    DPM-Solver++ step down to σ_down, then fresh noise up to σ_{i+1}, as Euler a and DPM2 a go. The step: the
    denoised image at σ_i carries x to the log-midpoint σ_s = √(σ_i σ_down) (the exact ODE solution for a constant
    denoised image: x·σ_s/σ_i + (1 − σ_s/σ_i)·denoised), and the denoised image at σ_s carries x from σ_i the whole
    way. Euler alone on the step to 0, where σ_down is 0."""
    sigma, following = run.sigmas[i], run.sigmas[i + 1]
    denoised = x - sigma * run.derivative(x, sigma)
    down, up = ancestral_step(sigma, following)
    if down == 0:
        return x + (x - denoised) / sigma * (down - sigma)
    middle = geometric_mean(sigma, down)
    x_middle = (middle / sigma) * x + (1 - middle / sigma) * denoised
    denoised_middle = x_middle - middle * run.derivative(x_middle, middle)
    x = (down / sigma) * x + (1 - down / sigma) * denoised_middle
    return x + run.noise(x) * up


def brownian_increments(
    upper: torch.Tensor, lower: torch.Tensor, sigma: float, middle: float, following: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Brownian path's increments from σ to `middle` and from σ to `following` (below it), each over the square
    root of its length (unit variance), from two standard normal draws: `upper`, the path's piece over [middle, σ],
    and `lower`, its independent piece over [following, middle]."""
    whole = (upper * math.sqrt(sigma - middle) + lower * math.sqrt(middle - following)) / math.sqrt(sigma - following)
    return upper, whole


def _dpmpp_sde(run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
    """DPM-Solver++ SDE (k-diffusion's `sample_dpmpp_sde`: η = 1, midpoint r = ½): an ancestral DPM-Solver++ step to
    the log-midpoint σ_s = √(σ_i σ_{i+1}) with the denoised image at σ_i, then one from σ_i to σ_{i+1} with the
    denoised image at that midpoint; Euler alone on the step to 0.

    Its two draws of noise are Brownian: k-diffusion's are the increments W(σ_s) − W(σ_i) and W(σ_{i+1}) − W(σ_i) of
    one Brownian path (a Brownian tree), each over the square root of its length, so the second holds the first.
    Here the path is drawn as its two independent pieces, a over [σ_s, σ_i] and b over [σ_{i+1}, σ_s], from the
    image's generator (a, then b): the same joint law, not k-diffusion's numbers (whose tree has its own seeding)."""
    sigma, following = run.sigmas[i], run.sigmas[i + 1]
    denoised = x - sigma * run.derivative(x, sigma)
    if following == 0:
        return x + (x - denoised) / sigma * (following - sigma)
    middle = geometric_mean(sigma, following)

    def ancestral(to: float, target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        down, up = ancestral_step(sigma, to)
        return (down / sigma) * x + (1 - down / sigma) * target + noise * up

    to_middle, whole = brownian_increments(run.noise(x), run.noise(x), sigma, middle, following)
    x_middle = ancestral(middle, denoised, to_middle)
    denoised_middle = x_middle - middle * run.derivative(x_middle, middle)
    return ancestral(following, denoised_middle, whole)


Step = Callable[[_Run, torch.Tensor, int], torch.Tensor]
# Each sampler's step, and whether its noise levels follow the Karras schedule rather than the model's timesteps.
STEPS: dict[str, tuple[Step, bool]] = {
    "euler": (_euler, False),
    "euler_a": (_euler_ancestral, False),
    "heun": (_heun, False),
    "dpm2": (_dpm2, False),
    "dpm2_a": (_dpm2_ancestral, False),
    "lms": (_lms, False),
    "dpmpp_2m": (_dpmpp_2m, False),
    "dpmpp_2m_sde": (_dpmpp_2m_sde, False),
    "dpmpp_2s_a": (_dpmpp_2s_ancestral, False),
    "dpmpp_sde": (_dpmpp_sde, False),
    "euler_karras": (_euler, True),
    "euler_a_karras": (_euler_ancestral, True),
    "heun_karras": (_heun, True),
    "lms_karras": (_lms, True),
    "dpm2_karras": (_dpm2, True),
    "dpm2_a_karras": (_dpm2_ancestral, True),
    "dpmpp_2m_karras": (_dpmpp_2m, True),
    "dpmpp_2m_sde_karras": (_dpmpp_2m_sde, True),
    "dpmpp_2s_a_karras": (_dpmpp_2s_ancestral, True),
    "dpmpp_sde_karras": (_dpmpp_sde, True),
}


def unet_calls_per_step(name: str) -> int:
    """2 for the samplers that call the UNet twice a step (all but the last): Heun, DPM2, DPM2 a, DPM++ 2S a and
    DPM++ SDE; 1 for the others, DDIM and PLMS too."""
    two_calls = (_heun, _dpm2, _dpm2_ancestral, _dpmpp_2s_ancestral, _dpmpp_sde)
    return 2 if name in STEPS and STEPS[name][0] in two_calls else 1


def unet_calls(name: str, steps: int) -> int:
    """UNet calls of a run of `steps` steps down to σ = 0 (a hires fix's second pass too): S, 2S − 1 for the
    two-call samplers (the last step, to 0, is Euler's, one call) and S + 1 for PLMS (its first step takes two)."""
    if name == "plms":
        return steps + 1
    per_step = unet_calls_per_step(name)
    return per_step * steps - (per_step - 1)


def noise_levels(name: str, schedule: SigmaSchedule, steps: int) -> list[float]:
    """The S + 1 noise levels sampler `name` walks in an S-step run (the model's or Karras'), the last 0.

    DPM2 and DPM2 a walk the levels of S + 1 steps without the last above 0 (the model's smallest σ), as A1111 and
    ComfyUI run them (their "discard penultimate σ"): so a DPM2 image of theirs is painted here too. k-diffusion's
    own loop takes the S levels as they are.
    """
    step, karras = STEPS[name]
    skips_last = step in (_dpm2, _dpm2_ancestral)
    count = steps + 1 if skips_last else steps
    levels = schedule.karras_sigmas(count) if karras else schedule.sigmas(count)
    return levels[:-2] + levels[-1:] if skips_last else levels


def start(noise: torch.Tensor, sigma: float, init_latent: torch.Tensor | None = None) -> torch.Tensor:
    """The latent a run from level σ starts at: the image's noise at that level (k-diffusion's noise·σ_max for
    txt2img), added to img2img's init latent z₀ (z₀ + σ·noise is z₀ noised to σ in this view)."""
    return noise * sigma if init_latent is None else init_latent + noise * sigma


def sample(
    name: str,
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: SigmaSchedule,
    sigmas: Sequence[float],
    generators: Sequence[torch.Generator],
    callback: StepCallback | None = None,
    after_step: StepHook | None = None,
) -> torch.Tensor:
    """Run sampler `name` from `x` (at level `sigmas[0]`, see `start`) down `sigmas` to their last, 0: the whole
    of `noise_levels` for txt2img, its last m + 1 for img2img. Returns the clean latents.

    `callback` gets each step's x as the model sees it (x·c_in, which is x_t), so previews look as DDIM's do.
    """
    step = STEPS[name][0]

    def derivative(latents: torch.Tensor, sigma: float) -> torch.Tensor:
        return eps_fn(latents / (sigma**2 + 1.0) ** 0.5, schedule.timestep(sigma))

    run = _Run(derivative, list(sigmas), generators)
    total = len(sigmas) - 1
    for i in range(total):
        x = step(run, x, i)
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback(i + 1, total, x / (sigmas[i + 1] ** 2 + 1.0) ** 0.5)
    return x
