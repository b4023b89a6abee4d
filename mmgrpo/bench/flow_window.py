"""Seconds per GRPO phase on the embedded video default, and what an SDE window saves.

    python -m mmgrpo.bench.flow_window            # ~ a few minutes on 2 CPU cores
    python -m mmgrpo.bench.flow_window --quick    # smoke run (2 steps each)

Two runs of `mmgrpo.train` on the embedded video default (configs/video.yaml, tiny Wan on the
mini-world), identical except for the flow sampler's SDE window:
- window: SDE on w of the N sampling steps as the shipped config places them (w = 2 of N = 10,
  fixed at the first two steps, Flow-GRPO-Fast), ODE elsewhere, the ODE tail after the window in
  the config's tail_steps Euler steps (3 instead of 8); only window steps are stored and trained;
- full: SDE at every step; the first int(N * timestep_fraction) steps are trained (9 of 10).
Training re-scores one transformer forward (+ backward) per trained step and row, so its cost
should scale with the number of trained steps; sampling shows what the coarser tail saves. The
trainer's own per-step timers (metrics.jsonl: time/sample, time/reward, time/train) are read back;
the first step (warm-up) is dropped and the median of the rest is shown. Evaluation is off
(eval.num_prompts=0) so only training steps are timed.

Target: train-phase time ratio window / full <= w/N + 0.15. Runs alternate (window, full,
window, full, ... with --rounds) so machine-load drift falls on both; on a shared machine, read
the ratio, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("time/sample", "time/reward", "time/train", "time/step")


def run_once(window: int | None, steps: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    """One short training run; returns the median of each phase timer over steps 2.. and the trained steps."""
    import mmgrpo

    sets = [f"pipeline.kwargs.window={'null' if window is None else window}", "eval.num_prompts=0",
            "train.checkpoint_every=100000", *overrides]
    if window is None:
        sets.append("pipeline.kwargs.window_mode=fixed")
    result = mmgrpo.train("video", out=out, overrides=sets, max_steps=steps, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = rows[1:] if len(rows) > 1 else rows
    med = {k: statistics.median(r[k] for r in timed) for k in PHASES}
    med["active_steps"] = statistics.median(r.get("active_steps", float("nan")) for r in timed)
    med["rows"] = statistics.median(r.get("rows", float("nan")) for r in timed)
    del result
    return med


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m mmgrpo.bench.flow_window", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps per run (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating window/full pairs")
    parser.add_argument("--quick", action="store_true", help="2 steps, 2 prompts x 4 samples (smoke run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args(argv)
    from mmgrpo.config import load_config

    cfg = load_config("video")
    kw = cfg.pipeline.kwargs
    N = int(kw.get("num_steps", 10))
    w = int(kw.get("window") or N)
    steps = 2 if args.quick else args.steps
    overrides = list(args.overrides)
    if args.quick:
        overrides += ["train.prompts_per_step=2", "train.group_size=4"]
    runs: dict[str, list[dict[str, Any]]] = {"window": [], "full": []}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, window in (("window", w), ("full", None)):
                runs[name].append(run_once(window, steps, Path(tmp) / f"{name}{r}", overrides))
    table = {name: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for name, ms in runs.items()}
    ratio = table["window"]["time/train"] / max(table["full"]["time/train"], 1e-9)
    target = w / N + 0.15
    print(f"\nflow window benchmark: embedded video default (tiny Wan, 9x32x32), N = {N} sampling steps, "
          f"{steps} steps per run (first dropped), {args.rounds} round(s), {time.time() - t0:.0f} s total")
    print(f"{'':22s}{'window ' + str(w) + '/' + str(N):>14s}{'full':>14s}{'ratio':>10s}")
    for k in PHASES:
        a, b = table["window"][k], table["full"][k]
        print(f"{k + ' (s)':22s}{a:14.3f}{b:14.3f}{a / max(b, 1e-9):10.2f}")
    print(f"{'trained steps / row':22s}{table['window']['active_steps'] / max(table['window']['rows'], 1):14.1f}"
          f"{table['full']['active_steps'] / max(table['full']['rows'], 1):14.1f}")
    verdict = "PASS" if ratio <= target else "MISS"
    print(f"train-phase ratio {ratio:.3f} vs target w/N + 0.15 = {target:.3f}: {verdict}")
    return {"table": table, "ratio": ratio, "target": target, "pass": ratio <= target}


if __name__ == "__main__":
    main()
