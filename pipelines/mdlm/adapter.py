"""MaskedDiffusionAdapter: GRPO over masked-diffusion LMs (LLaDA-style): d1, elbo, bgpo and trajectory estimators.

The model is any bidirectional module mapping input_ids [n, L] to logits [n, L, V] (`.logits` or the
first output), plus a mask token id: a transformers masked LM from a folder (the embedded default is a
BertForMaskedLM), a remote-code model (LLaDA, Dream: trust_remote_code=true; Dream predicts token i at
position i-1: shift_logits=true), or a built nn.Module with its tokenizer.

Sampling runs `sampler.denoise` (blocks, steps, Gumbel-max in float64 through the run's generator,
remasking). Rows whose prompts have the same token length share one forward and nothing is padded, so
every row sees exactly the canvas it would see alone, whatever else is in the batch (no padding, no
position ids needed from the model). What one decision step is depends on `estimator` (estimators.py):

    d1    T = gen_length tokens; columns past the first EOS do not count (mask). Each inner iteration
          draws its own prompt mask (`for_iteration`); old and new log-probs of an iteration share it.
    elbo  T = mc_samples MC terms, masks drawn at sampling and kept in extras, so the policy, the
          reference and every iteration score the same masked canvases (LLaDA 1.5's VRPO "antithetic
          sampling": shared timesteps and masks). `antithetic=true` also pairs the MC samples with
          complementary mask levels (estimators.draw_antithetic_elbo_masks; elbo and bgpo). With loss.ratio=sequence the
          ratio is exp(ELBO - ELBO_old), the plain ELBO objective (all samples in one graph).
    bgpo  T = mc_samples, BGPO's bound (estimators.bgpo_log_ratio): old log-probs 0, the ELBO terms of
          sampling kept in extras (elbo_old); the token-level loss backpropagates one MC sample per
          step chunk (train.step_chunk=1: memory independent of mc_samples). Reads each row's
          advantage sign (rows without advantages take the A >= 0 form).
    trajectory  (TraceRL) T = sampler steps / shrinkage: decision j scores the tokens committed in steps
          [j*shrinkage, (j+1)*shrinkage) given the canvas the sampler saw at step j*shrinkage, at the
          sampling temperature (so the on-policy ratio is exact); extras temperature [N].

Co-GRPO (`learn_schedule=true`, schedule.py): each row draws its own per-step temperature and unmask fraction
from a learnable schedule; one more decision step per sampler step (the draw's log-density, appended after the
estimator's T columns) trains the schedule with the same clipped loss; its parameters are trainable weights
(schedule.*), so they are checkpointed; evaluation samples at the schedule's means. Extras schedule_log_temperature,
schedule_fraction_logit [N, S] and schedule_active [N, S] bool; samples also carry each step's "temperature" and
"fraction". Not with the trajectory estimator (its per-step scoring temperature would follow the draw) or threshold.

Rollout extras: prompt_ids (list of [P_i] long), completion_ids [N, Lc], commit_step [N, Lc] (the
sampler step at which each token was committed), d1_prompt_mask (list of [P_i] bool) or elbo_masks
[N, K, Lc] bool. Samples are dicts {"text", "tokens", "steps", "tokens_per_forward"}: the text up to the first
EOS, each completion token (EOS included, padding after it left out) with its commit step, and gen_length over
the forwards the row needed (the `tokens_per_forward` reward); galleries write them
inline (samples/<tag>.jsonl), and the demo colours each token by its step.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mmgrpo.pipelines.mdlm.estimators import (
    bgpo_log_ratio,
    completion_mask,
    d1_canvas,
    draw_antithetic_elbo_masks,
    draw_elbo_masks,
    draw_prompt_mask,
    elbo_canvas,
    elbo_terms,
    token_log_probs,
    trajectory_canvas,
    trajectory_terms,
)
from mmgrpo.pipelines.mdlm.options import ESTIMATORS, LORA_TARGETS, MDLMOptions, load_model, token_id
from mmgrpo.pipelines.mdlm.sampler import block_schedule, denoise
from mmgrpo.pipelines.mdlm.schedule import LearnedSchedule
from mmgrpo.pipelines.toolkit import Finetuning, TunedAdapter, options_from, prompt_text
from mmgrpo.rollout import Rollout

__all__ = ["ESTIMATORS", "LORA_TARGETS", "MaskedDiffusionAdapter", "MDLMOptions"]


class MaskedDiffusionAdapter(TunedAdapter):
    """The policy: a masked-diffusion LM unmasking a completion canvas. See the module docstring."""

    Options = MDLMOptions

    def __init__(self, model: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        self.options = options = options_from(MDLMOptions, {"model": model, "tokenizer": tokenizer, **kwargs},
                                              "MaskedDiffusionAdapter")  # fmt: skip
        model, self.tokenizer = load_model(options)
        if options.device is not None:
            model.to(options.device)
        self.mask_id = token_id(options.mask_token_id, self.tokenizer, "mask_token_id", "mask")
        self.eos_id = token_id(options.eos_token_id, self.tokenizer, "eos_token_id", "eos")
        specials = set(getattr(self.tokenizer, "all_special_ids", []) or []) | {self.mask_id}
        self.banned = sorted(specials - {self.eos_id})  # never sampled: [MASK], padding, [UNK], ...
        self.tuning = Finetuning(
            model, options.finetune, lora_rank=options.lora_rank, lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout, lora_target_modules=options.lora_target_modules,
            keep_reference=options.keep_reference,
        )  # fmt: skip
        plan = block_schedule(options.gen_length, options.block_length or options.gen_length, options.steps)
        self.schedule = LearnedSchedule(plan, options.temperature, options.schedule_std, options.schedule_lr_scale
                                        ).to(self.device) if options.learn_schedule else None  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The model's trainable weights, and the learned schedule's means (schedule.*) when it is on."""
        schedule = {} if self.schedule is None else {f"schedule.{k}": p for k, p in self.schedule.named_parameters()}
        return {**self.tuning.trainable_parameters(), **schedule}

    @contextmanager
    def reference(self) -> Iterator["MaskedDiffusionAdapter"]:
        """The frozen reference: the model's (LoRA off, or the frozen copy) and the starting schedule."""
        with self.tuning.reference(), (self.schedule.reference() if self.schedule is not None else nullcontext()):
            yield self

    def _moved(self, device: torch.device) -> None:
        if self.schedule is not None:
            self.schedule.to(device)

    @property
    def scores_all_steps_at_once(self) -> bool:
        """d1 and elbo score every step in one call (a sequence-level ratio works); bgpo's bound is per sample."""
        return self.options.estimator != "bgpo"

    def activation_shape(self, prompts: Sequence[Any] = ()) -> Any:
        """The canvas of a training forward for mmgrpo.memory: the longest of `prompts` plus gen_length tokens,
        the model's width and depth, the forwards a row's decisions take (d1: one; elbo, bgpo: one per MC sample;
        trajectory: one per decision) and the fp32 log-softmax over the vocabulary at each completion position.
        None when the model's config names no transformer dims."""
        from mmgrpo.memory import ActivationShape, transformer_dims

        config = getattr(self.model, "config", None)
        dims = transformer_dims(config)
        if dims is None:
            return None
        o = self.options
        prompt = max((len(self.encode(p, i)) for i, p in enumerate(prompts)), default=0)
        forwards = {"d1": 1, "elbo": o.mc_samples, "bgpo": o.mc_samples}.get(o.estimator, -(-o.steps // o.shrinkage))
        vocab = getattr(config, "vocab_size", None) or 0
        return ActivationShape(prompt + o.gen_length, *dims, forwards=forwards, vocab=vocab, logit_tokens=o.gen_length)

    # ------------------------------------------------------------------ the model
    def logits(self, canvas: torch.Tensor) -> torch.Tensor:
        """Logits [n, L, V] of the running model (the reference inside reference()), banned tokens at -inf."""
        out = self.tuning.active(input_ids=canvas.to(self.device))
        logits = out.logits if hasattr(out, "logits") else out[0]  # [n, L, V]
        if self.options.shift_logits:  # Dream: position i-1 predicts token i
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if self.banned:
            logits = logits.clone()
            logits[..., self.banned] = -torch.inf
        return logits

    def encode(self, prompt: Any, index: int | None = None) -> torch.Tensor:
        """Token ids [P] of one prompt item's text (no special tokens added)."""
        text = prompt_text(prompt, index)
        if self.options.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)  # fmt: skip
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {index} has no tokens: give a non-empty prompt")
        return torch.tensor(ids, dtype=torch.long)

    def check_prompts(self, prompts: Sequence[Any]) -> None:
        for i, prompt in enumerate(prompts):
            self.encode(prompt, i)

    # ------------------------------------------------------------------ protocol: sample
    @torch.no_grad()
    def sample(
        self, prompts: Sequence[Any], group_size: int, generator: torch.Generator, *, evaluate: bool = False
    ) -> Rollout:
        """G completions per prompt (rows prompt-major), then the estimator's log-probs under the sampling policy."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        o = self.options
        steps = (o.eval_steps or o.steps) if evaluate else o.steps
        temperature = o.eval_temperature if evaluate and o.eval_temperature is not None else o.temperature
        G, Lc = group_size, o.gen_length
        encoded = [self.encode(p, i) for i, p in enumerate(prompts)]
        rows = [b for b in range(len(prompts)) for _ in range(G)]
        completion = torch.empty(len(rows), Lc, dtype=torch.long)  # [N, Lc]
        commit_step = torch.empty(len(rows), Lc, dtype=torch.long)  # [N, Lc]
        forwards = torch.empty(len(rows), dtype=torch.long)  # [N]
        draws, plan = self._schedule_plan(len(rows), generator, evaluate)
        active = torch.zeros(len(rows), 0 if plan is None else self.schedule.slots, dtype=torch.bool)  # [N, S]
        groups = _by_length([encoded[b] for b in rows])
        for _ in range(self._groups_missing(len(groups))):  # sharded: as many denoising runs as every process
            denoise(self.logits, self._idle_canvas(), Lc, self.mask_id, torch.Generator(generator.device),
                    block_length=o.block_length, steps=steps, remasking=o.remasking, threshold=o.threshold,
                    plan=_rows_of(plan, [0]), synced=True)  # fmt: skip
        for length, members in groups.items():
            prompt = torch.stack([encoded[rows[r]] for r in members])  # [m, P]
            canvas = torch.cat([prompt, torch.full((len(members), Lc), self.mask_id)], dim=1)  # [m, P + Lc]
            done = denoise(self.logits, canvas.to(self.device), Lc, self.mask_id, generator,
                           block_length=o.block_length, steps=steps, temperature=temperature,
                           remasking=o.remasking, threshold=o.threshold, plan=_rows_of(plan, members),
                           synced=self.tuning.sharded)  # fmt: skip
            if done.active is not None:
                active[members] = done.active.cpu()
            completion[members] = done.canvas[:, length:].cpu()
            commit_step[members] = done.commit_step.cpu()
            forwards[members] = done.row_forwards.cpu()
        extras: dict[str, Any] = {"prompt_ids": [encoded[b] for b in rows], "completion_ids": completion,
                                  "commit_step": commit_step}  # fmt: skip
        if o.estimator == "d1":
            mask = completion_mask(completion, self.eos_id)  # [N, Lc]
            extras["d1_prompt_mask"] = self._prompt_masks(extras["prompt_ids"], generator)
        elif o.estimator == "trajectory":
            decisions = -(-steps // o.shrinkage)  # ceil: the last decision may merge fewer steps
            mask = (commit_step[:, None, :] // o.shrinkage == torch.arange(decisions)[None, :, None]).any(-1)  # [N, T]
            extras["temperature"] = torch.full((len(rows),), float(temperature))  # [N]
        else:
            mask = torch.ones(len(rows), o.mc_samples, dtype=torch.bool)  # [N, K]
            draw = draw_antithetic_elbo_masks if o.antithetic else draw_elbo_masks
            extras["elbo_masks"] = draw(len(rows), o.mc_samples, Lc, generator)  # [N, K, Lc]
            if o.estimator == "bgpo":
                extras["elbo_old"] = torch.zeros(mask.shape)  # [N, K], filled below
        if draws is not None:  # Co-GRPO: the schedule's draws are the row's last decision steps
            extras.update(schedule_log_temperature=draws[0].cpu(), schedule_fraction_logit=draws[1].cpu(),
                          schedule_active=active)  # fmt: skip
        mask = torch.cat([mask, active], dim=1)  # [N, T + S]
        records = [self._sample_record(completion[r], commit_step[r], int(forwards[r])) for r in range(len(rows))]
        if plan is not None:  # each step's temperature and unmask fraction, beside the tokens and their steps
            temperatures = torch.as_tensor(plan.temperature, dtype=torch.float32).expand(plan.fraction.shape)  # [N, S]
            for r, record in enumerate(records):
                record.update(temperature=temperatures[r].tolist(), fraction=plan.fraction[r].tolist())
        rollout = Rollout(
            group_id=torch.arange(len(prompts)).repeat_interleave(G),  # [N]
            prompts=[prompts[b] for b in rows],
            samples=records,
            log_probs=torch.zeros(mask.shape),  # [N, T] filled below
            mask=mask,
            extras=extras,
        )
        if evaluate:  # evaluation reads samples only: no scoring
            return rollout
        if o.estimator == "bgpo":  # the bound's old log-probs are 0; the sampling policy's ELBO terms kept
            rollout.extras["elbo_old"] = self._elbo(rollout).float().cpu()  # [N, K]
        rollout.log_probs = self.log_prob(rollout).float().cpu()  # [N, T]
        return rollout

    def _schedule_plan(self, rows: int, generator: torch.Generator, evaluate: bool) -> tuple[Any, Any]:
        """(draws, StepPlan) of the learned schedule for `rows` rows: fresh draws when training, the means when
        evaluating (at eval_temperature when set); (None, None) without one."""
        if self.schedule is None:
            return None, None
        if evaluate:
            return None, self.schedule.median_plan(rows, self.options.eval_temperature)
        draws = self.schedule.draw(rows, generator)  # [N, S] x2
        return draws, self.schedule.plan(*draws)

    def _prompt_masks(self, prompt_ids: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """d1: one fresh prompt mask per row, drawn in row order."""
        return [draw_prompt_mask(len(p), 1, self.options.prompt_mask_prob, generator)[0] for p in prompt_ids]

    def _sample_record(self, completion: torch.Tensor, commit_step: torch.Tensor, forwards: int) -> dict[str, Any]:
        """{"text": up to the first EOS, "tokens"/"steps": each token up to and including it, with its step,
        "tokens_per_forward": gen_length / the forwards this row needed}."""
        ids = completion.tolist()
        end = ids.index(self.eos_id) if self.eos_id in ids else len(ids)
        kept = ids[: end + 1]
        return {"text": self.tokenizer.decode(ids[:end], skip_special_tokens=True),
                "tokens": self.tokenizer.convert_ids_to_tokens(kept), "steps": commit_step[: len(kept)].tolist(),
                "tokens_per_forward": len(ids) / max(forwards, 1)}

    def export_pretrained(self, folder: str | Path) -> list[Path]:
        """The trained model as a from_pretrained folder (LoRA merged), with its tokenizer beside it."""
        written = self.tuning.export_pretrained(folder)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(folder))
        return written

    # ------------------------------------------------------------------ protocol: log_prob
    def log_prob(self, rollout: Rollout, steps: Sequence[int] | None = None) -> torch.Tensor:
        """The estimator's per-step log-probs [n, len(steps)] fp32 under the current weights (with gradients)."""
        steps = list(range(rollout.num_steps)) if steps is None else [int(s) for s in steps]
        if self.schedule is None:
            return self._estimator_log_prob(rollout, steps)
        first = rollout.num_steps - self.schedule.slots  # the schedule's columns come after the estimator's
        own, slots = [s for s in steps if s < first], [s - first for s in steps if s >= first]
        extras = rollout.extras
        scheduled = self.schedule.log_prob(extras["schedule_log_temperature"], extras["schedule_fraction_logit"],
                                           extras["schedule_active"], slots)  # [n, len(slots)]
        if not own:
            return scheduled
        columns = torch.cat([self._estimator_log_prob(rollout, own), scheduled], dim=1)  # [n, len(steps)]
        order = [i for i, s in enumerate(steps) if s < first] + [i for i, s in enumerate(steps) if s >= first]
        return columns[:, torch.tensor(order).argsort().to(columns.device)]

    def _estimator_log_prob(self, rollout: Rollout, steps: list[int]) -> torch.Tensor:
        """The estimator's log-probs [n, len(steps)] of its own decision steps `steps`."""
        if self.options.estimator == "d1":
            return self._d1(rollout, steps)
        if self.options.estimator == "trajectory":
            return self._trajectory(rollout, steps)
        elbo = self._elbo(rollout, steps)  # [n, S]
        if self.options.estimator == "elbo":
            return elbo
        advantages = rollout.advantages if rollout.advantages is not None else torch.zeros(len(rollout))
        return bgpo_log_ratio(elbo, rollout.extras["elbo_old"][:, steps], advantages >= 0)  # [n, S]

    def _d1(self, rollout: Rollout, steps: list[int]) -> torch.Tensor:
        """d1: log p(token | completion masked, prompt partly masked) of each completion token in `steps`."""
        extras = rollout.extras
        Lc = extras["completion_ids"].shape[1]
        parts, groups = [], _by_length(extras["prompt_ids"])
        for length, members in groups.items():
            prompt = torch.stack([extras["prompt_ids"][r] for r in members]).to(self.device)  # [m, P]
            target = extras["completion_ids"][members].to(self.device)  # [m, Lc]
            prompt_mask = torch.stack([extras["d1_prompt_mask"][r] for r in members])  # [m, P]
            logits = self.logits(d1_canvas(prompt, prompt_mask, Lc, self.mask_id))[:, length:]  # [m, Lc, V]
            parts.append((members, token_log_probs(logits, target)[:, steps]))  # [m, S]
        return self._rows_in_order(parts, len(rollout), len(steps), self._idle_forwards(len(groups)))

    def _elbo(self, rollout: Rollout, steps: list[int] | None = None) -> torch.Tensor:
        """ELBO terms (L/k) sum_masked log p of the MC samples `steps` (default all) of every row: [n, S]."""
        extras = rollout.extras
        steps = list(range(extras["elbo_masks"].shape[1])) if steps is None else steps
        Lc = extras["completion_ids"].shape[1]
        parts, groups = [], _by_length(extras["prompt_ids"])
        for length, members in groups.items():
            prompt = torch.stack([extras["prompt_ids"][r] for r in members]).to(self.device)  # [m, P]
            target = extras["completion_ids"][members].to(self.device)  # [m, Lc]
            masks = extras["elbo_masks"][members][:, steps]  # [m, S, Lc]
            logits = self.logits(elbo_canvas(prompt, target, masks, self.mask_id))[:, length:]  # [m*S, Lc, V]
            logp = token_log_probs(logits, target.repeat_interleave(len(steps), 0))  # [m*S, Lc]
            parts.append((members, elbo_terms(logp.view(len(members), len(steps), Lc), masks)))  # [m, S]
        return self._rows_in_order(parts, len(rollout), len(steps), self._idle_forwards(len(groups)))

    def _trajectory(self, rollout: Rollout, steps: list[int]) -> torch.Tensor:
        """TraceRL: log-probs of the tokens committed in each decision's steps, given that decision's canvas."""
        extras, width = rollout.extras, self.options.shrinkage
        starts = [j * width for j in steps]
        parts, groups = [], _by_length(extras["prompt_ids"])
        for length, members in groups.items():
            prompt = torch.stack([extras["prompt_ids"][r] for r in members]).to(self.device)  # [m, P]
            target = extras["completion_ids"][members].to(self.device)  # [m, Lc]
            commit = extras["commit_step"][members]  # [m, Lc]
            canvas = trajectory_canvas(prompt, target, commit, starts, self.mask_id)  # [m*S, P + Lc]
            temperature = extras["temperature"][members].to(self.device).repeat_interleave(len(steps))  # [m*S]
            logits = self.logits(canvas)[:, length:] / temperature[:, None, None]  # [m*S, Lc, V]
            logp = token_log_probs(logits, target.repeat_interleave(len(steps), 0))  # [m*S, Lc]
            parts.append((members, trajectory_terms(logp.view(len(members), len(steps), -1), commit, starts, width)))
        return self._rows_in_order(parts, len(rollout), len(steps), self._idle_forwards(len(groups)))

    def _rows_in_order(self, parts: list[tuple[list[int], torch.Tensor]], n: int, width: int,
                       idle: torch.Tensor | None = None) -> torch.Tensor:
        """Per-length-group results [m, S] put back in row order: [n, S]. idle: the idle forwards' zero
        (sharded weights), added so that backward runs through them as through every process's forwards."""
        out = torch.zeros(n, width, device=self.device)
        if not parts or width == 0:
            return out
        index = torch.tensor([r for members, _ in parts for r in members], device=self.device)
        out = out.index_copy(0, index, torch.cat([values for _, values in parts]))  # [n, S]
        return out if idle is None else out + idle

    # ------------------------------------------------------------------ sharded weights: the same forwards everywhere
    def _groups_missing(self, count: int) -> int:
        """How many prompt-length groups fewer than the process with the most this one has (0 unless sharded).

        Rows are scored per prompt length (one forward per length); with sharded weights every process
        must run as many forwards as the others, so the ones with fewer lengths run idle forwards."""
        if not self.tuning.sharded:
            return 0
        import torch.distributed as dist

        most = torch.tensor([count], device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item()) - count

    def _idle_canvas(self) -> torch.Tensor:
        """One all-mask row (a 1-token prompt and the completion) that idle forwards run on."""
        return torch.full((1, 1 + self.options.gen_length), self.mask_id, device=self.device)

    def _idle_forwards(self, count: int) -> torch.Tensor | None:
        """The idle forwards this process owes (sharded weights), as one zero that depends on them."""
        missing = self._groups_missing(count)
        if missing == 0:
            return None
        return sum(torch.nan_to_num(self.logits(self._idle_canvas())).sum() * 0.0 for _ in range(missing))

    # ------------------------------------------------------------------ trainer hook
    @torch.no_grad()
    def for_iteration(self, rollout: Rollout, iteration: int, generator: torch.Generator) -> Rollout:
        """The rollout inner iteration `iteration` trains on (called before any update of the step).

        d1: iteration 0 keeps the prompt mask drawn at sampling; every later one draws its own mask and
        re-scores the old log-probs under the still-unchanged policy, so each iteration's ratio starts at 1.
        elbo: the masks drawn at sampling serve every iteration (the rollout as it is).
        """
        if self.options.estimator != "d1" or iteration == 0:  # elbo / bgpo: the sampling masks serve every iteration
            return rollout
        extras = {**rollout.extras, "d1_prompt_mask": self._prompt_masks(rollout.extras["prompt_ids"], generator)}
        fresh = replace(rollout, extras=extras)
        return replace(fresh, log_probs=self.log_prob(fresh).float().cpu())  # [N, T]


def _rows_of(plan: Any, members: list[int]) -> Any:
    """The StepPlan of rows `members` (None stays None)."""
    if plan is None:
        return None
    temperature = plan.temperature[members] if torch.is_tensor(plan.temperature) else plan.temperature
    return replace(plan, temperature=temperature, fraction=plan.fraction[members])


def _by_length(prompt_ids: Sequence[torch.Tensor]) -> dict[int, list[int]]:
    """Row indices grouped by prompt length, in order of first appearance."""
    groups: dict[int, list[int]] = defaultdict(list)
    for r, ids in enumerate(prompt_ids):
        groups[len(ids)].append(r)
    return dict(groups)
