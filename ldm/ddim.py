"""DDIM sampling for ε-prediction models, exactly as tests/fixtures/GENERATION.md fixes it (Song et al. 2020, eq. 12).

Symbols: ᾱ_t = `alphas_cumprod[t]`, ε = the model's noise prediction, x̂₀ = the predicted clean latent,
σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev). The sampler knows nothing of UNets or text: it takes a function
`eps(x, t) → ε`, so it can be tested with a lambda.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ldm.config import ModelConfig
from ldm.noise import per_image_noise

# eps(x, t): noise prediction for latents x (B, C, h, w) at timestep t (an integer here; the σ-space samplers of
# ldm/k_samplers.py also ask between integers).
EpsFn = Callable[[torch.Tensor, float], torch.Tensor]
# callback(step_index, total_steps, x): called after each step with the new latents.
StepCallback = Callable[[int, int, torch.Tensor], None]
# after_step(step_index, x) → the latents the next step starts from (inpainting puts the kept region back: see
# ldm/inpainting.py); step_index counts from 0.
StepHook = Callable[[int, torch.Tensor], torch.Tensor]


def betas(config: ModelConfig) -> torch.Tensor:
    """β_t for t = 0..T−1 in float64, "scaled linear": squares of a linspace from √linear_start to √linear_end."""
    return torch.linspace(config.linear_start**0.5, config.linear_end**0.5, config.timesteps, dtype=torch.float64) ** 2


def alphas_cumprod(config: ModelConfig) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) in float64."""
    return torch.cumprod(1.0 - betas(config), dim=0)


def max_ddim_steps(num_train_timesteps: int) -> int:
    """The most DDIM steps a T-step model takes: at S = T the largest t_k = k·⌊T/S⌋ + 1 would be T itself, one past
    ᾱ's last index T − 1 (the original implementation fails there too)."""
    return num_train_timesteps - 1


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """t_k = k·⌊T/S⌋ + 1 for k = 0..S−1, largest first: exactly S model evaluations."""
    most = max_ddim_steps(num_train_timesteps)
    if not 1 <= steps <= most:
        raise ValueError(f"ddim_steps must be in [1, {most}], got {steps}")
    stride = num_train_timesteps // steps
    return [k * stride + 1 for k in reversed(range(steps))]


@dataclass(frozen=True)
class DDIMStep:
    """Coefficients of one step from t to its predecessor."""

    t: int
    alpha: float
    alpha_prev: float

    def sigma(self, eta: float) -> float:
        """σ for this step at noise level η (0 = deterministic DDIM, 1 = DDPM-like)."""
        ratio = (1.0 - self.alpha_prev) / (1.0 - self.alpha) * (1.0 - self.alpha / self.alpha_prev)
        return eta * ratio**0.5


class DDIMSchedule:
    """The S DDIM steps of a model, largest t first; img2img runs only the last m of them."""

    def __init__(self, alphas: torch.Tensor, steps: int) -> None:
        timesteps = ddim_timesteps(steps, len(alphas))
        ascending = list(reversed(timesteps))
        # ᾱ_prev of t_k is ᾱ(t_{k−1}); of the smallest, t_0, it is ᾱ_0.
        prev = {t: float(alphas[ascending[i - 1]]) if i else float(alphas[0]) for i, t in enumerate(ascending)}
        self.steps = [DDIMStep(t, float(alphas[t]), prev[t]) for t in timesteps]

    def tail(self, m: int) -> list[DDIMStep]:
        """The last m steps, t_{m−1} down to t_0: what img2img runs at strength m/S."""
        if not 1 <= m <= len(self.steps):
            raise ValueError(f"m must be in [1, {len(self.steps)}], got {m}")
        return self.steps[len(self.steps) - m :]


def add_noise(z0: torch.Tensor, noise: torch.Tensor, alpha: float) -> torch.Tensor:
    """x_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·noise: a clean latent noised to level ᾱ_t."""
    return alpha**0.5 * z0 + (1.0 - alpha) ** 0.5 * noise


def ddim_step(
    x: torch.Tensor, eps: torch.Tensor, step: DDIMStep, sigma: torch.Tensor, z: torch.Tensor | None
) -> torch.Tensor:
    """x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev−σ²)·ε + σ·z, with x̂₀ = (x − √(1−ᾱ_t)·ε)/√ᾱ_t.

    `sigma` is per sample, shape (B, 1, 1, 1), so a batch may mix η values; `z` is None when every σ is 0.
    """
    x0 = (x - (1.0 - step.alpha) ** 0.5 * eps) / step.alpha**0.5
    direction = (1.0 - step.alpha_prev - sigma**2).sqrt() * eps
    x_prev = step.alpha_prev**0.5 * x0 + direction
    return x_prev if z is None else x_prev + sigma * z


def sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    steps: Sequence[DDIMStep],
    etas: Sequence[float],
    generators: Sequence[torch.Generator],
    callback: StepCallback | None = None,
    after_step: StepHook | None = None,
) -> torch.Tensor:
    """Denoise `x` through `steps`; image i draws its per-step noise z (η > 0 only) from `generators[i]`.

    Every step's σ goes to the device in one copy up front: a copy per step would make the host wait for the GPU at
    each step, so it could not queue the next step's work while the GPU runs this one.
    """
    sigma_table = torch.tensor([[step.sigma(eta) for eta in etas] for step in steps], dtype=x.dtype, device=x.device)
    for index, step in enumerate(steps):
        eps = eps_fn(x, step.t)
        sigmas = sigma_table[index]
        z = None
        if any(eta > 0 for eta in etas):
            # Every image with η > 0 draws one z per step from its own generator; others get none.
            z = per_image_noise(x, generators, [eta > 0 for eta in etas])
        x = ddim_step(x, eps, step, sigmas.view(-1, 1, 1, 1), z)
        if after_step is not None:
            x = after_step(index, x)
        if callback is not None:
            callback(index + 1, len(steps), x)
    return x
