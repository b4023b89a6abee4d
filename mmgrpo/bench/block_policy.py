"""A transformer-block policy for the sharding memory benchmark: big enough that weights and AdamW state dominate
a training step's memory (~32M fp32 parameters in 10 pre-norm blocks), small enough for 2 CPU processes.

Each prompt maps to a fixed sequence of `tokens` ids; one forward gives logits at every position and the policy
samples one token per position, so a row makes `tokens` decisions scored again in one forward. The reward is
the share of positions whose token is the prompt's id there plus one (`next_token_reward`).
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import torch
from torch import nn

from mmgrpo.memory import ActivationShape
from mmgrpo.pipelines.toolkit import Finetuning, TunedAdapter
from mmgrpo.rollout import Rollout


class Block(nn.Module):
    """Pre-norm transformer block: self-attention and a 4x GELU MLP."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.up, self.down = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, s, 3, self.heads, h // self.heads).unbind(2)  # [n, s, a, h/a] each
        att = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(att.transpose(1, 2).reshape(n, s, h))  # [n, s, h]
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))  # [n, s, h]


class BlockModel(nn.Module):
    """ids [n, s] -> logits [n, s, V] through `layers` Blocks (FSDP2 shards each Block: _no_split_modules)."""

    _no_split_modules = ["Block"]

    def __init__(self, vocab: int, tokens: int, hidden: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.position = nn.Parameter(torch.randn(tokens, hidden) * 0.02)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position  # [n, s, h]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # [n, s, V]


def prompt_ids(prompt: Any, vocab: int, tokens: int) -> torch.Tensor:
    """The fixed token ids [tokens] of a prompt (from a hash of its text)."""
    g = torch.Generator().manual_seed(zlib.crc32(str(prompt).encode()))
    return torch.randint(vocab, (tokens,), generator=g)


def next_token_reward(samples: Sequence[list[int]], prompts: Sequence[Any], vocab: int = 32, **_: Any) -> list[float]:
    """Share of positions whose sampled token is the prompt's id there plus one (mod vocab)."""
    scores = []
    for sample, prompt in zip(samples, prompts):
        target = (prompt_ids(prompt, vocab, len(sample)) + 1) % vocab
        scores.append(float((torch.tensor(sample) == target).float().mean()))
    return scores


class BlockPolicy(TunedAdapter):
    """Full fine-tuning of a BlockModel (no reference copy: run it with loss.beta = 0)."""

    def __init__(self, vocab: int = 32, tokens: int = 16, hidden: int = 512, heads: int = 8, layers: int = 10) -> None:
        self.vocab, self.tokens, self.hidden, self.heads, self.layers = vocab, tokens, hidden, heads, layers
        self.tuning = Finetuning(BlockModel(vocab, tokens, hidden, heads, layers), "full", keep_reference=False)

    def activation_shape(self, prompts: Sequence[Any] = ()) -> ActivationShape:
        return ActivationShape(self.tokens, self.hidden, self.heads, self.layers)

    def _ids(self, prompts: Sequence[Any]) -> torch.Tensor:
        device = next(self.tuning.model.parameters()).device
        return torch.stack([prompt_ids(p, self.vocab, self.tokens) for p in prompts]).to(device)  # [n, s]

    @torch.no_grad()
    def sample(self, prompts: Sequence[Any], group_size: int, generator: torch.Generator, *,
               evaluate: bool = False) -> Rollout:  # fmt: skip
        rows = [p for p in prompts for _ in range(group_size)]
        ids = self._ids(rows)  # [n, s]
        log_probs = torch.log_softmax(self.tuning.active(ids).float(), -1)  # [n, s, V]
        tokens = torch.multinomial(log_probs.exp().flatten(0, 1), 1, generator=generator).view(len(rows), -1)  # [n, s]
        chosen = log_probs.gather(-1, tokens[..., None]).squeeze(-1)  # [n, s]
        return Rollout(
            group_id=torch.arange(len(prompts)).repeat_interleave(group_size), prompts=rows,
            samples=tokens.tolist(), log_probs=chosen.cpu(), mask=torch.ones(chosen.shape, dtype=torch.bool),
            extras={"ids": ids.cpu(), "tokens": tokens.cpu()},
        )  # fmt: skip

    def log_prob(self, rollout: Rollout, steps: Sequence[int] | None = None) -> torch.Tensor:
        device = next(self.tuning.model.parameters()).device
        log_probs = torch.log_softmax(self.tuning.active(rollout.extras["ids"].to(device)).float(), -1)  # [n, s, V]
        chosen = log_probs.gather(-1, rollout.extras["tokens"].to(device)[..., None]).squeeze(-1)  # [n, s]
        return chosen if steps is None else chosen[:, list(steps)]
