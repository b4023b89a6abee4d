"""Memory per device of a run, estimated before it starts: parameters, gradients, optimizer state and the
activations of one micro-batch, by sharding mode.

    inv = inventory(adapter.tuning.model, adapter.tuning._reference_copy, frozen=[text_encoder, vae])
    est = estimate_memory(inv, "fsdp2", world_size=8, activations=ActivationShape(4096, 3072, 24, 24), rows=8)
    print(format_estimate(est))

What each mode divides by the world size W (the trained module is `adapter.tuning.model`; frozen towers
such as text encoders and VAEs live outside it and are replicated in every mode):

    mode    trained weights   gradients   optimizer state
    single  -                 -           -                 (one process, W = 1)
    ddp     -                 -           -
    zero1   -                 -           / W
    zero2   -                 / W         / W               (DeepSpeed ZeRO-2)
    fsdp2   / W               / W         / W               (the full-FT reference copy is sharded too)
    zero3   / W               / W         / W

Transient buffers (the `buffers` line): under ddp the trainer averages gradients with one all-reduce of a
flat fp32 copy of them (distributed.Collective.mean_gradients), which accelerate's reduce clones: 2 x 4 bytes
per trainable weight at that moment. Under fsdp2 each block's weights are all-gathered for its forward and
backward while the next block's gather is prefetched, and its full gradient exists until it is
reduce-scattered: about 3 unsharded blocks, plus the weights outside every block (embeddings, heads), which
the root keeps gathered between forward and backward. Blocks are the model's `_no_split_modules` classes,
as the FSDP2 wrap policy picks them.

Optimizer state is torch AdamW's, as the trainer runs it: two moments in the dtype of each trainable weight
and a 4-byte step per weight tensor. LoRA weights train in fp32 (pipelines/toolkit.py), so LoRA runs need no
master copy. Under DeepSpeed with 16-bit trainable weights, ZeRO keeps fp32 master weights and fp32
moments instead: 12 bytes per weight (Rajbhandari et al. 2020, "ZeRO", K = 12).

Activations per micro-batch follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", sec. 4.1): a transformer layer stores s*b*h*(34 + 5*a*s/h) bytes at 16-bit (s tokens,
b rows, h hidden, a heads) with dropout and the attention scores kept for backward. Term by term, 2*s*b*h of
the 34 and 3*a*s^2*b of the 5*a*s^2*b are dropout masks and outputs, and the other 2*a*s^2*b the softmax
output. Our adapters run their models in eval mode (no dropout) and through SDPA's fused attention, which
recomputes the scores in backward instead of storing them: 32*s*b*h per layer, the default here (the saved
tensors of mmgrpo.bench.block_policy's blocks match it, tests/test_memory.py). Scaled by bytes_per_value / 2
for fp32. With full activation checkpointing each layer keeps only its input, 2*s*b*h bytes at 16-bit, and
backward recomputes one layer at a time, so one layer's full activations are added once. Language models add
the log-softmax their loss saves over the LM head: rows x scored tokens x vocab x its bytes (Korthikanti et al.
leave the output layer out).

The total adds activations to gradients, which is the peak when an optimizer step runs more than one backward
(several micro-batches or step chunks, as the shipped configs do); a step with a single backward peaks lower,
since its activations are freed as its gradients fill. An adapter tells its shape through the optional method
`activation_shape(prompts) -> ActivationShape | None` (prompts: some of the run's training prompts, for
adapters whose sequence length depends on them); without it the activations are "not estimated".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import torch

from mmgrpo.sharding import fsdp_requested

__all__ = [
    "MODES", "ActivationShape", "MemoryEstimate", "ParameterInventory", "activation_bytes", "estimate_memory",
    "estimate_for_run", "format_estimate", "inventory", "lora_parameter_count", "sharding_mode", "transformer_dims",
]  # fmt: skip

# mode -> (trained weights sharded, gradients sharded, optimizer state sharded)
SHARDING = {
    "single": (False, False, False),
    "ddp": (False, False, False),
    "zero1": (False, False, True),
    "zero2": (False, True, True),
    "fsdp2": (True, True, True),
    "zero3": (True, True, True),
}
MODES = tuple(SHARDING)
ADAM_STEP_BYTES = 4  # torch AdamW keeps `step` as a float32 scalar tensor per weight tensor
ZERO_MIXED_PRECISION_OPTIMIZER_BYTES = 12  # fp32 master weight + two fp32 moments per 16-bit weight


@dataclass(frozen=True)
class ParameterInventory:
    """The weights a run keeps on one device before any sharding, in bytes as stored."""

    trained_bytes: int  # every weight of the trained module (its frozen base and LoRA layers included)
    trainable_bytes: int  # the weights the optimizer updates
    trainable_count: int  # how many numbers those are
    trainable_tensors: int  # how many tensors (AdamW keeps a step per tensor)
    reference_bytes: int = 0  # the frozen copy full fine-tuning keeps as reference policy
    replicated_bytes: int = 0  # frozen modules outside the trained one (text encoders, VAE, vision towers)
    largest_block_bytes: int = 0  # the largest block FSDP2 shards on its own (a _no_split_modules class)
    outside_blocks_bytes: int = 0  # trained-module weights in no block (embeddings, heads): the root's shard

    @property
    def trainable_bytes_per_value(self) -> float:
        return self.trainable_bytes / max(self.trainable_count, 1)


class ActivationShape(NamedTuple):
    """What one forward of the trained module looks like, per row of a micro-batch."""

    tokens: int  # sequence length s through the transformer blocks (image/video patches + text tokens)
    hidden: int  # h
    heads: int  # a
    layers: int  # transformer blocks
    forwards: int = 1  # forwards per row whose graphs one backward holds (flow: decision steps per chunk)
    rows_per_sample: int = 1  # rows per sample in a forward (2 under classifier-free guidance)
    checkpointed: bool = False  # full activation checkpointing of every block
    flash_attention: bool = True  # fused attention (SDPA): the a*s^2 scores are recomputed, not stored
    dropout: bool = False  # dropout active in training forwards (the adapters run their models in eval mode)
    vocab: int = 0  # LM head width: the log-softmax over it is saved for backward (0: no LM head)
    logit_tokens: int | None = None  # positions scored through the LM head per forward (None: tokens)
    logit_bytes: int = 4  # bytes per value of that log-softmax (fp32; the VLM's float64 option: 8)
    shared_tokens: int = 0  # prompt tokens run once for all rows of a micro-batch sharing the prompt (VLM prefill)


class MemoryEstimate(NamedTuple):
    """Bytes per device."""

    mode: str
    world_size: int
    parameters: int  # trained module (or its shard), reference copy, replicated frozen modules
    gradients: int
    optimizer: int
    activations: int | None  # one micro-batch; None: the adapter gave no shape
    buffers: int = 0  # transient: the gradient all-reduce (ddp), gathered blocks (fsdp2)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + (self.activations or 0) + self.buffers


def _unique_parameters(modules: Iterable[torch.nn.Module | None]) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        if module is not None:
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def _bytes(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _blocks(module: torch.nn.Module, class_names: Sequence[str]) -> list[torch.nn.Module]:
    """The outermost submodules whose class (or a base class: FSDP2's sharded FSDP<Block>) is named in class_names."""
    found: list[torch.nn.Module] = []
    inner: set[int] = set()
    for sub in module.modules():
        if id(sub) in inner:
            continue
        if sub is not module and any(cls.__name__ in class_names for cls in type(sub).__mro__):
            found.append(sub)
            inner |= {id(m) for m in sub.modules()}
    return found


def inventory(
    trained: torch.nn.Module,
    reference: torch.nn.Module | None = None,
    frozen: Sequence[torch.nn.Module] = (),
    extra_trainable: int = 0,
    extra_trainable_tensors: int = 0,
    block_classes: Sequence[str] | None = None,
) -> ParameterInventory:
    """Count the weights of the trained module, its reference copy and the frozen modules (meta tensors work).

    Shared tensors count once; a frozen module that is part of the trained one counts with the trained one.
    extra_trainable / extra_trainable_tensors: fp32 weights not yet in `trained` (LoRA layers counted by
    lora_parameter_count for a model built on the meta device without peft); they count inside the blocks.
    block_classes: class names of the blocks FSDP2 shards one by one (default: trained._no_split_modules).
    """
    trained_params = _unique_parameters([trained])
    trainable = [p for p in trained_params if p.requires_grad]
    inside = {id(p) for p in trained_params}
    reference_params = [p for p in _unique_parameters([reference]) if id(p) not in inside]
    inside |= {id(p) for p in reference_params}
    frozen_params = [p for p in _unique_parameters(frozen) if id(p) not in inside]
    names = block_classes if block_classes is not None else getattr(trained, "_no_split_modules", None) or ()
    blocks = _blocks(trained, names)
    block_bytes = [_bytes(_unique_parameters([b])) for b in blocks]
    extra_per_block = 4 * extra_trainable / len(blocks) if blocks else 0.0
    return ParameterInventory(
        trained_bytes=_bytes(trained_params) + 4 * extra_trainable,
        trainable_bytes=_bytes(trainable) + 4 * extra_trainable,
        trainable_count=sum(p.numel() for p in trainable) + extra_trainable,
        trainable_tensors=len(trainable) + extra_trainable_tensors,
        reference_bytes=_bytes(reference_params),
        replicated_bytes=_bytes(frozen_params),
        largest_block_bytes=int(max(block_bytes, default=0) + extra_per_block),
        outside_blocks_bytes=_bytes(trained_params) - sum(block_bytes) + (0 if blocks else 4 * extra_trainable),
    )


def lora_parameter_count(model: torch.nn.Module, targets: Sequence[str], rank: int,
                         frozen_prefixes: Sequence[str] = ()) -> tuple[int, int]:
    """(numbers, tensors) of the LoRA weights peft would add: rank x (in + out) per adapted nn.Linear,
    two tensors (A and B) each. The layers are those pipelines.toolkit.Finetuning adapts."""
    from mmgrpo.pipelines.toolkit import lora_targets

    modules = dict(model.named_modules())
    names = lora_targets(model, targets, frozen_prefixes)
    count = sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)
    return count, 2 * len(names)


def transformer_dims(config: Any) -> tuple[int, int, int] | None:
    """(hidden, heads, layers) of a transformers-style config (its text_config for a VLM), or of the OLMo-style
    names LLaDA's remote code uses (d_model, n_heads, n_layers); None when the config has neither."""
    config = getattr(config, "text_config", None) or config
    names = (("hidden_size", "num_attention_heads", "num_hidden_layers"), ("d_model", "n_heads", "n_layers"))
    for hidden, heads, layers in names:
        values = [getattr(config, name, None) for name in (hidden, heads, layers)]
        if all(isinstance(v, int) for v in values):
            return values[0], values[1], values[2]
    return None


def activation_bytes(shape: ActivationShape, rows: int, bytes_per_value: int = 2) -> int:
    """Activations one backward holds for `rows` samples (Korthikanti et al. 2022, per layer; see the module doc).

    >>> paper = ActivationShape(tokens=8, hidden=4, heads=2, layers=1, flash_attention=False, dropout=True)
    >>> activation_bytes(paper, rows=1)  # 8*1*4*(34 + 5*2*8/4)
    1728
    """
    s, h, a, L = shape.tokens, shape.hidden, shape.heads, shape.layers
    b = rows * shape.rows_per_sample * shape.forwards
    scale = bytes_per_value / 2
    tensors = s * b * h * (34 if shape.dropout else 32)  # inputs of the linears, norms and activations (+ masks)
    scores = 0 if shape.flash_attention else a * s * s * b * (5 if shape.dropout else 2)  # softmax (+ dropout)
    per_layer = (tensors + scores) * scale  # bytes of one layer's saved tensors
    logits = b * (s if shape.logit_tokens is None else shape.logit_tokens) * shape.vocab * shape.logit_bytes
    if not shape.checkpointed:
        return int(round(L * per_layer + logits))
    return int(round(L * 2 * s * b * h * scale + per_layer / shape.forwards + logits))  # + one layer recomputed


def estimate_memory(
    inv: ParameterInventory,
    mode: str,
    world_size: int = 1,
    activations: ActivationShape | None = None,
    rows: int = 1,
    bytes_per_activation: int = 2,
) -> MemoryEstimate:
    """Bytes per device of a run with these weights under `mode` (MODES) on `world_size` processes.

    rows: samples in one micro-batch (train.micro_batch_size, at most the process's share of the batch).
    """
    if mode not in SHARDING:
        raise ValueError(f"unknown sharding mode {mode!r}: use one of {', '.join(MODES)}")
    W = 1 if mode == "single" else world_size
    shard_weights, shard_grads, shard_optimizer = SHARDING[mode]

    def split(nbytes: float, sharded: bool) -> int:
        return int(round(nbytes / W)) if sharded else int(nbytes)

    parameters = split(inv.trained_bytes + inv.reference_bytes, shard_weights) + inv.replicated_bytes
    gradients = split(inv.trainable_bytes, shard_grads)
    deepspeed_master = mode.startswith("zero") and inv.trainable_bytes_per_value < 4
    moments = ZERO_MIXED_PRECISION_OPTIMIZER_BYTES * inv.trainable_count if deepspeed_master \
        else 2 * inv.trainable_bytes  # fmt: skip
    optimizer = split(moments, shard_optimizer) + ADAM_STEP_BYTES * inv.trainable_tensors
    acts = None if activations is None else activation_bytes(activations, rows, bytes_per_activation)
    return MemoryEstimate(mode, W, parameters, gradients, optimizer, acts, transient_buffers(inv, mode, W))


def transient_buffers(inv: ParameterInventory, mode: str, world_size: int) -> int:
    """Bytes of the communication buffers at their peak (see the module docstring); 0 on one process."""
    if world_size == 1 or mode == "single":
        return 0
    if mode == "ddp":
        return 2 * 4 * inv.trainable_count  # Collective.mean_gradients' flat fp32 copy + accelerate.reduce's clone
    if mode == "fsdp2":
        return 3 * inv.largest_block_bytes + inv.outside_blocks_bytes
    return 0  # DeepSpeed's buckets are bounded by its reduce_bucket_size, not modelled


def sharding_mode(accelerator: Any) -> str:
    """The MODES name of how an accelerate.Accelerator runs: single, ddp, fsdp2 or zero1/2/3.

    FSDP counts when the launch asked for it (ACCELERATE_USE_FSDP=true, set by `accelerate launch` with an FSDP
    config): on CPU accelerate reports a multi-CPU run, and mmgrpo shards the trained module itself.
    """
    kind = str(getattr(accelerator, "distributed_type", "NO")).split(".")[-1]
    if accelerator.num_processes == 1:
        return "single"
    if kind == "FSDP" or fsdp_requested():
        return "fsdp2"
    if kind == "DEEPSPEED":
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}" if accelerator.state.deepspeed_plugin else "ddp"
    return "ddp"


def _trained_and_frozen(adapter: Any) -> tuple[torch.nn.Module, torch.nn.Module | None, list[torch.nn.Module]]:
    """The trained module, the reference copy, and the other modules the adapter holds as attributes or as
    components of its diffusers pipeline (`pipe`): the frozen towers (text encoders, VAE)."""
    others = [m for m in vars(adapter).values() if isinstance(m, torch.nn.Module)]
    components = getattr(getattr(adapter, "pipe", None), "components", None)
    if isinstance(components, dict):
        others += [m for m in components.values() if isinstance(m, torch.nn.Module)]
    return adapter.tuning.model, getattr(adapter.tuning, "_reference_copy", None), others


def estimate_for_run(
    adapter: Any, cfg: Any, world_size: int, mode: str, prompts: Sequence[Any] = ()
) -> MemoryEstimate | None:
    """The estimate for a run's adapter (one with `tuning`, pipelines.toolkit.Finetuning) and config.

    prompts: training prompts handed to the adapter's activation_shape (the longest sets the sequence length).

    None for an adapter without `tuning` (its weights are its own business: nothing is estimated).
    """
    if not hasattr(adapter, "tuning"):
        return None
    trained, reference, others = _trained_and_frozen(adapter)
    inv = inventory(trained, reference, others)
    shape_of = getattr(adapter, "activation_shape", None)
    shape = shape_of(list(prompts)) if shape_of is not None else None
    if shape is not None and not isinstance(shape, ActivationShape):
        shape = ActivationShape(**dict(shape))
    if shape is not None and mode == "fsdp2" and _fsdp_checkpointing():  # the launch turns it on (sharding.py)
        shape = shape._replace(checkpointed=True)
    if shape is not None and cfg.train.step_chunk and cfg.loss.ratio == "token":
        shape = shape._replace(forwards=min(shape.forwards, cfg.train.step_chunk))
    W = 1 if mode == "single" else world_size
    local_rows = cfg.train.prompts_per_step * cfg.train.group_size // W
    rows = max(1, min(cfg.train.micro_batch_size, local_rows))
    if shape is not None and shape.shared_tokens:  # a prompt's prefill serves its rows in the micro-batch
        sharing = min(cfg.train.group_size, rows)
        shape = shape._replace(tokens=shape.tokens + -(-shape.shared_tokens // sharing), shared_tokens=0)
    low_precision = cfg.train.mixed_precision == "bf16" or inv.trained_bytes < 4 * _numel(trained)
    return estimate_memory(inv, mode, world_size, shape, rows, bytes_per_activation=2 if low_precision else 4)


def _fsdp_checkpointing() -> bool:
    """fsdp_activation_checkpointing of the accelerate config (FSDP_ACTIVATION_CHECKPOINTING in the launch)."""
    return os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() in ("true", "1", "yes")


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in _unique_parameters([module]))


def _gb(nbytes: int) -> str:
    """GB with two decimals; MB below 1 GB, so a small model does not read 0.00 GB."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def format_estimate(est: MemoryEstimate | None) -> str:
    """The block the trainer prints at start (main process only)."""
    if est is None:
        return "memory per device: not estimated (the adapter has no `tuning` to count weights from)"
    acts = "not estimated (the adapter gives no activation_shape)" if est.activations is None \
        else f"{_gb(est.activations)} per micro-batch"  # fmt: skip
    return "\n".join([
        f"memory per device (estimate, {est.mode}, {est.world_size} process{'es' if est.world_size > 1 else ''}):",
        f"  parameters:      {_gb(est.parameters)}",
        f"  gradients:       {_gb(est.gradients)}",
        f"  optimizer state: {_gb(est.optimizer)}",
        f"  activations:     {acts}",
        f"  buffers:         {_gb(est.buffers)} (gradient all-reduce / gathered blocks, transient)",
        f"  total:           {_gb(est.total)}{'' if est.activations is not None else ' + activations'}",
    ])  # fmt: skip
