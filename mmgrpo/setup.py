"""Everything a run needs before its first step, checked before the run directory is touched.

    job = prepare(config, ...)       # config, processes, adapter, rewards, prompts, optimizer state,
                                     # run directory (locked) and trackers
    with job.run, job.trackers:
        resume_run(job) or start_run(job), then the training loop (trainer.run_job)

What can fail from outside (a config mistake, an unknown reward, a bad prompt, a batch that does
not split over the processes, an --out that holds someone's files) fails here, in one line, before
anything is written; so a failed start never leaves a directory that neither a fresh start nor
--resume accepts.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from mmgrpo import checkpoint, tracking
from mmgrpo.checkpoint import TrainState
from mmgrpo.config import Config, ConfigError, from_dict, load_config, resolve_horizon, resume_config, validate
from mmgrpo.data import PromptOrder, load_prompts
from mmgrpo.distributed import Collective, batched_runs, local_runs
from mmgrpo.memory import estimate_for_run, format_estimate, sharding_mode
from mmgrpo.optim import build_optimizer, horizon_warning, trainable_weights
from mmgrpo.protocols import Adapter
from mmgrpo.registry import ADAPTERS, expand_assets, missing_dependency, resolve
from mmgrpo.rundir import RunDir, check_out, check_resumable, default_out
from mmgrpo.scoring import reward_functions
from mmgrpo.sharding import fsdp_requested


@dataclass
class Job:
    """One run, set up: what the training loop reads."""

    cfg: Config
    comm: Collective
    adapter: Adapter
    reward_fns: dict[str, Callable]
    weights: torch.Tensor  # [K] one per reward
    primary: str  # the headline reward of eval.json
    train_prompts: list[Any]
    held_out: list[Any]
    state: TrainState  # weights, optimizer, schedule, EMA, data order, sampling generator, step
    run: RunDir  # opened and locked
    trackers: tracking.Trackers
    resumes_checkpoint: bool  # --resume of a run that has a checkpoint (else: start from step 0)


def prepare(
    config: Config | dict | str | Path | None,
    adapter: Adapter | None = None,
    rewards: Mapping[str, Callable] | Sequence[Callable] | Callable | None = None,
    prompts: Sequence[Any] | None = None,
    eval_prompts: Sequence[Any] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    overrides: Sequence[str] = (),
    max_steps: int | None = None,
) -> Job:
    """Build and check everything of a run (see trainer.train for the arguments), then open its directory."""
    from accelerate import Accelerator  # heavy import kept out of `import mmgrpo`

    if resume is not None:
        run_path = Path(resume)
        check_resumable(run_path)
        cfg = resume_config(load_config(run_path / "config.yaml"), list(overrides), max_steps)
    else:
        cfg = load_config(config if config is not None else "toy", list(overrides))
        if max_steps is not None:
            cfg.train.max_steps = max_steps
        run_path = Path(out) if out is not None else default_out(cfg)
        check_out(run_path)
    validate(cfg)
    resolve_horizon(cfg)  # config.yaml records the schedule's span, so a later --max-steps keeps it
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    # accelerate sets up devices and processes; autocast is ours (Collective.autocast), because
    # accelerate's state is process-wide and would refuse a second train() with other precision.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError(
            "DeepSpeed launches are not supported: mmgrpo's trainer runs its own backward per chunk of decision "
            "steps and its own optimizer step, which DeepSpeed's engine must own; shard with FSDP2 instead "
            "(accelerate launch --config_file configs/accelerate/fsdp2.yaml ...), which also shards gradients "
            "and optimizer state"
        )
    # several processes on a machine without GPUs run on CPU (gloo): given a GPU config (DDP or FSDP), accelerate
    # would otherwise set each process up alone
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    cpu = cfg.train.cpu or (launched > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, **tracking.accelerator_kwargs(cfg.train.log_with, run_path))
    comm = Collective(accelerator, mixed_precision=cfg.train.mixed_precision)
    if launched > 1 and comm.world_size != launched:
        raise ConfigError(
            f"the launcher started {launched} processes but accelerate joined {comm.world_size}: each would train "
            "alone; check the accelerate config (distributed_type) or set train.cpu=true for CPU processes"
        )
    device = accelerator.device
    torch.manual_seed(cfg.train.seed)  # once, before anything is built: model init is reproducible

    # -- what we train, on what, for what ------------------------------------------------------
    adapter = adapter if adapter is not None else build_adapter(cfg)
    if hasattr(adapter, "to"):
        adapter.to(device)
    if fsdp_requested() and comm.world_size > 1:  # launched with an FSDP accelerate config: shard the weights
        check_sampling_calls(cfg, comm.world_size)
        shard_adapter(adapter, cfg.train.mixed_precision)
        comm.sharded = True
    reward_fns, weights = reward_functions(cfg.rewards, rewards)
    primary = cfg.eval.primary or next(iter(reward_fns))
    if primary not in reward_fns:
        raise ConfigError(f"eval.primary '{primary}' is not one of the rewards: {', '.join(reward_fns)}")
    train_prompts, held_out = load_prompts(cfg.data, cfg.train.seed) if prompts is None else (list(prompts), [])
    held_out = list(eval_prompts) if eval_prompts is not None else held_out
    if cfg.loss.ratio == "sequence" and not getattr(adapter, "scores_all_steps_at_once", False):
        raise ConfigError(
            "loss.ratio=sequence (GSPO) needs every decision step scored in one forward; "
            f"{type(adapter).__name__} scores steps separately: use loss.ratio=token"
        )
    check_before_run(adapter, train_prompts, held_out, cfg, comm)
    if comm.is_main:  # what one device will hold (memory.py): parameters, gradients, optimizer, activations
        estimate = estimate_for_run(adapter, cfg, comm.world_size, sharding_mode(accelerator), train_prompts[:8])
        print(format_estimate(estimate), flush=True)

    params = trainable_weights(adapter)
    optimizer, scheduler, ema = build_optimizer(params, cfg.optim, cfg.optim.horizon * cfg.train.num_iterations)
    order = PromptOrder(len(train_prompts), cfg.train.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + 7919 * comm.rank)
    state = TrainState(params, optimizer, scheduler, order, generator, adapter, ema)
    warning = horizon_warning(cfg.optim, cfg.train.max_steps)
    if warning and comm.is_main:
        print(f"mmgrpo: warning: {warning}", file=sys.stderr)

    # -- run directory: locked for the life of the run; fresh, resumed, or started again ----------
    run = RunDir(run_path, comm)
    run.open(resume=resume is not None)
    trackers = tracking.Trackers(accelerator, cfg.train.log_with)  # train.log_with: TensorBoard, W&B
    run.on_gallery = lambda entries, tag: trackers.log_gallery(run.path, entries, tag, state.step)
    return Job(cfg, comm, adapter, reward_fns, weights, primary, train_prompts, held_out, state, run, trackers,
               resumes_checkpoint=resume is not None and run.has_checkpoint())


def start_run(job: Job) -> None:
    """A new run (or one that stopped before its first checkpoint): config.yaml, empty metrics, trackers."""
    job.run.start(job.cfg)
    job.trackers.start(job.cfg.to_dict(), job.run.path.name)


def resume_run(job: Job) -> None:
    """Continue from the newest intact checkpoint, with the resumable keys the user changed applied."""
    cfg, run, state = job.cfg, job.run, job.state
    checkpoint.restore(state, run.checkpoints, job.comm)
    if cfg.train.max_steps < state.step:
        raise ConfigError(
            f"train.max_steps={cfg.train.max_steps} but the run's checkpoint is at step {state.step}: "
            "give --max-steps at least that"
        )
    run.write_config(cfg)
    run.truncate_metrics(state.step)
    job.trackers.start(cfg.to_dict(), run.path.name, step=state.step)


def build_adapter(cfg: Config) -> Adapter:
    """The adapter named by pipeline.name, built from pipeline.kwargs.

    When the class declares an `Options` dataclass, pipeline.kwargs is checked against it first,
    so a mistyped key stops with one line naming it and the closest valid key, before anything is
    built or written. Errors raised inside the constructor are the adapter's own and propagate.
    """
    try:
        cls = resolve(cfg.pipeline.name, ADAPTERS, "pipeline")
        options = getattr(cls, "Options", None)
        if options is not None and dataclasses.is_dataclass(options):
            from_dict(options, cfg.pipeline.kwargs, "pipeline.kwargs")
        return cls(**expand_assets(cfg.pipeline.kwargs))
    except ModuleNotFoundError as e:
        raise missing_dependency("pipeline", cfg.pipeline.name, e) from None


def shard_adapter(adapter: Adapter, mixed_precision: str) -> None:
    """Shard the adapter's trained module (and its full-FT reference) over the processes (sharding.py)."""
    if not hasattr(adapter, "shard"):
        raise ConfigError(
            f"{type(adapter).__name__} cannot be sharded: it has no shard() method (adapters built on "
            "pipelines.toolkit.TunedAdapter have one); launch it without an FSDP accelerate config"
        )
    adapter.shard(mixed_precision)


def check_sampling_calls(cfg: Config, world_size: int) -> None:
    """With sharded weights every process must make the same number of sample() calls per round."""
    calls = {len(batched_runs(local_runs(cfg.train.prompts_per_step, cfg.train.group_size, world_size, r)))
             for r in range(world_size)}
    if len(calls) > 1:
        raise ConfigError(
            f"with sharded weights every process must sample in as many calls as the others, but "
            f"train.prompts_per_step={cfg.train.prompts_per_step} x train.group_size={cfg.train.group_size} over "
            f"{world_size} processes needs {sorted(calls)}: make prompts_per_step a multiple of {world_size}"
        )


def check_before_run(
    adapter: Adapter, train_prompts: Sequence[Any], held_out: Sequence[Any], cfg: Config, comm: Collective
) -> None:
    """What would otherwise fail only once the run directory exists (and leave it dead): the split
    of the batch over processes, held-out prompts to evaluate on, and the adapter's own check of
    the prompts it will be given (`check_prompts`, optional: media paths, decodability, fields)."""
    try:
        local_runs(cfg.train.prompts_per_step, cfg.train.group_size, comm.world_size, comm.rank)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.eval.num_prompts > 0 and not held_out:
        raise ConfigError(
            "no held-out prompts to evaluate on: pass eval_prompts=..., set data.eval_source, or set eval.num_prompts=0"
        )
    check = getattr(adapter, "check_prompts", None)
    if check is None:
        return
    for prompts in (train_prompts, list(held_out)[: cfg.eval.num_prompts]):
        try:
            check(prompts)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
