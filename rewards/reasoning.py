"""Rewards of the reasoning tasks (mmgrpo.miniworld.reasoning): exact accuracy, answer format, Sudoku cells.

Each reads the prompt fields as lists (`task=`, `answer=`, `puzzle=`, `numbers=`, `target=`); a sample is
a string or a dict with a "text" key (the masked-diffusion adapter's samples also carry the unmasking
order). A row without a task (or, for sudoku_cells, a row of another task) is unscored (None).
"""

from __future__ import annotations

from typing import Any, Sequence

from mmgrpo.miniworld.reasoning import sudoku_cells_right, task_correct, well_formed
from mmgrpo.rewards.format import completion_text


def _items(prompts: Sequence[Any], task: Sequence[Any] | None, meta: dict[str, Any]) -> list[dict[str, Any] | None]:
    """One dict of the checker's fields per row (None where the row has no task)."""
    n = len(prompts)
    tasks = list(task) if task is not None else [None] * n
    fields = {k: list(v) for k, v in meta.items() if isinstance(v, (list, tuple)) and len(v) == n}
    return [None if tasks[i] is None else {"task": tasks[i], **{k: v[i] for k, v in fields.items()}} for i in range(n)]


def reasoning_accuracy(samples: Sequence[Any], prompts: Sequence[Any], task: Sequence[str] | None = None,
                       **meta: Any) -> list[float | None]:
    """1.0 where the task's exact checker accepts the completion (any valid Sudoku / Countdown solution), else 0.0.

    >>> reasoning_accuracy(["432", "431"], [None] * 2, task=["arithmetic"] * 2, answer=["432"] * 2)
    [1.0, 0.0]
    """
    return [None if item is None else float(task_correct(completion_text(s).strip(), item))
            for s, item in zip(samples, _items(prompts, task, meta))]  # fmt: skip


def reasoning_format(samples: Sequence[Any], prompts: Sequence[Any], task: Sequence[str] | None = None,
                     **_: Any) -> list[float | None]:
    """1.0 where the completion has the shape of its task's answer (16 digits 1-4; an integer; digits joined by
    + - *), else 0.0.

    >>> reasoning_format(["1234", "12+3"], [None] * 2, task=["arithmetic", "countdown"])
    [1.0, 1.0]
    """
    tasks = list(task) if task is not None else [None] * len(samples)
    return [None if t is None else float(well_formed(completion_text(s).strip(), t)) for s, t in zip(samples, tasks)]


def sudoku_cells(samples: Sequence[Any], prompts: Sequence[Any], task: Sequence[str] | None = None,
                 answer: Sequence[str] | None = None, **_: Any) -> list[float | None]:
    """Partial credit on Sudoku: the share of the 16 cells equal to the solution; other tasks are unscored.

    >>> sudoku_cells(["1234341221434321", "1234"], [None] * 2, task=["sudoku"] * 2, answer=["1234341221434321"] * 2)
    [1.0, 0.25]
    """
    tasks = list(task) if task is not None else [None] * len(samples)
    answers = list(answer) if answer is not None else [None] * len(samples)
    return [float(sudoku_cells_right(completion_text(s).strip(), a)) if t == "sudoku" and a is not None else None
            for s, t, a in zip(samples, tasks, answers)]  # fmt: skip


def tokens_per_forward(samples: Sequence[Any], prompts: Sequence[Any], **_: Any) -> list[float | None]:
    """Decoding speed of a masked-diffusion sample: completion tokens per model forward (LightningRL's speed
    reward), read from the sample's "tokens_per_forward"; None for samples that do not carry it.

    With `advantage.combine: normalize_then_sum` it is normalised per group apart from accuracy (GDPO's
    decoupled normalisation, as LightningRL combines z(accuracy) + z(tokens per forward)).

    >>> tokens_per_forward([{"text": "12", "tokens_per_forward": 4.0}, "12"], [None] * 2)
    [4.0, None]
    """
    return [float(s["tokens_per_forward"]) if isinstance(s, dict) and "tokens_per_forward" in s else None
            for s in samples]  # fmt: skip
