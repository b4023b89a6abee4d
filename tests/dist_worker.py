"""Run one short toy training (1 process, or one of N under torchrun) and save what it produced.

Sampling noise is derived from each prompt, not from the process's generator, so that 1 and N
processes see the same global batch; the generator's seed is recorded to show that each
process was handed different noise.
"""

import json
import sys
from pathlib import Path

import torch

from mmgrpo.pipelines.toy import ToyAdapter, toy_prompts
from mmgrpo.rollout import Rollout
from mmgrpo.sharding import full_tensor
from mmgrpo.trainer import train


class PromptSeededToy(ToyAdapter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_seeds = set()
        self.first_scored = None  # (group ids, rewards, advantages) of the first rows trained on

    def log_prob(self, rollout, steps=None):
        if self.first_scored is None:
            self.first_scored = {"group_id": rollout.group_id.tolist(), "reward": rollout.rewards["r"].tolist(),
                                 "advantages": rollout.advantages.tolist()}
        return super().log_prob(rollout, steps)

    def sample(self, prompts, group_size, generator, *, evaluate=False):
        self.seen_seeds.add(generator.initial_seed())
        parts = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(ord(c) * 31**i for i, c in enumerate(p["prompt"])))
            parts.append(super().sample([p], group_size, g, evaluate=evaluate))
        out = Rollout.concat(parts)
        out.group_id = torch.arange(len(prompts)).repeat_interleave(group_size)
        return out


def reward(samples, prompts, target, **_):
    return [sum(a == b for a, b in zip(s, t)) / max(len(s), len(t), 1) for s, t in zip(samples, target)]


def main(out: Path, prompts_per_step: int, group_size: int) -> None:
    adapter = PromptSeededToy(max_len=4, hidden=16, init_seed=0)
    prompts = toy_prompts(num_train=8, num_eval=0, max_len=4, seed=5)["train"]
    config = {
        "train": {"max_steps": 2, "prompts_per_step": prompts_per_step, "group_size": group_size,
                  "micro_batch_size": 3 if prompts_per_step % 2 == 0 else 64, "cpu": True},
        "loss": {"aggregation": "dapo", "beta": 0.02},
        "optim": {"lr": 1e-2},
        "eval": {"num_prompts": 0},
    }
    result = train(config, adapter=adapter, rewards={"r": reward}, prompts=prompts, out=out, progress=False)
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out / f"seeds_rank{rank}.json").write_text(json.dumps(
        {"world": world, "seeds": sorted(adapter.seen_seeds), "first_scored": adapter.first_scored}))
    weights = {k: full_tensor(v.detach()) for k, v in adapter.trainable_parameters().items()}  # a collective
    if rank == 0:
        torch.save(weights, out / "weights.pt")
        (out / "losses.json").write_text(json.dumps([m["loss"] for m in result.metrics]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
