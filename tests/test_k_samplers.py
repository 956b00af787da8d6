"""The σ-space samplers against diffusers' k-diffusion ports, and their schedule and LMS weights against closed
forms, with no UNet at all.

diffusers' Euler, Euler ancestral, Heun, KDPM2 and KDPM2 ancestral schedulers are the independent implementation:
ports of k-diffusion's samplers into diffusers' step-by-step form (a different structure: the two-call samplers
keep half a step of state between calls). They agree with k-diffusion's `CompVisDenoiser` schedule where the S
timesteps linspace(999, 0, S) are whole numbers (S − 1 divides 999: S = 10, 28, 38, …; for DPM2, whose levels are
those of S + 1 steps, S = 9, 27, 37, …); between whole numbers diffusers interpolates σ where k-diffusion
interpolates log σ, so other step counts are checked against the closed form of the schedule instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
import torch

from ldm import k_samplers
from ldm.config import load_config
from ldm.ddim import EpsFn, StepCallback, alphas_cumprod
from ldm.k_samplers import SigmaSchedule, lms_coefficients
from tests.peer_schedulers import peer_scheduler
from tests.reference import TINY_CONFIG

pytest.importorskip("diffusers")
# diffusers' schedulers make numpy arrays of torch tensors, which numpy 2 warns about (their code, not ours).
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context"),
]


@pytest.fixture(scope="module")
def alphas() -> torch.Tensor:
    return alphas_cumprod(load_config(TINY_CONFIG))


@pytest.fixture(scope="module")
def schedule(alphas: torch.Tensor) -> SigmaSchedule:
    return SigmaSchedule(alphas)


def run(
    name: str,
    eps: EpsFn,
    noise: torch.Tensor,
    schedule: SigmaSchedule,
    steps: int,
    generators: list[torch.Generator],
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """A txt2img run of `steps` steps from `noise`, as the pipeline makes it."""
    levels = k_samplers.noise_levels(name, schedule, steps)
    return k_samplers.sample(name, eps, k_samplers.start(noise, levels[0]), schedule, levels, generators, callback)


def test_sigma_is_the_models_at_whole_timesteps_and_log_linear_between(alphas: torch.Tensor) -> None:
    schedule = SigmaSchedule(alphas)
    closed = [math.sqrt((1 - a) / a) for a in alphas.tolist()]
    for t in (0, 1, 500, 998, 999):
        assert schedule.sigma(t) == pytest.approx(closed[t], rel=1e-12)
        assert schedule.timestep(closed[t]) == pytest.approx(t, abs=1e-9)
    for t in (0.5, 123.25, 998.9):
        low = math.floor(t)
        expected = math.exp((1 - (t - low)) * math.log(closed[low]) + (t - low) * math.log(closed[low + 1]))
        assert schedule.sigma(t) == pytest.approx(expected, rel=1e-12)
        assert schedule.timestep(expected) == pytest.approx(t, abs=1e-9)
    # σ outside the model's range maps to the nearest end of its timesteps.
    assert schedule.timestep(closed[0] / 2) == 0
    assert schedule.timestep(closed[999] * 2) == 999
    # The S levels: linspace(999, 0, S), then 0; S = 15 falls between whole timesteps.
    assert schedule.sigmas(10) == pytest.approx([closed[t] for t in range(999, -1, -111)] + [0.0], rel=1e-12)
    fifteen = schedule.sigmas(15)
    assert len(fifteen) == 16 and fifteen[-1] == 0.0
    assert fifteen[1] == pytest.approx(schedule.sigma(999 - 999 / 14), rel=1e-12)


def eps_fn(calls: list[float], inputs: list[torch.Tensor] | None = None) -> EpsFn:
    """A smooth stand-in for a UNet (ε near the input's scale, as a real one's) that records its timesteps."""

    def eps(x: torch.Tensor, t: float) -> torch.Tensor:
        calls.append(float(t))
        if inputs is not None:
            inputs.append(x)
        return 0.9 * torch.tanh(x * (1.0 + t / 1000.0)) + 0.05 * t / 1000.0

    return eps


def input_only(calls: list[float]) -> EpsFn:
    """A stand-in that reads its input alone, for diffusers' ports that round the timesteps they give the model;
    it records the timesteps it is asked at."""

    def eps(x: torch.Tensor, t: float) -> torch.Tensor:
        calls.append(float(t))
        return 0.9 * torch.tanh(x) + 0.05

    return eps


def diffusers_scheduler(name: str) -> Any:
    """diffusers' port of sampler `name` (tests/peer_schedulers.py), on SD v1's β."""
    betas = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    return peer_scheduler(name, betas)


def run_diffusers(name: str, noise: torch.Tensor, steps: int, generator: torch.Generator, eps: EpsFn) -> torch.Tensor:
    scheduler = diffusers_scheduler(name)
    scheduler.set_timesteps(steps)
    # k-diffusion starts from noise·σ_max; diffusers' pipelines from noise·√(σ_max² + 1) at "linspace" spacing.
    x = noise * scheduler.sigmas[0]
    for t in scheduler.timesteps:
        ancestral = {"generator": generator} if name.removesuffix("_karras").endswith("_a") else {}
        x = scheduler.step(eps(scheduler.scale_model_input(x, t), float(t)), t, x, **ancestral).prev_sample
    return x


# Step counts whose timesteps are whole (the module's docstring says why): DPM2's levels are those of S + 1 steps.
@pytest.mark.parametrize(
    ("name", "steps"),
    [(name, steps) for name in ("euler", "euler_a", "heun") for steps in (10, 28)]
    + [(name, steps) for name in ("dpm2", "dpm2_a") for steps in (9, 27)],
)
def test_sampler_equals_diffusers_port(schedule: SigmaSchedule, name: str, steps: int) -> None:
    seed = 7 + steps
    ours_generator, their_generator = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, 8, 8, generator=ours_generator)
    assert torch.equal(noise, torch.randn(1, 4, 8, 8, generator=their_generator))
    ours_calls: list[float] = []
    theirs_calls: list[float] = []
    ours = run(name, eps_fn(ours_calls), noise, schedule, steps, [ours_generator])
    theirs = run_diffusers(name, noise, steps, their_generator, eps_fn(theirs_calls))
    assert ours_calls == pytest.approx(theirs_calls, abs=1e-3)
    two_calls = name in ("heun", "dpm2", "dpm2_a")
    assert len(ours_calls) == (2 * steps - 1 if two_calls else steps)
    # diffusers keeps σ in float32; ours are float64.
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # Sensitive: the deterministic Euler lands far from every other sampler.
    if name != "euler":
        euler = run("euler", eps_fn([]), noise, schedule, steps, [torch.Generator().manual_seed(0)])
        assert (euler - theirs).abs().max().item() > 1e-2


@pytest.mark.parametrize("steps", [3, 10, 25])  # at 2 both schedules are σ_max, σ_min, 0
@pytest.mark.parametrize("name", ["euler_karras", "heun_karras", "dpm2_karras", "dpm2_a_karras"])
def test_karras_variants_equal_diffusers_ports_on_karras_sigmas(schedule: SigmaSchedule, name: str, steps: int) -> None:
    """Euler, Heun, DPM2 and DPM2 a on the Karras schedule, against diffusers' ports with `use_karras_sigmas` (its
    Euler a has none: Euler a Karras is Euler a's step, checked above, on these levels). Some round the timesteps
    they give the model (Karras σ fall between whole timesteps; k-diffusion, and ours, do not), so the stand-in
    depends on its input alone; the schedule test holds our fractional timesteps."""
    eps = input_only([])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    calls: list[float] = []
    ours = run(name, input_only(calls), noise, schedule, steps, [torch.Generator().manual_seed(1)])
    assert len(calls) == k_samplers.unet_calls(name, steps)
    theirs = run_diffusers(name, noise, steps, torch.Generator().manual_seed(1), eps)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # Sensitive: the same sampler on the model's schedule lands elsewhere.
    on_model_levels = run(name.removesuffix("_karras"), eps, noise, schedule, steps, [torch.Generator().manual_seed(1)])
    assert (on_model_levels - theirs).abs().max().item() > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_unet_calls_counts_the_calls_of_a_run(schedule: SigmaSchedule, steps: int) -> None:
    """What a hires fix's progress weighs its passes by: the calls each sampler makes, counted on a stand-in."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    for name in k_samplers.STEPS:
        calls: list[float] = []
        run(name, eps_fn(calls), noise, schedule, steps, [torch.Generator().manual_seed(1)])
        assert k_samplers.unet_calls(name, steps) == len(calls), name
    assert (k_samplers.unet_calls("ddim", steps), k_samplers.unet_calls("plms", steps)) == (steps, steps + 1)


def test_dpm2_walks_a1111s_levels(schedule: SigmaSchedule) -> None:
    """A1111 and ComfyUI run DPM2 and DPM2 a on the levels of one step more without the last above 0 (their
    "discard penultimate σ"): at 5 steps, SD v1's σ at timesteps 999, 799.2, …, 199.8, then 0, never σ(0) =
    0.0292. The constants are k-diffusion's `get_sigmas` (and `get_sigmas_karras`) of 6 steps, the penultimate
    dropped, as A1111's `get_sigmas` does (to 4 decimals). The other samplers walk the 5 steps' own levels."""
    model = [14.6146, 5.0924, 2.2797, 1.1629, 0.5712, 0.0]
    karras = [14.6146, 6.0821, 2.2322, 0.6926, 0.1698, 0.0]
    for name in ("dpm2", "dpm2_a"):
        assert k_samplers.noise_levels(name, schedule, 5) == pytest.approx(model, abs=5e-5)
        assert k_samplers.noise_levels(f"{name}_karras", schedule, 5) == pytest.approx(karras, abs=5e-5)
    assert k_samplers.noise_levels("heun", schedule, 5)[-2] == pytest.approx(0.0292, rel=1e-2)
    assert k_samplers.noise_levels("lms_karras", schedule, 5)[-2] == pytest.approx(0.0292, rel=1e-2)


def test_each_karras_variant_is_its_base_sampler_on_karras_levels() -> None:
    for name, (step, karras) in k_samplers.STEPS.items():
        assert karras is name.endswith("_karras")
        if karras:
            assert step is k_samplers.STEPS[name.removesuffix("_karras")][0]


def test_karras_sigmas_equal_diffusers(schedule: SigmaSchedule) -> None:
    """From the model's largest σ to its smallest, even in σ^(1/7), then 0."""
    import diffusers

    theirs = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True
    )
    theirs.set_timesteps(20)
    # diffusers computes 1 − ᾱ in float32, which near t = 0 (ᾱ ≈ 0.999) keeps only about three digits of it.
    assert schedule.karras_sigmas(20) == pytest.approx(theirs.sigmas.tolist(), rel=5e-5)
    assert schedule.karras_sigmas(20)[0] == pytest.approx(schedule.sigma(999), rel=1e-12)
    assert schedule.karras_sigmas(20)[-2] == pytest.approx(schedule.sigma(0), rel=1e-12)


@pytest.mark.parametrize("steps", [2, 10, 25])
@pytest.mark.parametrize(("name", "algorithm"), [("dpmpp_2m_karras", "dpmsolver++"),
                                                 ("dpmpp_2m_sde_karras", "sde-dpmsolver++")])  # fmt: skip
def test_dpmpp_2m_karras_equals_diffusers_dpm_solver(
    schedule: SigmaSchedule, name: str, algorithm: str, steps: int
) -> None:
    """diffusers' DPM-Solver++ works on x_t (variance preserving), k-diffusion's on x = x_t·√(σ² + 1): the same
    solution, so the two meet at σ = 0. diffusers rounds the timesteps it gives the model, so the stand-in here
    depends on its input alone; tests/test_k_samplers.py's schedule test holds ours' fractional timesteps. The SDE
    form draws a step's noise from the generator as diffusers' does, one draw per step in step order."""
    import diffusers

    eps = input_only([])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    ours = run(name, eps, noise, schedule, steps, [torch.Generator().manual_seed(7)])
    scheduler = diffusers.DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type=algorithm,
        solver_order=2,
        use_karras_sigmas=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(steps)
    sigma_max = schedule.sigma(999)
    x = noise * sigma_max / math.sqrt(sigma_max**2 + 1)
    theirs_generator = torch.Generator().manual_seed(7)
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, float(t)), t, x, generator=theirs_generator).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    # Sensitive: Euler on the model's schedule lands elsewhere. At two steps they meet: both schedules are σ_max,
    # σ_min, 0, DPM++'s first order is Euler's step (the SDE's adds noise), and both land on the denoised image from
    # σ_min.
    first_order = run("euler", eps, noise, schedule, steps, [])
    if steps > 2 or name == "dpmpp_2m_sde_karras":
        assert (first_order - x).abs().max().item() > 1e-3
    else:
        assert torch.allclose(first_order, x, atol=1e-5)


@pytest.mark.parametrize("steps", [10, 28])
@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_sde_karras"])
def test_dpmpp_sde_equals_diffusers_port_on_the_same_brownian_path(
    schedule: SigmaSchedule, name: str, steps: int
) -> None:
    """diffusers' DPMSolverSDEScheduler is k-diffusion's DPM++ SDE taken a UNet call at a time: each half step asks
    its noise sampler for the Brownian increment from σ_i to the midpoint, then from σ_i to σ_{i+1}, each over the
    square root of its length. Handed the increments of a path drawn as ours is drawn (the piece down to the
    midpoint, then the piece below it, from one generator), it lands where ours does, calling the UNet 2S − 1
    times. With karras, diffusers rounds the timesteps it gives the model, so the stand-in reads its input alone."""
    import diffusers

    eps = input_only([])
    karras = name.endswith("_karras")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    calls: list[float] = []
    ours = run(name, input_only(calls), noise, schedule, steps, [torch.Generator().manual_seed(3)])
    assert len(calls) == 2 * steps - 1
    scheduler = diffusers.DPMSolverSDEScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="linspace",
        use_karras_sigmas=karras,
    )
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(3)
    pieces: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def brownian(sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not pieces:  # down to the midpoint: the first piece alone
            first, second = (torch.randn(4, 8, 8, generator=generator)[None] for _ in range(2))
            pieces.append((first, second, float(target)))
            return first
        first, second, middle = pieces.pop()
        sigma_, target_ = float(sigma), float(target)
        whole = first * math.sqrt(sigma_ - middle) + second * math.sqrt(middle - target_)
        return whole / math.sqrt(sigma_ - target_)

    scheduler.noise_sampler = brownian
    x = noise * float(scheduler.sigmas[0])
    for t in scheduler.timesteps:
        x = scheduler.step(eps(scheduler.scale_model_input(x, t), float(t)), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_dpmpp_sdes_two_noises_have_the_law_of_a_brownian_trees_increments() -> None:
    """The test above hands diffusers our construction of a step's two noises; this holds the construction itself
    against torchsde's Brownian tree (what k-diffusion draws from): each of unit variance, correlated as the
    shorter increment lies within the longer, √((σ − σ_s)/(σ − σ_{i+1})), here 0.78. 20,000 samples put the
    estimates within 0.01 of it (the tolerance is 0.03)."""
    import torchsde

    sigma, following = 2.5, 0.9
    middle = math.sqrt(sigma * following)
    generator = torch.Generator().manual_seed(0)
    upper, lower = (torch.randn(20_000, generator=generator, dtype=torch.float64) for _ in range(2))
    ours = k_samplers.brownian_increments(upper, lower, sigma, middle, following)
    tree = torchsde.BrownianTree(t0=0.0, w0=torch.zeros(20_000, dtype=torch.float64), t1=3.0, entropy=1)
    theirs = [
        (tree(middle, sigma) / math.sqrt(sigma - middle)),
        (tree(following, sigma) / math.sqrt(sigma - following)),
    ]
    expected = math.sqrt((sigma - middle) / (sigma - following))
    for first, second in (ours, theirs):
        assert float(first.std()) == pytest.approx(1.0, abs=0.03) and float(second.std()) == pytest.approx(
            1.0, abs=0.03
        )
        assert float(torch.corrcoef(torch.stack([first, second]))[0, 1]) == pytest.approx(expected, abs=0.03)
    # Drawn apart, the second noise would not hold the first.
    assert float(torch.corrcoef(torch.stack([upper, lower]))[0, 1]) == pytest.approx(0.0, abs=0.03)


def test_the_model_sees_x_scaled_to_x_t(schedule: SigmaSchedule) -> None:
    """The first call gets noise·σ_max·c_in: unit variance, as DDIM's x_T."""
    inputs: list[torch.Tensor] = []
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run("euler", eps_fn([], inputs), noise, schedule, 4, [])
    sigma = schedule.sigmas(4)[0]
    torch.testing.assert_close(inputs[0], noise * sigma / math.sqrt(sigma**2 + 1), rtol=1e-6, atol=0)


def simpson(f: Callable[[Fraction], Fraction], a: Fraction, b: Fraction) -> Fraction:
    """Simpson's rule: exact for polynomials up to degree 3, which is what LMS's order-4 bases are; in exact
    rational arithmetic, so the reference itself has no rounding."""
    return (b - a) / 6 * (f(a) + 4 * f((a + b) / 2) + f(b))


def test_lms_weights_are_the_lagrange_bases_integrals(schedule: SigmaSchedule) -> None:
    sigmas = schedule.sigmas(15)
    for i in range(len(sigmas) - 1):
        order = min(i + 1, 4)
        nodes = [Fraction(sigmas[i - k]) for k in range(order)]
        for j, weight in enumerate(lms_coefficients(sigmas, i, order)):

            def basis(s: Fraction, j: int = j, nodes: list[Fraction] = nodes) -> Fraction:
                return math.prod(((s - n) / (nodes[j] - n) for k, n in enumerate(nodes) if k != j), start=Fraction(1))

            exact = simpson(basis, Fraction(sigmas[i]), Fraction(sigmas[i + 1]))
            assert weight == pytest.approx(float(exact), rel=1e-9, abs=1e-14)
        # The weights of a step add up to its length (a constant derivative is integrated exactly).
        assert sum(lms_coefficients(sigmas, i, order)) == pytest.approx(sigmas[i + 1] - sigmas[i], rel=1e-9)


@pytest.mark.parametrize("name", ["lms", "lms_karras"])
def test_lms_integrates_a_cubic_derivative_exactly_once_it_has_four_steps(schedule: SigmaSchedule, name: str) -> None:
    """With dx/dσ = σ³, every step from the fourth on (order 4) adds exactly (σ_{i+1}⁴ − σ_i⁴)/4: which derivative
    goes with which weight matters. On either schedule."""
    seen: list[torch.Tensor] = []
    steps = 12
    sigmas = k_samplers.noise_levels(name, schedule, steps)
    assert sigmas == (schedule.karras_sigmas(steps) if name.endswith("_karras") else schedule.sigmas(steps))

    def cubic(x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.full_like(x, schedule.sigma(t) ** 3)

    noise = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    run(name, cubic, noise, schedule, steps, [], lambda i, n, x: seen.append(x))
    # The callback gets x·c_in; undo it.
    xs = [float(x) * math.sqrt(sigmas[i + 1] ** 2 + 1) for i, x in enumerate(seen)]
    for i in range(4, steps):
        # abs: x is about −σ_max⁴/4 ≈ −10⁴, so its float64 rounding is about 10⁻¹².
        assert xs[i] - xs[i - 1] == pytest.approx((sigmas[i + 1] ** 4 - sigmas[i] ** 4) / 4, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde"])
def test_step_noise_comes_from_each_images_generator_in_step_order(schedule: SigmaSchedule, name: str) -> None:
    """Two images in one batch each get what they get alone; the last step draws nothing."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    generators = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    together = run(name, eps_fn([]), noise, schedule, 5, generators)
    for row, seed in enumerate((10, 11)):
        generator = torch.Generator().manual_seed(seed)
        alone = run(name, eps_fn([]), noise[row : row + 1], schedule, 5, [generator])
        torch.testing.assert_close(together[row : row + 1], alone, rtol=0, atol=1e-6)
        # 4 draws (steps 1-4; none on the step to σ = 0): the generator is now where a fresh one is after 4.
        fresh = torch.Generator().manual_seed(seed)
        for _ in range(4):
            torch.randn(4, 8, 8, generator=fresh)
        assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=fresh))


def test_callback_sees_every_step_once(schedule: SigmaSchedule) -> None:
    seen: list[tuple[int, int]] = []
    noise = torch.zeros(1, 1, 2, 2)
    run("heun", eps_fn([]), noise, schedule, 4, [], lambda i, total, x: seen.append((i, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def k_diffusion_dpmpp_2s_ancestral(
    eps: EpsFn, schedule: SigmaSchedule, sigmas: list[float], x: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """k-diffusion 0.1.1's `sample_dpmpp_2s_ancestral` (η = 1, s_noise = 1) as it is written there: in t = −log σ,
    with expm1, on its denoiser D(x, σ) = x − σ·ε(x/√(σ² + 1), t(σ)), the step noise drawn from `generator`."""

    def denoised(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma_value = float(sigma)
        return x - sigma * eps(x / (sigma_value**2 + 1.0) ** 0.5, schedule.timestep(sigma_value))

    levels = torch.tensor(sigmas, dtype=torch.float64)
    for i in range(len(levels) - 1):
        d = denoised(x, levels[i])
        sigma_up = torch.minimum(
            levels[i + 1], (levels[i + 1] ** 2 * (levels[i] ** 2 - levels[i + 1] ** 2) / levels[i] ** 2) ** 0.5
        )
        sigma_down = (levels[i + 1] ** 2 - sigma_up**2) ** 0.5
        if sigma_down == 0:
            x = x + (x - d) / levels[i] * (sigma_down - levels[i])
        else:
            t, t_next = -levels[i].log(), -sigma_down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = ((-s).exp() / (-t).exp()) * x - torch.expm1(-h / 2) * d
            d_2 = denoised(x_2, (-s).exp())
            x = ((-t_next).exp() / (-t).exp()) * x - torch.expm1(-h) * d_2
        if levels[i + 1] > 0:
            x = x + torch.randn(x.shape, generator=generator).to(x.dtype) * sigma_up  # float32 draws, as ours
    return x


@pytest.mark.parametrize("steps", [2, 10, 28])
@pytest.mark.parametrize("name", ["dpmpp_2s_a", "dpmpp_2s_a_karras"])
def test_dpmpp_2s_ancestral_equals_k_diffusions_algorithm(schedule: SigmaSchedule, name: str, steps: int) -> None:
    """Against k-diffusion's own loop transcribed (diffusers has no port), in float64 on a stand-in ε: the same
    UNet timesteps (two a step, one on the last) and the same result from the same generator."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    levels = k_samplers.noise_levels(name, schedule, steps)
    ours_calls: list[float] = []
    theirs_calls: list[float] = []
    ours = run(name, eps_fn(ours_calls), noise, schedule, steps, [torch.Generator().manual_seed(5)])
    theirs = k_diffusion_dpmpp_2s_ancestral(
        eps_fn(theirs_calls), schedule, levels, noise * levels[0], torch.Generator().manual_seed(5)
    )
    assert ours_calls == pytest.approx(theirs_calls, abs=1e-9) and len(ours_calls) == 2 * steps - 1
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    # Not DPM2 a, the other second-order ancestral sampler, on the same levels and noise.
    dpm2_a = run(
        name.replace("dpmpp_2s_a", "dpm2_a"), eps_fn([]), noise, schedule, steps, [torch.Generator().manual_seed(5)]
    )
    assert (dpm2_a - theirs).abs().max().item() > 1e-2
