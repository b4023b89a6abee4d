"""Tiny random SD3 / FLUX / Wan pipelines built from config, with no downloads.

Each builder assembles the REAL diffusers pipeline class from tiny components (tens of
thousands of parameters, forwards in milliseconds on CPU): a tiny transformer, a tiny VAE,
tiny CLIP / T5 / UMT5 text encoders from transformers configs, and tokenizers constructed
offline from a small caption vocabulary (deterministically: the tokenizers trainers are not
reproducible run to run). They prove the wiring in tests, and the same builders at larger
sizes (`TextSizes`, `SD3Sizes`, `WanSizes`) make the untrained embedded defaults that
mmgrpo.pretrain then trains. The same seed and sizes give the same pipeline.

All modules are put in eval mode (models built from config start in train mode, and
dropout would break determinism) and are seeded from `seed` (a local torch.Generator state
via torch.random.fork_rng, so the global RNG of the caller is left alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The mini-world vocabulary: enough words for captions like
# "a red circle left of a blue square" or "a green triangle moving right".
CAPTION_WORDS = (
    "a an the one two three red green blue yellow purple orange white black gray "
    "circle square triangle circles squares triangles shape shapes left right of above below "
    "next to and with on in moving up down small big large background plain picture photo video"
)

TEXT_LEN = 32  # token length of every tiny tokenizer / text encoder (max_sequence_length)


def _alphabet() -> list[str]:
    """Printable ASCII without upper case (CLIP lower-cases) and without space, sorted."""
    return [chr(c) for c in range(33, 127) if not chr(c).isupper()]


def tiny_clip_tokenizer(words: str = CAPTION_WORDS, max_length: int = TEXT_LEN):
    """A CLIP byte-level BPE tokenizer CONSTRUCTED (not trained) from `words` (default CAPTION_WORDS).

    The vocab is the printable ASCII alphabet (each also as a word end, "x</w>") plus
    left-to-right chains of merges per caption word, so caption words are single tokens
    and any ASCII text still tokenizes. Built deterministically: the tokenizers BPE trainer is
    not reproducible run to run, and a tiny model's tokenizer must be. model_max_length `max_length`.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    chains = []
    words = sorted(set(words.split()))
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        chains.append([("".join(pieces[:k]), pieces[k]) for k in range(1, len(pieces))])
    merges: list[tuple[str, str]] = []
    for k in range(max(len(c) for c in chains)):  # all 2-piece merges first, then 3-piece, ...
        for chain in chains:
            if k < len(chain) and chain[k] not in merges:
                merges.append(chain[k])
                vocab.setdefault(chain[k][0] + chain[k][1], len(vocab))
    for _ in range(10):  # a word split by an earlier merge gets merges joining its pieces, appended last
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
        split = [tok.tokenize(w) for w in words]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            break
        for pieces in split:
            for k in range(1, len(pieces)):
                pair = ("".join(pieces[:k]), pieces[k])
                if pair not in merges:
                    merges.append(pair)
                    vocab.setdefault(pair[0] + pair[1], len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


def tiny_t5_tokenizer(words: str = CAPTION_WORDS, max_length: int = TEXT_LEN):
    """A T5 unigram tokenizer CONSTRUCTED from `words` (default CAPTION_WORDS; also serves UMT5): whole-word
    pieces "▁word" score -1, single characters -10, so caption words are one token each and
    any ASCII text still tokenizes. Deterministic (see tiny_clip_tokenizer). model_max_length `max_length`.
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(ch, -10.0) for ch in _alphabet() + [chr(c) for c in range(65, 91)]]
    vocab += [("\u2581" + w, -1.0) for w in sorted(set(words.split()))]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = max_length
    return tok


@dataclass(frozen=True)
class TextSizes:
    """The text side: tokenizer words and length, and the widths of the CLIP and T5 / UMT5 encoders."""

    words: str = CAPTION_WORDS  # every word here is one token
    max_length: int = TEXT_LEN  # tokenizer model_max_length = CLIP positions
    clip_width: int = 16  # CLIP hidden size = projection size (2 layers, 2 heads)
    t5_width: int = 32  # T5 / UMT5 d_model (2 heads)
    t5_head_width: int = 8  # d_kv
    t5_ff: int = 64  # d_ff
    t5_layers: int = 1
    t5_feed_forward: str = "relu"  # feed_forward_proj: "relu" (T5 v1.0) or "gated-gelu" (UMT5's default)


@dataclass(frozen=True)
class SD3Sizes:
    """An SD3 transformer over the latents of a KL autoencoder (FLUX reuses the autoencoder fields)."""

    image_size: int = 16  # pixels per side (the pipeline's default size)
    dim: int = 16  # transformer width = caption projection
    heads: int = 2
    layers: int = 1
    patch: int = 1
    vae_levels: int = 1  # each level past the first halves the resolution
    vae_width: int = 4  # channels of every level
    vae_groups: int = 1  # GroupNorm groups
    vae_attention: bool = True  # mid-block attention
    vae_shift: float = 0.0609  # latent shift / scale (SD3's; pretraining fits its own)
    vae_scale: float = 1.5035
    scheduler_shift: float = 3.0


@dataclass(frozen=True)
class WanSizes:
    """A Wan transformer over the latents of a causal 3D autoencoder."""

    dim: int = 16  # transformer width; its feed-forward is 2 * dim
    heads: int = 2
    layers: int = 1
    patch: int = 2  # spatial patch (1 in time)
    freq_dim: int = 16  # timestep embedding
    vae_width: int = 4  # base_dim
    vae_temporal_downsample: tuple[bool, ...] = (False, True)  # one 2x spatial downsample each; True also halves time
    scheduler_shift: float = 3.0


def _clip_text_config(tokenizer: Any, text: TextSizes):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text.clip_width,
        intermediate_size=2 * text.clip_width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=text.max_length,
        projection_dim=text.clip_width,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(tokenizer: Any, text: TextSizes, umt5: bool = False):
    from transformers import T5Config, UMT5Config

    return (UMT5Config if umt5 else T5Config)(
        vocab_size=len(tokenizer),
        d_model=text.t5_width,
        d_kv=text.t5_head_width,
        d_ff=text.t5_ff,
        num_layers=text.t5_layers,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj=text.t5_feed_forward,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _eval(*modules: Any) -> None:
    for m in modules:
        if m is not None:
            m.eval()


def _tiny_vae(latent_channels: int, sizes: SD3Sizes):
    """An AutoencoderKL with `latent_channels` channels (SD3: 4, FLUX: 1) and `sizes.vae_levels` levels."""
    from diffusers import AutoencoderKL

    levels = sizes.vae_levels
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(sizes.vae_width,) * levels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=sizes.vae_groups,
        sample_size=sizes.image_size,
        mid_block_add_attention=sizes.vae_attention,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=sizes.vae_shift,
        scaling_factor=sizes.vae_scale,
    )


def tiny_sd3_pipeline(
    seed: int = 0, *, with_t5: bool = True, text: TextSizes = TextSizes(), sizes: SD3Sizes = SD3Sizes()
):
    """A StableDiffusion3Pipeline: SD3 transformer, KL autoencoder, two CLIPs and (optionally) a T5 encoder.

    Default sizes: 1 layer, a 1-level VAE (8x8 latents for 8x8 images, 16x16 for 16x16). The
    transformer reads the T5 states (width t5_width; the two CLIP states are padded to it) and
    the two pooled CLIP projections, concatenated.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    latent_size = sizes.image_size // 2 ** (sizes.vae_levels - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2 = tiny_clip_tokenizer(text.words, text.max_length), tiny_clip_tokenizer(text.words, text.max_length)
        te1 = CLIPTextModelWithProjection(_clip_text_config(tok1, text))
        te2 = CLIPTextModelWithProjection(_clip_text_config(tok2, text))
        tok3 = tiny_t5_tokenizer(text.words, text.max_length) if with_t5 else None
        te3 = T5EncoderModel(_t5_config(tok3, text)) if with_t5 else None
        transformer = SD3Transformer2DModel(
            sample_size=latent_size,
            patch_size=sizes.patch,
            in_channels=4,
            num_layers=sizes.layers,
            attention_head_dim=sizes.dim // sizes.heads,
            num_attention_heads=sizes.heads,
            joint_attention_dim=text.t5_width,
            caption_projection_dim=sizes.dim,
            pooled_projection_dim=2 * text.clip_width,
            out_channels=4,
            pos_embed_max_size=latent_size // sizes.patch,
        )
        vae = _tiny_vae(4, sizes)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=sizes.scheduler_shift)
    _eval(te1, te2, te3, transformer, vae)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=te1,
        tokenizer=tok1,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )


def tiny_flux_pipeline(seed: int = 0, *, guidance_embeds: bool = False):
    """A FluxPipeline with a 1+1-layer FLUX transformer, 1-level VAE (1 latent channel,
    packed 2x2 -> 4 channels), a tiny CLIP and a tiny T5 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    text = TextSizes()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        te1 = CLIPTextModel(_clip_text_config(tok1, text))
        te2 = T5EncoderModel(_t5_config(tok2, text))
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=text.t5_width,
            pooled_projection_dim=text.clip_width,  # CLIP pooled output (hidden size)
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
        )
        vae = _tiny_vae(1, SD3Sizes())
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16,
        max_image_seq_len=256,
    )
    _eval(te1, te2, transformer, vae)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=te1,
        tokenizer=tok1,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        transformer=transformer,
    )


def tiny_wan_pipeline(seed: int = 0, *, text: TextSizes = TextSizes(), sizes: WanSizes = WanSizes()):
    """A WanPipeline: Wan transformer, causal 3D autoencoder (AutoencoderKLWan) and a UMT5 encoder.

    Default sizes: 1 layer, a VAE that downsamples 4x in space and 2x in time (5 frames -> 3
    latent frames), a UMT5 with T5's plain ReLU feed-forward.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    downsample = list(sizes.vae_temporal_downsample)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tiny_t5_tokenizer(text.words, text.max_length)
        te = UMT5EncoderModel(_t5_config(tok, text, umt5=True))
        transformer = WanTransformer3DModel(
            patch_size=(1, sizes.patch, sizes.patch),
            num_attention_heads=sizes.heads,
            attention_head_dim=sizes.dim // sizes.heads,
            in_channels=4,
            out_channels=4,
            text_dim=text.t5_width,
            freq_dim=sizes.freq_dim,
            ffn_dim=2 * sizes.dim,
            num_layers=sizes.layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        vae = AutoencoderKLWan(
            base_dim=sizes.vae_width,
            z_dim=4,
            dim_mult=[1] * (len(downsample) + 1),
            num_res_blocks=1,
            temperal_downsample=downsample,
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
            scale_factor_temporal=2 ** sum(downsample),
            scale_factor_spatial=2 ** len(downsample),
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=sizes.scheduler_shift)
    _eval(te, transformer, vae)
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=scheduler, transformer=transformer)


BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "wan": tiny_wan_pipeline}


def tiny_pipeline(family: str, seed: int = 0, **kwargs: Any):
    """`tiny_pipeline("sd3" | "flux" | "wan", seed)`: one of the builders above by name."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline family {family!r}: choose one of {sorted(BUILDERS)}")
    return BUILDERS[family](seed, **kwargs)
