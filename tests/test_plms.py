"""The PLMS sampler against diffusers' PNDM scheduler in its PLMS-only mode, with no UNet at all.

diffusers' `PNDMScheduler(skip_prk_steps=True)` is the independent implementation: it is how diffusers reproduces
the original CompVis PLMS sampler (the scheduler SD v1's own diffusers release shipped), written differently
(a counter and a timestep shifted back by one stride for the first step's second call, and PNDM's formula for the
update, algebraically DDIM's). Configured as CompVis samples: scaled-linear β, timesteps k·⌊1000/S⌋ + 1, ᾱ_prev
of the last step = ᾱ_0.
"""

from __future__ import annotations

import pytest
import torch

from ldm import ddim, plms
from ldm.config import load_config
from ldm.ddim import DDIMSchedule, alphas_cumprod
from tests.reference import TINY_CONFIG

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def alphas() -> torch.Tensor:
    return alphas_cumprod(load_config(TINY_CONFIG))


def eps_fn(calls: list[int]) -> ddim.EpsFn:
    """A smooth, x- and t-dependent stand-in for a UNet that records the timesteps it is called at."""

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        calls.append(t)
        return 0.8 * torch.sin(x * (1.0 + t / 1000.0)) + 0.3 * t / 1000.0

    return eps


def diffusers_plms(x: torch.Tensor, steps: int, calls: list[int]) -> torch.Tensor:
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(steps)
    eps = eps_fn(calls)
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, int(t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [2, 3, 4, 10, 15, 50])
def test_plms_equals_diffusers_pndm(alphas: torch.Tensor, steps: int) -> None:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    ours_calls: list[int] = []
    theirs_calls: list[int] = []
    ours = plms.sample(eps_fn(ours_calls), x, DDIMSchedule(alphas, steps).steps)
    theirs = diffusers_plms(x, steps, theirs_calls)
    # Both evaluate the largest t, then the next one twice (at the estimate, then at the corrected x), then each
    # of the others once: S + 1 calls.
    assert ours_calls == theirs_calls
    assert len(ours_calls) == steps + 1
    # diffusers keeps ᾱ in float32, ours in float64: the difference is float32 rounding (this stand-in's latents
    # grow to about 30, where a real ε keeps them near 1).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # The comparison is sensitive: DDIM on the same ε differs by orders of magnitude more.
    ddim_result = ddim.sample(eps_fn([]), x, DDIMSchedule(alphas, steps).steps, [0.0, 0.0], [])
    assert (ddim_result - theirs).abs().max().item() > 1e-3


def test_one_step_evaluates_its_timestep_twice(alphas: torch.Tensor) -> None:
    """S = 1 (diffusers makes a single plain call there): the original averages ε at x and at its own estimate,
    evaluated at the same timestep, since there is no next one."""
    x = torch.linspace(-2, 2, 16, dtype=torch.float64).view(1, 1, 4, 4)
    calls: list[int] = []
    (step,) = DDIMSchedule(alphas, 1).steps
    result = plms.sample(eps_fn(calls), x, [step])
    eps = eps_fn([])
    zero = torch.zeros((), dtype=torch.float64)
    first = eps(x, 1)
    estimate = ddim.ddim_step(x, first, step, zero, None)
    expected = ddim.ddim_step(x, (first + eps(estimate, 1)) / 2, step, zero, None)
    assert calls == [1, 1]
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_callback_sees_every_step_once(alphas: torch.Tensor) -> None:
    seen: list[tuple[int, int]] = []
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    plms.sample(eps_fn([]), x, DDIMSchedule(alphas, 5).steps, lambda i, total, latents: seen.append((i, total)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
