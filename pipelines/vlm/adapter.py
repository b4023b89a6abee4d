"""VLMAdapter: GRPO over transformers vision-language models (and text-only causal LMs).

One decision step is one completion token. The adapter

- turns each prompt item into model inputs ONCE (chat template + processor: pixel_values,
  image_grid_thw, video_grid_thw, ...; see `inputs`), keeps them in
  `Rollout.shared["prompt_inputs"]`, and encodes them once in a single prefill whose KV cache is
  then repeated for the G samples;
- samples tokens with its own short loop over the model and KV cache (`sampling.draw_tokens`, in
  inference mode, with the decode steps' attention masks built once), drawing from the given
  torch.Generator, and records the log-prob of each token under the distribution it was drawn
  from (logits / temperature, then top-p); `log_prob` re-scores teacher-forced with the SAME
  vision inputs and the same logits processing (`sampling_logits`, the one place that math
  lives): each distinct prompt once, then all completions on top of their prompt's KV cache (the
  gradient of a full forward per row, without recomputing the prompt G times); for Qwen2-VL /
  Qwen2.5-VL with a frozen vision tower the vision features and M-RoPE positions of sampling are
  reused (`reuse`);
- checks the image/video placeholder counts against the vision inputs of every row before a
  forward pass, so a mismatch is one readable error naming the row, not a crash in the model.

Qwen2-VL and Qwen2.5-VL are first-class (M-RoPE positions from the model's `get_rope_index`,
pixel_values per prompt sized by image_grid_thw.prod(-1)); other AutoModelForImageTextToText
models with a chat template work where their forward takes `position_ids` and a KV cache;
a text-only AutoModelForCausalLM + tokenizer is the degenerate case.
"""

from __future__ import annotations


import inspect
import itertools
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from mmgrpo.pipelines.toolkit import Finetuning, TunedAdapter, options_from, parse_dtype
from mmgrpo.pipelines.vlm.inputs import Positions, PromptEncoder, VisionTokens, collate
from mmgrpo.pipelines.vlm.loading import (
    eos_ids,
    in_prefixes,
    load_model_and_processor,
    prepared_mask_kind,
    vision_tower_prefixes,
)
from mmgrpo.pipelines.vlm.reuse import (
    reusable,
    reuse_entries,
    reuse_supported,
    reused_batch,
    vision_features,
    with_features,
)
from mmgrpo.pipelines.vlm.sampling import TokenRules, decode_masks, draw_tokens, sampling_logits
from mmgrpo.rollout import Rollout

__all__ = ["LORA_TARGETS", "VLMAdapter", "VLMOptions", "sampling_logits"]

# Default LoRA targets: attention and MLP projections of Qwen/Llama-style decoders.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class VLMOptions:
    """VLMAdapter's options (all plain values, so they can come from YAML `pipeline.kwargs`)."""

    model: Any = None  # a local folder (or hub id) to from_pretrained, or a built model (Python API)
    processor: Any = None  # the processor/tokenizer object or folder; default: loaded from model's folder
    kind: Literal["auto", "vlm", "text"] = "auto"  # auto: image-text-to-text or causal LM, from the config
    # "float32" (default for a folder), "bfloat16", "float16" (or a torch.dtype); a built model
    # is left as is unless given
    dtype: Any = None
    # precision of the logits processing (temperature, top-p, log-softmax); log-probs are fp32
    # either way. float64 keeps sampled and re-scored log-probs within one fp32 rounding step;
    # float32 halves the memory of the [n, T, vocab] step for large vocabularies.
    logit_dtype: Literal["float64", "float32"] = "float64"
    device: Any = None  # where to put the model (default: where it is; `to(device)` moves it later)
    attn_implementation: str | None = None  # passed to from_pretrained ("sdpa", "eager", ...)
    max_new_tokens: int = 64  # T, completion tokens per row
    temperature: float = 1.0
    top_p: float = 1.0
    stop_on_eos: bool = True
    eval_max_new_tokens: int | None = None  # used by sample(..., evaluate=True); None: same as training
    eval_temperature: float | None = None
    eval_top_p: float | None = None
    eos_token_id: int | list[int] | None = None  # default: the generation config's, else the model config's
    system_prompt: str | None = None  # an optional system message for the chat template
    mask_truncated_completions: bool = False  # rows that never emit EOS get an all-False mask
    freeze_vision: bool = True  # the vision tower is not trained and gets no LoRA layers
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # names (or last name components) of nn.Linear layers; vision tower excluded while freeze_vision
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    keep_reference: bool = True  # full fine-tuning: keep a frozen copy for reference()
    image_max_pixels: int | None = None  # cap on each image's pixels before the processor (None: processor decides)
    video_fps: float | None = 2.0  # video sampling (see media.load_video)
    video_nframes: int | None = None
    video_max_pixels: int | None = 128 * 28 * 28
    video_min_frames: int = 2
    video_max_frames: int = 16

    def __post_init__(self) -> None:
        for name in ("temperature", "eval_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (greedy decoding has no log-probs to train on), got {value}")
        for name in ("top_p", "eval_top_p"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        parse_dtype(self.dtype)  # an unknown name fails here, before any loading

    @property
    def video_options(self) -> dict[str, Any]:
        """Keyword arguments of media.load_video."""
        return dict(fps=self.video_fps, nframes=self.video_nframes, max_pixels=self.video_max_pixels,
                    min_frames=self.video_min_frames, max_frames=self.video_max_frames)  # fmt: skip


class VLMAdapter(TunedAdapter):
    """The policy: a transformers VLM (or causal LM) sampling completions token by token.

    VLMAdapter(model, processor=None, **options): see VLMOptions. The sampling settings
    max_new_tokens, temperature, top_p and eval_* are attributes read at every `sample` call.

    Rollout layout (N = B*G rows, prompt-major; T = max_new_tokens):
      log_probs, mask [N, T]: per completion token, mask up to and including EOS.
      extras: prompt_key (list[str], a key of shared["prompt_inputs"]), completion_ids [N, T]
        long (padded with the pad id), completion_length [N] long (tokens incl. EOS),
        temperature [N], top_p [N] (the processing each row was sampled under).
      shared["prompt_inputs"]: {prompt_key: processor outputs of one prompt, batch 1}.
      shared["prompt_reuse"] (M-RoPE VLMs with a frozen vision tower): {prompt_key: PromptReuse},
        the prompt's positions and vision features from sampling, so that re-scoring runs the
        vision tower and the rope index once per prompt, not once per row and forward.
    """

    Options = VLMOptions
    scores_all_steps_at_once = True

    def __init__(self, model: Any = None, processor: Any = None, **kwargs: Any) -> None:
        # Python callers may give sequences as tuples (lora_target_modules, eos_token_id); YAML gives lists
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        self.options = options = options_from(VLMOptions, {"model": model, "processor": processor, **kwargs},
                                              "VLMAdapter")  # fmt: skip
        model, processor = load_model_and_processor(
            options.model, options.processor, options.kind, parse_dtype(options.dtype), options.attn_implementation
        )
        if options.device is not None:
            model.to(options.device)
        tokens = VisionTokens.of(model.config)
        self.inputs = PromptEncoder(processor, tokens, system_prompt=options.system_prompt,
                                    image_max_pixels=options.image_max_pixels, video_options=options.video_options,
                                    model_name=type(model).__name__)  # fmt: skip
        self.processor, self.tokenizer, self.is_vlm = processor, self.inputs.tokenizer, self.inputs.is_vlm
        self.image_token_id, self.video_token_id = tokens.image_token_id, tokens.video_token_id
        self.positions = Positions(model, self.is_vlm)

        self.max_new_tokens = options.max_new_tokens
        self.temperature, self.top_p = float(options.temperature), float(options.top_p)
        self.eval_max_new_tokens = options.eval_max_new_tokens
        self.eval_temperature, self.eval_top_p = options.eval_temperature, options.eval_top_p
        self.eos_token_ids = eos_ids(model, options.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]
        logit_dtype = torch.float64 if options.logit_dtype == "float64" else torch.float32
        self.rules = TokenRules(self.eos_token_ids, self.pad_token_id, tokens.placeholders, options.stop_on_eos,
                                logit_dtype)  # fmt: skip

        self.tuning = Finetuning(
            model, options.finetune, lora_rank=options.lora_rank, lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout, lora_target_modules=options.lora_target_modules,
            frozen_prefixes=vision_tower_prefixes(model) if options.freeze_vision else (),
            keep_reference=options.keep_reference,
        )  # fmt: skip
        self.vision_prefixes = vision_tower_prefixes(self.model)  # of the tuned module (a given PeftModel's base)
        self._vision_parameters = [p for name, p in self.model.named_parameters()
                                   if in_prefixes(name, self.vision_prefixes)]  # fmt: skip
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        # Qwen2-VL / Qwen2.5-VL with a frozen vision tower: encode each prompt's images once at
        # sampling and reuse the features (and M-RoPE positions) when re-scoring; see _reuse_prompts.
        self._reuse_family = reuse_supported(self.model, self.positions.mrope)
        # keys of shared["prompt_inputs"]: unique per adapter instance, so rollouts concatenate safely
        self._key_prefix = uuid.uuid4().hex[:8]
        self._prompt_counter = itertools.count()

    # ------------------------------------------------------------------ state
    def shard(self, mixed_precision: str = "no") -> None:
        """Shard the model over the processes (FSDP2). Two things change so that every process runs the same
        forwards, each through the model's own forward (where FSDP gathers the weights it needs):
        - vision features are not reused: the tower runs inside every forward instead of once per prompt
          beforehand (FSDP2 gathers a submodule's weights only inside the root module's forward);
        - decoding stops only once the rows of every process have ended (as transformers' synced_gpus)."""
        self.tuning.shard(mixed_precision)
        self._reuse_family = False
        self.rules = replace(self.rules, synced=True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _reuse_prompts(self) -> bool:
        """Whether sampling keeps, and re-scoring uses, each prompt's vision features and positions.

        Checked at every call: the features carry no gradient, so a vision tower with trainable
        weights must be run again when re-scoring.
        """
        return self._reuse_family and not any(p.requires_grad for p in self._vision_parameters)

    def _encode(self, item: Any, index: int) -> dict[str, torch.Tensor]:
        """Processor outputs (batch 1, on the model's device) of one prompt item."""
        return self.inputs.encode(item, index, self.device)

    def _collate(self, prompts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate(prompts, self.pad_token_id, self.device)

    def _forward(self, keep: int, **inputs) -> Any:
        """The running model (the frozen copy inside reference() with full fine-tuning), last `keep` logits."""
        if self._keeps_logits:
            inputs["logits_to_keep"] = keep
        return self.tuning.active(**inputs)

    def activation_shape(self, prompts: Sequence[Any] = ()) -> Any:
        """A training forward for mmgrpo.memory: max_new_tokens per row through the language model after the
        longest of `prompts` (text and vision tokens; prefilled once for the rows sharing it), its dims, and the
        log-softmax over the vocabulary at each completion token in the run's logit dtype. None when the config
        names no transformer dims."""
        from mmgrpo.memory import ActivationShape, transformer_dims

        config = self.model.config
        dims = transformer_dims(config)
        if dims is None:
            return None
        prompt = max((self._encode(p, i)["input_ids"].shape[1] for i, p in enumerate(prompts)), default=0)
        vocab = getattr(getattr(config, "text_config", None) or config, "vocab_size", 0) or 0
        return ActivationShape(self.max_new_tokens, *dims, vocab=vocab, logit_tokens=self.max_new_tokens,
                               logit_bytes=torch.finfo(self.rules.logit_dtype).bits // 8,
                               shared_tokens=prompt)  # fmt: skip

    def check_prompts(self, prompts: Sequence[Any]) -> None:
        """Before training: one ConfigError line for a prompt without text or with media that cannot be read."""
        self.inputs.check(prompts)

    def export_pretrained(self, folder: str | Path) -> list[Path]:
        """The trained model as a from_pretrained folder (LoRA merged), with its processor beside it."""
        written = self.tuning.export_pretrained(folder)
        if hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(str(folder))
        return written

    def export(self, sample: str, path: str | Path) -> Path:
        """Write one decoded completion to a UTF-8 text file; returns the path written."""
        path = Path(path).with_suffix(".txt")
        path.write_text(sample, encoding="utf-8")
        return path

    # ------------------------------------------------------------------ protocol: sample
    @torch.no_grad()
    def sample(
        self, prompts: Sequence[Any], group_size: int, generator: torch.Generator, *, evaluate: bool = False
    ) -> Rollout:
        """G completions per prompt, rows prompt-major; each prompt is processed and encoded once."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        G, B = group_size, len(prompts)
        T, temperature, top_p = self.max_new_tokens, self.temperature, self.top_p
        if evaluate:
            T = self.eval_max_new_tokens or T
            temperature = self.eval_temperature if self.eval_temperature is not None else temperature
            top_p = self.eval_top_p if self.eval_top_p is not None else top_p
        device = self.device
        R = B * G

        encoded = [self._encode(item, i) for i, item in enumerate(prompts)]  # processor once per prompt
        batch = self._collate(encoded)  # [B, L] left-padded
        positions, delta = self.positions.of_batch(batch)  # [(3,) B, L], [B]
        features = vision_features(self.tuning.active, batch) if self._reuse_prompts else None  # encoded once
        temp = torch.full((R,), temperature, device=device)  # [R]
        nucleus = torch.full((R,), top_p, device=device)  # [R]
        # Decoding never needs autograd: inference mode skips its bookkeeping (~10% of a small model's
        # decode time on CPU). Its outputs are inference tensors, cloned into ordinary ones here.
        # (Sharded weights: plain no_grad, since FSDP's gathered weights are updated in place.)
        with torch.no_grad() if self.tuning.sharded else torch.inference_mode():
            decoded = self._decode(batch, positions, delta, features, G, T, temp, nucleus, generator)
        tokens, log_probs, lengths, ended = (x.clone() for x in decoded)  # [R, T], [R, T], [R], [R]

        steps = torch.arange(T, device=device)
        mask = steps[None, :] < lengths[:, None]  # [R, T] completion tokens up to and including EOS
        if self.options.mask_truncated_completions:
            mask &= ended[:, None]
        samples = []
        for r in range(R):
            ids = tokens[r, : int(lengths[r])].tolist()
            if ids and ids[-1] in self.eos_token_ids:
                ids = ids[:-1]
            samples.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        keys = [f"{self._key_prefix}-{next(self._prompt_counter)}" for _ in range(B)]
        rows = [b for b in range(B) for _ in range(G)]
        shared: dict[str, Any] = {"prompt_inputs": dict(zip(keys, encoded))}
        if features is not None:
            shared["prompt_reuse"] = dict(zip(keys, reuse_entries(encoded, positions, delta, features)))
        return Rollout(
            group_id=torch.arange(B).repeat_interleave(G),  # [N]
            prompts=[prompts[b] for b in rows],
            samples=samples,
            log_probs=log_probs,  # [N, T]
            mask=mask,  # [N, T]
            extras={
                "prompt_key": [keys[b] for b in rows],
                "completion_ids": tokens,  # [N, T]
                "completion_length": lengths,  # [N]
                "temperature": temp,  # [N]
                "top_p": nucleus,  # [N]
            },
            shared=shared,
        )

    def _decode(
        self, batch: dict[str, torch.Tensor], positions: torch.Tensor, delta: torch.Tensor,
        features: dict[str, tuple[torch.Tensor, ...]] | None, G: int, T: int, temp: torch.Tensor,
        nucleus: torch.Tensor, generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample up to T tokens for each of the G rows per prompt of `batch` ([B, L], left-padded).

        One prefill over the B prompts (vision encoded once, or given as `features`), its KV cache
        repeated for the G samples, then one forward per token (see sampling.draw_tokens).
        """
        device = self.device
        prompt_mask = batch["attention_mask"]  # [B, L]
        L = prompt_mask.shape[1]
        inputs = batch if features is None else with_features(batch, features)
        out = self._forward(1, **inputs, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(G)  # the prompt's cache, once per sample of its group
        embedding_dtype = self.tuning.active.get_input_embeddings().weight.dtype
        masks = decode_masks(prompt_mask.repeat_interleave(G, 0), T, embedding_dtype,
                             prepared_mask_kind(self.tuning.active))  # [R, (1, 1,) L + T]
        next_position = (prompt_mask.sum(-1) + delta).repeat_interleave(G)  # [R] of the first completion token
        decode_positions = self.positions.of_text(next_position[:, None] + torch.arange(T, device=device))

        def step(token: torch.Tensor, t: int) -> torch.Tensor:  # [R] -> [R, V]
            out = self._forward(1, input_ids=token[:, None], attention_mask=masks[..., : L + t + 1],  # [R, .., L+t+1]
                                position_ids=decode_positions[..., t : t + 1], past_key_values=cache, use_cache=True)
            return out.logits[:, -1]

        first = out.logits[:, -1].repeat_interleave(G, 0)  # [R, V]
        return draw_tokens(first, step, T, temp, nucleus, generator, self.rules)

    # ------------------------------------------------------------------ protocol: log_prob
    def log_prob(self, rollout: Rollout, steps: Sequence[int] | None = None) -> torch.Tensor:
        """Log-probs [n, len(steps)] fp32 of the recorded tokens under the current weights.

        Teacher-forced, with the rows' own vision inputs and the same logits processing as
        sampling, in two forwards: each distinct prompt once (its G rows share it), then every
        row's completion on top of its prompt's KV cache. The gradient is the one of a full
        forward per row (the prompt pass receives the sum over its rows); the prompt tokens are
        computed once instead of G times. Columns past a row's completion are 0.
        """
        extras = rollout.extras
        T = rollout.num_steps
        steps = list(range(T)) if steps is None else [int(s) for s in steps]
        if not steps:
            return torch.zeros(len(rollout), 0, device=self.device)
        width = max(steps) + 1  # completion tokens scored
        device = self.device
        prompts = [rollout.shared["prompt_inputs"][key] for key in extras["prompt_key"]]
        completion = extras["completion_ids"][:, :width].to(device)  # [n, W]
        lengths = extras["completion_length"].to(device)  # [n]
        column = torch.arange(width, device=device)
        valid = column[None, :] < lengths[:, None]  # [n, W]
        if self.inputs.tokens.placeholders:
            for r, prompt in enumerate(prompts):
                ids = torch.cat([prompt["input_ids"][0].to(device), completion[r][valid[r]]])
                self.inputs.tokens.check(ids, prompt, f"sample {r}")
        # 1. every prompt once, with gradients (Prefix Grouper): its KV cache serves all of its rows
        keys = extras["prompt_key"]
        unique_keys = list(dict.fromkeys(keys))  # U prompts, in order of first appearance
        slot = {key: i for i, key in enumerate(unique_keys)}
        row_prompt = torch.tensor([slot[key] for key in keys], dtype=torch.long, device=device)  # [n] -> [0, U)
        unique = [rollout.shared["prompt_inputs"][key] for key in unique_keys]
        reuse = reusable(rollout.shared.get("prompt_reuse") if self._reuse_prompts else None, unique_keys, unique)
        if reuse is None:
            batch = self._collate(unique)  # [U, L] left-padded
            positions, delta = self.positions.of_batch(batch)  # [(3,) U, L], [U]
        else:  # positions and vision features from sampling: no rope index, no vision tower
            batch, positions, delta = reused_batch(reuse, unique, self._collate, device)
        banned = torch.tensor(self.rules.banned, dtype=torch.long, device=device)
        temp, top_p = extras["temperature"].to(device), extras["top_p"].to(device)  # [n], [n]
        temp = temp[:, None] if bool((temp != 1).any()) else None  # [n, 1]
        top_p = top_p[:, None] if bool((top_p < 1).any()) else None  # [n, 1]

        def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:  # [n, k, V], [n, k] -> [n, k]
            scores = sampling_logits(logits, temp, top_p, banned, self.rules.logit_dtype)  # [n, k, V]
            return scores.log_softmax(-1).gather(-1, tokens.unsqueeze(-1))[..., 0]

        prompt_mask = batch["attention_mask"]  # [U, L]
        out = self._forward(1, **batch, position_ids=positions, use_cache=width > 1)
        picked = [token_log_probs(out.logits[:, -1:][row_prompt], completion[:, :1])]  # [n, 1] of token 0
        if width > 1:
            # 2. the completions continue their prompt's cache (gradients flow back through it);
            # the last scored token is only a target, never an input
            cache = out.past_key_values
            if cache is None:
                raise RuntimeError(
                    f"{type(self.tuning.active).__name__} returned no KV cache for use_cache=True: VLMAdapter needs "
                    f"a model whose forward supports a cache (and gradient checkpointing off while scoring)"
                )
            cache.batch_select_indices(row_prompt)  # [U, ...] -> [n, ...]
            attention = torch.cat([prompt_mask[row_prompt], valid[:, : width - 1].to(prompt_mask.dtype)], 1)
            start = (prompt_mask.sum(-1) + delta)[row_prompt]  # [n] position of completion token 0
            positions = self.positions.of_text(start[:, None] + column[None, : width - 1])  # [(3,) n, W - 1]
            out = self._forward(width - 1, input_ids=completion[:, : width - 1], attention_mask=attention,
                                position_ids=positions, past_key_values=cache, use_cache=True)  # [n, L + W - 1] keys
            picked.append(token_log_probs(out.logits[:, -(width - 1) :], completion[:, 1:]))  # [n, W - 1]
        picked = torch.where(valid, torch.cat(picked, 1).float(), 0.0)  # [n, W]
        return picked[:, steps]  # [n, len(steps)]
