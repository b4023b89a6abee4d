"""Atomic checkpoints without pickles: tensors as safetensors, everything else as JSON.

Layout of DIR/checkpoints/step_000042/:
  trainable.safetensors    the trainable weights by name
  ema.safetensors          EMA of those weights (when enabled)
  trainer.json             step, LR schedule, data order, optimizer settings, Python and NumPy RNG states
  trainer.safetensors      the optimizer's tensors (Adam moments, step counts) and torch's global RNG state
  rng_rank{r}.safetensors  the sampling generator of each process
  adapter.json             the adapter's own sampler state (when it has any)
A run whose weights are sharded (FSDP2, see sharding.py) writes no trainable / ema safetensors and keeps
no optimizer tensors in trainer.safetensors; instead every process writes its own shards of them into
  sharded/shard-0000{r+1}-model-00001-of-00001.safetensors
through torch.distributed.checkpoint's safetensors writer (keys "params/<name>", "ema/<name>",
"optimizer/<index>/<slot>"; each file's header records which slice of which tensor it holds), and
resume loads them back into the sharded weights with the same reader.
Nothing in a checkpoint is a pickle, so a run directory can hold data but never code: resume
reads JSON and safetensors only, and refuses the trainer.pt pickles older versions wrote.
A checkpoint is written into a hidden temporary folder and renamed into place, then the
`latest` file is replaced atomically: a crash mid-write never leaves a half checkpoint. One
damaged later (a truncated or deleted file, garbage in `latest`) is skipped with a warning
line, and resume falls back to the newest intact checkpoint.
`save` and `restore` take one TrainState, everything a run carries from step to step.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmgrpo.config import ConfigError
from mmgrpo.sharding import is_sharded

if TYPE_CHECKING:
    from mmgrpo.data import PromptOrder
    from mmgrpo.distributed import Collective
    from mmgrpo.optim import EMA
    from mmgrpo.protocols import Adapter

LATEST = "latest"
STEP_NAME = re.compile(r"step_(\d+)")
TRAINER_KEYS = (
    "step", "world_size", "order", "scheduler", "optimizer", "ema_updates", "has_ema", "has_adapter_state", "global_rng"
)  # fmt: skip
TORCH_RNG = "rng/torch"  # torch's global RNG state in trainer.safetensors
SHARDED = "sharded"  # the folder of the per-process shards of a sharded run


class CorruptCheckpoint(ValueError):
    """A checkpoint folder that cannot be read back; the message names the file and what is wrong."""


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
    sharded = any(is_sharded(p) for p in state.params.values())
    optimizer_state = state.optimizer.state_dict()
    if sharded:  # every process writes its shards (a collective)
        write_shards(stage / SHARDED, sharded_tensors(state.params, state.ema, optimizer_state))
    if comm.is_main:
        has_adapter_state = hasattr(state.adapter, "sampler_state")
        trainer_state = {
            "step": state.step,
            "world_size": comm.world_size,
            "sharded": sharded,
            "order": state.order.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "ema_updates": state.ema.updates if state.ema else 0,
            "has_ema": state.ema is not None,
            "has_adapter_state": has_adapter_state,
        }
        write_main(
            stage,
            params=None if sharded else state.params,
            ema=state.ema.shadow if state.ema and not sharded else None,
            trainer_state=trainer_state,
            optimizer_state=optimizer_state,
            optimizer_tensors=not sharded,
        )
        if has_adapter_state:
            what = f"{type(state.adapter).__name__}.sampler_state()"
            write_json(stage / "adapter.json", state.adapter.sampler_state(), what)
    comm.barrier()
    if comm.is_main:
        publish(root, state.step, keep)
    comm.barrier()


def restore(state: TrainState, root: Path, comm: Collective) -> Path:
    """Load the newest intact checkpoint under root into `state` (in place); returns its folder.

    A damaged checkpoint is skipped with one warning line on stderr naming it and the file at
    fault; with none intact, one ConfigError line lists them all.
    """
    paths, skipped = candidates(root)
    if not paths and not skipped:
        raise ConfigError(f"nothing to resume: '{root}' has no checkpoint")
    for note in skipped:
        _warn(comm, note)
    for path in paths:
        try:
            saved = load(path, comm.rank, comm.world_size)
        except CorruptCheckpoint as e:
            skipped.append(f"{path}: {e}")
            _warn(comm, f"skipped damaged checkpoint {path}: {e}")
            continue
        apply(state, saved, path)
        if skipped and comm.is_main:  # point `latest` at what was resumed, so the next resume does not warn again
            atomic_write_text(root / LATEST, path.name + "\n")
        return path
    raise ConfigError(f"no intact checkpoint to resume in '{root}': {'; '.join(skipped)}")


def apply(state: TrainState, saved: dict[str, Any], path: Path) -> None:
    """Copy a loaded checkpoint into `state` (weights, optimizer, schedule, data order, every RNG)."""
    names = saved["param_names"] if saved["sharded"] else saved["params"]
    mismatch = set(state.params) ^ set(names)
    if mismatch:
        raise ConfigError(f"checkpoint {path} does not match the adapter's trainable weights: {sorted(mismatch)[:5]}")
    if saved["sharded"]:  # every process reads its shards into the live weights, EMA and optimizer state
        materialize_optimizer_state(state.optimizer)
        targets = sharded_tensors(state.params, state.ema if saved["has_ema"] else None, state.optimizer.state_dict())
        read_shards(path / SHARDED, targets)
        saved["tensors"].update({k: v for k, v in targets.items() if k.startswith("optimizer/")})
    else:
        with torch.no_grad():
            for name, p in state.params.items():
                p.copy_(saved["params"][name].to(p.device, p.dtype))
    state.optimizer.load_state_dict(join_optimizer(saved["optimizer"], saved["tensors"], state.optimizer.state_dict()))
    state.scheduler.load_state_dict(saved["scheduler"])
    state.order.load_state_dict(saved["order"])
    state.generator.set_state(saved["generator"])
    if state.ema is not None and saved["ema"] is not None:
        state.ema.shadow = {k: v.float() for k, v in saved["ema"].items()}
    if state.ema is not None and saved["has_ema"]:
        state.ema.updates = saved["ema_updates"]
    if saved["has_adapter_state"] and hasattr(state.adapter, "load_sampler_state"):
        state.adapter.load_sampler_state(saved["adapter"])
    restore_global_rng(saved["global_rng"], saved["tensors"][TORCH_RNG])
    state.step = saved["step"]


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


# ------------------------------------------------------------------------------- writing


def write_weights(path: Path, params: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in params.items()}, str(path))


def write_json(path: Path, data: Any, what: str) -> None:
    try:
        text = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON data (dicts, lists, strings, finite numbers): {e}") from None
    path.write_text(text)


def write_main(
    stage: Path,
    *,
    params: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    trainer_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    optimizer_tensors: bool = True,
) -> None:
    """What the main process writes into the staging folder (besides the adapter's state).

    params None: the weights are sharded (written by write_shards, as are the optimizer's tensors
    when optimizer_tensors is False; trainer.json still lists their names)."""
    if params is not None:
        write_weights(stage / "trainable.safetensors", params)
    if ema is not None:
        write_weights(stage / "ema.safetensors", ema)
    optimizer, tensors = split_optimizer(optimizer_state)
    if not optimizer_tensors:
        tensors = {}
    global_rng, tensors[TORCH_RNG] = global_rng_state()
    write_weights(stage / "trainer.safetensors", tensors)
    trainer_json = {**trainer_state, "optimizer": optimizer, "global_rng": global_rng}
    write_json(stage / "trainer.json", trainer_json, "the trainer state")


def write_rank(stage: Path, rank: int, generator: torch.Generator) -> None:
    """What every process writes: its own sampling generator (a uint8 tensor)."""
    save_file({"generator": generator.get_state()}, str(stage / f"rng_rank{rank}.safetensors"))


def publish(root: Path, step: int, keep: int) -> Path:
    """Rename the staging folder into place, point `latest` at it, prune old checkpoints."""
    stage = staging_dir(root, step)
    for f in stage.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    final = root / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in step_dirs(root)[keep:] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------- finding and reading


def step_dirs(root: Path) -> list[Path]:
    """The step_* checkpoint folders under root, newest step first."""
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def candidates(root: Path) -> tuple[list[Path], list[str]]:
    """Checkpoint folders to try, the one `latest` names first, then newest first; and a note when
    `latest` names no checkpoint folder (it is then ignored)."""
    paths, notes = step_dirs(root), []
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_bytes().decode("utf-8", "replace").strip()
        target = root / name
        if STEP_NAME.fullmatch(name) and target in paths:
            paths.remove(target)
            paths.insert(0, target)
        else:
            notes.append(f"ignored {pointer}: it names {name[:40]!r}, which is not a checkpoint folder")
    return paths, notes


def latest(root: Path) -> Path | None:
    """The checkpoint folder resume tries first (None when there is none)."""
    paths, _ = candidates(root)
    return paths[0] if paths else None


def load(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Everything saved in one checkpoint folder, for process `rank` of `world_size`.

    Reads JSON and safetensors only; raises CorruptCheckpoint naming the first file that is
    missing or unreadable (every process checks every process's file, so all pick the same folder).
    """
    if not (path / "trainer.json").is_file() and (path / "trainer.pt").is_file():
        raise CorruptCheckpoint(
            "trainer.pt is a pickle written by an older mmgrpo; pickles can run code, so it is not loaded"
        )
    saved = read_json(path / "trainer.json")
    lacking = [k for k in TRAINER_KEYS if k not in saved] if isinstance(saved, dict) else ["everything"]
    if lacking:
        raise CorruptCheckpoint(f"trainer.json lacks {lacking[0]!r}")
    if saved["world_size"] != world_size:
        raise ConfigError(
            f"checkpoint {path} was written by {saved['world_size']} processes; resume with the same number"
        )
    saved["sharded"] = bool(saved.get("sharded", False))  # older checkpoints: never sharded
    saved["tensors"] = read_tensors(path / "trainer.safetensors")
    for name in [*([] if saved["sharded"] else saved["optimizer"]["tensors"]), TORCH_RNG]:
        if name not in saved["tensors"]:
            raise CorruptCheckpoint(f"trainer.safetensors lacks {name!r}")
    if saved["sharded"]:
        saved["param_names"], _ = check_shards(path / SHARDED, saved["optimizer"]["tensors"], saved["has_ema"])
        saved["params"] = saved["ema"] = None
    else:
        saved["params"] = read_tensors(path / "trainable.safetensors")
        saved["ema"] = read_tensors(path / "ema.safetensors") if saved["has_ema"] else None
    for r in range(world_size):
        generator = read_tensors(path / f"rng_rank{r}.safetensors").get("generator")
        if generator is None:
            raise CorruptCheckpoint(f"rng_rank{r}.safetensors lacks 'generator'")
        if r == rank:
            saved["generator"] = generator
    saved["adapter"] = read_json(path / "adapter.json") if saved["has_adapter_state"] else None
    return saved


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise CorruptCheckpoint(f"{path.name} is missing")
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptCheckpoint(f"{path.name} is not valid JSON ({e})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CorruptCheckpoint(f"{path.name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:  # truncated, or not a safetensors file at all
        raise CorruptCheckpoint(f"{path.name} is not a readable safetensors file ({e})") from None


def _warn(comm: Collective, message: str) -> None:
    if comm.is_main:
        print(f"mmgrpo: warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- state as JSON + tensors


def split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimizer state_dict as JSON data plus named tensors "optimizer/<param index>/<slot>"."""
    plain: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for index, slots in state_dict["state"].items():
        plain[str(index)] = {}
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{slot}"] = value
            else:
                plain[str(index)][slot] = value
    data = {"state": plain, "param_groups": state_dict["param_groups"], "tensors": sorted(tensors)}
    return data, tensors


def join_optimizer(data: dict[str, Any], tensors: dict[str, torch.Tensor], current: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state_dict split_optimizer took apart; tuples (Adam's betas) come back as tuples,
    as in the `current` state_dict of the optimizer it is loaded into."""
    state = {int(index): dict(slots) for index, slots in data["state"].items()}
    for name in data["tensors"]:
        _, index, slot = name.split("/", 2)
        state[int(index)][slot] = tensors[name]
    groups = []
    for i, group in enumerate(data["param_groups"]):
        like = current["param_groups"][i] if i < len(current["param_groups"]) else {}
        groups.append({k: tuple(v) if isinstance(like.get(k), tuple) else v for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def global_rng_state() -> tuple[dict[str, Any], torch.Tensor]:
    """Python's and NumPy's global RNG states as plain lists and ints, and torch's as a uint8 tensor."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    plain = {"python": [version, list(internal), gauss], "numpy": [name, key.tolist(), pos, has_gauss, cached]}
    return plain, torch.get_rng_state()


def restore_global_rng(plain: dict[str, Any], torch_state: torch.Tensor) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)


# ------------------------------------------------------------------------------- sharded runs (FSDP2)


def sharded_tensors(
    params: dict[str, torch.Tensor], ema: EMA | None, optimizer_state: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """What a sharded checkpoint holds, by key: the live tensors themselves (DTensors for sharded weights,
    plain tensors for replicated ones), so reading a checkpoint into them loads it in place."""
    tensors = {f"params/{k}": p.detach() for k, p in params.items()}
    if ema is not None:
        tensors.update({f"ema/{k}": v for k, v in ema.shadow.items()})
    tensors.update(split_optimizer(optimizer_state)[1])  # "optimizer/<index>/<slot>"
    return tensors


def write_shards(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every process writes its own shard of `tensors` into folder (a collective: all processes call it).

    torch.distributed.checkpoint with its safetensors writer: one file per process, whose header says
    which slice of which tensor it holds; a tensor replicated on every process is written once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def read_shards(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Load a sharded checkpoint into `tensors` in place (every process reads the slices it owns)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)))


def check_shards(folder: Path, optimizer_keys: list[str], has_ema: bool) -> tuple[list[str], dict[str, Any]]:
    """The trainable weight names of a sharded checkpoint and its metadata (key -> size, dtype, slices), after
    checking that its shard files are readable and that together they cover every element of every weight,
    EMA and optimizer tensor it lists. Raises CorruptCheckpoint naming the first problem (a missing or
    truncated shard shows up here)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise CorruptCheckpoint(f"{SHARDED}/ holds no shard files")
    for f in files:
        read_header(f)
    try:
        metadata = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as e:  # a header without its sharding record, or inconsistent shards
        raise CorruptCheckpoint(f"{SHARDED}/ cannot be read as one checkpoint ({e})") from None
    names = [k.split("/", 1)[1] for k in metadata if k.startswith("params/")]
    expected = [f"params/{n}" for n in names] + list(optimizer_keys) + ([f"ema/{n}" for n in names] if has_ema else [])
    if not names:
        raise CorruptCheckpoint(f"{SHARDED}/ holds no trainable weights")
    for key in expected:
        meta = metadata.get(key)
        covered = sum(math.prod(c.sizes) for c in meta.chunks) if meta is not None else 0
        if meta is None or covered != math.prod(meta.size):
            raise CorruptCheckpoint(f"{SHARDED}/ lacks {'part of ' if meta is not None else ''}{key!r} (a shard file is missing)")
    return names, metadata


def read_header(path: Path) -> None:
    """Open a safetensors file's header (no tensor is read); CorruptCheckpoint when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise CorruptCheckpoint(f"{SHARDED}/{path.name} is not a readable safetensors file ({e})") from None


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-weight state (zeros) before any step, so a checkpoint can be read into it.

    One step with zero gradients and lr 0 leaves every weight as it is; the state it creates (Adam's
    moments and step counts, DTensors for sharded weights) is overwritten by the checkpoint."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p, g in zip(params, grads):
        p.grad = g


def read_trained_weights(folder: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The trained weights (or their EMA) of one checkpoint folder as whole tensors, read in this one
    process whichever way the run wrote them (plain safetensors, or per-process shards)."""
    state = read_json(folder / "trainer.json")
    if not isinstance(state, dict) or "optimizer" not in state:
        raise CorruptCheckpoint("trainer.json lacks 'optimizer'")
    if not state.get("sharded"):
        return read_tensors(folder / ("ema.safetensors" if ema else "trainable.safetensors"))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    names, metadata = check_shards(folder / SHARDED, state["optimizer"]["tensors"], bool(state.get("has_ema")))
    prefix = "ema/" if ema else "params/"
    whole = {prefix + n: torch.empty(metadata[prefix + n].size, dtype=metadata[prefix + n].properties.dtype)
             for n in names}  # fmt: skip
    with warnings.catch_warnings():  # torch notes that it loads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(whole, storage_reader=HuggingFaceStorageReader(str(folder / SHARDED)), no_dist=True)  # each tensor assembled from every process's slices
    return {k[len(prefix):]: v for k, v in whole.items()}
