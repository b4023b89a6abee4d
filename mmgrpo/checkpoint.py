"""Atomic checkpoints: trainable weights as safetensors, plus optimizer, schedule, EMA, RNG and data order.

Layout of DIR/checkpoints/step_000042/:
  trainable.safetensors   the trainable weights by name
  ema.safetensors         EMA of those weights (when enabled)
  trainer.pt              optimizer, LR schedule, data order, global RNG states, step
  rng_rank{r}.pt          the sampling generator of each process
  adapter.pt              the adapter's own sampler state (when it has any)
A checkpoint is written into a hidden temporary folder and renamed into place, then the
`latest` file is replaced atomically: a crash mid-write never leaves a half checkpoint.
`save` and `restore` take one TrainState, everything a run carries from step to step.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmgrpo.config import ConfigError

if TYPE_CHECKING:
    from mmgrpo.data import PromptOrder
    from mmgrpo.distributed import Collective
    from mmgrpo.optim import EMA
    from mmgrpo.protocols import Adapter

LATEST = "latest"


@dataclass
class TrainState:
    """What a run carries from one step to the next: a checkpoint saves all of it, resume restores it."""

    params: dict[str, torch.nn.Parameter]  # the trainable weights by name
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order: PromptOrder  # position in the stream of training prompts
    generator: torch.Generator  # this process's sampling RNG
    adapter: Adapter  # its sampler_state() / load_sampler_state(), when it has them
    ema: EMA | None = None
    step: int = 0  # training steps done


def save(state: TrainState, root: Path, comm: Collective, keep: int) -> None:
    """Write checkpoint `state.step` under root (every process takes part), keeping the newest `keep`."""
    stage = staging_dir(root, state.step)
    if comm.is_main:
        shutil.rmtree(stage, ignore_errors=True)  # left over by a crash mid-write
        stage.mkdir(parents=True)
    comm.barrier()
    write_rank(stage, comm.rank, state.generator)
    if comm.is_main:
        trainer_state = {
            "step": state.step,
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "order": state.order.state_dict(),
            "ema_updates": state.ema.updates if state.ema else 0,
            "world_size": comm.world_size,
        }
        sampler_state = state.adapter.sampler_state() if hasattr(state.adapter, "sampler_state") else None
        write_main(
            stage,
            params=state.params,
            ema=state.ema.shadow if state.ema else None,
            trainer_state=trainer_state,
            adapter_state=sampler_state,
        )
    comm.barrier()
    if comm.is_main:
        publish(root, state.step, keep)
    comm.barrier()


def restore(state: TrainState, root: Path, comm: Collective) -> Path:
    """Load the latest checkpoint under root into `state` (in place); returns its folder."""
    path = latest(root)
    if path is None:
        raise ConfigError(f"nothing to resume: '{root}' has no checkpoint")
    saved = load(path, comm.rank)
    if saved["world_size"] != comm.world_size:
        raise ConfigError(
            f"checkpoint {path} was written by {saved['world_size']} processes; resume with the same number"
        )
    mismatch = set(state.params) ^ set(saved["params"])
    if mismatch:
        raise ConfigError(f"checkpoint {path} does not match the adapter's trainable weights: {sorted(mismatch)[:5]}")
    with torch.no_grad():
        for name, p in state.params.items():
            p.copy_(saved["params"][name].to(p.device, p.dtype))
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.order.load_state_dict(saved["order"])
    state.generator.set_state(saved["generator"])
    if state.ema is not None and saved["ema"] is not None:
        state.ema.shadow = {k: v.float() for k, v in saved["ema"].items()}
        state.ema.updates = saved["ema_updates"]
    if saved["adapter"] is not None and hasattr(state.adapter, "load_sampler_state"):
        state.adapter.load_sampler_state(saved["adapter"])
    restore_global_rng(saved["global_rng"])
    state.step = saved["step"]
    return path


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
