"""Held-out evaluation, the reward statistics logged every step, and the before/after summary.

Rewards may be NaN (a reward could not score a sample): every mean here skips them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from mmgrpo.advantages import weighted_sum
from mmgrpo.config import Config, ConfigError
from mmgrpo.distributed import Collective
from mmgrpo.protocols import Adapter
from mmgrpo.rollout import Rollout
from mmgrpo.scoring import paired_gain, score_rollout

if TYPE_CHECKING:
    from mmgrpo.rundir import RunDir


@torch.no_grad()
def evaluate(
    adapter: Adapter,
    reward_fns: Mapping[str, Callable],
    weights: torch.Tensor,
    prompts: Sequence[Any],
    cfg: Config,
    comm: Collective,
    run: RunDir | None = None,
    tag: str = "eval",
) -> dict[str, Any]:
    """Mean rewards on the first eval.num_prompts held-out prompts with a fixed seed (main process samples)."""
    prompts = list(prompts)[: cfg.eval.num_prompts]
    if not prompts:
        raise ConfigError(
            "no held-out prompts to evaluate on: pass eval_prompts=..., set data.eval_source, or set eval.num_prompts=0"
        )
    result: dict[str, Any] = {}
    if comm.is_main or comm.sharded:  # sharded weights: every process runs the same forwards (same prompts, seed)
        device = comm.accelerator.device if comm.accelerator else torch.device("cpu")
        generator = torch.Generator(device=device).manual_seed(cfg.eval.seed)
        parts = []
        for i in range(0, len(prompts), cfg.eval.batch_size):
            batch = prompts[i : i + cfg.eval.batch_size]
            with torch.no_grad(), comm.autocast():
                parts.append(adapter.sample(batch, cfg.eval.samples_per_prompt, generator, evaluate=True))
        rollout = Rollout.concat(parts)
    if comm.is_main:
        components, subs = score_rollout(reward_fns, rollout.samples, rollout.prompts)  # [N, K]
        result = {"num_samples": len(rollout), "reward/mean": nanmean(weighted_sum(components, weights))}
        for k, name in enumerate(reward_fns):
            result[f"reward/{name}/mean"] = nanmean(components[:, k])
        for name, values in subs.items():
            result[f"reward/{name}/mean"] = nanmean(values)
        rollout.rewards = {name: components[:, k] for k, name in enumerate(reward_fns)}
        # each reward per sample (None: unscored), so the before and after evaluations can be paired
        result["per_sample"] = {
            name: [None if math.isnan(x) else x for x in values.tolist()] for name, values in rollout.rewards.items()
        }
        if run is not None:
            run.write_gallery(adapter, rollout, tag, cfg.eval.gallery)
    comm.barrier()
    return result


def reward_stats(
    rewards: torch.Tensor, total: torch.Tensor, subs: dict[str, torch.Tensor], names: list[str], zero_std: torch.Tensor
) -> dict[str, Any]:
    """The reward metrics of one training step.

    rewards: [N, K] each reward; total: [N] their weighted sum; subs: {"<reward>/<sub>": [N]};
    zero_std: [groups] bool, groups whose rewards all agree (no learning signal).
    """
    stats = {
        "reward/mean": nanmean(total),
        "reward/std": nanstd(total),
        "reward/unscored": int(torch.isnan(total).sum()),
        "frac_zero_std": zero_std.float().mean().item(),
    }
    for k, name in enumerate(names):
        stats[f"reward/{name}/mean"] = nanmean(rewards[:, k])
    for name, values in subs.items():
        stats[f"reward/{name}/mean"] = nanmean(values)
    return stats


def primary_summary(ev: dict[str, Any], primary: str) -> dict[str, Any] | None:
    """The headline of eval.json: the primary reward before and after, its gain, and the paired interval.

    "absolute_gain" is after - before; "relative_gain" divides it by |before|, and is None when the
    baseline is 0 (no ratio to report; the absolute gain is the headline then). None when the run
    has no "before" and "after" evaluation of that reward. "paired" is None when the two
    evaluations cannot be paired sample by sample (a run resumed from an older version stored no
    per-sample values; one resumed with another eval.num_prompts has other lengths).
    """
    key = f"reward/{primary}/mean"
    if "before" not in ev or "after" not in ev or ev["before"].get(key) is None or ev["after"].get(key) is None:
        return None
    before, after = ev["before"][key], ev["after"][key]
    rel = (after - before) / abs(before) if before else None
    samples = [ev[tag].get("per_sample", {}).get(primary) for tag in ("before", "after")]
    paired = paired_gain(*samples) if all(samples) and len(samples[0]) == len(samples[1]) else None
    return {"reward": primary, "before": before, "after": after, "absolute_gain": after - before,
            "relative_gain": rel, "paired": paired}  # fmt: skip


def gain_text(summary: dict[str, Any]) -> str:
    """The before -> after line of a primary_summary, e.g. "0.3410 -> 0.4560 (+33.7%, 95% CI ...)".

    Over a baseline of 0 the gain is absolute: "0.0000 -> 0.2500 (+0.2500 absolute; the baseline is 0)".
    """
    before, after, paired = summary["before"], summary["after"], summary["paired"]
    n = paired["n"] if paired else 0
    if summary["relative_gain"] is None:
        ci = paired["ci95"] if paired else None
        ci_text = f", 95% CI {ci[0]:+.4f} to {ci[1]:+.4f} over {n} paired samples" if ci else ""
        return f"{before:.4f} -> {after:.4f} ({after - before:+.4f} absolute; the baseline is 0{ci_text})"
    ci = paired["relative_ci95"] if paired else None
    ci_text = f", 95% CI {ci[0]:+.1%} to {ci[1]:+.1%} over {n} paired samples" if ci else ""
    return f"{before:.4f} -> {after:.4f} ({summary['relative_gain']:+.1%}{ci_text})"


def nanmean(x: torch.Tensor) -> float | None:
    """Mean over the non-NaN entries (None when there are none)."""
    v = x[~torch.isnan(x)]
    return v.mean().item() if v.numel() else None


def nanstd(x: torch.Tensor) -> float | None:
    """Sample std over the non-NaN entries (0 with fewer than two)."""
    v = x[~torch.isnan(x)]
    return v.std().item() if v.numel() > 1 else 0.0
