"""The run directory: what a run leaves on disk, written by the main process.

    config.yaml     the resolved config (a resume reads it back)
    metrics.jsonl   one line of metrics per training step
    eval.json       held-out rewards "before" and "after", and the "primary" summary
    samples/        galleries: <tag>.jsonl (prompt, rewards, sample or file) and exported files
    checkpoints/    see mmgrpo.checkpoint
    rewards.png     the reward curves
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmgrpo.checkpoint import atomic_write_text
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


class RunDir:
    """config.yaml, metrics.jsonl, eval.json, samples/, checkpoints/ of one run (main process writes)."""

    def __init__(self, path: Path, comm: Collective) -> None:
        self.path, self.comm = path, comm
        self.metrics_path = path / "metrics.jsonl"
        self.eval_path = path / "eval.json"
        self.checkpoints = path / "checkpoints"
        self.samples = path / "samples"

    def start(self, cfg: Config) -> None:
        """Create the folders and write config.yaml; refuses a directory that already holds a run."""
        if self.comm.is_main:
            if self.metrics_path.exists() or self.checkpoints.exists():
                raise ConfigError(
                    f"run directory '{self.path}' already holds a run: use --resume {self.path} "
                    "to continue it, or another --out"
                )
            for d in (self.path, self.checkpoints, self.samples):
                d.mkdir(parents=True, exist_ok=True)
            (self.path / "config.yaml").write_text(dump_config(cfg))
            self.metrics_path.write_text("")
        self.comm.barrier()

    def log(self, stats: dict[str, Any]) -> None:
        if self.comm.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(stats) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics_file(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after `step` (they belong to the run that did not reach a checkpoint),
        and a last line torn by a process killed mid-write."""
        if self.comm.is_main:
            kept = [m for m in self.read_metrics() if m["step"] <= step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def read_eval(self) -> dict[str, Any]:
        return json.loads(self.eval_path.read_text()) if self.eval_path.is_file() else {}

    def write_eval(self, tag: str, result: dict[str, Any]) -> None:
        if self.comm.is_main:
            data = self.read_eval()
            data[tag] = result
            atomic_write_text(self.eval_path, json.dumps(data, indent=2) + "\n")

    def write_gallery(self, adapter: Adapter, rollout: Rollout, tag: str, count: int) -> None:
        """samples/<tag>.jsonl (prompt, sample or exported file, rewards) + exported files."""
        if not self.comm.is_main or count <= 0:
            return
        folder = self.samples / tag
        lines = []
        for i in range(min(count, len(rollout))):
            entry: dict[str, Any] = {"prompt": prompt_text(rollout.prompts[i])}
            entry["rewards"] = {k: _json_float(v[i]) for k, v in rollout.rewards.items()}
            sample = rollout.samples[i]
            if hasattr(adapter, "export") and not isinstance(sample, str):  # text stays inline
                folder.mkdir(parents=True, exist_ok=True)
                entry["file"] = str(Path(adapter.export(sample, folder / f"{i:03d}")).relative_to(self.path))
            else:
                entry["sample"] = sample if isinstance(sample, (str, int, float, list, dict)) else repr(sample)
            lines.append(json.dumps(entry))
        self.samples.mkdir(parents=True, exist_ok=True)
        (self.samples / f"{tag}.jsonl").write_text("\n".join(lines) + "\n")

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
        atomic_write_text(self.eval_path, json.dumps(ev, indent=2) + "\n")
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


def _json_float(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v
