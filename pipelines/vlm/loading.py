"""Loading a VLM or causal LM and reading what its config says about tokens, towers and masks.

Changes when a new model family or a new transformers release loads or names things
differently; nothing here samples or scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from mmgrpo.pipelines.toolkit import not_loadable

# Module names (last path component) of vision towers in transformers VLMs.
VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder")
KINDS = ("auto", "vlm", "text")


def load_model_and_processor(
    model: Any, processor: Any, kind: str, dtype: torch.dtype | None, attn_implementation: str | None
) -> tuple[Any, Any]:
    """(model, processor) from folders (or hub ids) or built objects; a folder's kind comes from its config.

    kind: "auto" (image-text-to-text if transformers maps the config's model type to one, else a
    causal LM), "vlm" or "text". A folder loads in `dtype` (default float32); a built model is
    cast only when `dtype` is given. The processor defaults to the model's folder.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'auto', 'vlm' or 'text', got {kind!r}")
    if model is None:
        raise ValueError("VLMAdapter needs model=: a local model folder (or hub id), or a built model")
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        source = str(model)
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:  # not cached and offline, no network, a typo, no config.json
            raise not_loadable(source, err, "model") from None
        if kind == "auto":
            kind = "vlm" if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES else "text"
        cls = AutoModelForImageTextToText if kind == "vlm" else AutoModelForCausalLM
        kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = cls.from_pretrained(source, **kwargs)
        except OSError as err:  # the config was found but not the weights
            raise not_loadable(source, err, "model") from None
        if processor is None:
            processor = source
    elif dtype is not None:
        model = model.to(dtype)
    if processor is None:
        raise ValueError("a built model needs its processor (or tokenizer): VLMAdapter(model, processor=...)")
    if isinstance(processor, (str, Path)):
        from transformers import AutoProcessor, AutoTokenizer

        loader = AutoTokenizer if kind == "text" else AutoProcessor
        processor = loader.from_pretrained(str(processor))
    return model, processor


def eos_ids(model: Any, eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The token ids that end a completion: the given ones, else the generation config's, else the model config's."""
    candidates = [eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(model.config, "eos_token_id", None)]  # fmt: skip
    for value in candidates:
        if value is not None:
            return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    raise ValueError("no EOS token id found in the generation config or model config: pass eos_token_id=")


def prepared_mask_kind(model: Any) -> str | None:
    """How decode steps pass their attention mask: "bool" (sdpa) or "additive" (eager) for a
    ready 4D mask [R, 1, 1, K], or None for the plain 2D padding mask.

    With one new token per row and a KV cache, the causal mask of a decode step is just the
    row's padding mask, so it can be built once per rollout instead of by the model's mask
    utilities at every token (about a fifth of a tiny model's decode time on CPU).
    transformers passes a 4D mask through unchanged, which is only right when every layer
    is full attention (no sliding window) and the attention kernel reads this format.
    """
    text_config = model.config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None)
    if not layer_types or any(kind != "full_attention" for kind in layer_types):
        return None
    return {"sdpa": "bool", "eager": "additive"}.get(getattr(text_config, "_attn_implementation", None))


def vision_tower_prefixes(model: torch.nn.Module) -> list[str]:
    """Module names of the vision towers of `model` (the outermost module of each tower)."""
    prefixes: list[str] = []
    for name, _ in model.named_modules():
        if name.split(".")[-1] in VISION_TOWER_NAMES and not any(name.startswith(p + ".") for p in prefixes):
            prefixes.append(name)
    return prefixes


def in_prefixes(name: str, prefixes: Sequence[str]) -> bool:
    """Whether the parameter or module `name` lies inside one of the modules `prefixes`."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)
