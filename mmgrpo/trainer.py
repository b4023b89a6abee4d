"""The training loop: sample -> rewards -> advantages -> inner epochs of clipped policy updates.

    for step in range(max_steps):
        rollout = sample G outputs for each of B prompts        (adapter.sample, no grad)
        rewards = every reward on every sample, gathered over processes
        advantages = group-relative estimator on the gathered rewards
        for epoch in range(num_iterations):    (epoch k: adapter.for_iteration(rollout, k) where the adapter has it)
            for micro_batch in rows:
                for chunk in decision steps:
                    loss = weighted clipped surrogate (+ beta * KL)   (adapter.log_prob)
                    loss.backward()                                   (memory: one chunk)
            average gradients over processes, clip, optimizer step

Under an FSDP launch the adapter's weights are sharded (sharding.py): FSDP averages their gradients in
backward, and every process runs the same forwards (the union of the steps each micro-batch scores;
padding rows that weigh nothing where dynamic sampling kept fewer rows on one process).

Bookkeeping lives next door: setup.py (everything built and checked before the first step),
rundir.py (run directory), checkpoint.py (TrainState, save, resume), evaluation.py, optim.py
(optimizer, LR schedule, EMA, clipping), config.validate, tracking.py (TensorBoard, W&B).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from mmgrpo import checkpoint
from mmgrpo.advantages import compute_advantages, weighted_sum, zero_std_groups
from mmgrpo.checkpoint import TrainState
from mmgrpo.config import Config, ConfigError, LossConfig
from mmgrpo.data import PromptOrder
from mmgrpo.distributed import Collective, batched_runs, local_runs
from mmgrpo.evaluation import evaluate, reward_stats
from mmgrpo.losses import aggregation_weights, gaussian_kl, kl_penalty, policy_loss
from mmgrpo.optim import advance_schedule, clip_gradients, ema_weights
from mmgrpo.protocols import Adapter, StepScores
from mmgrpo.rollout import Rollout
from mmgrpo.rundir import RunDir, RunResult
from mmgrpo.scoring import score_rollout
from mmgrpo.setup import Job, build_adapter, prepare, resume_run, start_run

__all__ = ["train", "run_job", "collect_rollout", "sample_global_batch", "iteration_rollouts", "accumulate_gradients",
           "build_adapter", "evaluate", "RunResult", "RunDir", "TrainState", "TIME_KEYS"]

TIME_KEYS = ("time/sample", "time/reward", "time/train", "time/step")
# what a step that trained nothing (no row could be scored) logs for the loss
UNTRAINED = {"loss": None, "kl": None, "clip_frac": None, "ratio/mean": None, "active_steps": 0}


# ------------------------------------------------------------------------------- the loop


def train(
    config: Config | dict | str | Path | None = None,
    *,
    adapter: Adapter | None = None,
    rewards: Mapping[str, Callable] | Sequence[Callable] | Callable | None = None,
    prompts: Sequence[Any] | None = None,
    eval_prompts: Sequence[Any] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    overrides: Sequence[str] = (),
    max_steps: int | None = None,
    progress: bool = True,
) -> RunResult:
    """Train with GRPO and return the run's metrics and eval numbers.

    config: a Config, a dict, a YAML path or a modality name ("toy", "video", ...). Objects passed
    here replace what the config would build: `adapter` (any object with the Adapter protocol),
    `rewards` (callables; a dict gives them names, weights come from config rewards of the same
    name or default to 1), `prompts` / `eval_prompts` (lists of prompt items).
    `resume` is a run directory: training continues exactly from its latest checkpoint (from step 0
    with its saved config when it stopped before its first one); `overrides` and `max_steps` may then
    change only config.RESUMABLE_KEYS. Everything that can be checked is checked before the run
    directory is made or touched (setup.prepare).
    """
    job = prepare(config, adapter, rewards, prompts, eval_prompts, out, resume, overrides, max_steps)
    with job.run, job.trackers:  # releases the lock however train() ends, and tells the CLI which directory it was
        return run_job(job, progress)


def run_job(job: Job, progress: bool) -> RunResult:
    """Train in an opened run directory: the "before" evaluation, the steps, the "after" evaluation."""
    cfg, comm, run, state, adapter = job.cfg, job.comm, job.run, job.state, job.adapter
    params, optimizer, scheduler, ema = state.params, state.optimizer, state.scheduler, state.ema
    reward_fns, weights = job.reward_fns, job.weights
    if job.resumes_checkpoint:
        resume_run(job)
    else:  # a new run, or one that stopped before its first checkpoint: from step 0 with its config
        start_run(job)
        if cfg.eval.num_prompts > 0:
            run.write_eval("before", evaluate(adapter, reward_fns, weights, job.held_out, cfg, comm, run, "before"))

    # -- training -------------------------------------------------------------------------------
    bar = _progress(cfg.train.max_steps, state.step, progress and comm.is_main)
    while state.step < cfg.train.max_steps:
        t0 = time.perf_counter()
        if hasattr(adapter, "begin_step"):  # sampler choices every process must share (the flow SDE window)
            adapter.begin_step(state.step, cfg.train.seed)
        rollout, stats = collect_rollout(adapter, reward_fns, weights, job.train_prompts, state.order,
                                        state.generator, cfg, comm)
        padding = stats.pop("padding_rows")  # this process's rows that only keep sharded processes in step
        if comm.sharded:
            stats["padding_rows"] = int(comm.sum(padding))  # over all processes
        t_train = time.perf_counter()
        rollouts = iteration_rollouts(adapter, rollout, cfg.train.num_iterations, state.generator, comm.autocast)
        for iteration in range(cfg.train.num_iterations):
            if stats["rows"] == 0:  # no row could be scored: train nothing, log the step and go on
                loss_stats, grad_norm = UNTRAINED, None
                advance_schedule(scheduler)  # the schedule follows training steps, trained or not
                continue
            optimizer.zero_grad(set_to_none=True)
            loss_stats = accumulate_gradients(
                adapter,
                rollouts[iteration],
                cfg.loss,
                micro_batch_size=cfg.train.micro_batch_size,
                step_chunk=cfg.train.step_chunk,
                comm=comm,
                autocast=comm.autocast,
                padding_rows=padding,
            )
            comm.mean_gradients(list(params.values()))
            grad_norm = clip_gradients(params, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(params, scheduler.last_epoch)
        state.step += 1
        now = time.perf_counter()
        stats = {"step": state.step, **stats, **loss_stats, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0]}
        stats.update({"time/train": now - t_train, "time/step": now - t0})
        run.log(stats)
        job.trackers.log(stats, state.step)
        bar.update(1)
        bar.set_postfix(reward=_number(stats["reward/mean"], 3), loss=_number(stats["loss"], 4))
        if cfg.train.gallery_every and state.step % cfg.train.gallery_every == 0:
            run.write_gallery(adapter, rollout, f"train_step{state.step:06d}", cfg.eval.gallery)
        if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.max_steps:
            checkpoint.save(state, run.checkpoints, comm, keep=cfg.train.keep_checkpoints)
    bar.close()

    # -- after --------------------------------------------------------------------------------------
    if cfg.eval.num_prompts > 0:
        with ema_weights(ema, params):
            run.write_eval("after", evaluate(adapter, reward_fns, weights, job.held_out, cfg, comm, run, "after"))
    comm.barrier()
    if comm.is_main:
        run.finish(job.primary)
    return run.result()


# ------------------------------------------------------------------------------- one rollout


def sample_global_batch(
    adapter: Adapter, batch: Sequence[Any], group_size: int, generator: torch.Generator, comm: Collective
) -> Rollout:
    """This process's rows of the global batch (B prompts x G samples), group ids = prompt index."""
    calls = batched_runs(local_runs(len(batch), group_size, comm.world_size, comm.rank))
    parts = []
    with torch.no_grad(), comm.autocast():
        for prompt_ids, count in calls:
            part = adapter.sample([batch[i] for i in prompt_ids], count, generator)
            part.group_id = torch.tensor(prompt_ids).repeat_interleave(count)  # [n] global prompt index
            parts.append(part)
    return Rollout.concat(parts)


def collect_rollout(
    adapter: Adapter,
    reward_fns: Mapping[str, Callable],
    weights: torch.Tensor,
    train_prompts: Sequence[Any],
    order: PromptOrder,
    generator: torch.Generator,
    cfg: Config,
    comm: Collective,
) -> tuple[Rollout, dict[str, Any]]:
    """Sample, score and compute advantages; with dynamic sampling, keep only informative groups.

    Returns this process's rows (with rewards, advantages, keep) and the step's reward metrics.
    """
    B, G = cfg.train.prompts_per_step, cfg.train.group_size
    rounds = cfg.train.dynamic_sampling_max_rounds if cfg.train.dynamic_sampling else 1
    t_sample = t_reward = 0.0
    local_parts, global_rewards, global_groups, owners = [], [], [], []
    kept_groups: list[int] = []
    stats: dict[str, Any] = {}
    for r in range(rounds):
        t0 = time.perf_counter()
        batch = [train_prompts[i] for i in order.take(B)]
        local = sample_global_batch(adapter, batch, G, generator, comm)
        local.group_id = local.group_id + r * B  # unique over rounds
        t1 = time.perf_counter()
        components, subs = score_rollout(reward_fns, local.samples, local.prompts)  # [n, K]
        local.rewards = {name: components[:, k] for k, name in enumerate(reward_fns)}
        all_rewards = comm.gather(components)  # [N, K]
        all_groups = comm.gather(local.group_id)  # [N]
        all_subs = {k: comm.gather(v) for k, v in subs.items()}
        t_sample += t1 - t0
        t_reward += time.perf_counter() - t1
        owner = torch.arange(comm.world_size).repeat_interleave(len(local))  # [N] process of each row
        total = weighted_sum(all_rewards, weights)  # [N]
        zero_std = zero_std_groups(total, all_groups)  # [groups], sorted ids
        informative = torch.unique(all_groups)[~zero_std]  # group ids
        if r == 0:
            stats = reward_stats(all_rewards, total, all_subs, list(reward_fns), zero_std)
        local_parts.append(local)
        global_rewards.append(all_rewards)
        global_groups.append(all_groups)
        owners.append(owner)
        kept_groups += informative.tolist()
        if not cfg.train.dynamic_sampling or len(kept_groups) >= B:
            break
    all_rewards, all_groups, owner = torch.cat(global_rewards), torch.cat(global_groups), torch.cat(owners)
    local = sampled = Rollout.concat(local_parts)
    if cfg.train.dynamic_sampling:
        stats["dynamic/rounds"] = len(local_parts)
        stats["dynamic/kept_groups"] = min(len(kept_groups), B)
        if kept_groups:  # keep the first B informative groups; with none, train on what was sampled
            chosen = torch.isin(all_groups, torch.tensor(kept_groups[:B]))  # [N_all]
            local = local.select(torch.nonzero(chosen[owner == comm.rank]).squeeze(-1))
            all_rewards, all_groups, owner = all_rewards[chosen], all_groups[chosen], owner[chosen]
    adv = compute_advantages(
        all_rewards,
        all_groups,
        weights,
        estimator=cfg.advantage.estimator,
        scale=cfg.advantage.scale,
        combine=cfg.advantage.combine,
        eps=cfg.advantage.eps,
        clip=cfg.advantage.clip,
        max_reward=cfg.advantage.max_reward,
    )
    mine = owner == comm.rank  # [N]
    local.advantages = adv.advantages[mine]
    local.keep = adv.keep[mine]
    padding = 0
    if comm.sharded:  # sharded weights: every process must run as many forwards as the others
        padding = int(comm.gather(torch.tensor([len(local)])).max()) - len(local)
        local = pad_rows(local, sampled, padding)
    stats.update(
        {
            "advantage/abs_mean": adv.advantages[adv.keep].abs().mean().item() if adv.keep.any() else 0.0,
            "rows": int(adv.keep.sum()),
            "padding_rows": padding,
            "time/sample": t_sample,
            "time/reward": t_reward,
        }
    )
    return local, stats


def pad_rows(local: Rollout, spare: Rollout, count: int) -> Rollout:
    """`local` with `count` rows of `spare` appended that weigh nothing (keep False, advantage 0).

    Dynamic sampling keeps a different number of rows on each process; with sharded weights each
    process must still make the same forward calls, so the shorter ones train on padding."""
    if count == 0:
        return local
    pad = spare.select(torch.arange(count) % len(spare))
    pad.advantages, pad.keep = torch.zeros(count), torch.zeros(count, dtype=torch.bool)
    return Rollout.concat([local, pad])


# ------------------------------------------------------------------------------- the update


def iteration_rollouts(
    adapter: Adapter, rollout: Rollout, num_iterations: int, generator: torch.Generator,
    autocast: Callable[[], Any] = nullcontext,
) -> list[Rollout]:
    """The rollout each inner iteration trains on, all built before the step's first update.

    With the optional adapter method `for_iteration(rollout, k, generator)` (for example d1's fresh prompt
    mask per iteration), iteration k trains on its result: same rows, rewards and advantages, its own
    old log-probs and extras, scored by the still-unchanged sampling policy. Otherwise every iteration
    trains on the rollout itself. The generator is the run's (saved in checkpoints): resume stays exact.
    """
    hook = getattr(adapter, "for_iteration", None)
    if hook is None:
        return [rollout] * num_iterations
    with torch.no_grad(), autocast():
        return [hook(rollout, k, generator) for k in range(num_iterations)]


def accumulate_gradients(
    adapter: Adapter,
    rollout: Rollout,
    loss_cfg: LossConfig,
    *,
    micro_batch_size: int,
    step_chunk: int | None = None,
    comm: Collective | None = None,
    autocast: Callable[[], Any] = nullcontext,
    padding_rows: int = 0,
) -> dict[str, float]:
    """Backpropagate one optimizer step's loss over micro-batches and chunks of decision steps.

    The loss is sum(weights * per-step loss) (see losses.aggregation_weights), so it is the same
    whatever micro_batch_size and step_chunk are (bnpo aside). Gradients accumulate into .grad;
    returns the loss value and statistics over the active steps. padding_rows: the last rows only
    keep this process's forwards in step with the others (pad_rows); they are not counted.
    With sharded weights every process scores the same chunks of steps (the union of theirs).
    """
    comm = comm or Collective()
    n, T = rollout.log_probs.shape
    keep = rollout.keep if rollout.keep is not None else torch.ones(n, dtype=torch.bool)
    advantages = rollout.advantages if rollout.advantages is not None else torch.zeros(n)
    mask = rollout.mask.bool() & keep[:, None]  # [n, T]
    micro_batch = torch.arange(n) // micro_batch_size  # [n]
    num_mb = int(micro_batch[-1]) + 1 if n else 0
    active = torch.zeros(num_mb, T).index_add_(0, micro_batch, mask.float()) > 0  # [num_mb, T] steps to score
    if comm.sharded:
        active = comm.gather(active[None].to(torch.uint8)).any(0)  # [num_mb, T] the same on every process
    weights = aggregation_weights(
        mask,
        loss_cfg.aggregation,
        micro_batch=micro_batch,
        num_rows_global=int(comm.sum(n - padding_rows)),
        num_steps_global=comm.sum(mask.sum().item()),
        world_size=comm.world_size,
    )  # [n, T]
    eps_high = loss_cfg.eps_high if loss_cfg.eps_high is not None else loss_cfg.eps_low
    totals = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "ratio": 0.0, "steps": 0.0}
    for start in range(0, n, micro_batch_size):
        rows = torch.arange(start, min(start + micro_batch_size, n))
        sub = rollout.select(rows)
        sub_mask = mask[rows]  # [m, T]
        steps_here = torch.nonzero(active[start // micro_batch_size]).squeeze(-1).tolist()
        if loss_cfg.ratio == "sequence" or not step_chunk:
            chunks = [steps_here] if steps_here else []
        else:
            chunks = [steps_here[i : i + step_chunk] for i in range(0, len(steps_here), step_chunk)]
        for steps in chunks:
            with autocast():
                scores = _as_step_scores(adapter.log_prob(sub, steps))
            device = scores.log_probs.device
            m = sub_mask[:, steps].to(device)  # [m, S]
            terms = policy_loss(
                scores.log_probs,  # [m, S]
                sub.log_probs[:, steps].to(device),
                advantages[rows].to(device),
                m,
                eps_low=loss_cfg.eps_low,
                eps_high=eps_high,
                level=loss_cfg.ratio,
            )
            per_step = terms.loss  # [m, S]
            kl = None
            if loss_cfg.beta > 0:
                with torch.no_grad(), adapter.reference(), autocast():
                    ref = _as_step_scores(adapter.log_prob(sub, steps))
                kl = _kl_to_reference(scores, ref, loss_cfg, adapter)  # [m, S]
                per_step = per_step + loss_cfg.beta * kl
            w = weights[rows][:, steps].to(device)  # [m, S]
            loss = (w * per_step).sum()
            loss.backward()
            with torch.no_grad():
                mf = m.float()
                totals["loss"] += loss.item()
                totals["clipped"] += (terms.clipped.float() * mf).sum().item()
                totals["ratio"] += (terms.ratio * mf).sum().item()
                totals["steps"] += mf.sum().item()
                if kl is not None:
                    totals["kl"] += (kl.detach() * mf).sum().item()
    steps_all = max(comm.sum(totals["steps"]), 1.0)
    return {
        "loss": comm.sum(totals["loss"]) / comm.world_size,
        "kl": comm.sum(totals["kl"]) / steps_all if loss_cfg.beta > 0 else None,
        "clip_frac": comm.sum(totals["clipped"]) / steps_all,
        "ratio/mean": comm.sum(totals["ratio"]) / steps_all,
        "active_steps": int(steps_all),
    }


def _as_step_scores(scores: torch.Tensor | StepScores) -> StepScores:
    if isinstance(scores, StepScores):
        return scores._replace(log_probs=scores.log_probs.float())
    return StepScores(scores.float())


def _kl_to_reference(scores: StepScores, ref: StepScores, loss_cfg: LossConfig, adapter: Adapter) -> torch.Tensor:
    """Per-step KL to the reference [m, S]: the Gaussian closed form where both sides give their means
    (scaled by loss.kl_convention), else the sample estimator loss.kl_estimator."""
    closed_form = loss_cfg.kl_closed_form and scores.mean is not None and ref.mean is not None
    if loss_cfg.kl_convention == "flow_grpo" and (not closed_form or scores.step_size is None):
        raise ConfigError(
            "loss.kl_convention=flow_grpo scales the closed-form Gaussian KL by each step's size, but "
            f"{type(adapter).__name__}.log_prob returns no Gaussian step sizes (StepScores.step_size): "
            "use loss.kl_convention=exact"
        )
    if closed_form:
        return gaussian_kl(
            scores.mean, ref.mean, scores.std, convention=loss_cfg.kl_convention, step_size=scores.step_size
        )  # [m, S]
    return kl_penalty(scores.log_probs, ref.log_probs.to(scores.log_probs.device), loss_cfg.kl_estimator)  # [m, S]


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
