"""The masked-diffusion sampler (LLaDA's semi-autoregressive low-confidence remasking), as pure functions.

    canvas = prompt + gen_length [MASK]
    for block in blocks (left to right):
        for step in the block's steps:
            logits = model(canvas)                              # one forward
            x0 = argmax(logits / T + Gumbel noise)              # float64, the run's torch.Generator
            score each still-masked position of the block (remasking rule), -inf elsewhere
            commit the k best: canvas[pos] = x0[pos]            # k from transfer_counts; never remasked

Schedule: `steps` are spread over the blocks and each block's tokens over its steps, the remainder going
to the earliest (4 tokens in 3 steps -> 2, 1, 1); nothing is dropped (LLaDA refuses uneven splits, d1
drops steps silently). Remasking rules: "low_confidence" (the probability of the SAMPLED token, as in
the released code), "margin" (top-1 minus top-2 probability), "entropy" (minus the entropy), "random".
`threshold` switches to the confidence-threshold variant: every masked position of the block whose
confidence passes it is committed at once (at least one per step), so a forward can unmask many tokens.
The step at which each completion token was committed is recorded (`Denoised.commit_step`), and the forwards
each row needed (`row_forwards`: its tokens per forward is gen_length / row_forwards, LightningRL's speed).
A `StepPlan` (Co-GRPO, schedule.py) replaces the fixed counts and temperature with each row's own: slot s of
the plan samples at the row's temperature and commits max(1, round(fraction * masked tokens left in the
block)) of the row's tokens, a block's last slot all of them; `Denoised.active` says which slots each row used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from mmgrpo.sharding import on_every_process

if TYPE_CHECKING:
    from mmgrpo.pipelines.mdlm.schedule import StepPlan

REMASKING = ("low_confidence", "random", "margin", "entropy")


def transfer_counts(num_tokens: int, steps: int) -> list[int]:
    """How many tokens each of `steps` steps commits: equal shares, the remainder to the earliest steps.

    >>> transfer_counts(4, 3)
    [2, 1, 1]
    """
    if steps < 1 or num_tokens < 0:
        raise ValueError(f"transfer_counts needs steps >= 1 and num_tokens >= 0, got {steps}, {num_tokens}")
    base, extra = divmod(num_tokens, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def block_schedule(gen_length: int, block_length: int, steps: int) -> list[list[int]]:
    """Tokens committed at each step, one list per block (steps spread over blocks, remainder kept).

    >>> block_schedule(8, 4, 5)
    [[2, 1, 1], [2, 2]]
    """
    if block_length < 1 or gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}: "
                         f"set block_length to a divisor of gen_length")  # fmt: skip
    num_blocks = gen_length // block_length
    if steps < num_blocks:
        raise ValueError(f"steps={steps} is fewer than the {num_blocks} blocks: use steps >= gen_length / block_length")
    return [transfer_counts(block_length, s) for s in transfer_counts(steps, num_blocks)]


def gumbel_argmax(logits: torch.Tensor, temperature: float | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Samples of softmax(logits / temperature) by Gumbel-max in float64 ([n, ..., V] -> [n, ...]); 0 = argmax.

    temperature: one value, or one per row ([n], > 0).
    """
    logits = logits.double()
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(logits).view(-1, *[1] * (logits.dim() - 1))  # [n, 1, ..., 1]
    elif temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=generator.device).to(logits.device)
    gumbel = -torch.log(-torch.log(u))  # u = 0 gives -inf: never chosen
    return (logits / temperature + gumbel).argmax(-1)


def confidence(logits: torch.Tensor, tokens: torch.Tensor, rule: str, generator: torch.Generator) -> torch.Tensor:
    """How sure the model is at each position ([n, L, V], [n, L] -> [n, L] float64); higher commits first."""
    if rule == "random":
        u = torch.rand(tokens.shape, dtype=torch.float64, generator=generator, device=generator.device)
        return u.to(tokens.device)
    probs = logits.double().softmax(-1)  # [n, L, V]
    if rule == "low_confidence":
        return probs.gather(-1, tokens.unsqueeze(-1))[..., 0]
    if rule == "margin":
        top = probs.topk(2, dim=-1).values  # [n, L, 2]
        return top[..., 0] - top[..., 1]
    if rule == "entropy":
        return (probs * probs.clamp_min(1e-300).log()).sum(-1)  # minus the entropy
    raise ValueError(f"unknown remasking rule {rule!r}: use one of {', '.join(REMASKING)}")


@dataclass
class Denoised:
    canvas: torch.Tensor  # [n, P + Lc] long: prompt and committed completion
    commit_step: torch.Tensor  # [n, Lc] long: step at which each completion token was committed
    forwards: int  # model forwards taken
    row_forwards: torch.Tensor  # [n] long: forwards in which each row still had masked tokens (its own cost)
    active: torch.Tensor | None = None  # [n, S] bool, with a StepPlan: the slots in which each row had masked tokens


def denoise(
    forward: Callable[[torch.Tensor], torch.Tensor],
    canvas: torch.Tensor,
    gen_length: int,
    mask_id: int,
    generator: torch.Generator,
    *,
    block_length: int | None = None,
    steps: int | None = None,
    temperature: float = 1.0,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    plan: StepPlan | None = None,
    synced: bool = False,
) -> Denoised:
    """Fill the last `gen_length` (masked) positions of `canvas` [n, P + Lc].

    forward: canvas [n, L] -> logits [n, L, V] (the adapter's processing applied: banned tokens, shift).
    steps: forwards in all (default gen_length: one token per step); with `threshold`, the most
    forwards per block is block_length (one token at least per forward).
    plan: each row's temperature and unmask fraction per slot of block_schedule (replaces temperature and the
    fixed counts; not with threshold).
    """
    if plan is not None and threshold is not None:
        raise ValueError("a StepPlan sets each step's unmask fraction: leave threshold unset")
    if remasking not in REMASKING:
        raise ValueError(f"unknown remasking rule {remasking!r}: use one of {', '.join(REMASKING)}")
    canvas = canvas.clone()
    n, total = canvas.shape
    P, Lc = total - gen_length, gen_length
    block_length = block_length or gen_length
    schedule = block_schedule(Lc, block_length, steps or Lc)
    commit_step = torch.full((n, Lc), -1, dtype=torch.long, device=canvas.device)  # [n, Lc]
    row_forwards = torch.zeros(n, dtype=torch.long, device=canvas.device)  # [n]
    slots = sum(map(len, schedule))
    active = torch.zeros(n, slots, dtype=torch.bool, device=canvas.device) if plan is not None else None  # [n, S]
    step, slot = 0, 0  # forwards taken; position in the plan
    for b, counts in enumerate(schedule):
        lo, hi = b * block_length, (b + 1) * block_length  # completion columns of the block
        in_block = torch.zeros(Lc, dtype=torch.bool, device=canvas.device)
        in_block[lo:hi] = True
        if threshold is not None:
            counts = [None] * block_length  # as many steps as it takes, at least one token each
        for i, count in enumerate(counts):
            masked = (canvas[:, P:] == mask_id) & in_block  # [n, Lc]
            if not on_every_process(masked.any(), synced, any_=True):  # synced: sharded weights, same forwards
                break
            if count == 0 and plan is None:
                continue
            logits = forward(canvas)[:, P:]  # [n, Lc, V]
            row_forwards += masked.any(-1).long()
            x0 = gumbel_argmax(logits, _slot_temperature(plan, slot + i, temperature), generator)  # [n, Lc]
            score = confidence(logits, x0, remasking, generator)  # [n, Lc]
            score = torch.where(masked, score, -torch.inf)
            if plan is not None:
                left = masked.sum(-1)  # [n]
                share = plan.fraction[:, slot + i].to(canvas.device).double()  # [n]
                k = left if i == len(counts) - 1 else (share * left).round().long().clamp_min(1).minimum(left)
                chosen = _top_per_row(score, k)
                active[:, slot + i] = left > 0
            elif threshold is None:
                chosen = _top_k(score, count)
            else:  # every position past the threshold, and the best one in any case
                chosen = (score >= threshold) | _top_k(score, 1)
            chosen &= masked
            canvas[:, P:] = torch.where(chosen, x0, canvas[:, P:])
            commit_step = torch.where(chosen, step, commit_step)
            step += 1
        slot += len(counts)
    return Denoised(canvas, commit_step, step, row_forwards, active)


def _slot_temperature(plan: StepPlan | None, slot: int, default: float) -> float | torch.Tensor:
    """The temperature of plan slot `slot`: each row's ([n]), the plan's one value, or `default` without a plan."""
    if plan is None:
        return default
    return plan.temperature[:, slot] if isinstance(plan.temperature, torch.Tensor) else plan.temperature


def _top_per_row(score: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[n, L] bool: the k[r] highest scores of each row r ([n, L], [n] long)."""
    rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # [n, L]: 0 = highest
    return rank < k[:, None]


def _top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """[n, L] bool: the k highest scores of each row."""
    index = score.topk(k, dim=-1).indices  # [n, k]
    return torch.zeros_like(score, dtype=torch.bool).scatter(-1, index, True)
