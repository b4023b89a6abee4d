"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints built offline from the real transformers classes.

`build_tiny_vlm(path)` writes a folder that loads back through `AutoProcessor` and
`AutoModelForImageTextToText` exactly like a hub checkpoint: a config with 1-2 decoder layers
and a one-block vision tower, a byte-level BPE `Qwen2Tokenizer` trained on a small caption
corpus, an image and a video processor with small pixel budgets, and a short chat template.
`build_tiny_text_lm(path)` writes the text-only counterpart (`AutoModelForCausalLM`).

The tests use these; the embedded default VLM (mmgrpo.pretrain.vlm) is `build_vlm` at larger
`VLMSizes` with its own tokenizer corpus. Nothing is downloaded. Example::

    python -m mmgrpo.pipelines.vlm.tiny /tmp/tiny-qwen2-vl --family qwen2_5_vl
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Special tokens in the order they get ids 0..6 (0 is also EOS and padding).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# A Qwen-style template, short enough to read: images and videos become one placeholder each,
# which the processor expands to one token per merged patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
MOTIONS = ("moving left", "moving right", "moving up", "moving down")


def caption_corpus() -> list[str]:
    """Short mini-world sentences (captions, questions, answer tags) to train the tiny BPE on."""
    lines = []
    for c1 in COLOURS:
        for s1 in SHAPES:
            lines.append(f"a {c1} {s1}")
            lines.extend(f"a {c1} {s1} {m}" for m in MOTIONS)
            for rel in RELATIONS:
                lines.append(f"a {c1} {s1} {rel} a {COLOURS[(COLOURS.index(c1) + 1) % 6]} {SHAPES[0]}")
    lines += [
        "What is in the image? Describe the scene.",
        "How many shapes are there? Where is the object? What colour is it? Which way does it move?",
        "<think>there is one shape</think><answer>[1, 2, 30, 40]</answer>",
        "0 1 2 3 4 5 6 7 8 9 yes no one two three",
    ]
    return lines


@dataclass(frozen=True)
class VLMSizes:
    """Decoder and vision-tower sizes of a tiny Qwen2-VL / Qwen2.5-VL (Qwen2-VL-2B: hidden 1536, 28 layers)."""

    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int | None = None  # None: 2 * hidden_size
    max_positions: int = 2048
    tie_embeddings: bool = False
    mrope_section: tuple[int, int, int] | None = None  # (temporal, height, width), sums to head_dim / 2;
    #   None: (head_dim / 2 - 2q, q, q) with q = head_dim // 4
    vision_width: int = 32
    vision_depth: int = 1
    vision_heads: int = 2
    patch_size: int = 14  # Qwen's; with the 2x2 merge a 56x56 image is 4 visual tokens


def build_tokenizer(vocab_size: int = 320, corpus: Sequence[str] | None = None, extra_tokens: Sequence[str] = ()):
    """A byte-level BPE `Qwen2Tokenizer` trained offline on `corpus` (default `caption_corpus()`), with
    Qwen's special tokens (ids 0..6) and the chat template. `extra_tokens` are added as ordinary whole
    tokens (decoding keeps them); `vocab_size` counts them."""
    from transformers import Qwen2Tokenizer

    base = Qwen2Tokenizer()  # only "<|endoftext|>"; the BPE is learned below
    tokenizer = base.train_new_from_iterator(
        caption_corpus() if corpus is None else list(corpus),
        vocab_size=vocab_size - len(extra_tokens),
        new_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.add_tokens(list(extra_tokens))
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"tiny tokenizer special-token ids came out as {ids}, expected 0..{len(ids) - 1}")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(
    tokenizer, family: str = "qwen2_vl", min_pixels: int = 28 * 28, max_pixels: int = 56 * 56, patch_size: int = 14
):
    """Image + video processors with tiny pixel budgets (a 56x56 image gives 4 visual tokens)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = dict(patch_size=patch_size, merge_size=2, min_pixels=min_pixels, max_pixels=max_pixels)
    image_processor = Qwen2VLImageProcessor(**pixels)
    video_processor = Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=False)
    cls = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}[family]
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(vocab_size: int, family: str = "qwen2_vl", sizes: VLMSizes = VLMSizes()):
    """A Qwen2-VL or Qwen2.5-VL config of `sizes`; EOS is <|im_end|>, padding <|endoftext|>."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    head_dim = sizes.hidden_size // sizes.num_heads
    quarter = head_dim // 4
    mrope_section = list(sizes.mrope_section or (head_dim // 2 - 2 * quarter, quarter, quarter))
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size or 2 * sizes.hidden_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads,
        max_position_embeddings=sizes.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
    )
    if sizes.tie_embeddings:  # Qwen2-VL checkpoints that tie record it on the text config too
        text_config["tie_word_embeddings"] = True
    common = dict(
        text_config=text_config,
        image_token_id=SPECIAL_TOKENS.index("<|image_pad|>"),
        video_token_id=SPECIAL_TOKENS.index("<|video_pad|>"),
        vision_start_token_id=SPECIAL_TOKENS.index("<|vision_start|>"),
        vision_end_token_id=SPECIAL_TOKENS.index("<|vision_end|>"),
        tie_word_embeddings=sizes.tie_embeddings,
    )
    vision = dict(depth=sizes.vision_depth, num_heads=sizes.vision_heads, patch_size=sizes.patch_size)
    if family == "qwen2_vl":
        vision_config = dict(vision, embed_dim=sizes.vision_width, hidden_size=sizes.hidden_size, mlp_ratio=2)
        return Qwen2VLConfig(vision_config=vision_config, **common)
    if family == "qwen2_5_vl":
        vision_config = dict(
            vision,
            hidden_size=sizes.vision_width,
            intermediate_size=2 * sizes.vision_width,
            out_hidden_size=sizes.hidden_size,
            window_size=56,
            fullatt_block_indexes=[0],
        )
        return Qwen2_5_VLConfig(vision_config=vision_config, **common)
    raise ValueError(f"unknown tiny VLM family {family!r}: use 'qwen2_vl' or 'qwen2_5_vl'")


def _random_model(auto_class, config, seed: int, eos_token_id: int, pad_token_id: int):
    """`auto_class.from_config(config)` with weights drawn from `seed` (the caller's RNG is left alone)."""
    import torch
    from transformers import GenerationConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return model


def build_vlm(
    family: str = "qwen2_vl", seed: int = 0, *, sizes: VLMSizes = VLMSizes(), tokenizer=None, max_pixels: int = 56 * 56
):
    """(random model, processor) of a `family` VLM at `sizes`; `tokenizer` defaults to `build_tokenizer()`.

    Weights depend only on `seed`. The embedded default (mmgrpo.pretrain.vlm) is this at larger sizes.
    """
    from transformers import AutoModelForImageTextToText

    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    processor = build_processor(tokenizer, family, max_pixels=max_pixels, patch_size=sizes.patch_size)
    config = build_config(len(tokenizer), family, sizes)
    text = config.text_config
    model = _random_model(AutoModelForImageTextToText, config, seed, text.eos_token_id, text.pad_token_id)
    return model, processor


def build_tiny_vlm(path: str | Path, family: str = "qwen2_vl", seed: int = 0, **sizes) -> Path:
    """Write a tiny random `family` VLM (model, tokenizer, processor, chat template) to `path`.

    Loads back with `AutoProcessor.from_pretrained(path)` and
    `AutoModelForImageTextToText.from_pretrained(path)`. `sizes` are `VLMSizes` fields.
    """
    path = Path(path)
    model, processor = build_vlm(family, seed, sizes=VLMSizes(**sizes))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_text_lm(path: str | Path, seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> Path:
    """Write a tiny random Qwen2 causal LM with the same tokenizer and chat template to `path`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = Path(path)
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "<|im_end|>"  # the chat template ends each turn with it
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
        bos_token_id=None,
    )
    model = _random_model(AutoModelForCausalLM, config, seed, config.eos_token_id, config.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Qwen2-VL / Qwen2.5-VL checkpoint folder.")
    parser.add_argument("path")
    parser.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl", "text"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.family == "text":
        out = build_tiny_text_lm(args.path, seed=args.seed)
    else:
        out = build_tiny_vlm(args.path, family=args.family, seed=args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
