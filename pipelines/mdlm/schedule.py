"""Co-GRPO: the sampler's schedule (each step's temperature and unmask fraction) as a learnable stochastic policy.

Co-GRPO (Zhou et al. 2025) casts masked-diffusion generation as one MDP whose actions are the tokens AND the
inference schedule (sampling temperature, re-mask ratio per step), and trains both with one trajectory-level,
group-relative reward, without backpropagating through the rollout. Here, for every row and every step
("slot") s of the sampler's plan:

    log temperature_s  ~ N(m_s, std^2)         temperature = exp(draw): log-normal around exp(m_s)
    logit fraction_s   ~ N(f_s, std^2)         fraction = sigmoid(draw): logit-normal around sigmoid(f_s)
    the slot commits max(1, round(fraction * masked tokens left in the block)); a block's last slot commits all

The draws are recorded at sampling; their log-density under the current means is one more decision step of
the row (one column per slot: the temperature term, plus the fraction term where the fraction decides
something), so the core's clipped loss trains the means like any other step. The density is the Gaussian's of
the underlying draw (the Jacobian of exp / sigmoid does not depend on the parameters: ratios are the same).
A column counts (mask) only where the row still had masked tokens in that slot's block.

The means start at the plain sampler's schedule: the configured temperature, and the fraction c_s / left_s
that commits exactly `block_schedule`'s count c_s, so a draw at the mean reproduces the plain sampler. They are
stored as shifts `scale * theta` from that start, theta initialised to 0: AdamW moves each parameter by about
lr per step whatever the gradient's size, so `scale` sets how fast the schedule moves against the model's
weights under one learning rate. A gradient hook divides theta's gradient by `scale`, so it reads in the
means' units and global gradient-norm clipping sees it at its natural size, not `scale` times larger.
The reference policy (KL) is the starting schedule.

What was taken from Co-GRPO (its abstract and project page; the method section could not be read here): the
schedule actions (sampling temperature and re-mask ratio per step), one shared trajectory-level reward, GRPO
over the joint MDP without backpropagation through the rollout. Their exact distribution over schedules, and
how they explore and alternate the two updates, are not reproduced: the choices here are a fixed std (not
learned), the model and the schedule updated together in every step by one optimizer, each row drawing its
own schedule, and text MDMs (the paper's are image MDMs).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["LearnedSchedule", "StepPlan", "gaussian_log_prob", "initial_fractions", "last_in_block"]


@dataclass
class StepPlan:
    """What `sampler.denoise` follows instead of the fixed schedule: per row and slot of `block_schedule`."""

    temperature: float | torch.Tensor  # [n, S] (> 0), or one value for all (0: greedy)
    fraction: torch.Tensor  # [n, S] in [0, 1]: share of the block's still-masked tokens the slot commits


def last_in_block(plan: list[list[int]]) -> torch.Tensor:
    """[S] bool: the slots that end a block (they commit whatever is left: their fraction decides nothing)."""
    return torch.tensor([i == len(counts) - 1 for counts in plan for i in range(len(counts))])


def initial_fractions(plan: list[list[int]]) -> torch.Tensor:
    """[S]: the fraction of the block's masked tokens left that makes each slot commit its planned count.

    >>> initial_fractions([[2, 1, 1]]).tolist()
    [0.5, 0.5, 1.0]
    """
    out = []
    for counts in plan:
        left = sum(counts)
        for count in counts:
            out.append(count / left if left else 1.0)
            left -= count
    return torch.tensor(out, dtype=torch.float64)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std^2), elementwise."""
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


class LearnedSchedule(torch.nn.Module):
    """Per-slot means of the log-temperature and the fraction's logit (see the module docstring)."""

    def __init__(self, plan: list[list[int]], temperature: float, std: float = 0.3, scale: float = 100.0) -> None:
        super().__init__()
        if temperature <= 0 or std <= 0 or scale <= 0:
            raise ValueError(f"a learned schedule needs temperature, std and scale > 0, got {temperature}, {std}, "
                             f"{scale}")  # fmt: skip
        slots = sum(len(c) for c in plan)
        self.std, self.scale, self.use_reference = std, scale, False
        fraction = initial_fractions(plan).clamp(0.02, 0.98)  # a block's last slot is 1: its logit decides nothing
        self.register_buffer("start_log_temperature", torch.full((slots,), math.log(temperature)))
        self.register_buffer("start_fraction_logit", torch.logit(fraction).float())
        self.register_buffer("free", ~last_in_block(plan))  # [S] slots whose fraction matters
        self.log_temperature = torch.nn.Parameter(torch.zeros(slots))  # theta: shifts / scale
        self.fraction_logit = torch.nn.Parameter(torch.zeros(slots))
        for theta in (self.log_temperature, self.fraction_logit):
            theta.register_hook(lambda grad: grad / self.scale)  # d loss / d mean (see the module docstring)

    @property
    def slots(self) -> int:
        return self.free.numel()

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([S] log-temperature means, [S] fraction-logit means); the starting schedule inside reference()."""
        if self.use_reference:
            return self.start_log_temperature, self.start_fraction_logit
        return (self.start_log_temperature + self.scale * self.log_temperature,
                self.start_fraction_logit + self.scale * self.fraction_logit)  # fmt: skip

    @torch.no_grad()
    def draw(self, rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's draws ([rows, S] log-temperature, [rows, S] fraction logit) through the run's generator."""
        eps = torch.randn((2, rows, self.slots), generator=generator, device=generator.device).to(self.free.device)
        log_t, logit_f = self.means()
        return log_t + self.std * eps[0], logit_f + self.std * eps[1]  # [rows, S] each

    def plan(self, log_temperature: torch.Tensor, fraction_logit: torch.Tensor) -> StepPlan:
        """The sampler's plan for draws [n, S] (a block's last slot shown as fraction 1: it commits what is left)."""
        return StepPlan(log_temperature.exp(), torch.where(self.free, torch.sigmoid(fraction_logit), 1.0))

    @torch.no_grad()
    def median_plan(self, rows: int, temperature: float | None = None) -> StepPlan:
        """The plan at the means (evaluation); `temperature` overrides every slot's (0: greedy)."""
        log_t, logit_f = (m.expand(rows, -1) for m in self.means())
        plan = self.plan(log_t, logit_f)
        return plan if temperature is None else StepPlan(float(temperature), plan.fraction)

    def log_prob(self, log_temperature: torch.Tensor, fraction_logit: torch.Tensor, active: torch.Tensor,
                 slots: list[int]) -> torch.Tensor:  # fmt: skip
        """Log-density of the draws of `slots` under the current means: [n, S] x2, [n, S] bool -> [n, len(slots)]."""
        log_t, logit_f = self.means()
        index = torch.tensor(slots, dtype=torch.long, device=log_t.device)
        draws_t = log_temperature.to(log_t.device)[:, index]  # [n, k]
        draws_f = fraction_logit.to(log_t.device)[:, index]  # [n, k]
        on = active.to(log_t.device)[:, index]  # [n, k]
        temperature_term = gaussian_log_prob(draws_t, log_t[index], self.std)
        fraction_term = gaussian_log_prob(draws_f, logit_f[index], self.std) * self.free[index]
        return (temperature_term + fraction_term) * on

    @contextmanager
    def reference(self) -> Iterator["LearnedSchedule"]:
        """Inside, the means are the starting schedule (the reference policy); the parameters are untouched."""
        self.use_reference = True
        try:
            yield self
        finally:
            self.use_reference = False
