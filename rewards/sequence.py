"""Rewards for string outputs compared with a target string from the prompt."""

from __future__ import annotations

from typing import Any, Sequence


def sequence_match(samples: Sequence[str], prompts: Sequence[Any], target: Sequence[str], **_: Any) -> list[float | None]:
    """Share of positions where the sample matches the target, over the longer of the two.

    >>> sequence_match(["bcd", "bc", "bxdz"], [None] * 3, target=["bcd"] * 3)
    [1.0, 0.6666666666666666, 0.5]
    """
    scores: list[float | None] = []
    for sample, goal in zip(samples, target):
        if goal is None or not isinstance(sample, str):
            scores.append(None)
            continue
        longest = max(len(sample), len(goal))
        scores.append(1.0 if longest == 0 else sum(a == b for a, b in zip(sample, goal)) / longest)
    return scores


def exact_match(samples: Sequence[str], prompts: Sequence[Any], target: Sequence[str], **_: Any) -> list[float | None]:
    """1 where the sample equals the target, else 0.

    >>> exact_match(["bcd", "bc"], [None] * 2, target=["bcd", "bcd"])
    [1.0, 0.0]
    """
    return [None if goal is None else float(sample == goal) for sample, goal in zip(samples, target)]
