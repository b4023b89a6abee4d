"""mmgrpo vs TRL GRPOTrainer: seconds per training step and peak memory on the same tiny model.

    python -m mmgrpo.bench.vlm_vs_trl            # about 3 minutes on 2 CPU cores
    python -m mmgrpo.bench.vlm_vs_trl --quick    # smoke run (~30 s): 2 steps, 1 round, text model only

What runs. The same tiny randomly initialised model is trained twice per round, once by
`mmgrpo.train` with the VLMAdapter and once by `trl.GRPOTrainer`, each in its OWN subprocess:
- `text`: a Qwen2 causal LM built from config with the tiny byte-level BPE tokenizer and chat
  template of `mmgrpo.pipelines.vlm.tiny` (same weights for both: loaded from one folder);
- `vlm`: the tiny Qwen2-VL of the same module (one 56x56 image per prompt: 4 visual tokens).
Both trainers get the same settings: group size G, prompts per step B (one optimizer step per
generation batch of B*G completions), max completion length T, sampling at temperature 1
(no top-p/top-k), the same string reward (share of the letter "e", capped), LoRA rank/alpha on
the same projections (vision tower frozen), AdamW at a constant learning rate, grad clip 1.0,
group-normalised advantages, the same loss type (dapo by default), clip range (0.2, 0.28) and
beta (k3 KL, TRL's `use_bias_correction_kl` off so the loss is the same), fp32 on CPU, no vLLM,
no activation checkpointing (TRL turns it on by default; off is TRL's faster setting here), and
one torch thread per run (`--threads`; on a shared machine, multi-threaded kernels of a tiny
model mostly wait for each other). TRL accepts the tiny Qwen2-VL on CPU (image column +
conversational prompts); if a trainer fails on a model, its row says FAILED with the error.

What is measured.
- s/step: each trainer calls the reward exactly once per optimizer step, so the interval
  between consecutive reward calls is one full step (sampling, reward, advantages, forward,
  backward, optimizer, each trainer's own bookkeeping), timed identically for both. The first
  interval is a warm-up and dropped; the median of the rest is the run's s/step. With several
  rounds the table shows the median over rounds.
- cpu s/step: the same intervals in the child's CPU time (process_time). On a machine shared
  with other work, wall time also counts the time the run waited for a core; CPU time does
  not, so its ratio is the steadier one. The headline (and the target) is wall s/step.
- peak RSS: the child's maximum resident set size from `os.wait4` (the kernel's ru_maxrss):
  everything the training process held at its peak, imports and model included.
- chars/compl: mean characters per decoded completion; similar values show that both trainers
  sampled completions of similar length (a trainer whose completions stop early is cheaper).
Runs alternate (mmgrpo first, then TRL first, ...) so that drift in machine load falls on both.

How to read it. The `mmgrpo/TRL` row gives the ratios: s/step below 1 means mmgrpo steps are
faster, peak RSS below 1 means mmgrpo needs less memory; the `target` line compares them with
the project's goal (s/step <= 0.67x, peak RSS <= 1x). Only ratios from one run mean anything;
absolute seconds depend on the machine and its load. --quick has a single interval (no
warm-up dropped) and exists to check that both trainers run, not to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TRAINERS = ("mmgrpo", "trl")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [
    "Describe the red circle.",
    "What colour is the square?",
    "Where is the green triangle?",
    "How many shapes are there?",
    "Which way does the blue circle move?",
    "Is the yellow square left of the purple circle?",
    "What is in the image?",
    "Describe the scene.",
]


# ------------------------------------------------------------------------------- shared pieces


def letter_e_score(texts: list[str]) -> list[float]:
    """Share of the letter "e" in each text, capped: 8 or more e's score 1.

    >>> letter_e_score(["tree", "sky"])
    [0.25, 0.0]
    """
    return [min(t.count("e"), 8) / 8 for t in texts]


class TimedReward:
    """The reward both trainers call once per step; records when it was called and completion lengths."""

    def __init__(self) -> None:
        self.call_times: list[float] = []  # wall clock (perf_counter)
        self.cpu_times: list[float] = []  # this process's CPU time (process_time)
        self.mean_chars: list[float] = []

    def score(self, texts: list[str]) -> list[float]:
        self.call_times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        self.mean_chars.append(sum(map(len, texts)) / max(len(texts), 1))
        return letter_e_score(texts)


def scene(seed: int, size: int = 56):
    """A PIL image: one coloured square on grey (56x56 gives 4 visual tokens in the tiny Qwen2-VL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    image = np.full((size, size, 3), 128, np.uint8)
    y, x = rng.randint(0, size - 20, 2)
    image[y : y + 20, x : x + 20] = rng.randint(0, 256, 3)
    return Image.fromarray(image)


# ------------------------------------------------------------------------------- the two trainers (children)


def run_mmgrpo(spec: dict[str, Any], reward: TimedReward) -> None:
    import mmgrpo
    from mmgrpo.pipelines.vlm import VLMAdapter

    adapter = VLMAdapter(
        spec["model"],
        max_new_tokens=spec["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        finetune="lora",
        lora_rank=spec["lora_rank"],
        lora_alpha=spec["lora_alpha"],
        lora_target_modules=LORA_TARGETS,
    )
    if spec["kind"] == "vlm":
        prompts = [{"prompt": p, "image": scene(i)} for i, p in enumerate(PROMPTS)]
    else:
        prompts = list(PROMPTS)

    def letter_e(samples, prompts, **fields):
        return reward.score(list(samples))

    steps = spec["steps"]
    config = {
        "train": {
            "seed": spec["seed"],
            "max_steps": steps,
            "prompts_per_step": spec["prompts_per_step"],
            "group_size": spec["group_size"],
            "micro_batch_size": spec["prompts_per_step"] * spec["group_size"],
            "cpu": True,
            "checkpoint_every": steps,
            "keep_checkpoints": 1,
        },
        "advantage": {"estimator": "grpo", "scale": "group", "eps": 1e-4},
        "loss": {
            "aggregation": spec["loss_type"],
            "beta": spec["beta"],
            "kl_estimator": "k3",
            "eps_low": spec["eps_low"],
            "eps_high": spec["eps_high"],
        },
        "optim": {"lr": spec["lr"], "grad_clip": 1.0, "schedule": "constant", "weight_decay": 0.0},
        "eval": {"num_prompts": 0},
    }
    mmgrpo.train(config, adapter=adapter, rewards={"letter_e": letter_e}, prompts=prompts,
                 out=Path(spec["workdir"]) / "mmgrpo-run", progress=False)


def run_trl(spec: dict[str, Any], reward: TimedReward) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    if spec["kind"] == "vlm":
        rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                 "image": scene(i)} for i, p in enumerate(PROMPTS)]
    else:
        rows = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]
    dataset = Dataset.from_list(rows)

    def letter_e(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational -> text
        return reward.score(texts)

    batch = spec["prompts_per_step"] * spec["group_size"]
    args = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-run"),
        seed=spec["seed"],
        max_steps=spec["steps"],
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,  # one generation batch of B*G completions per optimizer step
        num_generations=spec["group_size"],
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        scale_rewards="group",
        loss_type=spec["loss_type"],
        beta=spec["beta"],
        epsilon=spec["eps_low"],
        epsilon_high=spec["eps_high"],
        use_bias_correction_kl=False,  # mmgrpo's k3 KL is not weighted by the ratio
        activation_checkpointing=False,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=spec["steps"],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                             target_modules=list(LORA_TARGETS))
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=letter_e, args=args, train_dataset=dataset,
                          peft_config=peft_config)
    trainer.train()


def child(spec: dict[str, Any]) -> None:
    """One training run in this process; writes call times and completion lengths to spec['result']."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    reward = TimedReward()
    result: dict[str, Any] = {"trainer": spec["trainer"], "kind": spec["kind"]}
    try:
        (run_mmgrpo if spec["trainer"] == "mmgrpo" else run_trl)(spec, reward)
    except Exception as err:  # reported in the table (e.g. a trainer that does not accept the model)
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    result.update(call_times=[t - start for t in reward.call_times], cpu_times=reward.cpu_times,
                  mean_chars=reward.mean_chars,
                  wall=time.perf_counter() - start)
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------- the parent


def launch(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one child; returns its result with peak_rss_mib (ru_maxrss from wait4) added."""
    tag = f"{spec['kind']}-{spec['trainer']}-{spec['round']}"
    spec = {**spec, "result": str(workdir / f"{tag}.json"), "workdir": str(workdir / tag)}
    Path(spec["workdir"]).mkdir(parents=True, exist_ok=True)
    log = workdir / f"{tag}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mmgrpo.bench.vlm_vs_trl", "--child", json.dumps(spec)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if not Path(spec["result"]).is_file():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        return {"trainer": spec["trainer"], "kind": spec["kind"], "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(Path(spec["result"]).read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def step_seconds(call_times: list[float]) -> float | None:
    """Median interval between reward calls, the first (warm-up) interval dropped when more remain."""
    intervals = [b - a for a, b in zip(call_times, call_times[1:])]
    if len(intervals) > 1:
        intervals = intervals[1:]
    return statistics.median(intervals) if intervals else None


def summarise(results: list[dict[str, Any]], kinds: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for kind in kinds:
        table[kind] = {}
        for trainer in TRAINERS:
            runs = [r for r in results if r["kind"] == kind and r["trainer"] == trainer]
            ok = [r for r in runs if "error" not in r]
            entry: dict[str, Any] = {"runs": len(ok)}
            if ok:
                per_run = [step_seconds(r["call_times"]) for r in ok]
                entry["s_per_step"] = statistics.median([s for s in per_run if s is not None] or [float("nan")])
                entry["s_per_step_runs"] = per_run
                cpu = [step_seconds(r["cpu_times"]) for r in ok]
                entry["cpu_s_per_step"] = statistics.median([s for s in cpu if s is not None] or [float("nan")])
                entry["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in ok)
                chars = [c for r in ok for c in r["mean_chars"]]
                entry["chars"] = statistics.mean(chars) if chars else None
            errors = sorted({r["error"] for r in runs if "error" in r})
            if errors:
                entry["error"] = errors[0]
            table[kind][trainer] = entry
        a, b = table[kind]["mmgrpo"], table[kind]["trl"]
        if "s_per_step" in a and "s_per_step" in b:
            table[kind]["ratio"] = {"s_per_step": a["s_per_step"] / b["s_per_step"],
                                    "cpu_s_per_step": a["cpu_s_per_step"] / b["cpu_s_per_step"],
                                    "peak_rss": a["peak_rss_mib"] / b["peak_rss_mib"]}
    return table


def print_table(table: dict[str, Any], settings: str) -> None:
    print(settings)
    print(f"{'model':6s} {'trainer':11s} {'s/step':>8s} {'cpu s/step':>11s} {'peak RSS MiB':>13s} {'chars/compl':>12s} "
          f"{'runs':>5s}")
    for kind, rows in table.items():
        for trainer in TRAINERS:
            e = rows[trainer]
            name = "TRL" if trainer == "trl" else trainer
            if "s_per_step" in e:
                chars = f"{e['chars']:.1f}" if e.get("chars") is not None else "-"
                print(f"{kind:6s} {name:11s} {e['s_per_step']:8.3f} {e['cpu_s_per_step']:11.3f} "
                      f"{e['peak_rss_mib']:13.0f} {chars:>12s} {e['runs']:5d}")
            if "error" in e:
                print(f"{kind:6s} {name:11s} FAILED: {e['error']}")
        if "ratio" in rows:
            r = rows["ratio"]
            print(f"{kind:6s} {'mmgrpo/TRL':11s} {r['s_per_step']:7.2f}x {r['cpu_s_per_step']:10.2f}x "
                  f"{r['peak_rss']:12.2f}x")
            print(f"{'':6s} target: s/step <= 0.67x {'met' if r['s_per_step'] <= 0.67 else 'NOT met'}, "
                  f"peak RSS <= 1.00x {'met' if r['peak_rss'] <= 1.0 else 'NOT met'}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 round, text model only")
    parser.add_argument("--models", default="text,vlm", help="comma list of text, vlm")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (first interval is warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per trainer and model, alternating order")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss-type", default="dapo", choices=["dapo", "grpo", "bnpo", "dr_grpo"])
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (0: torch's default); 1 keeps a shared machine's load from "
                             "stalling multi-threaded kernels")
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--workdir", help="keep models, logs and runs here (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return None
    if args.quick:
        args.steps, args.rounds, args.models = 2, 1, "text"
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    if not kinds or any(k not in ("text", "vlm") for k in kinds):
        parser.error(f"--models takes text and/or vlm, got {args.models!r}")

    from mmgrpo.pipelines.vlm.tiny import build_tiny_text_lm, build_tiny_vlm

    with tempfile.TemporaryDirectory(prefix="vlm_vs_trl-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        size = {"hidden_size": args.hidden_size, "num_layers": args.num_layers}
        models = {}
        for kind in kinds:
            if kind == "text":
                models[kind] = str(build_tiny_text_lm(workdir / "model-text", **size))
            else:
                models[kind] = str(build_tiny_vlm(workdir / "model-vlm", family="qwen2_vl", **size))
        base = {"steps": args.steps, "group_size": args.group_size, "prompts_per_step": args.prompts_per_step,
                "max_new_tokens": args.max_new_tokens, "lr": args.lr, "loss_type": args.loss_type,
                "beta": args.beta, "eps_low": 0.2, "eps_high": 0.28, "lora_rank": 8, "lora_alpha": 16.0, "seed": 0,
                "threads": args.threads}
        results = []
        total = args.rounds * len(kinds) * len(TRAINERS)
        for r in range(args.rounds):
            for k, kind in enumerate(kinds):
                order = TRAINERS if (r + k) % 2 == 0 else TRAINERS[::-1]  # alternate who goes first
                for trainer in order:
                    print(f"[{len(results) + 1}/{total}] {kind} {trainer} round {r + 1}", file=sys.stderr, flush=True)
                    spec = {**base, "trainer": trainer, "kind": kind, "model": models[kind], "round": r}
                    results.append(launch(spec, workdir))
        table = summarise(results, kinds)
    settings = (f"vlm_vs_trl: G={args.group_size}, B={args.prompts_per_step} prompts/step, T={args.max_new_tokens} "
                f"tokens, loss={args.loss_type}, beta={args.beta}, lr={args.lr}, LoRA r8, hidden={args.hidden_size} "
                f"x {args.num_layers} layers, {args.steps} steps/run (median after 1 warm-up step), "
                f"{args.rounds} round(s), CPU fp32")
    print_table(table, settings)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "table": table, "runs": results}, indent=2))
    return table


if __name__ == "__main__":
    main()
