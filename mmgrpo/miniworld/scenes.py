"""Mini-world scenes: procedural coloured shapes in images and clips, with exact ground truth.

A scene is a JSON-serialisable dict, deterministic from a seed:

    {"kind": "image" | "video", "seed": int, "layout": "single" | "count" | "relation" | "group" | "motion",
     "objects": [{"color": "red", "shape": "circle", "center": [x, y], "size": s}, ...],
     "relation": None | "left of" | "above",   # objects[0] <relation> objects[1]
     "motion": None | "left" | "right" | "up" | "down",
     "frames": None | 8,
     "caption": "a red circle left of a blue square"}

Coordinates are normalised to [0, 1] (x to the right, y down); `size` is the side of the
shape's square bounding box as a fraction of the image side. Sides and box corners are whole
pixels at 32x32 (values are exact multiples of 1/64). Video objects also carry
"track": the centre [x, y] at every frame. Pixel coordinates use pixel edges: pixel column i
spans [i, i+1), boxes are [x1, y1, x2, y2] with x2, y2 exclusive.

Caption grammar (small and regular, a tiny text encoder learns it):
    OBJ      := "a" COLOR SHAPE
    single   := OBJ                               "a red circle"
    count    := NUMBER COLOR SHAPE "s"            "two blue squares"
    relation := OBJ ("left of" | "above") OBJ     "a red circle left of a blue square"
    group    := OBJ ", " ... " and " OBJ          "a red circle, a blue square and a green triangle"
    motion   := OBJ "moving" DIRECTION            "a green triangle moving right"

`analyse` reads rendered (or generated) images back into objects by colour segmentation.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np

COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down")
RELATIONS = ("left of", "above")
NUMBERS = {2: "two", 3: "three"}
PALETTE = {  # name -> RGB uint8
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
BACKGROUND = (0, 0, 0)
FRAMES = 8
IMAGE_LAYOUTS = ("single", "count", "relation")
GROUNDING_LAYOUTS = ("single", "relation", "group")
SPLIT_OFFSETS = {"train": 0, "heldout": 1_000_000}  # seed ranges: train [0, 1e6), heldout [1e6, 2e6)
_SPLIT_SIZE = 1_000_000
_KIND_CODES = {"image": 1, "video": 2, "grounding": 3, "motion": 4}
_HUE_ORDER = ("red", "yellow", "green", "cyan", "blue", "magenta")  # hue bins of 60 degrees from 0
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Geometry on a 32-pixel grid (everything scales with the rendered size): sides and box corners
# are whole pixels at 32, so normalised values are exact multiples of 1/64 and shapes are crisp.
_GRID = 32
_GAP = 3  # free pixels between object boxes
_MARGIN = 1  # free pixels between an object box and the frame edge
_SIDES = {"default": (8, 14), "count3": (8, 11), "video": (8, 12)}  # side range, pixels at 32
_STEPS = (1, 2)  # video speed, pixels per frame at 32
_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side^2
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}  # centroid below box centre / side


# ----------------------------------------------------------------------------- scenes


def make_scene(seed: int, kind: str = "image", layout: str | None = None) -> dict[str, Any]:
    """A scene from a seed. kind: "image" | "video"; layout: None picks one from the seed."""
    if kind not in ("image", "video"):
        raise ValueError(f"make_scene: kind must be 'image' or 'video', got {kind!r}")
    rng = np.random.default_rng([_KIND_CODES[kind], int(seed)])
    if kind == "video":
        if layout not in (None, "motion"):
            raise ValueError(f"make_scene: video scenes have layout 'motion', got {layout!r}")
        return _video_scene(rng, int(seed))
    if layout is None:
        layout = IMAGE_LAYOUTS[int(rng.integers(len(IMAGE_LAYOUTS)))]
    if layout not in ("single", "count", "relation", "group"):
        raise ValueError(f"make_scene: unknown image layout {layout!r}; use single, count, relation or group")
    relation = None
    if layout == "single":
        looks = [_random_pair(rng)]
    elif layout == "count":
        looks = [_random_pair(rng)] * int(rng.integers(2, 4))
    elif layout == "relation":
        looks = _distinct_pairs(rng, 2)
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    else:
        looks = _distinct_pairs(rng, int(rng.integers(2, 4)))
    sides = _SIDES["count3"] if len(looks) == 3 else _SIDES["default"]
    return _scene("image", int(seed), layout, _place(rng, looks, sides, relation), relation=relation)


def _scene(kind: str, seed: int, layout: str, objects: list[dict[str, Any]], *, relation: str | None = None,
           motion: str | None = None, frames: int | None = None) -> dict[str, Any]:
    """A scene dict in the format of the module docstring, caption included."""
    scene = {"kind": kind, "seed": seed, "layout": layout, "objects": objects, "relation": relation, "motion": motion,
             "frames": frames}
    scene["caption"] = caption(scene)
    return scene


def _random_pair(rng: np.random.Generator) -> tuple[str, str]:
    return COLORS[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]


def _distinct_pairs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n (colour, shape) pairs, all different, so every object can be named uniquely."""
    pairs = list(itertools.product(COLORS, SHAPES))
    picks = rng.choice(len(pairs), size=n, replace=False)
    return [pairs[int(i)] for i in picks]


def _separated(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Boxes (x1, y1, side) in grid pixels are at least _GAP apart along x or along y."""
    gap_x = max(a[0], b[0]) - min(a[0] + a[2], b[0] + b[2])
    gap_y = max(a[1], b[1]) - min(a[1] + a[2], b[1] + b[2])
    return max(gap_x, gap_y) >= _GAP


def _relation_holds(a, b, relation: str, shapes: tuple[str, str]) -> bool:
    """a <relation> b for boxes (x1, y1, side): a clear gap on the named axis, and the offset of
    the shapes' centroids on that axis beats the other offset by 2 px (what `analyse` sees)."""
    ca = (a[0] + a[2] / 2, a[1] + a[2] * (0.5 + _CENTROID_DY[shapes[0]]))
    cb = (b[0] + b[2] / 2, b[1] + b[2] * (0.5 + _CENTROID_DY[shapes[1]]))
    dx, dy = cb[0] - ca[0], cb[1] - ca[1]
    if relation == "left of":
        return b[0] - (a[0] + a[2]) >= _GAP and dx >= abs(dy) + 2
    return b[1] - (a[1] + a[2]) >= _GAP and dy >= abs(dx) + 2


def _obj(color: str, shape: str, x1: float, y1: float, side: int) -> dict[str, Any]:
    """An object dict from a grid box (pixels at 32) in normalised coordinates."""
    return {
        "color": color,
        "shape": shape,
        "center": [(x1 + side / 2) / _GRID, (y1 + side / 2) / _GRID],
        "size": side / _GRID,
    }


def _place(rng, looks, sides, relation, tries: int = 5000) -> list[dict[str, Any]]:
    """Rejection-sample sides and box corners: inside the frame, non-overlapping, relation true."""
    for _ in range(tries):
        placed = []
        for _look in looks:
            side = int(rng.integers(sides[0], sides[1] + 1))
            hi = _GRID - _MARGIN - side  # last valid corner
            placed.append((int(rng.integers(_MARGIN, hi + 1)), int(rng.integers(_MARGIN, hi + 1)), side))
        if not all(_separated(a, b) for a, b in itertools.combinations(placed, 2)):
            continue
        if relation is not None and not _relation_holds(placed[0], placed[1], relation, (looks[0][1], looks[1][1])):
            continue
        return [_obj(c, sh, *box) for (c, sh), box in zip(looks, placed)]
    raise RuntimeError(f"could not place {len(looks)} objects in {tries} tries")  # never seen in practice


def _video_scene(rng: np.random.Generator, seed: int) -> dict[str, Any]:
    color, shape = _random_pair(rng)
    motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
    side = int(rng.integers(_SIDES["video"][0], _SIDES["video"][1] + 1))
    step = int(rng.choice(_STEPS))
    ux, uy = (int(v) for v in _DIRECTIONS[motion])
    travel = step * (FRAMES - 1)
    lo, hi = _MARGIN, _GRID - _MARGIN - side  # valid corner range on each axis
    # the start corner keeps every frame's box inside [lo, hi] on the moving axis
    x1 = int(rng.integers(lo - min(ux, 0) * travel, hi - max(ux, 0) * travel + 1))
    y1 = int(rng.integers(lo - min(uy, 0) * travel, hi - max(uy, 0) * travel + 1))
    frames = [_obj(color, shape, x1 + ux * step * t, y1 + uy * step * t, side) for t in range(FRAMES)]
    obj = {**frames[0], "track": [f["center"] for f in frames]}
    return _scene("video", seed, "motion", [obj], motion=motion, frames=FRAMES)


# ----------------------------------------------------------------------------- captions


def _obj_phrase(obj: dict[str, Any]) -> str:
    return f"a {obj['color']} {obj['shape']}"


def caption(scene: dict[str, Any]) -> str:
    """The caption of a scene, from its ground truth (see the grammar in the module docstring)."""
    objs, layout = scene["objects"], scene["layout"]
    if layout == "single":
        return _obj_phrase(objs[0])
    if layout == "count":
        return f"{NUMBERS[len(objs)]} {objs[0]['color']} {objs[0]['shape']}s"
    if layout == "relation":
        return f"{_obj_phrase(objs[0])} {scene['relation']} {_obj_phrase(objs[1])}"
    if layout == "group":
        names = [_obj_phrase(o) for o in objs]
        return ", ".join(names[:-1]) + " and " + names[-1]
    if layout == "motion":
        return f"{_obj_phrase(objs[0])} moving {scene['motion']}"
    raise ValueError(f"caption: unknown layout {layout!r}")


_C, _S = "|".join(COLORS), "|".join(SHAPES)
_OBJ_RE = rf"a ({_C}) ({_S})"


def parse_caption(text: str) -> dict[str, Any]:
    """The ground truth a caption states: {"objects": [{"color", "shape"}], "relation", "motion", "layout"}.

    Raises ValueError for text outside the mini-world grammar.
    """
    t = " ".join(str(text).lower().strip().rstrip(".").split())
    out: dict[str, Any] = {"relation": None, "motion": None}
    if m := re.fullmatch(_OBJ_RE, t):
        out.update(layout="single", objects=[{"color": m[1], "shape": m[2]}])
    elif m := re.fullmatch(rf"(two|three) ({_C}) ({_S})s", t):
        n = 2 if m[1] == "two" else 3
        out.update(layout="count", objects=[{"color": m[2], "shape": m[3]} for _ in range(n)])
    elif m := re.fullmatch(rf"{_OBJ_RE} (left of|above) {_OBJ_RE}", t):
        out.update(layout="relation", relation=m[3], objects=[{"color": m[1], "shape": m[2]}, {"color": m[4], "shape": m[5]}])
    elif m := re.fullmatch(rf"{_OBJ_RE} moving (left|right|up|down)", t):
        out.update(layout="motion", motion=m[3], objects=[{"color": m[1], "shape": m[2]}])
    elif m := re.fullmatch(rf"{_OBJ_RE}(?:, {_OBJ_RE})? and {_OBJ_RE}", t):
        groups = [g for g in m.groups() if g is not None]
        out.update(layout="group", objects=[{"color": c, "shape": s} for c, s in zip(groups[::2], groups[1::2])])
    else:
        raise ValueError(
            f"parse_caption: {text!r} is not a mini-world caption; expected e.g. 'a red circle', "
            "'two blue squares', 'a red circle left of a blue square', 'a green triangle moving right'"
        )
    return out


# ----------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, cx: float, cy: float, side: float, height: int, width: int | None = None) -> np.ndarray:
    """bool [H, W]: pixels whose centre lies inside the shape (all arguments in pixels)."""
    dx = np.arange(width or height)[None, :] + 0.5 - cx  # [1, W]
    dy = np.arange(height)[:, None] + 0.5 - cy  # [H, 1]
    h = side / 2
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "circle":
        return dx**2 + dy**2 <= h**2
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def _positions(scene: dict[str, Any], frame: int | None, frames: int | None = None) -> list[list[float]]:
    """Object centres at `frame` of a clip of `frames` frames (static objects keep their centre)."""
    out = []
    for obj in scene["objects"]:
        track = obj.get("track")
        if frame is None or not track:
            out.append(obj["center"])
            continue
        n = frames or len(track)
        if n == len(track):
            out.append(track[frame])
        else:  # motion is linear: resample between the first and last recorded centres
            a = frame / max(n - 1, 1)
            out.append([track[0][i] + (track[-1][i] - track[0][i]) * a for i in range(2)])
    return out


def _object_masks(scene: dict[str, Any], size: int, frame: int | None = None, frames: int | None = None):
    for obj, (cx, cy) in zip(scene["objects"], _positions(scene, frame, frames)):
        yield obj, _shape_mask(obj["shape"], cx * size, cy * size, obj["size"] * size, size)


def render(scene: dict[str, Any], size: int = 32, frame: int | None = None) -> np.ndarray:
    """uint8 [size, size, 3]. For a video scene, `frame` picks the frame (default 0)."""
    if frame is None and scene.get("motion") is not None:
        frame = 0
    img = np.zeros((size, size, 3), dtype=np.uint8)  # [H, W, 3]
    img[:] = BACKGROUND
    for obj, mask in _object_masks(scene, size, frame):
        if obj["color"] not in PALETTE:
            raise ValueError(f"unknown colour {obj['color']!r}; use one of {COLORS}")
        img[mask] = PALETTE[obj["color"]]
    return img


def render_clip(scene: dict[str, Any], size: int = 32, frames: int | None = None) -> np.ndarray:
    """uint8 [F, size, size, 3] of a video scene (F = scene["frames"] unless `frames` is given)."""
    if scene.get("motion") is None:
        raise ValueError("render_clip: this scene has no motion; make it with make_scene(seed, kind='video')")
    n = frames or scene["frames"]
    clip = np.zeros((n, size, size, 3), dtype=np.uint8)  # [F, H, W, 3]
    clip[:] = BACKGROUND
    for t in range(n):
        for obj, mask in _object_masks(scene, size, t, n):
            clip[t][mask] = PALETTE[obj["color"]]
    return clip


def boxes(scene: dict[str, Any], size: int = 32, frame: int | None = None) -> list[list[int]]:
    """Tight pixel box [x1, y1, x2, y2] (x2, y2 exclusive) of every object as rendered at `size`."""
    if frame is None and scene.get("motion") is not None:
        frame = 0
    out = []
    for _obj, mask in _object_masks(scene, size, frame):
        ys, xs = np.nonzero(mask)
        out.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    return out


# ----------------------------------------------------------------------------- prompt sets


def prompt_set(kind: str, split: str = "train", n: int = 64, *, size: int = 32) -> list[dict[str, Any]]:
    """n prompt items of one kind; train and heldout use disjoint seed ranges.

    Every item is a scene dict (renderable with `render`/`render_clip`; its "kind" says image
    or video) plus "task" (= `kind` here) and:
    - "image": "prompt" (= caption)
    - "video": "prompt" (= caption)
    - "grounding": "prompt" ("Where is the red circle?"), "target" (object index),
      "box" ([x1, y1, x2, y2] ints, pixels of the image rendered at `size`),
      "image_size" ([width, height] = [size, size], the convention of mmgrpo.rewards.iou)
    - "motion": "prompt" ("Which way is the green triangle moving?"), "answer" (direction word),
      "choices" (the four direction words), "image_size" ([size, size]: render the clip at `size`)
    """
    if kind not in _KIND_CODES:
        raise ValueError(f"prompt_set: unknown kind {kind!r}; use one of {tuple(_KIND_CODES)}")
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"prompt_set: unknown split {split!r}; use 'train' or 'heldout'")
    if not 0 <= n <= _SPLIT_SIZE:
        raise ValueError(f"prompt_set: n must be in [0, {_SPLIT_SIZE}], got {n}")
    return [prompt_item(kind, SPLIT_OFFSETS[split] + i, size=size) for i in range(n)]


def prompt_item(kind: str, seed: int, *, size: int = 32) -> dict[str, Any]:
    """One prompt item of `kind` from `seed` (see `prompt_set` for the fields)."""
    if kind == "image":
        scene = make_scene(seed, "image")
        return {"prompt": scene["caption"], "task": kind, **scene}
    if kind == "video":
        scene = make_scene(seed, "video")
        return {"prompt": scene["caption"], "task": kind, **scene}
    if kind == "grounding":
        rng = np.random.default_rng([_KIND_CODES["grounding"], int(seed)])
        layout = GROUNDING_LAYOUTS[int(rng.integers(len(GROUNDING_LAYOUTS)))]
        scene = make_scene(seed, "image", layout=layout)
        target = int(rng.integers(len(scene["objects"])))
        obj = scene["objects"][target]
        return {
            "prompt": f"Where is the {obj['color']} {obj['shape']}?",
            "task": kind,
            **scene,
            "target": target,
            "box": boxes(scene, size)[target],
            "image_size": [size, size],
        }
    if kind == "motion":
        scene = make_scene(seed, "video")
        obj = scene["objects"][0]
        return {
            "prompt": f"Which way is the {obj['color']} {obj['shape']} moving?",
            "task": kind,
            **scene,
            "answer": scene["motion"],
            "choices": list(MOTIONS),
            "image_size": [size, size],
        }
    raise ValueError(f"prompt_item: unknown kind {kind!r}; use one of {tuple(_KIND_CODES)}")


# ----------------------------------------------------------------------------- analysis


def to_uint8_image(x: Any) -> np.ndarray:
    """uint8 [..., H, W, 3] from a torch tensor [..., 3, H, W] or a numpy array [..., H, W, 3].

    Floats are read as [0, 1] (clipped). Raises ValueError for anything else.
    """
    if hasattr(x, "detach"):  # torch tensor: channels first
        if x.ndim < 3 or x.shape[-3] != 3:
            raise ValueError(f"expected a tensor [..., 3, H, W], got shape {tuple(x.shape)}")
        t = x.detach().cpu()
        arr = np.moveaxis((t.float() if t.is_floating_point() else t).numpy(), -3, -1)  # [..., H, W, 3]
    else:
        arr = np.asarray(x)
        if arr.ndim < 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an array [..., H, W, 3], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return np.clip(arr, 0, 255).astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected uint8 or float pixels, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("image has NaN or infinite pixels")
    return np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)


def colour_map(image: np.ndarray) -> np.ndarray:
    """int [..., H, W]: palette index (into COLORS) of every pixel, -1 for background.

    A pixel is an object pixel when bright (max channel >= 0.5) and saturated
    ((max - min) / max >= 0.5); its colour is the palette colour nearest in hue. This
    ignores brightness, so blur towards the background keeps colours and halves edges.
    Takes one image [H, W, 3] or a stack of them [..., H, W, 3] (a clip's frames at once).
    """
    rgb = to_uint8_image(image).astype(np.float32) / 255.0  # [..., H, W, 3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)  # [..., H, W]
    d = np.maximum(mx - mn, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))  # [..., H, W] in [0, 6)
    hue_bin = np.floor(hue + 0.5).astype(np.int64) % 6
    lut = np.array([COLORS.index(c) for c in _HUE_ORDER])
    fg = (mx >= 0.5) & ((mx - mn) >= 0.5 * mx)
    return np.where(fg, lut[hue_bin], -1)


def _components(classes: np.ndarray) -> np.ndarray:
    """int [H, W]: 8-connected component id per pixel of equal class (>= 0), -1 elsewhere.

    scipy.ndimage.label per class; a component's id is its smallest flat pixel index, so ids
    (and the order `analyse` lists equal-area objects in) do not depend on the labelling order.
    """
    from scipy import ndimage

    h, w = classes.shape
    flat_index = np.arange(h * w).reshape(h, w)  # [H, W]
    labels = np.full((h, w), -1, dtype=np.int64)  # [H, W]
    for c in np.unique(classes[classes >= 0]):
        parts, n = ndimage.label(classes == c, structure=np.ones((3, 3), dtype=bool))  # [H, W] in 0..n
        first = np.asarray(ndimage.minimum(flat_index, parts, index=np.arange(1, n + 1)), dtype=np.int64)  # [n]
        labels = np.where(parts > 0, first[parts - 1], labels)
    return labels


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose template, placed and sized by the mask's centroid and area, overlaps it best.

    Centroid and area barely move under blur and stray pixels, unlike a bounding box.
    """
    ys, xs = np.nonzero(mask)
    cx, cy, area = xs.mean() + 0.5, ys.mean() + 0.5, len(xs)
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        side = np.sqrt(area / _AREA[shape])
        t = _shape_mask(shape, cx, cy - _CENTROID_DY[shape] * side, side, *mask.shape)  # [H, W]
        iou = (t & mask).sum() / max((t | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def analyse(image: Any, min_area: float = 0.008) -> list[dict[str, Any]]:
    """Objects in an image (uint8 [H, W, 3], float [H, W, 3] in [0, 1], or torch [3, H, W]).

    Returns dicts {"color", "shape", "box": [x1, y1, x2, y2] (pixels, exclusive end),
    "centroid": [x, y] (pixels), "area": int}, largest first. Components smaller than
    `min_area` of the image are noise and dropped.
    """
    classes = colour_map(image)  # [H, W]
    if classes.ndim != 2:
        raise ValueError(f"expected a single image [H, W, 3], got shape {classes.shape + (3,)}; use analyse_clip for clips")
    return _objects(classes, min_area)


def _objects(classes: np.ndarray, min_area: float) -> list[dict[str, Any]]:
    """analyse() from a colour map [H, W]."""
    h, w = classes.shape
    labels = _components(classes)  # [H, W]
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    found = []
    for cid, area in zip(ids, counts):
        if area < min_area * h * w:
            continue
        mask = labels == cid  # [H, W]
        ys, xs = np.nonzero(mask)
        found.append(
            {
                "color": COLORS[int(classes.flat[cid])],
                "shape": classify_shape(mask),
                "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "centroid": [float(xs.mean() + 0.5), float(ys.mean() + 0.5)],
                "area": int(area),
            }
        )
    found.sort(key=lambda o: -o["area"])
    return found


def motion_direction(positions: list[list[float] | None], min_travel: float) -> str | None:
    """Direction of a centroid track (None entries are missed frames) from a least-squares line.

    Returns "left" | "right" | "up" | "down", or None when the fitted travel over the clip is
    below `min_travel` (pixels) or fewer than two frames have a position.
    """
    t = np.array([i for i, p in enumerate(positions) if p is not None], dtype=np.float64)  # [K]
    if len(t) < 2:
        return None
    p = np.array([positions[int(i)] for i in t], dtype=np.float64)  # [K, 2]
    tc = t - t.mean()
    slope = (tc[:, None] * (p - p.mean(0))).sum(0) / (tc**2).sum()  # [2] pixels per frame
    travel = slope * (len(positions) - 1)  # [2]
    axis = int(np.argmax(np.abs(travel)))
    if abs(travel[axis]) < min_travel:
        return None
    if axis == 0:
        return "right" if travel[0] > 0 else "left"
    return "down" if travel[1] > 0 else "up"


def analyse_clip(clip: Any, min_area: float = 0.008, min_travel: float = 0.06, max_area: float = 1.0) -> dict[str, Any]:
    """Objects per frame and centroid tracks of a clip (uint8 [F, H, W, 3] or torch [F, 3, H, W]).

    Returns {"frames": [analyse(frame) for each frame], "tracks": [{"color", "shape",
    "positions": [[x, y] | None per frame], "motion": direction | None}]}. Tracks start from
    the first frame with objects and follow the nearest same-colour object in each frame;
    the shape is the majority over frames. `min_travel` is a fraction of the image width.
    Components larger than `max_area` of the frame stay in "frames" but are not tracked.
    """
    frames_u8 = to_uint8_image(clip)  # [F, H, W, 3]
    if frames_u8.ndim != 4:
        raise ValueError(f"analyse_clip: expected a clip [F, H, W, 3], got shape {frames_u8.shape}")
    n, h, w = frames_u8.shape[:3]
    per_frame = [_objects(classes, min_area) for classes in colour_map(frames_u8)]  # colour map of all F frames at once
    trackable = [[o for o in f if o["area"] <= max_area * h * w] for f in per_frame]
    start = next((i for i, f in enumerate(trackable) if f), n)
    tracks = []
    for first in trackable[start] if start < n else []:
        positions: list[list[float] | None] = [None] * n
        positions[start] = first["centroid"]
        tracks.append({"color": first["color"], "positions": positions, "shapes": [first["shape"]]})
    for i in range(start + 1, n):
        free = list(trackable[i])
        for tr in tracks:
            last = next(p for p in reversed(tr["positions"][:i]) if p is not None)
            dist = {id(o): np.hypot(o["centroid"][0] - last[0], o["centroid"][1] - last[1]) for o in free}
            near = [o for o in free if o["color"] == tr["color"] and dist[id(o)] <= 0.35 * w]
            if near:
                o = min(near, key=lambda o: dist[id(o)])
                free.remove(o)
                tr["positions"][i] = o["centroid"]
                tr["shapes"].append(o["shape"])
    out = [
        {
            "color": tr["color"],
            "shape": max(SHAPES, key=lambda s: (tr["shapes"].count(s), -SHAPES.index(s))),
            "positions": tr["positions"],
            "motion": motion_direction(tr["positions"], min_travel * w),
        }
        for tr in tracks
    ]
    return {"frames": per_frame, "tracks": out}


def train_and_heldout(kind: str = "image", num_train: int = 512, num_eval: int = 64, size: int = 32) -> dict:
    """The `miniworld` prompt set for data.source: {"train": [...], "eval": [...]} of prompt items."""
    return {
        "train": prompt_set(kind, split="train", n=num_train, size=size),
        "eval": prompt_set(kind, split="heldout", n=num_eval, size=size),
    }


VLM_IMAGE_SIZE = 56  # a multiple of Qwen-VL's 28-pixel merge unit: the processor keeps it as it is
VLM_TASKS = ("grounding", "motion")


def vlm_item(task: str, seed: int, *, size: int = VLM_IMAGE_SIZE, instruction: str | None = None) -> dict[str, Any]:
    """One VLM prompt item (see `vlm_prompts`) for `task` ("grounding" | "motion") from `seed`."""
    if task not in VLM_TASKS:
        raise ValueError(f"vlm_item: unknown task {task!r}; use one of {VLM_TASKS}")
    item = prompt_item(task, seed, size=size)
    scene = {k: item[k] for k in ("kind", "seed", "layout", "objects", "relation", "motion", "frames")}
    if task == "grounding":
        item["image"] = render(scene, size)  # [size, size, 3] uint8
    else:
        item["video"] = render_clip(scene, size)  # [F, size, size, 3] uint8
    item["resized_size"] = [size, size]  # what a Qwen-VL processor makes of it: absolute pixels = image pixels
    if instruction:
        item["prompt"] = f"{item['prompt']} {instruction}"
    return item


def vlm_prompts(
    task: str = "grounding",
    num_train: int = 512,
    num_eval: int = 128,
    size: int = VLM_IMAGE_SIZE,
    instruction: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The VLM prompt set for data.source (`mmgrpo.miniworld.scenes:vlm_prompts`): {"train": [...], "eval": [...]}.

    Train items come from the train seed range, eval items from the held-out range (disjoint).
    task "grounding": "prompt" ("Where is the red circle?"), "image" (uint8 [size, size, 3]),
    "box" ([x1, y1, x2, y2], pixels of that image, x2/y2 exclusive), "image_size" and
    "resized_size" ([size, size]: with the default size 56 the processor does not resize, so
    Qwen-style absolute coordinates are image pixels and an exact box scores IoU 1.0).
    task "motion": "prompt" ("Which way is the green triangle moving?"), "video" (uint8
    [8, size, size, 3] frames), "answer" (left | right | up | down), "choices".
    `instruction` is appended to every question (e.g. the answer format a large model should use).
    Every item also carries its scene (objects, layout, ...), renderable with `render`.
    """
    if task not in VLM_TASKS:
        raise ValueError(f"vlm_prompts: unknown task {task!r}; use one of {VLM_TASKS}")
    for name, n in (("num_train", num_train), ("num_eval", num_eval)):
        if not 0 <= n <= _SPLIT_SIZE:
            raise ValueError(f"vlm_prompts: {name} must be in [0, {_SPLIT_SIZE}], got {n}")
    return {
        split_name: [vlm_item(task, SPLIT_OFFSETS[split] + i, size=size, instruction=instruction) for i in range(n)]
        for split_name, split, n in (("train", "train", num_train), ("eval", "heldout", num_eval))
    }
