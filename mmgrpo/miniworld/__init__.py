"""The mini-world: procedural generators of the embedded defaults' data, with exact ground truth.

One module per kind of data: `scenes` (coloured shapes in images and clips, their captions,
grounding and motion questions, and the colour-segmentation reader that scores them) and `speech`
(noisy/clean speech pairs: the embedded espeak-ng corpus mixed with generated noises at set SNRs;
`mw.speech.speech_prompts(...)`). The scene names are re-exported here, so
`from mmgrpo import miniworld as mw; mw.make_scene(0)` reads as before. Both modules need only
numpy to import (speech reads its FLAC corpus with soundfile when first asked for it).
"""

from mmgrpo.miniworld import speech
from mmgrpo.miniworld.scenes import (
    BACKGROUND,
    COLORS,
    FRAMES,
    GROUNDING_LAYOUTS,
    IMAGE_LAYOUTS,
    MOTIONS,
    NUMBERS,
    PALETTE,
    RELATIONS,
    SHAPES,
    SPLIT_OFFSETS,
    VLM_IMAGE_SIZE,
    VLM_TASKS,
    analyse,
    analyse_clip,
    boxes,
    caption,
    classify_shape,
    colour_map,
    make_scene,
    motion_direction,
    parse_caption,
    prompt_item,
    prompt_set,
    render,
    render_clip,
    to_uint8_image,
    train_and_heldout,
    vlm_item,
    vlm_prompts,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "FRAMES",
    "GROUNDING_LAYOUTS",
    "IMAGE_LAYOUTS",
    "MOTIONS",
    "NUMBERS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "SPLIT_OFFSETS",
    "VLM_IMAGE_SIZE",
    "VLM_TASKS",
    "analyse",
    "analyse_clip",
    "boxes",
    "caption",
    "classify_shape",
    "colour_map",
    "make_scene",
    "motion_direction",
    "parse_caption",
    "prompt_item",
    "prompt_set",
    "render",
    "render_clip",
    "speech",
    "to_uint8_image",
    "train_and_heldout",
    "vlm_item",
    "vlm_prompts",
]
