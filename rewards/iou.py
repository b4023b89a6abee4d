"""IoU grounding reward for VLM text outputs (VLM-R1 REC style, extended to several boxes).

The completion is parsed for boxes `[x1, y1, x2, y2]` (see `parse_boxes`), the boxes are put
into original-image pixels according to the coordinate convention, and compared with the
ground-truth boxes of the prompt.

Coordinate conventions (`coords=`):
- "absolute" (default; Qwen2.5-VL): pixels of the processor-resized image. They are rescaled
  to the original image by original/resized size, per axis. The resized size comes from, in
  order: the field `resized_size` (width, height); the field `image_grid_thw` (t, h, w) times
  `patch_size` (14; for an [n_images, 3] grid, the first image's); else it is computed from
  the original size with Qwen2.5-VL's resize rule (`qwen_resized_size`: multiples of
  patch_size*merge_size = 28 within [min_pixels, max_pixels]). Set `max_pixels=None` to turn
  that inference off: then the boxes are taken as original-image pixels. So are they when the
  original size is unknown, and the reward warns once (per IoUReward) naming the field to add.
- "relative1000": 0-1000 on each axis (Qwen2-VL, many grounding datasets).
- "normalized": 0-1 on each axis.
The two relative conventions need the original image size: without it a row scores None.

Sizes and ground truth are read from the prompt item (a dict) or, failing that, from the meta
kwarg of the same name (one entry per row):
- original size: `image_size` (width, height), else `width` and `height`, else the size of the
  prompt's image (`image`, else the first of `images`: a file path, PIL image, array or tensor,
  read as the VLM adapter reads it; a file's header only);
- ground truth, in original-image pixels: the first of `gt_keys` ("boxes", "box", "bbox",
  "solution") that is present: one box [x1, y1, x2, y2], a list of boxes, `{"bbox_2d": [...]}`
  objects, a tensor/array of shape [4] or [m, 4], or a string that `parse_boxes` reads (e.g.
  VLM-R1's "<answer>[x1,y1,x2,y2]</answer>"). No or unreadable ground truth: the row scores None.

Scores (`mode=`), per pair of a predicted and a ground-truth box:
- "iou" (default): the IoU, in [0, 1];
- "threshold": 1.0 if IoU > threshold (strictly; VLM-R1 uses 0.5) else 0.0;
- "giou": generalized IoU mapped from [-1, 1] to [0, 1] by (giou + 1) / 2 (identical boxes 1,
  far-apart boxes near 0, touching same-size boxes 0.5).
Several boxes: predicted and ground-truth boxes are matched one-to-one with the Hungarian
algorithm maximising the summed pair score, and

    score = sum of matched pair scores / max(n_pred, n_gt),

so every unmatched box (a missed object, or an extra predicted box) counts as a 0 pair. One box
each gives the plain pair score. At most `max_boxes` predicted boxes are read (the first ones).

Degenerate boxes: with `reorder=True` (default) corners given in the wrong order (x2 < x1 or
y2 < y1) are swapped; with `reorder=False` such a predicted box is invalid and scores 0 with
every ground-truth box (it still counts as a predicted box). Ground-truth boxes are always
reordered. Zero-area boxes score 0.

Output: `{"score": [...], "parsed": [...]}`. A completion with no readable box scores 0.0 (it
is the model's fault) and has parsed=0, so the parse rate can be logged; rows that cannot be
scored (no ground truth, no image size for a relative convention) score None.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Sequence

import torch
from torchvision.ops import box_iou, generalized_box_iou

from mmgrpo.rewards.format import answer_region, completion_text

Box = tuple[float, float, float, float]

COORDS = ("absolute", "relative1000", "normalized")
MODES = ("iou", "threshold", "giou")

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"(?:\s*[,;]\s*|\s+)"
# [x1, y1, x2, y2], (x1 y1 x2 y2), {x1, y1, x2, y2}
_BOX4_RE = re.compile(rf"[\[\(\{{]\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*[\]\)\}}]")
# (x1, y1), (x2, y2) and [[x1, y1], [x2, y2]] (Qwen2-VL's <|box_start|>(x1,y1),(x2,y2)<|box_end|>)
_PAIRS_RE = re.compile(
    rf"[\(\[]\s*({_NUM}){_SEP}({_NUM})\s*[\)\]]\s*[,\-]?\s*[\(\[]\s*({_NUM}){_SEP}({_NUM})\s*[\)\]]"
)
_BARE_NUM_RE = re.compile(rf"(?<![\w.]){_NUM}(?![\w.])")
# {"x1": 1, "y1": 2, "x2": 3, "y2": 4} (also xmin/ymin/xmax/ymax, left/top/right/bottom; ':' or '=')
_OBJECT_RE = re.compile(r"\{[^{}]{0,1000}\}")
_KEY_VALUE_RE = re.compile(rf"[\"']?([A-Za-z_]\w*)[\"']?\s*[:=]\s*({_NUM})")
_CORNER_KEYS = (("x1", "y1", "x2", "y2"), ("xmin", "ymin", "xmax", "ymax"), ("left", "top", "right", "bottom"))
_MAX_DEPTH = 16


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _collect(obj: Any, out: list[Box], depth: int = 0) -> None:
    """Boxes inside a Python structure (ground truth): lists of 4 numbers, [[x1, y1], [x2, y2]],
    dicts with corner keys, or any nesting of these (e.g. [{"bbox_2d": [...], "label": ...}])."""
    if depth > _MAX_DEPTH:
        return
    if hasattr(obj, "tolist") and not isinstance(obj, (list, tuple, dict, str)):
        obj = obj.tolist()  # tensor / ndarray
    if isinstance(obj, (list, tuple)):
        if len(obj) == 4 and all(_is_number(v) for v in obj):
            out.append(tuple(float(v) for v in obj))  # type: ignore[arg-type]
        elif (
            len(obj) == 2
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_number(v) for v in p) for p in obj)
        ):
            (x1, y1), (x2, y2) = obj
            out.append((float(x1), float(y1), float(x2), float(y2)))
        else:
            for item in obj:
                _collect(item, out, depth + 1)
    elif isinstance(obj, dict):
        for keys in _CORNER_KEYS:
            if all(_is_number(obj.get(k)) for k in keys):
                out.append(tuple(float(obj[k]) for k in keys))  # type: ignore[arg-type]
                return
        for value in obj.values():
            _collect(value, out, depth + 1)


def _regex_boxes(region: str) -> list[Box]:
    """Bracketed 4-number groups, corner pairs and corner-key objects, in order, not overlapping."""
    found: list[tuple[int, int, Box]] = []
    for pattern in (_BOX4_RE, _PAIRS_RE):
        for m in pattern.finditer(region):
            found.append((m.start(), m.end(), tuple(float(v) for v in m.groups())))  # type: ignore[arg-type]
    for m in _OBJECT_RE.finditer(region):
        fields = {k.lower(): v for k, v in _KEY_VALUE_RE.findall(m.group(0))}
        for keys in _CORNER_KEYS:
            if all(k in fields for k in keys):
                found.append((m.start(), m.end(), tuple(float(fields[k]) for k in keys)))  # type: ignore[arg-type]
                break
    found.sort(key=lambda item: (item[0], -item[1]))
    boxes, taken_until = [], -1
    for start, end, box in found:
        if start >= taken_until:
            boxes.append(box)
            taken_until = end
    return boxes


def _bare_box(region: str) -> list[Box]:
    numbers = _BARE_NUM_RE.findall(region)
    return [tuple(float(v) for v in numbers)] if len(numbers) == 4 else []  # type: ignore[list-item]


def parse_boxes(text: Any, tag: str = "answer") -> list[Box]:
    """Every box [x1, y1, x2, y2] in a completion, in order of appearance. Never raises.

    Where: if the text has an `<answer>` block (see `answer_region`), only that block is read
    (boxes in the reasoning are ignored); else the whole text. What:
    1. every bracketed group of 4 numbers (ints or floats, separated by commas, semicolons or
       spaces): "[x1, y1, x2, y2]", "(x1, y1, x2, y2)", "{...}"; so JSON such as Qwen2.5-VL's
       ```json [{"bbox_2d": [...], "label": ...}, ...]``` gives one box per object; also two
       corner pairs "(x1,y1),(x2,y2)" / [[x1, y1], [x2, y2]] (Qwen2-VL), and objects with
       corner keys {"x1":..,"y1":..,"x2":..,"y2":..} (or xmin/ymin/xmax/ymax, left/top/right/bottom);
    2. only if 1 finds nothing: when the region holds exactly 4 standalone numbers, one box
       ("x1=10, y1=20, x2=30, y2=40", or a truncated "[10, 20, 30, 40").
    Boxes with a non-finite coordinate are dropped. Unreadable input gives [].

    >>> parse_boxes('<think>around [0, 0, 5, 5]</think><answer>[{"bbox_2d": [10, 20, 110.5, 220]}]</answer>')
    [(10.0, 20.0, 110.5, 220.0)]
    >>> parse_boxes("the cat is at (1, 2), (3, 4) and the dog at [5 6 7 8]")
    [(1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)]
    >>> parse_boxes("no box")
    []
    """
    try:
        if not isinstance(text, str):
            text = completion_text(text)
        region, _ = answer_region(text, tag)
        boxes = _regex_boxes(region) or _bare_box(region)
        return [b for b in boxes if all(math.isfinite(v) for v in b)]
    except Exception:  # a reward must never crash a training step on odd model output
        return []


def qwen_resized_size(
    size: tuple[int, int], factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 16384
) -> tuple[int, int]:
    """(width, height) that Qwen2.5-VL's processor resizes an image of `size` = (width, height) to.

    Each side is rounded to a multiple of `factor`; if the area then leaves
    [min_pixels, max_pixels], both sides are scaled by one factor (keeping the aspect ratio)
    and floored (too large) or ceiled (too small) to multiples of `factor`.

    >>> qwen_resized_size((1000, 500))
    (1008, 504)
    """
    width, height = float(size[0]), float(size[1])
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(w_bar), int(h_bar)


def _field(prompt: Any, meta: dict[str, Any], i: int, name: str) -> Any:
    """prompt[name] for a dict prompt, else meta[name][i], else None."""
    if isinstance(prompt, dict) and prompt.get(name) is not None:
        return prompt[name]
    values = meta.get(name)
    if values is not None and not isinstance(values, (str, dict)) and hasattr(values, "__len__") and i < len(values):
        return values[i]  # a list, or a batched tensor such as image_grid_thw [N, 3]
    return None


def _pair(value: Any) -> tuple[float, float] | None:
    """A positive finite (a, b) from a 2-sequence, else None."""
    try:
        a, b = (float(v) for v in (value.tolist() if hasattr(value, "tolist") else value))
    except (TypeError, ValueError):
        return None
    return (a, b) if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b) else None


def _prompt_image_size(prompt: Any, meta: dict[str, Any], i: int) -> tuple[int, int] | None:
    """(width, height) of the row's image: the `image` field, else the first of `images`; None without one."""
    image = _field(prompt, meta, i, "image")
    if image is None:
        images = _field(prompt, meta, i, "images")
        image = images[0] if isinstance(images, (list, tuple)) and images else None
    if image is None:
        return None
    from mmgrpo.pipelines.vlm.media import image_size  # the adapter's reading of image sources

    return image_size(image)


class IoUReward:
    """IoU between the boxes a VLM writes and the ground-truth boxes (see the module docstring).

    Args:
        coords: "absolute" (resized-image pixels, Qwen2.5-VL) | "relative1000" | "normalized".
        mode: "iou" (continuous) | "threshold" (IoU > threshold -> 1) | "giou" ((giou+1)/2).
        threshold: the IoU threshold of mode="threshold".
        reorder: swap corners given in the wrong order (True) or score such boxes 0 (False).
        patch_size, merge_size, min_pixels, max_pixels: the processor's resize settings, used in
            "absolute" to infer the resized size (Qwen2.5-VL defaults); max_pixels=None: no inference.
        gt_keys: prompt fields / meta kwargs searched, in order, for the ground-truth boxes.
        max_boxes: at most this many predicted boxes are read.
        answer_tag: the tag whose block is read when present.

    Returns {"score": [float | None], "parsed": [1 | 0]}.

    >>> reward = IoUReward(coords="relative1000")
    >>> prompts = [{"image_size": (200, 100), "box": [0, 0, 100, 100]}] * 3
    >>> out = reward(["<answer>[0, 0, 500, 1000]</answer>", "<answer>[0, 0, 250, 1000]</answer>", "no idea"], prompts)
    >>> out["score"], out["parsed"]
    ([1.0, 0.5, 0.0], [1, 1, 0])
    """

    name = "iou"

    def __init__(
        self,
        coords: str = "absolute",
        mode: str = "iou",
        threshold: float = 0.5,
        reorder: bool = True,
        patch_size: int = 14,
        merge_size: int = 2,
        min_pixels: int = 56 * 56,
        max_pixels: int | None = 14 * 14 * 4 * 16384,
        gt_keys: Sequence[str] = ("boxes", "box", "bbox", "solution"),
        max_boxes: int = 32,
        answer_tag: str = "answer",
    ):
        if coords not in COORDS:
            raise ValueError(f"IoUReward: coords={coords!r} is unknown; use one of {COORDS}.")
        if mode not in MODES:
            raise ValueError(f"IoUReward: mode={mode!r} is unknown; use one of {MODES}.")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"IoUReward: threshold={threshold} must be in [0, 1) (IoU > threshold scores 1).")
        if max_boxes < 1:
            raise ValueError(f"IoUReward: max_boxes={max_boxes} must be >= 1.")
        if isinstance(gt_keys, str) or not gt_keys:
            raise ValueError(f"IoUReward: gt_keys={gt_keys!r} must be a non-empty list of field names, e.g. ['boxes'].")
        self.coords, self.mode, self.threshold, self.reorder = coords, mode, threshold, reorder
        self.patch_size, self.merge_size = patch_size, merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.gt_keys, self.max_boxes, self.answer_tag = tuple(gt_keys), max_boxes, answer_tag
        self._warned_no_size = False  # the missing-size warning is given once per instance

    # ---- reading the prompt ---------------------------------------------------------------
    def ground_truth(self, prompt: Any, meta: dict[str, Any], i: int) -> torch.Tensor | None:
        """[m, 4] float64 ground-truth boxes (original pixels, corners ordered), or None."""
        for key in self.gt_keys:
            value = _field(prompt, meta, i, key)
            if value is None:
                continue
            boxes: list[Box] = []
            if isinstance(value, str):
                boxes = parse_boxes(value, self.answer_tag)
            else:
                _collect(value, boxes)
            if not boxes or not all(math.isfinite(v) for b in boxes for v in b):
                return None
            gt = torch.tensor(boxes, dtype=torch.float64)  # [m, 4]
            return torch.cat([torch.minimum(gt[:, :2], gt[:, 2:]), torch.maximum(gt[:, :2], gt[:, 2:])], dim=1)
        return None

    def original_size(self, prompt: Any, meta: dict[str, Any], i: int) -> tuple[float, float] | None:
        """(width, height) of the original image, or None."""
        size = _pair(_field(prompt, meta, i, "image_size"))
        if size is None:
            width, height = _field(prompt, meta, i, "width"), _field(prompt, meta, i, "height")
            size = _pair((width, height)) if width is not None and height is not None else None
        if size is None:
            size = _pair(_prompt_image_size(prompt, meta, i))
        return size

    def resized_size(
        self, prompt: Any, meta: dict[str, Any], i: int, original: tuple[float, float]
    ) -> tuple[float, float] | None:
        """(width, height) of the processor-resized image (coords="absolute"), or None."""
        size = _pair(_field(prompt, meta, i, "resized_size"))
        if size is not None:
            return size
        grid = _field(prompt, meta, i, "image_grid_thw")
        if grid is not None:
            try:
                grid = grid.tolist() if hasattr(grid, "tolist") else list(grid)
                if grid and isinstance(grid[0], (list, tuple)):
                    grid = grid[0]  # [n_images, 3]: the first image
                values = [float(v) for v in grid]
                values = values if len(values) == 3 else []
            except (TypeError, ValueError):
                values = []
            if values and values[1] > 0 and values[2] > 0:
                return values[2] * self.patch_size, values[1] * self.patch_size
        if self.max_pixels is not None:
            return qwen_resized_size(original, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        return None

    def scale(self, prompt: Any, meta: dict[str, Any], i: int) -> tuple[float, float] | None:
        """(sx, sy) that take predicted coordinates to original pixels; None if not known."""
        original = self.original_size(prompt, meta, i)
        if original is None:
            self._warn_no_size(i)
        if self.coords == "absolute":
            if original is None:
                return 1.0, 1.0
            resized = self.resized_size(prompt, meta, i, original)
            return (1.0, 1.0) if resized is None else (original[0] / resized[0], original[1] / resized[1])
        if original is None:
            return None
        unit = 1000.0 if self.coords == "relative1000" else 1.0
        return original[0] / unit, original[1] / unit

    def _warn_no_size(self, i: int) -> None:
        if self._warned_no_size:
            return
        self._warned_no_size = True
        effect = (
            "its boxes are scored as original-image pixels, without the rescale from the processor's resized image"
            if self.coords == "absolute"
            else f"its {self.coords} boxes cannot be scored (score None)"
        )
        warnings.warn(
            f"IoUReward: row {i} has no original image size (no 'image_size', 'width'/'height' or 'image' field), "
            f"so {effect}; add \"image_size\": [width, height] (original pixels) or the \"image\" to each prompt "
            f"item. Warned once.",
            UserWarning,
            stacklevel=4,
        )

    # ---- scoring ----------------------------------------------------------------------------
    def pair_scores(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """[n, m] scores in [0, 1] between predicted [n, 4] and ground-truth [m, 4] boxes."""
        if self.reorder:
            pred = torch.cat([torch.minimum(pred[:, :2], pred[:, 2:]), torch.maximum(pred[:, :2], pred[:, 2:])], dim=1)
        valid = (pred[:, 2:] >= pred[:, :2]).all(dim=1) & torch.isfinite(pred).all(dim=1)  # [n]
        pred = torch.where(valid[:, None], pred, torch.zeros_like(pred))
        iou = box_iou(pred, gt)  # [n, m]
        if self.mode == "giou":
            scores = (generalized_box_iou(pred, gt) + 1.0) / 2.0
        elif self.mode == "threshold":
            scores = (iou > self.threshold).to(iou.dtype)
        else:
            scores = iou
        # 0/0 from zero-area boxes, or overflow from absurd coordinates: no credit.
        scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0).clamp(0.0, 1.0)
        # zero-area predictions never score (GIoU would otherwise give them up to 0.5).
        has_area = (pred[:, 2:] > pred[:, :2]).all(dim=1)  # [n]
        return scores * (valid & has_area)[:, None]

    @staticmethod
    def match(scores: torch.Tensor) -> float:
        """Hungarian one-to-one matching: sum of matched scores / max(n, m)."""
        n, m = scores.shape
        if n == 1 or m == 1:
            total = float(scores.max())
        else:
            try:
                from scipy.optimize import linear_sum_assignment
            except ImportError as err:  # pragma: no cover - scipy is in mmgrpo[vlm]
                raise ImportError("IoUReward needs scipy to match several boxes: pip install 'mmgrpo[vlm]'.") from err
            rows, cols = linear_sum_assignment(scores.numpy(), maximize=True)
            total = float(scores[torch.as_tensor(rows), torch.as_tensor(cols)].sum())
        return min(max(total / max(n, m), 0.0), 1.0)

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any], **meta: Any) -> dict[str, list]:
        if len(prompts) != len(samples):
            raise ValueError(
                f"IoUReward: got {len(samples)} samples but {len(prompts)} prompts; pass one prompt per sample."
            )
        scores: list[float | None] = []
        parsed: list[int] = []
        for i, (sample, prompt) in enumerate(zip(samples, prompts)):
            boxes = parse_boxes(completion_text(sample), self.answer_tag)[: self.max_boxes]
            parsed.append(int(bool(boxes)))
            gt = self.ground_truth(prompt, meta, i)
            scale = self.scale(prompt, meta, i)
            if gt is None or scale is None:
                scores.append(None)
            elif not boxes:
                scores.append(0.0)
            else:
                pred = torch.tensor(boxes, dtype=torch.float64)  # [n, 4]
                pred = pred * torch.tensor([scale[0], scale[1], scale[0], scale[1]], dtype=torch.float64)
                scores.append(self.match(self.pair_scores(pred, gt)))
        return {"score": scores, "parsed": parsed}
