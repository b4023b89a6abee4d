"""Metrics and gallery media to TensorBoard and Weights & Biases, through accelerate's trackers.

    train:
      log_with: [tensorboard, wandb]

metrics.jsonl stays the record of a run; trackers are where people look. TensorBoard writes
event files under RUN_DIR/tensorboard/mmgrpo/ (`tensorboard --logdir RUN_DIR/tensorboard`); a
resumed run hides what the stopped one logged after its checkpoint (SummaryWriter's purge_step).
W&B runs in offline mode under RUN_DIR/wandb/ unless WANDB_MODE says otherwise (these machines
have no network: `wandb sync RUN_DIR/wandb/offline-run-*` uploads a run later; a resumed run is a
new W&B run of the same name). Gallery media are logged from the files the run directory exports:
PNG images, videos as their PNG contact sheet (and the MP4 itself on W&B), WAV audio, and text.
Only the main process logs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from mmgrpo.config import ConfigError

TRACKERS = ("tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
PROJECT = "mmgrpo"


def check_trackers(names: Sequence[str]) -> None:
    """One ConfigError line for an unknown tracker or one whose package is missing (before any run starts)."""
    import difflib
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(str(name), TRACKERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"train.log_with: unknown tracker '{name}'{hint}: use {' and/or '.join(TRACKERS)}")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(
                f"train.log_with: '{name}' needs the package '{PACKAGES[name]}': pip install 'mmgrpo[track]'"
            )


def accelerator_kwargs(names: Sequence[str], run_dir: Path) -> dict[str, Any]:
    """Keyword arguments for accelerate.Accelerator that set up the trackers of a run in run_dir."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    config = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard"))
    return {"log_with": list(names), "project_config": config}


class Trackers:
    """The trackers of one run (main process only; a no-op without train.log_with)."""

    def __init__(self, accelerator: Any, names: Sequence[str]) -> None:
        self.accelerator, self.names = accelerator, list(names)

    def start(self, config: dict[str, Any], run_name: str, step: int = 0) -> None:
        """Open the trackers of a run that starts at `step` (a resumed run: the step of its checkpoint)."""
        if not self.names or self.accelerator is None:
            return
        init: dict[str, dict[str, Any]] = {"tensorboard": {"purge_step": step + 1} if step else {}}
        if "wandb" in self.names:
            import wandb

            init["wandb"] = {
                "name": run_name,
                "dir": self.accelerator.project_dir,  # W&B makes its wandb/ folder in there
                "mode": os.environ.get("WANDB_MODE", "offline"),  # no network here; WANDB_MODE=online overrides
                "settings": wandb.Settings(silent=True, console="off"),
            }
        self.accelerator.init_trackers(PROJECT, config=_flat(config), init_kwargs={n: init[n] for n in self.names})

    def log(self, stats: dict[str, Any], step: int) -> None:
        if not self.names or self.accelerator is None:
            return
        self.accelerator.log({k: v for k, v in stats.items() if _is_number(v) and k != "step"}, step=step)

    def log_gallery(self, run_dir: Path, entries: Sequence[dict[str, Any]], tag: str, step: int) -> None:
        """Log the media of a gallery (entries of samples/<tag>.jsonl, files relative to run_dir)."""
        if not self.names or self.accelerator is None or not self.accelerator.is_main_process:
            return
        for i, entry in enumerate(entries):
            name = f"{tag}/{i:03d}"
            caption = f"{entry.get('prompt', '')} | " + ", ".join(
                f"{k} {v:.3f}" for k, v in entry.get("rewards", {}).items() if v is not None
            )
            if "file" in entry:
                self._log_file(run_dir / entry["file"], name, caption, step)
            elif isinstance(entry.get("sample"), str):
                self._log_text(name, f"{caption}\n\n{entry['sample']}", step)
        if "tensorboard" in self.names:
            self._writer().flush()  # accelerator.log flushes metrics; media are written here directly

    def finish(self) -> None:
        if self.names and self.accelerator is not None:
            self.accelerator.end_training()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()  # however the run ends: what was logged is flushed and the W&B run closed

    # ------------------------------------------------------------------ media

    def _log_file(self, path: Path, name: str, caption: str, step: int) -> None:
        suffix = path.suffix.lower()
        if suffix in (".png", ".jpg", ".jpeg"):
            self._log_image(path, name, caption, step)
        elif suffix in (".mp4", ".gif"):
            sheet = path.with_suffix(".png")
            if sheet.is_file():
                self._log_image(sheet, name, caption, step)
            if "wandb" in self.names:
                import wandb

                self._wandb().log({f"{name}/video": wandb.Video(str(path), caption=caption)}, step=step)
        elif suffix in (".wav", ".flac"):
            self._log_audio(path, name, caption, step)
        elif suffix == ".txt":
            self._log_text(name, f"{caption}\n\n{path.read_text(encoding='utf-8')}", step)

    def _log_image(self, path: Path, name: str, caption: str, step: int) -> None:
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))  # [H, W, 3] uint8
        if "tensorboard" in self.names:
            self._writer().add_image(name, pixels, step, dataformats="HWC")
        if "wandb" in self.names:
            import wandb

            self._wandb().log({name: wandb.Image(pixels, caption=caption)}, step=step)

    def _log_audio(self, path: Path, name: str, caption: str, step: int) -> None:
        import soundfile

        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [L, channels]
        mono = audio.mean(axis=1)  # [L]
        if "tensorboard" in self.names:
            import torch

            self._writer().add_audio(name, torch.from_numpy(mono), step, sample_rate=rate)
        if "wandb" in self.names:
            import wandb

            self._wandb().log({name: wandb.Audio(mono, sample_rate=rate, caption=caption)}, step=step)

    def _log_text(self, name: str, text: str, step: int) -> None:
        if "tensorboard" in self.names:
            self._writer().add_text(name, text, step)
        if "wandb" in self.names:
            import wandb

            self._wandb().log({name: wandb.Html(f"<pre>{_escape(text)}</pre>")}, step=step)

    def _writer(self) -> Any:
        return self.accelerator.get_tracker("tensorboard", unwrap=True)

    def _wandb(self) -> Any:
        return self.accelerator.get_tracker("wandb", unwrap=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as flat {"a/b": value} of the plain types trackers store as hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
