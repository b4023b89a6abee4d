"""The embedded masked-diffusion default: configs/mdlm.yaml over assets/mdlm, and its build command."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from mmgrpo.assets import asset_path  # noqa: E402
from mmgrpo.config import config_dir, load_config  # noqa: E402
from mmgrpo.data import load_prompts  # noqa: E402
from mmgrpo.pipelines.mdlm import MaskedDiffusionAdapter  # noqa: E402
from mmgrpo.pretrain import mdlm as build  # noqa: E402
from mmgrpo.scoring import build_rewards, score_rollout  # noqa: E402
from mmgrpo.setup import build_adapter  # noqa: E402
from mmgrpo.trainer import train  # noqa: E402

FAST = [
    "train.max_steps=2",
    "train.prompts_per_step=2",
    "train.group_size=2",
    "train.checkpoint_every=100",
    "data.kwargs.num_train=6",
    "data.kwargs.num_eval=3",
    "eval.num_prompts=3",
    "eval.samples_per_prompt=1",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matrices, one thread is fastest


def test_true_answers_score_one_under_the_shipped_rewards():
    cfg = load_config("mdlm", ["data.kwargs.num_train=30", "data.kwargs.num_eval=30"])
    train_items, held_out = load_prompts(cfg.data, cfg.train.seed)
    items = train_items + held_out
    scores, _ = score_rollout(build_rewards(cfg.rewards), [p["answer"] for p in items], items)  # [N, 3]
    assert (scores[:, :2] == 1).all()
    sudoku = torch.tensor([p["task"] == "sudoku" for p in items])
    assert (scores[sudoku, 2] == 1).all() and scores[~sudoku, 2].isnan().all()


def test_the_shipped_asset_loads_and_answers_in_the_canvas():
    folder = asset_path("mdlm")
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10e6
    assert "python -m mmgrpo.pretrain.mdlm" in (folder / "MODEL_CARD.md").read_text()
    cfg = load_config("mdlm")
    adapter = build_adapter(cfg)
    assert isinstance(adapter, MaskedDiffusionAdapter) and type(adapter.model).__name__ == "BertForMaskedLM"
    items = load_prompts(cfg.data, cfg.train.seed)[1][:24]
    rollout = adapter.sample(items, 1, torch.Generator().manual_seed(0))
    scores, _ = score_rollout(build_rewards(cfg.rewards), rollout.samples, items)
    assert scores[:, 1].mean() > 0.5  # mostly well-formed answers: it was trained
    assert scores[:, 0].mean() < 1.0  # and it is imperfect


def test_quick_build_makes_a_loadable_folder(tmp_path):
    assert build.main(["--quick", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    adapter = MaskedDiffusionAdapter(str(tmp_path / "m"), finetune="full", keep_reference=False, **build.SAMPLING)
    assert adapter.mask_id == adapter.tokenizer.mask_token_id
    info = json.loads((tmp_path / "m" / "build.json").read_text())
    assert info["steps"] == build.QUICK["max_steps"] and "greedy (temperature 0)" in info["held_out"]
    card = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert "Held-out scores" in card and f"{info['parameters']:,} parameters" in card


def test_train_modality_mdlm_runs(tmp_path):
    result = train("mdlm", overrides=FAST, out=tmp_path / "run", progress=False)
    assert len(result.metrics) == 2 and "reward/reasoning_accuracy/mean" in result.eval["after"]
    gallery = [json.loads(line) for line in (tmp_path / "run" / "samples" / "after.jsonl").read_text().splitlines()]
    assert {"text", "tokens", "steps"} <= set(gallery[0]["sample"])  # text with its unmasking order


def test_the_lightning_config_trains_on_accuracy_and_speed_normalised_apart(tmp_path):
    """configs/mdlm-lightning.yaml: accuracy + tokens per forward (threshold sampling, so the speed varies), each
    normalised within its group (advantage.combine normalize_then_sum), trains the embedded model."""
    cfg = load_config(config_dir() / "mdlm-lightning.yaml")
    assert [r.name for r in cfg.rewards] == ["reasoning_accuracy", "tokens_per_forward"]
    assert cfg.advantage.combine == "normalize_then_sum" and cfg.pipeline.kwargs["threshold"] == 0.9
    overrides = [o for o in FAST if not o.startswith("train.group_size")] + ["train.group_size=4"]
    result = train(cfg, overrides=overrides, out=tmp_path / "run", progress=False)
    assert len(result.metrics) == 2
    speeds = [m["reward/tokens_per_forward/mean"] for m in result.metrics]
    assert all(s > 1.0 for s in speeds)  # 16 tokens in fewer than 16 forwards: several tokens per forward
    assert any(m["advantage/abs_mean"] > 0 and m["grad_norm"] > 0 for m in result.metrics)
