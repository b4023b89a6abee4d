"""VLMAdapter on tiny random Qwen2-VL / Qwen2.5-VL / Qwen2 models built offline (CPU, seconds).

The checkpoints are written by mmgrpo.pipelines.vlm.tiny and reloaded through AutoProcessor +
AutoModelForImageTextToText (AutoTokenizer + AutoModelForCausalLM for the text model), the
same path a real checkpoint folder takes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from mmgrpo.pipelines.vlm import VLMAdapter  # noqa: E402
from mmgrpo.pipelines.vlm.media import load_image, load_video  # noqa: E402
from mmgrpo.pipelines.vlm.tiny import build_tiny_text_lm, build_tiny_vlm  # noqa: E402
from mmgrpo.protocols import Adapter  # noqa: E402


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "qwen2_vl", family="qwen2_vl")


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", family="qwen2_5_vl")


@pytest.fixture(scope="module")
def text_lm(tmp_path_factory):
    return build_tiny_text_lm(tmp_path_factory.mktemp("tiny") / "text")


def scene(seed: int, height: int = 60, width: int = 70) -> np.ndarray:
    """A uint8 HWC image: a coloured square on a grey background."""
    rng = np.random.RandomState(seed)
    image = np.full((height, width, 3), 128, np.uint8)
    y, x = rng.randint(0, height - 20), rng.randint(0, width - 20)
    image[y : y + 20, x : x + 20] = rng.randint(0, 256, 3)
    return image


def image_prompts() -> list:
    """Prompts of different lengths (one image, two images, text only), so batches get padded."""
    return [
        {"prompt": "What is in the image?", "image": scene(0), "answer": "a square"},
        {"prompt": "Where is the object?", "images": [scene(1), scene(2, 40, 50)]},
        "How many shapes are there?",
    ]


def ratio_error(adapter: VLMAdapter, rollout, rows=None) -> float:
    """max |exp(log_prob - recorded) - 1| over the masked tokens of `rows` (all rows if None)."""
    sub = rollout if rows is None else rollout.select(rows)
    with torch.no_grad():
        scored = adapter.log_prob(sub)
    diff = (torch.exp(scored - sub.log_probs) - 1).abs()
    return float(diff[sub.mask].max()) if sub.mask.any() else 0.0


@pytest.mark.parametrize(
    "group_size, options",
    [(1, {}), (4, {}), (4, {"temperature": 0.7, "top_p": 0.9})],
    ids=["G1", "G4", "G4-temp0.7-top_p0.9"],
)
def test_on_policy_ratio_with_images(qwen2_vl, group_size, options):
    adapter = VLMAdapter(qwen2_vl, max_new_tokens=8, **options)
    assert isinstance(adapter, Adapter) and adapter.scores_all_steps_at_once
    prompts = image_prompts()
    rollout = adapter.sample(prompts, group_size, torch.Generator().manual_seed(0))

    n = len(prompts) * group_size
    assert rollout.log_probs.shape == (n, 8) and rollout.log_probs.dtype == torch.float32
    assert rollout.mask.dtype == torch.bool and rollout.mask.any()
    assert rollout.group_id.tolist() == [b for b in range(len(prompts)) for _ in range(group_size)]
    assert rollout.prompts[0] is prompts[0] and all(isinstance(s, str) for s in rollout.samples)
    assert torch.isfinite(rollout.log_probs).all() and (rollout.log_probs[rollout.mask] < 0).all()

    assert ratio_error(adapter, rollout) < 1e-6  # one forward over the whole rollout
    for row in range(n):  # micro-batch 1: other padding, other vision batch
        assert ratio_error(adapter, rollout, [row]) < 1e-6
    steps = [1, 3, 6]
    with torch.no_grad():
        some = adapter.log_prob(rollout, steps)
    assert some.shape == (n, 3)
    assert torch.equal(some, adapter.log_prob(rollout)[:, steps].detach())

    again = adapter.sample(prompts, group_size, torch.Generator().manual_seed(0))
    # all randomness comes from the generator
    assert torch.equal(again.extras["completion_ids"], rollout.extras["completion_ids"])


def test_rescoring_uses_the_image(qwen2_vl):
    adapter = VLMAdapter(qwen2_vl, max_new_tokens=6)
    rollout = adapter.sample(image_prompts()[:1], 2, torch.Generator().manual_seed(1))
    key = rollout.extras["prompt_key"][0]
    inputs = rollout.shared["prompt_inputs"][key]
    assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod(-1).sum())
    with torch.no_grad():
        original = adapter.log_prob(rollout)
        inputs["pixel_values"] = torch.randn_like(inputs["pixel_values"])  # another image, same size
        replaced = adapter.log_prob(rollout)
    assert (original - replaced)[rollout.mask].abs().max() > 1e-4


def test_each_image_processed_and_encoded_once_per_prompt(qwen2_vl):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    class CountingProcessor:
        """Delegates to the real processor and counts the images it is asked to process."""

        def __init__(self, inner):
            self.inner, self.images = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            self.images += len(kwargs.get("images") or [])
            return self.inner(*args, **kwargs)

    processor = CountingProcessor(AutoProcessor.from_pretrained(qwen2_vl))
    model = AutoModelForImageTextToText.from_pretrained(qwen2_vl)
    adapter = VLMAdapter(model, processor, max_new_tokens=5)
    patches = []
    model.model.visual.register_forward_hook(lambda module, args, out: patches.append(args[0].shape[0]))

    prompts = image_prompts()[:2]  # three images in all
    rollout = adapter.sample(prompts, 4, torch.Generator().manual_seed(2))
    per_prompt = [int(v["image_grid_thw"].prod(-1).sum()) for v in rollout.shared["prompt_inputs"].values()]
    assert processor.images == 3
    assert patches == [sum(per_prompt)]  # one vision forward, each image once, not once per sample
    assert len(rollout.shared["prompt_inputs"]) == 2
    assert len(set(rollout.extras["prompt_key"][:4])) == 1 and len(set(rollout.extras["prompt_key"])) == 2


def test_token_count_mismatch_is_one_clear_error(qwen2_vl):
    adapter = VLMAdapter(qwen2_vl, max_new_tokens=4)
    prompts = [{"prompt": "What is in the image?", "image": scene(3)}, {"prompt": "And here?", "image": scene(4)}]
    rollout = adapter.sample(prompts, 2, torch.Generator().manual_seed(3))
    calls = []
    adapter.model.register_forward_pre_hook(lambda module, args: calls.append(1))

    key = rollout.extras["prompt_key"][2]  # prompt 1 = rows 2 and 3
    inputs = rollout.shared["prompt_inputs"][key]
    grid = inputs["image_grid_thw"].clone()  # [[1, 4, 4]]: 16 patches, 4 image tokens
    inputs["image_grid_thw"] = grid * torch.tensor([1, 2, 1])
    expected = r"^sample 2: image features and image tokens do not match: 4 image tokens .* 8 features"
    with pytest.raises(ValueError, match=expected):
        adapter.log_prob(rollout)

    inputs["image_grid_thw"] = grid
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == adapter.image_token_id).nonzero()[0])
    inputs["input_ids"] = ids.index_fill(1, torch.tensor([first]), 100)  # one placeholder lost
    with pytest.raises(ValueError, match=r"^sample 2: .* 3 image tokens in the text, 4 features"):
        adapter.log_prob(rollout)
    with pytest.raises(ValueError, match=r"^sample 0: .* 3 image tokens"):
        adapter.log_prob(rollout.select([3]))  # the index is the row in the rollout scored
    with pytest.raises(ValueError, match=r"^prompt 0: .*1 <\|image_pad\|> tokens in the text but no images"):
        adapter.sample(["a stray <|image_pad|> placeholder"], 1, torch.Generator())
    assert calls == []  # raised before any forward pass


def test_text_only_causal_lm(text_lm):
    eos = list(range(280, 320))  # EOS comes early for some rows, not for others
    adapter = VLMAdapter(text_lm, max_new_tokens=6, eos_token_id=eos)
    assert not adapter.is_vlm and type(adapter.model).__name__ == "Qwen2ForCausalLM"
    prompts = ["What colour is it?", {"prompt": "How many shapes are there?", "answer": "2"}]
    rollout = adapter.sample(prompts, 3, torch.Generator().manual_seed(4))
    assert ratio_error(adapter, rollout) < 1e-6
    assert ratio_error(adapter, rollout, [4]) < 1e-6

    lengths = rollout.extras["completion_length"]
    ids = rollout.extras["completion_ids"]
    steps = torch.arange(6)
    assert torch.equal(rollout.mask, steps[None, :] < lengths[:, None])  # up to and including EOS
    ended = [r for r in range(6) if int(ids[r, lengths[r] - 1]) in adapter.eos_token_ids]
    truncated = [r for r in range(6) if r not in ended]
    assert ended and truncated and all(lengths[r] == 6 for r in truncated)
    assert (rollout.log_probs[~rollout.mask] == 0).all()
    assert (ids[~rollout.mask] == adapter.pad_token_id).all()

    masking = VLMAdapter(text_lm, max_new_tokens=6, eos_token_id=eos, mask_truncated_completions=True)
    masked = masking.sample(prompts, 3, torch.Generator().manual_seed(4))
    assert torch.equal(masked.extras["completion_ids"], ids)  # same draws, only the mask differs
    assert all(not masked.mask[r].any() for r in truncated)
    assert all(torch.equal(masked.mask[r], rollout.mask[r]) for r in ended)

    with pytest.raises(ValueError, match="prompt 0 has images or videos but the model is text-only"):
        adapter.sample([{"prompt": "What is it?", "image": scene(0)}], 1, torch.Generator())


def test_video_prompt_from_mp4(qwen2_5_vl, tmp_path):
    imageio = pytest.importorskip("imageio")
    pytest.importorskip("decord")
    frames = np.full((8, 64, 96, 3), 128, np.uint8)
    for i in range(8):  # a red square moving right
        frames[i, 20:36, 8 * i : 8 * i + 16] = (255, 0, 0)
    path = tmp_path / "moving.mp4"
    imageio.mimwrite(path, frames, fps=4)

    video = load_video(path, fps=2.0, max_pixels=32 * 32)  # 2 s at 2 fps
    assert video.frames.shape[0] == 4 and video.fps == pytest.approx(2.0)
    assert video.frames.shape[1] * video.frames.shape[2] <= 32 * 32 and video.frames.dtype == np.uint8
    assert load_video(path, nframes=3).frames.shape == (3, 64, 96, 3)

    adapter = VLMAdapter(qwen2_5_vl, max_new_tokens=5, video_nframes=4, video_max_pixels=32 * 32)
    rollout = adapter.sample([{"prompt": "Which way does it move?", "video": str(path)}], 3,
                             torch.Generator().manual_seed(5))
    inputs = rollout.shared["prompt_inputs"][rollout.extras["prompt_key"][0]]
    assert inputs["video_grid_thw"][0, 0] == 2  # 4 frames, temporal patch 2
    assert "second_per_grid_ts" in inputs  # Qwen2.5-VL time-aligned M-RoPE
    assert ratio_error(adapter, rollout) < 1e-6
    with torch.no_grad():
        original = adapter.log_prob(rollout)
        inputs["pixel_values_videos"] = torch.randn_like(inputs["pixel_values_videos"])
        assert (original - adapter.log_prob(rollout))[rollout.mask].abs().max() > 1e-4


def test_media_errors_name_the_file(tmp_path):
    pytest.importorskip("decord")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 10)
    with pytest.raises(ValueError, match="cannot read video .*broken.mp4"):
        load_video(broken)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_image(bad_image)
    assert load_image(torch.rand(3, 40, 60)).size == (60, 40)  # CHW float tensor
    assert load_image(scene(0), max_pixels=35 * 30).size == (35, 30)  # aspect kept, capped


def test_lora_reference_leaves_weights_bit_identical(qwen2_vl):
    adapter = VLMAdapter(qwen2_vl, max_new_tokens=6, finetune="lora", lora_rank=4)
    trainable = adapter.trainable_parameters()
    assert trainable and all("lora_" in name for name in trainable)
    assert not any(".visual." in name for name, _ in adapter.model.named_modules() if "lora_A" in name)
    with torch.no_grad():  # move LoRA away from its identity initialisation
        generator = torch.Generator().manual_seed(6)
        for param in trainable.values():
            param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    before = {name: p.detach().clone() for name, p in trainable.items()}

    rollout = adapter.sample(image_prompts(), 2, torch.Generator().manual_seed(6))
    policy = adapter.log_prob(rollout)
    policy.sum().backward()  # gradients reach the LoRA weights
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    with torch.no_grad(), adapter.reference():
        reference = adapter.log_prob(rollout)
    assert all(torch.equal(before[name], p) for name, p in adapter.trainable_parameters().items())
    assert (policy - reference)[rollout.mask].abs().max() > 1e-4  # the adapter really was disabled
    with torch.no_grad():
        assert torch.equal(adapter.log_prob(rollout), policy.detach())  # and is enabled again

    base = VLMAdapter(qwen2_vl, finetune="full", keep_reference=False)  # the weights LoRA started from
    with torch.no_grad():
        assert (base.log_prob(rollout) - reference).abs().max() < 1e-5


def test_full_finetuning_reference_is_a_frozen_copy(qwen2_vl):
    adapter = VLMAdapter(qwen2_vl, max_new_tokens=5, finetune="full")  # freeze_vision=True by default
    trainable = adapter.trainable_parameters()
    assert "lm_head.weight" in trainable and not any(".visual." in name for name in trainable)
    rollout = adapter.sample(image_prompts()[:1], 2, torch.Generator().manual_seed(7))
    with torch.no_grad():
        start = adapter.log_prob(rollout)
        trainable["lm_head.weight"].add_(0.1)
        trainable["model.language_model.layers.0.mlp.up_proj.weight"].mul_(3.0)
        updated = {name: p.detach().clone() for name, p in trainable.items()}
        with adapter.reference():
            reference = adapter.log_prob(rollout)
        after = adapter.log_prob(rollout)
    assert torch.equal(reference, start)
    assert (after - start)[rollout.mask].abs().max() > 1e-4
    assert all(torch.equal(updated[name], p) for name, p in adapter.trainable_parameters().items())


def test_options_are_checked_like_config_keys(qwen2_vl):
    from mmgrpo.config import ConfigError
    from mmgrpo.pipelines.vlm import VLMOptions

    assert VLMAdapter.Options is VLMOptions
    with pytest.raises(ConfigError, match=r"unknown config key 'VLMAdapter.temprature' \(did you mean 'VLMAdapter.temperature'"):
        VLMAdapter(qwen2_vl, temprature=0.7)
    with pytest.raises(ConfigError, match="VLMAdapter.finetune = 'ful' is not one of 'lora', 'full'"):
        VLMAdapter(qwen2_vl, finetune="ful")
    with pytest.raises(ValueError, match="top_p must be in"):
        VLMAdapter(qwen2_vl, top_p=0.0)
    with pytest.raises(ValueError, match="unknown dtype 'bf32'"):
        VLMAdapter(qwen2_vl, dtype="bf32")
    # Python callers may pass tuples where YAML gives lists
    adapter = VLMAdapter(model=qwen2_vl, lora_target_modules=("q_proj",), eos_token_id=(0, 2), max_new_tokens=2)
    assert adapter.eos_token_ids == [0, 2] and adapter.options.lora_target_modules == ["q_proj"]


def test_lora_layers_are_the_named_projections_outside_the_vision_tower(qwen2_5_vl):
    """LoRA goes on every nn.Linear whose last name component is a target, vision tower excluded
    unless freeze_vision=False (Qwen2.5-VL's vision MLP has gate/up/down projections too)."""
    from mmgrpo.pipelines.vlm.adapter import LORA_TARGETS

    plain = VLMAdapter(qwen2_5_vl, finetune="full", keep_reference=False).model  # no LoRA layers
    linear = {name for name, module in plain.named_modules() if isinstance(module, torch.nn.Linear)}
    for freeze_vision in (True, False):
        adapter = VLMAdapter(qwen2_5_vl, freeze_vision=freeze_vision)
        adapted = {name[: -len(".lora_A")] for name, _ in adapter.model.named_modules() if name.endswith(".lora_A")}
        expected = {
            name for name in linear
            if name.split(".")[-1] in LORA_TARGETS and not (freeze_vision and name.startswith("model.visual."))
        }  # fmt: skip
        assert adapted == expected and len(expected) == (14 if freeze_vision else 17)
        assert any(".visual." in name for name in adapted) == (not freeze_vision)
