"""The training loop: sample -> rewards -> advantages -> inner epochs of clipped policy updates.

    for step in range(max_steps):
        rollout = sample G outputs for each of B prompts        (adapter.sample, no grad)
        rewards = every reward on every sample, gathered over processes
        advantages = group-relative estimator on the gathered rewards
        for epoch in range(num_iterations):
            for micro_batch in rows:
                for chunk in decision steps:
                    loss = weighted clipped surrogate (+ beta * KL)   (adapter.log_prob)
                    loss.backward()                                   (memory: one chunk)
            average gradients over processes, clip, optimizer step
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from mmgrpo import checkpoint
from mmgrpo.advantages import compute_advantages, weighted_sum, zero_std_groups
from mmgrpo.config import Config, ConfigError, LossConfig, dump_config, load_config
from mmgrpo.data import PromptOrder, load_prompts, prompt_text
from mmgrpo.distributed import Collective, batched_runs, local_runs
from mmgrpo.losses import aggregation_weights, gaussian_kl, kl_penalty, policy_loss
from mmgrpo.protocols import StepScores
from mmgrpo.registry import ADAPTERS, expand_assets, missing_dependency, resolve
from mmgrpo.rollout import Rollout
from mmgrpo.scoring import build_rewards, paired_gain, reward_key, score_rollout

TIME_KEYS = ("time/sample", "time/reward", "time/train", "time/step")


@dataclass
class RunResult:
    out_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- the loop


def train(
    config: Config | dict | str | Path | None = None,
    *,
    adapter: Any | None = None,
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
    `resume` is a run directory: training continues exactly from its latest checkpoint.
    """
    from accelerate import Accelerator  # heavy import kept out of `import mmgrpo`

    if resume is not None:
        out = Path(resume)
        config = out / "config.yaml"
    cfg = load_config(config if config is not None else "toy", list(overrides))
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    _validate(cfg)
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    # accelerate sets up devices and processes; autocast is ours (Collective.autocast), because
    # accelerate's state is process-wide and would refuse a second train() with other precision.
    accelerator = Accelerator(cpu=cfg.train.cpu)
    comm = Collective(accelerator, mixed_precision=cfg.train.mixed_precision)
    device = accelerator.device
    torch.manual_seed(cfg.train.seed)  # once, before anything is built: model init is reproducible

    # -- what we train, on what, for what ------------------------------------------------------
    adapter = adapter if adapter is not None else build_adapter(cfg)
    if hasattr(adapter, "to"):
        adapter.to(device)
    reward_fns, weights = _rewards_and_weights(cfg, rewards)
    primary = cfg.eval.primary or next(iter(reward_fns))
    if primary not in reward_fns:
        raise ConfigError(f"eval.primary '{primary}' is not one of the rewards: {', '.join(reward_fns)}")
    if prompts is None:
        train_prompts, held_out = load_prompts(cfg.data, cfg.train.seed)
    else:
        train_prompts, held_out = list(prompts), []
    held_out = list(eval_prompts) if eval_prompts is not None else held_out
    if cfg.loss.ratio == "sequence" and not getattr(adapter, "scores_all_steps_at_once", False):
        raise ConfigError(
            "loss.ratio=sequence (GSPO) needs every decision step scored in one forward; "
            f"{type(adapter).__name__} scores steps separately: use loss.ratio=token"
        )

    params = _named_parameters(adapter)
    optimizer = torch.optim.AdamW(
        params.values(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    iterations = cfg.train.max_steps * cfg.train.num_iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, iterations))
    ema = checkpoint.EMA(params, cfg.optim.ema_decay, cfg.optim.ema_every) if cfg.optim.ema_decay else None
    order = PromptOrder(len(train_prompts), cfg.train.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + 7919 * comm.rank)

    # -- run directory: fresh or resumed ---------------------------------------------------------
    run = RunDir(Path(out) if out is not None else _default_out(cfg), comm)
    step = 0
    if resume is not None:
        step = _resume(run, params, optimizer, scheduler, ema, order, generator, adapter, comm)
    else:
        run.start(cfg)
        if cfg.eval.num_prompts > 0:
            run.write_eval("before", evaluate(adapter, reward_fns, weights, held_out, cfg, comm, run, "before"))

    # -- training -------------------------------------------------------------------------------
    bar = _progress(cfg.train.max_steps, step, progress and comm.is_main)
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        rollout, stats = collect_rollout(adapter, reward_fns, weights, train_prompts, order, generator, cfg, comm)
        t_train = time.perf_counter()
        for _ in range(cfg.train.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            loss_stats = accumulate_gradients(
                adapter,
                rollout,
                cfg.loss,
                micro_batch_size=cfg.train.micro_batch_size,
                step_chunk=cfg.train.step_chunk,
                comm=comm,
                autocast=comm.autocast,
            )
            comm.mean_gradients(list(params.values()))
            grad_norm = _clip_gradients(params, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(params, scheduler.last_epoch)
        step += 1
        now = time.perf_counter()
        stats = {"step": step, **stats, **loss_stats, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0]}
        stats.update({"time/train": now - t_train, "time/step": now - t0})
        run.log(stats)
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", loss=f"{stats['loss']:.4f}")
        if cfg.train.gallery_every and step % cfg.train.gallery_every == 0:
            run.write_gallery(adapter, rollout, f"train_step{step:06d}", cfg.eval.gallery)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
            run.save_checkpoint(step, params, optimizer, scheduler, ema, order, generator, adapter, cfg)
    bar.close()

    # -- after --------------------------------------------------------------------------------------
    if cfg.eval.num_prompts > 0:
        with _ema_weights(ema, params):
            run.write_eval("after", evaluate(adapter, reward_fns, weights, held_out, cfg, comm, run, "after"))
    comm.barrier()
    if comm.is_main:
        run.finish(primary)
    return RunResult(run.path, run.read_metrics(), run.read_eval())


# ------------------------------------------------------------------------------- one rollout


def sample_global_batch(
    adapter: Any, batch: Sequence[Any], group_size: int, generator: torch.Generator, comm: Collective
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
    adapter: Any,
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
            stats = _reward_stats(all_rewards, total, all_subs, list(reward_fns), zero_std)
        local_parts.append(local)
        global_rewards.append(all_rewards)
        global_groups.append(all_groups)
        owners.append(owner)
        kept_groups += informative.tolist()
        if not cfg.train.dynamic_sampling or len(kept_groups) >= B:
            break
    all_rewards, all_groups, owner = torch.cat(global_rewards), torch.cat(global_groups), torch.cat(owners)
    local = Rollout.concat(local_parts)
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
    stats.update(
        {
            "advantage/abs_mean": adv.advantages[adv.keep].abs().mean().item() if adv.keep.any() else 0.0,
            "rows": int(adv.keep.sum()),
            "time/sample": t_sample,
            "time/reward": t_reward,
        }
    )
    return local, stats


def _reward_stats(
    rewards: torch.Tensor, total: torch.Tensor, subs: dict[str, torch.Tensor], names: list[str], zero_std: torch.Tensor
) -> dict[str, Any]:
    stats = {
        "reward/mean": _nanmean(total),
        "reward/std": _nanstd(total),
        "reward/unscored": int(torch.isnan(total).sum()),
        "frac_zero_std": zero_std.float().mean().item(),
    }
    for k, name in enumerate(names):
        stats[f"reward/{name}/mean"] = _nanmean(rewards[:, k])
    for name, values in subs.items():
        stats[f"reward/{name}/mean"] = _nanmean(values)
    return stats


def _nanmean(x: torch.Tensor) -> float | None:
    v = x[~torch.isnan(x)]
    return v.mean().item() if v.numel() else None


def _nanstd(x: torch.Tensor) -> float | None:
    v = x[~torch.isnan(x)]
    return v.std().item() if v.numel() > 1 else 0.0


# ------------------------------------------------------------------------------- the update


def accumulate_gradients(
    adapter: Any,
    rollout: Rollout,
    loss_cfg: LossConfig,
    *,
    micro_batch_size: int,
    step_chunk: int | None = None,
    comm: Collective | None = None,
    autocast: Callable[[], Any] = nullcontext,
) -> dict[str, float]:
    """Backpropagate one optimizer step's loss over micro-batches and chunks of decision steps.

    The loss is sum(weights * per-step loss) (see losses.aggregation_weights), so it is the same
    whatever micro_batch_size and step_chunk are (bnpo aside). Gradients accumulate into .grad;
    returns the loss value and statistics over the active steps.
    """
    comm = comm or Collective()
    n, T = rollout.log_probs.shape
    keep = rollout.keep if rollout.keep is not None else torch.ones(n, dtype=torch.bool)
    advantages = rollout.advantages if rollout.advantages is not None else torch.zeros(n)
    mask = rollout.mask.bool() & keep[:, None]  # [n, T]
    micro_batch = torch.arange(n) // micro_batch_size  # [n]
    weights = aggregation_weights(
        mask,
        loss_cfg.aggregation,
        micro_batch=micro_batch,
        num_rows_global=int(comm.sum(n)),
        num_steps_global=comm.sum(mask.sum().item()),
        world_size=comm.world_size,
    )  # [n, T]
    eps_high = loss_cfg.eps_high if loss_cfg.eps_high is not None else loss_cfg.eps_low
    totals = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "ratio": 0.0, "steps": 0.0}
    for start in range(0, n, micro_batch_size):
        rows = torch.arange(start, min(start + micro_batch_size, n))
        sub = rollout.select(rows)
        sub_mask = mask[rows]  # [m, T]
        active = torch.nonzero(sub_mask.any(0)).squeeze(-1).tolist()  # steps any row here trains
        if loss_cfg.ratio == "sequence" or not step_chunk:
            chunks = [active] if active else []
        else:
            chunks = [active[i : i + step_chunk] for i in range(0, len(active), step_chunk)]
        for steps in chunks:
            with autocast():
                scores = adapter.log_prob(sub, steps)
            logp, mean, std = _unpack(scores)  # [m, S]
            device = logp.device
            m = sub_mask[:, steps].to(device)  # [m, S]
            terms = policy_loss(
                logp,
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
                    ref = adapter.log_prob(sub, steps)
                ref_logp, ref_mean, _ = _unpack(ref)
                if loss_cfg.kl_closed_form and mean is not None and ref_mean is not None:
                    kl = gaussian_kl(mean, ref_mean, std)  # [m, S]
                else:
                    kl = kl_penalty(logp, ref_logp.to(device), loss_cfg.kl_estimator)  # [m, S]
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


def _unpack(scores: torch.Tensor | StepScores) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if isinstance(scores, StepScores):
        return scores.log_probs.float(), scores.mean, scores.std
    return scores.float(), None, None


def _clip_gradients(params: dict[str, torch.nn.Parameter], max_norm: float | None) -> float:
    grads = [p for p in params.values() if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm else math.inf)
    return float(norm)


# ------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    adapter: Any,
    reward_fns: Mapping[str, Callable],
    weights: torch.Tensor,
    prompts: Sequence[Any],
    cfg: Config,
    comm: Collective,
    run: "RunDir | None" = None,
    tag: str = "eval",
) -> dict[str, Any]:
    """Mean rewards on the first eval.num_prompts held-out prompts with a fixed seed."""
    prompts = list(prompts)[: cfg.eval.num_prompts]
    if not prompts:
        raise ConfigError(
            "no held-out prompts to evaluate on: pass eval_prompts=..., set data.eval_source, or set eval.num_prompts=0"
        )
    result: dict[str, Any] = {}
    if comm.is_main:
        device = comm.accelerator.device if comm.accelerator else torch.device("cpu")
        generator = torch.Generator(device=device).manual_seed(cfg.eval.seed)
        parts = []
        for i in range(0, len(prompts), cfg.eval.batch_size):
            batch = prompts[i : i + cfg.eval.batch_size]
            with comm.autocast():
                parts.append(adapter.sample(batch, cfg.eval.samples_per_prompt, generator, evaluate=True))
        rollout = Rollout.concat(parts)
        components, subs = score_rollout(reward_fns, rollout.samples, rollout.prompts)
        result = {"num_samples": len(rollout), "reward/mean": _nanmean(weighted_sum(components, weights))}
        for k, name in enumerate(reward_fns):
            result[f"reward/{name}/mean"] = _nanmean(components[:, k])
        for name, values in subs.items():
            result[f"reward/{name}/mean"] = _nanmean(values)
        rollout.rewards = {name: components[:, k] for k, name in enumerate(reward_fns)}
        # each reward per sample (None: unscored), so finish() can pair the before and after evaluations
        result["per_sample"] = {
            name: [None if math.isnan(x) else x for x in values.tolist()] for name, values in rollout.rewards.items()
        }
        if run is not None:
            run.write_gallery(adapter, rollout, tag, cfg.eval.gallery)
    comm.barrier()
    return result


# ------------------------------------------------------------------------------- run directory


class RunDir:
    """config.yaml, metrics.jsonl, eval.json, samples/, checkpoints/ of one run (main process writes)."""

    def __init__(self, path: Path, comm: Collective) -> None:
        self.path, self.comm = path, comm
        self.metrics_path = path / "metrics.jsonl"
        self.eval_path = path / "eval.json"
        self.checkpoints = path / "checkpoints"
        self.samples = path / "samples"

    def start(self, cfg: Config) -> None:
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
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after `step` (they belong to the run that did not reach a checkpoint)."""
        if self.comm.is_main:
            kept = [m for m in self.read_metrics() if m["step"] <= step]
            self.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))

    def read_eval(self) -> dict[str, Any]:
        return json.loads(self.eval_path.read_text()) if self.eval_path.is_file() else {}

    def write_eval(self, tag: str, result: dict[str, Any]) -> None:
        if self.comm.is_main:
            data = self.read_eval()
            data[tag] = result
            checkpoint.atomic_write_text(self.eval_path, json.dumps(data, indent=2) + "\n")

    def write_gallery(self, adapter: Any, rollout: Rollout, tag: str, count: int) -> None:
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

    def save_checkpoint(self, step, params, optimizer, scheduler, ema, order, generator, adapter, cfg) -> None:
        stage = checkpoint.staging_dir(self.checkpoints, step)
        if self.comm.is_main:
            shutil.rmtree(stage, ignore_errors=True)  # left over by a crash mid-write
            stage.mkdir(parents=True)
        self.comm.barrier()
        checkpoint.write_rank(stage, self.comm.rank, generator)
        if self.comm.is_main:
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "order": order.state_dict(),
                "ema_updates": ema.updates if ema else 0,
                "world_size": self.comm.world_size,
            }
            sampler_state = adapter.sampler_state() if hasattr(adapter, "sampler_state") else None
            checkpoint.write_main(
                stage, params=params, ema=ema.shadow if ema else None, trainer_state=state, adapter_state=sampler_state
            )
        self.comm.barrier()
        if self.comm.is_main:
            checkpoint.publish(self.checkpoints, step, cfg.train.keep_checkpoints)
        self.comm.barrier()

    def finish(self, primary: str) -> None:
        from mmgrpo.plotting import plot_metrics

        plot_metrics(self.metrics_path, self.path / "rewards.png")
        ev = self.read_eval()
        key = f"reward/{primary}/mean"
        if "before" in ev and "after" in ev and ev["before"].get(key) is not None:
            before, after = ev["before"][key], ev["after"][key]
            rel = (after - before) / abs(before) if before else math.inf
            ev["primary"] = {"reward": primary, "before": before, "after": after, "relative_gain": rel}
            samples = [ev[tag].get("per_sample", {}).get(primary) for tag in ("before", "after")]
            # pairing needs both evaluations per sample, of the same length (a run resumed from an older
            # version has none for "before"; one resumed with another eval.num_prompts has other lengths)
            paired = paired_gain(*samples) if all(samples) and len(samples[0]) == len(samples[1]) else None
            ev["primary"]["paired"] = paired
            checkpoint.atomic_write_text(self.eval_path, json.dumps(ev, indent=2) + "\n")
            ci = paired["relative_ci95"] if paired else None
            ci_text = f", 95% CI {ci[0]:+.1%} to {ci[1]:+.1%} over {paired['n']} paired samples" if ci else ""
            print(f"held-out {primary}: {before:.4f} -> {after:.4f} ({rel:+.1%}{ci_text}); run saved in {self.path}")


def _resume(run, params, optimizer, scheduler, ema, order, generator, adapter, comm) -> int:
    path = checkpoint.latest(run.checkpoints)
    if path is None:
        raise ConfigError(f"nothing to resume: '{run.checkpoints}' has no checkpoint")
    state = checkpoint.load(path, comm.rank)
    if state["world_size"] != comm.world_size:
        raise ConfigError(
            f"checkpoint {path} was written by {state['world_size']} processes; resume with the same number"
        )
    missing = set(params) ^ set(state["params"])
    if missing:
        raise ConfigError(f"checkpoint {path} does not match the adapter's trainable weights: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name].to(p.device, p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    order.load_state_dict(state["order"])
    generator.set_state(state["generator"])
    if ema is not None and state["ema"] is not None:
        ema.shadow = {k: v.float() for k, v in state["ema"].items()}
        ema.updates = state["ema_updates"]
    if state["adapter"] is not None and hasattr(adapter, "load_sampler_state"):
        adapter.load_sampler_state(state["adapter"])
    checkpoint.restore_global_rng(state["global_rng"])
    run.truncate_metrics(state["step"])
    return state["step"]


# ------------------------------------------------------------------------------- helpers


def build_adapter(cfg: Config) -> Any:
    try:
        cls = resolve(cfg.pipeline.name, ADAPTERS, "pipeline")
        return cls(**expand_assets(cfg.pipeline.kwargs))
    except ModuleNotFoundError as e:
        raise missing_dependency("pipeline", cfg.pipeline.name, e) from None
    except TypeError as e:
        raise ConfigError(f"pipeline '{cfg.pipeline.name}': bad pipeline.kwargs ({e})") from None


def _rewards_and_weights(cfg: Config, rewards: Any) -> tuple[dict[str, Callable], torch.Tensor]:
    if rewards is None:
        fns = build_rewards(cfg.rewards)
    elif callable(rewards) and not isinstance(rewards, Mapping):
        fns = {getattr(rewards, "__name__", type(rewards).__name__): rewards}
    elif isinstance(rewards, Mapping):
        fns = dict(rewards)
    else:
        fns = {getattr(f, "__name__", type(f).__name__): f for f in rewards}
    if not fns:
        raise ConfigError("no rewards: list at least one under 'rewards'")
    by_name = {reward_key(r.name): r.weight for r in cfg.rewards}
    weights = torch.tensor([by_name.get(name, 1.0) for name in fns], dtype=torch.float32)
    return fns, weights


def _named_parameters(adapter: Any) -> dict[str, torch.nn.Parameter]:
    params = adapter.trainable_parameters()
    if not isinstance(params, Mapping):
        params = {str(i): p for i, p in enumerate(params)}
    params = {k: p for k, p in params.items() if p.requires_grad}
    if not params:
        raise ConfigError(f"{type(adapter).__name__}.trainable_parameters() returned no trainable weights")
    return params


def _validate(cfg: Config) -> None:
    t = cfg.train
    for key in ("max_steps", "prompts_per_step", "group_size", "micro_batch_size", "num_iterations", "checkpoint_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if t.group_size < 2 and cfg.advantage.estimator != "ngrpo":
        raise ConfigError("train.group_size must be at least 2: group-relative advantages of one sample are 0")
    if cfg.loss.ratio == "sequence" and t.step_chunk:
        raise ConfigError("loss.ratio=sequence (GSPO) scores all steps at once: remove train.step_chunk")
    if t.num_threads is not None and t.num_threads < 1:
        raise ConfigError(f"train.num_threads must be at least 1 (or null for torch's default), got {t.num_threads}")
    if t.step_chunk is not None and t.step_chunk < 1:
        raise ConfigError(f"train.step_chunk must be at least 1 (or null for all steps), got {t.step_chunk}")
    if cfg.loss.eps_low <= 0 or (cfg.loss.eps_high is not None and cfg.loss.eps_high <= 0):
        raise ConfigError("loss.eps_low and loss.eps_high must be > 0")


def _schedule(cfg: Config, total: int) -> Callable[[int], float]:
    warmup, kind = cfg.optim.warmup_steps, cfg.optim.schedule

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def _default_out(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.modality}-{time.strftime('%Y%m%d-%H%M%S')}"


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


class _ema_weights:
    """Context: the EMA weights are live inside (no-op without EMA)."""

    def __init__(self, ema: checkpoint.EMA | None, params: dict[str, torch.nn.Parameter]) -> None:
        self.ema, self.params = ema, params

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.swap(self.params)

    def __exit__(self, *exc: Any) -> None:
        if self.ema is not None:
            self.ema.swap(self.params)


def _json_float(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v
