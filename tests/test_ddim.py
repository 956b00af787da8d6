"""The DDIM sampler against the reference schedules and against a float64 closed form, with no UNet at all."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.config import load_config
from ldm.ddim import DDIMSchedule, alphas_cumprod, ddim_timesteps, sample
from tests.reference import CASES, TINY_CONFIG


@pytest.fixture(scope="module")
def alphas() -> torch.Tensor:
    return alphas_cumprod(load_config(TINY_CONFIG))


@pytest.mark.parametrize("case_data", CASES, ids=lambda c: c["id"])
def test_schedule_equals_reference(alphas: torch.Tensor, case_data: dict) -> None:
    schedule = case_data["schedule"]
    request = case_data["request"]
    steps = DDIMSchedule(alphas, request["ddim_steps"]).tail(schedule["n_denoising_steps"])
    assert [s.t for s in steps] == schedule["timesteps_run"]
    assert [s.alpha for s in steps] == pytest.approx(schedule["alphas_cumprod_t"], abs=1e-6)
    assert [s.alpha_prev for s in steps] == pytest.approx(schedule["alphas_cumprod_prev"], abs=1e-6)
    assert [s.sigma(request["eta"]) for s in steps] == pytest.approx(schedule["sigmas"], abs=1e-6)


def test_exactly_s_steps_even_when_s_does_not_divide_1000() -> None:
    assert ddim_timesteps(15) == [k * 66 + 1 for k in reversed(range(15))]
    assert ddim_timesteps(1) == [1]
    assert ddim_timesteps(999)[0] == 999
    # At S = T the largest t_k would be 1000, past ᾱ's last index.
    for steps in (0, 1000):
        with pytest.raises(ValueError, match=r"ddim_steps must be in \[1, 999\]"):
            ddim_timesteps(steps)


def test_alphas_cumprod_is_the_scaled_linear_product() -> None:
    config = load_config(TINY_CONFIG)
    a = alphas_cumprod(config)
    beta_0, beta_last = 0.00085, 0.012
    assert a[0].item() == pytest.approx(1 - beta_0, rel=1e-12)
    expected = math.prod(
        1 - (math.sqrt(beta_0) + (math.sqrt(beta_last) - math.sqrt(beta_0)) * i / 999) ** 2 for i in range(1000)
    )
    assert a[-1].item() == pytest.approx(expected, rel=1e-9)


def test_deterministic_step_against_float64_closed_form(alphas: torch.Tensor) -> None:
    """With ε fixed, one η=0 step is x_prev = √ᾱ_prev·(x − √(1−ᾱ)ε)/√ᾱ + √(1−ᾱ_prev)·ε, computed here by hand."""
    schedule = DDIMSchedule(alphas, 10)
    x = torch.linspace(-2, 2, 16, dtype=torch.float64).view(1, 1, 4, 4)
    eps = torch.full_like(x, 0.3)
    calls: list[int] = []

    def eps_fn(latents: torch.Tensor, t: int) -> torch.Tensor:
        calls.append(t)
        return eps

    out = sample(eps_fn, x, schedule.steps[:1], etas=[0.0], generators=[torch.Generator()])
    a, a_prev = float(alphas[901]), float(alphas[801])
    expected = math.sqrt(a_prev) * (x - math.sqrt(1 - a) * 0.3) / math.sqrt(a) + math.sqrt(1 - a_prev) * 0.3
    assert calls == [901]
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)


def test_eta_draws_one_noise_per_step_from_each_images_generator(alphas: torch.Tensor) -> None:
    schedule = DDIMSchedule(alphas, 4)
    x = torch.zeros(2, 4, 2, 2)
    eta = 0.5
    generators = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    out = sample(lambda latents, t: torch.zeros_like(latents), x, schedule.steps, [eta, eta], generators)
    # With ε = 0 and x = 0, x_k = √(ᾱ_prev/ᾱ)·x + σ·z: replay that with the same seeds' draws.
    for i, seed in enumerate((7, 8)):
        g = torch.Generator().manual_seed(seed)
        expected = torch.zeros(4, 2, 2)
        for step in schedule.steps:
            expected = (
                math.sqrt(step.alpha_prev / step.alpha) * expected
                + step.sigma(eta) * torch.randn((1, 4, 2, 2), generator=g)[0]
            )
        assert torch.allclose(out[i], expected, atol=1e-5)


def test_eta_zero_image_draws_nothing_beside_eta_image(alphas: torch.Tensor) -> None:
    schedule = DDIMSchedule(alphas, 3)
    g_alone, g_mixed = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    zero = lambda latents, t: torch.zeros_like(latents)  # noqa: E731
    alone = sample(zero, torch.ones(1, 4, 2, 2), schedule.steps, [0.0], [g_alone])
    mixed = sample(zero, torch.ones(2, 4, 2, 2), schedule.steps, [0.0, 1.0], [g_mixed, torch.Generator()])
    assert torch.equal(alone[0], mixed[0])
    assert torch.equal(g_alone.get_state(), g_mixed.get_state())
