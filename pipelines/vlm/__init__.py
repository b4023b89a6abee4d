"""VLM / LLM adapter over transformers: Qwen2-VL and Qwen2.5-VL first-class, text-only causal LMs too.

`VLMAdapter` (adapter.py) implements mmgrpo's Adapter protocol over: `loading` (model and
processor from folders, EOS ids, mask kind, vision towers), `inputs` (prompt items to processor
outputs, placeholder checks, batching, positions), `reuse` (vision features and positions of a
prompt shared by its group), `sampling` (the logits processing and the token loop); `media`
loads images and videos (decord); `tiny` writes tiny random checkpoints for tests and the
embedded default.
"""

from mmgrpo.pipelines.vlm.adapter import VLMAdapter, VLMOptions, sampling_logits
from mmgrpo.pipelines.vlm.media import Video, load_image, load_video

__all__ = ["VLMAdapter", "VLMOptions", "Video", "load_image", "load_video", "sampling_logits"]
