"""Reasoning tasks of the masked-diffusion default (mmgrpo/miniworld/reasoning.py) and their rewards."""

from __future__ import annotations

import doctest
import itertools
import random

import pytest

import mmgrpo.rewards.reasoning as rewards_module
from mmgrpo.data import load_prompts
from mmgrpo.config import DataConfig
from mmgrpo.miniworld import reasoning as rs
from mmgrpo.registry import REWARDS, resolve
from mmgrpo.rewards.reasoning import reasoning_accuracy, reasoning_format, sudoku_cells
from mmgrpo.scoring import score_rollout


def test_there_are_288_solved_grids_and_each_is_valid():
    grids = rs.sudoku_grids()
    assert len(grids) == 288 == len(set(grids))  # the known count of 4x4 Sudoku grids
    assert all(rs.sudoku_valid(g) for g in grids)
    assert not rs.sudoku_valid("1234123412341234")  # rows fine, columns repeat
    assert not rs.sudoku_valid("1234341221434320")  # a 0 cell


def test_puzzles_have_one_solution_and_their_answer_is_it():
    rng = random.Random(0)
    for _ in range(50):
        item = rs.sudoku_item(rng)
        assert rs.sudoku_solutions(item["puzzle"]) == [item["answer"]]
        assert 4 <= item["puzzle"].count(".") <= 8
        assert item["prompt"] == f"S:{item['puzzle']}="


def test_expression_evaluation_follows_precedence():
    assert rs.evaluate_expression("3*5+7") == 22
    assert rs.evaluate_expression("7-2*3") == 1
    assert rs.evaluate_expression("2*3*4-10") == 14
    assert rs.evaluate_expression("12") == 12
    for bad in ("3+", "+3", "3**2", "3/2", "3 + 2", ""):
        assert rs.evaluate_expression(bad) is None
    for a, b, c in itertools.product(range(1, 10), repeat=3):  # against Python on every 3-number expression
        for o1, o2 in itertools.product("+-*", repeat=2):
            text = f"{a}{o1}{b}{o2}{c}"
            assert rs.evaluate_expression(text) == eval(text)


def test_checkers_accept_every_valid_answer_and_nothing_else():
    item = {"task": "countdown", "numbers": [3, 5, 7], "target": 22}
    assert rs.task_correct("3*5+7", item) and rs.task_correct("7+5*3", item)
    assert not rs.task_correct("3*5+7+0", item)  # a number that was not given
    assert not rs.task_correct("3*5*7", item) and not rs.task_correct("15+7", item)
    grid = rs.sudoku_grids()[17]
    puzzle = "." * 16  # many solutions: any valid grid counts
    assert rs.task_correct(grid, {"task": "sudoku", "puzzle": puzzle})
    assert not rs.task_correct(grid, {"task": "sudoku", "puzzle": rs.sudoku_grids()[18]})  # breaks a given
    assert rs.task_correct("-12", {"task": "arithmetic", "answer": "-12"})
    assert not rs.task_correct("12", {"task": "arithmetic", "answer": "-12"})
    for item in rs.reasoning_items("train", 30):
        assert rs.task_correct(item["answer"], item), item
    with pytest.raises(ValueError, match="unknown reasoning task"):
        rs.task_correct("1", {"task": "chess"})


def test_splits_are_deterministic_distinct_and_disjoint():
    a = rs.reasoning_prompts(num_train=300, num_eval=60)
    b = rs.reasoning_prompts(num_train=300, num_eval=60)
    assert a == b
    train = {x["prompt"] for x in a["train"]}
    held_out = {x["prompt"] for x in a["eval"]}
    assert len(train) == 300 and len(held_out) == 60 and not train & held_out
    assert all(rs.split_of(p) == "eval" for p in held_out)
    assert [x["task"] for x in a["train"][:6]] == ["sudoku", "arithmetic", "countdown"] * 2
    other = rs.reasoning_prompts(num_train=50, num_eval=10, seed=1)
    assert not {x["prompt"] for x in other["train"]} & held_out  # another seed never draws a held-out prompt
    only = rs.reasoning_prompts(num_train=10, num_eval=4, tasks=["arithmetic"])
    assert {x["task"] for x in only["train"] + only["eval"]} == {"arithmetic"}
    with pytest.raises(ValueError, match="unknown task"):
        rs.reasoning_prompts(tasks=["chess"])


def test_registered_prompt_set_and_rewards():
    train, held_out = load_prompts(DataConfig(source="reasoning", kwargs={"num_train": 12, "num_eval": 6}), 0)
    assert len(train) == 12 and len(held_out) == 6
    fns = {name: resolve(name, REWARDS, "reward") for name in ("reasoning_accuracy", "reasoning_format", "sudoku_cells")}
    samples = [{"text": x["answer"], "tokens": [], "steps": []} for x in train[:3]]  # dict samples read their text
    samples += ["999", "1+", "x"]
    components, _ = score_rollout(fns, samples, train[:6])  # [6, 3]
    assert components[:3, 0].tolist() == [1.0, 1.0, 1.0]
    assert components[3:, 0].tolist() == [0.0, 0.0, 0.0]
    assert components[:, 1].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # "999" is no 16-digit grid
    sudoku = [i for i, x in enumerate(train[:6]) if x["task"] == "sudoku"]
    assert components[sudoku, 2].tolist() == [1.0, 0.0]  # "999" shares no cell
    assert components[[1, 2, 4, 5], 2].isnan().all()  # other tasks unscored


def test_sudoku_cells_counts_shared_cells():
    answer = "1234341221434321"
    assert sudoku_cells([answer[:8] + "1" * 8], [None], task=["sudoku"], answer=[answer]) == [pytest.approx(10 / 16)]
    assert sudoku_cells([""], [None], task=["sudoku"], answer=[answer]) == [0.0]
    assert reasoning_accuracy(["1"], [None]) == [None]  # no task field: unscored
    assert reasoning_format([" 12 "], [None], task=["arithmetic"]) == [1.0]


def test_doctests():
    assert doctest.testmod(rewards_module).failed == 0


def test_difficulty_options_reach_the_item_makers():
    easy = rs.reasoning_prompts(num_train=30, num_eval=6, difficulty={"arithmetic": {"max_digits": 2},
                                "sudoku": {"min_blanks": 2, "max_blanks": 2}, "countdown": {"count": 2}})  # fmt: skip
    for item in easy["train"] + easy["eval"]:
        if item["task"] == "arithmetic":
            assert all(10 <= int(n) <= 99 for n in item["prompt"][2:-1].replace("-", "+").split("+"))
        elif item["task"] == "sudoku":
            assert item["puzzle"].count(".") == 2
        else:
            assert len(item["numbers"]) == 2
        assert rs.task_correct(item["answer"], item)
    with pytest.raises(ValueError, match="unknown task"):
        rs.reasoning_prompts(difficulty={"chess": {}})
