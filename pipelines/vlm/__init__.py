"""VLM / LLM adapter over transformers: Qwen2-VL and Qwen2.5-VL first-class, text-only causal LMs too.

`VLMAdapter` implements mmgrpo's Adapter protocol; `media` loads images and videos (decord);
`tiny` writes tiny random checkpoints for tests and the embedded default.
"""

from mmgrpo.pipelines.vlm.adapter import VLMAdapter, sampling_logits
from mmgrpo.pipelines.vlm.media import Video, load_image, load_video

__all__ = ["VLMAdapter", "Video", "load_image", "load_video", "sampling_logits"]
