"""The `mmgrpo` command line: train, list, plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  mmgrpo train --modality toy                          train the toy policy with its default config
  mmgrpo train --modality toy --max-steps 20 --out runs/try
  mmgrpo train --config my.yaml --set train.group_size=4 --set loss.beta=0.04
  mmgrpo train --resume runs/try --max-steps 40        continue a run exactly where it stopped
  mmgrpo list                                          modalities, rewards, estimators, losses
  mmgrpo plot runs/try                                 write runs/try/rewards.png

A run directory holds config.yaml, metrics.jsonl (one line per step), eval.json (held-out
rewards before/after), samples/ (galleries), checkpoints/ and rewards.png.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmgrpo",
        description="Group-relative policy optimization (GRPO) for image, video, VLM, speech and masked-diffusion models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a policy with GRPO",
        description="Train with GRPO. Pick the setup with --modality (a shipped config) or --config (your YAML).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = train.add_mutually_exclusive_group()
    source.add_argument("--modality", "-m", help="shipped config to use (see `mmgrpo list`)")
    source.add_argument("--config", "-c", type=Path, help="path to a YAML config")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.group_size=4 (repeatable)",
    )
    train.add_argument("--max-steps", type=int, help="number of training steps (overrides train.max_steps)")
    train.add_argument("--out", type=Path, help="run directory (default: runs/<modality>-<time>)")
    train.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("list", help="list modalities, rewards, prompt sets, advantage estimators and losses")

    plot = sub.add_parser("plot", help="write a PNG of the reward curves of a run")
    plot.add_argument("run", type=Path, help="run directory (or its metrics.jsonl)")
    plot.add_argument("--out", type=Path, help="PNG path (default: RUN/rewards.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from mmgrpo.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "train":
            return _train(args, parser)
        if args.command == "list":
            return _list()
        if args.command == "plot":
            return _plot(args)
    except ConfigError as e:
        print(f"mmgrpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmgrpo: interrupted; the last checkpoint is intact (resume with --resume DIR)", file=sys.stderr)
        return 130
    return 0


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from mmgrpo.config import ConfigError

    if args.resume is None and args.modality is None and args.config is None:
        parser.error("train needs --modality M, --config FILE or --resume DIR")
    if args.resume is not None and (args.modality or args.config):
        raise ConfigError("--resume takes the config saved in the run directory: drop --modality/--config")
    if args.resume is not None and not (args.resume / "config.yaml").is_file():
        raise ConfigError(f"cannot resume: '{args.resume}' has no config.yaml (is it a run directory?)")
    from mmgrpo.trainer import train

    source = args.config if args.config is not None else args.modality
    result = train(
        source,
        out=args.out,
        resume=args.resume,
        overrides=args.overrides,
        max_steps=args.max_steps,
        progress=not args.no_progress,
    )
    last = result.metrics[-1] if result.metrics else {}
    if last:
        print(f"finished step {last['step']}: reward/mean {last['reward/mean']:.4f}; metrics in {result.out_dir}")
    return 0


def _list() -> int:
    from mmgrpo.config import available_modalities
    from mmgrpo.registry import ADAPTERS, DATASETS, ESTIMATORS, LOSSES, REWARDS

    def section(title: str, items: dict[str, str]) -> None:
        print(title)
        width = max(len(k) for k in items)
        for k, v in items.items():
            print(f"  {k:<{width}}  {v}")

    print("modalities (mmgrpo train --modality M):")
    print("  " + ", ".join(available_modalities()))
    section("pipelines (pipeline.name):", ADAPTERS)
    section("rewards (rewards[].name):", REWARDS)
    section("prompt sets (data.source):", DATASETS)
    section("advantage estimators (advantage.estimator / advantage.combine):", ESTIMATORS)
    section("losses (loss.ratio / loss.aggregation / loss.kl_estimator):", LOSSES)
    print("Any pipeline, reward or prompt set can also be named as package.module:Name or path/to/file.py:Name.")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from mmgrpo.plotting import plot_metrics

    metrics = args.run if args.run.suffix == ".jsonl" else args.run / "metrics.jsonl"
    out = args.out or metrics.parent / "rewards.png"
    try:
        path = plot_metrics(metrics, out)
    except FileNotFoundError as e:
        print(f"mmgrpo: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
