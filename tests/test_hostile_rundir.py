"""The run directory under a hostile but realistic user: strict JSON, a step nothing could score, a lock
against a second writer, folders that are not runs, runs that died before their first checkpoint,
resume with changed settings, and the "interrupted" message.

Tiny toy runs (2 prompts x 4 samples, a 16-wide GRU), a few seconds each.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mmgrpo.setup as job_setup
from mmgrpo.config import ConfigError, load_config
from mmgrpo.pipelines.toy import ToyAdapter, toy_prompts
from mmgrpo.rewards.sequence import sequence_match
from mmgrpo.scoring import RewardError
from mmgrpo.trainer import TIME_KEYS, train

TINY = [
    "train.max_steps=3",
    "train.prompts_per_step=2",
    "train.group_size=4",
    "train.checkpoint_every=100",
    "eval.num_prompts=2",
    "eval.samples_per_prompt=2",
    "eval.gallery=2",
    "data.kwargs.num_train=16",
    "data.kwargs.num_eval=2",
    "pipeline.kwargs.hidden=16",
]


def _refuse_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def strict_json(text):
    return json.loads(text, parse_constant=_refuse_constant)


def strict_lines(path):
    return [strict_json(line) for line in path.read_text().splitlines() if line.strip()]


def _without_time(metrics):
    return [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in metrics]


def _files(root):
    """Every file under root (but the lock) with its bytes: what a refused command must leave alone."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


def _copy(run, dest):
    shutil.copytree(run.out_dir, dest)
    return dest


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A TINY run of 2 steps with checkpoints at steps 1 and 2; copy it (`_copy`) before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return train("toy", out=out, overrides=TINY + ["train.max_steps=2", "train.checkpoint_every=1"], progress=False)


# ------------------------------------------------------------------------------- 1. strict JSON


def test_to_json_writes_non_finite_numbers_as_null():
    from mmgrpo.rundir import to_json

    value = {"a": math.nan, "b": [math.inf, {"c": -math.inf}], "d": (1, 2.5), "e": np.float32("nan"), "f": "x"}
    assert strict_json(to_json(value)) == {"a": None, "b": [None, {"c": None}], "d": [1, 2.5], "e": None, "f": "x"}
    assert strict_json(to_json({"x": np.float64(0.5)}, indent=2)) == {"x": 0.5}


def test_inf_and_none_scores_leave_strict_json(tmp_path):
    def odd(samples, prompts, **_):  # inf, None and 0: a zero baseline, whose relative gain was +inf
        return [(math.inf, None, 0.0)[i % 3] for i in range(len(samples))]

    out = tmp_path / "run"
    train("toy", out=out, overrides=TINY, rewards={"sequence_match": odd}, progress=False)
    metrics = strict_lines(out / "metrics.jsonl")
    assert [m["reward/mean"] for m in metrics] == [0.0, 0.0, 0.0]
    assert all(m["reward/unscored"] == 6 for m in metrics)  # rows 0, 1, 3, 4, 6, 7 of 8
    ev = strict_json((out / "eval.json").read_text())
    gain = ev["primary"]["relative_gain"]
    assert gain is None or math.isfinite(gain)
    for gallery in (out / "samples").glob("*.jsonl"):
        strict_lines(gallery)


# ------------------------------------------------------------------------------- 2. nothing scored


@pytest.mark.parametrize("blank, progress", [(None, False), (math.nan, True)])
def test_a_step_nothing_could_score_trains_nothing_and_the_run_goes_on(tmp_path, monkeypatch, blank, progress):
    optimizers = []
    real_build = job_setup.build_optimizer

    def recording_build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        optimizers.append(built[0])
        return built

    monkeypatch.setattr(job_setup, "build_optimizer", recording_build)
    seen = []  # (weights, AdamW moments) as each training step's reward call finds them

    def blank_at_step_2(samples, prompts, **kwargs):
        opt = optimizers[-1]
        params = [p for group in opt.param_groups for p in group["params"]]
        moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state]
        seen.append(([p.detach().clone() for p in params], moments))
        if len(seen) == 2:
            return [blank] * len(samples)
        return sequence_match(samples, prompts, **kwargs)

    result = train("toy", out=tmp_path / "run", overrides=TINY + ["eval.num_prompts=0", "optim.weight_decay=0.1"],
                   rewards={"sequence_match": blank_at_step_2}, progress=progress)
    assert [m["step"] for m in result.metrics] == [1, 2, 3]
    step2 = result.metrics[1]
    assert step2["reward/mean"] is None and step2["reward/unscored"] == 8 and step2["rows"] == 0
    (w1, m1), (w2, m2), (w3, m3) = seen  # before steps 1, 2, 3
    assert any(not a.equal(b) for a, b in zip(w1, w2))  # step 1 trained
    assert all(a.equal(b) for a, b in zip(w2, w3))  # step 2 did not
    assert len(m2) == len(m3)
    assert all(a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a) for a, b in zip(m2, m3))
    strict_lines(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.parametrize("weight", [".nan", ".inf"])
def test_a_non_finite_reward_weight_is_one_line_before_the_run_directory(tmp_path, weight):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^rewards\.0\.weight must be a finite number, got (nan|inf)$"):
        train("toy", out=out, overrides=TINY + [f"rewards.0.weight={weight}"], progress=False)
    assert not out.exists()


# ------------------------------------------------------------------------------- 3. one writer


HOLD_LOCK = (
    "import sys; from pathlib import Path; from mmgrpo.rundir import RunLock; "
    "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); sys.stdin.read()"
)


@contextlib.contextmanager
def held_by_another_process(folder):
    """A child process holds the run's lock until the block ends; yields its PID."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        yield child.pid
    finally:
        child.stdin.close()
        child.wait(timeout=120)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, finished):
    out = _copy(finished, tmp_path / "run")
    before = _files(out)
    with held_by_another_process(out) as pid:
        with pytest.raises(ConfigError, match=rf"in use by another mmgrpo process \(PID {pid}\)"):
            train(None, resume=out, max_steps=3, progress=False)
        with pytest.raises(ConfigError, match=rf"\(PID {pid}\)"):
            train("toy", out=out, overrides=TINY, progress=False)
    assert _files(out) == before
    resumed = train(None, resume=out, max_steps=3, progress=False)  # the holder is gone: so is its lock
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3]


# ------------------------------------------------------------------------------- 4. --out that is not a run


def test_an_out_that_is_not_a_run_is_refused_and_left_untouched(tmp_path):
    mine = tmp_path / "mine"
    (mine / "samples").mkdir(parents=True)
    (mine / "config.yaml").write_text("my: own config\n")
    (mine / "eval.json").write_text('{"mine": 1}\n')
    (mine / "samples" / "before.jsonl").write_text("my samples\n")
    before = _files(mine)
    with pytest.raises(ConfigError, match=r"^--out '.*mine' already holds files that are not a run .*new or empty folder"):
        train("toy", out=mine, overrides=TINY, progress=False)
    assert _files(mine) == before and sorted(p.name for p in mine.iterdir()) == ["config.yaml", "eval.json", "samples"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(ConfigError, match=r"^--out '.*notes\.txt' is a file"):
        train("toy", out=a_file, overrides=TINY, progress=False)
    assert a_file.read_text() == "mine"


def test_an_empty_existing_folder_takes_a_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = train("toy", out=empty, overrides=TINY + ["train.max_steps=1", "eval.num_prompts=0"], progress=False)
    assert [m["step"] for m in result.metrics] == [1]


# ------------------------------------------------------------------------------- 5. dead directories


def test_a_batch_that_does_not_split_over_the_processes_stops_before_the_run_directory(tmp_path, monkeypatch):
    class ThreeProcesses(job_setup.Collective):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.world_size = 3

    monkeypatch.setattr(job_setup, "Collective", ThreeProcesses)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"= 8 rows cannot be split evenly over 3 processes"):
        train("toy", out=out, overrides=TINY, progress=False)
    assert not out.exists()


class PickyToy(ToyAdapter):
    """A toy adapter that checks its prompts the way the media adapters do (check_prompts)."""

    def check_prompts(self, prompts):
        for i, p in enumerate(prompts):
            if not p["prompt"].isalpha():
                raise ValueError(f"prompt {i}: field 'prompt' = {p['prompt']!r} is not letters only")


def test_prompts_are_checked_before_the_run_directory(tmp_path):
    good = toy_prompts(num_train=8, num_eval=2, max_len=6)
    bad = [{"prompt": "ab1", "target": "bc2"}]
    out = tmp_path / "run"
    for prompts, held_out, index in ((good["train"], bad + good["eval"], 0), (good["train"] + bad, good["eval"], 8)):
        with pytest.raises(ConfigError, match=rf"^prompt {index}: field 'prompt' = 'ab1' is not letters only$"):
            train("toy", adapter=PickyToy(max_len=6, hidden=16), prompts=prompts, eval_prompts=held_out, out=out,
                  overrides=TINY, progress=False)
        assert not out.exists()
    with pytest.raises(ConfigError, match="no held-out prompts"):
        train("toy", prompts=good["train"], eval_prompts=[], out=out, overrides=TINY, progress=False)
    assert not out.exists()


def test_a_run_that_died_before_its_first_checkpoint_resumes_from_step_0(tmp_path):
    calls = []

    def dies_at_step_2(samples, prompts, **kwargs):  # calls: "before" evaluation, step 1, step 2
        calls.append(len(samples))
        if len(calls) == 3:
            raise RuntimeError("reward server went away")
        return sequence_match(samples, prompts, **kwargs)

    dead = tmp_path / "dead"
    with pytest.raises(RewardError, match="reward server went away"):
        train("toy", out=dead, overrides=TINY, rewards={"sequence_match": dies_at_step_2}, progress=False)
    assert (dead / "config.yaml").is_file() and not list((dead / "checkpoints").glob("step_*"))
    with pytest.raises(ConfigError, match=rf"stopped before its first checkpoint: --resume {re.escape(str(dead))} "
                                          r"starts it again from step 0"):
        train("toy", out=dead, overrides=TINY, progress=False)
    resumed = train(None, resume=dead, rewards={"sequence_match": sequence_match}, progress=False)
    straight = train("toy", out=tmp_path / "straight", overrides=TINY, rewards={"sequence_match": sequence_match},
                     progress=False)
    assert _without_time(resumed.metrics) == _without_time(straight.metrics)
    assert resumed.eval["before"] == straight.eval["before"] and resumed.eval["after"] == straight.eval["after"]


# ------------------------------------------------------------------------------- 6. resume with changes


@pytest.mark.parametrize("change, key", [("train.group_size=2", "train.group_size"), ("optim.lr=0.5", "optim.lr")])
def test_resume_refuses_settings_that_would_make_another_run(tmp_path, finished, change, key):
    out = _copy(finished, tmp_path / "run")
    before = _files(out)
    with pytest.raises(ConfigError, match=rf"^--resume cannot change {re.escape(key)} .*start a new run"):
        train(None, resume=out, overrides=[change], max_steps=3, progress=False)
    assert _files(out) == before


DECAY = TINY + ["optim.schedule=linear", "optim.lr=0.01", "eval.num_prompts=0", "train.checkpoint_every=1"]


def test_extending_a_run_keeps_its_lr_schedule(tmp_path):
    # a run started for 2 steps: its linear schedule spans 2 steps, and still does when it is extended
    short = train("toy", out=tmp_path / "short", overrides=DECAY + ["train.max_steps=2"], progress=False)
    assert load_config(tmp_path / "short" / "config.yaml").optim.horizon == 2
    longer = train(None, resume=tmp_path / "short", max_steps=4, overrides=["train.keep_checkpoints=4"],
                   progress=False)
    assert [m["lr"] for m in longer.metrics] == [m["lr"] for m in short.metrics] + [0.0, 0.0]
    saved = load_config(tmp_path / "short" / "config.yaml")
    assert (saved.train.max_steps, saved.train.keep_checkpoints, saved.optim.horizon) == (4, 4, 2)
    assert len(list((tmp_path / "short" / "checkpoints").glob("step_*"))) == 4
    # a run started with the horizon of a longer one, then extended, equals that longer run
    train("toy", out=tmp_path / "half", overrides=DECAY + ["train.max_steps=2", "optim.horizon=4"], progress=False)
    resumed = train(None, resume=tmp_path / "half", max_steps=4, progress=False)
    straight = train("toy", out=tmp_path / "straight", overrides=DECAY + ["train.max_steps=4"], progress=False)
    assert [m["lr"] for m in straight.metrics] == pytest.approx([0.0075, 0.005, 0.0025, 0.0])  # lr after each step
    assert _without_time(resumed.metrics) == _without_time(straight.metrics)


# ------------------------------------------------------------------------------- 7. the interrupted message


INTERRUPTING_REWARD = """
from mmgrpo.rewards.sequence import sequence_match as score

calls = []


def sequence_match(samples, prompts, **kwargs):  # calls: "before" evaluation, step 1, step 2
    calls.append(len(samples))
    if len(calls) == 3:
        raise KeyboardInterrupt
    return score(samples, prompts, **kwargs)
"""


@pytest.mark.parametrize("checkpoint_every", [100, 1])
def test_the_interrupted_message_names_the_directory_and_what_resume_does(tmp_path, capsys, checkpoint_every):
    from mmgrpo.cli import main

    reward = tmp_path / "rewards.py"
    reward.write_text(textwrap.dedent(INTERRUPTING_REWARD))
    out = tmp_path / "run"
    args = ["train", "--modality", "toy", "--out", str(out), "--no-progress"]
    for assignment in TINY + [f"train.checkpoint_every={checkpoint_every}", f"rewards.0.name={reward}:sequence_match"]:
        args += ["--set", assignment]
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert "DIR" not in err and len(err.splitlines()) == 1
    if checkpoint_every == 1:
        assert err == (f"mmgrpo: interrupted; the checkpoint of step 1 is intact: mmgrpo train --resume {out} "
                       "continues from it")
    else:
        assert err == f"mmgrpo: interrupted; no checkpoint yet: --resume {out} starts it again from step 0"
        assert main(["train", "--resume", str(out), "--no-progress"]) == 0
        assert [m["step"] for m in strict_lines(out / "metrics.jsonl")] == [1, 2, 3]


def test_a_run_nothing_could_score_finishes_on_the_command_line(tmp_path, capsys):
    from mmgrpo.cli import main

    reward = tmp_path / "rewards.py"
    reward.write_text("def sequence_match(samples, prompts, **_):\n    return [None] * len(samples)\n")
    out = tmp_path / "run"
    args = ["train", "--modality", "toy", "--out", str(out), "--no-progress", "--max-steps", "1"]
    for assignment in TINY + [f"rewards.0.name={reward}:sequence_match"]:
        args += ["--set", assignment]
    assert main(args) == 0
    assert f"finished step 1: reward/mean n/a; metrics in {out}" in capsys.readouterr().out
    assert strict_lines(out / "metrics.jsonl")[0]["rows"] == 0
