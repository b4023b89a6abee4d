"""Format and accuracy rewards: edge cases with hand-checked expectations, fuzzing, doctests."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmgrpo.rewards.accuracy as accuracy_module
import mmgrpo.rewards.format as format_module
from mmgrpo.rewards.accuracy import (
    AccuracyReward,
    extract_answer,
    last_boxed,
    normalize_text,
    parse_choice,
    parse_number,
)
from mmgrpo.rewards.format import FormatReward, answer_region, completion_text

# ---- format ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<think>reasoning</think><answer>42</answer>",
        "<think>a</think>\n<answer>b</answer>",
        "  \n<think>\nline one\nline two\n</think>\n\n<answer>\n[1, 2, 3, 4]\n</answer>\n  ",
        "<think>x < y and y > z</think> <answer>y</answer>",  # stray angle brackets are text
    ],
)
def test_format_accepts(text):
    assert FormatReward()([text], [None]) == [1.0]


@pytest.mark.parametrize(
    "text",
    [
        "<answer>42</answer>",  # no reasoning
        "<think>r</think>",  # no answer
        "<answer>42</answer><think>r</think>",  # wrong order
        "Sure! <think>r</think><answer>42</answer>",  # text before
        "<think>r</think><answer>42</answer> Hope this helps.",  # text after
        "<think>r</think> then <answer>42</answer>",  # text between
        "<think>r<think>s</think><answer>42</answer>",  # nested tag
        "<think>r</think><answer>4</answer><answer>2</answer>",  # two answers
        "<think>r</think><answer>4<answer>2</answer>",  # tag inside the answer
        "<think>r</think><answer>   </answer>",  # empty answer
        "<think></think><answer>42</answer>",  # empty reasoning
        "<Think>r</Think><answer>42</answer>",  # tags are case-sensitive
        "<think>r</think><answer>42",  # truncated
        "",
    ],
)
def test_format_rejects(text):
    assert FormatReward()([text], [None]) == [0.0]


def test_format_answer_only_mode():
    reward = FormatReward(think=False)
    texts = ["<answer>42</answer>", " \n<answer>\n42\n</answer>\n", "<think>r</think><answer>42</answer>", "42"]
    assert reward(texts, [None] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_format_custom_tags_chat_samples_and_bad_tag():
    reward = FormatReward(think_tag="reasoning", answer_tag="final")
    assert reward(["<reasoning>r</reasoning><final>1</final>", "<think>r</think><answer>1</answer>"]) == [1.0, 0.0]
    chat = [{"role": "assistant", "content": [{"type": "text", "text": "<think>r</think><answer>1</answer>"}]}]
    assert FormatReward()([chat, None, 3], [None] * 3) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="think_tag"):
        FormatReward(think_tag="<think>")
    with pytest.raises(ValueError, match="two different tags"):
        FormatReward(think_tag="answer")


def test_answer_region_and_completion_text():
    assert answer_region("<think>t</think><ANSWER>a</ANSWER>") == ("a", True)
    assert answer_region("<answer>1</answer><answer>2</answer>") == ("2", True)
    assert answer_region("blah <answer> trunc") == (" trunc", True)
    assert answer_region("plain") == ("plain", False)
    assert completion_text({"role": "assistant", "content": "hi"}) == "hi"
    assert completion_text(None) == ""


# ---- accuracy: helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,000", 1000.0),
        ("1,234,567.5", 1234567.5),
        ("3.50", 3.5),
        ("-2", -2.0),
        ("\u22125", -5.0),  # unicode minus
        ("1/2", 0.5),
        ("-3 / 4", -0.75),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{1}{8}", 0.125),
        ("1e-3", 0.001),
        (".5", 0.5),
        ("costs $3.50 total", 3.5),
        ("first 3 then 7 and finally 12.", 12.0),
        ("50%", 50.0),
        ("x2", None),  # a digit inside a word is not a number
        ("1/0", None),
        ("no number", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("(C)", "C"),
        ("[D]", "D"),
        ("E.", "E"),
        ("A:", "A"),
        ("answer: b", "B"),
        ("The answer is (C).", "C"),
        ("Final answer: d.", "D"),
        ("B. Paris", "B"),
        ("(A) 42 apples", "A"),
        ("I think (B) is wrong, so (D)", "D"),
        ("I would pick C here", "C"),
        ("the answer is a cat", None),  # article, not a choice
        ("F", None),  # outside A-E
        ("", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def test_extract_answer_and_boxed():
    assert extract_answer("<think>5</think><answer> 6 </answer>") == " 6 "
    assert extract_answer("so \\boxed{7} and \\boxed{8}") == "8"
    assert extract_answer("<answer>\\boxed{\\frac{1}{2}}</answer>") == "\\frac{1}{2}"
    assert extract_answer("plain text") == "plain text"
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("no box") is None


def test_normalize_text():
    assert normalize_text("  The   Eiffel Tower. ") == "the eiffel tower"
    assert normalize_text("3.5") == "3.5" and normalize_text("1,000") == "1000"
    assert normalize_text("New-York!") == normalize_text("newyork")
    assert normalize_text("3.5") != normalize_text("35")


# ---- accuracy: the reward ------------------------------------------------------------------------


def test_accuracy_auto_routes_by_ground_truth():
    reward = AccuracyReward()
    texts = [
        "<think>r</think><answer>1,000</answer>",
        "<think>r</think><answer>The answer is (B) Paris</answer>",
        "<think>r</think><answer>Paris.</answer>",
        "<think>r</think><answer>1/2</answer>",
        "<think>r</think><answer>London</answer>",
    ]
    answers = ["1000", "(B)", "paris", 0.5, "Paris"]
    assert reward(texts, [{"answer": a} for a in answers]) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_accuracy_modes_differ():
    text = ["<answer>3.50</answer>"]
    assert AccuracyReward(mode="exact")(text, [{"answer": "3.5"}]) == [0.0]
    assert AccuracyReward(mode="numeric")(text, [{"answer": "3.5"}]) == [1.0]
    assert AccuracyReward(mode="choice")(["<answer>answer: b</answer>"], [{"answer": "B"}]) == [1.0]
    assert AccuracyReward(mode="choice")(["<answer>C</answer>"], [{"answer": "(B)"}]) == [0.0]


def test_accuracy_numeric_tolerances():
    text, prompt = ["<answer>3.14</answer>"], [{"answer": 3.1416}]
    assert AccuracyReward(mode="numeric")(text, prompt) == [0.0]
    assert AccuracyReward(mode="numeric", abs_tol=0.01)(text, prompt) == [1.0]
    big = [{"answer": 1000}]
    assert AccuracyReward(mode="numeric", rel_tol=0.01)(["<answer>995</answer>"], big) == [1.0]
    assert AccuracyReward(mode="numeric", rel_tol=0.01)(["<answer>980</answer>"], big) == [0.0]


def test_accuracy_extraction_rules():
    reward = AccuracyReward()
    # the reasoning's number is ignored when an answer block exists
    assert reward(["<think>7</think><answer>8</answer>"], [{"answer": 7}]) == [0.0]
    # no tags: the last number of the completion, or the last \boxed{}
    assert reward(["so the total is 1,234 apples."], [{"answer": 1234}]) == [1.0]
    assert reward(["\\boxed{12} is wrong, it is \\boxed{13}. Checked 12 times"], [{"answer": 13}]) == [1.0]
    # GSM8K-style ground truth: its last number, in numeric mode (auto would compare strings)
    gsm8k = [{"answer": "Natalia sold 48/2 = 24 ... #### 72"}]
    assert AccuracyReward(mode="numeric")(["<answer>72</answer>"], gsm8k) == [1.0]


def test_accuracy_ground_truth_sources_and_none():
    reward = AccuracyReward()
    texts = ["<answer>4</answer>", "<answer>4</answer>", "<answer>B</answer>", "nothing"]
    out = reward(texts, ["q1", "q2", "q3", "q4"], answer=[4, None, ["A", "B"], 4])
    assert out == [1.0, None, 1.0, 0.0]
    assert reward(["<answer>4</answer>"], [{"question": "2+2"}]) == [None]
    assert AccuracyReward(answer_key="solution")(["<answer>4</answer>"], [{"solution": "4"}]) == [1.0]


def test_accuracy_bad_options_and_lengths():
    with pytest.raises(ValueError, match="mode"):
        AccuracyReward(mode="fuzzy")
    with pytest.raises(ValueError, match="tolerances"):
        AccuracyReward(abs_tol=-1)
    with pytest.raises(ValueError, match="one prompt per sample"):
        AccuracyReward()(["a", "b"], [{"answer": "a"}])


# ---- fuzzing and doctests -----------------------------------------------------------------------

_text = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "}", "{", "1,000", "-", "/", " ",
                         "\n", "(B)", "answer:", "3.5", "\\frac{1}{0}", "1e999", "x"]),
        max_size=30,
    ).map("".join),
)


@settings(max_examples=150, deadline=None)
@given(text=_text, gt=st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.sampled_from(["B", "(c)", "42"])))
def test_fuzz_text_rewards_never_crash(text, gt):
    assert FormatReward()([text], [None])[0] in (0.0, 1.0)
    assert FormatReward(think=False)([text], [None])[0] in (0.0, 1.0)
    for mode in ("auto", "exact", "choice", "numeric"):
        assert AccuracyReward(mode=mode)([text], [{"answer": gt}])[0] in (0.0, 1.0, None)


@pytest.mark.parametrize("module", [format_module, accuracy_module])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
