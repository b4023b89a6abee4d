"""CLIPScore through open_clip: how well an image (or each frame of a clip) matches its prompt.

Per image and prompt (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for
Image Captioning"):

    score = scale * max(cos(E_image, E_text), 0)

The paper writes CLIP-S = w * max(cos, 0) with w = 2.5 (to stretch its ViT-B/32 cosines over
[0, 1]); the constant only rescales. This reward defaults to `scale=100`, the convention of
torchmetrics and of text-to-image RL work, so scores lie in [0, 100]; pass `scale=2.5` for the
paper's numbers. A clip ([F, 3, H, W]) scores the mean over its frames of the per-frame score
(a per-frame CLIP cannot see motion: use the scene reward for directions).

Samples: float tensors [3, H, W] in [0, 1] (clamped; uint8 tensors are divided by 255), numpy
arrays [H, W, 3] (uint8, or floats in [0, 1]), PIL images, and clips of either layout
([F, 3, H, W] tensors, [F, H, W, 3] arrays). Images go through the model's own open_clip
transform (resize, crop, normalise) as tensors. A sample that cannot be read (wrong shape or
type, NaN pixels) scores None, which the trainer leaves out of the group statistics.
Prompts: strings, or dicts holding "prompt" (the mini-world prompt items).

Models: `CLIPScore()` is the embedded tiny CLIP in `mmgrpo.assets` ("clip"), trained on the
mini-world by `python -m mmgrpo.pretrain.clip`. Otherwise `model` is an open_clip model name
("ViT-B-32") or a path to an open_clip model config .json (keys embed_dim, vision_cfg,
text_cfg), and `pretrained` an open_clip tag ("openai": needs the model hub) or a local
checkpoint (.safetensors / .pt / .bin). The model is loaded on first use and cached per process.

>>> from mmgrpo import miniworld
>>> item = miniworld.prompt_set("image", split="heldout", n=1)[0]
>>> reward = CLIPScore()
>>> right, wrong = reward([miniworld.render(item)] * 2, [item, "three cyan triangles"])
>>> right > wrong
True
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmgrpo.data import prompt_text

EMBEDDED = "clip"  # asset folder of the embedded model
EMBEDDED_CONFIG = "tiny-clip.json"
EMBEDDED_WEIGHTS = "tiny-clip.safetensors"
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


class CLIPScore:
    """reward(samples, prompts, **meta) -> list[float | None], one CLIPScore per sample.

    model: None (the embedded tiny CLIP), an open_clip model name, or a model config .json.
    pretrained: None with model=None; else an open_clip tag or a local checkpoint path.
    device: where the model runs. batch_size: images (frames) and texts per forward.
    scale: the constant w in w * max(cos, 0) (100 here; 2.5 in the CLIPScore paper).
    """

    __name__ = "clip_score"

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        scale: float = 100.0,
    ):
        if batch_size < 1:
            raise ValueError(f"CLIPScore: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.scale = float(scale)
        self.model_name, self.checkpoint = _resolve(model, pretrained)

    # ------------------------------------------------------------------ the reward

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any], **meta: Any) -> list[float | None]:
        if len(samples) != len(prompts):
            raise ValueError(f"CLIPScore: got {len(samples)} samples for {len(prompts)} prompts; pass one prompt per sample")
        texts = [prompt_text(p, i) for i, p in enumerate(prompts)]
        frames = [_as_frames(s) for s in samples]  # each [F, 3, H, W] float in [0, 1], or None
        rows = [i for i, f in enumerate(frames) if f is not None]
        if not rows:
            return [None] * len(samples)
        unique = sorted({texts[i] for i in rows})
        text_emb = self.text_features(unique)  # [U, D] unit norm
        text_index = {t: j for j, t in enumerate(unique)}
        image_emb = self.image_features([f for i in rows for f in frames[i]])  # [sum F, D] unit norm
        owner = torch.tensor([text_index[texts[i]] for i in rows for _ in range(len(frames[i]))])  # [sum F]
        cos = (image_emb * text_emb[owner]).sum(-1)  # [sum F]
        per_frame = self.scale * cos.clamp(min=0)  # [sum F]
        scores: list[float | None] = [None] * len(samples)
        start = 0
        for i in rows:
            n = len(frames[i])
            scores[i] = float(per_frame[start : start + n].mean())
            start += n
        return scores

    # ------------------------------------------------------------------ embeddings

    @property
    def model(self) -> torch.nn.Module:
        """The open_clip model (eval mode, on `device`); loaded on first use."""
        return _load(self.model_name, self.checkpoint, str(self.device))[0]

    def image_features(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [N, D] of float images [N, 3, H, W] in [0, 1]."""
        model, preprocess, _ = _load(self.model_name, self.checkpoint, str(self.device))
        out = []
        with torch.inference_mode():
            for k in range(0, len(images), self.batch_size):
                chunk = list(images[k : k + self.batch_size])  # b x [3, H, W]
                if all(x.shape == chunk[0].shape for x in chunk):
                    pixels = preprocess(torch.stack(chunk).to(self.device, torch.float32))  # [b, 3, S, S]
                else:  # mixed sizes: the transform resizes each to the model's input size
                    pixels = torch.cat([preprocess(x[None].to(self.device, torch.float32)) for x in chunk])  # [b, 3, S, S]
                out.append(model.encode_image(pixels, normalize=True).float())  # [b, D]
        return torch.cat(out).cpu()  # [N, D]

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings [N, D] (open_clip's tokenizer; long texts are truncated)."""
        model, _, tokenizer = _load(self.model_name, self.checkpoint, str(self.device))
        out = []
        with torch.inference_mode():
            for k in range(0, len(texts), self.batch_size):
                tokens = tokenizer(list(texts[k : k + self.batch_size])).to(self.device)  # [b, L]
                out.append(model.encode_text(tokens, normalize=True).float())  # [b, D]
        return torch.cat(out).cpu()  # [N, D]

    def __repr__(self) -> str:
        return f"CLIPScore(model={self.model_name!r}, pretrained={self.checkpoint!r}, scale={self.scale})"


def clip_score(samples: Sequence[Any], prompts: Sequence[Any], **meta: Any) -> list[float | None]:
    """CLIPScore with the embedded tiny CLIP (the plain-function form of `CLIPScore()`)."""
    return _default()(samples, prompts, **meta)


@functools.lru_cache(maxsize=1)
def _default() -> CLIPScore:
    return CLIPScore()


# ---------------------------------------------------------------------- samples


def _as_frames(sample: Any) -> torch.Tensor | None:
    """float [F, 3, H, W] in [0, 1] (F = 1 for an image), or None when the sample is unreadable."""
    if hasattr(sample, "convert") and hasattr(sample, "size"):  # a PIL image
        sample = np.asarray(sample.convert("RGB"))
    if isinstance(sample, np.ndarray):
        if sample.ndim not in (3, 4) or sample.shape[-1] != 3:
            return None
        if not (sample.dtype == np.uint8 or np.issubdtype(sample.dtype, np.floating)):
            return None
        sample = torch.from_numpy(np.ascontiguousarray(sample)).movedim(-1, -3)  # [..., 3, H, W]
    if not torch.is_tensor(sample) or sample.ndim not in (3, 4) or sample.shape[-3] != 3 or min(sample.shape[-2:]) < 1:
        return None
    x = sample.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all():
            return None
        x = x.clamp(0, 1)
    else:
        return None
    return x if x.ndim == 4 else x[None]  # [F, 3, H, W]


# ---------------------------------------------------------------------- models


def _resolve(model: str | None, pretrained: str | None) -> tuple[str, str]:
    """(open_clip model name, checkpoint tag or path); checks what can be checked without loading."""
    import open_clip

    if model is None:
        from mmgrpo.assets import asset_path

        folder = asset_path(EMBEDDED)
        model = str(folder / EMBEDDED_CONFIG)
        pretrained = pretrained or str(folder / EMBEDDED_WEIGHTS)
    model = str(model)
    if model.endswith(".json") or Path(model).is_file():
        name = register_config(Path(model))
    elif model.replace("/", "-") in open_clip.list_models():  # open_clip spells "ViT-B/32" "ViT-B-32"
        name = model.replace("/", "-")
    else:
        raise ValueError(
            f"CLIPScore: unknown open_clip model {model!r}; use a name from open_clip.list_models() "
            "or the path to a model config .json"
        )
    if pretrained is None:
        raise ValueError(
            f"CLIPScore: model {model!r} needs pretrained=<local checkpoint path or open_clip tag>; "
            "a CLIP with random weights scores nothing meaningful"
        )
    pretrained = str(pretrained)
    if Path(pretrained).is_file():
        return name, pretrained
    if open_clip.get_pretrained_cfg(name, pretrained):
        return name, pretrained  # a known tag: downloaded (or read from the hub cache) on first use
    raise FileNotFoundError(
        f"CLIPScore: checkpoint {pretrained!r} not found; pass the path to a .safetensors/.pt file "
        f"or an open_clip tag of {name!r} ({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none known'})"
    )


@functools.lru_cache(maxsize=None)
def _config_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mmgrpo-open_clip-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def register_config(path: str | Path) -> str:
    """Register an open_clip model config .json; returns the name to pass to open_clip.

    open_clip names configs by file stem in one process-wide table; the name here is the stem
    plus a hash of the content, so two different files with one stem (or a file named like a
    built-in) never replace each other. The file is registered through a copy of that name.
    """
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIPScore: model config {str(path)!r} not found; pass an existing open_clip config .json or a model name")
    raw = path.read_bytes()
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"CLIPScore: model config {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in _CONFIG_KEYS):
        raise ValueError(f"CLIPScore: {str(path)!r} is not an open_clip model config; it needs the keys {', '.join(_CONFIG_KEYS)}")
    name = f"{path.stem}-{hashlib.sha256(raw).hexdigest()[:12]}"
    if open_clip.get_model_config(name) is None:
        copy = _config_dir() / f"{name}.json"
        copy.write_bytes(raw)
        open_clip.add_model_config(copy)
    return name


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, checkpoint: str, stamp: tuple[int, int] | None, device: str):
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint, device=device)
    except Exception as e:  # noqa: BLE001 - open_clip raises bare RuntimeErrors/KeyErrors; name the fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"CLIPScore: could not load {checkpoint!r} into open_clip model {name!r} ({first}); "
            "check that the checkpoint was saved from this config (a tag needs the model hub)"
        ) from e
    model.eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(name)


def _load(name: str, checkpoint: str, device: str):
    """(model, tensor preprocess, tokenizer), cached per process; a rewritten checkpoint file reloads."""
    path = Path(checkpoint)
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    return _load_cached(name, checkpoint, stamp, device)

