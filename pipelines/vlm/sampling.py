"""The token sampling loop and the logits processing it draws from (temperature, top-p, banned tokens).

`sampling_logits` is the one place that math lives: sampling and re-scoring both call it, so
the recorded and the re-scored log-probs come from the same distribution. `draw_tokens` is the
decode loop over any step function (it knows nothing of transformers); `decode_masks` builds
the attention masks of all decode steps at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mmgrpo.sharding import on_every_process


def sampling_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    top_p: torch.Tensor | None,
    banned: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The logits of the distribution tokens are sampled from: in `dtype`, / temperature, top-p filtered.

    logits [..., V]; temperature and top_p [...] (one per row). Tokens outside the nucleus (the
    smallest set of most likely tokens whose mass reaches top_p) and `banned` token ids get -inf.
    Rows with top_p >= 1 are not filtered. temperature=None means 1 for every row (x / 1 is x
    exactly, so it only skips the work) and top_p=None that no row is filtered (it skips the
    check, which the decode loop would otherwise repeat at every token). Note that with
    top_p < 1 a token can fall outside the nucleus of updated weights (log-prob -inf).
    float64 (the default) keeps the fp32 log-probs computed from it within one rounding step of
    each other however the batch is shaped; float32 halves the memory of this step.
    """
    scaled = logits.to(dtype)  # [..., V]
    if temperature is not None:
        scaled = scaled / temperature.to(dtype).unsqueeze(-1)  # [..., V]
    if banned is not None and banned.numel():
        scaled = scaled.index_fill(-1, banned, float("-inf"))  # [..., V]
    if top_p is not None and bool((top_p < 1).any()):
        ordered, order = scaled.sort(dim=-1, descending=True, stable=True)  # [..., V]
        probs = ordered.softmax(-1)  # [..., V]
        mass_before = probs.cumsum(-1) - probs  # [..., V] mass of the more likely tokens
        drop_sorted = (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1)  # [..., V]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [..., V] vocab order
        scaled = scaled.masked_fill(drop, float("-inf"))  # [..., V]
    return scaled


@dataclass(frozen=True)
class TokenRules:
    """Which tokens end, pad and never start a completion token, and the precision of the logits processing."""

    eos_token_ids: list[int]
    pad_token_id: int
    banned: list[int]  # never sampled (visual placeholders)
    stop_on_eos: bool  # rows stop at their first EOS (the loop ends once every row has)
    logit_dtype: torch.dtype = torch.float64
    synced: bool = False  # sharded weights: the loop ends once every row of EVERY process has ended


def decode_masks(prompt_mask: torch.Tensor, steps: int, dtype: torch.dtype, kind: str | None) -> torch.Tensor:
    """Attention masks of all decode steps in one buffer; step t uses `buffer[..., : L + t + 1]`.

    prompt_mask [R, L] (1 = real token, 0 = left padding); every completion position is
    attended (a row past its EOS keeps decoding pad tokens whose outputs are dropped). Returns
    [R, L + steps] (kind None: 2D), or [R, 1, 1, L + steps] bool ("bool") / additive `dtype`
    ("additive"); see loading.prepared_mask_kind.
    """
    R = prompt_mask.shape[0]
    keep = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(R, steps, dtype=torch.bool)], 1)  # [R, L + steps]
    if kind == "bool":
        return keep[:, None, None, :]
    if kind == "additive":
        blocked = torch.zeros(keep.shape, dtype=dtype, device=keep.device)  # [R, L + steps]
        return blocked.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]
    return keep.to(prompt_mask.dtype)


def draw_tokens(
    logits: torch.Tensor,
    step: Callable[[torch.Tensor, int], torch.Tensor],
    steps: int,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator,
    rules: TokenRules,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to `steps` tokens per row, each from sampling_logits of the current logits.

    logits [R, V]: of the first completion token. step(token [R], t) feeds token t to the model
    and returns the logits [R, V] of token t + 1. temperature, top_p [R]: per row. Each draw
    uses one uniform per row from `generator` (inverse CDF), so all randomness comes from it.
    Returns tokens [R, steps] (pad after the end), log_probs [R, steps] fp32 of each drawn token
    under the distribution it was drawn from (0 after the end), lengths [R] (incl. EOS), ended [R].
    """
    R, device = logits.shape[0], logits.device
    banned = torch.tensor(rules.banned, dtype=torch.long, device=device)
    # decided once per rollout, not at every token: rows all at temperature 1 / none top-p filtered
    temp = temperature if bool((temperature != 1).any()) else None
    nucleus = top_p if bool((top_p < 1).any()) else None
    eos = torch.tensor(rules.eos_token_ids, dtype=torch.long, device=device)
    tokens = torch.full((R, steps), rules.pad_token_id, dtype=torch.long, device=device)  # [R, T]
    log_probs = torch.zeros(R, steps, device=device)  # [R, T]
    ended = torch.zeros(R, dtype=torch.bool, device=device)  # [R] emitted EOS
    never = torch.zeros(R, dtype=torch.bool, device=device)  # [R] without stop_on_eos no row stops
    taken = steps
    for t in range(steps):
        logp = sampling_logits(logits, temp, nucleus, banned, rules.logit_dtype).log_softmax(-1)  # [R, V]
        cdf = logp.exp().cumsum(-1)  # [R, V]
        # inverse-CDF draw: one uniform per row from the caller's generator, on its own device
        u = torch.rand(R, generator=generator, device=generator.device, dtype=cdf.dtype).to(device)  # [R]
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)  # [R, 1]
        drawn = drawn.clamp_(max=cdf.shape[-1] - 1)  # [R, 1]
        done = ended if rules.stop_on_eos else never  # [R] rows already past their EOS
        token = drawn[:, 0].masked_fill(done, rules.pad_token_id)  # [R]
        tokens[:, t] = token
        log_probs[:, t] = logp.gather(1, drawn)[:, 0].float().masked_fill(done, 0.0)
        ended |= torch.isin(token, eos)  # (a finished row's pad may be an EOS id: it stays ended)
        if t == steps - 1 or (rules.stop_on_eos and on_every_process(ended.all(), rules.synced)):
            taken = t + 1
            break
        logits = step(token, t)  # [R, V]
    lengths = torch.full((R,), taken, dtype=torch.long, device=device)  # [R] tokens incl. EOS
    if rules.stop_on_eos:
        is_eos = torch.isin(tokens[:, :taken], eos)  # [R, taken]; a row's first EOS is its real one
        lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, lengths)
    return tokens, log_probs, lengths, ended
