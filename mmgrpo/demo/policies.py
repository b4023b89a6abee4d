"""A run's two policies, loaded as training built them, and one side-by-side comparison.

    run = load_run("runs/image-...")            # checks and loads everything, or one ConfigError line
    result = compare(run, prompt, seed=0, count=1)
    result.base.samples, result.trained.samples, result.base.scores["scene"], ...

The base policy is the run's reference (LoRA disabled, or the frozen copy of the initial weights);
the trained policy is the same adapter with the checkpoint's trainable weights loaded (its EMA
weights when the run kept an EMA: the run's "after" evaluation used those). Both sides sample with
a generator seeded alike, so they start from the same noise and differ only by their weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mmgrpo import checkpoint
from mmgrpo.config import Config, ConfigError, load_config
from mmgrpo.data import load_prompts
from mmgrpo.protocols import Adapter
from mmgrpo.rundir import is_run

SIDES = ("base", "trained")


@dataclass
class RunPolicies:
    """Everything the demo needs of one run directory."""

    path: Path
    cfg: Config
    adapter: Adapter  # trained weights loaded; `with adapter.reference():` is the base policy
    reward_fns: dict[str, Callable]
    weights: torch.Tensor  # [K] one per reward
    held_out: list[Any]
    checkpoint: Path
    step: int
    uses_ema: bool
    device: torch.device


@dataclass
class Side:
    """One policy's outputs for a comparison: samples, every reward and sub-score per sample."""

    samples: list[Any]
    prompts: list[Any]
    scores: dict[str, list[float | None]] = field(default_factory=dict)  # reward or "reward/sub" -> [n]
    total: list[float | None] = field(default_factory=list)  # weighted sum of the rewards [n]
    score_error: str | None = None  # why the rewards could not score these prompts
    seconds: float = 0.0  # sampling and scoring


@dataclass
class Comparison:
    base: Side
    trained: Side
    seed: int
    seconds: float  # both sides


def load_run(path: str | Path, checkpoint_name: str | None = None, threads: int | None = None) -> RunPolicies:
    """The run in `path` with both policies ready; every problem is one ConfigError line.

    checkpoint_name: a folder under checkpoints/ (default: the latest one). threads: torch's CPU
    threads (None: leave torch's setting).
    """
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"'{path}' is not a folder: give a run directory made by `mmgrpo train`")
    if not is_run(path):
        raise ConfigError(f"'{path}' is not a run directory (it has no config.yaml and metrics.jsonl)")
    folder = find_checkpoint(path / "checkpoints", checkpoint_name)
    trained, uses_ema, step = read_weights(folder)
    cfg = load_config(path / "config.yaml")
    adapter, device = build_policies(cfg)
    apply_weights(adapter, trained, folder)

    from mmgrpo.scoring import reward_functions

    reward_fns, weights = reward_functions(cfg.rewards)
    _, held_out = load_prompts(cfg.data, cfg.train.seed)
    return RunPolicies(path, cfg, adapter, reward_fns, weights, held_out, folder, step, uses_ema, device)


def find_checkpoint(root: Path, name: str | None = None) -> Path:
    """The checkpoint folder to compare with: `name`, or the latest one."""
    if name is not None:
        folder = root / name
        if not folder.is_dir():
            found = ", ".join(p.name for p in checkpoint.step_dirs(root)) or "none"
            raise ConfigError(f"no checkpoint '{name}' in {root} (there: {found})")
        return folder
    folder = checkpoint.latest(root)
    if folder is None:
        raise ConfigError(
            f"the run has no checkpoint yet ({root} is empty or missing): train it further "
            f"(mmgrpo train --resume {root.parent}) or wait for its first checkpoint"
        )
    return folder


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], bool, int]:
    """(trained weights by name, whether they are the EMA ones, step) of one checkpoint folder."""
    try:
        state = checkpoint.read_json(folder / "trainer.json")
        if not isinstance(state, dict) or "step" not in state:
            raise checkpoint.CorruptCheckpoint("trainer.json lacks 'step'")
        uses_ema = bool(state.get("has_ema"))
        weights = checkpoint.read_trained_weights(folder, ema=uses_ema)
    except checkpoint.CorruptCheckpoint as e:
        older = [p.name for p in checkpoint.step_dirs(folder.parent) if p != folder]
        hint = f"; compare with an older one: --checkpoint {older[0]}" if older else ""
        raise ConfigError(f"checkpoint {folder} is damaged: {e}{hint}") from None
    return weights, uses_ema, int(state["step"])


def build_policies(cfg: Config) -> tuple[Adapter, torch.device]:
    """The run's adapter, built as training builds it, with a reference policy kept.

    A fully fine-tuned adapter built with keep_reference=false has no base policy to compare with;
    the demo builds it with the frozen copy (the initial weights) kept.
    """
    from mmgrpo.setup import build_adapter

    if cfg.pipeline.kwargs.get("keep_reference") is False:
        cfg.pipeline.kwargs["keep_reference"] = True
    torch.manual_seed(cfg.train.seed)  # as training does before building (initial weights)
    adapter = build_adapter(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    if hasattr(adapter, "to"):
        adapter.to(device)
    return adapter, device


def apply_weights(adapter: Adapter, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy a checkpoint's weights into the adapter's trainable parameters (names must match)."""
    params = adapter.trainable_parameters()
    mismatch = sorted(set(params) ^ set(weights))
    if mismatch:
        raise ConfigError(
            f"checkpoint {folder} does not fit the adapter its run's config.yaml builds "
            f"({len(mismatch)} weight names differ, e.g. {mismatch[0]}): was config.yaml edited?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))


# ------------------------------------------------------------------------------- one comparison


def compare(run: RunPolicies, prompt: Any, seed: int, count: int = 1,
            progress: Callable[[float, str], None] | None = None) -> Comparison:
    """`count` samples of each policy for `prompt`, from generators seeded with `seed` alike, scored.

    The prompt is repeated `count` times with one sample each, so every sample draws its own noise
    (a group of a flow model would share its initial noise) and sample i of both sides starts the same.
    """
    if count < 1:
        raise ValueError(f"the number of samples per policy must be at least 1, got {count}")
    t0 = time.perf_counter()
    prompts = [prompt] * count
    sides = {}
    for i, name in enumerate(SIDES):
        if progress is not None:
            progress(i / len(SIDES), f"sampling the {name} policy")
        sides[name] = sample_side(run, prompts, seed, base=name == "base")
    return Comparison(sides["base"], sides["trained"], seed, time.perf_counter() - t0)


@torch.no_grad()
def sample_side(run: RunPolicies, prompts: Sequence[Any], seed: int, base: bool) -> Side:
    """One policy's samples for `prompts` (evaluation settings) and their rewards."""
    from contextlib import nullcontext

    t0 = time.perf_counter()
    generator = torch.Generator(device=run.device).manual_seed(seed)
    with run.adapter.reference() if base else nullcontext(), sampling_precision(run.cfg, run.device):
        rollout = run.adapter.sample(list(prompts), 1, generator, evaluate=True)
    side = Side(samples=list(rollout.samples), prompts=list(rollout.prompts))
    score_side(run, side)
    side.seconds = time.perf_counter() - t0
    return side


def sampling_precision(cfg: Config, device: torch.device) -> Any:
    """The run's mixed precision, as its evaluation sampled (distributed.Collective.autocast)."""
    from contextlib import nullcontext

    if cfg.train.mixed_precision == "no":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def score_side(run: RunPolicies, side: Side) -> None:
    """Every reward and sub-score of a side's samples; a reward that cannot score them is a message."""
    from mmgrpo.advantages import weighted_sum
    from mmgrpo.scoring import RewardError, score_rollout

    try:
        components, subs = score_rollout(run.reward_fns, side.samples, side.prompts)  # [n, K]
    except (RewardError, ConfigError) as e:
        side.score_error = str(e)
        return
    for k, name in enumerate(run.reward_fns):
        side.scores[name] = _floats(components[:, k])
    for name, values in subs.items():
        side.scores[name] = _floats(values)
    side.total = _floats(weighted_sum(components, run.weights))


def _floats(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]
