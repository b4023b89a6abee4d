"""Errors a person can read: every mistake below is one line "mmgrpo: error: ..." (exit 2, no traceback),
found before any training and before a run directory exists.

Bad media and prompt text (each adapter's check_prompts), config sources and ranges, reward
failures (a traceback only with --debug / MMGRPO_DEBUG=1), a closed stdout pipe, several launched
processes, checkpoints that are not on this machine, and a baseline of 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmgrpo.cli import main
from mmgrpo.config import ConfigError
from mmgrpo.evaluation import primary_summary
from mmgrpo.pipelines.toy import ToyAdapter
from mmgrpo.rundir import RunResult

TINY = ["--set", "train.prompts_per_step=2", "--set", "train.group_size=2", "--set", "eval.num_prompts=2",
        "--set", "train.micro_batch_size=4", "--no-progress"]  # fmt: skip


def one_error_line(capsys, code: int) -> str:
    """The single stderr line of a CLI call that exited with 2 (asserting there is nothing else)."""
    captured = capsys.readouterr()
    progress = ("it/s]", "s/it]")  # tqdm bars (transformers' "Loading weights") are not error output
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.endswith(progress)]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("mmgrpo: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch, tmp_path):
    """Tests start as a plain single process in an empty folder, whatever launched pytest."""
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION",
                "ACCELERATE_USE_CPU", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                "MMGRPO_DEBUG"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)


# ------------------------------------------------------------------------------- 1. prompts and media


def png(path: Path, size=(20, 16)) -> Path:
    from PIL import Image

    Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(path)
    return path


def test_toy_check_prompts_names_the_prompt():
    adapter = ToyAdapter()
    adapter.check_prompts(["abc", {"prompt": "fed", "target": "afe"}])
    with pytest.raises(ConfigError, match=r"^toy prompt 1 'xyz' must use only 'abcdef'"):
        adapter.check_prompts(["abc", "xyz"])
    with pytest.raises(ConfigError, match=r"prompt 0 .*at most 6 symbols"):
        adapter.check_prompts(["abcdefabc"])
    with pytest.raises(ConfigError, match=r"^prompt 2 is a int without a 'prompt' string"):
        adapter.check_prompts(["abc", "abc", 42])


def test_flow_check_prompts_needs_text():
    pytest.importorskip("diffusers")
    from mmgrpo.pipelines.flow.adapter import FlowAdapter
    from mmgrpo.pipelines.flow.tiny import tiny_pipeline

    adapter = FlowAdapter(tiny_pipeline("sd3"), num_steps=2)
    adapter.check_prompts(["a red cube", {"prompt": "a blue ball", "objects": ["ball"]}])
    with pytest.raises(ConfigError, match=r"^prompt 1 is a dict without a 'prompt' string") as caught:
        adapter.check_prompts(["a red cube", {"caption": "a blue ball"}])
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def vlm_adapter():
    pytest.importorskip("transformers")
    from mmgrpo.pipelines.vlm import VLMAdapter
    from mmgrpo.registry import expand_assets

    return VLMAdapter(**expand_assets({"model": "asset:vlm"}), max_new_tokens=2, video_nframes=2)


def test_vlm_check_prompts_accepts_good_media(vlm_adapter, tmp_path):
    imageio = pytest.importorskip("imageio")
    pytest.importorskip("decord")
    video = tmp_path / "clip.mp4"
    imageio.mimwrite(video, np.full((4, 32, 32, 3), 90, np.uint8), fps=4)
    vlm_adapter.check_prompts([
        "text only",
        {"prompt": "a", "image": str(png(tmp_path / "a.png"))},
        {"prompt": "b", "images": [np.zeros((8, 8, 3), np.uint8), str(tmp_path / "a.png")]},
        {"prompt": "c", "video": str(video)},
        {"prompt": "d", "video": np.zeros((2, 8, 8, 3), np.uint8)},
    ])  # fmt: skip


def vlm_media_cases(tmp_path: Path) -> list[tuple[dict, str]]:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png(tmp_path / "good.png").read_bytes()[:60])  # a PNG cut after its header
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 20)
    q = {"prompt": "q"}
    return [
        ({**q, "image": str(tmp_path / "missing.png")}, r"prompt 1, field 'image': .*'.*missing\.png' does not exist"),
        ({**q, "image": str(corrupt)}, r"prompt 1, field 'image': cannot read image '.*corrupt\.png'"),
        ({**q, "image": 42}, r"prompt 1, field 'image': 42 is an int, not an image"),
        ({**q, "images": [str(tmp_path / "good.png"), "nope.jpg"]},
         r"prompt 1, field 'images\[1\]': .*'nope\.jpg' does not exist"),
        ({**q, "images": "one.png"}, r"prompt 1, field 'images' must be a list of images, got str"),
        ({**q, "video": str(empty)}, r"prompt 1, field 'video': video file '.*empty\.mp4' is empty \(0 bytes\)"),
        ({**q, "video": str(garbage)}, r"prompt 1, field 'video': cannot open video '.*garbage\.mp4'"),
        ({"prompt": 7, "image": str(tmp_path / "good.png")}, r"prompt 1 is a dict without a 'prompt' string"),
    ]


def test_vlm_check_prompts_one_line_per_bad_media(vlm_adapter, tmp_path):
    pytest.importorskip("decord")
    for bad, message in vlm_media_cases(tmp_path):
        with pytest.raises(ConfigError, match=message) as caught:
            vlm_adapter.check_prompts(["fine", bad])
        assert "\n" not in str(caught.value)


def test_vlm_prompt_file_with_a_missing_image_stops_before_the_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    png(tmp_path / "ok.png")
    good = {"prompt": "Where is the circle?", "image": "ok.png", "box": [0, 0, 4, 4]}
    (tmp_path / "train.jsonl").write_text(
        "\n".join(json.dumps(p) for p in [good, good, {**good, "image": "pics/lost.png"}, good]) + "\n"
    )
    (tmp_path / "eval.jsonl").write_text(json.dumps(good) + "\n")
    code = main(["train", "--modality", "vlm", "--out", "run", "--set", "data.source=train.jsonl",
                 "--set", "data.eval_source=eval.jsonl", *TINY])  # fmt: skip
    line = one_error_line(capsys, code)
    assert "prompt 2" in line and "'image'" in line and "pics/lost.png" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- 2. config sources


def test_config_flag_always_names_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(capsys, main(["train", "--config", "nosuch"]))
    assert line.startswith("mmgrpo: error: config file 'nosuch' does not exist")
    line = one_error_line(capsys, main(["train", "--config", "toy"]))  # a shipped name given as a file
    assert "config file 'toy' does not exist" in line and "--modality toy" in line
    line = one_error_line(capsys, main(["train", "--modality", "tyo"]))
    assert "unknown modality 'tyo' (did you mean 'toy'?)" in line


def test_modality_names_only_shipped_configs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("modality: toy\n")
    line = one_error_line(capsys, main(["train", "--modality", "mine.yaml"]))
    assert "unknown modality 'mine.yaml'" in line and "--config" in line


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_config_file_is_refused(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    line = one_error_line(capsys, main(["train", "--config", str(path), "--out", str(tmp_path / "r")]))
    assert f"config file '{path}' is empty" in line
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------- 3. ranges


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=-0.001"], "optim.lr must be a finite number >= 0, got -0.001"),
        (["optim.lr=.nan"], "optim.lr must be a finite number >= 0, got nan"),
        (["optim.betas=[0.9, 1.0]"], r"optim.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
        (["optim.betas=[-0.1, 0.9]"], r"optim.betas must be two numbers in [0, 1), got [-0.1, 0.9]"),
        (["optim.betas=[0.9]"], r"optim.betas must be two numbers in [0, 1), got [0.9]"),
        (["advantage.eps=-1e-4"], "advantage.eps must be >= 0, got -0.0001"),
        (["train.dynamic_sampling=true", "train.dynamic_sampling_max_rounds=0"],
         "train.dynamic_sampling_max_rounds must be at least 1, got 0"),
        (["eval.batch_size=0"], "eval.batch_size must be at least 1, got 0"),
        (["eval.samples_per_prompt=0"], "eval.samples_per_prompt must be at least 1, got 0"),
        (["advantage.estimator=ngrpo"], "advantage.estimator=ngrpo needs advantage.max_reward"),
        (["rewards.0.weight=0"], "every reward has weight 0"),
    ],
)
def test_config_ranges_are_one_line(tmp_path, capsys, overrides, message):
    sets = [arg for o in overrides for arg in ("--set", o)]
    line = one_error_line(capsys, main(["train", "--modality", "toy", "--out", str(tmp_path / "r"), *sets]))
    assert message in line
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------- 5. a closed pipe


def test_list_into_a_closed_pipe_is_quiet():
    # `mmgrpo list | head -1`: the reader is gone before the writer writes (closed here at once)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmgrpo.cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141)
    assert err == ""


# ------------------------------------------------------------------------------- 6. reward failures, --debug


def failing_reward_config(tmp_path: Path) -> Path:
    (tmp_path / "boom.py").write_text("def boom(samples, prompts, **kw):\n    raise KeyError('score')\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"modality: toy\nrewards:\n  - {{name: '{tmp_path / 'boom.py'}:boom'}}\n")
    return config


def test_reward_failure_is_one_line(tmp_path, capsys):
    config = failing_reward_config(tmp_path)
    line = one_error_line(capsys, main(["train", "--config", str(config), "--out", str(tmp_path / "r"), *TINY]))
    assert "boom" in line and "KeyError" in line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    from mmgrpo.scoring import RewardError

    config = failing_reward_config(tmp_path)
    argv = ["train", "--config", str(config), "--out", str(tmp_path / "r"), *TINY]
    if how == "env":
        monkeypatch.setenv("MMGRPO_DEBUG", "1")
    with pytest.raises(RewardError):
        main(["--debug", *argv] if how == "flag" else argv)
    with pytest.raises(ConfigError):
        main(["--debug", "train", "--modality", "toy", "--set", "optim.lr=-1"])


# ------------------------------------------------------------------------------- 7. several processes


def test_config_error_printed_by_rank_zero_only(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--modality", "toy", "--set", "optim.lr=-1"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert "optim.lr" in one_error_line(capsys, main(["train", "--modality", "toy", "--set", "optim.lr=-1"]))


def fake_train(out_dir: Path):
    def train(source, **kwargs):
        print("training")
        return RunResult(out_dir, metrics=[{"step": 3, "reward/mean": 0.5}])

    return train


def test_finished_is_printed_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mmgrpo.trainer.train", fake_train(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, expected in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--modality", "toy"]) == 0
        assert capsys.readouterr().out.count("finished step 3") == expected


def test_one_process_where_the_launcher_was_asked_for_more(tmp_path, capsys, monkeypatch):
    # what `accelerate launch --cpu --num_processes 2` exports before running ONE process
    monkeypatch.setattr("mmgrpo.trainer.train", fake_train(tmp_path))
    for key, value in {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    assert main(["train", "--modality", "toy"]) == 0
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]
    assert first.startswith("mmgrpo: warning: ") and "1 process" in first and "torchrun" in first
    assert captured.out.splitlines()[0] == "training"  # the warning came before anything else
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started them all: nothing to say
    monkeypatch.setenv("RANK", "0")
    main(["train", "--modality", "toy"])
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------------------- 8. weights not on this machine


def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def test_vlm_checkpoint_not_cached_offline(tmp_path, capfd, monkeypatch):
    pytest.importorskip("transformers")
    offline(monkeypatch, tmp_path)
    out = tmp_path / "r"
    line = one_error_line(capfd, main(["train", "--modality", "qwen2.5-vl-3b", "--out", str(out)]))
    assert "'Qwen/Qwen2.5-VL-3B-Instruct'" in line and "--set pipeline.kwargs.model=/local/folder" in line
    assert not out.exists()


def test_flow_checkpoint_not_cached_offline(tmp_path, capfd, monkeypatch):
    pytest.importorskip("diffusers")
    offline(monkeypatch, tmp_path)
    out = tmp_path / "r"
    # capfd: diffusers' logger writes to the stream it was configured with, which capsys does not see
    line = one_error_line(capfd, main(["train", "--modality", "sd3", "--out", str(out)]))
    assert "'stabilityai/stable-diffusion-3.5-medium'" in line and "--set pipeline.kwargs.path=/local/folder" in line
    assert not out.exists()


def test_loader_warnings_shown_only_when_the_load_succeeds(caplog):
    import logging

    from mmgrpo.pipelines.toolkit import logs_kept_unless_failed

    logger = logging.getLogger("mmgrpo.test_loader")
    with logs_kept_unless_failed("mmgrpo.test_loader"):
        logger.warning("some weights were not used")
    assert "some weights were not used" in caplog.text
    with pytest.raises(OSError), logs_kept_unless_failed("mmgrpo.test_loader"):
        logger.warning("Couldn't connect to the Hub")
        raise OSError("not cached")
    assert "Couldn't connect" not in caplog.text and logger.propagate and not logger.handlers


# ------------------------------------------------------------------------------- 9. a baseline of 0


def test_gain_over_a_zero_baseline_is_absolute(tmp_path, capsys):
    from mmgrpo.distributed import Collective
    from mmgrpo.evaluation import gain_text
    from mmgrpo.rundir import RunDir

    before = {"reward/r/mean": 0.0, "per_sample": {"r": [0.0, 0.0, 0.0, 0.0]}}
    after = {"reward/r/mean": 0.25, "per_sample": {"r": [0.0, 0.5, 0.25, 0.25]}}
    summary = primary_summary({"before": before, "after": after}, "r")
    assert summary["relative_gain"] is None and summary["absolute_gain"] == pytest.approx(0.25)
    assert gain_text(summary).startswith("0.0000 -> 0.2500 (+0.2500 absolute; the baseline is 0, 95% CI")
    nonzero = primary_summary({"before": {"reward/r/mean": 0.5}, "after": {"reward/r/mean": 0.75}}, "r")
    assert nonzero["relative_gain"] == pytest.approx(0.5) and gain_text(nonzero) == "0.5000 -> 0.7500 (+50.0%)"

    run = RunDir(tmp_path, Collective())
    run.metrics_path.write_text(json.dumps({"step": 1, "reward/mean": 0.1, "loss": 0.0}) + "\n")
    run.eval_path.write_text(json.dumps({"before": before, "after": after}))
    run.finish("r")
    printed = capsys.readouterr().out
    assert "0.0000 -> 0.2500 (+0.2500 absolute; the baseline is 0" in printed and "inf" not in printed
    saved = json.loads(run.eval_path.read_text())["primary"]
    assert saved["relative_gain"] is None and saved["absolute_gain"] == pytest.approx(0.25)
