"""Mini-world reasoning: 4x4 Sudoku, small arithmetic and Countdown items with exact checkers.

Every item is a dict the rewards read field by field:

    {"prompt": "A:47+385=", "answer": "432", "task": "arithmetic"}
    {"prompt": "S:1.3442..2..134.1=", "answer": "1234...", "task": "sudoku", "puzzle": "1.34..."}
    {"prompt": "C:3,5,7>22=", "answer": "3*5+7", "task": "countdown", "numbers": [3, 5, 7], "target": 22}

- sudoku: a 4x4 grid (rows, columns and 2x2 boxes hold 1-4 once each) read row by row, "." for a blank;
  the puzzle has exactly one solution; the answer is the solved grid as 16 digits.
- arithmetic: a+b or a-b with two- and three-digit operands; the answer is the exact result.
- countdown: reach the target with each given number used exactly once and + - * (usual precedence);
  `answer` is one solution, the checker accepts any.

Held out means never seen in training: an item belongs to the held-out split when a hash of its prompt
says so (one prompt in HELD_OUT_EVERY), so no held-out prompt is ever generated for training, whatever
the seed or count. `reasoning_prompts` is the `reasoning` prompt set of data.source.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from typing import Any, Sequence

TASKS = ("sudoku", "arithmetic", "countdown")
SPLITS = ("train", "eval")
HELD_OUT_EVERY = 8  # one prompt in 8 (by hash) is held out
TASK_CODES = {"sudoku": "S", "arithmetic": "A", "countdown": "C"}
ANSWER_PATTERNS = {  # what a well-formed answer of each task looks like (the format reward)
    "sudoku": re.compile(r"[1-4]{16}"),
    "arithmetic": re.compile(r"-?\d+"),
    "countdown": re.compile(r"\d+(?:[+\-*]\d+)*"),
}
ALPHABET = "0123456789+-*,.:=>" + "".join(TASK_CODES.values())  # every character a prompt or answer uses


# ----------------------------------------------------------------------------- splits


def split_of(prompt: str) -> str:
    """"eval" for one prompt in HELD_OUT_EVERY (a stable hash of the text), else "train"."""
    digest = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
    return "eval" if digest % HELD_OUT_EVERY == 0 else "train"


# ----------------------------------------------------------------------------- sudoku


@functools.lru_cache(maxsize=1)
def sudoku_grids() -> tuple[str, ...]:
    """All 288 solved 4x4 grids, as 16-digit strings in lexicographic order."""
    rows = ["".join(p) for p in itertools.permutations("1234")]

    def extend(grid: str) -> list[str]:  # rows in order, each kept only while columns and boxes stay distinct
        if len(grid) == 16:
            return [grid]
        out = []
        for row in rows:
            candidate = grid + row
            r = len(grid) // 4
            columns_ok = all(row[c] not in grid[c::4] for c in range(4))
            boxes_ok = r % 2 == 0 or all(set(candidate[4 * (r - 1) + b : 4 * (r - 1) + b + 2]).isdisjoint(row[b : b + 2])
                                          for b in (0, 2))  # fmt: skip
            if columns_ok and boxes_ok:
                out += extend(candidate)
        return out

    return tuple(extend(""))


def sudoku_valid(grid: str) -> bool:
    """Whether 16 digits form a solved 4x4 Sudoku (each row, column and 2x2 box holds 1-4 once)."""
    if not ANSWER_PATTERNS["sudoku"].fullmatch(grid):
        return False
    cells = [[grid[4 * r + c] for c in range(4)] for r in range(4)]
    units = [cells[r] for r in range(4)] + [[cells[r][c] for r in range(4)] for c in range(4)]
    units += [[cells[br + i][bc + j] for i in (0, 1) for j in (0, 1)] for br in (0, 2) for bc in (0, 2)]
    return all(sorted(unit) == list("1234") for unit in units)


@functools.lru_cache(maxsize=1)
def _grids_with() -> dict[tuple[int, str], frozenset[int]]:
    """(cell, digit) -> indices of the solved grids with that digit in that cell."""
    grids = sudoku_grids()
    return {(cell, d): frozenset(i for i, g in enumerate(grids) if g[cell] == d) for cell in range(16) for d in "1234"}


def sudoku_solutions(puzzle: str) -> list[str]:
    """The solved grids that agree with every given cell of `puzzle` ("." = blank)."""
    index = _grids_with()
    found = frozenset(range(len(sudoku_grids())))
    for cell, given in enumerate(puzzle):
        if given != ".":
            found = found & index[(cell, given)]
    return [sudoku_grids()[i] for i in sorted(found)]


def sudoku_item(rng: random.Random, min_blanks: int = 4, max_blanks: int = 8) -> dict[str, Any]:
    """A puzzle with a unique solution and min_blanks..max_blanks blanks (fewer if uniqueness stops earlier)."""
    grid = rng.choice(sudoku_grids())
    target = rng.randint(min_blanks, max_blanks)
    puzzle = list(grid)
    for cell in rng.sample(range(16), 16):
        if sum(c == "." for c in puzzle) == target:
            break
        puzzle[cell] = "."
        if len(sudoku_solutions("".join(puzzle))) > 1:
            puzzle[cell] = grid[cell]
    text = "".join(puzzle)
    return {"prompt": f"S:{text}=", "answer": grid, "task": "sudoku", "puzzle": text}


def sudoku_correct(completion: str, puzzle: str) -> bool:
    """A solved grid that keeps every given cell (any valid solution counts)."""
    return sudoku_valid(completion) and all(p == "." or p == c for p, c in zip(puzzle, completion))


def sudoku_cells_right(completion: str, answer: str) -> float:
    """Share of the 16 cells equal to the solution (characters past 16 do not count, missing ones are wrong)."""
    return sum(a == b for a, b in zip(completion[:16], answer)) / 16


# ----------------------------------------------------------------------------- arithmetic


def arithmetic_item(rng: random.Random, max_digits: int = 3) -> dict[str, Any]:
    """a+b or a-b, each operand of two to `max_digits` digits."""
    a, b = (rng.randint(10, 10**max_digits - 1) for _ in range(2))
    op = rng.choice("+-")
    value = a + b if op == "+" else a - b
    return {"prompt": f"A:{a}{op}{b}=", "answer": str(value), "task": "arithmetic"}


# ----------------------------------------------------------------------------- countdown


def evaluate_expression(text: str) -> int | None:
    """The value of digits joined by + - * (usual precedence), or None if `text` is not such an expression."""
    if not ANSWER_PATTERNS["countdown"].fullmatch(text):
        return None
    total, term, sign = 0, None, 1
    for token in re.findall(r"\d+|[+\-*]", text):
        if token == "*":
            continue
        if token in "+-":
            total, term, sign = total + sign * term, None, 1 if token == "+" else -1
            continue
        term = int(token) if term is None else term * int(token)  # after "*": multiplies the running term
    return total + sign * term


def countdown_correct(completion: str, numbers: Sequence[int], target: int) -> bool:
    """Uses each given number exactly once (and no other), with + - *, and reaches the target."""
    value = evaluate_expression(completion)
    if value is None:
        return False
    used = sorted(int(n) for n in re.findall(r"\d+", completion))
    return used == sorted(int(n) for n in numbers) and value == int(target)


def countdown_item(rng: random.Random, count: int = 3, low: int = 1, high: int = 9) -> dict[str, Any]:
    """`count` numbers in [low, high] and the target of a random expression over all of them."""
    numbers = [rng.randint(low, high) for _ in range(count)]
    order = rng.sample(numbers, count)
    expression = str(order[0]) + "".join(rng.choice("+-*") + str(n) for n in order[1:])
    target = evaluate_expression(expression)
    listed = ",".join(str(n) for n in numbers)
    return {"prompt": f"C:{listed}>{target}=", "answer": expression, "task": "countdown", "numbers": numbers,
            "target": target}  # fmt: skip


# ----------------------------------------------------------------------------- checking


def task_correct(completion: str, item: dict[str, Any]) -> bool:
    """The exact checker of the item's task."""
    task = item.get("task")
    if task == "sudoku":
        return sudoku_correct(completion, item["puzzle"])
    if task == "countdown":
        return countdown_correct(completion, item["numbers"], item["target"])
    if task == "arithmetic":
        return completion.strip() == str(item["answer"])
    raise ValueError(f"unknown reasoning task {task!r}: use one of {', '.join(TASKS)}")


def well_formed(completion: str, task: str) -> bool:
    """Whether the completion has the shape of the task's answer (ANSWER_PATTERNS)."""
    if task not in ANSWER_PATTERNS:
        raise ValueError(f"unknown reasoning task {task!r}: use one of {', '.join(TASKS)}")
    return ANSWER_PATTERNS[task].fullmatch(completion) is not None


# ----------------------------------------------------------------------------- prompt sets

_MAKERS = {"sudoku": sudoku_item, "arithmetic": arithmetic_item, "countdown": countdown_item}
_SPLIT_SEEDS = {"train": 0, "eval": 1}


def reasoning_items(split: str, count: int, tasks: Sequence[str] = TASKS, seed: int = 0,
                    distinct: bool = True, difficulty: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`count` items of one split, the tasks in turn, deterministic in (split, tasks, seed, distinct, difficulty).

    distinct=False allows repeats (a pretraining stream larger than a task's space of prompts: 3 numbers
    of 1-9 make a few thousand distinct Countdown prompts). difficulty: keyword arguments of the item
    makers by task, e.g. {"arithmetic": {"max_digits": 2}, "sudoku": {"max_blanks": 6}}.
    """
    difficulty = difficulty or {}
    unknown_tasks = [t for t in difficulty if t not in TASKS]
    if unknown_tasks:
        raise ValueError(f"reasoning: difficulty for unknown task(s) {unknown_tasks}; use keys from {list(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"reasoning_items: unknown split {split!r}; use 'train' or 'eval'")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"reasoning: unknown task(s) {unknown}; use a non-empty list from {list(TASKS)}")
    rng = random.Random(f"reasoning/{split}/{seed}")
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    misses = 0  # draws in a row that gave nothing new
    while len(items) < count:
        task = tasks[len(items) % len(tasks)]
        item = _MAKERS[task](rng, **difficulty.get(task, {}))
        if split_of(item["prompt"]) == split and (not distinct or item["prompt"] not in seen):
            seen.add(item["prompt"])
            items.append(item)
            misses = 0
        else:
            misses += 1
            if misses > 20000:
                raise ValueError(f"reasoning: could not draw {count} distinct {split} items of {list(tasks)} "
                                 f"({task} ran out of new prompts after {len(items)}); ask for fewer")
    return items


def reasoning_prompts(num_train: int = 3000, num_eval: int = 192, tasks: Sequence[str] = TASKS, seed: int = 0,
                      difficulty: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The `reasoning` prompt set for data.source: {"train": [...], "eval": [...]}, held-out prompts apart.
    difficulty: per-task options of the item makers (see reasoning_items)."""
    for name, n in (("num_train", num_train), ("num_eval", num_eval)):
        if n < 0:
            raise ValueError(f"reasoning_prompts: {name} must be >= 0, got {n}")
    return {"train": reasoning_items("train", num_train, tasks, seed, difficulty=difficulty),
            "eval": reasoning_items("eval", num_eval, tasks, seed, difficulty=difficulty)}  # fmt: skip
