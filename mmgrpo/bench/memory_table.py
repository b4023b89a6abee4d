"""Memory per device of the real-checkpoint configs at 8 x 80 GB, estimated (mmgrpo.memory), as a markdown table.

    python -m mmgrpo.bench.memory_table            # ~ 30 s on CPU, no download: the models are built on the meta device

Every architecture is instantiated from its published config on the meta device (no weights, exact shapes),
so the parameter counts are exact; the frozen towers (CLIP, T5-XXL, umT5-XXL, VAEs) are counted replicated.
Where the configs come from:
- SD3.5-Medium: huggingface.co/stabilityai/stable-diffusion-3.5-medium transformer/config.json (24 layers,
  head dim 64 x 24 heads, dual attention in layers 0-12, qk rms_norm, pos_embed_max_size 384); text encoders
  CLIP-L/14, OpenCLIP bigG/14 text towers and T5-v1.1-XXL encoder; 16-channel VAE (no quant convs).
- FLUX.1-dev: black-forest-labs/FLUX.1-dev transformer/config.json (19 double + 38 single blocks, 24 x 128,
  in_channels 64, pooled 768, joint 4096, guidance_embeds true); CLIP-L/14 text, T5-v1.1-XXL encoder, same VAE.
- Wan2.1-T2V-14B: Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json (dim 5120 = 40 x 128, ffn 13824,
  40 layers, patch 1x2x2, text_dim 4096; the same numbers as Wan's own configs/wan_t2v_14B.py); umT5-XXL
  encoder; the Wan 2.1 VAE (diffusers AutoencoderKLWan defaults).
- Qwen2.5-VL-7B-Instruct: Qwen/Qwen2.5-VL-7B-Instruct config.json (text 3584 x 28 layers, 28 heads, 4 KV heads,
  MLP 18944, vocab 152064, untied; vision tower 1280 x 32 blocks, MLP 3420, out 3584), the tower frozen.
- LLaDA-8B-Instruct: GSAI-ML/LLaDA-8B-Instruct config.json (d_model 4096, 32 layers, 32 heads = 32 KV heads,
  SwiGLU MLP 12288, vocab 126464, untied, RMSNorm, no biases): a Llama-shaped model with those dims
  (transformers has no LLaDA class; its weights map one to one).
Settings (rows per micro-batch, tokens, LoRA rank and targets, gradient checkpointing) are those of the shipped
configs/*.yaml; Qwen2.5-VL-7B takes the 3B config's settings. All weights bf16, LoRA weights fp32.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch

from mmgrpo.memory import ActivationShape, MemoryEstimate, estimate_memory, inventory, lora_parameter_count

DEVICE_GB, WORLD_SIZE, MODES = 80, 8, ("ddp", "fsdp2", "zero2")
FLOW_LORA = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
LM_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Checkpoint:
    name: str
    trained: Callable[[], torch.nn.Module]  # built under torch.device("meta")
    frozen: Callable[[], list[torch.nn.Module]]  # the replicated towers
    lora_targets: tuple[str, ...]
    lora_rank: int
    activations: ActivationShape
    rows: int  # train.micro_batch_size
    frozen_prefixes: tuple[str, ...] = ()  # inside the trained module, never trained (vision tower)


def _clip_text(hidden: int, layers: int, heads: int, mlp: int, projection: int | None) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=mlp, max_position_embeddings=77, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5_xxl_encoder(vocab: int = 32128, umt5: bool = False) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    dims = dict(vocab_size=vocab, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # fmt: skip
    return UMT5EncoderModel(UMT5Config(**dims)) if umt5 else T5EncoderModel(T5Config(**dims))


def _sd_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                         use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip


def sd35_medium() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    )


def flux_dev() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def wan21_14b() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    )


def wan_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan()  # the defaults are the Wan 2.1 VAE (base_dim 96, z_dim 16)


def qwen25_vl_7b() -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        vocab_size=152064, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config)


def llada_8b() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=126464, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    ))  # fmt: skip


# tokens per forward: image/video patches + the text tokens in the joint sequence (cross-attention text of Wan
# is not in its sequence); rows_per_sample 2 under CFG (sd3.yaml, wan.yaml: guidance 4.5; FLUX is distilled)
CHECKPOINTS = [
    Checkpoint("SD3.5-Medium (512 px)", sd35_medium,
               lambda: [_clip_text(768, 12, 12, 3072, 768), _clip_text(1280, 32, 20, 5120, 1280), _t5_xxl_encoder(),
                        _sd_vae()],
               FLOW_LORA, 32, ActivationShape(32 * 32 + 256 + 77, 1536, 24, 24, rows_per_sample=2, checkpointed=True),
               8),
    Checkpoint("FLUX.1-dev (512 px)", flux_dev,
               lambda: [_clip_text(768, 12, 12, 3072, None), _t5_xxl_encoder(), _sd_vae()],
               FLOW_LORA, 32, ActivationShape(32 * 32 + 512, 3072, 24, 19 + 38, checkpointed=True), 8),
    Checkpoint("Wan2.1-T2V-14B (33 x 240 x 416)", wan21_14b, lambda: [_t5_xxl_encoder(256384, umt5=True), wan_vae()],
               FLOW_LORA, 32, ActivationShape(9 * 15 * 26, 5120, 40, 40, rows_per_sample=2, checkpointed=True), 2),
    Checkpoint("Qwen2.5-VL-7B (224 px, 512 new tokens)", qwen25_vl_7b, lambda: [],
               LM_LORA, 8, ActivationShape(64 + 64 + 512, 3584, 28, 28, vocab=152064, logit_tokens=512), 8,
               frozen_prefixes=("model.visual",)),
    Checkpoint("LLaDA-8B-Instruct (256-token answers)", llada_8b, lambda: [],
               ("q_proj", "k_proj", "v_proj"), 128, ActivationShape(256 + 256, 4096, 32, 32, vocab=126464,
                                                                    logit_tokens=256), 6),
]  # fmt: skip


def estimates(ckpt: Checkpoint, finetune: str) -> tuple[dict[str, MemoryEstimate], int, int, int]:
    """{mode: estimate}, trained-module numbers, trainable numbers and frozen-tower numbers of one checkpoint."""
    with torch.device("meta"):
        model = ckpt.trained().to(torch.bfloat16)
        towers = [m.to(torch.bfloat16) for m in ckpt.frozen()]
    frozen = tuple(p for p in ckpt.frozen_prefixes if p in dict(model.named_modules()))
    if finetune == "lora":
        lora, tensors = lora_parameter_count(model, ckpt.lora_targets, ckpt.lora_rank, frozen)
        model.requires_grad_(False)
        inv = inventory(model, None, towers, extra_trainable=lora, extra_trainable_tensors=tensors)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(not any(name == f or name.startswith(f + ".") for f in frozen))
        inv = inventory(model, None, towers)
        inv = type(inv)(**{**inv.__dict__, "reference_bytes": inv.trained_bytes})  # keep_reference: a full copy
    total = {mode: estimate_memory(inv, mode, WORLD_SIZE, ckpt.activations, ckpt.rows) for mode in MODES}
    numel = sum(p.numel() for p in model.parameters())
    return total, numel, inv.trainable_count, inv.replicated_bytes // 2


def _cell(est: MemoryEstimate) -> str:
    gb = est.total / 1e9
    return f"{gb:.1f}" if gb <= DEVICE_GB else f"{gb:.1f} (over)"


def table() -> str:
    lines = [
        f"| checkpoint | finetune | trained / frozen-tower weights | trainable | activations per micro-batch "
        f"| {' | '.join(MODES)} |",
        "|---|---|---|---|---|" + "---|" * len(MODES),
    ]
    for ckpt in CHECKPOINTS:
        for finetune in ("lora", "full"):
            by_mode, numel, trainable, towers = estimates(ckpt, finetune)
            acts = by_mode["ddp"].activations / 1e9
            lines.append(
                f"| {ckpt.name} | {finetune} | {numel / 1e9:.2f}B / {towers / 1e9:.2f}B | {trainable / 1e6:,.0f}M "
                f"| {acts:.1f} GB ({ckpt.rows} rows) | " + " | ".join(_cell(by_mode[m]) for m in MODES) + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Memory per device of the real-checkpoint configs (estimates).")
    parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting a meta model to bf16 warns of fp32-kept modules: no weights here
    print(f"Estimated memory per device, GB, at {WORLD_SIZE} x {DEVICE_GB} GB (bf16 weights; 'over': more than "
          f"{DEVICE_GB} GB)")
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
