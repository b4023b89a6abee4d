"""Peak memory of one masked-diffusion training step: BGPO (one MC sample per backward) vs the plain ELBO.

    python -m mmgrpo.bench.mdlm_memory            # ~ a minute on 2 CPU cores
    python -m mmgrpo.bench.mdlm_memory --quick    # smoke run (small canvas)

One optimizer step's gradient accumulation (`trainer.accumulate_gradients`) of a random tiny BertForMaskedLM
with a long answer canvas, at 1, 2, 4, 8 and 16 Monte Carlo samples per row, for
- bgpo: estimator "bgpo", token-level loss, train.step_chunk=1: each MC sample is its own decision step,
  backpropagated alone (the BGPO bound is a sum of single-sample terms);
- elbo: estimator "elbo" with loss.ratio=sequence: the ratio exp(ELBO - ELBO_old) over the mean of all
  samples, so every sample's activations sit in one graph.
Each measurement runs in a fresh process. Peak memory: on CUDA torch.cuda.max_memory_allocated over the step;
on CPU the growth of the process' peak resident set (ru_maxrss) during the step over its resident set
before it (the rollout is prepared one MC sample at a time, so its own peak stays below the step's). The
children run with MALLOC_MMAP_THRESHOLD_=65536, so freed tensors go back to the system at once and the
resident set follows the live tensors (with glibc's default, memory freed between backward passes stays
mapped and fragments, and the peak creeps up with the number of passes).
Target: BGPO's peak at 16 samples <= 1.1x its peak at 1 sample.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

SAMPLES = (1, 2, 4, 8, 16)
SIZES = {"full": {"gen_length": 128, "rows": 16, "hidden": 128, "layers": 4},
         "quick": {"gen_length": 32, "rows": 4, "hidden": 32, "layers": 1}}  # fmt: skip


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(estimator: str, samples: int, size: dict[str, int], device: str) -> float:
    """MB of peak memory of one step (in this process)."""
    import tempfile

    import torch

    from mmgrpo.config import LossConfig
    from mmgrpo.pipelines.mdlm import MaskedDiffusionAdapter
    from mmgrpo.pipelines.mdlm.estimators import draw_elbo_masks
    from mmgrpo.pipelines.mdlm.tiny import build_tiny_mdlm
    from mmgrpo.trainer import accumulate_gradients

    torch.set_num_threads(1)
    L = size["gen_length"]
    path = build_tiny_mdlm(tempfile.mkdtemp() + "/m", hidden=size["hidden"], layers=size["layers"], heads=4,
                           max_length=L + 32)  # fmt: skip
    adapter = MaskedDiffusionAdapter(str(path), finetune="full", keep_reference=False, gen_length=L, steps=4,
                                     estimator=estimator, mc_samples=1)  # fmt: skip
    adapter.to(device)
    g = torch.Generator().manual_seed(0)
    rollout = adapter.sample(["A:123+456="] * (size["rows"] // 2), 2, g)
    rollout.extras["elbo_masks"] = draw_elbo_masks(len(rollout), samples, L, g)  # [n, K, L]
    with torch.no_grad():  # one sample at a time: the preparation's peak stays small
        terms = torch.cat([adapter._elbo(rollout, [j]).cpu() for j in range(samples)], 1)  # [n, K]
    if estimator == "bgpo":
        rollout.extras["elbo_old"], old = terms, torch.zeros_like(terms)
    else:
        old = terms
    rollout.log_probs, rollout.mask = old, torch.ones(old.shape, dtype=torch.bool)
    rollout.advantages = torch.linspace(-1, 1, len(rollout))
    loss = LossConfig(ratio="token" if estimator == "bgpo" else "sequence", aggregation="grpo")
    chunk = 1 if estimator == "bgpo" else None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        accumulate_gradients(adapter, rollout, loss, micro_batch_size=len(rollout), step_chunk=chunk)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 1e6
    before = _rss_bytes()
    accumulate_gradients(adapter, rollout, loss, micro_batch_size=len(rollout), step_chunk=chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak - before, 0) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Peak memory of a masked-diffusion step: BGPO vs plain ELBO.")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=2, metavar=("ESTIMATOR", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    if args.one:  # a child process: one measurement
        print(json.dumps({"mb": measure(args.one[0], int(args.one[1]), size, args.device)}))
        return 0
    table: dict[str, dict[int, float]] = {"bgpo": {}, "elbo": {}}
    for samples in SAMPLES:
        for estimator in table:
            command = [sys.executable, "-m", "mmgrpo.bench.mdlm_memory", "--one", estimator, str(samples),
                       "--device", args.device] + (["--quick"] if args.quick else [])  # fmt: skip
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
            table[estimator][samples] = json.loads(out.strip().splitlines()[-1])["mb"]
            print(f"  {estimator} at {samples} samples: {table[estimator][samples]:.1f} MB", file=sys.stderr)
    print(f"peak memory of one training step (MB; {args.device}; canvas {size['gen_length']} tokens, "
          f"{size['rows']} rows, BertForMaskedLM hidden {size['hidden']} x {size['layers']} layers)")
    print("| MC samples | " + " | ".join(str(k) for k in SAMPLES) + " |")
    print("|---|" + "---|" * len(SAMPLES))
    for estimator, label in (("bgpo", "bgpo (one sample per backward)"), ("elbo", "elbo (all samples in one graph)")):
        print(f"| {label} | " + " | ".join(f"{table[estimator][k]:.1f}" for k in SAMPLES) + " |")
    ratio = table["bgpo"][16] / max(table["bgpo"][1], 1e-9)
    print(f"bgpo peak at 16 samples / at 1 sample: {ratio:.2f} (target <= 1.1): {'met' if ratio <= 1.1 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
