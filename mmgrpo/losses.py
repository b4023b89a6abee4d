"""Clipped policy-gradient losses, KL penalties and loss aggregation: pure tensor functions.

n rows, S decision steps in the chunk being scored. Per-step losses are combined with
precomputed per-step weights (`aggregation_weights`), so the loss of an optimizer step is
sum(weights * per_step_loss) over every micro-batch and chunk of steps: linear, hence the
same value and gradient whatever the micro-batch size or chunking (bnpo excepted: its
definition normalises per micro-batch).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

RatioLevel = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
KLConvention = Literal["exact", "flow_grpo"]


class PolicyTerms(NamedTuple):
    loss: torch.Tensor  # [n, S] per-step clipped surrogate loss
    ratio: torch.Tensor  # [n, S] importance ratio used (the sequence ratio broadcast for GSPO)
    clipped: torch.Tensor  # [n, S] bool: steps where clipping removed the gradient


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    level: RatioLevel = "token",
) -> PolicyTerms:
    """l = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A).

    level="token": r_t = exp(logp_t - old_t) per step.
    level="sequence" (GSPO): r = exp(masked mean over the row's steps of (logp - old)), one per
    row, broadcast to its steps; the caller must pass ALL steps of each row.
    log_probs, old_log_probs, mask: [n, S]; advantages: [n].
    """
    log_ratio = log_probs - old_log_probs.detach()  # [n, S]
    if level == "sequence":
        m = mask.to(log_ratio.dtype)
        seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # [n, 1]
        log_ratio = seq.expand_as(log_probs)  # [n, S]
    elif level != "token":
        raise ValueError(f"unknown ratio level {level!r}: use 'token' or 'sequence'")
    ratio = torch.exp(log_ratio)  # [n, S]
    adv = advantages.unsqueeze(-1).to(ratio.dtype)  # [n, 1]
    unclipped = ratio * adv  # [n, S]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv  # [n, S]
    loss = -torch.min(unclipped, clipped)  # [n, S]
    was_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))  # [n, S]
    return PolicyTerms(loss, ratio.detach(), was_clipped)


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-step estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3).

    With d = ref - logp: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased, always >= 0).
    log_probs, ref_log_probs: [n, S] -> [n, S]
    """
    d = ref_log_probs.detach() - log_probs  # [n, S]
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2 or k3")


def gaussian_kl(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    *,
    convention: KLConvention = "exact",
    step_size: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form KL between the policy's and the reference's Gaussian steps (same std), MEAN over latent dims.

    convention="exact": the exact per-step KL, KL(N(mu, s^2) || N(mu_ref, s^2)) = (mu - mu_ref)^2 / (2 s^2)
      per dim, with s the std of the step's transition. For an SDE step s^2 = g^2 |dt|, so this is
      (mu - mu_ref)^2 / (2 g^2 |dt|): FlowSE-GRPO's ||mu - mu_ref||^2 / (2 sigma^2 dt).
    convention="flow_grpo": Flow-GRPO's released code, (mu - mu_ref)^2 / (2 g^2), dividing by g^2 alone;
      that is the exact KL times |dt| (`step_size`, |sigma_next - sigma| of each step), so 1/|dt| times
      smaller (25x at the first step of a 10-step schedule). Flow-GRPO's beta values assume this scale.
    Averaged over dims as Flow-GRPO does (matching its mean-over-dims log-probs).
    mean, ref_mean: [n, S, *D]; std broadcastable to mean; step_size broadcastable to [n, S] -> [n, S]
    """
    per_dim = (mean.float() - ref_mean.detach().float()) ** 2 / (2 * std.float() ** 2)  # [n, S, *D]
    exact = per_dim.flatten(2).mean(-1)  # [n, S]
    if convention == "exact":
        return exact
    if convention == "flow_grpo":
        if step_size is None:
            raise ValueError("gaussian_kl(convention='flow_grpo') needs step_size, the |dt| of each step")
        return exact * step_size.float().to(exact.device)  # [n, S]
    raise ValueError(f"unknown KL convention {convention!r}: use 'exact' or 'flow_grpo'")


def aggregation_weights(
    mask: torch.Tensor,
    mode: Aggregation,
    *,
    micro_batch: torch.Tensor,
    num_rows_global: int,
    num_steps_global: float,
    world_size: int = 1,
) -> torch.Tensor:
    """Weight of every (row, step) in this rank's loss for one optimizer step.

    mask: [N, T] (the rows this rank trains on this optimizer step, all steps); micro_batch: [N]
    long, the micro-batch each row falls in (bnpo only). Gradients are averaged over ranks, so
    a rank's loss is scaled by world_size wherever the normaliser is global. With m the mask:
      grpo    = mean over rows of (sum_t m*l / sum_t m)
      bnpo    = per micro-batch sum m*l / sum m, averaged over micro-batches (and ranks)
      dr_grpo = sum m*l / (rows * T)            (T = the rollout's step budget)
      dapo    = sum m*l / (active steps of the whole optimizer step, all ranks)
    Returns w [N, T] with loss = sum(w * l).
    """
    m = mask.float()  # [N, T]
    if mode == "grpo":
        per_row = m.sum(-1, keepdim=True).clamp(min=1)  # [N, 1]
        return m / per_row * (world_size / num_rows_global)
    if mode == "bnpo":
        num_mb = int(micro_batch.max().item()) + 1 if micro_batch.numel() else 1
        mb_steps = torch.zeros(num_mb).index_add_(0, micro_batch, m.sum(-1))  # [num_mb]
        return m / mb_steps[micro_batch].clamp(min=1).unsqueeze(-1) / num_mb
    if mode == "dr_grpo":
        return m * (world_size / (num_rows_global * mask.shape[1]))
    if mode == "dapo":
        return m * (world_size / max(num_steps_global, 1.0))
    raise ValueError(f"unknown loss aggregation {mode!r}: use grpo, bnpo, dr_grpo or dapo")
