"""A run directory someone has tampered with, or a crash has damaged (issue 15).

No code runs from a checkpoint (nothing in it is a pickle); a damaged latest checkpoint falls back
to the newest intact one with one warning line each; a metrics line torn by a killed process is
dropped, one torn in the middle is an error naming its line.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmgrpo.cli import main as cli_main
from mmgrpo.config import ConfigError
from mmgrpo.pipelines.toy import ToyAdapter
from mmgrpo.plotting import plot_metrics
from mmgrpo.trainer import TIME_KEYS, train

SMALL = [
    "train.max_steps=4",
    "train.prompts_per_step=4",
    "train.group_size=4",
    "train.checkpoint_every=2",
    "eval.num_prompts=0",
    "data.kwargs.num_train=32",
    "data.kwargs.num_eval=4",
]


class CountingToy(ToyAdapter):
    """The toy adapter with a sampler state like the flow adapter's (its number of sample calls)."""

    def __init__(self) -> None:
        super().__init__(max_len=6, hidden=16, init_seed=0)
        self.sample_calls = 0

    def sample(self, *args, **kwargs):
        self.sample_calls += 1
        return super().sample(*args, **kwargs)

    def sampler_state(self):
        return {"sample_calls": self.sample_calls}

    def load_sampler_state(self, state):
        self.sample_calls = int(state["sample_calls"])


class Planted:
    """Unpickling this makes a folder: the proof that a checkpoint ran code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """4 uninterrupted steps with checkpoints at 2 and 4: (run directory, final sample call count)."""
    adapter = CountingToy()
    out = tmp_path_factory.mktemp("run4") / "run"
    train("toy", adapter=adapter, out=out, overrides=SMALL, progress=False)
    return out, adapter.sample_calls


def _copy(run4, dest):
    shutil.copytree(run4[0], dest)
    return dest


def _resume(out):
    adapter = CountingToy()
    result = train(None, resume=out, adapter=adapter, progress=False)
    return result, adapter


def _weights(out, step=4):
    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "trainable.safetensors"))


def _metrics(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in lines]


def _warnings(err):
    return [line for line in err.splitlines() if line.startswith("mmgrpo: warning:")]


# ------------------------------------------------------------------------------- no pickles


def test_checkpoint_holds_no_pickle(run4):
    ckpt = run4[0] / "checkpoints" / "step_000004"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["adapter.json", "rng_rank0.safetensors", "trainable.safetensors", "trainer.json",
                     "trainer.safetensors"]
    assert json.loads((ckpt / "adapter.json").read_text()) == {"sample_calls": run4[1]}


@pytest.mark.parametrize("role", ["trainer", "rng_rank0", "adapter"])
def test_planted_pickle_is_refused_and_never_runs(tmp_path, run4, role):
    out = _copy(run4, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step_000002")  # nothing to fall back to
    planted = sorted((out / "checkpoints" / "step_000004").glob(f"{role}.*"))
    assert planted
    marker = tmp_path / "code-ran"
    for path in planted:
        torch.save(Planted(marker), path)
    with pytest.raises(ConfigError) as info:
        _resume(out)
    assert not marker.exists()
    message = str(info.value)
    assert "\n" not in message and planted[0].name in message and "step_000004" in message


def test_pickle_checkpoint_of_an_older_version_is_refused(tmp_path, run4):
    out = _copy(run4, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step_000002")
    ckpt = out / "checkpoints" / "step_000004"
    for path in ckpt.glob("trainer.*"):
        path.unlink()
    marker = tmp_path / "code-ran"
    torch.save(Planted(marker), ckpt / "trainer.pt")
    with pytest.raises(ConfigError, match=r"trainer\.pt is a pickle .* not loaded"):
        _resume(out)
    assert not marker.exists()


# ------------------------------------------------------------------------------- damaged checkpoints


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # what to break in checkpoints/ -> the name the warning must carry
    "truncated weights": (lambda ckpts: _truncate(ckpts / "step_000004" / "trainable.safetensors"),
                          "trainable.safetensors"),
    "missing optimizer state": (lambda ckpts: (ckpts / "step_000004" / "trainer.safetensors").unlink(),
                                "trainer.safetensors"),
    "garbage trainer state": (lambda ckpts: (ckpts / "step_000004" / "trainer.json").write_text('{"step": 4, '),
                              "trainer.json"),
    "missing sampling state": (lambda ckpts: (ckpts / "step_000004" / "rng_rank0.safetensors").unlink(), "rng_rank0"),
    "garbage in latest": (lambda ckpts: (ckpts / "latest").write_bytes(b"\x89PNG\x00\xff\n"), "latest"),
    "latest points outside": (lambda ckpts: (ckpts / "latest").write_text("..\n"), "latest"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_an_intact_one(tmp_path, run4, capsys, damage):
    out = _copy(run4, tmp_path / "run")
    corrupt, named = DAMAGE[damage]
    corrupt(out / "checkpoints")
    capsys.readouterr()
    result, adapter = _resume(out)
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1 and named in warnings[0], warnings
    # the run continues from step 2 (or from the intact step 4) and ends where the uninterrupted run did
    assert [m["step"] for m in result.metrics] == [1, 2, 3, 4]
    assert _metrics(out) == _metrics(run4[0])
    straight, resumed = _weights(run4[0]), _weights(out)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert adapter.sample_calls == run4[1]
    assert (out / "checkpoints" / "latest").read_text() == "step_000004\n"


def test_no_intact_checkpoint_is_one_error_line(tmp_path, run4, capsys):
    out = _copy(run4, tmp_path / "run")
    _truncate(out / "checkpoints" / "step_000004" / "trainable.safetensors")
    (out / "checkpoints" / "step_000002" / "trainer.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"^no intact checkpoint to resume in .*step_000004.*trainable\.safetensors"
                                          r".*step_000002.*trainer\.safetensors is missing") as info:
        _resume(out)
    assert "\n" not in str(info.value)
    assert len(_warnings(capsys.readouterr().err)) == 2  # one line per skipped checkpoint


# ------------------------------------------------------------------------------- torn metrics lines


def _tear(out, lines):
    """metrics.jsonl holding `lines` (dicts, or raw text for a torn line), without a final newline
    after a torn last line, as a process killed mid-write leaves it."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (out / "metrics.jsonl").write_text(text if isinstance(lines[-1], str) else text + "\n")


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, run4):
    out = _copy(run4, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step_000004")  # killed while logging step 3
    (out / "checkpoints" / "latest").write_text("step_000002\n")
    logged = [json.loads(line) for line in (run4[0] / "metrics.jsonl").read_text().splitlines()]
    _tear(out, logged[:2] + ['{"step": 3, "reward/me'])
    result, _ = _resume(out)
    assert [m["step"] for m in result.metrics] == [1, 2, 3, 4]
    assert _metrics(out) == _metrics(run4[0])


def test_torn_metrics_line_in_the_middle_names_its_line(tmp_path, run4):
    out = _copy(run4, tmp_path / "run")
    logged = [json.loads(line) for line in (run4[0] / "metrics.jsonl").read_text().splitlines()]
    _tear(out, [logged[0], '{"step": 2, "rew', *logged[2:]])
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"metrics\.jsonl line 2 is not JSON") as info:
        _resume(out)
    assert "\n" not in str(info.value)
    assert (out / "metrics.jsonl").read_text() == before  # left for the user to repair
    with pytest.raises(ConfigError, match=r"metrics\.jsonl line 2 is not JSON"):
        plot_metrics(out / "metrics.jsonl", tmp_path / "r.png")


def test_plot_drops_a_torn_last_line(tmp_path, run4, capsys):
    out = _copy(run4, tmp_path / "run")
    logged = [json.loads(line) for line in (run4[0] / "metrics.jsonl").read_text().splitlines()]
    _tear(out, logged + ['{"step": 5, "rew'])
    assert plot_metrics(out / "metrics.jsonl", tmp_path / "r.png").stat().st_size > 1000
    assert cli_main(["plot", str(out), "--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 1000
