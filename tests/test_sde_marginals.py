"""The flow kernels keep the ODE's marginals (sde.py's docstring, items 3-4), measured on Gaussian data.

Data x0 ~ N(m, C) (1-D, and 2-D with a full covariance) under a prior N(y, s_max^2 I): FlowMSE's
(y != 0, s_max = 0.487) and the standard N(0, I) of the image/video families. Then x_t =
(1-t) x0 + t (y + s_max z) is Gaussian with mean mu_t = (1-t) m + t y and covariance
Sigma_t = (1-t)^2 C + t^2 s_max^2 I, and the exact velocity is the Gaussian conditional mean

    v(x, t) = E[y + s_max z - x0 | x_t = x] = (y - m) + (t s_max^2 I - (1-t) C) Sigma_t^{-1} (x - mu_t).

Monte Carlo: N_ROWS independent chains (fixed seeds) from the prior over STEPS uniform steps must
end with the data's mean and covariance within 5 standard errors of the sample moments (a mean:
sqrt(C_ii / n); a covariance entry: sqrt((C_ii C_jj + C_ij^2) / n), Gaussian data). Every kernel is
affine-Gaussian here (x_next = A x + c + std eps), so the moments of the DISCRETE sampler also
propagate exactly (`exact_moments`): the chains must match them too, and they show the
discretisation bias on its own. At STEPS = 200 it is below 1.5 standard errors for "ode",
"sde", "dance" and "exact", so the 5-SE tolerance is Monte Carlo error. "cps" keeps no marginal:
its terminal variance is ~28 % low however fine the grid. Negative controls (the test can fail): a
score without the -y shift moves the mean ~60 SE (4000 rows); a kernel that forgets s_max inflates
the variance.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typing import Any, NamedTuple

import pytest
import torch

from mmgrpo.pipelines.flow import families, sde
from mmgrpo.pipelines.flow.adapter import FlowAdapter

S_MAX = 0.487  # FlowMSE's prior std
N_ROWS = 10_000
STEPS = 200
TOLERANCE_SE = 5.0
MARGINAL_KERNELS = ["ode", "sde", "dance", "exact"]


class Data(NamedTuple):
    mean: torch.Tensor  # [d] float64, m
    cov: torch.Tensor  # [d, d] float64, C
    prior_mean: torch.Tensor  # [d] float64, FlowMSE's y (the standard prior uses 0)


DATA = {
    "1d": Data(torch.tensor([0.8]), torch.tensor([[0.09]]), torch.tensor([-0.5])),
    "2d": Data(torch.tensor([0.5, -0.3]), torch.tensor([[0.09, 0.05], [0.05, 0.16]]), torch.tensor([-0.4, 0.6])),
}
DATA = {k: Data(*(t.double() for t in v)) for k, v in DATA.items()}
PRIORS = ["flowmse", "standard"]


def prior_of(data: Data, prior: str) -> tuple[torch.Tensor, float]:
    """(y [d] float64, s_max) of the named prior."""
    return (data.prior_mean, S_MAX) if prior == "flowmse" else (torch.zeros_like(data.mean), 1.0)


def velocity_gain(t: float, data: Data, s_max: float) -> torch.Tensor:
    """K(t) = (t s_max^2 I - (1-t) C) Sigma_t^{-1} [d, d] float64: v = (y - m) + K(t) (x - mu_t)."""
    eye = torch.eye(data.mean.shape[0], dtype=torch.float64)
    sigma_t = (1 - t) ** 2 * data.cov + t**2 * s_max**2 * eye  # [d, d]
    return torch.linalg.solve(sigma_t, t * s_max**2 * eye - (1 - t) * data.cov).T  # Sigma_t symmetric


def exact_velocity(x: torch.Tensor, t: float, y: torch.Tensor, data: Data, s_max: float) -> torch.Tensor:
    """v(x, t) [n, d] fp32 for latents x [n, d] and per-row prior means y [n, d] (coefficients in float64)."""
    m, gain = data.mean.float(), velocity_gain(t, data, s_max).float()  # [d], [d, d]
    mu_t = (1 - t) * m + t * y  # [n, d]
    return (y - m) + (x - mu_t) @ gain.T  # [n, d]


def grid(steps: int) -> list[float]:
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def run_chains(
    kernel: str, data: Data, prior: str, *, steps: int = STEPS, n: int = N_ROWS, seed: int = 0,
    kernel_prior_mean: bool = True, kernel_prior_std: float | None = None,
) -> torch.Tensor:
    """Terminal samples [n, d] float64 of n chains from the prior. kernel_prior_mean=False hands the
    kernel no y (its score then lacks the -y shift); kernel_prior_std overrides the s_max it gets."""
    y, s_max = prior_of(data, prior)
    g = torch.Generator().manual_seed(seed)
    rows = y.float().expand(n, -1)  # [n, d]
    x = rows + s_max * torch.randn(rows.shape, generator=g)  # [n, d] the prior sample
    sigmas = grid(steps)
    given_mean = rows if kernel_prior_mean and prior == "flowmse" else None
    given_std = s_max if kernel_prior_std is None else kernel_prior_std
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        v = exact_velocity(x, t, rows, data, s_max)  # [n, d]
        x = sde.flow_step(
            kernel, x, v, t, t_next, sigma_max=sigmas[1], generator=g, prior_mean=given_mean, prior_std=given_std
        ).next_latents  # [n, d]
    return x.double()


def exact_moments(kernel: str, data: Data, prior: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Terminal mean [d] and covariance [d, d] of the discrete sampler, propagated exactly: each step's
    mean is affine in x (read off sde.transition at 0 and the unit vectors) and its noise isotropic."""
    y, s_max = prior_of(data, prior)
    d = data.mean.shape[0]
    probe = torch.cat([torch.zeros(1, d), torch.eye(d)])  # [d+1, d]
    rows = y.float().expand(d + 1, -1)  # [d+1, d]
    mean, cov = y.clone(), s_max**2 * torch.eye(d, dtype=torch.float64)  # the prior's moments
    sigmas = grid(steps)
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        v = exact_velocity(probe, t, rows, data, s_max)  # [d+1, d]
        step_mean, std = sde.transition(
            kernel, probe, v, t, t_next, sigma_max=sigmas[1],
            prior_mean=rows if prior == "flowmse" else None, prior_std=s_max,
        )  # [d+1, d], [d+1, 1]
        step_mean = step_mean.double()
        offset, gain = step_mean[0], (step_mean[1:] - step_mean[0]).T  # [d], [d, d]: mean(x) = gain x + offset
        mean = gain @ mean + offset
        cov = gain @ cov @ gain.T + float(std[0]) ** 2 * torch.eye(d, dtype=torch.float64)
    return mean, cov


def standard_errors(data: Data, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard errors of the sample mean [d] and of the sample covariance entries [d, d] (Gaussian data)."""
    var = data.cov.diagonal()  # [d]
    return (var / n).sqrt(), ((var[:, None] * var[None, :] + data.cov**2) / n).sqrt()


def z_scores(mean: torch.Tensor, cov: torch.Tensor, data: Data, n: int = N_ROWS) -> tuple[float, float]:
    """The largest |error| / standard error of a mean [d] and of a covariance [d, d] against the data's."""
    se_mean, se_cov = standard_errors(data, n)
    return float(((mean - data.mean) / se_mean).abs().max()), float(((cov - data.cov) / se_cov).abs().max())


def sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])  # [d], [d, d]


# ----------------------------------------------------------------------------- the marginals


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("case", list(DATA))
@pytest.mark.parametrize("kernel", MARGINAL_KERNELS)
def test_every_kernel_reaches_the_data_distribution(kernel, case, prior):
    data = DATA[case]
    mean, cov = sample_moments(run_chains(kernel, data, prior, seed=MARGINAL_KERNELS.index(kernel)))
    z_mean, z_cov = z_scores(mean, cov, data)
    assert z_mean < TOLERANCE_SE and z_cov < TOLERANCE_SE, (z_mean, z_cov)
    # the chains also match the exact moments of the discrete sampler (its noise is drawn right)
    exact_mean, exact_cov = exact_moments(kernel, data, prior, STEPS)
    se_mean, se_cov = standard_errors(data, N_ROWS)
    assert ((mean - exact_mean) / se_mean).abs().max() < TOLERANCE_SE
    assert ((cov - exact_cov) / se_cov).abs().max() < TOLERANCE_SE
    # the tolerance is Monte Carlo error: the discretisation bias is small beside it
    bias_mean, bias_cov = z_scores(exact_mean, exact_cov, data)
    assert bias_mean < 0.01 and bias_cov < 1.5, (bias_mean, bias_cov)


@pytest.mark.parametrize("prior", PRIORS)
def test_the_discretisation_bias_vanishes_except_for_cps(prior):
    """Refining the grid 4x: the bias of "ode" and "dance" shrinks ~4x (Euler, first order), that of
    "exact" ~3x. "sde" stays within 1.5 % of the data covariance but converges slowly: its first step,
    at sigma = 1 with the sigma_max clamp, is a move of fixed size however fine the grid (x times
    1 - a^2/2 plus noise of std a s_max), which overshoots the prior variance by a^4/4, and the later
    steps contract that error only like ~N^-(a^2). "cps" keeps a ~28 % variance deficit."""
    data = DATA["2d"]

    def cov_error(kernel: str, steps: int) -> float:
        _, cov = exact_moments(kernel, data, prior, steps)
        return float((cov - data.cov).abs().max() / data.cov.abs().max())

    for kernel in ("ode", "dance", "exact"):
        assert cov_error(kernel, 200) < cov_error(kernel, 50) / 2.5, kernel
    assert all(cov_error("sde", steps) < 0.015 for steps in (50, 200))
    coarse, fine = cov_error("cps", 50), cov_error("cps", 200)
    assert fine > 0.15 and fine > 0.8 * coarse, (coarse, fine)  # ~10 % smaller on a 4x finer grid, not 4x


def test_cps_misses_the_variance_in_the_chains_too():
    data = DATA["1d"]
    mean, cov = sample_moments(run_chains("cps", data, "flowmse"))
    z_mean, z_cov = z_scores(mean, cov, data)
    assert z_mean < TOLERANCE_SE and z_cov > 3 * TOLERANCE_SE, (z_mean, z_cov)  # the mean is right, the spread is not


# ----------------------------------------------------------------------------- negative controls


@pytest.mark.parametrize("kernel", ["sde", "dance", "exact"])
def test_a_score_without_the_prior_shift_moves_the_mean(kernel):
    """The test can fail: the score -(x + (1-t) v) / (t s_max^2), without -y, puts the mean far out."""
    data = DATA["1d"]
    x = run_chains(kernel, data, "flowmse", n=4000, kernel_prior_mean=False)
    z_mean, _ = z_scores(*sample_moments(x), data, n=4000)
    assert z_mean > 4 * TOLERANCE_SE, z_mean


def test_a_kernel_without_the_prior_std_inflates_the_variance():
    """g and the score both forget s_max: the drift is unchanged but the noise is 1 / s_max too large."""
    data = DATA["1d"]
    x = run_chains("sde", data, "flowmse", n=4000, kernel_prior_std=1.0)
    _, z_cov = z_scores(*sample_moments(x), data, n=4000)
    assert z_cov > 4 * TOLERANCE_SE, z_cov


# ----------------------------------------------------------------------------- through the adapter


class GaussianFlow:
    """A 'pipeline' for the Gaussian family: the data, the prior std and the exact velocity model."""

    def __init__(self, data: Data, s_max: float) -> None:
        self.data, self.s_max = data, s_max
        self.velocity = ExactVelocity(data, s_max)


class ExactVelocity(torch.nn.Module):
    """v(x, t | y) of DATA under the prior N(y, s_max^2 I), times a trainable scale (1 here)."""

    def __init__(self, data: Data, s_max: float) -> None:
        super().__init__()
        self.data, self.s_max = data, s_max
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = torch.empty_like(x)  # [m, d]
        for value in t.unique().tolist():
            rows = t == value  # [m]
            v[rows] = exact_velocity(x[rows], value, y[rows], self.data, self.s_max)
        return self.scale * v  # [m, d]


class GaussianFamily(families.Family):
    """Prompts {"prompt": text, "y": [d] list}: each prompt's prior mean. Latents [n, d]."""

    def __init__(self, pipeline: GaussianFlow, options: Any) -> None:
        super().__init__(pipeline, options)
        self.flow = pipeline

    @property
    def model(self) -> torch.nn.Module:
        return self.flow.velocity

    def encode(self, prompts: list[Any], device: torch.device) -> families.Conditions:
        return {"y": torch.tensor([p["y"] for p in prompts], dtype=torch.float32, device=device)}  # [b, d]

    def init_latents(self, n, conditions, generator, device) -> torch.Tensor:
        y = conditions["y"]  # [n, d]
        return y + self.flow.s_max * torch.randn(y.shape, generator=generator, device=device)  # [n, d]

    def prior(self, conditions: families.Conditions) -> tuple[torch.Tensor | None, float]:
        return conditions["y"].float(), self.flow.s_max  # [n, d]

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return torch.linspace(1.0, 0.0, num_steps + 1)  # [T+1]

    def forward(self, model, x, sigma, conditions) -> torch.Tensor:
        return model(x, sigma, conditions["y"])  # [m, d]

    def decode(self, latents: torch.Tensor, conditions: families.Conditions | None = None) -> torch.Tensor:
        return latents  # [n, d]


@pytest.fixture
def gaussian_family(monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "gaussian-test", GaussianFamily)
    monkeypatch.setitem(families.PIPELINE_FAMILIES, "GaussianFlow", "gaussian-test")


def test_the_adapter_samples_and_rescores_with_each_rows_prior(gaussian_family):
    """FlowAdapter hands family.prior's rows to every step: two prompts with different y both reach
    the data distribution, and re-scoring reproduces the sampled log-probs (ratio 1)."""
    data = DATA["1d"]
    adapter = FlowAdapter(GaussianFlow(data, S_MAX), kernel="sde", num_steps=40, finetune="full")
    prompts = [{"prompt": "a", "y": [-0.5]}, {"prompt": "b", "y": [1.5]}]
    G = 2000
    rollout = adapter.sample(prompts, G, torch.Generator().manual_seed(0))
    samples = torch.stack(rollout.samples).double()  # [2G, 1]
    for k in range(2):
        z_mean, z_cov = z_scores(*sample_moments(samples[k * G : (k + 1) * G]), data, n=G)
        assert z_mean < TOLERANCE_SE and z_cov < TOLERANCE_SE, (k, z_mean, z_cov)
    torch.testing.assert_close(adapter.log_prob(rollout).log_probs, rollout.log_probs, rtol=0, atol=1e-5)


def test_the_adapter_passes_one_prior_row_per_prompt_before_shared_noise_splits(gaussian_family):
    """same_noise_in_group: the ODE steps before the window run one row per prompt, with that prompt's y."""
    data = DATA["1d"]
    adapter = FlowAdapter(
        GaussianFlow(data, S_MAX), kernel="sde", num_steps=6, window=2, window_start=3,
        same_noise_in_group=True, finetune="full",
    )
    prompts = [{"prompt": "a", "y": [-0.5]}, {"prompt": "b", "y": [1.5]}]
    rollout = adapter.sample(prompts, 4, torch.Generator().manual_seed(1))
    assert rollout.mask[:, 3:5].all() and not rollout.mask[:, :3].any()
    torch.testing.assert_close(adapter.log_prob(rollout).log_probs, rollout.log_probs, rtol=0, atol=1e-5)
