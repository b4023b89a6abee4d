"""Build the embedded tiny VLM (assets/vlm/): a Qwen2-VL trained on mini-world grounding and motion.

    python -m mmgrpo.pretrain.vlm                        # the shipped asset (minutes on 2 CPU cores)
    python -m mmgrpo.pretrain.vlm --quick --out DIR      # a smoke build in seconds (what the tests run)

The model is transformers' own `Qwen2VLForConditionalGeneration` built from the config
`ARCH` (a small decoder, a small vision tower with Qwen's 14-pixel patches and 2x2 merge), with
a byte-level BPE `Qwen2Tokenizer` trained here on mini-world questions and answers (digits stay
single tokens, as in Qwen's tokenizer; `<answer>` and `</answer>` are added as whole tokens).
Images are mini-world scenes rendered at 56x56, which the processor keeps as they are (4 visual
tokens); motion clips are 8 frames of 56x56 (16 visual tokens).

It is supervised on two tasks, with fresh scenes from the training seed range at every step:
- grounding: "Where is the red circle?" -> "<answer>[x1, y1, x2, y2]</answer>", the object's
  box in absolute pixels of the (un-resized) image, Qwen2.5-VL's convention;
- motion: "Which way is the green triangle moving?" -> "<answer>right</answer>".
The loss is the negative log-likelihood of the answer tokens, computed by `VLMAdapter.log_prob`
on a rollout that holds the reference answers, so the prompts are encoded exactly as GRPO
encodes them. Training stops early on purpose, at the first check where the IoU on validation
scenes (training-range seeds that training never draws) reaches `target_iou` (0.35, sampling at
temperature 1): the model is decent but imperfect, so GRPO has room to improve its held-out IoU.
The build runs on one CPU thread by default (--threads): the matrices are tiny, and on a busy
machine two threads are many times slower than one.

Afterwards the saved folder is reloaded through `VLMAdapter` and evaluated on held-out seeds
(`mmgrpo.miniworld.scenes.vlm_prompts` "eval" split) with the IoU and accuracy rewards; the numbers
go to MODEL_CARD.md. Given --seed the weights are deterministic (on one machine and thread count).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmgrpo import miniworld as mw
from mmgrpo.pipelines.vlm.tiny import VLMSizes

# Decoder and vision tower sizes (Qwen2-VL-2B has hidden 1536, 28 layers, vision 1280 x 32 blocks).
ARCH = VLMSizes(
    hidden_size=128,
    intermediate_size=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    max_positions=1024,
    tie_embeddings=True,
    mrope_section=(4, 6, 6),  # Qwen2-VL's split of head_dim / 2 = 16: temporal 1/4, height and width 3/8 each
    vision_width=128,
    vision_depth=2,
    vision_heads=4,
    patch_size=14,  # Qwen's; with the 2x2 merge a 56x56 image is 4 visual tokens, an 8-frame clip 16
)
VOCAB_SIZE = 384
# Training stops at the first check where the validation IoU (sampling temperature 1) reaches
# target_iou, or after max_steps: decent but imperfect on purpose.
FULL = {"max_steps": 6000, "check_every": 250, "target_iou": 0.35, "batch_size": 32, "lr": 2e-3, "warmup": 50,
        "motion_share": 0.2, "validation": 96, "eval_grounding": 256, "eval_motion": 64}
QUICK = {"max_steps": 3, "check_every": 2, "target_iou": 0.35, "batch_size": 4, "lr": 2e-3, "warmup": 1,
         "motion_share": 0.25, "validation": 4, "eval_grounding": 4, "eval_motion": 2}
# Validation scenes come from the end of the training seed range, which training never draws.
VALIDATION_SEEDS = (mw.SPLIT_OFFSETS["heldout"] - 10_000, mw.SPLIT_OFFSETS["heldout"])
SIZE = mw.VLM_IMAGE_SIZE
MAX_NEW_TOKENS = 24  # an answer is at most 20 tokens: <answer> [ d d , _ d d , _ d d , _ d d ] </answer> EOS
EVAL_TEMPERATURES = (1.0, 0.1)  # the sampling temperature GRPO trains at, and near-greedy
ANSWER_TAGS = ("<answer>", "</answer>")


def answer_text(item: dict[str, Any]) -> str:
    """The reference answer of a vlm prompt item: the box (grounding) or the direction (motion)."""
    if item["task"] == "grounding":
        x1, y1, x2, y2 = item["box"]
        return f"<answer>[{x1}, {y1}, {x2}, {y2}]</answer>"
    return f"<answer>{item['answer']}</answer>"


# ----------------------------------------------------------------------------- model


def tokenizer_corpus() -> list[str]:
    """Every question the mini-world asks, and answers covering every coordinate and direction."""
    lines = []
    for colour in mw.COLORS:
        for shape in mw.SHAPES:
            lines.append(f"Where is the {colour} {shape}?")
            lines.append(f"Which way is the {colour} {shape} moving?")
    lines += [f"<answer>{d}</answer>" for d in mw.MOTIONS]
    lines += [f"<answer>[{v}, {v}, {v + 1}, {v + 1}]</answer>" for v in range(SIZE + 1)]
    return lines


def build_model(seed: int):
    """(random model, processor): the real transformers classes at the sizes of `ARCH`, with a byte-level
    BPE tokenizer trained on `tokenizer_corpus()` plus the answer tags as whole tokens."""
    from mmgrpo.pipelines.vlm.tiny import build_tokenizer, build_vlm

    tokenizer = build_tokenizer(VOCAB_SIZE, tokenizer_corpus(), ANSWER_TAGS)
    return build_vlm("qwen2_vl", seed, sizes=ARCH, tokenizer=tokenizer, max_pixels=SIZE * SIZE)


def make_adapter(model: Any, processor: Any, **kwargs: Any):
    """A full-fine-tuning VLMAdapter over the model (no LoRA layers, no reference copy)."""
    from mmgrpo.pipelines.vlm import VLMAdapter

    options = dict(finetune="full", keep_reference=False, freeze_vision=False, max_new_tokens=MAX_NEW_TOKENS)
    return VLMAdapter(model, processor, **{**options, **kwargs})


# ----------------------------------------------------------------------------- supervised training


def training_items(rng: np.random.Generator, count: int, motion_share: float) -> list[dict[str, Any]]:
    """`count` fresh prompt items from the training seed range, a `motion_share` of them motion clips."""
    items = []
    for _ in range(count):
        task = "motion" if rng.random() < motion_share else "grounding"
        seed = int(rng.integers(mw.SPLIT_OFFSETS["train"], VALIDATION_SEEDS[0]))
        items.append(mw.vlm_item(task, seed))
    return items


def reference_rollout(adapter: Any, items: Sequence[dict[str, Any]]):
    """A Rollout whose completions are the reference answers (for teacher forcing through log_prob)."""
    from mmgrpo.rollout import Rollout

    tokenizer = adapter.tokenizer
    eos = adapter.eos_token_ids[0]
    answers = [tokenizer(answer_text(it), add_special_tokens=False)["input_ids"] + [eos] for it in items]
    n, width = len(items), max(len(a) for a in answers)
    ids = torch.full((n, width), adapter.pad_token_id, dtype=torch.long)  # [n, T]
    for r, answer in enumerate(answers):
        ids[r, : len(answer)] = torch.tensor(answer)
    lengths = torch.tensor([len(a) for a in answers])  # [n]
    keys = [f"sft-{r}" for r in range(n)]
    encoded = {key: adapter._encode(it, r) for r, (key, it) in enumerate(zip(keys, items))}
    mask = torch.arange(width)[None, :] < lengths[:, None]  # [n, T]
    return Rollout(
        group_id=torch.arange(n),
        prompts=list(items),
        samples=[answer_text(it) for it in items],
        log_probs=torch.zeros(n, width),  # [n, T]
        mask=mask,
        extras={
            "prompt_key": keys,
            "completion_ids": ids,  # [n, T]
            "completion_length": lengths,  # [n]
            "temperature": torch.ones(n),  # [n]
            "top_p": torch.ones(n),  # [n]
        },
        shared={"prompt_inputs": encoded},
    )


def train(adapter: Any, settings: dict[str, Any], seed: int, progress: bool = True) -> dict[str, Any]:
    """Teacher-forced NLL of the answers on fresh training scenes, until the validation IoU
    reaches settings["target_iou"] (checked every settings["check_every"] steps) or max_steps.

    Returns {"losses": [per step], "checks": [(step, validation IoU)], "steps": steps taken}.
    The learning rate warms up, then follows a cosine over max_steps down to 10%.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng([seed, 17])
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.01)
    steps, warmup = settings["max_steps"], settings["warmup"]

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    validation = [mw.vlm_item("grounding", VALIDATION_SEEDS[0] + i) for i in range(settings["validation"])]
    losses: list[float] = []
    checks: list[tuple[int, float]] = []
    bar = tqdm(range(steps), desc="sft", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        rollout = reference_rollout(adapter, training_items(rng, settings["batch_size"], settings["motion_share"]))
        log_probs = adapter.log_prob(rollout)  # [n, T]
        mask = rollout.mask.float()  # [n, T]
        loss = -(log_probs * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % settings["check_every"] == 0:
            iou = grounding_iou(adapter, validation, temperature=1.0)
            checks.append((step + 1, iou))
            bar.write(f"step {step + 1}: loss {np.mean(losses[-50:]):.3f}, validation IoU {iou:.3f}")
            if iou >= settings["target_iou"]:
                break
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", val_iou=f"{checks[-1][1]:.3f}" if checks else "-")
    bar.close()
    return {"losses": losses, "checks": checks, "steps": len(losses)}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sample_answers(adapter: Any, items: Sequence[dict[str, Any]], temperature: float, seed: int = 1234,
                   batch_size: int = 64) -> list[str]:
    """One sampled answer per item at `temperature` (the adapter's eval path), fixed generator seed."""
    previous = adapter.eval_temperature
    adapter.eval_temperature = temperature
    generator = torch.Generator().manual_seed(seed)
    samples: list[str] = []
    try:
        for i in range(0, len(items), batch_size):
            samples += adapter.sample(list(items[i : i + batch_size]), 1, generator, evaluate=True).samples
    finally:
        adapter.eval_temperature = previous
    return samples


def grounding_iou(adapter: Any, items: Sequence[dict[str, Any]], temperature: float) -> float:
    from mmgrpo.rewards.iou import IoUReward

    return float(np.mean(IoUReward()(sample_answers(adapter, items, temperature), items)["score"]))


def evaluate(adapter: Any, num_grounding: int, num_motion: int, temperature: float) -> dict[str, float]:
    """Held-out mean IoU (grounding), parse rate and motion accuracy, one sample per prompt."""
    from mmgrpo.rewards.accuracy import AccuracyReward
    from mmgrpo.rewards.iou import IoUReward

    grounding = mw.vlm_prompts("grounding", num_train=0, num_eval=num_grounding)["eval"]
    motion = mw.vlm_prompts("motion", num_train=0, num_eval=num_motion)["eval"]
    scores = IoUReward()(sample_answers(adapter, grounding, temperature), grounding)
    correct = AccuracyReward(mode="exact")(sample_answers(adapter, motion, temperature), motion)
    return {
        "iou": float(np.mean(scores["score"])),
        "parsed": float(np.mean(scores["parsed"])),
        "motion_accuracy": float(np.mean(correct)),
    }


# ----------------------------------------------------------------------------- model card


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_card(out: Path, args: argparse.Namespace, settings: dict[str, Any], info: dict[str, Any]) -> None:
    num_params = info["num_params"]
    scores = info["scores"]
    rows = "\n".join(
        f"| {t} | {s['iou']:.3f} | {s['parsed']:.3f} | {s['motion_accuracy']:.3f} |" for t, s in scores.items()
    )
    command = "python -m mmgrpo.pretrain.vlm" + (" --quick" if args.quick else "") + f" --seed {args.seed}"
    if args.max_steps is not None:
        command += f" --max-steps {args.max_steps}"
    if args.target_iou is not None:
        command += f" --target-iou {args.target_iou}"
    if args.threads != 1:
        command += f" --threads {args.threads}"
    checks = ", ".join(f"{step}: {iou:.3f}" for step, iou in info["checks"]) or "none"
    text = f"""# Embedded tiny VLM (mini-world grounding and motion)

A tiny `Qwen2VLForConditionalGeneration` (transformers' own class) that answers mini-world
questions; the embedded default policy of `mmgrpo train --modality vlm`. It was made from
random weights by `mmgrpo/pretrain/vlm.py` and is decent but imperfect on purpose: GRPO with the
IoU reward has room to improve it.

Rebuild with:

```bash
{command}{"" if args.out is None else f" --out {args.out}"}
```

## Model

- decoder: hidden {ARCH.hidden_size}, {ARCH.num_layers} layers, {ARCH.num_heads} heads \
({ARCH.num_kv_heads} key/value), MLP {ARCH.intermediate_size}, M-RoPE, tied embeddings
- vision tower: Qwen2-VL ViT, patch {ARCH.patch_size}, temporal patch 2, 2x2 merge, width {ARCH.vision_width}, \
{ARCH.vision_depth} blocks
- tokenizer: byte-level BPE `Qwen2Tokenizer`, {info['vocab']} tokens, trained on mini-world questions and
  answers (digits are single tokens, `<answer>`/`</answer>` whole tokens), Qwen-style chat template;
  EOS `<|im_end|>`
- processor: `Qwen2VLProcessor`, images and video frames of at most {SIZE}x{SIZE} pixels (not resized)
- {num_params:,} parameters, float32 safetensors; folder size {info['size_mb']:.2f} MB

## Data and training

Inputs are mini-world scenes rendered at {SIZE}x{SIZE} (`mmgrpo.miniworld.scenes.vlm_item`), seeds drawn from
the training range only, fresh every step:
- grounding: "Where is the red circle?" -> `<answer>[x1, y1, x2, y2]</answer>`, the object's
  box in absolute pixels (x2, y2 exclusive);
- motion ({settings['motion_share']:.0%} of items): 8 frames, "Which way is the green triangle moving?" ->
  `<answer>right</answer>`.

Loss: mean negative log-likelihood of the answer tokens (EOS included), scored by
`VLMAdapter.log_prob` so prompts are encoded exactly as in GRPO. AdamW, lr {settings['lr']}, linear
warmup {settings['warmup']} steps then a cosine over {settings['max_steps']} steps down to 10%, batch
{settings['batch_size']}, seed {args.seed}. Training stops early on purpose, at the first check (every
{settings['check_every']} steps) where the mean IoU on {settings['validation']} validation scenes (seeds
{VALIDATION_SEEDS[0]}-{VALIDATION_SEEDS[1] - 1} of the training range, never drawn for training;
temperature 1) reaches {settings['target_iou']}. Validation IoU by step: {checks}.
It stopped after {info['steps']} steps; final training loss (mean of the last 20 steps): {info['final_loss']:.3f}.

Build time: {info['build_seconds']:.0f} s of training and saving ({info['total_seconds']:.0f} s with the
final evaluation) on {info['machine']}, torch {torch.__version__}, {torch.get_num_threads()} thread(s);
the machine was shared with other jobs while it ran.

## Held-out scores at the end of building

{settings['eval_grounding']} grounding and {settings['eval_motion']} motion prompts from the held-out seeds
(`mmgrpo.miniworld.scenes:vlm_prompts` eval split), one sample each, generator seed 1234; IoU reward
with Qwen2.5-VL absolute coordinates (`mmgrpo.rewards.iou.IoUReward`, image = resized size),
motion scored by exact match of the answer.

| sampling temperature | mean IoU | box parsed | motion accuracy |
|---|---|---|---|
{rows}

## Intended use

Demonstrating and testing GRPO on CPU (`mmgrpo train --modality vlm`). It knows nothing outside the
mini-world.
"""
    (out / "MODEL_CARD.md").write_text(text)


# ----------------------------------------------------------------------------- main


def default_out() -> Path:
    import mmgrpo.assets

    return Path(mmgrpo.assets.__file__).parent / "vlm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the embedded tiny VLM (assets/vlm/).")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the assets/vlm folder)")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="override the step limit")
    parser.add_argument("--target-iou", type=float, default=None, help="override the validation IoU to stop at")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: tiny matrices gain little from more, and lose a lot on a busy machine)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.max_steps is not None:
        settings["max_steps"] = args.max_steps
    if args.target_iou is not None:
        settings["target_iou"] = args.target_iou
    torch.set_num_threads(args.threads)
    out = args.out or default_out()
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    model, processor = build_model(args.seed)
    adapter = make_adapter(model, processor)
    history = train(adapter, settings, args.seed, progress=not args.no_progress)
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    train_seconds = time.perf_counter() - start

    # reload the saved files, the way the trainer will, and score the reloaded model
    from mmgrpo.pipelines.vlm import VLMAdapter

    reloaded = VLMAdapter(str(out), finetune="full", keep_reference=False, max_new_tokens=MAX_NEW_TOKENS)
    scores = {t: evaluate(reloaded, settings["eval_grounding"], settings["eval_motion"], t) for t in EVAL_TEMPERATURES}
    for t, sc in scores.items():
        print(f"held-out at temperature {t}: IoU {sc['iou']:.3f} (parsed {sc['parsed']:.2f}), "
              f"motion accuracy {sc['motion_accuracy']:.3f}")
    info = {
        "num_params": sum(p.numel() for p in model.parameters()),
        "vocab": len(processor.tokenizer),
        "final_loss": float(np.mean(history["losses"][-20:])),
        "steps": history["steps"],
        "checks": history["checks"],
        "build_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "scores": scores,
        "size_mb": 0.0,
    }
    write_card(out, args, settings, info)
    info["size_mb"] = folder_size(out) / 1e6
    write_card(out, args, settings, info)
    print(f"wrote {out} ({info['size_mb']:.2f} MB, {info['num_params']:,} parameters): "
          f"{history['steps']} steps in {train_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
