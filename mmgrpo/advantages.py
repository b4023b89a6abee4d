"""Group-relative advantage estimators: pure functions over rewards and group ids.

Inputs everywhere: rewards [N, K] (N = B*G rows, K reward components, NaN = could not score;
compute_advantages works in float64), group_id [N] long, weights [K]. A row with no valid
reward of non-zero weight is *invalid*: it is left out of every statistic and gets advantage 0.
Standard deviations are the unbiased (Bessel-corrected) sample std, as torch.std and TRL use;
a group with fewer than two valid rows has std 0.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

Estimator = Literal["grpo", "median", "rank", "ngrpo"]
Scale = Literal["group", "batch", "none"]
Combine = Literal["sum_then_normalize", "normalize_then_sum"]


class Advantages(NamedTuple):
    advantages: torch.Tensor  # [N] fp32, 0 where invalid or excluded
    keep: torch.Tensor  # [N] bool: rows that take part in the loss (MC-GRPO pivots do not)
    valid: torch.Tensor  # [N] bool: rows with at least one valid reward
    zero_std: torch.Tensor  # [num_groups] bool: groups whose valid rewards all agree


# ---------------------------------------------------------------- NaN-aware group statistics


def _group_index(group_id: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense 0..num_groups-1 index per row, in order of first appearance."""
    _, inverse = torch.unique(group_id, sorted=True, return_inverse=True)  # [N]
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def group_mean_std(x: torch.Tensor, group_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row mean and unbiased std of its group's non-NaN values, and the group's valid count.

    x: [N]; returns mean [N], std [N], count [N] (rows of an all-NaN group get mean 0, std 0).
    """
    idx, num_groups = _group_index(group_id)  # [N]
    valid = ~torch.isnan(x)  # [N]
    xv = torch.where(valid, x, torch.zeros_like(x))  # [N]
    count = torch.zeros(num_groups, dtype=x.dtype).index_add_(0, idx, valid.to(x.dtype))  # [Gs]
    total = torch.zeros(num_groups, dtype=x.dtype).index_add_(0, idx, xv)  # [Gs]
    mean = total / count.clamp(min=1)  # [Gs]
    sq = torch.where(valid, (x - mean[idx]) ** 2, torch.zeros_like(x))  # [N]
    ss = torch.zeros(num_groups, dtype=x.dtype).index_add_(0, idx, sq)  # [Gs]
    std = torch.where(count > 1, (ss / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(ss))  # [Gs]
    return mean[idx], std[idx], count[idx]


def _nan_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the non-NaN entries of x (0 with fewer than two)."""
    v = x[~torch.isnan(x)]
    return v.std() if v.numel() > 1 else torch.zeros((), dtype=x.dtype)


def zero_std_groups(x: torch.Tensor, group_id: torch.Tensor) -> torch.Tensor:
    """[num_groups] bool: groups whose valid values all agree (or have fewer than two)."""
    idx, num_groups = _group_index(group_id)
    _, std, _ = group_mean_std(x, group_id)
    out = torch.zeros(num_groups, dtype=torch.bool)
    out[idx] = std == 0
    return out


# ---------------------------------------------------------------- combining reward components


def weighted_sum(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of the valid weighted components per row; NaN where no weighted component is valid.

    A weight-0 component ("logged only") never makes a row scored: a row that only it could
    score is unscored, not a row with reward 0. rewards: [N, K], weights: [K] -> [N]
    """
    weights = weights.to(rewards)
    valid = weighted_valid(rewards, weights)  # [N, K]
    total = torch.where(valid, rewards * weights, torch.zeros_like(rewards)).sum(-1)  # [N]
    return torch.where(valid.any(-1), total, torch.full_like(total, math.nan))


def weighted_valid(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, K] bool: component k of row n was scored and carries weight."""
    return ~torch.isnan(rewards) & (weights.to(rewards) != 0)


# ---------------------------------------------------------------- estimators on one score per row


def normalized(x: torch.Tensor, group_id: torch.Tensor, scale: Scale = "group", eps: float = 1e-4) -> torch.Tensor:
    """(x - group mean) / (std + eps): std of the group (GRPO), of the batch, or none (Dr.GRPO).

    x: [N] (NaN = invalid) -> [N], NaN rows map to 0.
    """
    mean, std, _ = group_mean_std(x, group_id)  # [N]
    centred = x - mean  # [N]
    if scale == "group":
        out = centred / (std + eps)
    elif scale == "batch":
        out = centred / (_nan_std(x) + eps)
    elif scale == "none":
        out = centred
    else:
        raise ValueError(f"unknown advantage scale {scale!r}: use 'group', 'batch' or 'none'")
    return torch.nan_to_num(out, nan=0.0)


def median_baseline(
    x: torch.Tensor, group_id: torch.Tensor, scale: Scale = "none", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """MC-GRPO: baseline = group median; the median (pivot) row gets 0 and is excluded.

    With an even number of valid rows the lower median is the pivot (torch.median).
    Returns advantages [N] and keep [N] (False for each group's pivot row).
    x: [N] -> ([N], [N] bool)
    """
    idx, num_groups = _group_index(group_id)
    adv = torch.zeros_like(x)  # [N]
    keep = torch.ones_like(x, dtype=torch.bool)  # [N]
    _, std, _ = group_mean_std(x, group_id)  # [N]
    batch_std = _nan_std(x)
    for g in range(num_groups):
        rows = torch.nonzero((idx == g) & ~torch.isnan(x)).squeeze(-1)  # [n_g]
        if rows.numel() == 0:
            continue
        median, pos = x[rows].median(dim=0)
        pivot = rows[pos]
        centred = x[rows] - median
        if scale == "group":
            centred = centred / (std[rows] + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        elif scale != "none":
            raise ValueError(f"unknown advantage scale {scale!r}: use 'group', 'batch' or 'none'")
        adv[rows] = centred
        adv[pivot] = 0.0
        keep[pivot] = False
    return adv, keep


def rank_to_normal(x: torch.Tensor, group_id: torch.Tensor) -> torch.Tensor:
    """G2RPO: within each group, map ranks to standard-normal quantiles Phi^-1((rank + 0.5) / n).

    Ties share the mean of their quantiles, so equal rewards get equal advantages and an
    all-equal group gets 0. x: [N] -> [N] (NaN rows -> 0).
    """
    idx, num_groups = _group_index(group_id)
    normal = torch.distributions.Normal(0.0, 1.0)
    adv = torch.zeros_like(x)
    for g in range(num_groups):
        rows = torch.nonzero((idx == g) & ~torch.isnan(x)).squeeze(-1)  # [n_g]
        n = rows.numel()
        if n < 2:
            continue
        values = x[rows].double()
        order = values.argsort(stable=True)
        quantiles = normal.icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n)  # [n_g]
        q = torch.empty(n, dtype=torch.float64)
        q[order] = quantiles
        # average the quantiles of tied values
        uniq, inverse = torch.unique(values, return_inverse=True)
        tied = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, q)
        tied = tied / torch.bincount(inverse, minlength=len(uniq)).double()
        adv[rows] = tied[inverse].to(x.dtype)
    return adv


def ngrpo_calibrated(x: torch.Tensor, group_id: torch.Tensor, max_reward: float, eps: float = 1e-4) -> torch.Tensor:
    """NGRPO: group statistics include one virtual sample with the maximum reward.

    A homogeneously wrong group (all below max_reward) then gets negative, non-zero advantages.
    x: [N] -> [N] (NaN rows -> 0).
    """
    idx, num_groups = _group_index(group_id)
    adv = torch.zeros_like(x)
    for g in range(num_groups):
        rows = torch.nonzero((idx == g) & ~torch.isnan(x)).squeeze(-1)
        if rows.numel() == 0:
            continue
        augmented = torch.cat([x[rows], x.new_tensor([max_reward])])  # [n_g + 1]
        adv[rows] = (x[rows] - augmented.mean()) / (augmented.std() + eps)
    return adv


def decoupled_normalized(
    rewards: torch.Tensor, group_id: torch.Tensor, weights: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """GDPO: normalise each component within its group, weighted sum, then normalise over the batch.

    A NaN component contributes 0 to its row's sum; rows with no valid component are left out
    of the batch statistics and get 0. rewards: [N, K], weights: [K] -> [N]
    """
    per_component = torch.stack(
        [normalized(rewards[:, k], group_id, "group", eps) for k in range(rewards.shape[1])], dim=-1
    )  # [N, K]
    valid = weighted_valid(rewards, weights).any(-1)  # [N]
    summed = (per_component * weights).sum(-1)  # [N]
    summed = torch.where(valid, summed, torch.full_like(summed, math.nan))
    v = summed[valid]
    mean = v.mean() if v.numel() else summed.new_zeros(())
    out = (summed - mean) / (_nan_std(summed) + eps)
    return torch.nan_to_num(out, nan=0.0)


# ---------------------------------------------------------------- the dispatcher the trainer calls


def compute_advantages(
    rewards: torch.Tensor,
    group_id: torch.Tensor,
    weights: torch.Tensor,
    *,
    estimator: Estimator = "grpo",
    scale: Scale = "group",
    combine: Combine = "sum_then_normalize",
    eps: float = 1e-4,
    clip: float | None = None,
    max_reward: float | None = None,
) -> Advantages:
    """Advantages [N] from rewards [N, K] with the chosen estimator.

    combine: "sum_then_normalize" sums the weighted components then applies the estimator;
    "normalize_then_sum" is GDPO's decoupled normalisation (estimator must be "grpo").
    clip: if set, advantages are clamped to [-clip, clip] (Flow-GRPO uses 5).
    """
    rewards = rewards.double()  # float64 statistics: scores like 1e30 must not overflow to inf
    weights = weights.to(rewards)
    total = weighted_sum(rewards, weights)  # [N]
    valid = ~torch.isnan(total)  # [N] scored by at least one weighted reward
    keep = valid.clone()
    if combine == "normalize_then_sum":
        if estimator != "grpo":
            raise ValueError("combine='normalize_then_sum' (GDPO) works with estimator='grpo' only")
        adv = decoupled_normalized(rewards, group_id, weights, eps)
    elif combine != "sum_then_normalize":
        raise ValueError(f"unknown combine {combine!r}: use 'sum_then_normalize' or 'normalize_then_sum'")
    elif estimator == "grpo":
        adv = normalized(total, group_id, scale, eps)
    elif estimator == "median":
        adv, not_pivot = median_baseline(total, group_id, scale, eps)
        keep &= not_pivot
    elif estimator == "rank":
        adv = rank_to_normal(total, group_id)
    elif estimator == "ngrpo":
        if max_reward is None:
            raise ValueError("estimator='ngrpo' needs advantage.max_reward (the best reward a sample can get)")
        adv = ngrpo_calibrated(total, group_id, max_reward, eps)
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}: use grpo, median, rank or ngrpo")
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    adv = torch.where(valid, adv, torch.zeros_like(adv)).float()  # [N]
    return Advantages(adv, keep, valid, zero_std_groups(total, group_id))
