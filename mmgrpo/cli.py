"""The `mmgrpo` command line: train, list, plot, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Mapping

EPILOG = """examples:
  mmgrpo train --modality toy                          train the toy policy with its default config
  mmgrpo train --modality toy --max-steps 20 --out runs/try
  mmgrpo train --config my.yaml --set train.group_size=4 --set loss.beta=0.04
  mmgrpo train --resume runs/try --max-steps 40        continue a run exactly where it stopped
  mmgrpo list                                          modalities, rewards, estimators, losses
  mmgrpo plot runs/try                                 write runs/try/rewards.png
  mmgrpo demo runs/try                                 compare base and trained samples in a browser

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
    parser.add_argument(
        "--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMGRPO_DEBUG=1)"
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

    export = sub.add_parser("export", help="write a run's trained model as one from_pretrained folder (LoRA merged)")
    export.add_argument("run", type=Path, help="run directory")
    export.add_argument("--out", type=Path, required=True, help="new or empty folder to write")
    export.add_argument("--checkpoint", metavar="step_N", help="checkpoint folder to export (default: the latest)")
    export.add_argument("--ema", action="store_true", help="export the EMA weights (runs with optim.ema_decay)")

    demo = sub.add_parser("demo", help="open a page comparing a run's base and trained policies (extra 'demo')")
    demo.add_argument("run", type=Path, help="run directory")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    demo.add_argument("--share", action="store_true", help="a public gradio.live link (needs internet)")
    demo.add_argument("--checkpoint", metavar="step_N", help="checkpoint folder to compare (default: the latest)")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads for sampling (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("MMGRPO_DEBUG", "").strip() not in ("", "0")
    try:
        code = _run(args, parser)
        sys.stdout.flush()  # a reader that went away (`mmgrpo list | head`) shows here, not at exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except Exception as e:
        if debug or not _user_error(e):
            raise
        if process_rank(os.environ) == 0:  # under torchrun every process fails alike: one says so
            where = getattr(e, "run_dir", None)  # a run stopped mid-way (a reward failed): how to go on
            hint = f"; {_resume_hint(where)}" if where is not None else ""
            print(f"mmgrpo: error: {one_line(str(e))}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if process_rank(os.environ) == 0:
            print(f"mmgrpo: interrupted; {_after_interrupt(e)}", file=sys.stderr)
        return 130


def _after_interrupt(error: KeyboardInterrupt) -> str:
    """What an interrupted run left: train() names its directory on the exception (RunDir.__exit__)."""
    run_dir = getattr(error, "run_dir", None)
    return "no run directory was made yet" if run_dir is None else _resume_hint(run_dir)


def _resume_hint(run_dir: Path) -> str:
    from mmgrpo.rundir import resume_hint

    return resume_hint(run_dir)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "train":
        return _train(args, parser)
    if args.command == "list":
        return _list()
    if args.command == "export":
        return _export(args)
    if args.command == "demo":
        return _demo(args)
    return _plot(args)


# ------------------------------------------------------------------------------- errors and launchers

MAX_ERROR_CHARS = 1000  # a 5 MB prompt quoted in an error is cut, not echoed into the terminal


def _user_error(error: BaseException) -> bool:
    """A mistake the user can fix (a config, a prompt, a reward): one line, no traceback."""
    from mmgrpo.config import ConfigError

    scoring = sys.modules.get("mmgrpo.scoring")  # not imported: no reward ran, so no RewardError
    return isinstance(error, ConfigError) or (scoring is not None and isinstance(error, scoring.RewardError))


def one_line(message: str) -> str:
    """An error message as one line of at most MAX_ERROR_CHARS characters."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    if len(text) > MAX_ERROR_CHARS:
        text = f"{text[:MAX_ERROR_CHARS]}... ({len(text)} characters)"
    return text


def _closed_pipe() -> int:
    """stdout's reader is gone: say nothing more, as `cat | head` does (128 + SIGPIPE)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail again
    except (OSError, ValueError):
        pass
    return 141


def _env_int(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return default


def process_rank(env: Mapping[str, str]) -> int:
    """This process's rank as torchrun (RANK) or MPI set it; 0 when started alone."""
    return _env_int(env, ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"), 0)


def launched_processes(env: Mapping[str, str]) -> int:
    """How many processes the launcher started (torchrun's WORLD_SIZE, or MPI's); 1 when started alone."""
    return _env_int(env, ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"), 1)


def launcher_mismatch(env: Mapping[str, str]) -> str | None:
    """A warning when `accelerate launch` was asked for several processes but started one.

    accelerate's simple launcher (taken with --cpu, or without several GPUs) runs ONE process;
    it still exports MASTER_ADDR/MASTER_PORT when --num_processes > 1, next to its ACCELERATE_*
    settings, while a real multi-process launch also sets WORLD_SIZE (torchrun) or MPI's size.
    """
    asked_for_more = "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env
    if not asked_for_more or launched_processes(env) > 1:
        return None
    return (
        "accelerate launch was asked for more than one process but started 1 process (with --cpu, or without "
        "that many GPUs, it runs one): this run trains in 1 process. For N CPU processes use "
        "`torchrun --nproc_per_node N -m mmgrpo.cli train ...`"
    )


# ------------------------------------------------------------------------------- commands


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from mmgrpo.config import ConfigError, modality_config_path

    warning = launcher_mismatch(os.environ)
    if warning:
        print(f"mmgrpo: warning: {warning}", file=sys.stderr, flush=True)
    if args.resume is None and args.modality is None and args.config is None:
        parser.error("train needs --modality M, --config FILE or --resume DIR")
    if args.resume is not None and (args.modality or args.config):
        raise ConfigError("--resume takes the config saved in the run directory: drop --modality/--config")
    if args.resume is not None and not (args.resume / "config.yaml").is_file():
        raise ConfigError(f"cannot resume: '{args.resume}' has no config.yaml (is it a run directory?)")
    # --config always names a file (a Path); --modality always a shipped config
    source = args.config if args.config is not None or args.resume else modality_config_path(args.modality)
    from mmgrpo.trainer import train

    result = train(
        source,
        out=args.out,
        resume=args.resume,
        overrides=args.overrides,
        max_steps=args.max_steps,
        progress=not args.no_progress,
    )
    last = result.metrics[-1] if result.metrics else {}
    if last and process_rank(os.environ) == 0:
        mean = "n/a" if last["reward/mean"] is None else f"{last['reward/mean']:.4f}"  # n/a: no row scored
        print(f"finished step {last['step']}: reward/mean {mean}; metrics in {result.out_dir}")
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


def _export(args: argparse.Namespace) -> int:
    from mmgrpo.export import export_run

    for folder in export_run(args.run, args.out, checkpoint_name=args.checkpoint, ema=args.ema):
        print(f"wrote {folder}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mmgrpo.demo.server import launch  # gradio is imported only once every check passed

    launch(args.run, host=args.host, port=args.port, share=args.share, checkpoint=args.checkpoint,
           threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
