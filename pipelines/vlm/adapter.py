"""VLMAdapter: GRPO over transformers vision-language models (and text-only causal LMs).

One decision step is one completion token. The adapter

- turns each prompt item into model inputs ONCE (chat template + processor: pixel_values,
  image_grid_thw, video_grid_thw, ...), keeps them in `Rollout.shared["prompt_inputs"]`, and
  encodes them once in a single prefill whose KV cache is then repeated for the G samples;
- samples tokens with its own short loop over the model and KV cache (in inference mode, with
  the decode steps' attention masks built once), drawing from the given torch.Generator, and
  records the log-prob of each token under the distribution it was drawn from (logits /
  temperature, then top-p); `log_prob` re-scores teacher-forced with the SAME vision inputs and
  the same logits processing (`sampling_logits`, the one place that math lives): each distinct
  prompt once, then all completions on top of their prompt's KV cache (the gradient of a full
  forward per row, without recomputing the prompt G times); for Qwen2-VL / Qwen2.5-VL with a
  frozen vision tower the vision features and M-RoPE positions of sampling are reused;
- checks the image/video placeholder counts against the vision inputs of every row before a
  forward pass, so a mismatch is one readable error naming the row, not a crash in the model.

Qwen2-VL and Qwen2.5-VL are first-class (M-RoPE positions from the model's `get_rope_index`,
pixel_values per prompt sized by image_grid_thw.prod(-1)); other AutoModelForImageTextToText
models with a chat template work where their forward takes `position_ids` and a KV cache;
a text-only AutoModelForCausalLM + tokenizer is the degenerate case.

Prompt items: a string, or a dict {"prompt": text, "image": x | "images": [x, ...],
"video": v | "videos": [v, ...], **ground-truth fields}; images are file paths, PIL images,
numpy uint8 HWC arrays or tensors; videos are file paths (read with decord) or frame arrays.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mmgrpo.pipelines.vlm.media import Video, load_image, load_video
from mmgrpo.rollout import Rollout

# Module names (last path component) of vision towers in transformers VLMs.
VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder")
# Per-token processor outputs: padded and extended with the sequence, not concatenated per image.
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# Processor outputs a vision encoder reads: (placeholder kind, pixel key, grid key).
VISION_INPUTS = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))
PIXEL_KEYS = tuple(pixel_key for _, pixel_key, _ in VISION_INPUTS)
# Families whose forward takes precomputed vision features as `mm_encoder_outputs` holding only
# `pooler_output` (one tensor per image / video). Qwen3-VL also needs its deepstack features, so
# it, like any other model, re-encodes the pixels when re-scoring.
REUSE_VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# Default LoRA targets: attention and MLP projections of Qwen/Llama-style decoders.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def sampling_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    top_p: torch.Tensor | None,
    banned: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The logits of the distribution tokens are sampled from: in `dtype`, / temperature, top-p filtered.

    logits [..., V]; temperature and top_p [...] (one per row). Tokens outside the nucleus (the
    smallest set of most likely tokens whose mass reaches top_p) and `banned` token ids get -inf.
    Rows with top_p >= 1 are not filtered. temperature=None means 1 for every row (x / 1 is x
    exactly, so it only skips the work) and top_p=None that no row is filtered (it skips the
    check, which the decode loop would otherwise repeat at every token). Both sampling and
    re-scoring call this, so the recorded and the re-scored log-probs come from the same distribution. Note that with
    top_p < 1 a token can fall outside the nucleus of updated weights (log-prob -inf).
    float64 (the default) keeps the fp32 log-probs computed from it within one rounding step of
    each other however the batch is shaped; float32 halves the memory of this step.
    """
    scaled = logits.to(dtype)  # [..., V]
    if temperature is not None:
        scaled = scaled / temperature.to(dtype).unsqueeze(-1)  # [..., V]
    if banned is not None and banned.numel():
        scaled = scaled.index_fill(-1, banned, float("-inf"))  # [..., V]
    if top_p is not None and bool((top_p < 1).any()):
        ordered, order = scaled.sort(dim=-1, descending=True, stable=True)  # [..., V]
        probs = ordered.softmax(-1)  # [..., V]
        mass_before = probs.cumsum(-1) - probs  # [..., V] mass of the more likely tokens
        drop_sorted = (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1)  # [..., V]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [..., V] vocab order
        scaled = scaled.masked_fill(drop, float("-inf"))  # [..., V]
    return scaled


def _as_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class PromptReuse:
    """What re-scoring reuses from sampling for one prompt: its M-RoPE positions and vision features.

    Valid only while the prompt's tensors are the ones it was computed from (same objects, not
    modified in place): `matches` checks, and log_prob recomputes everything otherwise.
    """

    sources: dict[str, tuple[torch.Tensor, int]]  # prompt key -> (tensor, its version counter)
    positions: torch.Tensor  # [3, L] M-RoPE positions of the prompt's L tokens
    delta: int  # the text token after the prompt's L tokens sits at L + delta
    features: dict[str, tuple[torch.Tensor, ...]]  # "image"/"video" -> encoder output per item, in order

    @staticmethod
    def sources_of(prompt: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        return {k: (v, v._version) for k, v in prompt.items()}

    def matches(self, prompt: dict[str, torch.Tensor]) -> bool:
        return prompt.keys() == self.sources.keys() and all(
            prompt[k] is t and t._version == v for k, (t, v) in self.sources.items()
        )


class VLMAdapter:
    """The policy: a transformers VLM (or causal LM) sampling completions token by token.

    Keyword arguments (all plain values, so they can come from YAML):
      model: a local folder (or hub id) to `from_pretrained`, or a built model (Python API).
      processor: the processor/tokenizer object or folder; default: loaded from `model`'s folder.
      kind: "auto" (from the config: image-text-to-text or causal LM), "vlm" or "text".
      dtype: "float32" (default for a folder), "bfloat16", "float16"; a built model is left as is
        unless given.
      logit_dtype: "float64" (default) or "float32": the precision of the logits processing
        (temperature, top-p, log-softmax); log-probs are returned in fp32 either way. float64
        keeps sampled and re-scored log-probs within one fp32 rounding step; float32 halves
        the memory of the [n, T, vocab] step for large vocabularies.
      device: where to put the model (default: leave it where it is; `to(device)` moves it later).
      attn_implementation: passed to from_pretrained ("sdpa", "eager", ...).
      max_new_tokens (T), temperature, top_p, stop_on_eos: sampling. eval_max_new_tokens,
        eval_temperature, eval_top_p: used when `sample(..., evaluate=True)` (default: same).
      eos_token_id: int or list (default: the generation config's, else the tokenizer's).
      system_prompt: an optional system message for the chat template.
      mask_truncated_completions: rows that never emit EOS get an all-False mask.
      freeze_vision (True): the vision tower is not trained and gets no LoRA layers.
      finetune: "lora" (default) or "full". lora_rank, lora_alpha, lora_dropout,
        lora_target_modules (last name components of nn.Linear layers; vision tower excluded
        while freeze_vision). keep_reference (full fine-tuning): keep a frozen copy for reference().
      image_max_pixels: cap on each image's pixels before the processor (None: processor decides).
      video_fps, video_nframes, video_max_pixels, video_min_frames, video_max_frames: video sampling.

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

    scores_all_steps_at_once = True

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        kind: str = "auto",
        dtype: Any = None,
        logit_dtype: str = "float64",
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_on_eos: bool = True,
        eval_max_new_tokens: int | None = None,
        eval_temperature: float | None = None,
        eval_top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        system_prompt: str | None = None,
        mask_truncated_completions: bool = False,
        freeze_vision: bool = True,
        finetune: str = "lora",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: Sequence[str] = LORA_TARGETS,
        keep_reference: bool = True,
        image_max_pixels: int | None = None,
        video_fps: float | None = 2.0,
        video_nframes: int | None = None,
        video_max_pixels: int | None = 128 * 28 * 28,
        video_min_frames: int = 2,
        video_max_frames: int = 16,
    ) -> None:
        for name, value in (("temperature", temperature), ("eval_temperature", eval_temperature)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (greedy decoding has no log-probs to train on), got {value}")
        for name, value in (("top_p", top_p), ("eval_top_p", eval_top_p)):
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if logit_dtype not in ("float64", "float32"):
            raise ValueError(f"logit_dtype must be 'float64' or 'float32', got {logit_dtype!r}")
        self.logit_dtype = torch.float64 if logit_dtype == "float64" else torch.float32
        if finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

        model, processor = self._load(model, processor, kind, _as_dtype(dtype), attn_implementation)
        if device is not None:
            model.to(device)
        model.eval()  # no dropout: sampling and re-scoring must see the same function
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.is_vlm = hasattr(processor, "image_processor") or hasattr(processor, "video_processor")

        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.stop_on_eos = stop_on_eos
        self.eval_max_new_tokens = eval_max_new_tokens
        self.eval_temperature, self.eval_top_p = eval_temperature, eval_top_p
        self.system_prompt = system_prompt
        self.mask_truncated_completions = mask_truncated_completions
        self.image_max_pixels = image_max_pixels
        self.video_options = dict(fps=video_fps, nframes=video_nframes, max_pixels=video_max_pixels,
                                  min_frames=video_min_frames, max_frames=video_max_frames)

        config = model.config
        self.eos_token_ids = self._eos_ids(model, eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]
        self.image_token_id = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        self.video_token_id = getattr(config, "video_token_id", getattr(config, "video_token_index", None))
        vision_config = getattr(config, "vision_config", None)
        self.merge_size = getattr(vision_config, "spatial_merge_size", None)
        # Placeholders are never sampled: at re-scoring they would be read as visual slots.
        self._banned = [t for t in (self.image_token_id, self.video_token_id) if t is not None]

        self._rope_index = None  # M-RoPE (Qwen2-VL family): 3D positions from the model itself
        for owner in (model, getattr(model, "model", None)):
            if self.is_vlm and owner is not None and callable(getattr(owner, "get_rope_index", None)):
                self._rope_index = owner.get_rope_index
                self._rope_index_args = set(inspect.signature(owner.get_rope_index).parameters)
                break
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

        self.vision_prefixes = self._vision_prefixes(model)
        self.model = model
        self._peft = None
        self._reference_model = None
        self._setup_training(finetune, freeze_vision, lora_rank, lora_alpha, lora_dropout,
                             lora_target_modules, keep_reference)
        self._active = self.model
        # Qwen2-VL / Qwen2.5-VL with a frozen vision tower: encode each prompt's images once at
        # sampling and reuse the features (and M-RoPE positions) when re-scoring; see _reuse_prompts.
        self._reuse_family = (
            self._rope_index is not None
            and getattr(model.config, "model_type", None) in REUSE_VISION_FAMILIES
            and "mm_encoder_outputs" in inspect.signature(self.model.forward).parameters
        )
        self._vision_parameters = [p for name, p in self.model.named_parameters() if self._in_vision(name)]
        # keys of shared["prompt_inputs"]: unique per adapter instance, so rollouts concatenate safely
        self._key_prefix = uuid.uuid4().hex[:8]
        self._prompt_counter = itertools.count()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _load(model, processor, kind, dtype, attn_implementation):
        """(model, processor) from folders or objects; a folder's kind comes from its config."""
        if kind not in ("auto", "vlm", "text"):
            raise ValueError(f"kind must be 'auto', 'vlm' or 'text', got {kind!r}")
        if isinstance(model, (str, Path)):
            from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
            from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

            source = str(model)
            try:
                config = AutoConfig.from_pretrained(source)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"cannot load a model config from {source!r}: {err}. Give a local folder holding config.json "
                    f"(or a hub id when online)"
                ) from err
            if kind == "auto":
                kind = "vlm" if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES else "text"
            cls = AutoModelForImageTextToText if kind == "vlm" else AutoModelForCausalLM
            kwargs = {"dtype": dtype or torch.float32}
            if attn_implementation is not None:
                kwargs["attn_implementation"] = attn_implementation
            model = cls.from_pretrained(source, **kwargs)
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

    @staticmethod
    def _eos_ids(model, eos_token_id) -> list[int]:
        candidates = [eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                      getattr(model.config, "eos_token_id", None)]
        for value in candidates:
            if value is not None:
                return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        raise ValueError("no EOS token id found in the generation config or model config: pass eos_token_id=")

    @staticmethod
    def _prepared_mask_kind(model) -> str | None:
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

    @property
    def _reuse_prompts(self) -> bool:
        """Whether sampling keeps, and re-scoring uses, each prompt's vision features and positions.

        Checked at every call: the features carry no gradient, so a vision tower with trainable
        weights must be run again when re-scoring.
        """
        return self._reuse_family and not any(p.requires_grad for p in self._vision_parameters)

    def _decode_masks(self, prompt_mask: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
        """Attention masks of all decode steps in one buffer; step t uses `buffer[..., : L + t + 1]`.

        prompt_mask [R, L] (1 = real token, 0 = left padding); every completion position is
        attended (a row past its EOS keeps decoding pad tokens whose outputs are dropped). Returns
        [R, L + steps] (2D), or [R, 1, 1, L + steps] bool / additive float (see _prepared_mask_kind).
        """
        R = prompt_mask.shape[0]
        kind = self._prepared_mask_kind(self._active)
        keep = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(R, steps, dtype=torch.bool)], 1)  # [R, L + steps]
        if kind == "bool":
            return keep[:, None, None, :]
        if kind == "additive":
            blocked = torch.zeros(keep.shape, dtype=dtype, device=keep.device)  # [R, L + steps]
            return blocked.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]
        return keep.to(prompt_mask.dtype)

    def _embedding_dtype(self) -> torch.dtype:
        return self._active.get_input_embeddings().weight.dtype

    @staticmethod
    def _vision_prefixes(model) -> list[str]:
        prefixes: list[str] = []
        for name, _ in model.named_modules():
            if name.split(".")[-1] in VISION_TOWER_NAMES and not any(name.startswith(p + ".") for p in prefixes):
                prefixes.append(name)
        return prefixes

    def _in_vision(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.vision_prefixes)

    def _setup_training(self, finetune, freeze_vision, rank, alpha, dropout, targets, keep_reference) -> None:
        try:
            from peft import PeftModel
        except ImportError:
            PeftModel = None
        if PeftModel is not None and isinstance(self.model, PeftModel):  # an adapter the user already attached
            self._peft, self.model = self.model, self.model.get_base_model()
            return
        if finetune == "full":
            for name, param in self.model.named_parameters():
                param.requires_grad_(not (freeze_vision and self._in_vision(name)))
            if keep_reference:  # the frozen reference policy (costs one more copy of the weights)
                self._reference_model = copy.deepcopy(self.model).requires_grad_(False).eval()
            return
        from peft import LoraConfig, get_peft_model

        wanted = set(targets)
        names = sorted(
            name for name, module in self.model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in wanted
            and not (freeze_vision and self._in_vision(name))
        )
        if not names:
            raise ValueError(
                f"LoRA found no nn.Linear layers named {sorted(wanted)} outside the vision tower: set "
                f"lora_target_modules to layer names of this model (e.g. q_proj, v_proj)"
            )
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            self._peft = get_peft_model(self.model, config)  # injects LoRA layers into self.model in place
        self.model.eval()

    # ------------------------------------------------------------------ protocol: weights
    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The weights the optimizer updates: LoRA matrices, or all non-frozen weights."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Inside, log_prob scores with the reference policy: LoRA disabled, or the frozen copy."""
        if self._peft is not None:
            with self._peft.disable_adapter():
                yield
            return
        if self._reference_model is None:
            raise RuntimeError("no reference policy: full fine-tuning was built with keep_reference=False")
        previous, self._active = self._active, self._reference_model
        try:
            yield
        finally:
            self._active = previous

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "VLMAdapter":
        self.model.to(device)
        if self._reference_model is not None:
            self._reference_model.to(device)
        return self

    def export(self, sample: str, path: str | Path) -> Path:
        """Write one decoded completion to a UTF-8 text file; returns the path written."""
        path = Path(path).with_suffix(".txt")
        path.write_text(sample, encoding="utf-8")
        return path

    # ------------------------------------------------------------------ prompts
    def _parse(self, item: Any, index: int) -> tuple[str, list, list[Video]]:
        """(text, images, videos) of one prompt item."""
        if isinstance(item, str):
            return item, [], []
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(
                f"prompt {index}: expected a string or a dict with a 'prompt' string "
                f"(plus 'image'/'images'/'video'/'videos'), got {type(item).__name__}"
            )

        def many(one: str, several: str) -> list:
            values = list(item.get(several) or [])
            if item.get(one) is not None:
                values.insert(0, item[one])
            return values

        images = [load_image(x, self.image_max_pixels) for x in many("image", "images")]
        videos = [load_video(v, **self.video_options) for v in many("video", "videos")]
        if (images or videos) and not self.is_vlm:
            raise ValueError(
                f"prompt {index} has images or videos but the model is text-only "
                f"({type(self.model).__name__}): use a vision-language model or drop those fields"
            )
        return item["prompt"], images, videos

    def _encode(self, item: Any, index: int) -> dict[str, torch.Tensor]:
        """Processor outputs (batch 1) of one prompt: chat template, tokens, pixel values, grids."""
        text, images, videos = self._parse(item, index)
        if self.is_vlm:
            content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
            messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
            chat = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            kwargs: dict[str, Any] = {}
            if images:
                kwargs["images"] = images
            if videos:
                kwargs["videos"] = [v.frames for v in videos]
                kwargs["video_metadata"] = [
                    {"total_num_frames": len(v), "fps": v.fps, "frames_indices": list(range(len(v)))} for v in videos
                ]
            try:
                inputs = self.processor(text=[chat], return_tensors="pt", **kwargs)
            except ValueError as err:  # e.g. placeholders without images: say which prompt
                raise ValueError(f"prompt {index}: {err}") from err
        else:
            if getattr(self.tokenizer, "chat_template", None):
                messages = [{"role": "user", "content": text}]
                if self.system_prompt:
                    messages.insert(0, {"role": "system", "content": self.system_prompt})
                chat = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                inputs = self.tokenizer([chat], return_tensors="pt", add_special_tokens=False)
            else:
                inputs = self.tokenizer([text], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        self._check_vision_tokens(inputs["input_ids"][0], inputs, f"prompt {index}")
        return inputs

    def _check_vision_tokens(self, input_ids: torch.Tensor, vision: dict[str, torch.Tensor], label: str) -> None:
        """Placeholder tokens in `input_ids` [L] must match the features the vision inputs give."""
        checks = (("image", self.image_token_id, "image_grid_thw", "pixel_values"),
                  ("video", self.video_token_id, "video_grid_thw", "pixel_values_videos"))
        for what, token_id, grid_key, pixel_key in checks:
            if token_id is None:
                continue
            n_tokens = int((input_ids == token_id).sum())
            grid = vision.get(grid_key)
            if grid is None or self.merge_size is None:
                if n_tokens and pixel_key not in vision:
                    raise ValueError(f"{label}: {n_tokens} {what} tokens in the text but no {what} inputs (pixels)")
                continue
            n_patches = int(grid.prod(-1).sum())
            n_features = n_patches // self.merge_size**2
            if n_tokens != n_features:
                raise ValueError(
                    f"{label}: {what} features and {what} tokens do not match: {n_tokens} {what} tokens in the "
                    f"text, {n_features} features from {grid_key} {grid.tolist()} (merge size {self.merge_size}). "
                    f"Keep every {what} placeholder the processor inserted (no prompt truncation; one chat-template "
                    f"placeholder per {what})"
                )
            pixels = vision.get(pixel_key)
            if pixels is not None and pixels.shape[0] != n_patches:
                raise ValueError(
                    f"{label}: {pixel_key} has {pixels.shape[0]} patch rows but {grid_key} {grid.tolist()} "
                    f"needs {n_patches}: pixel values and grids must come from the same processor call"
                )

    def _collate(self, prompts: list[dict[str, torch.Tensor]], completion_ids: torch.Tensor | None = None,
                 completion_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One batch: prompts left-padded to a common length, then the completions; vision inputs in row order.

        completion_ids, completion_valid [R, C] (C may be 0). Per-token keys are padded with
        zeros; every other tensor (pixel values, grids, ...) is concatenated along dim 0.
        """
        device = self.device
        width = max(p["input_ids"].shape[1] for p in prompts)
        n_completion = 0 if completion_ids is None else completion_ids.shape[1]
        per_token = [k for k in PER_TOKEN_KEYS if k in prompts[0]]
        columns: dict[str, list[torch.Tensor]] = {k: [] for k in per_token}
        others: dict[str, list[torch.Tensor]] = {}
        for r, prompt in enumerate(prompts):
            pad = width - prompt["input_ids"].shape[1]
            for key in per_token:
                fill = self.pad_token_id if key == "input_ids" else 0
                left = torch.full((pad,), fill, dtype=prompt[key].dtype, device=device)
                if key == "input_ids" and n_completion:
                    right = completion_ids[r].to(device=device, dtype=prompt[key].dtype)
                elif key == "attention_mask" and n_completion:
                    right = completion_valid[r].to(device=device, dtype=prompt[key].dtype)
                else:
                    right = torch.zeros(n_completion, dtype=prompt[key].dtype, device=device)
                columns[key].append(torch.cat([left, prompt[key][0].to(device), right]))
            for key, value in prompt.items():
                if key not in per_token:
                    others.setdefault(key, []).append(value.to(device))
        batch = {k: torch.stack(v) for k, v in columns.items()}  # each [R, width + C]
        batch.update({k: torch.cat(v) for k, v in others.items()})  # vision inputs, rows in order
        return batch

    def _positions(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids for `batch` ([3, R, L] for M-RoPE, else [R, L]) and per row the offset
        delta [R] such that the text token after the row's n valid tokens sits at n + delta."""
        mask = batch["attention_mask"]  # [R, L]
        if self._rope_index is not None:
            kwargs = {k: v for k, v in batch.items() if k in self._rope_index_args and k != "input_ids"}
            positions, delta = self._rope_index(batch["input_ids"], **kwargs)  # [3, R, L], [R, 1]
            return positions, delta.view(-1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [R, L]
        return positions, torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)

    def _next_positions(self, position: torch.Tensor) -> torch.Tensor:
        """position_ids ([R, k], or [3, R, k] for M-RoPE) of new text tokens from their positions [R] or [R, k]."""
        position = position.view(position.shape[0], -1)  # [R, k]
        return position.unsqueeze(0).expand(3, -1, -1) if self._rope_index is not None else position

    def _vision_features(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Vision-encoder outputs of every image / video in `batch`, one tensor per item in row order."""
        features = {}
        for kind, pixel_key, grid_key in VISION_INPUTS:
            if pixel_key in batch:
                encode = getattr(self._active, f"get_{kind}_features")
                with torch.no_grad():  # the tower is frozen: its outputs never carry gradients
                    out = encode(batch[pixel_key], batch[grid_key], return_dict=True)
                features[kind] = tuple(out.pooler_output)
        return features

    @staticmethod
    def _with_features(batch: dict[str, torch.Tensor], features: dict[str, tuple[torch.Tensor, ...]]) -> dict:
        """`batch` with its pixel inputs replaced by precomputed encoder outputs (`mm_encoder_outputs`)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs = {k: v for k, v in batch.items() if k not in PIXEL_KEYS}
        inputs["mm_encoder_outputs"] = {
            kind: BaseModelOutputWithPooling(pooler_output=items) for kind, items in features.items() if items
        }
        return inputs

    def _reuse_entries(self, encoded, batch, positions, delta, features) -> list[PromptReuse]:
        """One PromptReuse per prompt of a sampling batch (left-padded to L): positions and features."""
        L = batch["attention_mask"].shape[1]
        offsets = dict.fromkeys(features, 0)
        entries = []
        for b, prompt in enumerate(encoded):
            items = {}
            for kind, _, grid_key in VISION_INPUTS:
                if kind in features:
                    count = prompt[grid_key].shape[0] if grid_key in prompt else 0
                    items[kind] = features[kind][offsets[kind] : offsets[kind] + count]
                    offsets[kind] += count
            length = prompt["input_ids"].shape[1]
            entries.append(PromptReuse(PromptReuse.sources_of(prompt), positions[:, b, L - length :].clone(),
                                       int(delta[b]), items))
        return entries

    def _reusable(self, rollout: Rollout, keys: list[str], prompts: list[dict]) -> list[PromptReuse] | None:
        """PromptReuse entries of `keys`, or None when any is missing or its prompt tensors changed."""
        table = rollout.shared.get("prompt_reuse") if self._reuse_prompts else None
        if not table:
            return None
        entries = [table.get(key) for key in keys]
        if any(e is None or not e.matches(p) for e, p in zip(entries, prompts)):
            return None
        return entries

    def _reused_positions(self, entries: list[PromptReuse], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE position_ids [3, U, width] of left-padded prompts and their deltas [U], from sampling.

        The values get_rope_index gives the prompts' tokens; padding gets 1, as there.
        """
        device = self.device
        positions = torch.ones(3, len(entries), width, dtype=torch.long, device=device)  # [3, U, width]
        for r, entry in enumerate(entries):
            positions[:, r, width - entry.positions.shape[-1] :] = entry.positions.to(device)
        delta = torch.tensor([entry.delta for entry in entries], dtype=torch.long, device=device)  # [U]
        return positions, delta

    def _forward(self, keep: int, **inputs) -> Any:
        if self._keeps_logits:
            inputs["logits_to_keep"] = keep
        return self._active(**inputs)

    # ------------------------------------------------------------------ protocol: sample
    @torch.no_grad()
    def sample(
        self, prompts: Sequence[Any], group_size: int, generator: torch.Generator, *, evaluate: bool = False
    ) -> Rollout:
        """G completions per prompt, rows prompt-major; each prompt is processed and encoded once."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        G, B = group_size, len(prompts)
        T = self.max_new_tokens
        temperature, top_p = self.temperature, self.top_p
        if evaluate:
            T = self.eval_max_new_tokens or T
            temperature = self.eval_temperature if self.eval_temperature is not None else temperature
            top_p = self.eval_top_p if self.eval_top_p is not None else top_p
        device = self.device
        R = B * G

        encoded = [self._encode(item, i) for i, item in enumerate(prompts)]  # processor once per prompt
        batch = self._collate(encoded)  # [B, L] left-padded
        positions, delta = self._positions(batch)  # [(3,) B, L], [B]
        features = self._vision_features(batch) if self._reuse_prompts else None  # vision encoded once
        temp = torch.full((R,), temperature, device=device)  # [R]
        nucleus = torch.full((R,), top_p, device=device)  # [R]
        # Decoding never needs autograd: inference mode skips its bookkeeping (~10% of a small model's
        # decode time on CPU). Its outputs are inference tensors, cloned into ordinary ones here.
        with torch.inference_mode():
            decoded = self._decode(batch, positions, delta, features, G, T, temp, nucleus, generator)
        tokens, log_probs, lengths, ended = (x.clone() for x in decoded)  # [R, T], [R, T], [R], [R]

        steps = torch.arange(T, device=device)
        mask = steps[None, :] < lengths[:, None]  # [R, T] completion tokens up to and including EOS
        if self.mask_truncated_completions:
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
            shared["prompt_reuse"] = dict(zip(keys, self._reuse_entries(encoded, batch, positions, delta, features)))
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
        repeated for the G samples, then one forward per token. Returns tokens [R, T] (pad after
        the end), log_probs [R, T] fp32 (0 after the end), lengths [R] (incl. EOS), ended [R].
        """
        device = self.device
        R = temp.shape[0]
        prompt_lengths = batch["attention_mask"].sum(-1)  # [B]
        inputs = batch if features is None else self._with_features(batch, features)
        out = self._forward(1, **inputs, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(G)  # the prompt's cache, once per sample of its group
        logits = out.logits[:, -1].repeat_interleave(G, 0)  # [R, V]
        L = batch["attention_mask"].shape[1]
        masks = self._decode_masks(batch["attention_mask"].repeat_interleave(G, 0), T, self._embedding_dtype())
        next_position = (prompt_lengths + delta).repeat_interleave(G)  # [R] of the first completion token
        decode_positions = self._next_positions(next_position[:, None] + torch.arange(T, device=device))  # [(3,) R, T]

        banned = torch.tensor(self._banned, dtype=torch.long, device=device)
        # decided once per rollout, not at every token: rows all at temperature 1 / none top-p filtered
        temp = temp if bool((temp != 1).any()) else None
        nucleus = nucleus if bool((nucleus < 1).any()) else None
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)
        tokens = torch.full((R, T), self.pad_token_id, dtype=torch.long, device=device)  # [R, T]
        log_probs = torch.zeros(R, T, device=device)  # [R, T]
        ended = torch.zeros(R, dtype=torch.bool, device=device)  # [R] emitted EOS
        never = torch.zeros(R, dtype=torch.bool, device=device)  # [R] without stop_on_eos no row stops
        steps = T
        for t in range(T):
            logp = sampling_logits(logits, temp, nucleus, banned, self.logit_dtype).log_softmax(-1)  # [R, V]
            cdf = logp.exp().cumsum(-1)  # [R, V]
            # inverse-CDF draw: one uniform per row from the caller's generator, on its own device
            u = torch.rand(R, generator=generator, device=generator.device, dtype=cdf.dtype).to(device)  # [R]
            drawn = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)  # [R, 1]
            drawn = drawn.clamp_(max=cdf.shape[-1] - 1)  # [R, 1]
            done = ended if self.stop_on_eos else never  # [R] rows already past their EOS
            token = drawn[:, 0].masked_fill(done, self.pad_token_id)  # [R]
            tokens[:, t] = token
            log_probs[:, t] = logp.gather(1, drawn)[:, 0].float().masked_fill(done, 0.0)
            ended |= torch.isin(token, eos)  # (a finished row's pad may be an EOS id: it stays ended)
            if t == T - 1 or (self.stop_on_eos and bool(ended.all())):
                steps = t + 1
                break
            out = self._forward(1, input_ids=token[:, None], attention_mask=masks[..., : L + t + 1],  # [R, .., L+t+1]
                                position_ids=decode_positions[..., t : t + 1], past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]  # [R, V]
        lengths = torch.full((R,), steps, dtype=torch.long, device=device)  # [R] tokens incl. EOS
        if self.stop_on_eos:
            is_eos = torch.isin(tokens[:, :steps], eos)  # [R, steps]; a row's first EOS is its real one
            lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, lengths)
        return tokens, log_probs, lengths, ended

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
        if self.image_token_id is not None or self.video_token_id is not None:
            for r, prompt in enumerate(prompts):
                ids = torch.cat([prompt["input_ids"][0].to(device), completion[r][valid[r]]])
                self._check_vision_tokens(ids, prompt, f"sample {r}")
        # 1. every prompt once, with gradients (Prefix Grouper): its KV cache serves all of its rows
        keys = extras["prompt_key"]
        unique_keys = list(dict.fromkeys(keys))  # U prompts, in order of first appearance
        slot = {key: i for i, key in enumerate(unique_keys)}
        row_prompt = torch.tensor([slot[key] for key in keys], dtype=torch.long, device=device)  # [n] -> [0, U)
        unique = [rollout.shared["prompt_inputs"][key] for key in unique_keys]
        reuse = self._reusable(rollout, unique_keys, unique)
        if reuse is None:
            batch = self._collate(unique)  # [U, L] left-padded
            positions, delta = self._positions(batch)  # [(3,) U, L], [U]
        else:  # positions and vision features from sampling: no rope index, no vision tower
            batch = self._collate([{k: v for k, v in p.items() if k not in PIXEL_KEYS} for p in unique])  # [U, L]
            positions, delta = self._reused_positions(reuse, batch["input_ids"].shape[1])
            kinds = {kind for entry in reuse for kind in entry.features}
            features = {k: tuple(x for e in reuse for x in e.features.get(k, ())) for k in kinds}  # rows in order
            batch = self._with_features(batch, features)
        banned = torch.tensor(self._banned, dtype=torch.long, device=device)
        temp, top_p = extras["temperature"].to(device), extras["top_p"].to(device)  # [n], [n]
        temp = temp[:, None] if bool((temp != 1).any()) else None  # [n, 1]
        top_p = top_p[:, None] if bool((top_p < 1).any()) else None  # [n, 1]

        def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:  # [n, k, V], [n, k] -> [n, k]
            scores = sampling_logits(logits, temp, top_p, banned, self.logit_dtype)  # [n, k, V]
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
                    f"{type(self._active).__name__} returned no KV cache for use_cache=True: VLMAdapter needs a "
                    f"model whose forward supports a cache (and gradient checkpointing off while scoring)"
                )
            cache.batch_select_indices(row_prompt)  # [U, ...] -> [n, ...]
            attention = torch.cat([prompt_mask[row_prompt], valid[:, : width - 1].to(prompt_mask.dtype)], 1)
            start = (prompt_mask.sum(-1) + delta)[row_prompt]  # [n] position of completion token 0
            positions = self._next_positions(start[:, None] + column[None, : width - 1])  # [(3,) n, W - 1]
            out = self._forward(width - 1, input_ids=completion[:, : width - 1], attention_mask=attention,
                                position_ids=positions, past_key_values=cache, use_cache=True)  # [n, L + W - 1] keys
            picked.append(token_log_probs(out.logits[:, -(width - 1) :], completion[:, 1:]))  # [n, W - 1]
        picked = torch.where(valid, torch.cat(picked, 1).float(), 0.0)  # [n, W]
        return picked[:, steps]  # [n, len(steps)]
