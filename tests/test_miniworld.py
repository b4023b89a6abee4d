"""The mini-world: determinism, ground truth, rendering geometry, prompt sets, analysis."""

from __future__ import annotations

import itertools
import json
from collections import deque

import numpy as np
import pytest
import torch

from mmgrpo import miniworld as mw
from mmgrpo.miniworld.scenes import _components

SEEDS = range(200)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """float [..., H, W, 3] in [0, 1]: separable Gaussian blur of a uint8 image (edges replicated)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    f = img.astype(np.float64) / 255
    h, w = f.shape[-3], f.shape[-2]
    pad = [(0, 0)] * (f.ndim - 3)
    p = np.pad(f, pad + [(r, r), (0, 0), (0, 0)], mode="edge")
    f = sum(k[i] * p[..., i : i + h, :, :] for i in range(2 * r + 1))
    p = np.pad(f, pad + [(0, 0), (r, r), (0, 0)], mode="edge")
    return sum(k[i] * p[..., :, i : i + w, :] for i in range(2 * r + 1))


def corrupt(img: np.ndarray, seed: int, sigma: float = 0.6, noise: float = 0.05) -> np.ndarray:
    """What a tiny generator might produce: blurred, noisy float pixels in [0, 1]."""
    rng = np.random.default_rng(seed)
    return np.clip(blur(img, sigma) + rng.normal(0, noise, img.shape), 0, 1)


def centroid_px(obj: dict, size: int) -> tuple[float, float]:
    """Analytic centroid of a ground-truth object in pixels (a triangle's is side/6 below its box centre)."""
    dy = obj["size"] / 6 if obj["shape"] == "triangle" else 0.0
    return obj["center"][0] * size, (obj["center"][1] + dy) * size


def signature(objs) -> list[tuple[str, str]]:
    return sorted((o["color"], o["shape"]) for o in objs)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_scenes_arrays_and_captions():
    for seed in (0, 7, 123456):
        for kind in ("image", "video"):
            a, b = mw.make_scene(seed, kind), mw.make_scene(seed, kind)
            assert a == b
            np.testing.assert_array_equal(mw.render(a), mw.render(b))
        np.testing.assert_array_equal(mw.render_clip(mw.make_scene(seed, "video")), mw.render_clip(mw.make_scene(seed, "video")))
    for kind in ("image", "video", "grounding", "motion"):
        assert mw.prompt_set(kind, n=20) == mw.prompt_set(kind, n=20)
    # and seeds matter: 50 seeds give (nearly) 50 different scenes
    assert len({json.dumps(mw.make_scene(s)["objects"]) for s in range(50)}) == 50


def test_ground_truth_is_json_serialisable():
    for kind in ("image", "video", "grounding", "motion"):
        for item in mw.prompt_set(kind, n=30):
            assert json.loads(json.dumps(item)) == item


# ----------------------------------------------------------------------------- geometry


def test_hand_computed_shapes_and_boxes():
    def one(shape):
        return {"objects": [{"color": "red", "shape": shape, "center": [0.5, 0.5], "size": 0.25}]}

    sq = mw.render(one("square"))
    assert sq.shape == (32, 32, 3) and sq.dtype == np.uint8
    red = (sq == (255, 0, 0)).all(-1)
    assert red.sum() == 64 and red[12:20, 12:20].all()  # an 8x8 block at pixels 12..19
    assert (sq[~red] == 0).all()
    assert mw.boxes(one("square")) == [[12, 12, 20, 20]]
    assert mw.boxes(one("square"), size=64) == [[24, 24, 40, 40]]
    # a circle of diameter 8: rows of 4, 6, 8, 8, 8, 8, 6, 4 pixels
    circle = (mw.render(one("circle")) == (255, 0, 0)).all(-1)
    assert circle.sum(1)[12:20].tolist() == [4, 6, 8, 8, 8, 8, 6, 4] and circle.sum() == 52
    # a triangle of side 8, apex up: the apex row is empty, then 2, 2, 4, 4, 6, 6, 8
    tri = (mw.render(one("triangle")) == (255, 0, 0)).all(-1)
    assert tri.sum(1)[12:20].tolist() == [0, 2, 2, 4, 4, 6, 6, 8] and tri.sum() == 32
    assert mw.boxes(one("triangle")) == [[12, 13, 20, 20]]


def test_layout_invariants_sizes_inside_frame_and_separated():
    for seed in SEEDS:
        scene = mw.make_scene(seed)
        objs = scene["objects"]
        assert 1 <= len(objs) <= 3
        bxs = mw.boxes(scene)
        for obj, (x1, y1, x2, y2) in zip(objs, bxs):
            assert obj["color"] in mw.COLORS and obj["shape"] in mw.SHAPES
            assert 8 <= obj["size"] * 32 <= 14
            assert x1 >= 1 and y1 >= 1 and x2 <= 31 and y2 <= 31  # a free pixel to the frame edge
        for a, b in itertools.combinations(bxs, 2):  # at least 2 free pixels between objects
            assert max(max(a[0], b[0]) - min(a[2], b[2]), max(a[1], b[1]) - min(a[3], b[3])) >= 2
        if scene["layout"] == "count":
            assert len(objs) in (2, 3) and len({(o["color"], o["shape"]) for o in objs}) == 1
        if scene["layout"] == "relation":
            assert len(objs) == 2 and objs[0]["color"] + objs[0]["shape"] != objs[1]["color"] + objs[1]["shape"]


def test_relation_ground_truth_holds_in_pixels():
    for seed in range(100):
        scene = mw.make_scene(seed, "image", layout="relation")
        a, b = mw.boxes(scene)
        (ax, ay), (bx, by) = centroid_px(scene["objects"][0], 32), centroid_px(scene["objects"][1], 32)
        if scene["relation"] == "left of":
            assert a[2] < b[0] and bx - ax > abs(by - ay)
        else:
            assert a[3] < b[1] and by - ay > abs(bx - ax)


def test_boxes_are_tight_around_rendered_pixels():
    for seed in range(60):
        scene = mw.make_scene(seed)
        for size in (32, 64):
            img = mw.render(scene, size)
            bxs = mw.boxes(scene, size)
            covered = np.zeros((size, size), bool)
            for obj, (x1, y1, x2, y2) in zip(scene["objects"], bxs):
                alone = mw.render({**scene, "objects": [obj]}, size)
                ys, xs = np.nonzero(alone.any(-1))
                assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x1, y1, x2, y2]
                assert (img[y1:y2, x1:x2][alone[y1:y2, x1:x2].any(-1)] == mw.PALETTE[obj["color"]]).all()
                covered[y1:y2, x1:x2] = True
                # the box agrees with the normalised centre and size (exactly for squares at 32)
                cx, cy, s = obj["center"][0] * size, obj["center"][1] * size, obj["size"] * size
                if obj["shape"] == "square" and size == 32:
                    assert [x1, y1, x2, y2] == [cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]
                assert abs(x1 - (cx - s / 2)) <= 1 and abs(x2 - (cx + s / 2)) <= 1 and abs(y2 - (cy + s / 2)) <= 1
            assert not img[~covered].any()  # nothing drawn outside the boxes


def test_video_clip_moves_inside_frame():
    for seed in range(60):
        scene = mw.make_scene(seed, "video")
        obj = scene["objects"][0]
        clip = mw.render_clip(scene)
        assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8
        track = np.array(obj["track"]) * 32  # [8, 2] pixels
        step = track[1:] - track[:-1]  # [7, 2]
        ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[scene["motion"]]
        speed = step @ np.array([ux, uy])  # [7]
        assert np.all(speed == speed[0]) and speed[0] in (1, 2)  # constant whole-pixel steps
        assert np.all(step @ np.array([uy, ux]) == 0)  # no drift on the other axis
        areas = clip.any(-1).sum((1, 2))  # [8]
        assert np.all(areas == areas[0])  # the same shape, translated
        for t in range(8):
            np.testing.assert_array_equal(clip[t], mw.render(scene, frame=t))
            x1, y1, x2, y2 = mw.boxes(scene, frame=t)[0]
            assert x1 >= 1 and y1 >= 1 and x2 <= 31 and y2 <= 31
        short = mw.render_clip(scene, frames=4)
        np.testing.assert_array_equal(short[0], clip[0])
        np.testing.assert_array_equal(short[-1], clip[-1])
    with pytest.raises(ValueError, match="no motion"):
        mw.render_clip(mw.make_scene(0))


# ----------------------------------------------------------------------------- captions


def test_captions_hand_examples_and_grammar():
    red_circle = {"color": "red", "shape": "circle"}
    blue_square = {"color": "blue", "shape": "square"}
    assert mw.caption({"layout": "single", "objects": [red_circle]}) == "a red circle"
    assert mw.caption({"layout": "count", "objects": [blue_square] * 2}) == "two blue squares"
    assert mw.caption({"layout": "count", "objects": [blue_square] * 3}) == "three blue squares"
    assert mw.caption({"layout": "relation", "relation": "left of", "objects": [red_circle, blue_square]}) == "a red circle left of a blue square"
    assert mw.caption({"layout": "relation", "relation": "above", "objects": [red_circle, blue_square]}) == "a red circle above a blue square"
    green_tri = {"color": "green", "shape": "triangle"}
    assert mw.caption({"layout": "motion", "motion": "right", "objects": [green_tri]}) == "a green triangle moving right"
    assert mw.caption({"layout": "group", "objects": [red_circle, blue_square, green_tri]}) == "a red circle, a blue square and a green triangle"
    assert mw.parse_caption("Two Blue Squares.")["objects"] == [blue_square, blue_square]
    for bad in ("a purple circle", "four red circles", "a red circle right of a blue square", ""):
        with pytest.raises(ValueError, match="not a mini-world caption"):
            mw.parse_caption(bad)


def test_captions_agree_with_ground_truth():
    scenes = [mw.make_scene(s) for s in SEEDS] + [mw.make_scene(s, "video") for s in range(50)]
    scenes += [mw.make_scene(s, "image", layout="group") for s in range(50)]
    for scene in scenes:
        objs, words = scene["objects"], scene["caption"].split()
        if scene["layout"] == "count":
            assert words == [{2: "two", 3: "three"}[len(objs)], objs[0]["color"], objs[0]["shape"] + "s"]
        else:  # every object named in order as "a COLOR SHAPE"
            named = [(words[i + 1], words[i + 2].rstrip(",")) for i, w in enumerate(words) if w == "a"]
            assert named == [(o["color"], o["shape"]) for o in objs]
        if scene["relation"]:
            assert f" {scene['relation']} " in scene["caption"]
        if scene["motion"]:
            assert scene["caption"].endswith(f"moving {scene['motion']}")
        parsed = mw.parse_caption(scene["caption"])
        assert parsed["objects"] == [{"color": o["color"], "shape": o["shape"]} for o in objs]
        assert (parsed["relation"], parsed["motion"], parsed["layout"]) == (scene["relation"], scene["motion"], scene["layout"])


# ----------------------------------------------------------------------------- prompt sets


def test_prompt_sets_fields_and_disjoint_splits():
    for kind in ("image", "video", "grounding", "motion"):
        train, held = mw.prompt_set(kind, "train", 100), mw.prompt_set(kind, "heldout", 100)
        assert len(train) == len(held) == 100
        assert {p["seed"] for p in train}.isdisjoint({p["seed"] for p in held})
        dumps = {json.dumps(p["objects"]) for p in train}
        assert not any(json.dumps(p["objects"]) in dumps for p in held)
        assert all(p["task"] == kind and isinstance(p["prompt"], str) for p in train + held)
        assert mw.prompt_set(kind, "train", 10) == train[:10]  # a prefix: n only extends the set
    for item in mw.prompt_set("image", n=20) + mw.prompt_set("video", n=20):
        assert item["prompt"] == item["caption"]
    for item in mw.prompt_set("grounding", n=60, size=64):
        target = item["objects"][item["target"]]
        assert item["prompt"] == f"Where is the {target['color']} {target['shape']}?"
        assert sum(o["color"] == target["color"] and o["shape"] == target["shape"] for o in item["objects"]) == 1
        img = mw.render(item, item["image_size"][0])
        x1, y1, x2, y2 = item["box"]
        assert item["image_size"] == [64, 64] and item["box"] == mw.boxes(item, 64)[item["target"]]
        inside = (img[y1:y2, x1:x2] == mw.PALETTE[target["color"]]).all(-1)
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
    for item in mw.prompt_set("motion", n=20):
        assert item["answer"] == item["motion"] and item["answer"] in item["choices"]
        assert item["prompt"].startswith(f"Which way is the {item['objects'][0]['color']} {item['objects'][0]['shape']}")
    with pytest.raises(ValueError, match="unknown kind"):
        mw.prompt_set("audio")
    with pytest.raises(ValueError, match="unknown split"):
        mw.prompt_set("image", "test")


# ----------------------------------------------------------------------------- analysis


def flood_fill_partition(classes: np.ndarray) -> set[frozenset]:
    """Reference 8-connected components of equal class (>= 0), by breadth-first search."""
    h, w = classes.shape
    seen, parts = np.zeros((h, w), bool), set()
    for y, x in zip(*np.nonzero(classes >= 0)):
        if seen[y, x]:
            continue
        part, queue = [], deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            part.append((cy, cx))
            for ny, nx in ((cy + a, cx + b) for a in (-1, 0, 1) for b in (-1, 0, 1)):
                if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and classes[ny, nx] == classes[cy, cx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        parts.add(frozenset(part))
    return parts


def test_connected_components_match_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(20):
        classes = np.where(rng.random((17, 23)) < 0.45, rng.integers(0, 3, (17, 23)), -1)
        labels = _components(classes)
        got = {frozenset(zip(*np.nonzero(labels == lab))) for lab in np.unique(labels[labels >= 0])}
        assert got == flood_fill_partition(classes)
        assert ((labels >= 0) == (classes >= 0)).all()


def test_analyse_recovers_ground_truth_on_rendered_scenes():
    exact = 0
    for seed in SEEDS:
        scene = mw.make_scene(seed)
        found = mw.analyse(mw.render(scene))
        if signature(found) != signature(scene["objects"]):
            continue
        # every object found at its box, with its centroid within a pixel of the analytic one
        bxs = mw.boxes(scene)
        ok = True
        for obj, box in zip(scene["objects"], bxs):
            hit = [f for f in found if f["box"] == box and f["color"] == obj["color"] and f["shape"] == obj["shape"]]
            cx, cy = centroid_px(obj, 32)
            ok &= len(hit) == 1 and abs(hit[0]["centroid"][0] - cx) <= 1 and abs(hit[0]["centroid"][1] - cy) <= 1
        exact += ok
    assert exact / len(SEEDS) >= 0.98


def test_analyse_survives_blur_and_noise():
    hits = sum(
        signature(mw.analyse(corrupt(mw.render(mw.make_scene(s)), seed=s))) == signature(mw.make_scene(s)["objects"])
        for s in SEEDS
    )
    assert hits / len(SEEDS) >= 0.95


def test_analyse_input_formats_and_blank():
    scene = mw.make_scene(5)
    img = mw.render(scene)  # [H, W, 3] uint8
    tensor = torch.from_numpy(img).permute(2, 0, 1).float() / 255  # [3, H, W]
    assert mw.analyse(tensor) == mw.analyse(img) == mw.analyse(img.astype(np.float32) / 255)
    assert mw.analyse(np.zeros((32, 32, 3), np.uint8)) == []
    assert mw.analyse(np.full((32, 32, 3), 128, np.uint8)) == []  # grey is not a palette colour
    found = mw.analyse(np.full((32, 32, 3), (200, 30, 20), np.uint8))  # a dim, impure red fills the image
    assert [(f["color"], f["shape"], f["box"], f["area"]) for f in found] == [("red", "square", [0, 0, 32, 32], 1024)]
    for bad in (np.zeros((32, 32)), np.zeros((32, 32, 4)), torch.zeros(32, 32, 3), np.full((8, 8, 3), np.nan)):
        with pytest.raises(ValueError):
            mw.analyse(bad)


def test_motion_direction_closed_form():
    line = [[10.0 + 2 * t, 5.0] for t in range(8)]
    assert mw.motion_direction(line, min_travel=2.0) == "right"
    assert mw.motion_direction(line[::-1], min_travel=2.0) == "left"
    assert mw.motion_direction([[5.0, 20.0 - t] for t in range(8)], min_travel=2.0) == "up"
    assert mw.motion_direction([[5.0, 20.0 + t] if t % 3 else None for t in range(8)], min_travel=2.0) == "down"
    assert mw.motion_direction([[5.0 + 0.2 * t, 5.0] for t in range(8)], min_travel=2.0) is None  # 1.4 px
    assert mw.motion_direction([[5.0, 5.0]] + [None] * 7, min_travel=2.0) is None


def test_analyse_clip_recovers_motion():
    hits = hits_noisy = 0
    for seed in range(60):
        scene = mw.make_scene(seed, "video")
        obj = scene["objects"][0]
        clip = mw.render_clip(scene)  # [F, H, W, 3]
        tracks = mw.analyse_clip(clip)["tracks"]
        hits += [(t["color"], t["shape"], t["motion"]) for t in tracks] == [(obj["color"], obj["shape"], scene["motion"])]
        noisy = mw.analyse_clip(corrupt(clip, seed))["tracks"]
        hits_noisy += len(noisy) == 1 and noisy[0]["motion"] == scene["motion"]
        if seed < 5:  # a torch clip [F, 3, H, W] reads the same
            assert mw.analyse_clip(torch.from_numpy(clip).permute(0, 3, 1, 2))["tracks"] == tracks
    assert hits >= 59 and hits_noisy >= 57
    static = np.repeat(mw.render(mw.make_scene(0, "video"))[None], 8, 0)
    assert all(t["motion"] is None for t in mw.analyse_clip(static)["tracks"])
