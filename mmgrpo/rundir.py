"""The run directory: what a run leaves on disk, written by the main process.

    config.yaml     the resolved config (a resume reads it back)
    metrics.jsonl   one line of metrics per training step
    eval.json       held-out rewards "before" and "after", and the "primary" summary
    samples/        galleries: <tag>.jsonl (prompt, rewards, sample or file) and exported files
    checkpoints/    see mmgrpo.checkpoint
    rewards.png     the reward curves
    .lock           held by the process that runs it (its PID inside): one writer at a time

Everything written as JSON goes through `to_json`: strict JSON, NaN and infinities as null.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

from mmgrpo.checkpoint import atomic_write_text
from mmgrpo.checkpoint import latest as latest_checkpoint
from mmgrpo.config import Config, ConfigError, dump_config
from mmgrpo.data import prompt_text
from mmgrpo.distributed import Collective
from mmgrpo.evaluation import gain_text, primary_summary
from mmgrpo.protocols import Adapter
from mmgrpo.rollout import Rollout


@dataclass
class RunResult:
    """What train() returns: the run directory, its metrics (one dict per step) and eval.json."""

    out_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)


def default_out(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.modality}-{time.strftime('%Y%m%d-%H%M%S')}"


def to_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON of obj: NaN and +-inf anywhere inside are written as null, never as NaN or Infinity
    (which json.dumps writes by default and strict parsers refuse). kwargs go to json.dumps."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):  # float and numpy floats
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------- which folder is a run


def is_run(path: Path) -> bool:
    """A run directory: RunDir.start wrote its metrics.jsonl and config.yaml."""
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def check_out(path: Path) -> None:
    """Refuse, before anything is written, an --out that is a file or a folder of files that are not a run."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out '{path}' is a file, not a folder: give a new or empty folder")
    if path.is_dir() and not is_run(path):
        others = sorted(p.name for p in path.iterdir() if p.name != LOCK)
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ConfigError(
                f"--out '{path}' already holds files that are not a run ({shown}): give a new or empty folder"
            )


def check_resumable(path: Path) -> None:
    if not is_run(path):
        raise ConfigError(f"cannot resume: '{path}' is not a run directory (it has no config.yaml and metrics.jsonl)")


def resume_hint(path: Path) -> str:
    """What --resume does with the run in `path` now: continue from its checkpoint, or start it again."""
    found = latest_checkpoint(path / "checkpoints")
    if found is None:
        return f"no checkpoint yet: --resume {path} starts it again from step 0"
    step = int(found.name.rpartition("_")[2])
    return f"the checkpoint of step {step} is intact: mmgrpo train --resume {path} continues from it"


LOCK = ".lock"


class RunLock:
    """An exclusive lock on RUN_DIR/.lock for the life of a run; the file holds the owner's PID.

    flock: the OS drops it when the process ends however it ends, so a crash or kill -9 leaves no
    stale lock behind. Without fcntl (Windows) runs are not protected.
    """

    def __init__(self, folder: Path) -> None:
        self.path, self.fd = folder / LOCK, None

    def acquire(self) -> None:
        if fcntl is None or self.fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            folder = self.path.parent
            raise ConfigError(
                f"run directory '{folder}' is in use by another mmgrpo process (PID {holder}): "
                f"wait for it to end or stop it, then --resume {folder}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the lock
            self.fd = None


class RunDir:
    """config.yaml, metrics.jsonl, eval.json, samples/, checkpoints/ of one run (main process writes)."""

    def __init__(self, path: Path, comm: Collective) -> None:
        self.path, self.comm = path, comm
        self.metrics_path = path / "metrics.jsonl"
        self.eval_path = path / "eval.json"
        self.checkpoints = path / "checkpoints"
        self.samples = path / "samples"
        self.lock = RunLock(path)
        # called with (entries, tag) after each gallery is written: the trainer's trackers log its media
        self.on_gallery: Callable[[list[dict[str, Any]], str], None] | None = None

    def open(self, resume: bool) -> None:
        """Take the run's lock (main process) and check that the folder can take this run.

        Nothing but the lock file (and a new folder for it) is written. A fresh start refuses a
        folder that holds a run; a live one is named by the lock with its PID. Every process learns
        the outcome, so no process waits for a main process that stopped. Use as `with run:` after.
        """
        error = None
        if self.comm.is_main:
            try:
                check_resumable(self.path) if resume else check_out(self.path)
                self.path.mkdir(parents=True, exist_ok=True)
                self.lock.acquire()
                if not resume and is_run(self.path):
                    raise ConfigError(self._taken())
            except ConfigError as e:
                self.lock.release()
                error = e
        if self.comm.sum(float(error is not None)):
            raise error or ConfigError(f"the main process could not open the run directory '{self.path}'")

    def _taken(self) -> str:
        if self.has_checkpoint():
            return (
                f"run directory '{self.path}' already holds a run: use --resume {self.path} to continue it, "
                "or another --out"
            )
        return (
            f"run directory '{self.path}' holds a run that stopped before its first checkpoint: --resume {self.path} "
            "starts it again from step 0 with its saved config, or use another --out"
        )

    def has_checkpoint(self) -> bool:
        return latest_checkpoint(self.checkpoints) is not None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        if error is not None:
            error.run_dir = self.path  # for the CLI's message (mmgrpo.cli reads it)
        self.close()

    def close(self) -> None:
        self.lock.release()

    def start(self, cfg: Config) -> None:
        """Write an empty metrics.jsonl and config.yaml and make the folders: a new run, or one started again."""
        if self.comm.is_main:
            self.metrics_path.write_text("")
            self.write_config(cfg)
            for d in (self.checkpoints, self.samples):
                d.mkdir(parents=True, exist_ok=True)
        self.comm.barrier()

    def write_config(self, cfg: Config) -> None:
        if self.comm.is_main:
            atomic_write_text(self.path / "config.yaml", dump_config(cfg))

    def log(self, stats: dict[str, Any]) -> None:
        if self.comm.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(to_json(stats) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics_file(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after `step` (they belong to the run that did not reach a checkpoint),
        and a last line torn by a process killed mid-write."""
        if self.comm.is_main:
            kept = [m for m in self.read_metrics() if m["step"] <= step]
            atomic_write_text(self.metrics_path, "".join(to_json(m) + "\n" for m in kept))

    def read_eval(self) -> dict[str, Any]:
        return json.loads(self.eval_path.read_text()) if self.eval_path.is_file() else {}

    def write_eval(self, tag: str, result: dict[str, Any]) -> None:
        if self.comm.is_main:
            data = self.read_eval()
            data[tag] = result
            atomic_write_text(self.eval_path, to_json(data, indent=2) + "\n")

    def write_gallery(self, adapter: Adapter, rollout: Rollout, tag: str, count: int) -> None:
        """samples/<tag>.jsonl (prompt, sample or exported file, rewards) + exported files."""
        if not self.comm.is_main or count <= 0:
            return
        folder = self.samples / tag
        entries, lines = [], []
        for i in range(min(count, len(rollout))):
            entry: dict[str, Any] = {"prompt": _label(rollout.prompts[i])}
            entry["rewards"] = {k: _json_float(v[i]) for k, v in rollout.rewards.items()}
            sample = rollout.samples[i]
            if hasattr(adapter, "export") and not isinstance(sample, str):  # text stays inline
                folder.mkdir(parents=True, exist_ok=True)
                entry["file"] = str(Path(adapter.export(sample, folder / f"{i:03d}")).relative_to(self.path))
            else:
                entry["sample"] = sample if isinstance(sample, (str, int, float, list, dict)) else repr(sample)
            entries.append(entry)
            lines.append(to_json(entry))
        self.samples.mkdir(parents=True, exist_ok=True)
        (self.samples / f"{tag}.jsonl").write_text("\n".join(lines) + "\n")
        if self.on_gallery is not None:
            self.on_gallery(entries, tag)

    def result(self) -> RunResult:
        return RunResult(self.path, self.read_metrics(), self.read_eval())

    def finish(self, primary: str) -> None:
        """Plot the reward curves, add the primary reward's before/after summary to eval.json, print it."""
        from mmgrpo.plotting import plot_metrics

        plot_metrics(self.metrics_path, self.path / "rewards.png")
        ev = self.read_eval()
        summary = primary_summary(ev, primary)
        if summary is None:
            return
        ev["primary"] = summary
        atomic_write_text(self.eval_path, to_json(ev, indent=2) + "\n")
        print(f"held-out {primary}: {gain_text(summary)}; run saved in {self.path}")


def read_metrics_file(path: Path) -> list[dict[str, Any]]:
    """The steps logged in a metrics.jsonl. A torn last line (a process killed while writing it) is
    dropped with a warning; an unreadable line before it is a ConfigError naming its number."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for n, line in numbered:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif n == numbered[-1][0]:
            print(f"mmgrpo: warning: dropped line {n} of {path}, torn by a process stopped mid-write", file=sys.stderr)
        else:
            raise ConfigError(f"{path} line {n} is not JSON: repair or delete that line, then run again")
    return rows


def _label(prompt: Any) -> str:
    """A gallery's caption of a prompt item: its text, or a short repr of a user's own item type."""
    try:
        return prompt_text(prompt)
    except ValueError:
        return repr(prompt)[:200]


def _json_float(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v
