"""Peak memory per process of the same model trained by mmgrpo in 1 process, 2-process DDP and 2-process FSDP2.

    python -m mmgrpo.bench.sharding_memory            # ~ 2 minutes on 2 CPU cores (gloo)
    python -m mmgrpo.bench.sharding_memory --quick    # smoke run (a tiny model)
    python -m mmgrpo.bench.sharding_memory --modes single ddp

The model: mmgrpo.bench.block_policy.BlockPolicy, 10 pre-norm transformer blocks of hidden 512 (~32M fp32 weights),
full fine-tuning with AdamW, 16 rows per step (4 prompts x 4 samples) of 16 tokens: weights, gradients and AdamW
state dominate. Each run is a fresh process group (torchrun, gloo, CPU) running mmgrpo's trainer
(setup.prepare + trainer.run_job) for 3 steps; FSDP2 is requested the way `accelerate launch` with
configs/accelerate/fsdp2.yaml requests it (ACCELERATE_USE_FSDP and FSDP_* variables), so the trainer shards the
trained module per Block. Per process it prints:
- peak RSS: VmHWM of /proc/self/status over the first two training steps (reset by writing 5 to
  /proc/self/clear_refs at the first step, read before the third), and that peak minus the resident set before
  the model was built (the process group already up): what training added;
- accounted bytes: this process's parameters (its shards under FSDP2), gradients and AdamW state after two steps;
- mmgrpo.memory's estimate for the run (parameters + gradients + optimizer + activations + buffers) and its
  ratio to the measured peak over the baseline (target: within 20%).
And the ratio FSDP2 / DDP of parameter + optimizer bytes per process (target: <= 0.6).
The children run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the system at once and the
resident set follows the live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

from mmgrpo.bench import status_bytes

SIZES = {"full": dict(hidden=512, layers=10, heads=8, tokens=16), "quick": dict(hidden=64, layers=2, heads=4, tokens=8)}
MODES = ("single", "ddp", "fsdp2")
MARK = "SHARDING_MEMORY "
MEASURE_AT = 2  # the peak of training step MEASURE_AT - 1 (0-based), read before step MEASURE_AT
# what `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets (full shard per Block, fp32 here)
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block", "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
}  # fmt: skip


def _local_bytes(tensors) -> int:
    """Bytes this process holds (the local shard of a DTensor)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def child(mode: str, size: dict[str, int], out: str) -> dict:
    """One process of one run: train 3 steps through mmgrpo's trainer, return what it measured."""
    import torch
    from accelerate import PartialState

    from mmgrpo.bench.block_policy import BlockPolicy, next_token_reward
    from mmgrpo.memory import estimate_for_run, format_estimate
    from mmgrpo.setup import prepare
    from mmgrpo.trainer import run_job

    torch.set_num_threads(1)
    PartialState(cpu=True)  # the process group is up before the baseline: its buffers are not training's
    BlockPolicy(tokens=size["tokens"], hidden=8, heads=1, layers=1)  # the libraries it loads (peft) are not either
    baseline = status_bytes("RssAnon")  # tensors are anonymous memory; library code is file-backed
    adapter = BlockPolicy(**size)
    config = {
        "modality": "custom", "loss": {"beta": 0.0}, "optim": {"lr": 1e-4, "grad_clip": 1.0},
        "train": {"max_steps": MEASURE_AT + 1, "prompts_per_step": 4, "group_size": 4, "micro_batch_size": 16,
                  "num_threads": 1, "cpu": True, "checkpoint_every": 1000, "keep_checkpoints": 1},
        "eval": {"num_prompts": 0},
    }  # fmt: skip
    prompts = [f"prompt {i}" for i in range(64)]
    job = prepare(config, adapter=adapter, rewards={"next_token": next_token_reward}, prompts=prompts, out=out)
    world = job.comm.world_size
    if mode != "single" and world != 2:
        raise RuntimeError(f"the {mode} run needs 2 processes, got {world}")
    estimate = estimate_for_run(adapter, job.cfg, world, mode, prompts[:8])
    measured: dict[str, int] = {}

    def begin_step(step: int, seed: int) -> None:
        if step == MEASURE_AT - 1:  # after a first step, whose first touch of library code is not training memory
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS: the peak from here on
        if step == MEASURE_AT:
            params = list(job.state.params.values())
            measured.update(
                peak=status_bytes("VmHWM"),
                file_backed=status_bytes("RssFile") + status_bytes("RssShmem"),
                parameters=_local_bytes(adapter.tuning.model.parameters()),
                gradients=_local_bytes(p.grad for p in params if p.grad is not None),
                optimizer=_local_bytes(t for s in job.state.optimizer.state.values() for t in s.values()
                                       if torch.is_tensor(t)),  # fmt: skip
            )

    adapter.begin_step = begin_step
    with job.run, job.trackers:
        run_job(job, progress=False)
    if job.comm.is_main:
        print(format_estimate(estimate), file=sys.stderr)
    return {"mode": mode, "rank": job.comm.rank, "world": world, "baseline": baseline, **measured,
            "estimate": estimate.total, "estimate_parts": estimate._asdict()}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, quick: bool) -> list[dict]:
    """Run one mode in fresh processes and collect each process's numbers."""
    out = tempfile.mkdtemp(prefix="sharding_memory_") + "/run"  # one run directory for all its processes
    args = ["-m", "mmgrpo.bench.sharding_memory", "--child", mode, "--out", out] + (["--quick"] if quick else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    if mode == "single":
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", str(_free_port()), *args]  # fmt: skip
        if mode == "fsdp2":
            env.update(FSDP_ENV)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"the {mode} run failed:\n{done.stderr[-4000:]}")
    rows = [json.loads(line[len(MARK):]) for line in done.stdout.splitlines() if line.startswith(MARK)]
    return sorted(rows, key=lambda r: r["rank"])


def _training_bytes(r: dict) -> int:
    """What training holds at its peak: the peak resident set less its file-backed part (library code, shared
    memory) and less the anonymous memory the process had before the model was built."""
    return r["peak"] - r["file_backed"] - r["baseline"]


def report(results: dict[str, list[dict]]) -> str:
    mb = 1e6
    lines = ["| run | process | peak RSS (MB) | training peak (MB) | params (MB) | grads (MB) | AdamW state (MB) "
             "| estimate (MB) | estimate / measured |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, rows in results.items():
        for r in rows:
            grown = _training_bytes(r)
            lines.append(
                f"| {mode} | {r['rank']} of {r['world']} | {r['peak'] / mb:.0f} | {grown / mb:.0f} | "
                f"{r['parameters'] / mb:.1f} | {r['gradients'] / mb:.1f} | {r['optimizer'] / mb:.1f} | "
                f"{r['estimate'] / mb:.0f} | {r['estimate'] / grown:.2f} |"
            )
    if "ddp" in results and "fsdp2" in results:
        def weights_and_state(rows: list[dict]) -> float:
            return max(r["parameters"] + r["optimizer"] for r in rows)

        ratio = weights_and_state(results["fsdp2"]) / weights_and_state(results["ddp"])
        lines.append(f"\nFSDP2 / DDP parameter + optimizer bytes per process: {ratio:.3f} (target <= 0.6): "
                     f"{'met' if ratio <= 0.6 else 'NOT met'}")  # fmt: skip
    ratios = [r["estimate"] / _training_bytes(r) for rows in results.values() for r in rows]
    worst = max(abs(x - 1) for x in ratios)
    lines.append(f"estimate / measured peak over baseline: {min(ratios):.2f} to {max(ratios):.2f} "
                 f"(target within 20%): {'met' if worst <= 0.2 else 'NOT met'}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Peak memory per process: 1 process, 2-process DDP, 2-process FSDP2.")
    parser.add_argument("--quick", action="store_true", help="a tiny model (smoke run)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    if args.child:
        print(MARK + json.dumps(child(args.child, size, args.out)), flush=True)
        return 0
    results = {}
    for mode in args.modes:
        results[mode] = launch(mode, args.quick)
        print(f"  {mode}: done", file=sys.stderr)
    print(f"BlockPolicy {size} full fine-tuning, fp32, AdamW; CPU (gloo); peak over training steps 1-{MEASURE_AT}")
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
