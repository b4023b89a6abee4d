"""The `toy` adapter: a tiny autoregressive GRU policy over a few symbols.

The task is verifiable and small enough to learn from scratch in seconds on a CPU: given a
string over the alphabet "abcdef", emit it with every symbol shifted by one ("abc" -> "bcd"),
then the end symbol. At step t the model sees the prompt symbol at position t and its own
previous output, so the task is learnable but a random policy is far from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from mmgrpo.config import ConfigError
from mmgrpo.pipelines.toolkit import Finetuning, TunedAdapter, options_from, prompt_text
from mmgrpo.rollout import Rollout

ALPHABET = "abcdef"


def shifted(text: str) -> str:
    """The toy task's answer: every symbol moved one place along the alphabet (cyclic)."""
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in text)


def toy_prompts(num_train: int = 512, num_eval: int = 64, min_len: int = 2, max_len: int = 6, seed: int = 0) -> dict:
    """Disjoint train / held-out sets of {"prompt": "cab", "target": "dbc"}."""
    g = torch.Generator().manual_seed(seed)
    seen: set[str] = set()
    items: list[dict[str, str]] = []
    while len(items) < num_train + num_eval:
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        text = "".join(ALPHABET[i] for i in torch.randint(len(ALPHABET), (length,), generator=g).tolist())
        if text not in seen:
            seen.add(text)
            items.append({"prompt": text, "target": shifted(text)})
    return {"train": items[:num_train], "eval": items[num_train:]}


class ToyPolicy(nn.Module):
    """GRU over [embedding of prompt symbol t ; embedding of previous output] -> next-symbol logits."""

    def __init__(self, num_symbols: int, max_len: int, hidden: int = 64) -> None:
        super().__init__()
        self.pad = num_symbols  # prompt padding beyond the prompt's end
        self.eos = num_symbols  # output index of the end symbol
        self.bos = num_symbols + 1  # "previous output" at step 0
        self.max_len = max_len
        self.prompt_embed = nn.Embedding(num_symbols + 1, hidden)
        self.output_embed = nn.Embedding(num_symbols + 2, hidden)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_symbols + 1)

    def forward(self, prompt_ids: torch.Tensor, previous: torch.Tensor, state: torch.Tensor | None = None):
        """prompt_ids, previous: [n, S] -> logits [n, S, V+1], state [1, n, H]."""
        x = torch.cat([self.prompt_embed(prompt_ids), self.output_embed(previous)], dim=-1)  # [n, S, 2H]
        h, state = self.gru(x, state)  # [n, S, H]
        return self.head(h), state


@dataclass
class ToyOptions:
    max_len: int = 6  # longest prompt; T = max_len + 1 decision steps
    hidden: int = 64  # GRU width
    temperature: float = 1.0  # sampling and re-scoring temperature
    init_seed: int = 0  # seed of the policy's initial weights

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"toy temperature must be > 0, got {self.temperature}")
        if self.max_len < 1 or self.hidden < 1:
            raise ValueError(f"toy max_len and hidden must be >= 1, got {self.max_len} and {self.hidden}")


class ToyAdapter(TunedAdapter):
    """Adapter protocol over ToyPolicy, fully fine-tuned against a frozen copy of its initial weights.

    Decision steps T = max_len + 1 (symbols, then the end symbol).
    """

    Options = ToyOptions
    scores_all_steps_at_once = True

    def __init__(self, **kwargs: Any) -> None:
        self.options = options_from(ToyOptions, kwargs, "ToyAdapter")
        self.temperature, self.max_len = self.options.temperature, self.options.max_len
        torch.manual_seed(self.options.init_seed)  # construction only: the policy's initial weights
        self.policy = ToyPolicy(len(ALPHABET), self.max_len, self.options.hidden)
        self.tuning = Finetuning(self.policy, "full")
        self.device = torch.device("cpu")

    def _moved(self, device: torch.device) -> None:
        self.device = device

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[Any], group_size: int, generator: torch.Generator, *, evaluate: bool = False
    ) -> Rollout:
        rows = [p for p in prompts for _ in range(group_size)]
        prompt_ids = self._encode(rows)  # [N, T]
        n, steps = prompt_ids.shape
        policy = self._policy()
        tokens = torch.full((n, steps), self.policy.eos, dtype=torch.long, device=self.device)  # [N, T]
        log_probs = torch.zeros(n, steps, device=self.device)  # [N, T]
        mask = torch.zeros(n, steps, dtype=torch.bool, device=self.device)  # [N, T]
        previous = torch.full((n, 1), self.policy.bos, dtype=torch.long, device=self.device)  # [N, 1]
        done = torch.zeros(n, dtype=torch.bool, device=self.device)  # [N]
        state = None
        for t in range(steps):
            logits, state = policy(prompt_ids[:, t : t + 1], previous, state)  # [N, 1, V+1]
            logp = torch.log_softmax(logits[:, 0].float() / self.temperature, dim=-1)  # [N, V+1]
            choice = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)  # [N]
            mask[:, t] = ~done
            choice = torch.where(done, torch.full_like(choice, self.policy.eos), choice)
            tokens[:, t] = choice
            log_probs[:, t] = torch.where(done, 0.0, logp.gather(-1, choice[:, None]).squeeze(-1))
            done |= choice == self.policy.eos
            previous = choice[:, None]
        samples = [self._decode(row) for row in tokens.tolist()]
        group_id = torch.arange(len(prompts)).repeat_interleave(group_size)  # [N]
        return Rollout(
            group_id=group_id,
            prompts=rows,
            samples=samples,
            log_probs=log_probs.cpu(),
            mask=mask.cpu(),
            extras={"tokens": tokens.cpu(), "prompt_ids": prompt_ids.cpu()},
        )

    def log_prob(self, rollout: Rollout, steps: Sequence[int] | None = None) -> torch.Tensor:
        tokens = rollout.extras["tokens"].to(self.device)  # [n, T]
        prompt_ids = rollout.extras["prompt_ids"].to(self.device)  # [n, T]
        bos = torch.full_like(tokens[:, :1], self.policy.bos)
        previous = torch.cat([bos, tokens[:, :-1]], dim=1)  # [n, T]  teacher forcing
        logits, _ = self._policy()(prompt_ids, previous)  # [n, T, V+1]
        logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)  # [n, T, V+1]
        chosen = logp.gather(-1, tokens[..., None]).squeeze(-1)  # [n, T]
        return chosen if steps is None else chosen[:, list(steps)]

    # -- helpers ---------------------------------------------------------------------------
    def _policy(self) -> ToyPolicy:
        return self.tuning.active  # the frozen copy inside reference()

    def check_prompts(self, prompts: Sequence[Any]) -> None:
        """Before training: one ConfigError line for the first prompt this policy cannot read."""
        try:
            for i, p in enumerate(prompts):
                self._text(p, i)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _text(self, prompt: Any, index: int) -> str:
        """The prompt's text, checked: symbols of ALPHABET only, at most max_len of them."""
        text = prompt_text(prompt, index)
        if set(text) - set(ALPHABET) or len(text) > self.max_len:
            shown = f"{text[:40]!r}" + (f" ({len(text)} characters)" if len(text) > 40 else "")
            raise ValueError(
                f"toy prompt {index} {shown} must use only {ALPHABET!r} and be at most {self.max_len} symbols long"
            )
        return text

    def _encode(self, prompts: Sequence[Any]) -> torch.Tensor:
        steps = self.max_len + 1
        ids = torch.full((len(prompts), steps), self.policy.pad, dtype=torch.long)
        for i, p in enumerate(prompts):
            text = self._text(p, i)
            ids[i, : len(text)] = torch.tensor([ALPHABET.index(c) for c in text])
        return ids.to(self.device)

    def _decode(self, row: list[int]) -> str:
        out = []
        for token in row:
            if token == self.policy.eos:
                break
            out.append(ALPHABET[token])
        return "".join(out)
