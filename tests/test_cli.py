"""The `mmgrpo` command as a user runs it."""

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "mmgrpo.cli"]


def run(*args, cwd=None):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_commands_and_examples():
    out = run("--help")
    assert out.returncode == 0
    for word in ("train", "list", "plot", "--resume", "examples"):
        assert word in out.stdout
    train_help = run("train", "--help").stdout
    for flag in ("--modality", "--config", "--set", "--max-steps", "--out", "--resume"):
        assert flag in train_help


def test_list_shows_registries():
    out = run("list")
    assert out.returncode == 0
    for word in ("toy", "sequence_match", "median", "dapo", "k3"):
        assert word in out.stdout


def test_mistyped_key_is_one_line_without_traceback(tmp_path):
    out = run("train", "--modality", "toy", "--set", "train.max_stepz=3", "--out", str(tmp_path / "r"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert lines == ["mmgrpo: error: unknown config key 'train.max_stepz' (did you mean 'train.max_steps'?)"]


def test_mistyped_adapter_option_is_one_line_without_traceback(tmp_path):
    out = run("train", "--modality", "toy", "--set", "pipeline.kwargs.hiden=8", "--out", str(tmp_path / "r"))
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert lines == ["mmgrpo: error: unknown config key 'pipeline.kwargs.hiden' (did you mean 'pipeline.kwargs.hidden'?)"]
    assert not (tmp_path / "r").exists()


def test_train_resume_and_plot(tmp_path):
    out_dir = tmp_path / "run"
    small = ["--set", "train.prompts_per_step=4", "--set", "train.group_size=4", "--set", "eval.num_prompts=4",
             "--set", "train.checkpoint_every=2"]
    first = run("train", "--modality", "toy", "--max-steps", "2", "--out", str(out_dir), "--no-progress", *small)
    assert first.returncode == 0, first.stderr
    assert "held-out sequence_match" in first.stdout
    again = run("train", "--resume", str(out_dir), "--max-steps", "4", "--no-progress")
    assert again.returncode == 0, again.stderr
    steps = [json.loads(l)["step"] for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    (out_dir / "rewards.png").unlink()
    plotted = run("plot", str(out_dir))
    assert plotted.returncode == 0 and (out_dir / "rewards.png").is_file()


def test_resume_of_a_non_run_directory(tmp_path):
    out = run("train", "--resume", str(tmp_path))
    assert out.returncode == 2 and "no config.yaml" in out.stderr


@pytest.mark.parametrize("args", [["train"], ["train", "--modality", "toy", "--config", "x.yaml"]])
def test_bad_argument_combinations(args):
    out = run(*args)
    assert out.returncode == 2
