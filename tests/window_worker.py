"""Train the tiny SD3 flow adapter for 3 steps with dynamic sampling, once per SDE window mode, and record
the SDE steps every training sample() call of this process trained (run under torchrun by test_window_ranks.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/window_worker.py OUT SEED

Writes OUT/window_rank{rank}.json: {"world": processes, "calls": {mode: [{"step", "sde_steps"}, ...]}}.
"""

import json
import sys
from pathlib import Path

import torch

from mmgrpo.pipelines.flow.adapter import FlowAdapter
from mmgrpo.pipelines.flow.tiny import TEXT_LEN, tiny_pipeline
from mmgrpo.trainer import train

WINDOWS = {  # 6 sampler steps, a 2-step SDE window
    "fixed": dict(window_mode="fixed", window_start=1),
    "random": dict(window_mode="random"),  # starts 0 .. 6 // 2 - 1
    "sliding": dict(window_mode="sliding", slide_every=1),  # starts 0 .. 4, one step further per training step
}
# The rewards of "red" prompts never differ within a group: dynamic sampling drops those groups and samples
# again, so a training step makes more than one round of sample() calls.
PROMPTS = ["a red circle", "a blue square", "a red square", "a green triangle"]


class RecordingFlowAdapter(FlowAdapter):
    """Records the training step and the SDE steps every row of every training sample() call trained."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def sample(self, prompts, group_size, generator, *, evaluate=False):
        rollout = super().sample(prompts, group_size, generator, evaluate=evaluate)
        if not evaluate:
            rows = {tuple(row.nonzero().flatten().tolist()) for row in rollout.mask}  # mask [n, T]: trained steps
            assert len(rows) == 1, f"the rows of one sample() call trained different steps: {rows}"
            self.calls.append({"step": self.window_step, "sde_steps": list(rows.pop())})
        return rollout


def reward(samples, prompts, **_):
    return [0.0 if "red" in p else float(x.mean()) for x, p in zip(samples, prompts)]


def run_mode(mode: str, out: Path, seed: int) -> list[dict]:
    torch.manual_seed(0)  # the same LoRA initialisation on every process
    adapter = RecordingFlowAdapter(
        tiny_pipeline("sd3"), num_steps=6, eval_steps=2, window=2, max_sequence_length=TEXT_LEN, lora_rank=4,
        lora_alpha=8, height=16, width=16, decode=False, **WINDOWS[mode],
    )
    config = {
        "train": {"seed": seed, "max_steps": 3, "prompts_per_step": 2, "group_size": 2, "cpu": True,
                  "num_threads": 1, "dynamic_sampling": True, "dynamic_sampling_max_rounds": 3},
        "optim": {"lr": 1e-2},
        "eval": {"num_prompts": 0},
    }
    train(config, adapter=adapter, rewards={"r": reward}, prompts=PROMPTS, out=out / mode, progress=False)
    return adapter.calls


def main(out: Path, seed: int) -> None:
    import torch.distributed as dist

    calls = {mode: run_mode(mode, out, seed) for mode in WINDOWS}
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    assert world == 2, f"window_worker expects 2 processes, got {world}: launch it with --nproc_per_node 2"
    (out / f"window_rank{rank}.json").write_text(json.dumps({"world": world, "calls": calls}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
