"""The shipped flow configs (image, video, sd3, flux, wan) and the embedded tiny SD3 / Wan models.

Fast tests: every config loads; the real-checkpoint configs build a FlowAdapter through their own
loading path with the path overridden to a tiny local pipeline of the same class; the embedded
defaults train for one step through `mmgrpo.train` and export PNG / MP4 galleries; `--quick`
rebuilds load back. Slow tests (`-m slow`): the full GRPO demonstrations of the headline.
"""

from __future__ import annotations

import json

import pytest
import torch

import mmgrpo
from mmgrpo.config import load_config
from mmgrpo.trainer import build_adapter

REAL = {  # config -> (tiny family, size overrides, what the anchors say)
    "sd3": ("sd3", {"height": 16, "width": 16},
            {"noise_level": 0.7, "num_steps": 10, "eval_steps": 40, "guidance_scale": 4.5, "eps": 1e-4, "lr": 3e-4}),
    "flux": ("flux", {"height": 16, "width": 16},
             {"noise_level": 0.9, "num_steps": 10, "eval_steps": 40, "guidance_scale": 1.0, "eps": 1e-4, "lr": 3e-4}),
    "wan": ("wan", {"height": 16, "width": 16, "num_frames": 5},
            {"noise_level": 0.7, "num_steps": 20, "eval_steps": 50, "guidance_scale": 4.5, "eps": 1e-3, "lr": 1e-4}),
}


@pytest.mark.parametrize("name", ["image", "video", "sd3", "flux", "wan"])
def test_shipped_flow_configs_load(name):
    cfg = load_config(name)
    assert cfg.pipeline.name == "flow"
    kw = cfg.pipeline.kwargs
    assert kw["kernel"] == "sde" and kw["num_steps"] < kw["eval_steps"]
    assert cfg.rewards[0].name == "scene" and cfg.rewards[0].weight == 1.0
    assert cfg.rewards[1].name == "clip_score" and cfg.rewards[1].weight == 0.0
    assert cfg.data.source == "miniworld" and cfg.data.kwargs["kind"] == cfg.modality
    if name in ("image", "video"):
        assert kw["path"] == f"asset:{name}"


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_checkpoint_configs_follow_the_anchors_and_load_a_local_pipeline(name, tmp_path):
    from mmgrpo.pipelines.flow.tiny import TEXT_LEN, tiny_pipeline

    family, size, anchors = REAL[name]
    cfg = load_config(name)
    kw = cfg.pipeline.kwargs
    assert kw["noise_level"] == anchors["noise_level"]
    assert (kw["num_steps"], kw["eval_steps"]) == (anchors["num_steps"], anchors["eval_steps"])
    assert kw["timestep_fraction"] == 0.99 and kw["guidance_scale"] == anchors["guidance_scale"]
    assert (kw["finetune"], kw["lora_rank"], kw["lora_alpha"]) == ("lora", 32, 64)
    assert cfg.loss.eps_low == anchors["eps"] == cfg.loss.eps_high
    assert cfg.optim.lr == anchors["lr"] and cfg.optim.weight_decay == 1e-4 and cfg.optim.grad_clip == 1.0
    assert (cfg.optim.ema_decay, cfg.optim.ema_every) == (0.9, 8)
    assert cfg.loss.beta == 0.0 if name == "flux" else 0.004 <= cfg.loss.beta <= 0.04
    assert not kw["path"].startswith(("asset:", "/"))  # a hub id (or a local folder the user gives)

    tiny_pipeline(family, seed=1).save_pretrained(tmp_path / family)
    overrides = [f"pipeline.kwargs.path={tmp_path / family}", "pipeline.kwargs.torch_dtype=float32",
                 f"pipeline.kwargs.max_sequence_length={TEXT_LEN}", "pipeline.kwargs.num_steps=2",
                 "pipeline.kwargs.eval_steps=2", "pipeline.kwargs.gradient_checkpointing=false"]
    overrides += [f"pipeline.kwargs.{k}={v}" for k, v in size.items()]
    adapter = build_adapter(load_config(name, overrides))
    assert type(adapter.pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
                                           "wan": "WanPipeline"}[family]
    assert adapter.finetune == "lora" and adapter.noise_level == anchors["noise_level"]
    assert adapter.trainable_parameters() and all("lora" in n for n in adapter.trainable_parameters())
    rollout = adapter.sample(["a red circle"], 2, torch.Generator().manual_seed(0))
    assert rollout.mask.sum() == 2 * 1  # int(2 * 0.99) = 1 trained step per row
    assert torch.isfinite(rollout.log_probs).all()


def _quick_overrides(kind: str) -> list[str]:
    return [
        "train.max_steps=1", "train.prompts_per_step=2", "train.group_size=2", "train.micro_batch_size=4",
        "pipeline.kwargs.num_steps=3", "pipeline.kwargs.eval_steps=3", "pipeline.kwargs.window=null",
        "eval.num_prompts=2", "eval.batch_size=2", "eval.gallery=2",
        f"data.kwargs={{kind: {kind}, num_train: 4, num_eval: 2, size: 32}}",
    ]


@pytest.mark.parametrize("kind,suffix", [("image", ".png"), ("video", ".mp4")])
def test_embedded_default_trains_one_step_and_exports(kind, suffix, tmp_path):
    out = tmp_path / kind
    result = mmgrpo.train(kind, out=out, overrides=_quick_overrides(kind), progress=False)
    assert len(result.metrics) == 1
    ev = json.loads((out / "eval.json").read_text())
    for tag in ("before", "after"):
        scene = ev[tag]["reward/scene/mean"]
        assert 0.0 < scene <= 1.0  # the pretrained model draws something the scene checks can read
        assert ev[tag]["reward/clip_score/mean"] is not None
    files = sorted((out / "samples" / "before").glob(f"*{suffix}"))
    assert len(files) == 2 and all(f.stat().st_size > 100 for f in files)
    if kind == "video":  # each clip also has its contact sheet
        assert sorted(p.name for p in (out / "samples" / "before").glob("*.png")) == ["000.png", "001.png"]
    if kind == "video":
        import imageio.v3 as iio

        frames = iio.imread(files[0])
        assert frames.shape[0] == 9 and frames.shape[-1] == 3  # 9 frames of RGB


def test_embedded_models_draw_scenes_the_reward_can_read():
    """Held-out scene score of the shipped models, measured at build time, is in the GRPO-friendly band."""
    from mmgrpo.assets import asset_path

    for kind in ("image", "video"):
        record = json.loads((asset_path(kind) / "build.json").read_text())
        score = record["baseline"]["scene/score"]
        assert 0.15 <= score <= 0.8, (kind, score)
        size = sum(p.stat().st_size for p in asset_path(kind).rglob("*") if p.is_file())
        assert size <= 20e6


def test_noisy_captions_give_the_stated_share_another_scenes_caption():
    from mmgrpo.pretrain.flow_pretrain import noisy_captions

    captions = [f"scene {i}" for i in range(1000)]  # distinct, so every swap shows
    out = noisy_captions(captions, 0.3, seed=0)
    changed = [i for i in range(1000) if out[i] != captions[i]]
    assert len(changed) == 300  # exactly the share, and never a scene's own caption
    assert all(out[i] in captions for i in changed) and len({out[i] for i in changed}) > 200  # many donors
    assert noisy_captions(captions, 0.3, seed=0) == out and noisy_captions(captions, 0.3, seed=1) != out
    assert noisy_captions(captions, 0.0, seed=0) == captions
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="caption_noise"):
            noisy_captions(captions, bad, seed=0)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_quick_rebuild_loads_back(kind, tmp_path):
    import importlib

    from mmgrpo.pipelines.flow.adapter import FlowAdapter
    from mmgrpo.rewards.scene import SceneReward
    from mmgrpo import miniworld

    module = importlib.import_module(f"mmgrpo.pretrain.{kind}")
    from mmgrpo.pretrain.flow_pretrain import main

    out = tmp_path / kind
    record = main(kind, module.FULL, module.QUICK, ["--quick", "--out", str(out)])
    assert (out / "model_index.json").is_file() and (out / "MODEL_CARD.md").is_file()
    assert list((out / "transformer").glob("*.safetensors"))
    assert record["size_bytes"] < 20e6
    extra = {"num_frames": 9} if kind == "video" else {}
    adapter = FlowAdapter(path=str(out), finetune="full", eval_steps=2, max_sequence_length=16, height=32,
                          width=32, **extra)
    items = miniworld.prompt_set(kind, split="heldout", n=2)
    samples = adapter.sample(items, 1, torch.Generator().manual_seed(0), evaluate=True).samples
    assert samples[0].shape == ((3, 32, 32) if kind == "image" else (9, 3, 32, 32))
    scores = SceneReward()(samples, items)["score"]
    assert all(s is not None and 0.0 <= s <= 1.0 for s in scores)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "video"])
def test_grpo_raises_the_held_out_scene_score_within_ten_minutes(kind, tmp_path):
    """The headline: the shipped default, out of the box, gains >= 25% relative in <= 10 min; CLIPScore holds."""
    result = mmgrpo.train(kind, out=tmp_path / kind, progress=False)
    wall = sum(m["time/step"] for m in result.metrics)  # training only: the two evaluations are not counted
    ev = json.loads((tmp_path / kind / "eval.json").read_text())
    before, after = ev["before"]["reward/scene/mean"], ev["after"]["reward/scene/mean"]
    assert after >= 1.25 * before, (before, after)
    assert ev["after"]["reward/clip_score/mean"] >= ev["before"]["reward/clip_score/mean"] - 0.5
    assert wall <= 600, wall
