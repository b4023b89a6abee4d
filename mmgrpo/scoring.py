"""Running reward callables over a rollout: validation, sub-scores, NaN for unscored rows; the paired
before/after comparison of held-out evaluations."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import torch

from mmgrpo.config import ConfigError, RewardConfig
from mmgrpo.data import prompt_meta
from mmgrpo.registry import REWARDS, expand_assets, missing_dependency, resolve


def build_rewards(configs: Sequence[RewardConfig]) -> dict[str, Callable]:
    """name -> callable for each reward in the config (classes are instantiated with kwargs)."""
    out: dict[str, Callable] = {}
    for cfg in configs:
        try:
            obj = resolve(cfg.name, REWARDS, "reward")
            kwargs = expand_assets(cfg.kwargs)
            if inspect.isclass(obj):
                fn = obj(**kwargs)
            elif kwargs:
                fn = functools.partial(obj, **kwargs)
            else:
                fn = obj
        except ModuleNotFoundError as e:
            raise missing_dependency("reward", cfg.name, e) from None
        key = reward_key(cfg.name)
        if key in out:
            raise ConfigError(f"reward '{key}' is listed twice in rewards: give each reward once")
        out[key] = fn
    return out


def reward_key(name: str) -> str:
    """The short name metrics use for a reward: 'pkg.mod:clip_score' -> 'clip_score'."""
    return name.rpartition(":")[2] or name


def score_rollout(
    rewards: Mapping[str, Callable], samples: Sequence[Any], prompts: Sequence[Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run every reward on the samples.

    Returns the components [N, K] fp32 (NaN: could not score) in the order of `rewards`, and
    sub-scores {"<reward>/<sub>": [N]} from rewards that return a dict.
    """
    meta = prompt_meta(prompts)
    n = len(samples)
    columns, subs = [], {}
    for name, fn in rewards.items():
        try:
            out = fn(samples, prompts, **meta)
        except TypeError as e:
            if "unexpected keyword" in str(e):
                raise ConfigError(
                    f"reward '{name}' does not accept the prompt fields {sorted(meta)}: add **kwargs to its signature"
                ) from None
            raise
        if isinstance(out, Mapping):
            if "score" not in out:
                raise ConfigError(f"reward '{name}' returned a dict without the key 'score' (got {sorted(out)})")
            for sub, values in out.items():
                if sub != "score":
                    subs[f"{name}/{sub}"] = _as_tensor(values, n, f"{name}/{sub}")
            out = out["score"]
        columns.append(_as_tensor(out, n, name))
    return torch.stack(columns, dim=-1), subs  # [N, K]


def _as_tensor(values: Any, n: int, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().flatten().tolist()
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward '{name}' returned {len(values)} scores for {n} samples")
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"reward '{name}' returned a non-number score {v!r}") from None
    return torch.tensor(out, dtype=torch.float32)  # [N]


def paired_gain(before: Sequence[float | None], after: Sequence[float | None]) -> dict[str, Any]:
    """Change of a held-out reward between two evaluations of the same prompts and seeds.

    Pairs sample i of `before` with sample i of `after` (the evaluation replays the same prompts
    and initial noise) and drops pairs where either side is None or NaN. Returns {"n",
    "mean_diff", "stderr", "ci95": [lo, hi]} for the mean paired difference (normal
    approximation: mean +- 1.96 * sd / sqrt(n), sd with Bessel's correction), and
    "relative_ci95": the same interval divided by |mean before| (None when that is 0).
    Pairing removes the prompt-to-prompt spread, so the interval says whether a gain is more
    than evaluation noise. stderr and the intervals are None with fewer than two pairs.
    """
    if len(before) != len(after):
        raise ValueError(f"paired_gain: {len(before)} samples before but {len(after)} after; evaluate the same prompts")
    pairs = [(float(b), float(a)) for b, a in zip(before, after)
             if b is not None and a is not None and not math.isnan(float(b)) and not math.isnan(float(a))]
    n = len(pairs)
    out: dict[str, Any] = {"n": n, "mean_diff": None, "stderr": None, "ci95": None, "relative_ci95": None}
    if n == 0:
        return out
    diffs = [a - b for b, a in pairs]
    mean = sum(diffs) / n
    out["mean_diff"] = mean
    if n < 2:
        return out
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    lo, hi = mean - 1.96 * stderr, mean + 1.96 * stderr
    base = abs(sum(b for b, _ in pairs) / n)
    out.update(stderr=stderr, ci95=[lo, hi], relative_ci95=[lo / base, hi / base] if base else None)
    return out
