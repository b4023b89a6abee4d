"""The Run tab: the run's evaluation galleries (paged), its reward curves and its before/after table.

Reads only what training wrote: samples/before.jsonl and after.jsonl (with their exported files),
metrics.jsonl and eval.json. Each piece is a plain function of those files, so it is tested without
a browser.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from mmgrpo.data import prompt_text
from mmgrpo.rundir import read_metrics_file

PAGE_SIZE = 8
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")


def label_of(item: Any) -> str:
    """A prompt item's caption: its text, or a short repr."""
    try:
        return prompt_text(item)
    except ValueError:
        return repr(item)[:100]


def read_gallery(run: Path, tag: str) -> list[dict[str, Any]]:
    """The entries of samples/<tag>.jsonl (none when the run has no such gallery)."""
    path = run / "samples" / f"{tag}.jsonl"
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn line: the rest of the gallery is still worth showing
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def page_count(total: int, size: int = PAGE_SIZE) -> int:
    return max(1, math.ceil(total / size))


def caption(entry: dict[str, Any]) -> str:
    rewards = ", ".join(f"{k} {'-' if v is None else f'{v:.3g}'}" for k, v in (entry.get("rewards") or {}).items())
    return f"{entry.get('prompt', '')} | {rewards}"


def picture_of(run: Path, entry: dict[str, Any]) -> str | None:
    """The picture an exported sample has: the image itself, or the contact sheet / spectrogram beside
    a video or WAV (same name, .png). Only files inside the run directory are shown."""
    if "file" not in entry:
        return None
    path = (run / entry["file"]).resolve()
    if not path.is_relative_to(run.resolve()):
        return None
    picture = path if path.suffix.lower() in IMAGE_SUFFIXES else path.with_suffix(".png")
    return str(picture) if picture.is_file() else None


def gallery_page(run: Path, tag: str, page: int, size: int = PAGE_SIZE) -> tuple[list[tuple[str, str]], str]:
    """One page of a gallery: (pictures with captions, HTML of the entries that have no picture: text)."""
    entries = read_gallery(run, tag)
    page = min(max(int(page), 1), page_count(len(entries), size))
    chunk = entries[(page - 1) * size : page * size]
    pictures, rows = [], []
    for entry in chunk:
        picture = picture_of(run, entry)
        if picture is not None:
            pictures.append((picture, caption(entry)))
        else:
            rows.append(f"<tr><td>{html.escape(str(entry.get('prompt', '')))}</td>"
                        f"<td>{sample_html(entry.get('sample', entry.get('file', '')))}</td>"
                        f"<td>{html.escape(caption(entry).rpartition(' | ')[2])}</td></tr>")
    title = f"<b>{'before' if tag == 'before' else 'after'} training</b>"
    table = (f"{title}<table><tr><th>prompt</th><th>sample</th><th>rewards</th></tr>" + "".join(rows) + "</table>"
             if rows else "")
    if not entries:
        table = f"<i>no {tag} gallery in this run (eval.gallery was 0, or the run has not evaluated yet)</i>"
    return pictures, table


def sample_html(sample: Any) -> str:
    """An inline gallery sample: a masked-diffusion completion coloured by unmasking step, else its text."""
    from mmgrpo.demo.views import mdlm_html, mdlm_parts

    parts = mdlm_parts(sample) if isinstance(sample, dict) else None
    if parts is not None:
        return mdlm_html(*parts)
    text = sample.get("text", sample) if isinstance(sample, dict) else sample
    return f"<code>{html.escape(str(text))}</code>"


def reward_keys(metrics: list[dict[str, Any]]) -> list[str]:
    """The metrics.jsonl keys of rewards and sub-scores (reward/...), in the order first logged."""
    keys: list[str] = []
    for row in metrics:
        keys += [k for k, v in row.items() if k.startswith("reward/") and k not in keys and isinstance(v, (int, float))]
    return keys


def curve_frame(metrics: list[dict[str, Any]], keys: list[str]) -> Any:
    """A long pandas DataFrame (step, value, metric) of the chosen keys; steps without a value are left out."""
    import pandas as pd

    rows = [{"step": row["step"], "value": float(row[k]), "metric": k}
            for row in metrics for k in keys
            if isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) and "step" in row]
    return pd.DataFrame(rows, columns=["step", "value", "metric"])


def eval_table(ev: dict[str, Any]) -> list[list[Any]]:
    """Rows of eval.json's before/after table: metric, before, after, change, paired 95% interval.

    The paired interval (mmgrpo.scoring.paired_gain) is given for every reward whose per-sample values
    both evaluations stored."""
    from mmgrpo.scoring import paired_gain

    before, after = ev.get("before", {}), ev.get("after", {})
    keys = [k for k in before if k.startswith("reward/")] + [k for k in after if k.startswith("reward/")
                                                             and k not in before]
    rows = []
    for key in keys:
        b, a = before.get(key), after.get(key)
        change = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        interval = ""
        name = key[len("reward/"):].rpartition("/mean")[0]
        samples = [ev.get(tag, {}).get("per_sample", {}).get(name) for tag in ("before", "after")]
        if all(samples) and len(samples[0]) == len(samples[1]):
            gain = paired_gain(*samples)
            if gain["ci95"] is not None:
                interval = f"{gain['ci95'][0]:+.4f} to {gain['ci95'][1]:+.4f} (n={gain['n']})"
        rows.append([key, _rounded(b), _rounded(a), _rounded(change), interval])
    return rows


def _rounded(value: Any) -> Any:
    return round(value, 5) if isinstance(value, float) else value


def primary_line(ev: dict[str, Any]) -> str:
    from mmgrpo.evaluation import gain_text

    summary = ev.get("primary")
    if not summary:
        return "eval.json has no before/after summary yet (the run has not finished its final evaluation)."
    return f"Held-out **{summary['reward']}**: {gain_text(summary)}"


def build_runs_tab(gr: Any, run: Path, kind: str) -> None:
    """The Run tab's components and events (inside a gr.Tab)."""
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    metrics = read_metrics_file(run / "metrics.jsonl")
    keys = reward_keys(metrics)
    gr.Markdown(primary_line(ev), elem_id="mm-primary")
    headers = ["metric", "before", "after", "after - before", "paired 95% interval"]
    gr.Dataframe(value=eval_table(ev) or None, headers=headers, label="eval.json: held-out rewards",
                 interactive=False, elem_id="mm-eval-table")

    default = [k for k in ("reward/mean",) if k in keys] or keys[:1]
    chosen = gr.Dropdown(choices=keys, value=default, multiselect=True, label="curves (rewards and sub-scores)",
                         elem_id="mm-curve-keys")
    plot = gr.LinePlot(value=curve_frame(metrics, default), x="step", y="value", color="metric",
                       label="metrics.jsonl", elem_id="mm-curves", height=320)
    chosen.change(lambda k: curve_frame(read_metrics_file(run / "metrics.jsonl"), k or []), chosen, plot)

    total = max(len(read_gallery(run, t)) for t in ("before", "after"))
    page = gr.Slider(1, max(2, page_count(total)), value=1, step=1, label=f"gallery page ({PAGE_SIZE} per page)",
                     elem_id="mm-gallery-page", visible=page_count(total) > 1)
    galleries = []
    with gr.Row():
        for tag in ("before", "after"):
            with gr.Column():
                pictures, table = gallery_page(run, tag, 1)
                galleries.append(gr.Gallery(value=pictures, label=f"{tag} training (held-out)", columns=4,
                                            object_fit="contain", visible=bool(pictures), elem_id=f"mm-gallery-{tag}"))
                galleries.append(gr.HTML(table, elem_id=f"mm-gallery-{tag}-text"))

    def show(p: Any) -> list[Any]:
        return [part for tag in ("before", "after") for part in gallery_page(run, tag, p)]

    page.change(show, page, galleries)
