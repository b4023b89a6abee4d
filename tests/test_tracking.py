"""train.log_with: metrics and gallery media mirrored to TensorBoard (read back with its event reader) and to
W&B in offline mode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mmgrpo.config import ConfigError
from mmgrpo.trainer import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TINY = [
    "train.max_steps=4",
    "train.prompts_per_step=2",
    "train.group_size=4",
    "train.checkpoint_every=2",
    "train.gallery_every=2",
    "eval.num_prompts=2",
    "eval.gallery=2",
    "data.kwargs.num_train=16",
    "data.kwargs.num_eval=2",
    "pipeline.kwargs.hidden=16",
]


def _events(run_dir):
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard" / "mmgrpo"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _logged(run_dir, key="reward/mean"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows]


def _scalars(acc, key="reward/mean"):
    return [(e.step, e.value) for e in acc.Scalars(key)]


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    train("toy", out=out, overrides=TINY + ["train.log_with=[tensorboard]"], progress=False)
    return out


def test_tensorboard_scalars_match_metrics_jsonl(tb_run):
    acc = _events(tb_run)
    logged = _logged(tb_run)
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert _scalars(acc) == [(s, pytest.approx(v)) for s, v in logged]
    assert _scalars(acc, "loss") == [(s, pytest.approx(v)) for s, v in _logged(tb_run, "loss")]


def test_tensorboard_gets_every_gallery(tb_run):
    tags = _events(tb_run).Tags()["tensors"]  # text summaries: the toy's samples are strings
    for gallery in ("before", "train_step000002", "train_step000004", "after"):
        assert f"{gallery}/000/text_summary" in tags and f"{gallery}/001/text_summary" in tags, (gallery, tags)


def test_resumed_run_hides_steps_logged_after_the_checkpoint(tmp_path, tb_run):
    out = tmp_path / "run"
    shutil.copytree(tb_run, out)
    shutil.rmtree(out / "checkpoints" / "step_000004")  # stopped after logging steps 3 and 4
    (out / "checkpoints" / "latest").write_text("step_000002\n")
    train(None, resume=out, progress=False)
    assert _scalars(_events(out)) == [(s, pytest.approx(v)) for s, v in _logged(out)]  # 4 points, not 6


def test_gallery_media_are_logged_as_images_and_audio(tmp_path):
    from accelerate import Accelerator

    from mmgrpo.tracking import Trackers, accelerator_kwargs

    soundfile = pytest.importorskip("soundfile")
    folder = tmp_path / "samples" / "after"
    folder.mkdir(parents=True)
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)  # [H, W, 3]
    pixels[:, :8, 0] = 255
    Image.fromarray(pixels).save(folder / "000.png")
    soundfile.write(str(folder / "001.wav"), np.zeros(800, dtype=np.float32), 8000)
    entries = [
        {"prompt": "a red half", "rewards": {"clip": 0.25}, "file": "samples/after/000.png"},
        {"prompt": "silence", "rewards": {"pesq": None}, "file": "samples/after/001.wav"},
    ]
    accelerator = Accelerator(cpu=True, **accelerator_kwargs(["tensorboard"], tmp_path))
    trackers = Trackers(accelerator, ["tensorboard"])
    trackers.start({"train": {"seed": 0, "log_with": ["tensorboard"]}}, "media")
    trackers.log_gallery(tmp_path, entries, "after", step=3)
    trackers.finish()
    acc = _events(tmp_path)
    image = acc.Images("after/000")[0]
    assert image.step == 3 and (image.width, image.height) == (16, 16)
    assert acc.Audio("after/001")[0].sample_rate == 8000


def test_unknown_tracker_stops_before_the_run_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.log_with: unknown tracker 'tensorbord' \(did you mean 'tensorboa"):
        train("toy", out=tmp_path / "run", overrides=TINY + ["train.log_with=[tensorbord]"], progress=False)
    assert not (tmp_path / "run").exists()


def test_wandb_runs_offline_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default, not something the user must set
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: any upload would fail
    out = tmp_path / "run"
    train("toy", out=out, overrides=TINY + ["train.max_steps=2", "eval.num_prompts=0", "train.log_with=[wandb]"],
          progress=False)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert not list((out / "wandb").glob("run-*"))  # an online run would be named run-*
