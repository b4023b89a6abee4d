"""The mini-world scene reward: 1.0 on ground truth, hand-computed values on each kind of mistake."""

from __future__ import annotations

import copy
import doctest

import numpy as np
import pytest
import torch

from mmgrpo import miniworld as mw
from mmgrpo.rewards import scene as scene_module
from mmgrpo.rewards.scene import SceneReward, scene_reward

reward = SceneReward()


def as_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [0, 1], the adapters' layout."""
    return torch.from_numpy(img).movedim(-1, -3).float() / 255


def row(out: dict, i: int = 0) -> dict:
    return {k: v[i] for k, v in out.items()}


def recolor(scene: dict, index: int, color: str) -> dict:
    wrong = copy.deepcopy(scene)
    wrong["objects"][index]["color"] = color
    return wrong


def test_ground_truth_scores_one_in_every_format():
    items = mw.prompt_set("image", n=60) + mw.prompt_set("grounding", n=20)
    tensors = [as_tensor(mw.render(p)) for p in items]
    out = reward(tensors, items)
    assert out["score"] == [1.0] * len(items)
    for i, p in enumerate(items):
        assert (out["position"][i] is None) == (p["relation"] is None)
        assert out["motion"][i] is None and out["color"][i] == out["shape"][i] == out["count"][i] == 1.0
    assert reward([mw.render(p) for p in items[:10]], items[:10])["score"] == [1.0] * 10  # uint8 [H, W, 3]
    assert reward([as_tensor(mw.render(p, 64)) for p in items[:10]], items[:10])["score"] == [1.0] * 10
    clips = mw.prompt_set("video", n=30)
    out = reward([as_tensor(mw.render_clip(p)) for p in clips], clips)  # [F, 3, H, W]
    assert out["score"] == [1.0] * 30 and out["motion"] == [1.0] * 30 and out["position"] == [None] * 30
    assert reward([mw.render_clip(p) for p in clips[:5]], clips[:5])["score"] == [1.0] * 5  # [F, H, W, 3]
    # the plain-function form and plain captions as prompts
    assert scene_reward([mw.render(items[0])], [items[0]["caption"]])["score"] == [1.0]


def test_wrong_colour_and_wrong_shape():
    scene = mw.make_scene(0, "image", layout="single")
    color = scene["objects"][0]["color"]
    other = next(c for c in mw.COLORS if c != color)
    got = row(reward([mw.render(recolor(scene, 0, other))], [scene]))
    assert got == {"score": pytest.approx(2 / 3), "color": 0.0, "shape": 1.0, "count": 1.0, "position": None, "motion": None}
    wrong = copy.deepcopy(scene)
    wrong["objects"][0]["shape"] = next(s for s in mw.SHAPES if s != scene["objects"][0]["shape"])
    got = row(reward([mw.render(wrong)], [scene]))
    assert got == {"score": pytest.approx(2 / 3), "color": 1.0, "shape": 0.0, "count": 1.0, "position": None, "motion": None}


def test_swapped_attributes_fail_colour_binding():
    """'a red circle left of a blue square' drawn as a blue circle left of a red square: shapes
    are matched first (as GenEval detects the object class first), so colour is what fails."""
    scenes = [
        s for s in (mw.make_scene(k, "image", layout="relation") for k in range(100))
        if s["objects"][0]["color"] != s["objects"][1]["color"] and s["objects"][0]["shape"] != s["objects"][1]["shape"]
    ][:12]
    swapped = [recolor(recolor(s, 0, s["objects"][1]["color"]), 1, s["objects"][0]["color"]) for s in scenes]
    out = reward([mw.render(s) for s in swapped], scenes)
    for i in range(len(scenes)):
        assert row(out, i) == {"score": 0.75, "color": 0.0, "shape": 1.0, "count": 1.0, "position": 1.0, "motion": None}


def test_position_needs_the_named_axis_to_dominate():
    def pair(relation):
        objs = [
            {"color": "red", "shape": "square", "center": [0.45, 0.2], "size": 0.25},
            {"color": "blue", "shape": "circle", "center": [0.55, 0.8], "size": 0.25},
        ]
        return {"objects": objs, "relation": relation, "motion": None}

    img = mw.render(pair("above"))  # red slightly left of, but far above, blue
    out = reward([img, img], [pair("left of"), pair("above")])
    assert out["position"] == [0.0, 1.0] and out["score"] == [0.75, 1.0]


def test_wrong_count():
    scene = next(s for s in (mw.make_scene(k, "image", layout="count") for k in range(100)) if len(s["objects"]) == 3)
    fewer = {**scene, "objects": scene["objects"][:2]}  # the prompt says two, the image has three
    fewer["caption"] = mw.caption(fewer)
    assert fewer["caption"].startswith("two ")
    got = row(reward([mw.render(scene)], [fewer]))  # the extra object dilutes colour and shape: 2 hits / 3 objects
    assert got == {"score": pytest.approx(11 / 18), "color": pytest.approx(2 / 3), "shape": pytest.approx(2 / 3),
                   "count": 0.5, "position": None, "motion": None}
    got = row(reward([mw.render(fewer)], [scene]))  # the prompt says three, the image has two
    assert got["count"] == pytest.approx(2 / 3) and got["color"] == pytest.approx(2 / 3) and got["score"] == pytest.approx(2 / 3)


def test_swapped_positions():
    for relation in ("left of", "above"):
        scene = next(s for s in (mw.make_scene(k, "image", layout="relation") for k in range(100)) if s["relation"] == relation)
        mirrored = copy.deepcopy(scene)  # mirror the centres on the relation's axis (shapes stay upright)
        axis = 0 if relation == "left of" else 1
        for obj in mirrored["objects"]:
            obj["center"][axis] = 1 - obj["center"][axis]
        got = row(reward([mw.render(mirrored)], [scene]))
        assert got == {"score": 0.75, "color": 1.0, "shape": 1.0, "count": 1.0, "position": 0.0, "motion": None}


def test_wrong_motion_and_still_clip():
    scene = mw.make_scene(0, "video")
    backwards = copy.deepcopy(scene)
    backwards["objects"][0]["track"] = backwards["objects"][0]["track"][::-1]
    still = np.repeat(mw.render(scene)[None], 8, axis=0)  # [F, H, W, 3]
    out = reward([mw.render_clip(backwards), still], [scene, scene])
    for i in range(2):
        assert row(out, i) == {"score": 0.75, "color": 1.0, "shape": 1.0, "count": 1.0, "position": None, "motion": 0.0}
    # an object that leaves the picture after frame 3: colour/shape/count are averaged over frames
    half = mw.render_clip(scene).copy()
    half[4:] = 0
    got = row(reward([half], [scene]))
    assert got["color"] == got["shape"] == got["count"] == 0.5
    # the right shape moving the right way, but in the wrong colour, is not the stated object moving
    other = next(c for c in mw.COLORS if c != scene["objects"][0]["color"])
    got = row(reward([mw.render_clip(recolor(scene, 0, other))], [scene]))
    assert got == {"score": 0.5, "color": 0.0, "shape": 1.0, "count": 1.0, "position": None, "motion": 0.0}


def test_blank_image_scores_zero():
    items = [mw.make_scene(0, "image", layout=lay) for lay in ("single", "count", "relation")]
    out = reward([torch.zeros(3, 32, 32)] * 3, items)
    assert out["score"] == [0.0, 0.0, 0.0]
    assert out["position"] == [None, None, 0.0]
    clip = mw.make_scene(0, "video")
    assert reward([torch.zeros(8, 3, 32, 32)], [clip])["score"] == [0.0]


def test_colour_floods_are_not_objects():
    # one colour over the whole frame: no object, no background; it scores like a blank frame
    items = [mw.make_scene(0, "image", layout=lay) for lay in ("single", "count", "relation")]
    green = torch.zeros(3, 32, 32)
    green[1] = 1.0
    assert reward([green] * 3, items)["score"] == [0.0, 0.0, 0.0]
    clip = mw.make_scene(0, "video")
    flooded = torch.zeros(8, 3, 32, 32)
    flooded[:, 1] = 1.0
    assert row(reward([flooded], [clip])) == {
        "score": 0.0, "color": 0.0, "shape": 0.0, "count": 0.0, "position": None, "motion": 0.0
    }
    # the right object beside a flood (a 64x20 band: 31% of the frame, above max_area 0.3): the
    # flood dilutes colour and shape (1 hit of 2 detections) but is not counted
    scene = {"objects": [{"color": "red", "shape": "square", "center": [0.25, 0.2], "size": 0.25}],
             "relation": None, "motion": None}
    img = mw.render(scene, size=64)
    img[44:, :] = mw.PALETTE["green"]
    assert row(reward([img], [scene])) == {
        "score": 2 / 3, "color": 0.5, "shape": 0.5, "count": 1.0, "position": None, "motion": None
    }
    # the same band cut to 64x18 (0.28 of the frame) is an object: a second, unstated one
    img[44:46, :] = 0
    assert row(reward([img], [scene]))["count"] == 0.0
    assert row(SceneReward(max_area=0.25)([img], [scene]))["count"] == 1.0
    with pytest.raises(ValueError, match="max_area"):
        SceneReward(min_area=0.5, max_area=0.3)


def test_drifting_floods_earn_no_motion():
    # an 18x18 block (0.32 of the frame) of the stated colour drifting the stated way, 1 px a frame
    clip = mw.make_scene(0, "video")
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[clip["motion"]]
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    for i in range(8):
        x, y = 7 + step[0] * i, 7 + step[1] * i
        frames[i, y : y + 18, x : x + 18] = mw.PALETTE[clip["objects"][0]["color"]]
    assert [t["motion"] for t in mw.analyse_clip(frames)["tracks"]] == [clip["motion"]]  # tracked when allowed
    assert mw.analyse_clip(frames, max_area=0.3)["tracks"] == []
    assert row(reward([as_tensor(frames)], [clip]))["motion"] == 0.0


def test_strict_mode():
    scene = mw.make_scene(0, "image", layout="single")
    wrong = recolor(scene, 0, next(c for c in mw.COLORS if c != scene["objects"][0]["color"]))
    out = SceneReward(mode="all")([mw.render(scene), mw.render(wrong)], [scene, scene])
    assert out["score"] == [1.0, 0.0] and out["color"] == [1.0, 0.0]
    with pytest.raises(ValueError, match="mode"):
        SceneReward(mode="max")


def test_unreadable_samples_give_none_rows():
    image, clip = mw.make_scene(1, "image"), mw.make_scene(1, "video")
    samples = [
        mw.render(image),
        None,
        "not an image",
        np.zeros((5, 5)),
        torch.full((3, 32, 32), float("nan")),
        mw.render(image),  # an image for a video prompt
        mw.render_clip(clip),  # a clip for an image prompt
        torch.zeros(3, 4, 4),  # too small to read
        mw.render_clip(clip),
    ]
    prompts = [image, image, image, image, image, clip, image, image, clip]
    out = reward(samples, prompts)
    assert out["score"] == [1.0] + [None] * 7 + [1.0]
    assert all(out[k][1:8] == [None] * 7 for k in out)


def test_unknown_prompts_are_clear_errors():
    img = [mw.render(mw.make_scene(0))]
    for bad in (42, {"foo": 1}, "a purple hexagon", {"objects": [{"color": "purple", "shape": "circle"}]},
                {"objects": [{"color": "red", "shape": "circle"}], "relation": "left of"}):
        with pytest.raises(ValueError, match="prompt 0|not a mini-world caption"):
            reward(img, [bad])
    with pytest.raises(ValueError, match="one prompt per sample"):
        reward(img * 2, [mw.make_scene(0)])


def test_module_doctest():
    result = doctest.testmod(scene_module)
    assert result.attempted > 0 and result.failed == 0
