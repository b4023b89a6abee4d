"""Build the embedded tiny CLIP (assets/clip/): an open_clip model trained on the mini-world.

    python -m mmgrpo.pretrain.clip                        # the shipped asset: 19 CPU-minutes, about
                                                       # 10 min on 2 free cores (31 min on a busy machine)
    python -m mmgrpo.pretrain.clip --quick --out DIR      # a smoke build in seconds (what the tests run)

The model is open_clip's own CLIP class built from the config `CONFIG` (a ViT over 32x32
images in 4x4 patches, a small causal text transformer over open_clip's default BPE tokenizer;
its 49,408-row token table is most of the weights). It is trained contrastively on mini-world
scenes rendered on the fly from fresh training seeds: images of the image layouts (single,
count, relation, and group) and single frames of motion clips, each with its caption.

The loss is CLIP's symmetric InfoNCE with three changes for a world of few captions:
- positives: every caption in the batch that describes the image counts (the same caption
  text, ignoring " moving <direction>", which one frame cannot show);
- hard negatives: each image also sees `hard_negatives` captions that differ from its own in
  one detail (a colour, a shape, the count, or the relation: objects swapped or "left of" <->
  "above"), added to the image -> text softmax;
- twins: half of the relation scenes come with two rearrangements of the same objects (looks
  exchanged, layout transposed), so the batch itself contrasts "A left of B" with "B left of A"
  and "A above B" in both directions (a build without twins, and without the guaranteed
  relation negative, left relations at chance: pairwise 0.50 against 0.72 with them).

Afterwards the saved files are reloaded through `mmgrpo.rewards.clip_score.CLIPScore` and
evaluated on held-out scenes (seeds the training never draws); the numbers go to MODEL_CARD.md.
Given --seed the weights are deterministic (on one machine and thread count).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mmgrpo import miniworld as mw
from mmgrpo.rewards.clip_score import EMBEDDED_CONFIG, EMBEDDED_WEIGHTS, CLIPScore, register_config

CONFIG_NAME, WEIGHTS_NAME = EMBEDDED_CONFIG, EMBEDDED_WEIGHTS  # the files CLIPScore() reads from assets/clip/

# open_clip model config (the format of open_clip/model_configs/*.json).
CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 3, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3, "mlp_ratio": 2.0},
}

FULL = {"steps": 800, "batch_size": 64, "hard_negatives": 3, "lr": 2e-3, "eval_images": 512, "eval_videos": 128}
QUICK = {"steps": 2, "batch_size": 8, "hard_negatives": 2, "lr": 2e-3, "eval_images": 16, "eval_videos": 4}
LAYOUT_WEIGHTS = {"single": 0.2, "count": 0.2, "relation": 0.3, "group": 0.1, "motion": 0.2}
TWIN_PROB = 0.5  # chance that a relation scene comes with its two rearranged twins (see `twins`)
NEGATIVE_KINDS = {
    "single": ("color", "shape"),
    "count": ("color", "shape", "count"),
    "relation": ("color", "shape", "relation"),
    "group": ("color", "shape"),
    "motion": ("color", "shape"),
}
DISTRACTORS = 4  # held-out top-1: the caption among this many hard distractors (chance 1 / 5)


# ----------------------------------------------------------------------------- data


def train_scene(rng: np.random.Generator) -> tuple[dict[str, Any], np.ndarray]:
    """A training scene (seed from the train range) and its image uint8 [32, 32, 3];
    for a motion clip, one random frame."""
    layouts = list(LAYOUT_WEIGHTS)
    layout = layouts[int(rng.choice(len(layouts), p=list(LAYOUT_WEIGHTS.values())))]
    seed = int(rng.integers(mw.SPLIT_OFFSETS["train"], mw.SPLIT_OFFSETS["heldout"]))
    if layout == "motion":
        scene = mw.make_scene(seed, "video")
        return scene, mw.render(scene, frame=int(rng.integers(scene["frames"])))
    scene = mw.make_scene(seed, "image", layout=layout)
    return scene, mw.render(scene)


def perturb(scene: dict[str, Any], kind: str, rng: np.random.Generator) -> str:
    """A caption that differs from the scene's in one detail of `kind` (see NEGATIVE_KINDS)."""
    s = copy.deepcopy(scene)
    objs, layout = s["objects"], s["layout"]
    if kind in ("color", "shape"):
        values = mw.COLORS if kind == "color" else mw.SHAPES
        if layout == "count":  # all objects look alike
            targets, taken = list(range(len(objs))), set()
        else:  # one object; keep every object nameable (distinct colour-shape pairs)
            targets = [int(rng.integers(len(objs)))]
            taken = {(o["color"], o["shape"]) for k, o in enumerate(objs) if k != targets[0]}
        o = objs[targets[0]]
        options = [v for v in values if v != o[kind] and ((v, o["shape"]) if kind == "color" else (o["color"], v)) not in taken]
        if not options:  # e.g. a red circle beside a red square and a red triangle: recolour instead
            return perturb(scene, "color", rng)
        new = options[int(rng.integers(len(options)))]
        for k in targets:
            objs[k][kind] = new
    elif kind == "count" and layout == "count":
        s["objects"] = objs[:2] if len(objs) == 3 else objs + [objs[0]]
    elif kind == "relation" and layout == "relation":
        if rng.random() < 0.5:
            s["objects"] = objs[::-1]
        else:
            s["relation"] = "above" if s["relation"] == "left of" else "left of"
    else:
        raise ValueError(f"perturb: no {kind!r} change for a {layout!r} scene")
    return mw.caption(s)


def twins(scene: dict[str, Any]) -> list[dict[str, Any]]:
    """Two rearrangements of a relation scene with the same objects, for contrast within a batch:
    the objects' looks exchanged ("B left of A") and the layout transposed, x <-> y ("A above B")."""
    swapped, transposed = copy.deepcopy(scene), copy.deepcopy(scene)
    a, b = swapped["objects"][:2]
    for key in ("color", "shape"):
        a[key], b[key] = b[key], a[key]
    for o in transposed["objects"]:
        o["center"] = o["center"][::-1]
    transposed["relation"] = "above" if scene["relation"] == "left of" else "left of"
    for s in (swapped, transposed):
        s["caption"] = mw.caption(s)
    return [swapped, transposed]


def caption_key(text: str) -> str:
    """What one image can show of a caption: the caption without ' moving <direction>'."""
    return text.split(" moving ")[0]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float() / 255


def make_batch(rng: np.random.Generator, n: int, hard_negatives: int):
    """images [n, 3, 32, 32], captions (n), hard-negative captions (n * hard_negatives, image-major),
    positives bool [n, n] (caption j describes image i).

    A relation scene brings its two `twins` along with probability TWIN_PROB, and its first hard
    negative is always a relation change: the order of objects is what CLIP models learn last.
    """
    scenes, images, negatives = [], [], []
    while len(scenes) < n:
        scene, image = train_scene(rng)
        group = [(scene, image)]
        if scene["layout"] == "relation" and rng.random() < TWIN_PROB:
            group += [(t, mw.render(t)) for t in twins(scene)]
        for s, img in group[: n - len(scenes)]:
            scenes.append(s)
            images.append(img)
            kinds = NEGATIVE_KINDS[s["layout"]]
            for k in range(hard_negatives):
                kind = "relation" if s["layout"] == "relation" and k == 0 else kinds[int(rng.integers(len(kinds)))]
                negatives.append(perturb(s, kind, rng))
    captions = [s["caption"] for s in scenes]
    keys = [caption_key(c) for c in captions]
    positives = torch.tensor([[a == b for b in keys] for a in keys])  # [n, n]
    return to_tensor(np.stack(images)), captions, negatives, positives


# ----------------------------------------------------------------------------- training


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, neg: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with several positives per row and extra hard negatives for images.

    img [n, D], txt [n, D], neg [n * K, D] unit-norm embeddings; positives bool [n, n].
    Each direction maximises the total softmax probability of the positives.
    """
    scale = logit_scale.exp()
    i2t = scale * img @ torch.cat([txt, neg]).T  # [n, n + n*K]
    t2i = scale * txt @ img.T  # [n, n]
    pos_i2t = torch.cat([positives, torch.zeros(len(img), len(neg), dtype=torch.bool)], 1)  # [n, n + n*K]
    loss_i = i2t.logsumexp(1) - i2t.masked_fill(~pos_i2t, -math.inf).logsumexp(1)  # [n]
    loss_t = t2i.logsumexp(1) - t2i.masked_fill(~positives.T, -math.inf).logsumexp(1)  # [n]
    return (loss_i.mean() + loss_t.mean()) / 2


def train(settings: dict[str, Any], seed: int, config_name: str) -> torch.nn.Module:
    """The trained open_clip model (fp32, eval mode)."""
    import open_clip
    from tqdm import tqdm

    torch.manual_seed(seed)  # open_clip initialises weights from the global generator
    model, _, preprocess = open_clip.create_model_and_transforms(config_name)
    tokenizer = open_clip.get_tokenizer(config_name)
    model.train()
    steps, warmup = settings["steps"], max(1, settings["steps"] // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="train tiny CLIP", unit="step", file=sys.stderr, disable=steps < 10)
    for step in bar:
        images, captions, negatives, positives = make_batch(rng, settings["batch_size"], settings["hard_negatives"])
        img = model.encode_image(preprocess(images), normalize=True)  # [n, D]
        texts = captions + negatives
        unique = sorted(set(texts))  # captions repeat in a small world: encode each once
        where = {t: j for j, t in enumerate(unique)}
        txt = model.encode_text(tokenizer(unique), normalize=True)[[where[t] for t in texts]]  # [n + n*K, D]
        loss = contrastive_loss(img, txt[: len(captions)], txt[len(captions) :], positives, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}", logit_scale=f"{model.logit_scale.exp().item():.1f}")
        if steps >= 50 and (step + 1) % (steps // 5) == 0 and step + 1 < steps:
            tqdm.write(f"step {step + 1}: loss {loss.item():.3f}, held-out top-1 {quick_eval(model, preprocess, tokenizer):.3f}")
            model.train()
    return model.eval()


def quick_eval(model, preprocess, tokenizer, n: int = 128) -> float:
    """Held-out top-1 among hard distractors with the in-memory model (progress only)."""
    model.eval()

    def enc_img(images):
        with torch.no_grad():
            return model.encode_image(preprocess(torch.stack(list(images))), normalize=True)

    def enc_txt(texts):
        with torch.no_grad():
            return model.encode_text(tokenizer(list(texts)), normalize=True)

    return evaluate(enc_img, enc_txt, n_images=n, n_videos=0)["top1_hard"]


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    encode_images: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    encode_texts: Callable[[Sequence[str]], torch.Tensor],
    n_images: int,
    n_videos: int,
    seed: int = 0,
    scale: float = 100.0,
) -> dict[str, Any]:
    """Held-out numbers from unit-norm encoders (images: float [3, H, W] in [0, 1]).

    - top1_hard: image -> its caption among DISTRACTORS hard distractors (chance 1/(1+DISTRACTORS))
    - top1_pool: image -> its caption among all distinct held-out captions (chance `pool_chance`)
    - pairwise_<kind>: how often the caption beats a caption changed in that one detail (chance 0.5)
    - score_match / score_mismatch / score_hard: mean CLIPScore (scale * max(cos, 0)) with the
      caption, with another held-out scene's caption, with a one-detail change
    - video_*: the same for clips, CLIPScore averaged over frames, changes of colour or shape
    """
    rng = np.random.default_rng([seed, 7])
    items = mw.prompt_set("image", "heldout", n_images)
    img = encode_images([to_tensor(mw.render(it)) for it in items])  # [N, D]
    caps = [it["caption"] for it in items]
    out: dict[str, Any] = {"images": n_images}

    distractors = []  # [N][DISTRACTORS]
    pair_kinds: dict[str, list[tuple[int, str]]] = {}
    for i, it in enumerate(items):
        kinds = NEGATIVE_KINDS[it["layout"]]
        found: list[str] = []
        while len(found) < DISTRACTORS:
            c = perturb(it, kinds[int(rng.integers(len(kinds)))], rng)
            if c not in found:
                found.append(c)
        distractors.append(found)
        for kind in kinds:
            pair_kinds.setdefault(kind, []).append((i, perturb(it, kind, rng)))
    texts = sorted(set(caps) | {c for d in distractors for c in d} | {c for v in pair_kinds.values() for _, c in v})
    index = {t: j for j, t in enumerate(texts)}
    txt = encode_texts(texts)  # [U, D]
    cos = img @ txt.T  # [N, U]

    own = torch.tensor([index[c] for c in caps])  # [N]
    rows = torch.arange(n_images)
    true_cos = cos[rows, own]  # [N]
    hard = cos[rows[:, None], torch.tensor([[index[c] for c in d] for d in distractors])]  # [N, DISTRACTORS]
    out["top1_hard"] = float((true_cos[:, None] > hard).all(1).float().mean())
    out["top1_hard_chance"] = 1 / (1 + DISTRACTORS)
    by_layout = {}
    for layout in mw.IMAGE_LAYOUTS:
        m = torch.tensor([it["layout"] == layout for it in items])
        if m.any():
            by_layout[layout] = float((true_cos[m, None] > hard[m]).all(1).float().mean())
    out["top1_hard_by_layout"] = by_layout
    pool = torch.tensor(sorted({index[c] for c in caps}))  # [P]
    out["top1_pool"] = float((pool[cos[:, pool].argmax(1)] == own).float().mean())
    out["pool_chance"] = 1 / len(pool)
    for kind, pairs in pair_kinds.items():
        i = torch.tensor([p[0] for p in pairs])
        j = torch.tensor([index[p[1]] for p in pairs])
        out[f"pairwise_{kind}"] = float((true_cos[i] > cos[i, j]).float().mean())

    score = lambda c: scale * c.clamp(min=0)  # noqa: E731
    other = torch.tensor([index[caps[(i + 1) % n_images]] for i in range(n_images)])
    differs = torch.tensor([caps[(i + 1) % n_images] != caps[i] for i in range(n_images)])
    out["score_match"] = float(score(true_cos).mean())
    out["score_mismatch"] = float(score(cos[rows, other])[differs].mean())
    out["score_hard"] = float(score(hard).mean())

    if n_videos:
        clips = mw.prompt_set("video", "heldout", n_videos)
        frames = [to_tensor(f) for c in clips for f in mw.render_clip(c)]  # n_videos * F x [3, H, W]
        emb = encode_images(frames).reshape(n_videos, -1, img.shape[1])  # [V, F, D]
        right = [c["caption"] for c in clips]
        wrong = [perturb(c, ("color", "shape")[int(rng.integers(2))], rng) for c in clips]
        t_right, t_wrong = encode_texts(right), encode_texts(wrong)  # [V, D] each
        s_right = score((emb * t_right[:, None]).sum(-1)).mean(1)  # [V] frame mean
        s_wrong = score((emb * t_wrong[:, None]).sum(-1)).mean(1)  # [V]
        out["videos"] = n_videos
        out["video_score_match"] = float(s_right.mean())
        out["video_score_hard"] = float(s_wrong.mean())
        out["video_pairwise"] = float((s_right > s_wrong).float().mean())
    return out


# ----------------------------------------------------------------------------- saving


def save(model: torch.nn.Module, path: Path) -> None:
    """The weights as float16 safetensors (open_clip loads them into its fp32 model)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})  # one key: the header is byte-stable
    path.chmod(0o644)


def model_card(
    metrics: dict[str, Any], settings: dict[str, Any], command: str, seconds: float, cpu_seconds: float, params: int, size: int, seed: int
) -> str:
    m = metrics
    layouts = ", ".join(f"{k} {v:.3f}" for k, v in m["top1_hard_by_layout"].items())
    pairwise = ", ".join(f"{k} {m[f'pairwise_{k}']:.3f}" for k in ("color", "shape", "count", "relation") if f"pairwise_{k}" in m)
    return f"""# Tiny CLIP for the mini-world (embedded default of `CLIPScore`)

An open_clip `CLIP` (ViT image tower, causal text transformer, open_clip's default BPE
tokenizer) trained from scratch on mini-world scenes, so that `mmgrpo.rewards.clip_score.CLIPScore()`
works offline on CPU. It knows only the mini-world: 32x32 images of 1-3 coloured circles,
squares and triangles, and captions in its small grammar. Decent but imperfect on purpose.

## Files
- `{CONFIG_NAME}`: open_clip model config (embed_dim, vision_cfg, text_cfg)
- `{WEIGHTS_NAME}`: weights, float16 safetensors ({size / 2**20:.2f} MiB; loaded into fp32)
- parameters: {params:,} (the 49,408 x {CONFIG['text_cfg']['width']} token table is {49408 * CONFIG['text_cfg']['width']:,} of them)

```python
from mmgrpo.rewards.clip_score import CLIPScore
reward = CLIPScore()  # = CLIPScore(model="<assets>/clip/{CONFIG_NAME}", pretrained="<assets>/clip/{WEIGHTS_NAME}")
reward(images, prompts)  # 100 * max(cos, 0) per image; clips: mean over frames
```

## How it was made
`{command}` (seed {seed}): {seconds / 60:.1f} min wall, {cpu_seconds / 60:.1f} min CPU time, on {platform.machine()} CPU
({torch.get_num_threads()} threads; wall time grows when other jobs share the cores, CPU time barely), torch {torch.__version__}, open_clip {_open_clip_version()}.
- architecture: `{json.dumps(CONFIG)}`
- data: fresh mini-world training seeds every step (layouts {", ".join(f"{k} {v:.0%}" for k, v in LAYOUT_WEIGHTS.items())};
  motion = one random frame of a clip), {settings['steps']} steps x {settings['batch_size']} images
  = {settings['steps'] * settings['batch_size']:,} images, each with {settings['hard_negatives']} hard-negative captions
  (one detail changed: colour, shape, count, or relation swapped/flipped; relation scenes always get
  one relation change); {TWIN_PROB:.0%} of relation scenes come with two twins in the batch (the same objects
  with their looks exchanged, and with the layout transposed)
- loss: symmetric InfoNCE, all captions in the batch that describe an image count as positives
  (motion words ignored), hard negatives in the image -> caption softmax; AdamW lr {settings['lr']},
  warmup then cosine decay, weight decay 0.01, gradient clip 1.0; learnable temperature
  (final {m.get('logit_scale', float('nan')):.1f})

## Held-out results (scenes from the held-out seed range, weights as saved)
- image -> caption top-1 among {DISTRACTORS} hard distractors: **{m['top1_hard']:.3f}** (chance {m['top1_hard_chance']:.3f}; {m['images']} images)
  - by layout: {layouts}
- image -> caption top-1 among all {round(1 / m['pool_chance'])} distinct held-out captions: {m['top1_pool']:.3f} (chance {m['pool_chance']:.3f})
- caption beats a one-detail change (chance 0.5): {pairwise}
- mean CLIPScore (100 * max(cos, 0)): matching caption **{m['score_match']:.1f}**, another scene's caption
  **{m['score_mismatch']:.1f}**, one-detail change {m['score_hard']:.1f}
- clips ({m.get('videos', 0)}; CLIPScore = mean over the 8 frames): matching {m.get('video_score_match', float('nan')):.1f},
  colour/shape changed {m.get('video_score_hard', float('nan')):.1f}, matching higher in {m.get('video_pairwise', float('nan')):.3f} of clips

## Limits
- Motion direction is invisible to a per-frame CLIP: "moving left" and "moving right" score alike;
  use the scene reward (`mmgrpo.rewards.scene`) for motion.
- Counting and relations are weaker than colour and shape (see above); everything outside the
  mini-world grammar and palette is out of distribution.
- Preprocessing is open_clip's default (resize to 32, OpenAI mean/std).
"""


def _open_clip_version() -> str:
    import open_clip

    return open_clip.__version__


def build(out: Path, quick: bool, seed: int, steps: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, save, reload through CLIPScore, evaluate, write the model card; returns the metrics."""
    import open_clip  # noqa: F401  (fail early with the import error if the image extra is missing)

    settings = dict(QUICK if quick else FULL)
    if steps is not None:
        settings["steps"] = steps
    start, cpu_start = time.time(), time.process_time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = out / CONFIG_NAME, out / WEIGHTS_NAME
    config_path.write_text(json.dumps(CONFIG, indent=2) + "\n")
    model = train(settings, seed, register_config(config_path))
    save(model, weights_path)
    scorer = CLIPScore(model=str(config_path), pretrained=str(weights_path))
    metrics = evaluate(scorer.image_features, scorer.text_features, settings["eval_images"], settings["eval_videos"], seed=seed)
    metrics["logit_scale"] = float(scorer.model.logit_scale.exp())
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    params = sum(p.numel() for p in model.parameters())
    command = "python -m mmgrpo.pretrain.clip" + (f" --quick --out {out}" if quick else "") + (f" --seed {seed}" if seed else "")
    command += f" --steps {steps}" if steps is not None else ""
    card = model_card(metrics, settings, command, seconds, cpu_seconds, params, weights_path.stat().st_size, seed)
    (out / "MODEL_CARD.md").write_text(card)
    log(f"wrote {config_path}, {weights_path} ({weights_path.stat().st_size / 2**20:.2f} MiB), MODEL_CARD.md in {seconds:.0f} s")
    log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}))
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    from mmgrpo import assets

    parser = argparse.ArgumentParser(prog="python -m mmgrpo.pretrain.clip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the package's assets/clip)")
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny data (smoke test); needs --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {FULL['steps']}; --quick {QUICK['steps']})")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick builds a throwaway model: pass --out DIR so the shipped asset is not overwritten")
    build(args.out or Path(assets.__file__).parent / "clip", args.quick, args.seed, steps=args.steps)


if __name__ == "__main__":
    main()
