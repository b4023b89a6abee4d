"""mmgrpo.memory: the estimate against the bytes of real tensors after a real AdamW step, the sharding
closed forms, and the activation formula against hand-computed values."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from mmgrpo.memory import (
    ActivationShape,
    activation_bytes,
    estimate_for_run,
    estimate_memory,
    format_estimate,
    inventory,
    lora_parameter_count,
    sharding_mode,
)


class Block(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.to_q, self.to_v = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, hidden)
        self.mlp = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(3 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return x + self.to_q(y) * self.to_v(y) + self.out(torch.relu(self.mlp(y)))  # [n, h]


def small_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(Block(16), Block(16), torch.nn.Linear(16, 4)).to(dtype)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def one_adamw_step(tuning) -> tuple[int, int]:
    """(gradient bytes, optimizer state bytes) held after one real AdamW step on the trainable weights."""
    params = list(tuning.trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randn(5, 16)
    tuning.model(x.to(next(tuning.model.parameters()).dtype)).float().square().mean().backward()
    optimizer.step()
    grads = tensor_bytes(p.grad for p in params if p.grad is not None)
    state = tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return grads, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_finetuning_bytes_equal_the_real_tensors(dtype):
    from mmgrpo.pipelines.toolkit import Finetuning

    tuning = Finetuning(small_model(dtype), "full")
    grads, state = one_adamw_step(tuning)
    est = estimate_memory(inventory(tuning.model, tuning._reference_copy), "single")
    weights = tensor_bytes(tuning.model.parameters()) + tensor_bytes(tuning._reference_copy.parameters())
    assert (est.parameters, est.gradients, est.optimizer) == (weights, grads, state)
    assert est.activations is None


def test_lora_bytes_equal_the_real_tensors():
    pytest.importorskip("peft")
    from mmgrpo.pipelines.toolkit import Finetuning

    base = small_model(torch.bfloat16)
    expected_lora = lora_parameter_count(copy.deepcopy(base), ["to_q", "to_v"], rank=4)
    tuning = Finetuning(base, "lora", lora_rank=4, lora_target_modules=["to_q", "to_v"])
    grads, state = one_adamw_step(tuning)
    inv = inventory(tuning.model, tuning._reference_copy)
    est = estimate_memory(inv, "single")
    trainable = list(tuning.trainable_parameters().values())
    assert all(p.dtype == torch.float32 for p in trainable)  # LoRA trains in fp32 on a bf16 base
    assert (inv.trainable_count, inv.trainable_tensors) == expected_lora == (4 * 2 * 16 * 2 * 2, 8)
    assert est.parameters == tensor_bytes(tuning.model.parameters())  # the reference is the disabled adapter
    assert (est.gradients, est.optimizer) == (grads, state) == (tensor_bytes(trainable), 2 * grads + 4 * 8)


def test_lora_count_on_a_model_without_peft_matches_the_injected_layers():
    pytest.importorskip("peft")
    from mmgrpo.pipelines.toolkit import Finetuning

    count, tensors = lora_parameter_count(small_model(), ["to_q", "to_v"], rank=4)
    with torch.device("meta"):
        meta = small_model()
    inv = inventory(meta.requires_grad_(False), extra_trainable=count, extra_trainable_tensors=tensors)
    real = inventory(Finetuning(small_model(), "lora", lora_rank=4, lora_target_modules=["to_q", "to_v"]).model)
    assert inv == real


def test_sharded_modes_divide_what_they_shard():
    inv = inventory(torch.nn.Linear(64, 64), reference=torch.nn.Linear(64, 64), frozen=[torch.nn.Linear(8, 8)])
    W = 4
    ddp, fsdp2, zero2 = (estimate_memory(inv, mode, W) for mode in ("ddp", "fsdp2", "zero2"))
    replicated, steps = inv.replicated_bytes, 4 * inv.trainable_tensors
    assert replicated == (64 + 8) * 4 and inv.trained_bytes == inv.reference_bytes == (64 * 64 + 64) * 4
    assert fsdp2.parameters - replicated == (ddp.parameters - replicated) / W
    assert fsdp2.gradients == ddp.gradients / W
    assert fsdp2.optimizer - steps == (ddp.optimizer - steps) / W
    assert zero2.parameters == ddp.parameters and zero2.gradients == fsdp2.gradients
    assert zero2.optimizer == fsdp2.optimizer  # fp32 weights: no master copy
    assert estimate_memory(inv, "single", W) == estimate_memory(inv, "ddp", 1)._replace(mode="single")


def test_transient_buffers_of_ddp_and_fsdp2():
    model = small_model()  # two Blocks of 16 hidden and a head outside them
    block = tensor_bytes(model[0].parameters())
    inv = inventory(model, block_classes=["Block"])
    assert (inv.largest_block_bytes, inv.outside_blocks_bytes) == (block, tensor_bytes(model[2].parameters()))
    assert estimate_memory(inv, "single").buffers == estimate_memory(inv, "ddp", 1).buffers == 0
    assert estimate_memory(inv, "ddp", 2).buffers == 2 * 4 * inv.trainable_count  # flat fp32 copy + its clone
    assert estimate_memory(inv, "fsdp2", 2).buffers == 3 * block + inv.outside_blocks_bytes
    model._no_split_modules = ["Block"]  # the wrap policy's default source, read by default here too
    assert inventory(model) == inv
    model[0].__class__ = type("FSDPBlock", (Block,), {})  # what fully_shard makes of a block's class
    assert inventory(model) == inv


def test_zero_keeps_fp32_master_weights_of_16_bit_trainable_weights():
    inv = inventory(torch.nn.Linear(64, 64, dtype=torch.bfloat16))
    n = 64 * 64 + 64
    assert estimate_memory(inv, "zero2", 2).optimizer == 12 * n // 2 + 4 * 2  # ZeRO's K = 12
    assert estimate_memory(inv, "fsdp2", 2).optimizer == 2 * 2 * n // 2 + 4 * 2  # torch AdamW in bf16


def test_activation_formula_against_hand_computed_values():
    paper = ActivationShape(tokens=16, hidden=8, heads=2, layers=3, flash_attention=False, dropout=True)
    per_layer = 16 * 2 * 8 * (34 + 5 * 2 * 16 / 8)  # s b h (34 + 5 a s / h), b = 2 rows: 13824 bytes at 16-bit
    assert per_layer == 13824
    assert activation_bytes(paper, rows=2) == 3 * 13824
    assert activation_bytes(paper, rows=2, bytes_per_value=4) == 2 * 3 * 13824
    assert activation_bytes(paper._replace(checkpointed=True), rows=2) == 3 * 2 * 16 * 2 * 8 + 13824
    assert activation_bytes(paper._replace(rows_per_sample=2, forwards=3), rows=1) == 3 * 13824 * 3
    eager = paper._replace(dropout=False)  # no dropout masks or outputs: 32 s b h + 2 a s^2 b
    assert activation_bytes(eager, rows=2) == 3 * (32 * 16 * 2 * 8 + 2 * 2 * 16 * 16 * 2)
    assert activation_bytes(ActivationShape(16, 8, 2, 3), rows=2) == 3 * 32 * 16 * 2 * 8  # SDPA, eval: the default
    lm = ActivationShape(16, 8, 2, 3, vocab=100, logit_tokens=5)  # + the fp32 log-softmax over 5 positions
    assert activation_bytes(lm, rows=2) == 3 * 32 * 16 * 2 * 8 + 2 * 5 * 100 * 4


@pytest.mark.parametrize("tokens,hidden,heads,rows,vocab", [(16, 512, 8, 16, 0), (128, 128, 4, 8, 0),
                                                            (96, 96, 4, 16, 0), (16, 256, 4, 16, 8192)])
def test_activation_formula_matches_what_autograd_saves(tokens, hidden, heads, rows, vocab):
    from mmgrpo.bench.block_policy import BlockModel

    torch.manual_seed(0)
    model = BlockModel(vocab=vocab or 32, tokens=tokens, hidden=hidden, heads=heads, layers=2)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # linears save their weights too: not activations
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = model.embed(torch.randint(32, (rows, tokens))) + model.position  # [b, s, h]
        for block in model.blocks:
            x = block(x)
        if vocab:  # the LM head's log-softmax, as the adapters' losses take it
            model.head(x).float().log_softmax(-1)
    expected = activation_bytes(ActivationShape(tokens, hidden, heads, 2, vocab=vocab), rows, bytes_per_value=4)
    assert abs(sum(saved.values()) / expected - 1) < 0.02  # measured: within 0.6%


def fake_adapter(shape=None):
    tuning = SimpleNamespace(model=torch.nn.Linear(32, 32), _reference_copy=None)
    adapter = SimpleNamespace(tuning=tuning, vae=torch.nn.Linear(4, 4))
    if shape is not None:
        adapter.activation_shape = lambda prompts: shape
    return adapter


def run_config(micro_batch_size=4, step_chunk=None, mixed_precision="no"):
    train = SimpleNamespace(prompts_per_step=2, group_size=4, micro_batch_size=micro_batch_size,
                            step_chunk=step_chunk, mixed_precision=mixed_precision)  # fmt: skip
    return SimpleNamespace(train=train, loss=SimpleNamespace(ratio="token"))


def test_estimate_for_run_counts_towers_rows_and_chunks(monkeypatch):
    shape = ActivationShape(tokens=10, hidden=32, heads=4, layers=2, forwards=5)
    est = estimate_for_run(fake_adapter(shape), run_config(micro_batch_size=64, step_chunk=1), 2, "ddp")
    assert est.parameters == (32 * 32 + 32 + 16 + 4) * 4  # the trained layer and the frozen "vae"
    assert est.buffers == 2 * 4 * (32 * 32 + 32)
    # 8 rows over 2 processes: 4 rows per micro-batch; step_chunk 1: one forward per backward; fp32 run
    assert est.activations == activation_bytes(shape._replace(forwards=1), rows=4, bytes_per_value=4)
    text = format_estimate(est)
    assert "ddp, 2 processes" in text and "per micro-batch" in text and "buffers" in text
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")  # an FSDP launch that checkpoints the blocks
    sharded = estimate_for_run(fake_adapter(shape), run_config(micro_batch_size=64, step_chunk=1), 2, "fsdp2")
    assert sharded.activations == activation_bytes(shape._replace(forwards=1, checkpointed=True), 4, 4)
    prefilled = shape._replace(forwards=1, shared_tokens=9)  # 4 rows of groups of 4 share one prompt's 9 tokens
    est = estimate_for_run(fake_adapter(prefilled), run_config(micro_batch_size=64, step_chunk=1), 2, "ddp")
    assert est.activations == activation_bytes(shape._replace(tokens=10 + 3, forwards=1), rows=4, bytes_per_value=4)
    unknown = estimate_for_run(fake_adapter(), run_config(), 1, "single")
    assert "activations:     not estimated" in format_estimate(unknown)
    assert estimate_for_run(SimpleNamespace(), run_config(), 1, "single") is None


def test_sharding_mode_of_an_accelerator(monkeypatch):
    def acc(kind, processes=2, stage=None):
        plugin = SimpleNamespace(zero_stage=stage) if stage else None
        return SimpleNamespace(distributed_type=f"DistributedType.{kind}", num_processes=processes,
                               state=SimpleNamespace(deepspeed_plugin=plugin))  # fmt: skip

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharding_mode(acc("NO", 1)) == "single"
    assert sharding_mode(acc("MULTI_CPU")) == "ddp"
    assert sharding_mode(acc("FSDP")) == "fsdp2"
    assert sharding_mode(acc("DEEPSPEED", stage=2)) == "zero2"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an FSDP launch on CPU: accelerate reports multi-CPU
    assert sharding_mode(acc("MULTI_CPU")) == "fsdp2" and sharding_mode(acc("NO", 1)) == "single"
    with pytest.raises(ValueError, match="unknown sharding mode 'zero4'"):
        estimate_memory(inventory(torch.nn.Linear(2, 2)), "zero4")


def test_benchmark_policy_rescoring_matches_sampling_and_its_reward_has_a_known_best():
    from mmgrpo.bench.block_policy import BlockPolicy, next_token_reward, prompt_ids

    torch.manual_seed(0)
    policy = BlockPolicy(vocab=8, tokens=4, hidden=16, heads=2, layers=2)
    rollout = policy.sample(["a", "b"], 3, torch.Generator().manual_seed(0))
    assert rollout.log_probs.shape == (6, 4) and rollout.group_id.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(policy.log_prob(rollout), rollout.log_probs)
    torch.testing.assert_close(policy.log_prob(rollout, [1, 3]), rollout.log_probs[:, [1, 3]])
    best = ((prompt_ids("a", 8, 4) + 1) % 8).tolist()
    assert next_token_reward([best, [(t + 1) % 8 for t in best]], ["a", "a"], vocab=8) == [1.0, 0.0]
    shape = policy.activation_shape()
    assert (shape.tokens, shape.hidden, shape.heads, shape.layers) == (4, 16, 2, 2)
    assert inventory(policy.model).largest_block_bytes == tensor_bytes(policy.model.blocks[0].parameters())


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_flow_activation_shape_is_the_sequence_the_blocks_see(family):
    pytest.importorskip("diffusers")
    from mmgrpo.pipelines.flow import FlowAdapter
    from mmgrpo.pipelines.flow.tiny import TEXT_LEN, tiny_pipeline

    size = dict(height=16, width=16, num_frames=5) if family == "wan" else dict(height=16, width=16)
    adapter = FlowAdapter(tiny_pipeline(family), num_steps=4, window=2, max_sequence_length=TEXT_LEN,
                          guidance_scale=2.0 if family != "flux" else 1.0, **size)  # fmt: skip
    seen = []

    def record(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states") if family != "wan" else None  # Wan: text by cross-attention
        seen.append((hidden.shape[0], hidden.shape[1] + (text.shape[1] if text is not None else 0), hidden.shape[-1]))

    blocks = adapter.model.transformer_blocks if family != "wan" else adapter.model.blocks
    blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    adapter.sample(["a red circle"], 1, torch.Generator().manual_seed(0))
    shape = adapter.activation_shape()
    rows, tokens, hidden = seen[0]
    assert (shape.tokens, shape.hidden) == (tokens, hidden)
    assert shape.rows_per_sample == rows  # CFG: conditional and unconditional rows in one forward
    assert shape.forwards == 2 and shape.layers == adapter.model.config.num_layers + getattr(
        adapter.model.config, "num_single_layers", 0)


def test_mdlm_activation_shape_is_the_canvas_it_scores(tmp_path):
    pytest.importorskip("transformers")
    from mmgrpo.pipelines.mdlm import MaskedDiffusionAdapter
    from mmgrpo.pipelines.mdlm.tiny import build_tiny_mdlm

    path = build_tiny_mdlm(str(tmp_path / "m"), hidden=16, layers=2, heads=2, max_length=64)
    adapter = MaskedDiffusionAdapter(str(path), finetune="full", keep_reference=False, gen_length=8, steps=4)
    prompts = ["A:12+3=", "A:1+1="]
    seen = []
    adapter.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    rollout = adapter.sample(prompts[:1], 2, torch.Generator().manual_seed(0))
    seen.clear()
    adapter.log_prob(rollout)
    shape = adapter.activation_shape(prompts)
    assert shape.tokens == seen[0] == len(adapter.encode(prompts[0])) + 8  # the longer prompt sets the canvas
    assert (shape.hidden, shape.heads, shape.layers, shape.forwards) == (16, 2, 2, 1)  # d1: one forward
    assert (shape.vocab, shape.logit_tokens) == (adapter.model.config.vocab_size, 8)  # log-softmax on the answer
    elbo = MaskedDiffusionAdapter(str(path), finetune="full", keep_reference=False, gen_length=8, steps=4,
                                  estimator="elbo", mc_samples=3)  # fmt: skip
    assert elbo.activation_shape(prompts).forwards == 3


def test_transformer_dims_reads_transformers_llada_and_vlm_configs():
    from mmgrpo.memory import transformer_dims

    assert transformer_dims(SimpleNamespace(d_model=4096, n_heads=32, n_layers=32)) == (4096, 32, 32)  # LLaDA
    text = SimpleNamespace(hidden_size=3584, num_attention_heads=28, num_hidden_layers=28)
    assert transformer_dims(SimpleNamespace(text_config=text, hidden_size=1)) == (3584, 28, 28)  # a VLM's text model
    assert transformer_dims(SimpleNamespace(vocab_size=3)) is None and transformer_dims(None) is None


def test_vlm_activation_shape_is_the_sequence_its_language_model_sees(tmp_path):
    pytest.importorskip("transformers")
    import numpy as np

    from mmgrpo.pipelines.vlm import VLMAdapter
    from mmgrpo.pipelines.vlm.tiny import build_tiny_vlm

    adapter = VLMAdapter(build_tiny_vlm(tmp_path / "vlm", family="qwen2_5_vl"), max_new_tokens=6)
    prompts = [{"prompt": "What is in the image?", "image": np.full((32, 32, 3), 128, np.uint8)}, "Say hi."]
    seen = []
    layers = adapter.model.model.language_model.layers
    layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
                                        with_kwargs=True)  # fmt: skip
    adapter.sample(prompts[:1], 1, torch.Generator().manual_seed(0))
    shape = adapter.activation_shape(prompts)
    config = adapter.model.config.text_config
    assert (shape.shared_tokens, shape.tokens) == (seen[0], 6)  # the image prompt (the longer) prefilled, then 6
    assert (shape.hidden, shape.heads, shape.layers) == (config.hidden_size, config.num_attention_heads,
                                                         config.num_hidden_layers)  # fmt: skip
    assert (shape.vocab, shape.logit_tokens, shape.logit_bytes) == (config.vocab_size, 6, 8)  # float64 log-softmax


def test_sharding_benchmark_report_computes_its_two_targets():
    from mmgrpo.bench.sharding_memory import report

    def row(mode, rank, world, weights, peak, estimate):
        return {"mode": mode, "rank": rank, "world": world, "baseline": 100, "file_backed": 300, "peak": peak,
                "parameters": weights, "gradients": weights, "optimizer": 2 * weights, "estimate": estimate}  # fmt: skip

    results = {"ddp": [row("ddp", r, 2, 1000, 400 + 4000, 4400) for r in range(2)],
               "fsdp2": [row("fsdp2", r, 2, 500 + 10 * r, 400 + 2000, 2500) for r in range(2)]}  # fmt: skip
    text = report(results)
    assert "FSDP2 / DDP parameter + optimizer bytes per process: 0.510 (target <= 0.6): met" in text  # worst rank
    assert "estimate / measured peak over baseline: 1.10 to 1.25 (target within 20%): NOT met" in text
