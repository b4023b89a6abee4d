"""The activation estimate of mmgrpo.memory against one measured training step of the embedded defaults.

    python -m mmgrpo.bench.activation_memory                    # image, video, vlm, mdlm; ~ a minute on 2 CPU cores
    python -m mmgrpo.bench.activation_memory --modalities mdlm

Each modality runs in a fresh process: its default config's adapter samples one step's rollout
(train.prompts_per_step x group_size rows), then `trainer.accumulate_gradients` runs the step's backward
passes twice; the second is measured (the first touches library code for the first time). Measured: the
peak resident set during that step (VmHWM after writing 5 to /proc/self/clear_refs) less the resident set
before it, on anonymous memory (file-backed pages excluded). Estimated: `estimate_for_run(...)`'s activations
per micro-batch plus its gradients, the step's memory on top of weights and AdamW state. Children run with
MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the resident set at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from mmgrpo.bench import status_bytes

MODALITIES = ("image", "video", "vlm", "mdlm")
MARK = "ACTIVATION_MEMORY "


def measure(modality: str) -> dict:
    """One training step's memory of a default config, measured and estimated (in this process)."""
    import torch

    from mmgrpo.config import load_config
    from mmgrpo.data import load_prompts
    from mmgrpo.memory import estimate_for_run
    from mmgrpo.setup import build_adapter
    from mmgrpo.trainer import accumulate_gradients

    torch.set_num_threads(1)
    cfg = load_config(modality, [])
    adapter = build_adapter(cfg)
    prompts, _ = load_prompts(cfg.data, cfg.train.seed)
    estimate = estimate_for_run(adapter, cfg, 1, "single", prompts[:8])
    if hasattr(adapter, "begin_step"):
        adapter.begin_step(0, cfg.train.seed)
    with torch.no_grad():
        rollout = adapter.sample(prompts[: cfg.train.prompts_per_step], cfg.train.group_size,
                                 torch.Generator().manual_seed(cfg.train.seed))  # fmt: skip
    rollout.advantages = torch.linspace(-1, 1, len(rollout))  # [n] every row trains
    params = [p for p in adapter.trainable_parameters().values()]

    def step() -> None:
        for p in params:
            p.grad = None  # as the trainer's zero_grad(set_to_none=True)
        accumulate_gradients(adapter, rollout, cfg.loss, micro_batch_size=cfg.train.micro_batch_size,
                             step_chunk=cfg.train.step_chunk)  # fmt: skip

    step()  # first touch of the backward's library code
    for p in params:
        p.grad = None
    before = status_bytes("RssAnon")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    measured = status_bytes("VmHWM") - status_bytes("RssFile") - status_bytes("RssShmem") - before
    return {"modality": modality, "rows": len(rollout), "measured": measured,
            "estimate": estimate.activations + estimate.gradients}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Activation estimate vs one measured training step.")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES))
    parser.add_argument("--one", choices=MODALITIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(MARK + json.dumps(measure(args.one)), flush=True)
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    print("| default | rows | measured step (MB) | estimated activations + gradients (MB) | estimate / measured |")
    print("|---|---|---|---|---|")
    for modality in args.modalities:
        done = subprocess.run([sys.executable, "-m", "mmgrpo.bench.activation_memory", "--one", modality],
                              capture_output=True, text=True, env=env)  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"the {modality} measurement failed:\n{done.stderr[-3000:]}")
        r = next(json.loads(line[len(MARK):]) for line in done.stdout.splitlines() if line.startswith(MARK))
        print(f"| {modality} | {r['rows']} | {r['measured'] / 1e6:.0f} | {r['estimate'] / 1e6:.0f} "
              f"| {r['estimate'] / r['measured']:.2f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
