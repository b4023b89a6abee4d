"""Rule reward for mini-world images and clips, GenEval-style: reads the prompt's exact ground truth.

Sub-scores, each in [0, 1], None where they do not apply to the prompt:
- color:    stated objects whose matched detection has the stated colour, divided by
            max(stated, detected) objects: extra detections dilute it
- shape:    the same for the stated shape
- count:    1 - min(1, |detected - stated| / stated) (all objects in the image count: the
            mini-world caption names every object)
- position: relation prompts: 1 if the matched objects' centroids satisfy it (offset on the
            named axis positive and larger than the offset on the other axis), else 0
- motion:   video prompts: 1 if the track of the stated object moves the stated way, else 0
Components larger than `max_area` of the frame (the mini-world's largest object covers 0.19) are
not objects: a frame flooded with one colour is not a scene. They match nothing, still dilute
colour and shape, are not counted and are not tracked for motion, so a flooded frame scores 0
like a blank one (GRPO on the video default found that one green frame earned a perfect count
without this rule).
Stated objects are matched to detections one-to-one, maximising shape matches plus colour
matches (shape wins ties, as GenEval detects the object class first). For clips, color, shape
and count are averaged over frames.

score = mean of the applicable sub-scores (mode="mean"), or 1.0 when all of them are 1.0 and
0.0 otherwise (mode="all", GenEval's strict accuracy).

>>> from mmgrpo import miniworld
>>> item = miniworld.prompt_set("image", n=1)[0]
>>> SceneReward()([miniworld.render(item)], [item])["score"]
[1.0]
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mmgrpo import miniworld

SUBSCORES = ("color", "shape", "count", "position", "motion")
_MAX_DETECTIONS = 6  # the matching considers the largest detections only


class SceneReward:
    """Scores mini-world images ([3, H, W] float tensors in [0, 1] or uint8 [H, W, 3] arrays)
    and clips ([F, 3, H, W] / [F, H, W, 3]) against the ground truth in their prompts.

    Prompts are prompt items from `mmgrpo.miniworld.prompt_set` (or any dict holding
    "objects"), or plain captions in the mini-world grammar. Returns {"score": [...],
    "color": [...], ...}; a sample that cannot be read (wrong type or shape, NaN pixels, an
    image for a video prompt or the reverse) gives None in every list for its row.
    """

    __name__ = "scene"

    def __init__(self, mode: str = "mean", min_area: float = 0.008, max_area: float = 0.3, min_travel: float = 0.06):
        if mode not in ("mean", "all"):
            raise ValueError(f"SceneReward: mode must be 'mean' or 'all', got {mode!r}")
        if not 0.0 <= min_area < max_area <= 1.0:
            raise ValueError(f"SceneReward: need 0 <= min_area < max_area <= 1, got {min_area} and {max_area}")
        self.mode = mode
        self.min_area = min_area  # smallest object, as a fraction of the image area
        self.max_area = max_area  # largest object (larger components are colour floods, not objects)
        self.min_travel = min_travel  # smallest motion over a clip, as a fraction of the width

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any], **meta: Any) -> dict[str, list[float | None]]:
        if len(samples) != len(prompts):
            raise ValueError(f"SceneReward: got {len(samples)} samples for {len(prompts)} prompts; pass one prompt per sample")
        truths = [ground_truth(p, i) for i, p in enumerate(prompts)]
        out: dict[str, list[float | None]] = {k: [] for k in ("score", *SUBSCORES)}
        for sample, truth in zip(samples, truths):
            try:
                frames = _frames(sample, video=truth["motion"] is not None)
            except (ValueError, TypeError, AttributeError, RuntimeError):
                for k in out:
                    out[k].append(None)
                continue
            subs = self._subscores(frames, truth)
            used = [v for v in subs.values() if v is not None]
            if self.mode == "mean":
                score = float(np.mean(used))
            else:
                score = float(all(v == 1.0 for v in used))
            out["score"].append(score)
            for k in SUBSCORES:
                out[k].append(subs[k])
        return out

    def _subscores(self, frames: np.ndarray, truth: dict[str, Any]) -> dict[str, float | None]:
        """frames: uint8 [F, H, W, 3] (F = 1 for an image)."""
        expected = truth["objects"]
        if truth["motion"] is not None:
            clip = miniworld.analyse_clip(frames, self.min_area, self.min_travel, self.max_area)
            per_frame = clip["frames"]
        else:
            per_frame = [miniworld.analyse(frames[0], self.min_area)]
        largest = self.max_area * frames.shape[1] * frames.shape[2]  # pixels
        color, shape, count, position = [], [], [], []
        for detected in per_frame:
            objects = [d for d in detected if d["area"] <= largest]  # floods removed
            match = _match(expected, objects[:_MAX_DETECTIONS])
            # hits over max(stated, detected): extra objects and floods dilute colour and shape, so
            # scattering fragments cannot buy matches (each extra detection is one more chance of a hit)
            n = max(len(expected), len(detected))
            color.append(sum(m is not None and m["color"] == e["color"] for e, m in zip(expected, match)) / n)
            shape.append(sum(m is not None and m["shape"] == e["shape"] for e, m in zip(expected, match)) / n)
            count.append(max(0.0, 1.0 - abs(len(objects) - len(expected)) / len(expected)))
            if truth["relation"] is not None:
                position.append(_relation_holds(match[0], match[1], truth["relation"]))
        subs: dict[str, float | None] = {
            "color": float(np.mean(color)),
            "shape": float(np.mean(shape)),
            "count": float(np.mean(count)),
            "position": float(np.mean(position)) if position else None,
            "motion": None,
        }
        if truth["motion"] is not None:
            target = expected[0]
            tracks = sorted(
                clip["tracks"],
                key=lambda t: (
                    -(t["color"] == target["color"]) - (t["shape"] == target["shape"]),
                    -sum(p is not None for p in t["positions"]),
                ),
            )
            good = tracks and tracks[0]["color"] == target["color"] and tracks[0]["motion"] == truth["motion"]
            subs["motion"] = float(bool(good))
        return subs


def scene_reward(samples: Sequence[Any], prompts: Sequence[Any], **meta: Any) -> dict[str, list[float | None]]:
    """SceneReward() with its defaults, as a plain function."""
    return SceneReward()(samples, prompts, **meta)


def ground_truth(prompt: Any, row: int = 0) -> dict[str, Any]:
    """{"objects": [{"color", "shape"}], "relation", "motion"} from a prompt item or a caption."""
    if isinstance(prompt, str):
        return miniworld.parse_caption(prompt)
    if isinstance(prompt, dict) and "objects" in prompt:
        objects = prompt["objects"]
        relation, motion = prompt.get("relation"), prompt.get("motion")
        ok = (
            isinstance(objects, (list, tuple))
            and len(objects) > 0
            and all(isinstance(o, dict) and o.get("color") in miniworld.COLORS and o.get("shape") in miniworld.SHAPES for o in objects)
            and relation in (None, *miniworld.RELATIONS)
            and motion in (None, *miniworld.MOTIONS)
            and (relation is None or len(objects) >= 2)
        )
        if not ok:
            raise ValueError(
                f"SceneReward: prompt {row} has malformed mini-world ground truth (objects={objects!r}, "
                f"relation={relation!r}, motion={motion!r}); build prompts with mmgrpo.miniworld.prompt_set"
            )
        return {"objects": list(objects), "relation": relation, "motion": motion}
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return miniworld.parse_caption(prompt["prompt"])
    raise ValueError(
        f"SceneReward: prompt {row} ({type(prompt).__name__}) has no mini-world ground truth; pass items from "
        "mmgrpo.miniworld.prompt_set or captions like 'a red circle left of a blue square'"
    )


def _frames(sample: Any, video: bool) -> np.ndarray:
    """uint8 [F, H, W, 3]; ValueError when the sample is not an image (video=False) or a clip."""
    if sample is None:
        raise ValueError("no sample")
    arr = miniworld.to_uint8_image(sample)  # [..., H, W, 3]
    if arr.ndim != (4 if video else 3):
        raise ValueError(f"expected a {'clip' if video else 'single image'}, got shape {arr.shape}")
    if arr.shape[-2] < 8 or arr.shape[-3] < 8 or (video and arr.shape[0] < 2):
        raise ValueError(f"sample too small to read: {arr.shape}")
    return arr if video else arr[None]


def _match(expected: list[dict[str, Any]], detected: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """One detection (or None) per expected object, one-to-one, maximising 1.01*shape + colour hits."""
    best: list[dict[str, Any] | None] = [None] * len(expected)
    best_value = -1.0

    def search(i: int, used: frozenset[int], chosen: list[int | None], value: float) -> None:
        nonlocal best, best_value
        if i == len(expected):
            if value > best_value:
                best_value = value
                best = [None if j is None else detected[j] for j in chosen]
            return
        for j in range(len(detected)):
            if j not in used:
                d, e = detected[j], expected[i]
                gain = 1.01 * (d["shape"] == e["shape"]) + 1.0 * (d["color"] == e["color"])
                search(i + 1, used | {j}, chosen + [j], value + gain)
        search(i + 1, used, chosen + [None], value)

    search(0, frozenset(), [], 0.0)
    return best


def _relation_holds(a: dict[str, Any] | None, b: dict[str, Any] | None, relation: str) -> bool:
    """a <relation> b by centroids: positive offset on the named axis, larger than the other offset."""
    if a is None or b is None:
        return False
    dx = b["centroid"][0] - a["centroid"][0]
    dy = b["centroid"][1] - a["centroid"][1]
    if relation == "left of":
        return dx > abs(dy)
    return dy > abs(dx)
