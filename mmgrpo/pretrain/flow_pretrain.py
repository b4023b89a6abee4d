"""Pretraining of the embedded flow-matching models (assets/image, assets/video) on the mini-world.

Shared by `python -m mmgrpo.pretrain.image` (a StableDiffusion3Pipeline, 32x32 images) and
`python -m mmgrpo.pretrain.video` (a WanPipeline, 9 frames of 32x32). Both are assembled by the
builders of pipelines/flow/tiny.py (the REAL diffusers / transformers classes, small sizes), then
trained in two stages:

1. the VAE learns to reconstruct mini-world images / clips (L1 + MSE + a tiny KL; the video
   VAE weights object pixels 10x, since objects cover ~10% of a black frame and an all-black
   decoder is a strong trap, and trains on pixels in [-0.9, 0.9] because its decoder clamps
   its output to [-1, 1], which stops gradients once it undershoots). It is
   shallow. SD3: two levels, one 2x downsample, no mid-block attention (32x32x3 pixels -> 16x16x4
   latents; the transformer patchifies 2x2, 64 tokens). Wan: one 2x spatial downsample (-> 16x16x4, so
   its mid-block attention is cheap; the transformer patchifies 1x4x4), and it does not
   compress time (Wan 2.1 compresses it 4x, 81 -> 21 latent frames; its causal
   scheme still encodes frame 1 alone, then chunks of 4, so clips have 1 + 4k frames):
   the mini-world's 8-frame clips are rendered at 9 frames (linear motion, resampled) ->
   9 latent frames. Training on 2-core CPUs is what forced this: the causal 3D convolutions
   of a downsampling Wan VAE cost 10-20 s per step here.
2. the latents of the training set are encoded once (the posterior mode), the latent scale
   is fitted (SD3: scaling/shift factors; Wan: per-channel latents_mean / latents_std), and the
   transformer learns the rectified-flow objective: x = (1 - s) x0 + s eps, target v = eps - x0,
   s ~ sigmoid(N(0, 1)) (SD3's logit-normal), 10% of captions dropped to "" so CFG works.
   The text encoders are random and frozen (whole-word tokenizers built for the mini-world
   vocabulary): the transformer learns to read them; caption embeddings are computed once.

Training stops after a fixed number of steps chosen so that samples are decent but imperfect
(held-out scene score roughly 0.3-0.6), leaving GRPO room. Everything is seeded from --seed
(torch generators, numpy seeds of the mini-world): the same command on the same machine and
thread count gives the same weights. The result is saved with the pipeline's save_pretrained
(safetensors) plus MODEL_CARD.md with the command, size, build time and baseline scores
(held-out prompts, the sampler settings of the shipped config).
"""

from __future__ import annotations

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
import torch.nn.functional as F

from mmgrpo import miniworld as mw

# Every word of the mini-world caption grammar, so each is one token.
MINIWORLD_WORDS = " ".join(
    ["a", "two", "three", "and", "of", "left", "right", "above", "moving", "up", "down"]
    + list(mw.COLORS) + list(mw.SHAPES) + [s + "s" for s in mw.SHAPES]
)
TEXT_LEN = 16  # tokens per caption (max_sequence_length of the shipped configs; the longest caption has 10)
VIDEO_FRAMES = 9  # 1 + 4 * 2: the frame counts the Wan VAE causal scheme accepts


@dataclass
class Recipe:
    """Sizes and schedule of one build (see FULL / QUICK in image.py and video.py)."""

    kind: str  # "image" | "video"
    num_scenes: int = 4096  # training scenes (train seed range of the mini-world)
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_frames: int = 5  # clips: VAE training windows of this many frames (1 + 4k)
    vae_fg_weight: float = 0.0  # extra loss weight on object pixels (objects cover ~10%: black is a trap)
    pixel_scale: float = 1.0  # VAE targets in [-scale, scale]: the Wan decoder clamps to [-1, 1], and a
    #   decoder that undershoots -1 everywhere gets no gradient through the clamp (it stays black)
    steps: int = 3000  # transformer steps
    batch: int = 64
    lr: float = 1e-3
    caption_dropout: float = 0.1
    caption_noise: float = 0.0  # share of training scenes captioned with another scene's caption (noisy_captions)
    eval_prompts: int = 32
    eval_steps: int = 20
    guidance_scale: float = 1.0
    width: dict[str, int] = field(default_factory=dict)  # model sizes, see build_image_pipeline / build_video_pipeline


# ----------------------------------------------------------------------------- models


def build_image_pipeline(seed: int = 0, width: dict[str, int] | None = None):
    """The untrained StableDiffusion3Pipeline for 32x32 images (pipelines/flow/tiny.py assembles it).

    An AutoencoderKL with `vae_levels` levels (each level past the first halves the resolution:
    2 -> 16x16x4 latents), no mid-block attention; the SD3 transformer over the latents in `patch` x
    `patch` patches (16x16 in 2x2 -> 64 tokens); two CLIP text encoders of width `text` and a T5 of
    width 2 * `text` (the two CLIP states concatenated; diffusers cannot reload an SD3 pipeline
    saved without one). Latent shift and scale start at 0 and 1: encode_latents fits them.
    """
    from mmgrpo.pipelines.flow.tiny import SD3Sizes, TextSizes, tiny_sd3_pipeline

    w = {"dim": 64, "layers": 4, "heads": 4, "text": 32, "vae": 32, "vae_levels": 1, "patch": 4, **(width or {})}
    text = TextSizes(words=MINIWORLD_WORDS, max_length=TEXT_LEN, clip_width=w["text"], t5_width=2 * w["text"],
                     t5_head_width=16, t5_ff=2 * w["text"])
    sizes = SD3Sizes(image_size=32, dim=w["dim"], heads=w["heads"], layers=w["layers"], patch=w["patch"],
                     vae_levels=w["vae_levels"], vae_width=w["vae"], vae_groups=4, vae_attention=False,
                     vae_shift=0.0, vae_scale=1.0, scheduler_shift=2.0)
    return tiny_sd3_pipeline(seed, text=text, sizes=sizes)


def build_video_pipeline(seed: int = 0, width: dict[str, int] | None = None):
    """The untrained WanPipeline for 9x32x32 clips (pipelines/flow/tiny.py assembles it): the Wan
    transformer over 9x16x16x4 latents in 1x4x4 patches (144 tokens), an AutoencoderKLWan with one
    2x spatial downsample (none in time), a 2-layer UMT5 (gated GELU, as UMT5 ships) of width `text`."""
    from mmgrpo.pipelines.flow.tiny import TextSizes, WanSizes, tiny_wan_pipeline

    w = {"dim": 64, "layers": 3, "heads": 4, "text": 32, "vae": 16, "patch": 4, **(width or {})}
    text = TextSizes(words=MINIWORLD_WORDS, max_length=TEXT_LEN, t5_width=w["text"], t5_head_width=16,
                     t5_ff=2 * w["text"], t5_layers=2, t5_feed_forward="gated-gelu")
    sizes = WanSizes(dim=w["dim"], heads=w["heads"], layers=w["layers"], patch=w["patch"], freq_dim=32,
                     vae_width=w["vae"], vae_temporal_downsample=(False,), scheduler_shift=2.0)
    return tiny_wan_pipeline(seed, text=text, sizes=sizes)


def build_pipeline(kind: str, seed: int = 0, width: dict[str, int] | None = None):
    return build_image_pipeline(seed, width) if kind == "image" else build_video_pipeline(seed, width)


# ----------------------------------------------------------------------------- data


def scenes(kind: str, n: int, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """n mini-world scenes rendered in [-1, 1]: images [n, 3, 32, 32] or clips [n, 3, 9, 32, 32], and captions."""
    items = mw.prompt_set(kind, split=split, n=n)
    if kind == "image":
        pix = np.stack([mw.render(it) for it in items])  # [n, H, W, 3] uint8
        x = torch.from_numpy(pix).permute(0, 3, 1, 2)  # [n, 3, H, W]
    else:
        pix = np.stack([mw.render_clip(it, frames=VIDEO_FRAMES) for it in items])  # [n, F, H, W, 3]
        x = torch.from_numpy(pix).permute(0, 4, 1, 2, 3)  # [n, 3, F, H, W]
    return x.float() / 127.5 - 1.0, [it["prompt"] for it in items]


def noisy_captions(captions: list[str], fraction: float, seed: int) -> list[str]:
    """A copy of `captions` in which round(fraction * n) of them, chosen with `seed`, are the caption
    of another (random) scene.

    Web-scale text-to-image data pairs many images with captions that do not describe them, and
    models trained on it render well but follow their prompt only part of the time: the failure
    GRPO is known to fix. Noisy captions give the embedded models that failure, instead of the
    blur of an undertrained model, which no reward on its samples can tell apart from noise.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"caption_noise must be in [0, 1), got {fraction}")
    n = len(captions)
    rng = np.random.default_rng(seed + 3)
    swapped = rng.permutation(n)[: round(fraction * n)]  # [m] scenes that get another caption
    donors = rng.integers(0, n - 1, len(swapped))  # [m] another scene each: skip the scene itself
    donors = donors + (donors >= swapped)
    out = list(captions)
    for i, d in zip(swapped.tolist(), donors.tolist()):
        out[i] = captions[d]
    return out


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(range(total), desc=desc, mininterval=2.0)


def warmup_cosine(base_lr: float, step: int, steps: int, warmup: int, floor: float) -> float:
    """The learning rate at `step`: a linear warmup over `warmup` steps times a cosine from 1 to `floor`."""
    cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
    return base_lr * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * cosine)


def _descend(opt: torch.optim.Optimizer, module: torch.nn.Module, loss: torch.Tensor, lr: float) -> None:
    """One optimizer step on `loss` at `lr`, the gradient norm clipped to 1."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()


def _smoothed(average: float, value: torch.Tensor, weight: float) -> float:
    """An exponential moving average that starts at the first value (`average` is NaN before it)."""
    value = float(value.detach())
    return (1 - weight) * average + weight * value if average == average else value


# ----------------------------------------------------------------------------- stage 1: VAE


def train_vae(pipe: Any, kind: str, pixels: torch.Tensor, recipe: Recipe, seed: int) -> float:
    """Reconstruction training of pipe.vae; returns the final mean-abs reconstruction error (0..2 scale)."""
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    err = float("nan")
    bar = _progress(recipe.vae_steps, f"{kind} VAE")
    for step in bar:
        idx = torch.randint(0, len(pixels), (recipe.vae_batch,), generator=gen)  # [b]
        x = pixels[idx]  # [b, 3, (F,) H, W]
        if x.ndim == 5 and recipe.vae_frames:  # clips: a random window of 1 + 4k frames
            start = int(torch.randint(0, x.shape[2] - recipe.vae_frames + 1, (1,), generator=gen))
            x = x[:, :, start : start + recipe.vae_frames]
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen)  # [b, C, (f,) h, w]
        z = posterior.mean + posterior.std * eps
        rec = vae.decode(z).sample  # [b, 3, (F,) H, W]
        weight = 1.0 + recipe.vae_fg_weight * (x.amax(dim=1, keepdim=True) > -0.9).float()  # [b, 1, (F,) H, W]
        l1 = (rec - x).abs().mean()
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = (weight * ((rec - x).abs() + (rec - x) ** 2)).mean() / weight.mean() + 1e-4 * kl
        _descend(opt, vae, loss, warmup_cosine(recipe.vae_lr, step, recipe.vae_steps, warmup=50, floor=0.1))
        err = _smoothed(err, l1, 0.1)
        if step % 5 == 0:
            bar.set_postfix(l1=f"{err:.4f}")
    vae.eval().requires_grad_(False)
    return err


@torch.no_grad()
def encode_latents(pipe: Any, kind: str, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior modes of all training scenes, normalised as the pipeline expects; also
    writes the fitted scale into the VAE config (SD3: scaling/shift factor; Wan: mean/std per channel)."""
    vae = pipe.vae
    z = torch.cat([vae.encode(pixels[i : i + 64]).latent_dist.mode() for i in range(0, len(pixels), 64)])  # [n, C, ...]
    if kind == "image":
        shift, scale = float(z.mean()), float(1.0 / z.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        return (z - shift) * scale  # [n, 4, 16, 16]
    dims = [0, 2, 3, 4]
    mean, std = z.mean(dims), z.std(dims)  # [C] each
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return (z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)  # [n, 4, 5, 16, 16]


# ----------------------------------------------------------------------------- stage 2: transformer


def flow_family(pipe: Any, kind: str) -> Any:
    """The FlowAdapter's family object for `pipe` (pipelines/flow/families.py), at the shipped sizes:
    pretraining encodes captions and calls the transformer exactly as GRPO sampling does."""
    from mmgrpo.pipelines.flow.families import family_for
    from mmgrpo.pipelines.flow.options import FlowOptions

    _, family = family_for(pipe)
    frames = VIDEO_FRAMES if kind == "video" else None
    return family(pipe, FlowOptions(max_sequence_length=TEXT_LEN, height=32, width=32, num_frames=frames))


@torch.no_grad()
def caption_embeddings(pipe: Any, kind: str, captions: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{caption: {name: tensor [1, ...]}} for every distinct caption and "" (the CFG negative),
    through the family's encode (the pipeline's own encode_prompt, as in the FlowAdapter)."""
    family = flow_family(pipe, kind)
    distinct = sorted(set(captions) | {""})
    out: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(0, len(distinct), 128):
        chunk = distinct[i : i + 128]
        parts = family.encode(chunk, torch.device("cpu"))  # each [b, ...]
        for j, text in enumerate(chunk):
            out[text] = {k: v[j : j + 1] for k, v in parts.items()}
    return out


def train_transformer(pipe: Any, kind: str, latents: torch.Tensor, captions: list[str], recipe: Recipe, seed: int) -> float:
    """Rectified-flow training of pipe.transformer on (latents, captions); returns the final loss (EMA)."""
    table = caption_embeddings(pipe, kind, captions)
    family = flow_family(pipe, kind)
    names = list(table[""])
    stacked = {k: torch.cat([table[c][k] for c in captions]) for k in names}  # each [n, ...]
    empty = table[""]
    model = pipe.transformer
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed + 2)
    ema = float("nan")
    bar = _progress(recipe.steps, f"{kind} transformer")
    for step in bar:
        idx = torch.randint(0, len(latents), (recipe.batch,), generator=gen)  # [b]
        x0 = latents[idx]  # [b, C, ...]
        drop = torch.rand(recipe.batch, generator=gen) < recipe.caption_dropout  # [b]
        emb = {}
        for k in names:
            e = stacked[k][idx].clone()  # [b, ...]
            e[drop] = empty[k].expand(int(drop.sum()), *empty[k].shape[1:])
            emb[k] = e
        sigma = torch.sigmoid(torch.randn(recipe.batch, generator=gen))  # [b] logit-normal
        eps = torch.randn(x0.shape, generator=gen)  # [b, C, ...]
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        x = (1 - s) * x0 + s * eps
        v = family.forward(model, x, sigma, emb)  # [b, C, ...]
        loss = F.mse_loss(v.float(), eps - x0)
        _descend(opt, model, loss, warmup_cosine(recipe.lr, step, recipe.steps, warmup=100, floor=0.05))
        ema = _smoothed(ema, loss, 0.02)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
    model.eval().requires_grad_(False)
    return ema


# ----------------------------------------------------------------------------- evaluation


def evaluate(path: str | Path, kind: str, *, num_prompts: int, eval_steps: int, guidance_scale: float,
             seed: int = 1234, batch_size: int = 16, clip: bool = True) -> dict[str, Any]:
    """Held-out scene score (and CLIPScore when the embedded CLIP is built) of the saved pipeline,
    sampled the way the trainer's evaluation does (FlowAdapter, all-ODE, eval_steps, fixed seed)."""
    from mmgrpo.pipelines.flow.adapter import FlowAdapter
    from mmgrpo.rewards.scene import SceneReward

    adapter = FlowAdapter(path=str(path), finetune="full", eval_steps=eval_steps, guidance_scale=guidance_scale,
                          max_sequence_length=TEXT_LEN, num_frames=VIDEO_FRAMES if kind == "video" else None,
                          height=32, width=32)
    prompts = mw.prompt_set(kind, split="heldout", n=num_prompts)
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(0, len(prompts), batch_size):
        samples += adapter.sample(prompts[i : i + batch_size], 1, gen, evaluate=True).samples
    scene = SceneReward()(samples, prompts)
    out: dict[str, Any] = {"num_prompts": num_prompts, "eval_steps": eval_steps, "guidance_scale": guidance_scale,
                           "eval_seed": seed}
    for k, vals in scene.items():
        vals = [v for v in vals if v is not None]
        out[f"scene/{k}"] = round(float(np.mean(vals)), 4) if vals else None
    out["clip_score"] = None
    if clip:
        try:
            from mmgrpo.rewards.clip_score import CLIPScore

            scores = [s for s in CLIPScore()(samples, prompts) if s is not None]
            out["clip_score"] = round(float(np.mean(scores)), 3) if scores else None
        except (ImportError, FileNotFoundError, ValueError, RuntimeError) as e:
            out["clip_score_error"] = str(e).splitlines()[0][:200]
    out["_samples"] = samples
    return out


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _contact_sheet(samples: list[torch.Tensor], path: Path, kind: str) -> None:
    """A PNG grid of the first samples (images; for clips every frame of a row)."""
    from PIL import Image

    rows = []
    for s in samples[:8]:
        s = s.clamp(0, 1)
        if kind == "image":
            rows.append(s)  # [3, H, W]
        else:
            rows.append(torch.cat(list(s), dim=2))  # [3, H, F*W]
    grid = torch.cat(rows, dim=2 if kind == "image" else 1)  # [3, H', W']
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


# ----------------------------------------------------------------------------- the build


def build(kind: str, out: str | Path, recipe: Recipe, *, seed: int = 0, command: str = "", card: bool = True) -> dict[str, Any]:
    """Build, pretrain, save and evaluate one embedded flow model; returns the build record."""
    out = Path(out)
    t0 = time.time()
    pipe = build_pipeline(kind, seed, recipe.width)
    print(f"[build {kind}] transformer {sum(p.numel() for p in pipe.transformer.parameters()):,} params, "
          f"vae {sum(p.numel() for p in pipe.vae.parameters()):,} params", flush=True)
    pixels, captions = scenes(kind, recipe.num_scenes)
    captions = noisy_captions(captions, recipe.caption_noise, seed)
    pixels = pixels * recipe.pixel_scale
    vae_err = train_vae(pipe, kind, pixels, recipe, seed)
    t_vae = time.time() - t0
    latents = encode_latents(pipe, kind, pixels)
    del pixels
    loss = train_transformer(pipe, kind, latents, captions, recipe, seed)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    wall = time.time() - t0
    print(f"[build {kind}] saved to {out} in {wall:.0f} s; evaluating", flush=True)
    result = evaluate(out, kind, num_prompts=recipe.eval_prompts, eval_steps=recipe.eval_steps,
                      guidance_scale=recipe.guidance_scale)
    samples = result.pop("_samples")
    record = {
        "kind": kind, "seed": seed, "command": command, "build_seconds": round(wall, 1),
        "vae_seconds": round(t_vae, 1), "vae_l1": round(vae_err, 4), "flow_loss": round(loss, 4),
        "size_bytes": _dir_size(out), "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
        "vae_params": sum(p.numel() for p in pipe.vae.parameters()), "recipe": asdict(recipe), "baseline": result,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
    }
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    _contact_sheet(samples, out / "samples.png", kind)
    if card:
        (out / "MODEL_CARD.md").write_text(model_card(record))
    print(f"[build {kind}] {json.dumps(result)}", flush=True)
    return record


def model_card(record: dict[str, Any]) -> str:
    kind = record["kind"]
    b, r = record["baseline"], record["recipe"]
    pipeline = "StableDiffusion3Pipeline" if kind == "image" else "WanPipeline"
    media = "32x32 RGB images" if kind == "image" else f"{VIDEO_FRAMES}-frame 32x32 RGB clips ({VIDEO_FRAMES} latent frames)"
    clip = b.get("clip_score")
    clip_line = f"{clip}" if clip is not None else f"not measured ({b.get('clip_score_error', 'embedded CLIP missing')})"
    swapped = r.get("caption_noise", 0.0)
    noise = (f", {round(swapped * 100)}% of them swapped for another scene's caption (`noisy_captions`: like web\n"
             f"  alt-text, so the model draws objects but follows its prompt only part of the time)") if swapped else ""
    return f"""# Embedded {kind} model: tiny {pipeline} pretrained on the mini-world

Built by `{record['command']}` (seed {record['seed']}) with `mmgrpo/pretrain/flow_pretrain.py`;
the build is deterministic given the seed on one machine and thread count.

- What: a real diffusers `{pipeline}` ({media}) assembled from tiny configs: transformer
  {record['transformer_params']:,} parameters, VAE {record['vae_params']:,} parameters, random frozen
  text encoder(s) with a whole-word tokenizer for the mini-world vocabulary (max 16 tokens).
- How: (1) VAE reconstruction training ({r['vae_steps']} steps, batch {r['vae_batch']}; final L1
  {record['vae_l1']} on a [-1, 1] scale), (2) rectified-flow training of the transformer on
  {r['num_scenes']} training scenes with their captions{noise} ({r['steps']} steps, batch {r['batch']}, lr {r['lr']},
  logit-normal sigmas, {int(r['caption_dropout'] * 100)}% caption dropout for CFG; final loss {record['flow_loss']}).
  Stopped early on purpose: samples are decent but imperfect so that GRPO has room.
- Size: {record['size_bytes'] / 1e6:.2f} MB (safetensors, `save_pretrained`).
- Build wall time: {record['build_seconds']:.0f} s on a shared 2-core CPU ({record['torch_threads']} torch threads,
  other jobs running), of which VAE {record['vae_seconds']:.0f} s.
- Baseline on {b['num_prompts']} held-out mini-world prompts (seed {b['eval_seed']}, {b['eval_steps']} ODE steps,
  guidance {b['guidance_scale']}): scene score {b['scene/score']} (color {b['scene/color']}, shape {b['scene/shape']},
  count {b['scene/count']}, position {b['scene/position']}, motion {b['scene/motion']}); CLIPScore {clip_line}.
  `samples.png` shows the first of these samples.
- Load: `diffusers.DiffusionPipeline.from_pretrained(path)`, or `mmgrpo train --modality {kind}`
  (configs/{kind}.yaml names it `asset:{kind}`).

## GRPO on this model
Not part of the build: run `mmgrpo train --modality {kind} --out DIR` and read DIR/eval.json
(the shipped card records the measured before/after numbers here).
"""


def main(kind: str, full: Recipe, quick: Recipe, argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m mmgrpo.pretrain.{kind}", description=f"Build the embedded {kind} model.")
    parser.add_argument("--out", default=None, help=f"output folder (default: the package's assets/{kind})")
    parser.add_argument("--quick", action="store_true", help="a few steps only (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the models are tiny; extra threads mostly wait on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out is None:
        from mmgrpo import assets

        args.out = str(Path(assets.__file__).parent / kind)
    recipe = quick if args.quick else full
    command = f"python -m mmgrpo.pretrain.{kind}" + (" --quick" if args.quick else "") + (f" --seed {args.seed}" if args.seed else "")
    return build(kind, args.out, recipe, seed=args.seed, command=command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run python -m mmgrpo.pretrain.image or python -m mmgrpo.pretrain.video")
