"""IoU grounding reward: box parsing, coordinate conventions, scores, matching, fuzzing."""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou

import mmgrpo.rewards.iou as iou_module
from mmgrpo.rewards.iou import IoUReward, parse_boxes, qwen_resized_size


# Most tests here give boxes in original pixels on purpose, without an image size.
pytestmark = pytest.mark.filterwarnings("ignore:IoUReward. row .* has no original image size:UserWarning")


def score(reward, text, prompt, **meta):
    out = reward([text], [prompt], **meta)
    assert set(out) == {"score", "parsed"}
    return out["score"][0], out["parsed"][0]


# ---- box maths with hand-computed values ---------------------------------------------------


def test_iou_of_known_boxes():
    reward = IoUReward()  # absolute, no image size given: coordinates taken as original pixels
    gt = {"box": [0, 0, 10, 10]}
    # [5,5,15,15]: intersection 5*5 = 25, union 100 + 100 - 25 = 175
    assert score(reward, "<answer>[5, 5, 15, 15]</answer>", gt)[0] == pytest.approx(1 / 7)
    assert score(reward, "<answer>[0, 0, 10, 10]</answer>", gt)[0] == pytest.approx(1.0)
    assert score(reward, "<answer>[20, 20, 30, 30]</answer>", gt)[0] == 0.0
    # [0,0,10,5] inside the gt: 50 / 100
    assert score(reward, "<answer>[0, 0, 10, 5]</answer>", gt)[0] == pytest.approx(0.5)


def test_threshold_is_strict():
    gt = {"box": [0, 0, 10, 10]}
    assert score(IoUReward(mode="threshold"), "[0, 0, 10, 5]", gt)[0] == 0.0  # IoU 0.5, not > 0.5
    assert score(IoUReward(mode="threshold", threshold=0.4), "[0, 0, 10, 5]", gt)[0] == 1.0
    assert score(IoUReward(mode="threshold"), "[0, 0, 10, 6]", gt)[0] == 1.0  # IoU 0.6
    assert score(IoUReward(mode="threshold"), "[5, 5, 15, 15]", gt)[0] == 0.0  # IoU 1/7


def test_giou_mapped_to_unit_interval():
    reward = IoUReward(mode="giou")
    gt = {"box": [0, 0, 10, 10]}
    # disjoint: IoU 0, enclosing [0,0,30,10] = 300, union 200 -> giou = -100/300 -> (1 - 1/3)/2
    assert score(reward, "[20, 0, 30, 10]", gt)[0] == pytest.approx(1 / 3)
    # overlapping: IoU 1/7, enclosing [0,0,15,15] = 225 -> giou = 1/7 - 50/225 = -5/63 -> 29/63
    assert score(reward, "[5, 5, 15, 15]", gt)[0] == pytest.approx(29 / 63)
    # touching same-size boxes: giou 0 -> 0.5; identical -> 1
    assert score(reward, "[10, 0, 20, 10]", gt)[0] == pytest.approx(0.5)
    assert score(reward, "[0, 0, 10, 10]", gt)[0] == pytest.approx(1.0)
    # a zero-area prediction gets no credit even under GIoU
    assert score(reward, "[3, 3, 3, 3]", gt)[0] == 0.0


# ---- coordinate conventions -----------------------------------------------------------------


def test_normalized_and_relative1000():
    prompt = {"image_size": (200, 100), "box": [50, 50, 150, 100]}  # (width, height)
    assert score(IoUReward(coords="normalized"), "[0.25, 0.5, 0.75, 1.0]", prompt)[0] == pytest.approx(1.0)
    assert score(IoUReward(coords="relative1000"), "[250, 500, 750, 1000]", prompt)[0] == pytest.approx(1.0)
    # half of the gt width: [50,50,100,100] vs [50,50,150,100] -> 0.5
    assert score(IoUReward(coords="relative1000"), "[250, 500, 500, 1000]", prompt)[0] == pytest.approx(0.5)
    # the same numbers read as absolute pixels overlap nothing of the gt
    assert score(IoUReward(coords="absolute", max_pixels=None), "[250, 500, 750, 1000]", prompt)[0] == 0.0


def test_relative_convention_without_image_size_cannot_score():
    value, parsed = score(IoUReward(coords="relative1000"), "[250, 500, 750, 1000]", {"box": [0, 0, 1, 1]})
    assert value is None and parsed == 1


def test_qwen_resized_size_hand_values():
    # 1000x500: sides rounded to multiples of 28 -> 36*28 = 1008, 18*28 = 504; area within bounds
    assert qwen_resized_size((1000, 500)) == (1008, 504)
    # too many pixels: beta = sqrt(2e6 / 200704); floor(1000/beta/28) = 11, floor(2000/beta/28) = 22
    assert qwen_resized_size((2000, 1000), max_pixels=28 * 28 * 256) == (616, 308)
    # too few pixels: beta = sqrt(3136 / 200); ceil(10*beta/28) = 2, ceil(20*beta/28) = 3
    assert qwen_resized_size((20, 10)) == (84, 56)


def test_absolute_qwen_rescale_inferred_from_image_size():
    prompt = {"image_size": (1000, 500), "box": [100, 50, 500, 250]}
    text = "<answer>[100.8, 50.4, 504, 252]</answer>"  # the gt in the 1008x504 resized image
    assert score(IoUReward(), text, prompt)[0] == pytest.approx(1.0)
    # without the rescale the same box would be off: [100.8,50.4,504,252] vs gt, IoU < 1
    assert score(IoUReward(max_pixels=None), text, prompt)[0] < 0.99


def test_absolute_rescale_from_resized_size_and_grid():
    prompt = {"image_size": (200, 100), "resized_size": (400, 200), "box": [50, 50, 150, 100]}
    assert score(IoUReward(), "[100, 100, 300, 200]", prompt)[0] == pytest.approx(1.0)
    # image_grid_thw (t, h, w) = (1, 36, 72): resized 72*14 x 36*14 = 1008 x 504
    grid_prompt = {"image_size": (1000, 500), "image_grid_thw": torch.tensor([1, 36, 72]), "box": [100, 50, 500, 250]}
    assert score(IoUReward(), "[100.8, 50.4, 504, 252]", grid_prompt)[0] == pytest.approx(1.0)
    # a grid that disagrees with the inferred size wins over inference: resized 2016 x 1008
    grid2 = {"image_size": (1000, 500), "image_grid_thw": [1, 72, 144], "box": [100, 50, 500, 250]}
    assert score(IoUReward(), "[201.6, 100.8, 1008, 504]", grid2)[0] == pytest.approx(1.0)
    # a batched grid passed as a meta kwarg: [N, 1, 3] tensor, one [1, 3] grid per row
    out = IoUReward()(
        ["[100.8, 50.4, 504, 252]", "[201.6, 100.8, 1008, 504]"],
        ["q1", "q2"],
        boxes=[[100, 50, 500, 250]] * 2,
        image_size=[(1000, 500)] * 2,
        image_grid_thw=torch.tensor([[[1, 36, 72]], [[1, 72, 144]]]),
    )
    assert out["score"] == pytest.approx([1.0, 1.0])


def test_image_size_from_pil_image_and_width_height():
    from PIL import Image

    pil = {"image": Image.new("RGB", (200, 100)), "box": [50, 50, 150, 100]}
    assert score(IoUReward(coords="normalized"), "[0.25, 0.5, 0.75, 1.0]", pil)[0] == pytest.approx(1.0)
    wh = {"width": 200, "height": 100, "box": [50, 50, 150, 100]}
    assert score(IoUReward(coords="normalized"), "[0.25, 0.5, 0.75, 1.0]", wh)[0] == pytest.approx(1.0)


def _image_sources(tmp_path):
    """A 1000x500 (width x height) image in every form a prompt may carry it."""
    from PIL import Image

    hwc = np.zeros((500, 1000, 3), np.uint8)
    path = tmp_path / "scene.png"
    Image.fromarray(hwc).save(path)
    return {
        "path": str(path),
        "pathlib": path,
        "pil": Image.fromarray(hwc),
        "array_hwc": hwc,
        "array_hw": hwc[:, :, 0],
        "tensor_chw": torch.zeros(3, 500, 1000),
        "tensor_hwc": torch.zeros(500, 1000, 3, dtype=torch.uint8),
    }


@pytest.mark.parametrize(
    "form", ["path", "pathlib", "pil", "array_hwc", "array_hw", "tensor_chw", "tensor_hwc", "images_list"]
)
def test_absolute_rescale_takes_the_size_from_the_prompt_image(tmp_path, form):
    """No image_size field: the original size comes from the prompt's image, whatever its form, so a
    box that is exactly right in the processor's 1008x504 resized pixels scores 1."""
    sources = _image_sources(tmp_path)
    text = "<answer>[100.8, 50.4, 504, 252]</answer>"  # the gt in the 1008x504 resized image
    if form == "images_list":
        prompt = {"prompt": "where?", "images": [sources["array_hwc"], sources["pil"]], "box": [100, 50, 500, 250]}
    else:
        prompt = {"prompt": "where?", "image": sources[form], "box": [100, 50, 500, 250]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the size is known: no missing-size warning
        assert score(IoUReward(), text, prompt)[0] == pytest.approx(1.0)
    # the image as a meta kwarg (one per row) works the same way
    out = IoUReward()([text], ["where?"], image=[sources[form if form != "images_list" else "pil"]],
                      boxes=[[100, 50, 500, 250]])  # fmt: skip
    assert out["score"] == pytest.approx([1.0])


def test_missing_image_size_warns_once_per_reward_naming_the_field():
    prompt = {"prompt": "where?", "box": [100, 50, 500, 250]}
    text = "<answer>[100.8, 50.4, 504, 252]</answer>"
    reward = IoUReward()
    with pytest.warns(UserWarning, match=r"no original image size .*add \"image_size\": \[width, height\]") as caught:
        value = score(reward, text, prompt)[0]
        score(reward, text, prompt)
        reward([text, text], [prompt, prompt])
    assert len([w for w in caught if "image size" in str(w.message)]) == 1
    assert value < 0.99  # taken as original pixels: not rescaled, as the warning says
    with pytest.warns(UserWarning, match="cannot be scored"):  # another instance warns again
        assert score(IoUReward(coords="relative1000"), "[100, 100, 500, 500]", prompt)[0] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score(IoUReward(), text, {**prompt, "image_size": (1000, 500)})
        score(IoUReward(), text, {**prompt, "width": 1000, "height": 500})


# ---- several boxes ----------------------------------------------------------------------------


def greedy(scores: torch.Tensor) -> float:
    scores = scores.clone()
    total, n, m = 0.0, *scores.shape
    for _ in range(min(n, m)):
        k = int(scores.argmax())
        i, j = divmod(k, m)
        total += float(scores[i, j])
        scores[i, :] = -1
        scores[:, j] = -1
    return total / max(n, m)


def test_hungarian_beats_greedy_on_crafted_case():
    gts = [[0, 0, 10, 10], [10, 0, 20, 10]]
    preds = [[4, 0, 14, 10], [-5, 0, 5, 10]]
    # IoU(P1,G1) = 60/140 = 3/7, IoU(P1,G2) = 40/160 = 1/4, IoU(P2,G1) = 50/150 = 1/3, IoU(P2,G2) = 0
    matrix = box_iou(torch.tensor(preds, dtype=torch.float64), torch.tensor(gts, dtype=torch.float64))
    assert greedy(matrix) == pytest.approx(3 / 14)  # greedy takes 3/7 first, then 0
    text = f"<answer>{preds}</answer>"
    value, parsed = score(IoUReward(), text, {"boxes": gts})
    assert parsed == 1
    assert value == pytest.approx((1 / 4 + 1 / 3) / 2)  # 7/24
    assert value > greedy(matrix)


def test_unmatched_boxes_count_against_the_score():
    reward = IoUReward()
    one = {"boxes": [[0, 0, 10, 10]]}
    two = {"boxes": [[0, 0, 10, 10], [20, 0, 30, 10]]}
    assert score(reward, "[0, 0, 10, 10] [50, 50, 60, 60]", one)[0] == pytest.approx(0.5)  # extra prediction
    assert score(reward, "[0, 0, 10, 10] [0, 0, 10, 10]", one)[0] == pytest.approx(0.5)  # one-to-one
    assert score(reward, "[0, 0, 10, 10]", two)[0] == pytest.approx(0.5)  # missed object
    assert score(reward, "[20, 0, 30, 10], [0, 0, 10, 10]", two)[0] == pytest.approx(1.0)  # order-free
    assert score(IoUReward(max_boxes=1), "[0, 0, 10, 10], [20, 0, 30, 10]", two)[0] == pytest.approx(0.5)


def test_threshold_matching_counts_hits():
    # each prediction clears 0.5 with exactly one gt: 2 hits out of max(3, 2)
    gts = {"boxes": [[0, 0, 10, 10], [20, 0, 30, 10]]}
    text = "[0, 0, 10, 8] [20, 0, 30, 8] [100, 100, 110, 110]"
    assert score(IoUReward(mode="threshold"), text, gts)[0] == pytest.approx(2 / 3)


def test_degenerate_boxes_reordered_or_invalid():
    gt = {"box": [0, 0, 10, 10]}
    assert score(IoUReward(), "[10, 10, 0, 0]", gt)[0] == pytest.approx(1.0)
    value, parsed = score(IoUReward(reorder=False), "[10, 10, 0, 0]", gt)
    assert value == 0.0 and parsed == 1
    # the ground truth is always reordered
    assert score(IoUReward(), "[0, 0, 10, 10]", {"box": [10, 0, 0, 10]})[0] == pytest.approx(1.0)


# ---- ground truth, parse failures, batch plumbing ----------------------------------------------


def test_ground_truth_sources():
    reward = IoUReward()
    text = "<answer>[0, 0, 10, 10]</answer>"
    assert score(reward, text, {"box": [0, 0, 10, 10]})[0] == pytest.approx(1.0)
    assert score(reward, text, {"bbox": torch.tensor([[0.0, 0, 10, 10]])})[0] == pytest.approx(1.0)
    assert score(reward, text, {"solution": "<answer>[0,0,10,5]</answer>"})[0] == pytest.approx(0.5)
    assert score(reward, text, {"boxes": [{"bbox_2d": [0, 0, 10, 10], "label": "cat"}]})[0] == pytest.approx(1.0)
    # from meta kwargs, prompts being plain strings
    out = reward([text, text], ["find the cat", "find the dog"], boxes=[[0, 0, 10, 10], [0, 0, 10, 5]])
    assert out["score"] == pytest.approx([1.0, 0.5])
    # custom key
    assert score(IoUReward(gt_keys=["target"]), text, {"target": [0, 0, 5, 10]})[0] == pytest.approx(0.5)


def test_unparseable_scores_zero_and_missing_gt_scores_none():
    reward = IoUReward()
    out = reward(
        ["I cannot see it", "<answer>[1, 2, 3]</answer>", "[0, 0, 10, 10]", None],
        [{"box": [0, 0, 10, 10]}, {"box": [0, 0, 10, 10]}, {"caption": "no gt"}, {"box": [0, 0, 10, 10]}],
    )
    assert out["score"] == [0.0, 0.0, None, 0.0]
    assert out["parsed"] == [0, 0, 1, 0]


def test_chat_format_samples_and_length_check():
    reward = IoUReward()
    chat = [{"role": "assistant", "content": "<answer>[0, 0, 10, 10]</answer>"}]
    assert score(reward, chat, {"box": [0, 0, 10, 10]})[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one prompt per sample"):
        reward(["[0,0,1,1]"], [])


@pytest.mark.parametrize(
    "kwargs", [{"coords": "pixels"}, {"mode": "dice"}, {"threshold": 1.5}, {"max_boxes": 0}, {"gt_keys": "boxes"}]
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError, match="IoUReward"):
        IoUReward(**kwargs)


# ---- parsing ----------------------------------------------------------------------------------

QWEN_JSON = """<answer>```json
[
  {"bbox_2d": [12, 34, 56, 78], "label": "cat"},
  {"bbox_2d": [90, 10, 120, 40], "label": "dog"}
]
```</answer>"""


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>[1, 2, 3, 4]</answer>", [(1, 2, 3, 4)]),
        ("[1.5,2.25,3e1,-4]", [(1.5, 2.25, 30, -4)]),
        ("(10, 20, 30, 40)", [(10, 20, 30, 40)]),
        ("box: [10 20 30 40]", [(10, 20, 30, 40)]),
        ('{"bbox_2d": [1, 2, 3, 4]}', [(1, 2, 3, 4)]),
        ('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]', [(1, 2, 3, 4), (5, 6, 7, 8)]),
        (QWEN_JSON, [(12, 34, 56, 78), (90, 10, 120, 40)]),
        ('{"x1": 1, "y1": 2, "x2": 3, "y2": 4}', [(1, 2, 3, 4)]),
        ('{"xmin": 1.0, "ymin": 2, "xmax": 3, "ymax": 4}', [(1, 2, 3, 4)]),
        ("a {'left': 1, 'top': 2, 'right': 3, 'bottom': 4} b {x1=5, y1=6, x2=7, y2=8}", [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ('{"y2": 4, "x1": 1, "x2": 3, "y1": 2}', [(1, 2, 3, 4)]),  # key order does not matter
        ("[[1, 2], [3, 4]]", [(1, 2, 3, 4)]),
        ("<|box_start|>(1,2),(3,4)<|box_end|>", [(1, 2, 3, 4)]),
        ("first [1,2,3,4], then (5, 6, 7, 8)", [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ("<answer>x1=1, y1=2, x2=3, y2=4</answer>", [(1, 2, 3, 4)]),  # exactly 4 bare numbers
        ("<think>[0, 0, 1, 1]</think><answer>[2, 2, 3, 3]</answer>", [(2, 2, 3, 3)]),  # answer block wins
        ("<answer>[0,0,1,1]</answer> wait <answer>[5,5,6,6]</answer>", [(5, 5, 6, 6)]),  # last block
        ("<think>hmm</think><answer>[7, 7, 9, 9", [(7, 7, 9, 9)]),  # truncated: 4 bare numbers
        ("<think>hmm</think><answer>(7, 7, 9, 9)", [(7, 7, 9, 9)]),  # unclosed answer tag
        ("<think>[0, 0, 1, 1]</think><answer>no box</answer>", []),  # no fallback to the reasoning
        ("<think>[7, 7, 9, 9]</think><answer>[7, 7, 9", []),  # 3 numbers in the answer block
        ("[1, 2, 3]", []),
        ("[1, 2, 3, 4, 5]", []),
        ("1 2 3 4 5", []),
        ("[1e999, 2, 3, 4]", []),  # non-finite coordinate dropped
        ("[NaN, 2, 3, 4]", []),
        ("", []),
    ],
)
def test_parse_formats(text, expected):
    assert parse_boxes(text) == [tuple(float(v) for v in box) for box in expected]


def test_parse_never_raises_on_odd_objects():
    assert parse_boxes(None) == []
    assert parse_boxes(12) == []
    assert parse_boxes("[" * 5000 + "]" * 5000) == []  # deep JSON nesting


# ---- fuzzing ----------------------------------------------------------------------------------

_pieces = st.one_of(
    st.sampled_from(["[", "]", "(", ")", "{", "}", ",", " ", ";", "\n", ":", '"bbox_2d"', '"x1"', "```json", "```"]),
    st.sampled_from(["<answer>", "</answer>", "<think>", "</think>", "NaN", "Infinity", "1e999", "-", ".", "e"]),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
box_like = st.lists(_pieces, max_size=40).map("".join)


def _check_boxes(boxes):
    assert isinstance(boxes, list)
    for box in boxes:
        assert len(box) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in box)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_parse_random_text(text):
    _check_boxes(parse_boxes(text))


@settings(max_examples=150, deadline=None)
@given(box_like)
def test_fuzz_parse_box_like_text(text):
    _check_boxes(parse_boxes(text))


_coord = st.floats(-2000, 2000, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(
    text=st.one_of(box_like, st.text(max_size=100)),
    gt=st.lists(st.tuples(_coord, _coord, _coord, _coord), min_size=1, max_size=3),
    size=st.tuples(st.integers(1, 4000), st.integers(1, 4000)),
    coords=st.sampled_from(["absolute", "relative1000", "normalized"]),
    mode=st.sampled_from(["iou", "threshold", "giou"]),
    reorder=st.booleans(),
)
def test_fuzz_reward_score_in_unit_interval(text, gt, size, coords, mode, reorder):
    reward = IoUReward(coords=coords, mode=mode, reorder=reorder)
    out = reward([text], [{"boxes": [list(b) for b in gt], "image_size": size}])
    value, parsed = out["score"][0], out["parsed"][0]
    assert parsed in (0, 1)
    assert isinstance(value, float) and 0.0 <= value <= 1.0
    if not parsed:
        assert value == 0.0


def test_doctests():
    result = doctest.testmod(iou_module)
    assert result.attempted > 0 and result.failed == 0
