"""Atomic checkpoints: trainable weights as safetensors, plus optimizer, schedule, EMA, RNG and data order.

Layout of DIR/checkpoints/step_000042/:
  trainable.safetensors   the trainable weights by name
  ema.safetensors         EMA of those weights (when enabled)
  trainer.pt              optimizer, LR schedule, data order, global RNG states, step
  rng_rank{r}.pt          the sampling generator of each process
  adapter.pt              the adapter's own sampler state (when it has any)
A checkpoint is written into a hidden temporary folder and renamed into place, then the
`latest` file is replaced atomically: a crash mid-write never leaves a half checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def staging_dir(root: Path, step: int) -> Path:
    """The temporary folder a checkpoint of `step` is written into before it is published."""
    return root / f".tmp-step_{step:06d}"


def write_weights(path: Path, params: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in params.items()}, str(path))


def write_main(
    stage: Path,
    *,
    params: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    trainer_state: dict[str, Any],
    adapter_state: Any | None,
) -> None:
    """What the main process writes into the staging folder."""
    write_weights(stage / "trainable.safetensors", params)
    if ema is not None:
        write_weights(stage / "ema.safetensors", ema)
    global_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({**trainer_state, "global_rng": global_rng}, stage / "trainer.pt")
    if adapter_state is not None:
        torch.save(adapter_state, stage / "adapter.pt")


def write_rank(stage: Path, rank: int, generator: torch.Generator) -> None:
    """What every process writes: its own sampling generator."""
    torch.save(generator.get_state(), stage / f"rng_rank{rank}.pt")


def publish(root: Path, step: int, keep: int) -> Path:
    """Rename the staging folder into place, point `latest` at it, prune old checkpoints."""
    stage = staging_dir(root, step)
    for f in stage.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = root / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if path.is_dir():
            return path
    steps = sorted(root.glob("step_*"))
    return steps[-1] if steps else None


def load(path: Path, rank: int) -> dict[str, Any]:
    """Everything saved in one checkpoint folder, for process `rank`."""
    state = torch.load(path / "trainer.pt", weights_only=False)
    state["params"] = load_file(str(path / "trainable.safetensors"))
    ema_path = path / "ema.safetensors"
    state["ema"] = load_file(str(ema_path)) if ema_path.is_file() else None
    rng_path = path / f"rng_rank{rank}.pt"
    if not rng_path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} has no sampling state for process {rank}: resume with the same number of processes"
        )
    state["generator"] = torch.load(rng_path, weights_only=False)
    adapter_path = path / "adapter.pt"
    state["adapter"] = torch.load(adapter_path, weights_only=False) if adapter_path.is_file() else None
    return state


def restore_global_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class EMA:
    """Exponential moving average of the trainable weights, updated every `every` optimizer steps."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in (0, 1), got {decay}")
        self.decay, self.every, self.updates = decay, every, 0
        self.shadow = {k: p.detach().clone().float() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter], optimizer_step: int) -> None:
        if optimizer_step % self.every:
            return
        self.updates += 1
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Exchange the live weights and the averaged ones (call twice to undo)."""
        for k, p in params.items():
            live = p.detach().clone()
            p.copy_(self.shadow[k].to(p.dtype))
            self.shadow[k].copy_(live.float())
