"""Train contract-case adapters for a few steps (1 process, or each of N under torchrun) and save what they made.

    python fsdp_worker.py OUT CASE[,CASE...] [--steps N] [--resume] [--die-at-step K]

Run under torchrun with ACCELERATE_USE_FSDP=true FSDP_VERSION=2 the adapters' weights are sharded
(FSDP2). Sampling noise and d1's prompt masks come from each prompt, not from the process's generator,
so 1 and N processes train on the same global batch. Writes, per case, OUT/CASE/ (the run) and, from
rank 0, weights.pt (full trained weights) and losses.json; every rank writes world_rank{r}.json.
--die-at-step K: rank 0 exits hard in the reward of step K (a killed run; its last checkpoint is K - 1).
"""

from __future__ import annotations

import argparse
import json
import os
import types
import zlib
from pathlib import Path

import torch

from contract_cases import CASES
from mmgrpo.rollout import Rollout
from mmgrpo.sharding import full_tensor
from mmgrpo.trainer import train


def _seed(prompt) -> int:
    text = prompt if isinstance(prompt, str) else prompt.get("prompt", repr(prompt))
    return zlib.crc32(text.encode())


def prompt_seeded(adapter):
    """The adapter, sampling (and drawing d1's per-iteration masks) with one generator per prompt."""
    sample, for_iteration = adapter.sample, getattr(adapter, "for_iteration", None)

    def seeded_sample(self, prompts, group_size, generator, *, evaluate=False):
        parts = []
        for p in prompts:
            g = torch.Generator(device=generator.device).manual_seed(_seed(p))
            parts.append(sample([p], group_size, g, evaluate=evaluate))
        out = Rollout.concat(parts)
        out.group_id = torch.arange(len(prompts)).repeat_interleave(group_size)
        return out

    def seeded_for_iteration(self, rollout, k, generator):
        parts = []
        for gid in torch.unique_consecutive(rollout.group_id).tolist():
            rows = torch.nonzero(rollout.group_id == gid).squeeze(-1)
            g = torch.Generator().manual_seed(_seed(rollout.prompts[int(rows[0])]) + 1000 * k)
            parts.append(for_iteration(rollout.select(rows), k, g))
        return Rollout.concat(parts)

    adapter.sample = types.MethodType(seeded_sample, adapter)
    if for_iteration is not None:
        adapter.for_iteration = types.MethodType(seeded_for_iteration, adapter)
    return adapter


def run_case(name: str, case, out: Path, steps: int, resume: bool, die_at: int | None) -> None:
    adapter = prompt_seeded(case.adapter)
    rank = int(os.environ.get("RANK", "0"))
    calls = {"n": 0}

    def reward(samples, prompts, **meta):
        calls["n"] += 1
        if die_at is not None and calls["n"] == die_at and rank == 0:
            os._exit(17)  # killed mid-step: no cleanup, no checkpoint of this step
        if name.startswith("mdlm"):  # the untrained tiny model rarely writes the case's "1": score variety instead
            return [len(set(s["tokens"])) / len(s["tokens"]) for s in samples]
        return case.reward(samples, prompts, **meta)

    if rank == 0 and not resume:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in adapter.trainable_parameters().items()}, out / f"{name}.init.pt")
    config = {
        "train": {"max_steps": steps, "prompts_per_step": PROMPTS_PER_STEP.get(name, 2), "group_size": 4,
                  "micro_batch_size": 2, "cpu": True,
                  "checkpoint_every": 1, "num_iterations": 2 if name.startswith("mdlm") else 1,
                  "dynamic_sampling": name == "toy-dynamic", "dynamic_sampling_max_rounds": 3},
        "loss": {"beta": 0.02},
        "optim": {"lr": 1e-2, "grad_clip": 0.5, "ema_decay": 0.5},
        "eval": {"num_prompts": 0},
    }
    result = train(config, adapter=adapter, rewards={"r": reward}, prompts=case.prompts, out=out / name,
                   resume=out / name if resume else None, progress=False)
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    weights = {k: full_tensor(v.detach()) for k, v in adapter.trainable_parameters().items()}  # a collective
    sharded = any(type(v).__name__ == "DTensor" for v in adapter.trainable_parameters().values())
    (out / name / f"world_rank{rank}.json").write_text(json.dumps({"world": world, "sharded": sharded}))
    if rank == 0:
        torch.save(weights, out / name / "weights.pt")
        (out / name / "losses.json").write_text(json.dumps([m["loss"] for m in result.metrics]))


def build(name: str):
    """A contract case; "-mixed": the masked-diffusion case with 4 prompts per step, 3 of one length and 1 of
    another, so one process scores one prompt length and the other two (idle forwards keep them in step)."""
    if name == "toy-dynamic":  # dynamic sampling: the processes keep different numbers of rows (padding)
        return CASES["toy"]()
    if not name.endswith("-mixed"):
        return CASES[name]()
    case = CASES[name.removesuffix("-mixed")]()
    case.prompts = ["A:12+345=", "A:12+346=", "A:12+347=", "C:3,5,7>22="]
    return case


PROMPTS_PER_STEP = {"mdlm-d1-mixed": 4, "toy-dynamic": 4}  # the others: 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("cases")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die-at-step", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # every case is built before the first run starts torch.distributed (the tiny models are written to disk,
    # which transformers' save_pretrained leaves to the main process once a process group exists)
    torch.manual_seed(0)  # LoRA's initial weights come from the global generator: the same in every launch
    cases = {name: build(name) for name in args.cases.split(",")}
    for name, case in cases.items():
        run_case(name, case, args.out, args.steps, args.resume, args.die_at_step)


if __name__ == "__main__":
    main()
