"""Adapters that join the shared contract test: one factory per adapter, one line in CASES.

A factory returns a ContractCase: a fresh adapter, a few prompts, and a reward that the
untrained adapter can move within a few optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class ContractCase:
    adapter: Any
    prompts: list[Any]
    reward: Callable
    train: dict[str, Any] = field(default_factory=dict)  # config overrides for the reward-goes-up test


def toy_case() -> ContractCase:
    from mmgrpo.pipelines.toy import ToyAdapter, toy_prompts
    from mmgrpo.rewards.sequence import sequence_match

    prompts = toy_prompts(num_train=8, num_eval=0, max_len=4, seed=3)["train"]
    return ContractCase(
        adapter=ToyAdapter(max_len=4, hidden=16, init_seed=0),
        prompts=prompts,
        reward=sequence_match,
        train={"optim": {"lr": 1e-2}, "train": {"max_steps": 15, "prompts_per_step": 8, "group_size": 8}},
    )


CASES: dict[str, Callable[[], ContractCase]] = {
    "toy": toy_case,
}
