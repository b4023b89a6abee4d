"""All flow-matching log-prob math of mmgrpo, in one module of pure functions.

Notation (ANCHORS.md section 1): sigma s runs 1 (noise) -> 0 (clean), x = (1-s) x0 + s eps,
the model predicts the velocity v, x0_hat = x - s v, dt = s_next - s (negative), and
score = -(x - (1-s) x0_hat) / s^2 = -(x + (1-s) v) / s.

A kernel turns (x, v, s, s_next) into a Gaussian transition N(mean, std^2 I) for x_next:

- "sde"   Flow-GRPO. g = a sqrt(s / (1 - s_den)) with s_den = min(s, sigma_max):
          sigma_max is the schedule's sigmas[1], so at s = 1 the denominator uses sigmas[1]
          (exactly Flow-GRPO's rule on a decreasing schedule, and also safe for schedulers
          that start at 1 - 1e-6). mean = x (1 + g^2 dt / (2s)) + v (1 + g^2 (1-s) / (2s)) dt
          == x + (v - g^2 score / 2) dt, std = g sqrt(|dt|).  a = noise_level (0.7 SD3, 0.9 FLUX).
- "cps"   Flow-GRPO's coefficients-preserving sampler. std = s_next sin(a pi / 2),
          mean = x0_hat (1 - s_next) + x1_hat sqrt(s_next^2 - std^2) with x1_hat = x + (1-s) v.
          Its log-prob is NOT a normalised Gaussian density: log p = -mean((x_next - mean)^2),
          as in the reference. std is 0 at the last step (s_next = 0).
- "dance" DanceGRPO. std = eta sqrt(s - s_next), mean = x + v dt - eta^2 score dt / 2.
- "exact" SAGE-GRPO. std^2 = eta^2 * integral_{s_next}^{s} u / (1-u) du
          = eta^2 (ln((1 - s_next) / (1 - s)) - (s - s_next)), the exact integral of
          Flow-GRPO's g^2 over the step, mean = x + v dt + std^2 score / 2. As in SAGE-GRPO's
          released code, only sigma is clamped (to <= 1 - 3e-3, inside the log only):
          std^2 = eta^2 (ln((1 - s_next) / (1 - min(s, 1 - 3e-3))) - (s - s_next)) with the
          UNCLAMPED step s - s_next. (ANCHORS writes it as "-ds + ln(...)": ds = s - s_next > 0.)
          A step with no positive variance (it ends at or above ~1 - 3e-3) is a ValueError.
- "ode"   the deterministic Euler step x + v dt. Not a density: std = 0, and the log-prob
          returned is 0 for every row. Steps taken with it are never trained: the adapter
          marks them mask=False.

The shifted prior N(y, s_max^2 I) (FlowMSE speech enhancement, ANCHORS.md section 4). Every
function takes `prior_mean` y ([n, *D], None = 0) and `prior_std` s_max (default 1). With t = s,
the path is x_t = (1-t) x0 + t (y + s_max z) and the model learns v = E[y + s_max z - x0 | x_t].
1. x - x0 = t v, so x0_hat = E[x0 | x] = x - t v, and the predicted prior sample is
   x1_hat = x + (1-t) v = y + s_max z_hat: the predicted prior NOISE is z_hat = (x1_hat - y) / s_max.
2. x_t | x0 ~ N((1-t) x0 + t y, t^2 s_max^2 I), so the score is the posterior mean of the
   conditional one: grad log p_t(x) = -(x - (1-t) x0_hat - t y) / (t s_max)^2
   = -(x - y + (1-t) v) / (t s_max^2).
3. For ANY g(t) >= 0 the reverse-time SDE (dt < 0)
       dx = [v - g^2 score / 2] dt + g dW = [v + g^2 (x - y + (1-t) v) / (2 t s_max^2)] dt + g dW
   keeps the ODE's marginals: in the forward clock r = -t its Fokker-Planck equation is
   d_r p = -div((-v + g^2 score / 2) p) + (g^2 / 2) lap p, and lap p = div(p score) cancels the
   score term, leaving d_r p = div(v p): the continuity equation of dx/dt = v.
4. The coordinates x' = (x - y) / s_max, v' = v / s_max turn the path into the standard one
   (x'_t = (1-t) x0' + t z, x0' = (x0 - y) / s_max), so each kernel below is the standard kernel
   in them: mean = y + s_max mean'(x', v'), std = s_max std'. Written out (g0: g at s_max = 1):
   "sde"    g = a s_max sqrt(s / (1 - s_den)), mean = x + (v - g^2 score / 2) dt
            = y + (x - y)(1 + g0^2 dt / (2s)) + v (1 + g0^2 (1-s) / (2s)) dt, std = g sqrt(|dt|).
   "dance"  g = eta s_max: std = eta s_max sqrt(s - s_next), mean = x + v dt - g^2 score dt / 2.
   "exact"  std^2 = eta^2 s_max^2 (the same integral), mean = x + v dt + std^2 score / 2.
   "cps"    std = s_max s_next sin(a pi / 2), mean = (1 - s_next) x0_hat + s_next y
            + s_max sqrt(s_next^2 - (std / s_max)^2) z_hat: the step keeps the path's coefficients
            (1 - s_next) x0 + s_next (y + s_max z), mixing z_hat with fresh noise around y.
            log p = -mean(((x_next - mean) / s_max)^2), in the prior's units, so the clip ranges
            tuned on N(0, I) carry over.
   "ode"    x + v dt: the prior does not enter.
   With y = 0 and s_max = 1 these are the formulas above, computed exactly as before.
Which kernels keep the marginals: "sde", "dance" and "exact" discretise item 3 (g^2 = a^2 s_max^2
s / (1 - s) for "sde" and "exact", whose variance integrates g^2 over the step; g = eta s_max for
"dance"), so they keep the ODE's marginals as the steps shrink (Euler error O(dt)). For "sde" slowly:
its clamped first step from s = 1 has a fixed size on any grid (x' times 1 - a^2/2, plus noise of std a),
overshooting the prior variance by a^4/4, an error the later steps contract only like ~N^-(a^2).
"cps" does not: its fresh-noise share sin(a pi / 2) of each step does not shrink with the step, and it
keeps q(x_s | x0) only when x0_hat = x0 (a point mass); for spread data its marginals are off
(tests/test_sde_marginals.py: ~28 % low variance on Gaussian data, on any grid).

Log-probs are in fp32 and are the MEAN over all latent dimensions (C, H, W and F for
video; packed tokens x channels for FLUX), not the sum, as in Flow-GRPO: a ratio of means
stays near 1, which is why flow clip ranges are tiny (1e-4 images, 1e-3 video).
Per-row schedule scalars are computed in float64 and then cast to fp32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

KERNELS = ("sde", "cps", "dance", "exact", "ode")
# noise_level means a for "sde"/"cps" and eta for "dance"/"exact"; unused by "ode".
DEFAULT_NOISE_LEVEL = {"sde": 0.7, "cps": 0.7, "dance": 0.3, "exact": 0.7, "ode": 0.0}
EXACT_SIGMA_MAX = 1.0 - 3e-3  # "exact": sigma (not sigma_next, not the step) is clamped to this in the variance
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class FlowStep(NamedTuple):
    """One transition of a flow sampler."""

    next_latents: torch.Tensor  # [n, *D] x_next (the recorded one when re-scoring)
    log_prob: torch.Tensor  # [n] fp32, MEAN over the latent dims D
    mean: torch.Tensor  # [n, *D] fp32 mean of the transition
    std: torch.Tensor  # [n, 1, ..., 1] fp32 std of the transition (0 for "ode")


def check_kernel(kernel: str) -> str:
    """`kernel` if it is a known kernel name, else one readable ValueError."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown flow kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    return kernel


# ----------------------------------------------------------------------------- schedules


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 / DanceGRPO time shift s' = k s / (1 + (k-1) s)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)  # same shape as sigmas


def dance_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """DanceGRPO's schedule: linspace(1, 0, num_steps + 1), then shifted by k = `shift`."""
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)  # [N+1]
    return shift_sigmas(sigmas, shift).float()  # [N+1]


# ----------------------------------------------------------------------------- kernels


def _rows(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-row value as float64 [n, 1, ..., 1] on x's device."""
    t = torch.as_tensor(value, dtype=torch.float64, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"a per-row sigma must have shape [n={x.shape[0]}], got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.ndim - 1)))  # [n, 1, ..., 1]


def _prior_std(prior_std: float) -> float:
    s_max = float(prior_std)
    if not (math.isfinite(s_max) and s_max > 0):
        raise ValueError(f"prior_std (the prior's s_max) must be a positive number, got {prior_std!r}")
    return s_max


def _prior(prior_mean: torch.Tensor | None, prior_std: float, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """(y as fp32 [n, *D] on x's device or None, s_max), checked against the latents x [n, *D]."""
    s_max = _prior_std(prior_std)
    if prior_mean is None:
        return None, s_max
    if tuple(prior_mean.shape) != tuple(x.shape):
        raise ValueError(f"prior_mean must have the latents' shape [n, *D] = {tuple(x.shape)}, "
                         f"got {tuple(prior_mean.shape)}: one prior mean per row of x")
    return prior_mean.to(device=x.device, dtype=torch.float32), s_max


def exact_variance_integral(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """SAGE-GRPO's integral of u / (1-u) over a step: ln((1 - s_next) / (1 - min(s, 1 - 3e-3))) - (s - s_next).

    Only sigma is clamped; the step s - s_next is not (SAGE-GRPO's released code). Float64 in, same shape
    out. A step whose integral is not positive (it ends at or above ~1 - 3e-3: sigma_next >= sigma near
    1) has no Gaussian: one ValueError instead of a zero variance and a -inf log-prob.
    """
    clamped = sigma.clamp(max=EXACT_SIGMA_MAX)
    integral = torch.log1p(-sigma_next) - torch.log1p(-clamped) - (sigma - sigma_next)  # same shape
    bad = ~(integral > 0)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        s, s_next = float(sigma.flatten()[i]), float(sigma_next.flatten()[i])
        raise ValueError(
            f"the 'exact' kernel has no positive variance for the step sigma={s:g} -> sigma_next={s_next:g}: a step "
            f"must lower sigma and end below SAGE's clamp {EXACT_SIGMA_MAX:g} (from sigma = 1: sigma_next < ~0.99699); "
            "use a schedule whose second sigma is lower, or another kernel"
        )
    return integral


def score_estimate(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    *,
    prior_mean: torch.Tensor | None = None,
    prior_std: float = 1.0,
) -> torch.Tensor:
    """grad log p_s(x) from the velocity (fp32 [n, *D]): -(x - y + (1-s) v) / (s s_max^2); with the
    standard prior -(x - (1-s) x0_hat) / s^2 with x0_hat = x - s v, i.e. -(x + (1-s) v) / s."""
    y, s_max = _prior(prior_mean, prior_std, x)
    s = _rows(sigma, x).float()  # [n, 1, ...]
    x, v = x.float(), v.float()
    if y is None and s_max == 1.0:
        x0_hat = x - s * v  # [n, *D]
        return -(x - (1.0 - s) * x0_hat) / s**2  # [n, *D]
    centred = x if y is None else x - y  # [n, *D]
    return -(centred + (1.0 - s) * v) / (s * s_max**2)  # [n, *D]


def transition(
    kernel: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    noise_level: float | None = None,
    sigma_max: float | torch.Tensor | None = None,
    prior_mean: torch.Tensor | None = None,
    prior_std: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one step: (mean [n, *D] fp32, std [n, 1, ..., 1] fp32).

    sigma, sigma_next: scalars or per-row [n]. noise_level: a ("sde", "cps") or eta ("dance",
    "exact"); None takes DEFAULT_NOISE_LEVEL. sigma_max: "sde" only, the schedule's sigmas[1]
    as a scalar or per row [n] (required when some sigma is 1); not the prior's s_max.
    prior_mean [n, *D] (None = 0) and prior_std: the prior N(y, s_max^2 I) the sampler started from.
    """
    check_kernel(kernel)
    y, s_max = _prior(prior_mean, prior_std, x)
    if kernel == "ode" or (y is None and s_max == 1.0):
        return _unit_transition(kernel, x, v, sigma, sigma_next, noise_level, sigma_max)
    # item 4 of the module docstring: the standard kernel in the prior's coordinates
    centred = x.float() if y is None else x.float() - y  # [n, *D] x - y
    mean, std = _unit_transition(kernel, centred / s_max, v.float() / s_max, sigma, sigma_next, noise_level, sigma_max)
    mean = mean * s_max  # [n, *D]
    return (mean if y is None else mean + y), std * s_max


def _unit_transition(
    kernel: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float | None,
    sigma_max: float | torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transition() for the standard prior N(0, I)."""
    a = DEFAULT_NOISE_LEVEL[kernel] if noise_level is None else float(noise_level)
    s = _rows(sigma, x)  # [n, 1, ...] float64
    s_next = _rows(sigma_next, x)  # [n, 1, ...] float64
    dt = s_next - s  # [n, 1, ...] negative
    x, v = x.float(), v.float()  # [n, *D]

    if kernel == "ode":
        mean = x + v * dt.float()  # [n, *D]
        return mean, torch.zeros_like(dt, dtype=torch.float32)

    if kernel == "sde":
        if sigma_max is None:
            if bool((s >= 1).any()):
                raise ValueError("the 'sde' kernel at sigma = 1 needs sigma_max (the schedule's sigmas[1])")
            s_den = s
        else:
            s_den = torch.minimum(s, _rows(sigma_max, x))  # [n, 1, ...]
        g2 = a**2 * s / (1.0 - s_den)  # [n, 1, ...] g^2
        x_coef = (1.0 + g2 * dt / (2.0 * s)).float()  # [n, 1, ...]
        v_coef = ((1.0 + g2 * (1.0 - s) / (2.0 * s)) * dt).float()  # [n, 1, ...]
        mean = x * x_coef + v * v_coef  # [n, *D]
        return mean, (g2 * (-dt)).sqrt().float()

    if kernel == "cps":
        std = s_next * math.sin(a * math.pi / 2.0)  # [n, 1, ...]
        sf, s_next_f = s.float(), s_next.float()
        x0_hat = x - sf * v  # [n, *D]
        x1_hat = x + (1.0 - sf) * v  # [n, *D]
        mean = x0_hat * (1.0 - s_next_f) + x1_hat * (s_next**2 - std**2).clamp_min(0).sqrt().float()  # [n, *D]
        return mean, std.float()

    if kernel == "dance":
        var = a**2 * (s - s_next)  # [n, 1, ...] eta^2 |dt|
    else:  # "exact"
        var = a**2 * exact_variance_integral(s, s_next)  # [n, 1, ...]
    # mean = x + v dt + var * score / 2 with score = -(x + (1-s) v) / s, as affine coefficients
    x_coef = (1.0 - var / (2.0 * s)).float()  # [n, 1, ...]
    v_coef = (dt - var * (1.0 - s) / (2.0 * s)).float()  # [n, 1, ...]
    mean = x * x_coef + v * v_coef  # [n, *D]
    return mean, var.sqrt().float()


def log_prob(
    kernel: str, next_latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, prior_std: float = 1.0
) -> torch.Tensor:
    """Per-row log-prob of `next_latents` under the step's Gaussian: [n] fp32, MEAN over dims.

    "ode": zeros (no density). "cps": -mean(((x_next - mean) / prior_std)^2), the reference's
    unnormalised form in the prior's units. Otherwise mean over dims of
    -(x_next - mean)^2 / (2 std^2) - log std - log sqrt(2 pi).
    """
    check_kernel(kernel)
    s_max = _prior_std(prior_std)
    diff = next_latents.float() - mean  # [n, *D]
    dims = tuple(range(1, diff.ndim))
    if kernel == "ode":
        return torch.zeros(diff.shape[0], dtype=torch.float32, device=diff.device)  # [n]
    if kernel == "cps":
        if s_max != 1.0:
            diff = diff / s_max  # [n, *D] in the prior's units
        return -(diff**2).mean(dim=dims)  # [n]
    elementwise = -(diff**2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI  # [n, *D]
    return elementwise.mean(dim=dims)  # [n]


def flow_step(
    kernel: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    noise_level: float | None = None,
    sigma_max: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    next_latents: torch.Tensor | None = None,
    prior_mean: torch.Tensor | None = None,
    prior_std: float = 1.0,
) -> FlowStep:
    """One sampler step with its log-prob.

    x [n, *D] latents at sigma, v [n, *D] velocity. Give `generator` to draw x_next =
    mean + std * eps with fresh noise eps ~ N(0, I) (drawn on the generator's device, fp32),
    or `next_latents` [n, *D] to re-score a recorded transition. "ode" draws no noise.
    prior_mean y [n, *D] (None = 0) and prior_std s_max: the prior N(y, s_max^2 I) (module docstring).
    Returns FlowStep(next_latents, log_prob [n] fp32 mean over dims, mean, std).
    """
    mean, std = transition(
        kernel, x, v, sigma, sigma_next, noise_level=noise_level, sigma_max=sigma_max,
        prior_mean=prior_mean, prior_std=prior_std,
    )
    if next_latents is None:
        if kernel == "ode":
            next_latents = mean
        else:
            if generator is None:
                raise ValueError("flow_step needs a torch.Generator to sample, or next_latents to re-score")
            eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
            next_latents = mean + std * eps.to(mean.device)  # [n, *D]
    return FlowStep(next_latents, log_prob(kernel, next_latents, mean, std, prior_std=prior_std), mean, std)


def equalizer_weights(
    kernel: str,
    sigmas: torch.Tensor,
    sigmas_next: torch.Tensor,
    *,
    noise_level: float | None = None,
    sigma_max: float | None = None,
    prior_std: float = 1.0,
) -> torch.Tensor:
    """SAGE's per-step gradient-norm equalizer: w_i = median_j(c_j / std_j) / (c_i / std_i).

    c_i = |d mean / d v| of step i (the mean is affine in v with a scalar coefficient), for
    steps with sigmas [T] -> sigmas_next [T]. Multiply step i's loss by w_i. Gaussian kernels only.
    prior_std s_max scales every std and no c_i (item 4 of the module docstring), so the weights
    do not depend on it (nor on the prior mean, which shifts the mean only).
    """
    if kernel in ("ode", "cps"):
        raise ValueError(f"equalizer_weights needs a Gaussian kernel with std > 0, not {kernel!r}")
    probe = torch.zeros(sigmas.shape[0], 1, dtype=torch.float32, device=sigmas.device)  # [T, 1]
    kw = dict(noise_level=noise_level, sigma_max=sigma_max, prior_std=prior_std)
    m1, std = transition(kernel, probe, probe + 1.0, sigmas, sigmas_next, **kw)  # [T, 1]
    m0, _ = transition(kernel, probe, probe, sigmas, sigmas_next, **kw)  # [T, 1]
    gain = ((m1 - m0).abs() / std).squeeze(1)  # [T]
    return gain.median() / gain  # [T]
