"""What the page shows, as plain functions of samples and scores (no Gradio in here).

One natural view per modality: images as pictures (upscaled without smoothing: the embedded models
draw 32x32), videos as MP4 + contact sheet, audio as WAV + spectrogram (the adapter's own export),
VLM answers as boxes drawn on the image, masked-diffusion completions coloured by the step at which
each token was unmasked, and the scores of both policies with the difference highlighted.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

VIEW_KINDS = ("text", "image", "video", "audio", "vlm", "mdlm")
MODALITY_VIEWS = {"toy": "text", "image": "image", "video": "video", "audio": "audio", "vlm": "vlm", "mdlm": "mdlm"}
DISPLAY_SIDE = 256  # pixels a tiny image is shown at
SIDE_COLOURS = {"base": (230, 120, 20), "trained": (40, 110, 240), "truth": (20, 180, 60)}  # RGB


def view_kind(modality: str, sample: Any = None) -> str:
    """The view for a run's modality; a modality of a user's own config is told by its sample's shape."""
    if modality in MODALITY_VIEWS:
        return MODALITY_VIEWS[modality]
    shape = tuple(getattr(sample, "shape", ()))
    return {1: "audio", 3: "image", 4: "video"}.get(len(shape), "text")


# ------------------------------------------------------------------------------- scores


def mean_of(values: Sequence[float | None]) -> float | None:
    """Mean over the scored values (None when none was scored)."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def difference_class(base: float | None, trained: float | None, tolerance: float = 1e-9) -> str:
    """'up', 'down', 'same', or 'na' (a side not scored) for trained - base."""
    if base is None or trained is None:
        return "na"
    delta = trained - base
    return "up" if delta > tolerance else "down" if delta < -tolerance else "same"


def _number(value: float | None) -> str:
    return "not scored" if value is None else f"{value:.4g}"


SCORES_CSS = """
<style>
.mm-scores {border-collapse: collapse; font-variant-numeric: tabular-nums; width: 100%}
.mm-scores th, .mm-scores td {padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right}
.mm-scores th:first-child, .mm-scores td:first-child {text-align: left}
.mm-scores tr.sub td:first-child {padding-left: 24px; color: #666}
.mm-scores td.up {background: #d9f7d9; color: #0a5d0a; font-weight: 600}
.mm-scores td.down {background: #fbdcdc; color: #8a1010; font-weight: 600}
.mm-scores .per {color: #888; font-size: 0.85em}
</style>
"""


def scores_html(base: dict[str, list[float | None]], trained: dict[str, list[float | None]],
                total_base: Sequence[float | None] = (), total_trained: Sequence[float | None] = ()) -> str:
    """A table of every reward and sub-score: base, trained and their difference (green up, red down).

    Each cell is the mean over the samples of that side; with several samples the values are listed
    under it. Sub-scores ("reward/sub") are indented under their reward.
    """
    rows = []
    names = list(base) + [k for k in trained if k not in base]
    if total_base or total_trained:
        total = "total (weighted)"
        names = [total] + names
        base, trained = {total: list(total_base), **base}, {total: list(total_trained), **trained}
    for name in names:
        b_values, t_values = base.get(name, []), trained.get(name, [])
        b, t = mean_of(b_values), mean_of(t_values)
        kind = difference_class(b, t)
        delta = "" if kind == "na" else f"{t - b:+.4g}"
        row_class = "sub" if "/" in name else ""
        rows.append(
            f'<tr class="{row_class}"><td>{html.escape(name)}</td>'
            f"<td>{_number(b)}{_per_sample(b_values)}</td><td>{_number(t)}{_per_sample(t_values)}</td>"
            f'<td class="{kind}">{delta}</td></tr>'
        )
    head = "<tr><th>reward</th><th>base</th><th>trained</th><th>trained - base</th></tr>"
    return f'{SCORES_CSS}<table class="mm-scores" id="mm-scores">{head}{"".join(rows)}</table>'


def _per_sample(values: Sequence[float | None]) -> str:
    if len(values) < 2:
        return ""
    shown = ", ".join("-" if v is None else f"{v:.3g}" for v in values)
    return f'<br><span class="per">{shown}</span>'


# ------------------------------------------------------------------------------- text and mdlm


def text_html(text: str, label: str) -> str:
    """A text sample, escaped, in a labelled box."""
    return (f'<div class="mm-text"><b>{html.escape(label)}</b>'
            f'<pre style="white-space: pre-wrap; margin: 4px 0">{html.escape(str(text)) or "(empty)"}</pre></div>')


def step_colour(step: int, num_steps: int) -> str:
    """Background colour of a token unmasked at `step` of `num_steps`: dark blue first, pale yellow last."""
    early, late = np.array([30, 60, 160]), np.array([255, 236, 150])
    f = 0.0 if num_steps <= 1 else min(max(step / (num_steps - 1), 0.0), 1.0)
    r, g, b = (early + f * (late - early)).round().astype(int)
    return f"#{r:02x}{g:02x}{b:02x}"


def mdlm_html(tokens: Sequence[str], steps: Sequence[int], num_steps: int | None = None) -> str:
    """A masked-diffusion completion with each token coloured by the step at which it was unmasked.

    tokens: the completion's tokens as text; steps: for each token, the (0-based) denoising step that
    unmasked it; num_steps: the sampler's step count (default: the largest step + 1). Hovering a token
    shows its step; a legend gives the colour scale.
    """
    if len(tokens) != len(steps):
        raise ValueError(f"mdlm_html: {len(tokens)} tokens but {len(steps)} unmasking steps: give one step per token")
    if any(int(s) < 0 for s in steps):
        raise ValueError("mdlm_html: unmasking steps must be >= 0")
    total = num_steps if num_steps is not None else (max(steps) + 1 if steps else 1)
    spans = []
    for token, step in zip(tokens, steps):
        colour = step_colour(int(step), total)
        ink = "#fff" if int(step) < total / 2 else "#000"
        spans.append(f'<span class="mm-token" data-step="{int(step)}" title="unmasked at step {int(step)}" '
                     f'style="background:{colour};color:{ink};padding:1px 2px;border-radius:3px">'
                     f"{html.escape(token)}</span>")
    legend = (f'<div style="font-size:0.85em;margin-top:6px">unmasked at step '
              f'<span style="background:{step_colour(0, total)};color:#fff;padding:0 4px">0</span> ... '
              f'<span style="background:{step_colour(total - 1, total)};padding:0 4px">{total - 1}</span></div>')
    return f'<div class="mm-mdlm" style="line-height:1.9">{"".join(spans)}</div>{legend}'


def mdlm_parts(sample: Any) -> tuple[list[str], list[int]] | None:
    """(tokens, unmasking steps) of a masked-diffusion sample that carries them (a dict or an object
    with `tokens` and `steps`), else None (the sample is then shown as text)."""
    get = sample.get if isinstance(sample, dict) else lambda k: getattr(sample, k, None)
    tokens, steps = get("tokens"), get("steps")
    if tokens is None or steps is None:
        return None
    return [str(t) for t in tokens], [int(s) for s in steps]


# ------------------------------------------------------------------------------- images, boxes


def to_uint8(image: Any) -> np.ndarray:
    """An image as uint8 [H, W, 3]: from a float tensor [3, H, W] in [0, 1], an array or a PIL image."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().clamp(0, 1).movedim(-3, -1).numpy() * 255  # [H, W, 3]
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array[..., :3]


def enlarged(image: Any, side: int = DISPLAY_SIDE) -> Any:
    """A PIL image scaled up (nearest neighbour, whole factors) so its longer side is about `side`."""
    from PIL import Image

    array = to_uint8(image)
    factor = max(1, side // max(array.shape[:2]))
    return Image.fromarray(array).resize((array.shape[1] * factor, array.shape[0] * factor), Image.NEAREST)


def draw_boxes(image: Any, boxes: dict[str, Sequence[Sequence[float]]], side: int = DISPLAY_SIDE) -> Any:
    """The image enlarged with each group of boxes [x1, y1, x2, y2] (image pixels) outlined in its
    SIDE_COLOURS colour ("base", "trained", "truth"; other keys are not drawn)."""
    from PIL import ImageDraw

    array = to_uint8(image)
    picture = enlarged(array, side)
    factor = picture.width / array.shape[1]
    draw = ImageDraw.Draw(picture)
    width = max(2, round(factor / 3))
    # thickest first: where boxes coincide (a right answer) every colour still shows as a band
    for group, thickness in (("base", 3), ("truth", 2), ("trained", 1)):
        group_width = thickness * width
        for x1, y1, x2, y2 in boxes.get(group, ()):
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                continue
            corners = [min(x1, x2) * factor, min(y1, y2) * factor, max(x1, x2) * factor - 1, max(y1, y2) * factor - 1]
            draw.rectangle(corners, outline=SIDE_COLOURS[group], width=group_width)
    return picture


def answer_boxes(answer: str, prompt: Any, iou_reward: Any = None) -> list[list[float]]:
    """The boxes a VLM answer names, in pixels of the prompt's image (the run's IoU reward's reading:
    its coordinate convention and rescale from the processor's resized image)."""
    from mmgrpo.rewards.iou import IoUReward, parse_boxes

    reward = iou_reward if isinstance(iou_reward, IoUReward) else IoUReward()
    boxes = parse_boxes(answer, reward.answer_tag)[: reward.max_boxes]
    scale = reward.scale(prompt, {}, 0) or (1.0, 1.0)
    return [[x1 * scale[0], y1 * scale[1], x2 * scale[0], y2 * scale[1]] for x1, y1, x2, y2 in boxes]


def truth_boxes(prompt: Any, iou_reward: Any = None) -> list[list[float]]:
    """The ground-truth boxes of a VLM prompt item (none for a user's own image)."""
    from mmgrpo.rewards.iou import IoUReward

    reward = iou_reward if isinstance(iou_reward, IoUReward) else IoUReward()
    gt = reward.ground_truth(prompt, {}, 0)
    return [] if gt is None else gt.tolist()


# ------------------------------------------------------------------------------- media files


def export_sample(adapter: Any, sample: Any, folder: Path, name: str) -> tuple[str, str | None]:
    """Write a video or audio sample with the adapter's own export; returns (media file, its picture:
    the contact sheet of a video or the spectrogram of a waveform, None if the export wrote none)."""
    folder.mkdir(parents=True, exist_ok=True)
    media = Path(adapter.export(sample, folder / name))
    picture = media.with_suffix(".png")
    return str(media), str(picture) if picture.is_file() and picture != media else None
