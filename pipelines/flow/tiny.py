"""Tiny random SD3 / FLUX / Wan pipelines built from config, with no downloads.

Each builder assembles the REAL diffusers pipeline class from tiny components (tens of
thousands of parameters, forwards in milliseconds on CPU): a tiny transformer, a tiny VAE,
tiny CLIP / T5 / UMT5 text encoders from transformers configs, and tokenizers constructed
offline from a small caption vocabulary (deterministically: the tokenizers trainers are not
reproducible run to run). They prove the wiring in tests and are the starting point of the
embedded defaults (which are then pretrained). The same seed gives the same pipeline.

All modules are put in eval mode (models built from config start in train mode, and
dropout would break determinism) and are seeded from `seed` (a local torch.Generator state
via torch.random.fork_rng, so the global RNG of the caller is left alone).
"""

from __future__ import annotations

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


def tiny_clip_tokenizer(words: str = CAPTION_WORDS):
    """A CLIP byte-level BPE tokenizer CONSTRUCTED (not trained) from `words` (default CAPTION_WORDS).

    The vocab is the printable ASCII alphabet (each also as a word end, "x</w>") plus
    left-to-right chains of merges per caption word, so caption words are single tokens
    and any ASCII text still tokenizes. Built deterministically: the tokenizers BPE trainer is
    not reproducible run to run, and a tiny model's tokenizer must be. model_max_length TEXT_LEN.
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
    tok.model_max_length = TEXT_LEN
    return tok


def tiny_t5_tokenizer(words: str = CAPTION_WORDS):
    """A T5 unigram tokenizer CONSTRUCTED from `words` (default CAPTION_WORDS; also serves UMT5): whole-word
    pieces "▁word" score -1, single characters -10, so caption words are one token each and
    any ASCII text still tokenizes. Deterministic (see tiny_clip_tokenizer). model_max_length TEXT_LEN.
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(ch, -10.0) for ch in _alphabet() + [chr(c) for c in range(65, 91)]]
    vocab += [("\u2581" + w, -1.0) for w in sorted(set(words.split()))]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = TEXT_LEN
    return tok


def _clip_text_config(tokenizer: Any, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LEN,
        projection_dim=projection,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(tokenizer: Any, d_model: int):
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _eval(*modules: Any) -> None:
    for m in modules:
        if m is not None:
            m.eval()


def _tiny_vae(latent_channels: int):
    """A one-level AutoencoderKL (no downsampling) with `latent_channels` channels (SD3: 4, FLUX: 1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        sample_size=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def tiny_sd3_pipeline(seed: int = 0, *, with_t5: bool = True):
    """A StableDiffusion3Pipeline with 1-layer SD3 transformer, 1-level VAE (8x8 latents for
    8x8 images, 16x16 for 16x16), two tiny CLIPs and (optionally) a tiny T5 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
        te1 = CLIPTextModelWithProjection(_clip_text_config(tok1, hidden=16, projection=16))
        te2 = CLIPTextModelWithProjection(_clip_text_config(tok2, hidden=16, projection=16))
        tok3 = tiny_t5_tokenizer() if with_t5 else None
        te3 = T5EncoderModel(_t5_config(tok3, d_model=32)) if with_t5 else None
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 d_model; the two CLIP hidden states (16+16) are padded to it
            caption_projection_dim=16,
            pooled_projection_dim=32,  # 16 + 16 pooled CLIP projections
            out_channels=4,
            pos_embed_max_size=16,
        )
        vae = _tiny_vae(latent_channels=4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
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

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        te1 = CLIPTextModel(_clip_text_config(tok1, hidden=16, projection=16))
        te2 = T5EncoderModel(_t5_config(tok2, d_model=32))
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 d_model
            pooled_projection_dim=16,  # CLIP pooled output (hidden size)
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
        )
        vae = _tiny_vae(latent_channels=1)
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


def tiny_wan_pipeline(seed: int = 0):
    """A WanPipeline with a 1-layer Wan transformer, a tiny AutoencoderKLWan (4x spatial, 4x
    2x temporal: 5 frames -> 3 latent frames) and a tiny UMT5 encoder."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tiny_t5_tokenizer()
        te = UMT5EncoderModel(UMT5Config(**_t5_config(tok, d_model=32).to_diff_dict()))
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=16,
            ffn_dim=32,
            num_layers=1,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=4,
            dim_mult=[1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
            scale_factor_temporal=2,  # one temporal downsample
            scale_factor_spatial=4,  # two spatial downsamples
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    _eval(te, transformer, vae)
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=scheduler, transformer=transformer)


BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "wan": tiny_wan_pipeline}


def tiny_pipeline(family: str, seed: int = 0, **kwargs: Any):
    """`tiny_pipeline("sd3" | "flux" | "wan", seed)`: one of the builders above by name."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline family {family!r}: choose one of {sorted(BUILDERS)}")
    return BUILDERS[family](seed, **kwargs)
