"""CLIPScore: equal to a direct open_clip computation, batching-invariant, clamped at 0; the
embedded tiny CLIP prefers true captions on held-out scenes; the build script runs and loads."""

from __future__ import annotations

import doctest
import json
import shutil

import numpy as np
import pytest
import torch

import open_clip
from safetensors.torch import load_file, save_file

import mmgrpo.rewards.clip_score as clip_module
from mmgrpo import miniworld as mw
from mmgrpo.assets import asset_path
from mmgrpo.pretrain import clip as build
from mmgrpo.rewards.clip_score import CLIPScore

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]  # [3, 1, 1]
STD = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]  # [3, 1, 1]
TINY = {  # a random open_clip model small enough to build in a test
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


def as_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [0, 1]."""
    return torch.from_numpy(img).movedim(-1, -3).float() / 255


def open_clip_direct(config: dict, weights: str, name: str, tmp_path):
    """The model loaded the plain open_clip way, under a name of the test's own."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    model = open_clip.create_model(name, pretrained=weights).eval()
    return model, open_clip.get_tokenizer(name)


def direct_cosines(model, tokenizer, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """cos(image_i, text_i) [N] for float images [N, 3, 32, 32] in [0, 1] (32 = the model's input: no resize)."""
    with torch.no_grad():
        img = model.encode_image((images - MEAN) / STD)  # [N, D]
        txt = model.encode_text(tokenizer(texts))  # [N, D]
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1)  # [N]


@pytest.fixture(scope="module")
def embedded():
    folder = asset_path("clip")
    return json.loads((folder / build.CONFIG_NAME).read_text()), str(folder / build.WEIGHTS_NAME)


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    """(config path, weights path) of a randomly initialised tiny open_clip model."""
    folder = tmp_path_factory.mktemp("tiny_random")
    (folder / "tiny-random.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(folder / "tiny-random.json")
    torch.manual_seed(3)
    model = open_clip.create_model("tiny-random")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tiny-random.safetensors"))
    return folder / "tiny-random.json", folder / "tiny-random.safetensors"


# ---- against a direct computation ----------------------------------------------------------


def test_images_and_clips_match_a_direct_open_clip_computation(embedded, tmp_path):
    model, tokenizer = open_clip_direct(*embedded, "test-direct-embedded", tmp_path)
    items = mw.prompt_set("image", "heldout", 6)
    captions = [it["caption"] for it in items]
    wrong = captions[1:] + captions[:1]  # mismatched pairs too, so some cosines are small
    images = torch.stack([as_tensor(mw.render(it)) for it in items])  # [6, 3, 32, 32]
    expect = 100 * direct_cosines(model, tokenizer, torch.cat([images, images]), captions + wrong).clamp(min=0)

    reward = CLIPScore()
    got = reward(list(images) * 2, items + wrong)  # dict prompts, then strings
    assert got == pytest.approx(expect.tolist(), abs=1e-3)
    assert reward([mw.render(it) for it in items], captions) == pytest.approx(got[:6], abs=1e-4)  # uint8 [H, W, 3]

    clips = mw.prompt_set("video", "heldout", 3)
    frames = [as_tensor(mw.render_clip(c)) for c in clips]  # 3 x [8, 3, 32, 32]
    got = reward(frames, clips)
    for clip, item, score in zip(frames, clips, got):
        per_frame = 100 * direct_cosines(model, tokenizer, clip, [item["caption"]] * len(clip)).clamp(min=0)  # [8]
        assert score == pytest.approx(float(per_frame.mean()), abs=1e-3)
    assert reward([mw.render_clip(c) for c in clips], clips) == pytest.approx(got, abs=1e-4)  # [F, H, W, 3]


def test_batching_and_order_do_not_change_scores():
    items = mw.prompt_set("image", "heldout", 20)
    clips = mw.prompt_set("video", "heldout", 4)
    samples = [as_tensor(mw.render(it)) for it in items] + [as_tensor(mw.render_clip(c)) for c in clips]
    prompts = items + clips
    together = CLIPScore(batch_size=64)(samples, prompts)
    one_by_one = [CLIPScore(batch_size=1)([s], [p])[0] for s, p in zip(samples, prompts)]
    assert together == pytest.approx(one_by_one, abs=1e-4)
    order = np.random.default_rng(0).permutation(len(samples))
    shuffled = CLIPScore(batch_size=3)([samples[i] for i in order], [prompts[i] for i in order])
    assert shuffled == pytest.approx([together[i] for i in order], abs=1e-4)


def test_negative_cosine_scores_zero(tiny_random, tmp_path):
    config, weights = tiny_random
    model, tokenizer = open_clip_direct(json.loads(config.read_text()), str(weights), "test-direct-random", tmp_path)
    items = mw.prompt_set("image", "heldout", 24)
    images = torch.stack([as_tensor(mw.render(it)) for it in items])  # [24, 3, 32, 32]
    cos = direct_cosines(model, tokenizer, images, [it["caption"] for it in items])  # [24]
    assert (cos < -0.01).any() and (cos > 0.01).any(), "the random model should give cosines of both signs"
    got = torch.tensor(CLIPScore(model=str(config), pretrained=str(weights))(list(images), items))
    assert (got[cos < 0] == 0).all()
    assert torch.allclose(got[cos > 0], 100 * cos[cos > 0], atol=1e-3)
    paper = torch.tensor(CLIPScore(model=str(config), pretrained=str(weights), scale=2.5)(list(images), items))
    assert torch.allclose(paper, 2.5 * cos.clamp(min=0), atol=1e-4)


# ---- the embedded model ----------------------------------------------------------------------


def test_embedded_model_prefers_true_captions_on_heldout_scenes():
    reward = CLIPScore()
    items = mw.prompt_set("image", "heldout", 96)
    images = [as_tensor(mw.render(it)) for it in items]
    captions = [it["caption"] for it in items]
    other = [c for c in captions[1:] + captions[:1]]
    rng = np.random.default_rng(0)
    hard = [build.perturb(it, build.NEGATIVE_KINDS[it["layout"]][int(rng.integers(2))], rng) for it in items]  # colour or shape
    right = np.array(reward(images, captions))
    assert right.mean() - np.array(reward(images, other)).mean() > 20  # another scene's caption
    assert right.mean() - np.array(reward(images, hard)).mean() > 10  # one colour or shape changed
    assert (right > np.array(reward(images, hard))).mean() > 0.8

    clips = mw.prompt_set("video", "heldout", 16)
    frames = [as_tensor(mw.render_clip(c)) for c in clips]
    wrong = [build.perturb(c, "color", rng) for c in clips]
    assert np.mean(reward(frames, clips)) - np.mean(reward(frames, wrong)) > 10


def test_embedded_asset_is_small_and_documented():
    folder = asset_path("clip")
    assert (folder / build.WEIGHTS_NAME).stat().st_size <= 20 * 2**20
    card = (folder / "MODEL_CARD.md").read_text()
    assert "python -m mmgrpo.pretrain.clip" in card and "Held-out" in card
    assert json.loads((folder / build.CONFIG_NAME).read_text()) == build.CONFIG  # the script builds what ships


def test_model_loads_lazily_once(tiny_random, tmp_path):
    config, weights = tiny_random
    weights = shutil.copy(weights, tmp_path / "fresh.safetensors")  # a checkpoint no other test loaded
    before = clip_module._load_cached.cache_info()
    a = CLIPScore(model=str(config), pretrained=str(weights))
    b = CLIPScore(model=str(config), pretrained=str(weights))
    assert clip_module._load_cached.cache_info().misses == before.misses  # construction loads nothing
    assert a.model is b.model
    assert clip_module._load_cached.cache_info().misses == before.misses + 1


# ---- inputs and errors -----------------------------------------------------------------------


def test_unreadable_samples_score_none_and_others_still_score():
    item = mw.prompt_set("image", "heldout", 1)[0]
    good = as_tensor(mw.render(item))
    nan = good.clone()
    nan[0, 0, 0] = float("nan")
    out = CLIPScore()([good, nan, torch.zeros(4, 32, 32), "text", good[None, None]], [item] * 5)
    assert out[0] is not None and out[1:] == [None] * 4
    assert CLIPScore()([nan], [item]) == [None]


def test_readable_errors(tiny_random, tmp_path):
    config, weights = tiny_random
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        CLIPScore(model="ViT-Nope", pretrained=str(weights))
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.safetensors' not found"):
        CLIPScore(model=str(config), pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="model config .* not found"):
        CLIPScore(model=str(tmp_path / "nowhere.json"), pretrained=str(weights))
    with pytest.raises(ValueError, match="needs pretrained="):
        CLIPScore(model=str(config))
    (tmp_path / "bad.json").write_text('{"embed_dim": 8}')
    with pytest.raises(ValueError, match="not an open_clip model config"):
        CLIPScore(model=str(tmp_path / "bad.json"), pretrained=str(weights))
    embedded_weights = asset_path("clip") / build.WEIGHTS_NAME
    with pytest.raises(RuntimeError, match="could not load .* into open_clip model"):  # shapes do not fit
        CLIPScore(model=str(config), pretrained=str(embedded_weights))([torch.zeros(3, 32, 32)], ["a red circle"])
    with pytest.raises(ValueError, match="got 1 samples for 2 prompts"):
        CLIPScore()([torch.zeros(3, 32, 32)], ["a", "b"])
    with pytest.raises(ValueError, match="without a 'prompt' string"):
        CLIPScore()([torch.zeros(3, 32, 32)], [{"caption": "a red circle"}])


def test_a_config_named_like_a_builtin_does_not_replace_it(tiny_random, tmp_path):
    """open_clip registers configs by file stem in one table; CLIPScore must not let a file shadow another."""
    config, weights = tiny_random
    shutil.copy(config, tmp_path / "ViT-B-32.json")
    assert CLIPScore(model=str(tmp_path / "ViT-B-32.json"), pretrained=str(weights)).model.text_projection.shape[1] == 16
    assert open_clip.get_model_config("ViT-B-32")["embed_dim"] == 512


# ---- the build script --------------------------------------------------------------------------


def test_hard_negatives_change_exactly_what_they_say():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene, _ = build.train_scene(rng)
        truth = mw.parse_caption(scene["caption"])
        for kind in build.NEGATIVE_KINDS[scene["layout"]]:
            got = mw.parse_caption(build.perturb(scene, kind, rng))  # still in the grammar
            assert got != truth
            if kind == "count":
                assert len(got["objects"]) != len(truth["objects"])
            if kind == "relation":
                assert {(o["color"], o["shape"]) for o in got["objects"]} == {(o["color"], o["shape"]) for o in truth["objects"]}


def test_quick_build_is_deterministic_and_loads_through_clip_score(tmp_path):
    build.main(["--quick", "--out", str(tmp_path / "a")])
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert files == {build.CONFIG_NAME, build.WEIGHTS_NAME, "MODEL_CARD.md"}
    assert "--quick" in (tmp_path / "a" / "MODEL_CARD.md").read_text()
    reward = CLIPScore(model=str(tmp_path / "a" / build.CONFIG_NAME), pretrained=str(tmp_path / "a" / build.WEIGHTS_NAME))
    items = mw.prompt_set("image", "heldout", 4)
    scores = reward([mw.render(it) for it in items], items)
    assert all(isinstance(s, float) and 0 <= s <= 100 for s in scores)
    build.main(["--quick", "--out", str(tmp_path / "b")])
    a, b = (load_file(str(tmp_path / d / build.WEIGHTS_NAME)) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):  # --quick must not overwrite the shipped asset
        build.main(["--quick"])


def test_doctest():
    assert doctest.testmod(clip_module).failed == 0
