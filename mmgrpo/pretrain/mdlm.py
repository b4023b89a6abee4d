"""Build the embedded tiny masked-diffusion LM (assets/mdlm/): a BertForMaskedLM on the reasoning tasks.

    python -m mmgrpo.pretrain.mdlm                        # the shipped asset (minutes on 1 CPU thread)
    python -m mmgrpo.pretrain.mdlm --quick --out DIR      # a smoke build in seconds (what the tests run)

The model is transformers' own `BertForMaskedLM` (bidirectional attention) built from `ARCH`, with the
character tokenizer of `pipelines/mdlm/tiny.py`. It learns the three reasoning tasks of
`mmgrpo.miniworld.reasoning` (4x4 Sudoku, arithmetic, Countdown) from training-split items only, with the
masked-diffusion objective: per row t ~ U(0, 1), each of the GEN_LENGTH answer tokens (the answer, then
[EOS] up to GEN_LENGTH) masked with probability t, loss = the masked tokens' negative log-probs weighted
1/t (estimators.masked_diffusion_loss). Rows of one batch share their prompt length (no padding, as the
adapter samples). Training stops early on purpose, at the first check where the accuracy on validation
items (training-split prompts that training never draws) reaches `target_accuracy` sampling as the GRPO
default does: decent but imperfect, so GRPO has room. Afterwards the saved folder is reloaded through
`MaskedDiffusionAdapter` and scored on the held-out split; the numbers go to MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from mmgrpo.miniworld.reasoning import TASKS, reasoning_items
from mmgrpo.pipelines.mdlm.estimators import masked_diffusion_loss, token_log_probs
from mmgrpo.pipelines.mdlm.tiny import char_tokenizer, tiny_masked_lm
from mmgrpo.miniworld.reasoning import ALPHABET

ARCH = {"hidden": 128, "layers": 4, "heads": 4, "max_length": 48}
GEN_LENGTH = 16  # completion canvas: the longest answer (a 16-cell Sudoku grid) fits exactly
# the embedded default's tasks (configs/mdlm.yaml data.kwargs.difficulty): two-digit arithmetic, 2-5 Sudoku blanks
DIFFICULTY = {"arithmetic": {"max_digits": 2}, "sudoku": {"min_blanks": 2, "max_blanks": 5}}
SAMPLING = {"gen_length": GEN_LENGTH, "block_length": 8, "steps": 8, "temperature": 1.0}  # as configs/mdlm.yaml
# t ~ U(T_MIN, 1): LLaDA's eps is 1e-3, whose 1/t weights up to 1000 make a tiny batch's loss spike whenever a
# near-clean row has a masked token; 0.1 bounds the weights at 10 (still ~1.6 of 16 tokens masked at the low end)
T_MIN = 0.1
SETTINGS = {"lr": 1e-3, "warmup": 200, "batch": 64, "max_steps": 6000, "check_every": 250, "target_accuracy": 0.35,
            "num_items": 60000, "num_validation": 192, "data_seed": 11, "validation_seed": 12}  # fmt: skip
QUICK = {**SETTINGS, "max_steps": 6, "check_every": 3, "num_items": 300, "num_validation": 12}


def encode(tokenizer: Any, item: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + [EOS] padding to GEN_LENGTH) of one item."""
    prompt = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(item["answer"], add_special_tokens=False)["input_ids"]
    if len(answer) > GEN_LENGTH:
        raise ValueError(f"answer {item['answer']!r} is longer than GEN_LENGTH={GEN_LENGTH}")
    return prompt, answer + [tokenizer.eos_token_id] * (GEN_LENGTH - len(answer))


def buckets(tokenizer: Any, items: Sequence[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompts [m, P], answers [m, GEN_LENGTH]) per prompt length P."""
    by_length: dict[int, list[tuple[list[int], list[int]]]] = {}
    for item in items:
        prompt, answer = encode(tokenizer, item)
        by_length.setdefault(len(prompt), []).append((prompt, answer))
    return [(torch.tensor([p for p, _ in rows]), torch.tensor([a for _, a in rows])) for _, rows in sorted(by_length.items())]


def make_adapter(model: Any, tokenizer: Any, **kwargs: Any) -> Any:
    from mmgrpo.pipelines.mdlm import MaskedDiffusionAdapter

    return MaskedDiffusionAdapter(model, tokenizer, finetune="full", keep_reference=False, **{**SAMPLING, **kwargs})


def accuracy(adapter: Any, items: Sequence[dict[str, Any]], seed: int = 1234, **sampling: Any) -> dict[str, float]:
    """Share of items solved (one sample each, generator `seed`), overall and per task, plus the format share."""
    from mmgrpo.rewards.reasoning import reasoning_accuracy, reasoning_format

    for key, value in sampling.items():
        setattr(adapter.options, key, value)
    rollout = adapter.sample(list(items), 1, torch.Generator().manual_seed(seed))
    tasks = [item["task"] for item in items]
    meta = {key: [item.get(key) for item in items] for key in ("answer", "puzzle", "numbers", "target")}
    right = reasoning_accuracy(rollout.samples, items, task=tasks, **meta)
    shaped = reasoning_format(rollout.samples, items, task=tasks)
    out = {"accuracy": sum(right) / len(right), "format": sum(shaped) / len(shaped)}
    for task in TASKS:
        scores = [r for r, t in zip(right, tasks) if t == task]
        if scores:
            out[task] = sum(scores) / len(scores)
    return out


def train(model: Any, tokenizer: Any, settings: dict[str, Any], seed: int, progress: bool = True) -> dict[str, Any]:
    """Masked-diffusion training until the validation accuracy reaches the target (or max_steps)."""
    items = reasoning_items("train", settings["num_items"], seed=settings["data_seed"], distinct=False,
                            difficulty=DIFFICULTY)
    data = buckets(tokenizer, items)
    seen = {item["prompt"] for item in items}
    validation = reasoning_items("train", settings["num_validation"], seed=settings["validation_seed"],
                                 difficulty=DIFFICULTY)
    validation = [item for item in validation if item["prompt"] not in seen]  # never trained on
    sizes = torch.tensor([float(len(p)) for p, _ in data])
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01)
    total = settings["max_steps"]

    def factor(i: int) -> float:  # linear warmup, then cosine to 10% over max_steps
        if i < settings["warmup"]:
            return (i + 1) / settings["warmup"]
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (i - settings["warmup"]) / max(1, total - settings["warmup"]))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    mask_id = tokenizer.mask_token_id
    history, losses, step = [], [], 0
    start = time.perf_counter()
    while step < total:
        bucket = int(torch.multinomial(sizes, 1, generator=g))
        prompts, answers = data[bucket]
        rows = torch.randint(len(prompts), (settings["batch"],), generator=g)
        prompt, answer = prompts[rows], answers[rows]  # [n, P], [n, Lc]
        # stratified t over the batch (one draw per 1/n stratum): the same U(eps, 1) marginal, far less variance
        # of the 1/t-weighted loss than independent draws
        u = (torch.rand(1, generator=g) + torch.arange(len(rows))) / len(rows)  # [n]
        t = (T_MIN + (1 - T_MIN) * u)[torch.randperm(len(rows), generator=g)][:, None]  # [n, 1]
        masked = torch.rand(answer.shape, generator=g) < t  # [n, Lc]
        canvas = torch.cat([prompt, torch.where(masked, mask_id, answer)], dim=1)  # [n, P + Lc]
        model.train()
        logits = model(input_ids=canvas).logits[:, prompt.shape[1]:]  # [n, Lc, V]
        loss = masked_diffusion_loss(token_log_probs(logits, answer), masked, t[:, 0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        step += 1
        if step % settings["check_every"] == 0 or step == total:
            model.eval()
            with torch.no_grad():
                score = accuracy(make_adapter(model, tokenizer), validation)["accuracy"]
            history.append((step, round(score, 3)))
            if progress:
                print(f"step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}, validation accuracy {score:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
            if score >= settings["target_accuracy"]:
                break
    model.eval()
    return {"steps": step, "history": history, "loss": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": time.perf_counter() - start, "num_validation": len(validation)}  # fmt: skip


def write_card(out: Path, settings: dict[str, Any], info: dict[str, Any], seed: int) -> None:
    params = info["parameters"]
    history = ", ".join(f"{s}: {a:.3f}" for s, a in info["history"])
    rows = "\n".join(f"| {name} | {r['accuracy']:.3f} | {r.get('sudoku', 0):.3f} | {r.get('arithmetic', 0):.3f} | "
                     f"{r.get('countdown', 0):.3f} | {r['format']:.3f} |" for name, r in info["held_out"].items())
    text = f"""# Embedded tiny masked-diffusion LM (4x4 Sudoku, arithmetic, Countdown)

A tiny `BertForMaskedLM` (transformers' own class, bidirectional attention) that fills a masked answer canvas
the way LLaDA does; the embedded default policy of `mmgrpo train --modality mdlm`. It was made from random
weights by `mmgrpo/pretrain/mdlm.py` and is decent but imperfect on purpose: GRPO has room to improve it.

Rebuild with:

```bash
python -m mmgrpo.pretrain.mdlm --seed {seed}
```

## Model

- BertForMaskedLM: hidden {ARCH['hidden']}, {ARCH['layers']} layers, {ARCH['heads']} heads, MLP {4 * ARCH['hidden']}, \
{ARCH['max_length']} positions, no dropout
- tokenizer: one token per character of `{ALPHABET}` plus [PAD] [UNK] [MASK] [EOS] (tokenizers WordLevel,
  saved as a PreTrainedTokenizerFast; `AutoTokenizer.from_pretrained(folder)`)
- {params:,} parameters, float32 safetensors; folder size {info['size_mb']:.2f} MB

## Data and training

Items of `mmgrpo.miniworld.reasoning` from the training split only (prompts the hash puts in the held-out
split are never generated): {settings['num_items']} items (seed {settings['data_seed']}, repeats allowed), the three
tasks in turn, at the embedded default's difficulty `{json.dumps(DIFFICULTY)}` (two-digit operands, 2-5 Sudoku
blanks, Countdown over 3 numbers of 1-9). Prompt `S:1.3442..2..134.1=` / `A:47+38=` / `C:3,5,7>22=`; answer canvas
of {GEN_LENGTH} tokens: the answer, then [EOS].

Objective (masked diffusion, LLaDA's SFT loss): per row t ~ U({T_MIN}, 1) (stratified over the batch), each answer
token masked with probability t,
loss = sum over masked tokens of -log p(token | canvas) / t, divided by {GEN_LENGTH}; the prompt is never masked.
AdamW lr {settings['lr']}, weight decay 0.01, warmup {settings['warmup']} steps then a cosine to 10% over
{settings['max_steps']} steps, batch {settings['batch']} (rows of one batch share their prompt length), gradient
clip 1.0, seed {seed}. Training stops early on purpose, at the first check (every {settings['check_every']} steps)
where the accuracy on {info['num_validation']} validation items (training-split prompts never trained on; one
sample each with the GRPO default's sampler) reaches {settings['target_accuracy']}. Validation accuracy by step:
{history}. It stopped after {info['steps']} steps; final training loss (mean of the last 20 steps): {info['loss']:.3f}.

Build time: {info['seconds']:.0f} s of training on {platform.machine()} CPU, {os.cpu_count()} cores, torch
{torch.__version__}, {torch.get_num_threads()} thread(s); the machine was shared with other jobs while it ran.

## Held-out scores at the end of building

{info['num_held_out']} held-out items (`mmgrpo.miniworld.reasoning:reasoning_prompts` eval split, seed 0, the
first {info['num_held_out']}: the held-out prompts of `mmgrpo train --modality mdlm`), one sample each, generator
seed 1234, sampler: gen_length {GEN_LENGTH}, blocks of {SAMPLING['block_length']}, {SAMPLING['steps']} steps,
low-confidence remasking; exact checkers (`mmgrpo.rewards.reasoning`).

| sampling | accuracy | sudoku | arithmetic | countdown | well-formed |
|---|---|---|---|---|---|
{rows}

## Intended use

Demonstrating and testing masked-diffusion GRPO on CPU (`mmgrpo train --modality mdlm`). It knows nothing
outside the three toy tasks.
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def default_out() -> Path:
    return Path(__file__).resolve().parents[2] / "assets" / "mdlm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the embedded tiny masked-diffusion LM (assets/mdlm/).")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the assets/mdlm folder)")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="override the step limit")
    parser.add_argument("--target-accuracy", type=float, default=None, help="override the validation accuracy to stop at")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for this size)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else SETTINGS)
    if args.max_steps is not None:
        settings["max_steps"] = args.max_steps
    if args.target_accuracy is not None:
        settings["target_accuracy"] = args.target_accuracy
    out = args.out or default_out()
    tokenizer = char_tokenizer(ALPHABET)
    model = tiny_masked_lm(len(tokenizer), seed=args.seed, **ARCH)
    info = train(model, tokenizer, settings, args.seed, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    from mmgrpo.miniworld.reasoning import reasoning_prompts
    from mmgrpo.pipelines.mdlm import MaskedDiffusionAdapter

    held_out = reasoning_prompts(num_train=0, num_eval=12 if args.quick else 192, difficulty=DIFFICULTY)["eval"]
    adapter = MaskedDiffusionAdapter(str(out), finetune="full", keep_reference=False, **SAMPLING)
    info["held_out"] = {"temperature 1.0": accuracy(adapter, held_out),
                        "greedy (temperature 0)": accuracy(adapter, held_out, temperature=0.0)}  # fmt: skip
    info.update(parameters=sum(p.numel() for p in model.parameters()), num_held_out=len(held_out),
                size_mb=folder_size(out) / 1e6)  # fmt: skip
    write_card(out, settings, info, args.seed)
    (out / "build.json").write_text(json.dumps({k: v for k, v in info.items()}, indent=2) + "\n")
    print(json.dumps(info["held_out"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
