"""Each flow kernel against its closed form from ANCHORS.md section 1, computed here
independently in float64 (torch.distributions.Normal for the densities)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from mmgrpo.pipelines.flow import sde

SHAPE = (3, 4, 5, 6)  # [n, C, H, W]
SIGMAS = [1.0, 0.9, 0.6, 0.25, 0.0]  # a decreasing schedule that starts at 1 and ends at 0
SIGMA_MAX = SIGMAS[1]
A = 0.7


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)  # [n, *D]
    v = torch.randn(SHAPE, generator=g)  # [n, *D]
    return x, v


def _eps(seed: int) -> torch.Tensor:
    """The noise flow_step draws from torch.Generator().manual_seed(seed)."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()


def _closed_form(kernel: str, x, v, s: float, s_next: float, a: float):
    """(mean, std) in float64, written from the ANCHORS formulas."""
    x, v = x.double(), v.double()
    dt = s_next - s
    x0_hat = x - s * v
    score = -(x - (1 - s) * x0_hat) / s**2
    if kernel == "sde":
        s_den = SIGMA_MAX if s == 1.0 else s
        g = a * math.sqrt(s / (1 - s_den))
        mean = x * (1 + g**2 * dt / (2 * s)) + v * (1 + g**2 * (1 - s) / (2 * s)) * dt
        return mean, g * math.sqrt(abs(dt))
    if kernel == "cps":
        std = s_next * math.sin(a * math.pi / 2)
        x1_hat = x + (1 - s) * v
        return x0_hat * (1 - s_next) + x1_hat * math.sqrt(s_next**2 - std**2), std
    if kernel == "dance":
        return x + dt * v - 0.5 * a**2 * score * dt, a * math.sqrt(s - s_next)
    if kernel == "exact":
        # variance: the integral of Flow-GRPO's g^2 = a^2 u/(1-u) over the step, by quadrature; as in
        # SAGE-GRPO's released code sigma is clamped to 1 - 3e-3 but the step s - s_next is not
        hi = min(s, 1 - 3e-3)
        u = torch.linspace(s_next, hi, 200_001, dtype=torch.float64)
        var = torch.trapezoid(a**2 * u / (1 - u), u).item() - a**2 * (s - hi)
        return x + dt * v + 0.5 * var * score, math.sqrt(var)
    raise AssertionError(kernel)


STEPS = [(SIGMAS[i], SIGMAS[i + 1]) for i in range(len(SIGMAS) - 1)]


@pytest.mark.parametrize("kernel", ["sde", "dance", "exact"])
@pytest.mark.parametrize("s, s_next", STEPS)
def test_gaussian_kernels_match_closed_form(kernel, s, s_next):
    x, v = _data()
    a = A if kernel != "dance" else 0.3
    out = sde.flow_step(
        kernel, x, v, s, s_next, noise_level=a, sigma_max=SIGMA_MAX, generator=torch.Generator().manual_seed(7)
    )
    mean, std = _closed_form(kernel, x, v, s, s_next, a)
    assert out.mean.dtype == torch.float32 and out.log_prob.dtype == torch.float32
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    assert out.std.flatten() == pytest.approx([std] * SHAPE[0], rel=1e-5)
    torch.testing.assert_close(out.next_latents.double(), mean + std * _eps(7), rtol=1e-5, atol=1e-5)
    # log p: MEAN over C, H, W of the Normal log-density
    expected = Normal(mean, std).log_prob(out.next_latents.double()).mean(dim=(1, 2, 3))  # [n]
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s, s_next", STEPS)
def test_cps_matches_closed_form(s, s_next):
    x, v = _data()
    out = sde.flow_step("cps", x, v, s, s_next, noise_level=A, generator=torch.Generator().manual_seed(3))
    mean, std = _closed_form("cps", x, v, s, s_next, A)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    assert out.std.flatten() == pytest.approx([std] * SHAPE[0], abs=1e-7)
    torch.testing.assert_close(out.next_latents.double(), mean + std * _eps(3), rtol=1e-5, atol=1e-5)
    expected = -((out.next_latents.double() - mean) ** 2).mean(dim=(1, 2, 3))  # the reference's unnormalised log p
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-7)


def test_sde_at_sigma_one_uses_sigma_max_and_needs_it():
    x, v = _data()
    mean, std = sde.transition("sde", x, v, 1.0, 0.9, noise_level=A, sigma_max=SIGMA_MAX)
    g = A * math.sqrt(1.0 / (1.0 - SIGMA_MAX))
    assert std.flatten()[0].item() == pytest.approx(g * math.sqrt(0.1), rel=1e-6)
    torch.testing.assert_close(mean.double(), x.double() * (1 - g**2 * 0.1 / 2) + v.double() * (-0.1))
    with pytest.raises(ValueError, match="sigma_max"):
        sde.transition("sde", x, v, 1.0, 0.9, noise_level=A)


@pytest.mark.parametrize("s, s_next", STEPS)
def test_sde_mean_identity(s, s_next):
    """x (1 + g^2 dt/(2s)) + v (1 + g^2 (1-s)/(2s)) dt == x + (v - g^2 score / 2) dt."""
    x, v = _data(1)
    mean, std = sde.transition("sde", x, v, s, s_next, noise_level=A, sigma_max=SIGMA_MAX)
    dt = s_next - s
    g2 = (std.double() ** 2 / abs(dt)).flatten()[0].item()
    score = sde.score_estimate(x, v, s).double()
    torch.testing.assert_close(mean.double(), x.double() + (v.double() - 0.5 * g2 * score) * dt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["sde", "cps", "dance", "exact", "ode"])
@pytest.mark.parametrize("s, s_next", STEPS)
def test_zero_noise_level_is_the_euler_step(kernel, s, s_next):
    x, v = _data(2)
    mean, std = sde.transition(kernel, x, v, s, s_next, noise_level=0.0, sigma_max=SIGMA_MAX)
    torch.testing.assert_close(mean, x + v * (s_next - s), rtol=1e-5, atol=1e-6)
    assert torch.all(std == 0)


@pytest.mark.parametrize("kernel", ["sde", "dance", "exact"])
def test_small_noise_level_tends_to_euler(kernel):
    x, v = _data(2)
    euler = x + v * (0.25 - 0.6)
    gaps = [
        (sde.transition(kernel, x, v, 0.6, 0.25, noise_level=a)[0] - euler).abs().max().item() for a in (1e-1, 1e-2)
    ]
    assert gaps[1] < gaps[0] / 50  # the drift correction is O(a^2)


def test_ode_kernel_draws_no_noise_and_has_zero_log_prob():
    x, v = _data()
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    out = sde.flow_step("ode", x, v, 0.6, 0.25, generator=gen)
    assert torch.equal(gen.get_state(), state)
    torch.testing.assert_close(out.next_latents, x + v * (0.25 - 0.6))
    assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))


@pytest.mark.parametrize("kernel", ["sde", "cps", "dance", "exact"])
@pytest.mark.parametrize("s, s_next", [(1.0, 0.9), (0.6, 0.25), (0.25, 0.0)])
def test_rescoring_a_recorded_sample_reproduces_its_log_prob(kernel, s, s_next):
    x, v = _data()
    kw = dict(noise_level=0.5, sigma_max=SIGMA_MAX)
    sampled = sde.flow_step(kernel, x, v, s, s_next, generator=torch.Generator().manual_seed(11), **kw)
    rescored = sde.flow_step(kernel, x, v, s, s_next, next_latents=sampled.next_latents, **kw)
    assert torch.equal(rescored.log_prob, sampled.log_prob)
    assert torch.equal(rescored.mean, sampled.mean)
    # a different velocity changes the log-prob of the same recorded sample (except the last cps step)
    if not (kernel == "cps" and s_next == 0.0):
        moved = sde.flow_step(kernel, x, v + 0.1, s, s_next, next_latents=sampled.next_latents, **kw)
        assert not torch.allclose(moved.log_prob, sampled.log_prob)


@pytest.mark.parametrize("kernel", ["sde", "cps", "dance", "exact"])
def test_per_row_sigmas_equal_scalar_calls(kernel):
    x, v = _data()
    s = torch.tensor([1.0, 0.6, 0.25])  # [n]
    s_next = torch.tensor([0.9, 0.25, 0.0])  # [n]
    nxt = x * 0.5
    rows = sde.flow_step(kernel, x, v, s, s_next, sigma_max=SIGMA_MAX, next_latents=nxt)
    for i in range(3):
        one = sde.flow_step(
            kernel, x[i : i + 1], v[i : i + 1], s[i].item(), s_next[i].item(), sigma_max=SIGMA_MAX,
            next_latents=nxt[i : i + 1],
        )
        torch.testing.assert_close(rows.log_prob[i : i + 1], one.log_prob)
        torch.testing.assert_close(rows.mean[i : i + 1], one.mean)


def test_log_prob_is_a_mean_over_dims_not_a_sum():
    x, v = _data()
    out = sde.flow_step("sde", x, v, 0.6, 0.25, noise_level=A, generator=torch.Generator().manual_seed(0))
    # the same latents repeated along W: a mean is unchanged, a sum would double
    wide = sde.flow_step(
        "sde", torch.cat([x, x], -1), torch.cat([v, v], -1), 0.6, 0.25, noise_level=A,
        next_latents=torch.cat([out.next_latents] * 2, -1),
    )
    torch.testing.assert_close(wide.log_prob, out.log_prob)


def test_schedules():
    s = torch.linspace(1, 0, 11, dtype=torch.float64)
    k = 3.0
    torch.testing.assert_close(sde.shift_sigmas(s, k), k * s / (1 + (k - 1) * s))
    torch.testing.assert_close(sde.shift_sigmas(s, 1.0), s)
    d = sde.dance_sigmas(10, shift=k)
    assert d.shape == (11,) and d[0] == 1.0 and d[-1] == 0.0
    torch.testing.assert_close(d, (k * s / (1 + (k - 1) * s)).float())


def test_equalizer_weights_equalize_gain_over_std():
    s = torch.tensor(SIGMAS[:-1])  # [T]
    s_next = torch.tensor(SIGMAS[1:])  # [T]
    w = sde.equalizer_weights("sde", s, s_next, noise_level=A, sigma_max=SIGMA_MAX)
    gains = []
    for si, sn in zip(SIGMAS[:-1], SIGMAS[1:]):
        g2 = A**2 * si / (1 - (SIGMA_MAX if si == 1.0 else si))
        gains.append(abs((1 + g2 * (1 - si) / (2 * si)) * (sn - si)) / math.sqrt(g2 * (si - sn)))
    gains = torch.tensor(gains, dtype=torch.float64)
    torch.testing.assert_close(w.double(), gains.median() / gains, rtol=1e-5, atol=1e-6)


def test_errors_are_readable():
    x, v = _data()
    with pytest.raises(ValueError, match="unknown flow kernel"):
        sde.transition("euler", x, v, 0.5, 0.4)
    with pytest.raises(ValueError, match="Generator"):
        sde.flow_step("sde", x, v, 0.5, 0.4)


def test_exact_kernel_at_sigma_one_clamps_sigma_only():
    """SAGE-GRPO's released variance at sigma = 1: eta^2 (ln((1 - s_next) / (1 - min(s, 1 - 3e-3))) - (s - s_next)),
    the step unclamped (clamping both ends, as before, made it larger by eta^2 (1 - 0.997))."""
    x, v = _data(3)
    s, s_next, eta = 1.0, 0.9, 0.7
    var = eta**2 * (math.log((1 - s_next) / (1 - min(s, 1 - 3e-3))) - (s - s_next))
    out = sde.flow_step("exact", x, v, s, s_next, noise_level=eta, generator=torch.Generator().manual_seed(4))
    assert out.std.flatten().double() == pytest.approx([math.sqrt(var)] * SHAPE[0], rel=1e-6)
    score = -(x.double() + (1 - s) * v.double()) / s
    mean = x.double() + (s_next - s) * v.double() + 0.5 * var * score
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    expected = Normal(mean, math.sqrt(var)).log_prob(out.next_latents.double()).mean(dim=(1, 2, 3))  # [n]
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s, s_next", [(1.0, 0.998), (0.999, 0.998), (1.0, 1.0), (0.5, 0.5)])
def test_exact_kernel_without_a_positive_variance_is_an_error(s, s_next):
    x, v = _data()
    with pytest.raises(ValueError, match="no positive variance"):
        sde.flow_step("exact", x, v, s, s_next, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0.5, s, 0.5])  # one bad row among good ones is enough
    with pytest.raises(ValueError, match=f"sigma={s:g} -> sigma_next={s_next:g}"):
        sde.transition("exact", x, v, rows, torch.tensor([0.25, s_next, 0.25]))


# --------------------------------------------------------------------------- the shifted prior N(y, s_max^2 I)

S_PRIOR = 0.487  # FlowMSE's s_max


def _prior_mean(seed: int = 5) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))  # [n, *D] y


def _closed_form_prior(kernel: str, x, v, y, s: float, s_next: float, a: float, s_max: float):
    """(mean, std) in float64 from sde.py's docstring for the prior N(y, s_max^2 I), written directly
    (not through the change of coordinates the code uses)."""
    x, v, y = x.double(), v.double(), y.double()
    dt = s_next - s
    score = -(x - y + (1 - s) * v) / (s * s_max**2)
    if kernel == "sde":
        g = a * s_max * math.sqrt(s / (1 - (SIGMA_MAX if s == 1.0 else s)))
        return x + (v - 0.5 * g**2 * score) * dt, g * math.sqrt(abs(dt))
    if kernel == "dance":
        g = a * s_max
        return x + v * dt - 0.5 * g**2 * score * dt, a * s_max * math.sqrt(s - s_next)
    if kernel == "exact":
        hi = min(s, 1 - 3e-3)
        u = torch.linspace(s_next, hi, 200_001, dtype=torch.float64)
        var = s_max**2 * (torch.trapezoid(a**2 * u / (1 - u), u).item() - a**2 * (s - hi))
        return x + v * dt + 0.5 * var * score, math.sqrt(var)
    if kernel == "cps":
        x0_hat, z_hat = x - s * v, (x + (1 - s) * v - y) / s_max  # the predicted data and prior NOISE
        unit_std = s_next * math.sin(a * math.pi / 2)
        mean = (1 - s_next) * x0_hat + s_next * y + s_max * math.sqrt(s_next**2 - unit_std**2) * z_hat
        return mean, s_max * unit_std
    raise AssertionError(kernel)


@pytest.mark.parametrize("kernel", ["sde", "cps", "dance", "exact"])
@pytest.mark.parametrize("s, s_next", STEPS)
def test_kernels_with_a_shifted_prior_match_closed_form(kernel, s, s_next):
    x, v = _data()
    y = _prior_mean()
    a = 0.3 if kernel == "dance" else A
    out = sde.flow_step(
        kernel, x, v, s, s_next, noise_level=a, sigma_max=SIGMA_MAX, generator=torch.Generator().manual_seed(7),
        prior_mean=y, prior_std=S_PRIOR,
    )
    mean, std = _closed_form_prior(kernel, x, v, y, s, s_next, a, S_PRIOR)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    assert out.std.flatten() == pytest.approx([std] * SHAPE[0], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(out.next_latents.double(), mean + std * _eps(7), rtol=1e-5, atol=1e-5)
    if kernel == "cps":  # the reference's unnormalised form, in the prior's units
        expected = -(((out.next_latents.double() - mean) / S_PRIOR) ** 2).mean(dim=(1, 2, 3))
    else:
        expected = Normal(mean, std).log_prob(out.next_latents.double()).mean(dim=(1, 2, 3))  # [n]
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s", [0.9, 0.6, 0.25])
def test_score_with_a_shifted_prior(s):
    """-(x - y + (1-s) v) / (s s_max^2) == the posterior mean of the conditional score, with x0_hat = x - s v."""
    x, v = _data(4)
    y = _prior_mean()
    score = sde.score_estimate(x, v, s, prior_mean=y, prior_std=S_PRIOR).double()
    x, v, y = x.double(), v.double(), y.double()
    torch.testing.assert_close(score, -(x - (1 - s) * (x - s * v) - s * y) / (s * S_PRIOR) ** 2, rtol=1e-5, atol=1e-5)
    without_shift = sde.score_estimate(x, v, s, prior_std=S_PRIOR).double()  # the test can fail: y matters
    assert (without_shift - score).abs().max() > 1.0


@pytest.mark.parametrize("kernel", ["sde", "cps", "dance", "exact", "ode"])
def test_the_standard_prior_given_explicitly_changes_nothing(kernel):
    """prior_mean=None, prior_std=1 is the old code path, bit for bit; a zero prior mean takes the
    general path and agrees to rounding."""
    x, v = _data()
    kw = dict(noise_level=0.5, sigma_max=SIGMA_MAX)
    for s, s_next in STEPS:
        old = sde.flow_step(kernel, x, v, s, s_next, generator=torch.Generator().manual_seed(2), **kw)
        same = sde.flow_step(
            kernel, x, v, s, s_next, generator=torch.Generator().manual_seed(2), prior_mean=None, prior_std=1.0, **kw
        )
        for a, b in zip(old, same):
            assert torch.equal(a, b)
        zeros = torch.zeros(SHAPE)  # [n, *D]
        zero = sde.flow_step(kernel, x, v, s, s_next, next_latents=old.next_latents, prior_mean=zeros, **kw)
        torch.testing.assert_close(zero.mean, old.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(zero.log_prob, old.log_prob, rtol=1e-5, atol=1e-5)
    assert torch.equal(sde.score_estimate(x, v, 0.6, prior_std=1.0), sde.score_estimate(x, v, 0.6))


def test_the_ode_step_ignores_the_prior():
    x, v = _data()
    out = sde.flow_step("ode", x, v, 0.6, 0.25, prior_mean=_prior_mean(), prior_std=S_PRIOR)
    assert torch.equal(out.next_latents, sde.flow_step("ode", x, v, 0.6, 0.25).next_latents)


@pytest.mark.parametrize("kernel", ["sde", "cps", "dance", "exact"])
def test_rescoring_with_a_shifted_prior_reproduces_its_log_prob(kernel):
    x, v = _data()
    kw = dict(noise_level=0.5, sigma_max=SIGMA_MAX, prior_mean=_prior_mean(), prior_std=S_PRIOR)
    sampled = sde.flow_step(kernel, x, v, 0.6, 0.25, generator=torch.Generator().manual_seed(11), **kw)
    rescored = sde.flow_step(kernel, x, v, 0.6, 0.25, next_latents=sampled.next_latents, **kw)
    assert torch.equal(rescored.log_prob, sampled.log_prob)
    kw["prior_mean"] = kw["prior_mean"] + 0.1  # another y: another transition
    assert not torch.allclose(sde.flow_step(kernel, x, v, 0.6, 0.25, next_latents=sampled.next_latents, **kw).log_prob,
                              sampled.log_prob)


def test_equalizer_weights_do_not_depend_on_the_prior_std():
    s, s_next = torch.tensor(SIGMAS[:-1]), torch.tensor(SIGMAS[1:])  # [T], [T]
    for kernel in ("sde", "dance", "exact"):
        kw = dict(noise_level=A, sigma_max=SIGMA_MAX)
        shifted = sde.equalizer_weights(kernel, s, s_next, prior_std=S_PRIOR, **kw)  # [T]
        torch.testing.assert_close(shifted, sde.equalizer_weights(kernel, s, s_next, **kw))


def test_a_bad_prior_is_a_readable_error():
    x, v = _data()
    with pytest.raises(ValueError, match=r"prior_mean must have the latents' shape \[n, \*D\] = \(3, 4, 5, 6\)"):
        sde.flow_step("sde", x, v, 0.6, 0.25, generator=torch.Generator(), prior_mean=torch.zeros(1, 4, 5, 6))
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="prior_std .* must be a positive number"):
            sde.transition("dance", x, v, 0.6, 0.25, prior_std=bad)


# --------------------------------------------------------------------------- the SDE window plan (window.py)

from mmgrpo.pipelines.flow import window as win  # noqa: E402


def _plan(num_steps, window, mode="fixed", start=0, max_start=None, slide_every=25, step=0, seed=0,
          timestep_fraction=1.0, tail_steps=None):
    spec = win.WindowSpec(num_steps, window, mode, start, max_start, slide_every, timestep_fraction, tail_steps)
    return win.plan_window(spec, step, seed)


def test_fixed_window_and_no_window():
    assert _plan(5, 2, start=1) == ((1, 2), (1, 2), (0, 1, 2, 3, 4, 5))
    assert _plan(5, 2, start=1, step=7, seed=3) == _plan(5, 2, start=1)  # a fixed window never moves
    assert _plan(4, None) == ((0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3, 4))  # SDE everywhere
    assert win.ode_plan(3) == ((), (), (0, 1, 2, 3))  # evaluation


def test_splitmix64_matches_the_published_sequence():
    # SplitMix64 seeded with 0: its first three outputs (the reference generator's state advances by the gamma)
    gamma = 0x9E3779B97F4A7C15
    assert [win.splitmix64(k * gamma % 2**64) for k in range(3)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert win.window_seed(5, 9) == win.splitmix64(win.splitmix64(5) ^ 9)
    assert win.window_seed(-1, 0) == win.window_seed(2**64 - 1, 0)  # negative seeds: their 64-bit pattern


def test_random_window_start_is_a_function_of_step_and_seed():
    starts = lambda seed, **kw: [_plan(8, 2, "random", step=t, seed=seed, **kw).sde_steps[0] for t in range(400)]
    zero = starts(0)
    assert zero == starts(0)  # the same (step, seed): the same start, wherever it is computed
    assert zero[:10] == [3, 2, 1, 1, 3, 0, 3, 0, 3, 3]  # pinned: resumed and older runs keep their windows
    assert zero != starts(1) and starts(1) != starts(2)  # other seeds draw other starts
    assert all(zero.count(a) > 60 for a in range(4))  # about uniform over starts 0 .. 8 // 2 - 1 (100 each)
    assert set(zero) == {0, 1, 2, 3}
    assert set(starts(0, max_start=1)) == {0, 1}
    assert set(starts(0, max_start=10)) == {0, 1, 2, 3, 4, 5, 6}  # capped at num_steps - window
    assert all(_plan(8, 2, "random", step=t).sde_steps[1] == zero[t] + 1 for t in range(5))


def test_sliding_window_moves_every_slide_every_steps_and_wraps():
    starts = [_plan(4, 2, "sliding", slide_every=2, step=t, seed=9).sde_steps[0] for t in range(8)]
    assert starts == [0, 0, 1, 1, 2, 2, 0, 0]
    assert [_plan(6, 2, "sliding", start=1, max_start=2, slide_every=1, step=t).sde_steps[0] for t in range(4)] == [
        1, 2, 0, 1]


def test_timestep_fraction_trains_the_first_steps_only():
    assert _plan(10, None, timestep_fraction=0.99).trained == tuple(range(9))  # Flow-GRPO: 10 steps -> 9
    assert _plan(10, 3, start=7, timestep_fraction=0.9) == ((7, 8, 9), (7, 8), tuple(range(11)))
    assert _plan(3, None, timestep_fraction=0.1).trained == (0,)  # at least the first step


def test_tail_steps_thin_only_the_ode_tail_after_the_window():
    assert _plan(8, 2, start=1, tail_steps=2).stops == (0, 1, 2, 3, 6, 8)  # 3 -> 5.5 -> 8: 5.5 rounds to 6
    assert _plan(8, 2, start=1, tail_steps=1).stops == (0, 1, 2, 3, 8)
    assert _plan(8, 2, start=5, tail_steps=2).stops == tuple(range(9))  # a 1-step tail is not thinned
    assert _plan(8, None, tail_steps=2).stops == tuple(range(9))  # no tail without a window
    assert win.tail_stops(8, (), 2) == tuple(range(9))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="nope"), "window_mode"), (dict(window=0), "window must be"), (dict(window=5), "window must be"),
    (dict(slide_every=0), "slide_every"), (dict(start=3), "exceeds num_steps"), (dict(tail_steps=0), "tail_steps"),
    (dict(timestep_fraction=0.0), "timestep_fraction"), (dict(timestep_fraction=1.5), "timestep_fraction"),
    (dict(mode="random", window=1, max_start=3, timestep_fraction=0.25), "without a trained step"),
])
def test_window_options_no_rollout_can_follow_are_errors(kwargs, match):
    args = dict(num_steps=4, window=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        win.check_window(win.WindowSpec(**args))


def test_an_ode_kernel_needs_no_trained_step():
    spec = win.WindowSpec(num_steps=4, window=1, start=3, timestep_fraction=0.5)
    win.check_window(spec, trains=False)
    with pytest.raises(ValueError, match="without a trained step"):
        win.check_window(spec)
