"""How long one comparison of the demo takes: `python -m mmgrpo.demo.timing RUN_DIR [RUN_DIR ...]`.

For each run: load it as `mmgrpo demo` does (1 torch thread unless --threads), one warm-up comparison,
then --repeats comparisons (both policies, one sample each, held-out prompts 1, 2, ... with seeds 1,
2, ...); prints the median and the slowest. Gradio is not needed.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mmgrpo.demo.policies import compare, load_run


def time_run(path: str, threads: int, repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    run = load_run(path, threads=threads)
    loaded = time.perf_counter() - t0
    prompts = run.held_out or ["abc"]
    compare(run, prompts[0], seed=0)  # warm-up: first-call allocations
    seconds = [compare(run, prompts[i % len(prompts)], seed=i).seconds for i in range(1, repeats + 1)]
    return {"load": loaded, "median": statistics.median(seconds), "max": max(seconds)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for path in args.runs:
        t = time_run(path, args.threads, args.repeats)
        print(f"{path}: one comparison (both policies, 1 sample each) median {t['median']:.2f} s, "
              f"slowest {t['max']:.2f} s; loading the run {t['load']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
