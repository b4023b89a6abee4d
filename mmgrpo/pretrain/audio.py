"""Build the embedded speech enhancer (assets/audio/): a tiny UNet2DModel trained with FlowMSE's objective.

    python -m mmgrpo.pretrain.audio                   # the shipped asset (minutes on 2 CPU cores)
    python -m mmgrpo.pretrain.audio --quick --out DIR # a smoke build in seconds (what the tests run)

Data: noisy/clean pairs of the mini-world speech set (mmgrpo/miniworld/speech.py: the embedded
espeak-ng corpus, train split, noises white / pink / brown / babble / hum / clicks at -5..15 dB),
drawn with noise seeds of their own (`--seed` + 1, so the GRPO training items of seed 0 are other
noise draws). Each pair is normalised by the noisy peak (as the speech family does) and turned
into latents (pipelines/speech/stft.py); a training example is a random crop of `crop_frames`
STFT frames.

Objective (conditional flow matching on the FlowMSE path, t from 1 = prior to 0 = clean):
    x_t = (1 - t) x0 + t (y + s_max z),  target v = y + s_max z - x0,  t ~ U(t_eps, 1),
z complex with E|z|^2 = 1 (each real channel N(0, 1/2): SpeechEnhancer.prior_std), loss = the
velocity's squared error weighted by t^2, i.e. the MSE of x0_hat = x_t - t v against x0
(`flow_matching_loss`). The UNet predicts x0 as a correction of (1-t) x + t y (SpeechVelocity's
prediction "x0"), so the untrained model already returns its input.
AdamW with a cosine learning rate, an EMA of the weights (what is saved).

Stopped after a fixed number of steps so that the model is decent but imperfect (GRPO needs
room). The baseline of the model card is measured on held-out items (eval split) with the
shipped config's evaluation sampler (FlowAdapter, ODE, `eval_steps`), the same metrics as the
rewards (rewards/speech.py), for the noisy input and for the model.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmgrpo.pipelines.speech.model import SpeechEnhancer, tiny_unet
from mmgrpo.pipelines.speech.stft import frames_for, waveform_to_latents


@dataclass
class Recipe:
    """Sizes and schedule of one build."""

    items: int = 2048  # training pairs (noisy/clean), generated once
    steps: int = 2000
    batch: int = 16
    crop_frames: int = 64  # STFT frames per training example (a multiple of 16; 64 = 0.51 s)
    lr: float = 2e-3
    warmup: int = 50
    ema_decay: float = 0.995
    eval_items: int = 48  # held-out items for the model card's baseline
    eval_steps: int = 3  # the shipped config's sampler (configs/audio.yaml)
    steps_table: list[int] = field(default_factory=lambda: [1, 3, 5, 10])  # the model card's ODE step counts
    widths: list[int] = field(default_factory=lambda: [32, 64, 96])
    patch: int = 4


FULL = Recipe()
QUICK = Recipe(items=8, steps=3, batch=4, warmup=1, eval_items=2, eval_steps=2, steps_table=[1], widths=[8, 16], patch=4)


def training_pairs(count: int, seed: int, corpus: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy, clean) waveforms [count, L] fp32 of the train split, divided by each noisy peak."""
    from mmgrpo.miniworld.speech import speech_item

    items = [speech_item("train", i, seed=seed + 1, corpus=corpus) for i in range(count)]
    noisy = torch.from_numpy(np.stack([it["noisy"] for it in items]))  # [count, L]
    clean = torch.from_numpy(np.stack([it["clean"] for it in items]))  # [count, L]
    peak = noisy.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)  # [count, 1]
    return noisy / peak, clean / peak


def flow_matching_loss(velocity: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, prior_std: float,
                       t_eps: float, generator: torch.Generator) -> torch.Tensor:
    """FlowMSE conditional flow matching (latents [b, 2, F, T]): the velocity's error against
    y + prior_std z - x0, weighted by t^2, i.e. the MSE of x0_hat = x_t - t v against x0. The plain
    velocity MSE is dominated by small t (an x0 error there costs 1/t^2); weighted so, the short CPU
    training spends itself on the early steps that decide what the ODE sampler returns."""
    b = x0.shape[0]
    t = t_eps + (1.0 - t_eps) * torch.rand(b, generator=generator)  # [b] ~ U(t_eps, 1)
    prior = y + prior_std * torch.randn(y.shape, generator=generator)  # [b, 2, F, T]
    tt = t.view(b, 1, 1, 1)
    x_t = (1.0 - tt) * x0 + tt * prior  # [b, 2, F, T]
    x0_hat = x_t - tt * velocity(x_t, y, t)  # [b, 2, F, T]
    return torch.nn.functional.mse_loss(x0_hat, x0)


def train(recipe: Recipe, seed: int = 0, corpus: str | None = None, log_every: int = 100) -> tuple[SpeechEnhancer, dict]:
    """The trained enhancer (EMA weights) and training facts."""
    start = time.time()
    noisy, clean = training_pairs(recipe.items, seed, corpus)  # [I, L] each
    data_seconds = time.time() - start
    velocity = tiny_unet(seed, widths=tuple(recipe.widths), patch=recipe.patch)
    enhancer = SpeechEnhancer(velocity)
    ema = copy.deepcopy(velocity).requires_grad_(False)
    optimizer = torch.optim.AdamW(velocity.parameters(), lr=recipe.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / recipe.warmup) * 0.5 * (
        1.0 + math.cos(math.pi * min(k, recipe.steps) / recipe.steps)))
    generator = torch.Generator().manual_seed(seed)
    frames = frames_for(noisy.shape[1])
    losses: list[float] = []
    for step in range(recipe.steps):
        index = torch.randint(0, recipe.items, (recipe.batch,), generator=generator)  # [b]
        first = torch.randint(0, frames - recipe.crop_frames + 1, (recipe.batch,), generator=generator)  # [b]
        crop = first[:, None] + torch.arange(recipe.crop_frames)  # [b, crop]
        y_full = waveform_to_latents(noisy[index])  # [b, 2, 256, frames]
        pick = crop[:, None, None, :].expand(-1, 2, y_full.shape[2], -1)  # [b, 2, 256, crop]
        y = torch.gather(y_full, 3, pick)  # [b, 2, 256, crop]
        x0 = torch.gather(waveform_to_latents(clean[index]), 3, pick)  # [b, 2, 256, crop]
        loss = flow_matching_loss(velocity, x0, y, enhancer.prior_std, enhancer.t_eps, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(velocity.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), velocity.parameters()):
                e.lerp_(p, 1.0 - decay)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{recipe.steps} loss {np.mean(losses[-log_every:]):.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    enhancer.velocity = ema
    facts = {"train_seconds": round(time.time() - start, 1), "data_seconds": round(data_seconds, 1),
             "final_loss": round(float(np.mean(losses[-min(100, len(losses)):])), 4),
             "params": sum(p.numel() for p in ema.parameters())}
    return enhancer, facts


def baseline(enhancer: SpeechEnhancer, num_items: int, eval_steps: int, seed: int = 1234,
             corpus: str | None = None) -> dict[str, Any]:
    """Held-out metrics of the noisy input and of the model (ODE sampler of the shipped config)."""
    from mmgrpo.miniworld.speech import speech_prompts
    from mmgrpo.pipelines.flow.adapter import FlowAdapter

    items = speech_prompts(num_train=0, num_eval=num_items, corpus=corpus)["eval"]
    adapter = FlowAdapter(enhancer, kernel="ode", num_steps=eval_steps, eval_steps=eval_steps, finetune="full")
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    with torch.no_grad():
        for i in range(0, len(items), 16):
            outputs += adapter.sample(items[i : i + 16], 1, generator, evaluate=True).samples
    noisy = [torch.from_numpy(it["noisy"]) for it in items]
    return {"num_items": len(items), "eval_steps": eval_steps, "eval_seed": seed,
            "noisy": speech_metrics(noisy, items), "model": speech_metrics(outputs, items)}


def speech_metrics(samples: list[torch.Tensor], items: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean PESQ (wb), ESTOI, SI-SDR and DNSMOS of `samples` against the items' clean speech, through
    the rewards of rewards/speech.py (unscored rows excluded from the means)."""
    from mmgrpo.rewards.speech import SpeechQuality

    table = SpeechQuality(with_dnsmos=True)(samples, items)  # {"score", metric: [n] values, None unscored}
    means = {}
    for name in METRIC_COLUMNS:
        values = [v for v in table[name] if v is not None]
        means[name] = round(float(np.mean(values)), 4) if values else None
    return means


def build(out: str | Path, recipe: Recipe, seed: int = 0, command: str = "", corpus: str | None = None) -> dict:
    """Train, save the SpeechEnhancer folder, measure the baseline and write build.json + MODEL_CARD.md."""
    start = time.time()
    enhancer, facts = train(recipe, seed, corpus, log_every=0 if recipe.steps < 100 else 100)
    enhancer.info = {"built_by": command, "seed": seed}
    out = Path(out)
    enhancer.save_pretrained(out)
    size = sum(f.stat().st_size for f in (out / "velocity").iterdir())
    scores = baseline(enhancer, recipe.eval_items, recipe.eval_steps, corpus=corpus)
    scores["model_by_steps"] = {str(n): baseline(enhancer, recipe.eval_items, n, corpus=corpus)["model"]
                                for n in recipe.steps_table}
    record = {"command": command, "seed": seed, "build_seconds": round(time.time() - start, 1), **facts,
              "size_bytes": size, "recipe": asdict(recipe), "baseline": scores,
              "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
              "torch": torch.__version__}
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(record))
    return record


def _row(name: str, scores: dict[str, float | None]) -> str:
    cells = " | ".join("n/a" if scores.get(k) is None else f"{scores[k]:.3f}" for k in METRIC_COLUMNS)
    return f"| {name} | {cells} |"


def _by_steps(baseline: dict[str, Any]) -> str:
    return "\n".join(_row(n, scores) for n, scores in baseline.get("model_by_steps", {}).items())


METRIC_COLUMNS = ("pesq", "estoi", "si_sdr", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl")


def model_card(r: dict[str, Any]) -> str:
    rc, b = r["recipe"], r["baseline"]
    return f"""# Embedded speech enhancer: tiny UNet2DModel, FlowMSE flow matching on the mini-world speech set

Built by `{r['command']}` with `mmgrpo/pretrain/audio.py`; deterministic given the seed on one
machine and thread count.

- What: a `SpeechEnhancer` folder (`speech.json` + `velocity/`, a diffusers `UNet2DModel` saved with its
  own save_pretrained): {r['params']:,} parameters, levels of width {rc['widths']}, {rc['patch']}x{rc['patch']}
  patches of the compressed complex STFT (16 kHz, n_fft 510, hop 128, c = 0.15 |z|^0.5 e^(i angle z)), input
  channels [Re x, Im x, Re y, Im y], timestep t * 999. Prior y + 0.487 z (z complex, E|z|^2 = 1).
- How: conditional flow matching on the FlowMSE path, x_t = (1-t) x0 + t (y + s_max z), target
  y + s_max z - x0, t ~ U(0.03, 1), the squared error weighted by t^2 (the MSE of x0_hat = x_t - t v); the
  UNet corrects the best linear estimate of the clean latents (SpeechVelocity prediction "x0"); {rc['items']} noisy/clean training pairs of the mini-world speech set
  (train utterances, noises white/pink/brown/babble/hum/clicks at -5..15 dB, noise seeds apart from GRPO's),
  random crops of {rc['crop_frames']} frames, {rc['steps']} steps of batch {rc['batch']}, AdamW lr {rc['lr']}
  (cosine), EMA {rc['ema_decay']} (saved). Final loss {r['final_loss']}. Stopped early on purpose: decent
  but imperfect, so GRPO has room.
- Size: {r['size_bytes'] / 1e6:.2f} MB (safetensors, fp32).
- Build wall time: {r['build_seconds']:.0f} s ({r['torch_threads']} torch thread(s), a shared 2-core CPU).
- Baseline on {b['num_items']} held-out items (eval utterances and noise seeds), ODE sampler with
  {b['eval_steps']} steps (FlowMSE's grid linspace(1, 0.03, N) then 0), seed {b['eval_seed']}:

| | PESQ (wb) | ESTOI | SI-SDR (dB) | DNSMOS SIG | DNSMOS BAK | DNSMOS OVRL |
|---|---|---|---|---|---|---|
{_row("noisy input", b['noisy'])}
{_row("model", b['model'])}

- The same items with other numbers of Euler steps. Fewer steps score better on this model (probably
  because each step passes on part of the prior noise the model does not remove, which PESQ punishes
  hardest), hence the 3-step sampler of configs/audio.yaml:

| ODE steps | PESQ (wb) | ESTOI | SI-SDR (dB) | DNSMOS SIG | DNSMOS BAK | DNSMOS OVRL |
|---|---|---|---|---|---|---|
{_by_steps(b)}

- Load: `SpeechEnhancer.from_pretrained(path)` (mmgrpo.pipelines.speech), `FlowAdapter(path=path)`, or
  `mmgrpo train --modality audio` (configs/audio.yaml names it `asset:audio`).

## GRPO on this model
Not part of the build: run `mmgrpo train --modality audio --out DIR` and read DIR/eval.json.
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmgrpo.pretrain.audio", description="Build the embedded speech enhancer.")
    parser.add_argument("--out", default=None, help="output folder (default: the package's assets/audio)")
    parser.add_argument("--quick", action="store_true", help="a few steps only (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--corpus", default=None, help="a clean-speech corpus folder (default: assets/speech_corpus)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out is None:
        from mmgrpo import assets

        args.out = str(Path(assets.__file__).parent / "audio")
    command = "python -m mmgrpo.pretrain.audio" + (" --quick" if args.quick else "") + (
        f" --seed {args.seed}" if args.seed else "")
    return build(args.out, QUICK if args.quick else FULL, seed=args.seed, command=command, corpus=args.corpus)


if __name__ == "__main__":
    main()
    sys.exit(0)
