"""Building the run's rewards, running them over a rollout (validation, sub-scores, NaN for unscored
rows), and the paired before/after comparison of held-out evaluations."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
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


def reward_functions(
    configs: Sequence[RewardConfig], given: Mapping[str, Callable] | Sequence[Callable] | Callable | None = None
) -> tuple[dict[str, Callable], torch.Tensor]:
    """The run's rewards by name and their weights [K] fp32.

    `given` (callables from the Python API) replaces the configured rewards: a dict names them,
    otherwise each is named after its __name__ (or class). Weights come from the config reward
    of the same name, else 1.
    """
    if given is None:
        fns = build_rewards(configs)
    elif callable(given) and not isinstance(given, Mapping):
        fns = {getattr(given, "__name__", type(given).__name__): given}
    elif isinstance(given, Mapping):
        fns = dict(given)
    else:
        fns = {getattr(f, "__name__", type(f).__name__): f for f in given}
    if not fns:
        raise ConfigError("no rewards: list at least one under 'rewards'")
    by_name = {reward_key(r.name): r.weight for r in configs}
    weights = torch.tensor([by_name.get(name, 1.0) for name in fns], dtype=torch.float32)  # [K]
    return fns, weights


def reward_key(name: str) -> str:
    """The short name metrics use for a reward: 'pkg.mod:clip_score' -> 'clip_score'."""
    return name.rpartition(":")[2] or name


class RewardError(ValueError):
    """A reward callable failed or returned something that is not one score per sample.

    The message is one line naming the reward; the original exception is chained (`__cause__`).
    """


def score_rollout(
    rewards: Mapping[str, Callable], samples: Sequence[Any], prompts: Sequence[Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run every reward on the samples.

    Returns the components [N, K] float64 (NaN: could not score) in the order of `rewards`, and
    sub-scores {"<reward>/<sub>": [N]} from rewards that return a dict. None, NaN and +-inf are
    "could not score". float64 keeps group statistics finite for scores as large as 1e30.
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
            raise RewardError(f"reward '{name}' raised {type(e).__name__}: {_first_line(e)}") from e
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise RewardError(f"reward '{name}' raised {type(e).__name__}: {_first_line(e)}") from e
        if isinstance(out, Mapping):
            if "score" not in out:
                raise RewardError(f"reward '{name}' returned a dict without the key 'score' (got {sorted(out)})")
            for sub, values in out.items():
                if sub != "score":
                    subs[f"{name}/{sub}"] = as_scores(values, n, f"{name}/{sub}")
            out = out["score"]
        columns.append(as_scores(out, n, name))
    return torch.stack(columns, dim=-1), subs  # [N, K]


def as_scores(values: Any, n: int, name: str) -> torch.Tensor:
    """One float64 score per sample [n] from what a reward returned; NaN where it could not score.

    Accepts a list or tuple of numbers / None, or a 1-D tensor or array of length n. Anything
    else (a single number, a string, a [n, 1] tensor, a wrong length, a string score) is one
    RewardError line: never silently flattened or coerced.
    """
    if isinstance(values, torch.Tensor) or type(values).__module__ == "numpy":
        shape = tuple(values.shape) if hasattr(values, "shape") else ()
        if len(shape) != 1:
            raise RewardError(
                f"reward '{name}' returned a {type(values).__name__} of shape {list(shape)}: return one score per "
                f"sample (shape [{n}])"
            )
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(
            f"reward '{name}' returned a {type(values).__name__} ({values!r:.40}), not a list of {n} scores "
            "(one per sample; None where it cannot score)"
        )
    if len(values) != n:
        raise RewardError(f"reward '{name}' returned {len(values)} scores for {n} samples: return one per sample")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real):
            out.append(float(v) if math.isfinite(float(v)) else math.nan)  # inf is "could not score" too
        else:
            raise RewardError(
                f"reward '{name}' returned {v!r:.40} for sample {i}: scores must be numbers (None: could not score)"
            )
    return torch.tensor(out, dtype=torch.float64)  # [n]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


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
