"""The page: a Compare tab (base vs trained on one prompt and seed) and a Run tab (runs_tab.py).

The Compare tab is built for the run's modality only (a run has one): its inputs (held-out picker
with a preview, typed prompt or question, upload, seed, samples per policy) and its natural outputs
(views.py), the scores of both policies under them, and a line for anything the user got wrong.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from mmgrpo.demo import views
from mmgrpo.demo.inputs import InputError, build_prompt, parse_seed
from mmgrpo.demo.policies import Comparison, RunPolicies, compare
from mmgrpo.demo.runs_tab import build_runs_tab, label_of

MAX_SAMPLES = 4  # per policy: a small gallery per side
TYPED_PROMPT = {"text": "your own prompt", "mdlm": "your own prompt", "image": "your own prompt",
                "video": "your own prompt", "vlm": "your own question", "audio": None}
UPLOAD = {"vlm": ("your own image (PNG, JPEG)", [".png", ".jpg", ".jpeg", ".webp", ".bmp"]),
          "audio": ("your own noisy speech (mono WAV or FLAC)", [".wav", ".flac"])}
# two video players that play, pause and seek together (media events do not bubble: listen in capture)
SYNC_VIDEOS_JS = """
() => {
  const sync = (event) => {
    const source = event.target;
    if (!(source instanceof HTMLVideoElement) || !source.closest('.mm-sync')) return;
    for (const other of document.querySelectorAll('.mm-sync video')) {
      if (other === source) continue;
      // only where the states differ: the follower's own events then change nothing (no echo loop)
      if (event.type === 'play' && other.paused) other.play().catch(() => {});
      if (event.type === 'pause' && !other.paused) other.pause();
      if (event.type === 'seeked' && Math.abs(other.currentTime - source.currentTime) > 0.1) {
        other.currentTime = source.currentTime;
      }
    }
  };
  for (const kind of ['play', 'pause', 'seeked']) document.addEventListener(kind, sync, true);
}
"""


def header(run: RunPolicies, kind: str) -> str:
    ema = " (its EMA weights, which the run's final evaluation used)" if run.uses_ema else ""
    rewards = ", ".join(f"`{name}`" for name in run.reward_fns)
    return (f"### mmgrpo demo: `{run.path}`\n"
            f"Modality **{run.cfg.modality}** ({kind} view). **Base**: the run's reference policy (LoRA off, or the "
            f"initial weights). **Trained**: checkpoint `{run.checkpoint.name}` (step {run.step}){ema}. "
            f"Both sample with the same seed; rewards: {rewards}.")


def preview(run: RunPolicies, kind: str, index: Any) -> Any:
    """What the picked held-out item shows: its image, clip (contact sheet), scene or noisy utterance."""
    if index is None or not run.held_out:
        return None
    item = run.held_out[int(index)]
    if not isinstance(item, dict):
        return None
    if kind == "audio" and item.get("noisy") is not None:
        wave = np.clip(np.asarray(item["noisy"], dtype=np.float32), -1, 1)
        return int(item.get("sample_rate", 16000)), (wave * 32767).astype(np.int16)
    if item.get("image") is not None:
        return views.enlarged(item["image"])
    if item.get("video") is not None:
        return views.enlarged(np.concatenate(list(np.asarray(item["video"])), axis=1), 1024)  # frames in a row
    if "objects" in item and kind in ("image", "video"):  # a mini-world scene: what the prompt asks for
        from mmgrpo.miniworld import render, render_clip

        if item.get("motion") is not None:
            return views.enlarged(np.concatenate(list(render_clip(item, 32)), axis=1), 1024)
        return views.enlarged(render(item, 32))
    return None


class ComparePage:
    """The Compare tab's components for one view kind, and the handler that fills them."""

    def __init__(self, run: RunPolicies, kind: str, workdir: Path) -> None:
        self.run, self.kind, self.workdir = run, kind, workdir
        self.calls = itertools.count()

    def build(self, gr: Any) -> None:
        run, kind = self.run, self.kind
        with gr.Row():
            with gr.Column(scale=2, min_width=280):
                choices = [(f"{i}: {label_of(item)}"[:120], i) for i, item in enumerate(run.held_out)]
                self.picker = gr.Dropdown(choices=choices, value=0 if choices else None, label="held-out prompt",
                                          elem_id="mm-picker")
                shown = kind not in ("text", "mdlm")
                self.preview = (gr.Audio(label="noisy input", interactive=False, elem_id="mm-preview")
                                if kind == "audio" else gr.Image(label="held-out item", interactive=False,
                                                                 elem_id="mm-preview", height=200, visible=shown))
                typed = TYPED_PROMPT[kind]
                self.text = gr.Textbox(label=f"{typed} (leave empty to use the held-out prompt)" if typed else "",
                                       visible=typed is not None, elem_id="mm-prompt")
                label, types = UPLOAD.get(kind, ("", None))
                self.upload = gr.File(label=label, file_types=types, type="filepath", visible=kind in UPLOAD,
                                      elem_id="mm-upload")
                with gr.Row():
                    self.seed = gr.Number(value=0, precision=0, label="seed", elem_id="mm-seed")
                    self.count = gr.Slider(1, MAX_SAMPLES, value=1, step=1, label="samples per policy",
                                           elem_id="mm-count")
                self.button = gr.Button("Compare", variant="primary", elem_id="mm-compare")
            with gr.Column(scale=5):
                self.message = gr.Markdown("", elem_id="mm-message")
                self.outputs = self._build_outputs(gr)
                self.scores = gr.HTML("", elem_id="mm-scores-box")
                self.timing = gr.Markdown("", elem_id="mm-timing")
        self.picker.change(lambda i: preview(run, kind, i), self.picker, self.preview)
        every = [self.message, self.scores, self.timing, *self.outputs.values()]

        def handler(picked, text, upload, seed, count, progress=gr.Progress()):  # Gradio injects the progress bar
            return self.on_compare(picked, text, upload, seed, count, progress)

        self.button.click(handler, [self.picker, self.text, self.upload, self.seed, self.count], every)

    def _build_outputs(self, gr: Any) -> dict[str, Any]:
        kind, out = self.kind, {}
        if kind in ("text", "mdlm"):
            with gr.Row():
                out["base"] = gr.HTML(elem_id="mm-base")
                out["trained"] = gr.HTML(elem_id="mm-trained")
        elif kind == "image":
            out["slider"] = gr.ImageSlider(label="base | trained (drag the handle)", type="pil", elem_id="mm-slider")
            with gr.Row():
                out["base"] = _gallery(gr, "base", "mm-base", columns=4, height=190)
                out["trained"] = _gallery(gr, "trained", "mm-trained", columns=4, height=190)
        elif kind == "video":
            with gr.Row():
                out["base"] = gr.Video(label="base", elem_id="mm-base", elem_classes=["mm-sync"], loop=True)
                out["trained"] = gr.Video(label="trained", elem_id="mm-trained", elem_classes=["mm-sync"], loop=True)
            with gr.Row():
                out["base_sheets"] = _gallery(gr, "base: contact sheets", "mm-base-sheets")
                out["trained_sheets"] = _gallery(gr, "trained: contact sheets", "mm-trained-sheets")
        elif kind == "audio":
            with gr.Row():
                out["noisy"] = gr.Audio(label="noisy input", interactive=False, elem_id="mm-noisy")
                out["base"] = gr.Audio(label="base", interactive=False, elem_id="mm-base")
                out["trained"] = gr.Audio(label="trained", interactive=False, elem_id="mm-trained")
            with gr.Row():
                out["noisy_spec"] = gr.Image(label="noisy: spectrogram", interactive=False, elem_id="mm-noisy-spec")
                out["base_spec"] = _gallery(gr, "base: spectrograms", "mm-base-spec")
                out["trained_spec"] = _gallery(gr, "trained: spectrograms", "mm-trained-spec")
        elif kind == "vlm":
            with gr.Row():
                out["overlay"] = gr.Image(label="boxes: orange base, blue trained, green truth", interactive=False,
                                          elem_id="mm-overlay")
                with gr.Column():
                    out["base"] = gr.HTML(elem_id="mm-base")
                    out["trained"] = gr.HTML(elem_id="mm-trained")
        return out

    # ------------------------------------------------------------------ the handler

    def on_compare(self, picked: Any, text: str | None, upload: str | None, seed: Any, count: Any,
                   progress: Any = None) -> dict[Any, Any]:
        """Fill the outputs for one comparison; a problem with the input fills only the message line."""
        progress = progress if progress is not None else (lambda fraction, desc=None: None)
        try:
            prompt, note = self.prompt_of(picked, text, upload)
            seed = parse_seed(seed)
            count = min(max(int(count or 1), 1), MAX_SAMPLES)
            result = compare(self.run, prompt, seed, count, progress=lambda f, d: progress(f, desc=d))
        except InputError as e:
            return {self.message: f"**Could not compare:** {e}"}
        folder = self.workdir / f"compare{next(self.calls):05d}"
        updates = self.render(result, prompt, folder)
        problems = [f"{side}: {r.score_error}" for side, r in (("base", result.base), ("trained", result.trained))
                    if r.score_error]
        lines = ([f"Note: {note}"] if note else []) + [f"**Not scored**: {p}" for p in problems]
        updates[self.message] = "\n\n".join(lines)
        updates[self.scores] = views.scores_html(result.base.scores, result.trained.scores,
                                                 result.base.total, result.trained.total)
        updates[self.timing] = (f"seed {result.seed}, {count} sample(s) per policy: base {result.base.seconds:.2f} s, "
                                f"trained {result.trained.seconds:.2f} s, both {result.seconds:.2f} s")
        return updates

    def prompt_of(self, picked: Any, text: str | None, upload: str | None) -> tuple[Any, str | None]:
        item = self.run.held_out[int(picked)] if picked is not None and self.run.held_out else None
        family = getattr(self.run.adapter, "family", None)  # a flow adapter's model family (speech: STFT)
        settings, frames = getattr(family, "settings", None), getattr(family, "num_frames", None)
        rate = getattr(settings, "sample_rate", 16000)
        longest = (frames - 1) * settings.hop if frames and hasattr(settings, "hop") else None  # stft.frames_for
        prompt, note = build_prompt(self.kind, item, text, upload, sample_rate=rate, max_samples=longest)
        check = getattr(self.run.adapter, "check_prompts", None)
        if check is not None:
            try:
                check([prompt])
            except ValueError as e:  # ConfigError included: the adapter's one line about this prompt
                raise InputError(str(e)) from None
        return prompt, note

    def render(self, result: Comparison, prompt: Any, folder: Path) -> dict[Any, Any]:
        """The view's components filled with both sides' samples."""
        out, kind, adapter = self.outputs, self.kind, self.run.adapter
        base, trained = result.base.samples, result.trained.samples
        if kind in ("text", "mdlm"):
            return {out["base"]: self.text_view(base, "base"), out["trained"]: self.text_view(trained, "trained")}
        if kind == "image":
            b, t = [views.enlarged(s) for s in base], [views.enlarged(s) for s in trained]
            return {out["slider"]: (b[0], t[0]), out["base"]: b, out["trained"]: t}
        if kind == "video":
            b = [views.export_sample(adapter, s, folder, f"base{i}") for i, s in enumerate(base)]
            t = [views.export_sample(adapter, s, folder, f"trained{i}") for i, s in enumerate(trained)]
            return {out["base"]: b[0][0], out["trained"]: t[0][0],
                    out["base_sheets"]: [p for _, p in b if p], out["trained_sheets"]: [p for _, p in t if p]}
        if kind == "audio":
            noisy = views.export_sample(adapter, _tensor(prompt["noisy"]), folder, "noisy")
            b = [views.export_sample(adapter, s, folder, f"base{i}") for i, s in enumerate(base)]
            t = [views.export_sample(adapter, s, folder, f"trained{i}") for i, s in enumerate(trained)]
            return {out["noisy"]: noisy[0], out["noisy_spec"]: noisy[1], out["base"]: b[0][0],
                    out["trained"]: t[0][0], out["base_spec"]: [p for _, p in b if p],
                    out["trained_spec"]: [p for _, p in t if p]}
        # vlm: every answer's boxes on the prompt's image, the answers beside it
        iou = next((fn for fn in self.run.reward_fns.values() if type(fn).__name__ == "IoUReward"), None)
        boxes = {"truth": views.truth_boxes(prompt, iou),
                 "base": [b for s in base for b in views.answer_boxes(s, prompt, iou)],
                 "trained": [b for s in trained for b in views.answer_boxes(s, prompt, iou)]}
        image = prompt.get("image") if isinstance(prompt, dict) else None
        overlay = views.draw_boxes(image, boxes) if image is not None else None
        return {out["overlay"]: overlay, out["base"]: self.text_view(base, "base"),
                out["trained"]: self.text_view(trained, "trained")}

    def text_view(self, samples: list[Any], side: str) -> str:
        parts = []
        for i, sample in enumerate(samples):
            label = f"{side} {i + 1}" if len(samples) > 1 else side
            tokens = views.mdlm_parts(sample) if self.kind == "mdlm" else None
            text = sample.get("text", sample) if isinstance(sample, dict) else getattr(sample, "text", sample)
            steps = self.run.cfg.pipeline.kwargs.get("steps")  # the sampler's step count: the colour scale
            body = views.mdlm_html(*tokens, num_steps=steps) if tokens else views.text_html(str(text), label)
            parts.append(f"<b>{label}</b>{body}" if tokens else body)
        return f'<div id="mm-{side}-text">{"".join(parts)}</div>'


def _gallery(gr: Any, label: str, elem_id: str, columns: int = 1, height: int | str = 260) -> Any:
    """A gallery that shows whole pictures (contact sheets and spectrograms are wide: never cropped)."""
    return gr.Gallery(label=label, columns=columns, height=height, object_fit="contain", elem_id=elem_id)


def _tensor(wave: Any) -> Any:
    import torch

    return torch.as_tensor(np.asarray(wave, dtype=np.float32))  # [L]


def build_app(run: RunPolicies, workdir: Path) -> Any:
    """The Gradio Blocks of the demo for one loaded run; media it writes go under `workdir`."""
    import gradio as gr

    kind = views.view_kind(run.cfg.modality)
    page = ComparePage(run, kind, workdir)
    with gr.Blocks(title=f"mmgrpo demo: {run.path.name}") as demo:
        gr.Markdown(header(run, kind), elem_id="mm-header")
        with gr.Tab("Compare", elem_id="mm-tab-compare"):
            page.build(gr)
        with gr.Tab("Run", elem_id="mm-tab-run"):
            build_runs_tab(gr, run.path, kind)
        demo.load(lambda: preview(run, kind, 0 if run.held_out else None), None, page.preview)
    demo.mm_page = page  # the tests call its handler directly
    return demo
