"""Log-probability estimators of masked-diffusion LMs, as pure functions (ANCHORS.md section 3).

A masked-diffusion LM has no tractable sequence likelihood; GRPO needs a per-decision "log-prob" whose
ratio it can clip. Each estimator fixes what one decision step (a column of Rollout.log_probs) is:

- d1 (diffu-GRPO): T = completion tokens. The completion fully masked plus a random share of prompt
  tokens masked; one forward gives log pi(o_k | q') for every completion token k.
- elbo: T = Monte Carlo samples. Sample j masks k_j ~ U{1..L} of the L completion tokens; its term is
  (L / k_j) * sum over the masked tokens of log p(token | the rest). The mean over j is an unbiased estimate
  of the ELBO E_k[(L/k) sum_masked log p], a lower bound of the sequence's log-likelihood (it equals the
  average over unmasking orders of the any-order autoregressive log-likelihood; Jensen gives the bound).
  Antithetic option (draw_antithetic_elbo_masks): samples in pairs of levels k and L + 1 - k over one random
  order, same expectation, lower variance. LLaDA 1.5 (VRPO) calls "antithetic sampling" the sharing of the
  timesteps and masks between the policy and the reference, which every estimator here does anyway; the
  complementary pairs are this project's addition in the same spirit (VRPO pairs nothing within one ELBO).
- bgpo: the ELBO terms turned into per-sample log-ratios whose token-level surrogate is BGPO's bound
  (`bgpo_log_ratio`), so each MC sample is backpropagated alone.
- trajectory (TraceRL): the log-probs of the tokens each sampler step committed, on that step's canvas.
Also the masked-diffusion training loss of the pretraining (`masked_diffusion_loss`).
"""

from __future__ import annotations

import torch


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in fp32 ([..., V], [...] -> [...])."""
    return logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1))[..., 0]


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[n, Lc] bool: completion tokens up to and including the first EOS (all of them if there is none)."""
    is_eos = completion == eos_id  # [n, Lc]
    after = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS tokens strictly before each column
    return after == 0


def draw_prompt_mask(prompt_length: int, rows: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """[rows, P] bool: each prompt token masked independently with `probability` (d1's prompt masking)."""
    u = torch.rand((rows, prompt_length), generator=generator, device=generator.device)  # [rows, P]
    return (u < probability).cpu()


def d1_canvas(prompt: torch.Tensor, prompt_mask: torch.Tensor, gen_length: int, mask_id: int) -> torch.Tensor:
    """prompt [n, P] with prompt_mask [n, P] masked, then gen_length masks -> canvas [n, P + gen_length]."""
    masked_prompt = torch.where(prompt_mask.to(prompt.device), mask_id, prompt)  # [n, P]
    return torch.cat([masked_prompt, torch.full_like(prompt[:, :1], mask_id).expand(-1, gen_length)], dim=1)


def draw_elbo_masks(rows: int, samples: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, samples, length] bool: each sample masks k ~ U{1..length} positions chosen uniformly."""
    device = generator.device
    k = torch.randint(1, length + 1, (rows, samples, 1), generator=generator, device=device)  # [n, K, 1]
    ranks = torch.rand((rows, samples, length), generator=generator, device=device).argsort(-1).argsort(-1)
    return (ranks < k).cpu()  # a uniformly random k-subset: the positions of the k smallest draws


def antithetic_pair_masks(k: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """The two masks of antithetic pairs: [m, 1] levels k in 1..L, [m, L] ranks (a permutation of 0..L-1 per
    row) -> [m, 2, L] bool. The first masks the k positions ranked lowest, the second the L + 1 - k ranked
    highest: levels k and L + 1 - k (both uniform on 1..L when k is), the two masks covering the completion
    and sharing one position."""
    return torch.stack([ranks < k, ranks >= k - 1], dim=1)  # rank k - 1 is in both; L + 1 - k in the second


def draw_antithetic_elbo_masks(rows: int, samples: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, samples, length] bool: draw_elbo_masks's distribution for every sample, in antithetic pairs.

    Samples 2i and 2i + 1 share one random order of the positions and one level k ~ U{1..L}: the first masks
    the first k positions of the order, the second the last L + 1 - k (antithetic_pair_masks). Each sample
    alone is a uniformly random k-subset with k uniform, so the ELBO estimate keeps its expectation; within a
    pair a lightly masked sample (its tokens predicted with most of the answer visible) meets a heavily masked
    one, so their terms, which fall as k grows, are negatively correlated and the pair's mean varies less. With
    an odd count the last sample is the first half of a pair.
    """
    device = generator.device
    pairs = -(-samples // 2)
    k = torch.randint(1, length + 1, (rows * pairs, 1), generator=generator, device=device)  # [n*P, 1]
    ranks = torch.rand((rows * pairs, length), generator=generator, device=device).argsort(-1).argsort(-1)
    masks = antithetic_pair_masks(k, ranks)  # [n*P, 2, L]
    return masks.view(rows, 2 * pairs, length)[:, :samples].cpu()


def elbo_canvas(prompt: torch.Tensor, completion: torch.Tensor, masks: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Canvases of the MC samples: [n, P], [n, Lc], [n, S, Lc] -> [n * S, P + Lc] (rows sample-minor)."""
    S = masks.shape[1]
    masked = torch.where(masks.to(completion.device), mask_id, completion[:, None, :])  # [n, S, Lc]
    return torch.cat([prompt[:, None, :].expand(-1, S, -1), masked], dim=2).flatten(0, 1)


def elbo_terms(token_logp: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(L / k) * sum of the masked tokens' log-probs, per sample ([n, S, L], [n, S, L] -> [n, S])."""
    L = masks.shape[-1]
    m = masks.to(token_logp.device)
    k = m.sum(-1).clamp_min(1)  # [n, S]
    return (token_logp * m).sum(-1) * (L / k)


def masked_diffusion_loss(token_logp: torch.Tensor, masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The masked-diffusion training loss (LLaDA's SFT objective): each masked answer token's negative log-prob
    weighted 1/t, summed over the answer, divided by its length L, averaged over rows ([n, L], [n, L], [n] -> []).

    With masks drawn with probability t ~ U(0, 1), its expectation is minus the ELBO of the answer, per token.
    """
    L = masked.shape[1]
    return (-(token_logp * masked).sum(1) / (t * L)).mean()


def bgpo_log_ratio(elbo: torch.Tensor, elbo_old: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per-sample "log-probs" whose ratio to 0 is BGPO's bound term ([n, S], [n, S], [n] bool -> [n, S]).

    The exact objective A * exp(D), D = mean_j D_j (D_j = elbo_j - elbo_old_j), is bounded below by a sum of
    single-sample terms: A * mean_j (1 + D_j) for A >= 0 (exp(x) >= 1 + x) and A * mean_j exp(D_j) for A < 0
    (Jensen). With old log-probs 0, a per-step ratio r_j = exp(value_j) of log(1 + D_j) (A >= 0; 1 + D_j
    floored at 1e-6) or D_j (A < 0) makes the token-level surrogate r_j * A exactly those terms, so each MC
    sample can be backpropagated alone. On-policy (D = 0) value and gradient equal the exact objective's.
    """
    d = elbo - elbo_old.to(elbo.device)  # [n, S]
    linear = torch.log((1 + d).clamp_min(1e-6))
    return torch.where(positive.to(elbo.device)[:, None], linear, d)


def trajectory_canvas(prompt: torch.Tensor, completion: torch.Tensor, commit_step: torch.Tensor, starts: list[int],
                      mask_id: int) -> torch.Tensor:
    """The canvases the sampler saw at steps `starts` (TraceRL): tokens committed before each start, the rest
    masked ([n, P], [n, Lc], [n, Lc] -> [n * S, P + Lc], rows step-minor)."""
    start = torch.tensor(starts, device=completion.device)[None, :, None]  # [1, S, 1]
    shown = commit_step.to(completion.device)[:, None, :] < start  # [n, S, Lc]
    partial = torch.where(shown, completion[:, None, :], mask_id)  # [n, S, Lc]
    return torch.cat([prompt[:, None, :].expand(-1, len(starts), -1), partial], dim=2).flatten(0, 1)


def trajectory_terms(token_logp: torch.Tensor, commit_step: torch.Tensor, starts: list[int], width: int) -> torch.Tensor:
    """Sum of the log-probs of the tokens committed in steps [start, start + width) ([n, S, Lc] -> [n, S])."""
    start = torch.tensor(starts, device=token_logp.device)[None, :, None]  # [1, S, 1]
    step = commit_step.to(token_logp.device)[:, None, :]  # [n, 1, Lc]
    scored = (step >= start) & (step < start + width)  # [n, S, Lc]
    return (token_logp * scored).sum(-1)
