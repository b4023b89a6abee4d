"""Format reward for reasoning VLMs/LLMs, and the two text helpers the other text rewards share.

`FormatReward` scores 1.0 when a completion is exactly

    <think> reasoning </think> <answer> answer </answer>

and 0.0 otherwise (the DeepSeek-R1 / VLM-R1 format). With `think=False` it asks for the
answer-only format `<answer> answer </answer>` instead.

What "exactly" means here (the whitespace tolerance, spelled out):
- whitespace (spaces, tabs, newlines) is allowed before the first tag, between `</think>` and
  `<answer>`, and after `</answer>`; nothing else may stand outside the tags;
- tags are lower case and written exactly (`<think>`, not `<Think>` or `< think >`);
- each block appears once, in that order, and no tag appears inside another block;
- each block must hold some non-whitespace text (`<think></think>` is not reasoning).

Helpers used by `mmgrpo.rewards.iou` and `mmgrpo.rewards.accuracy`:
- `completion_text(sample)`: the text of one completion (a string, a chat message dict, or a
  list of chat messages, in which case the last message is used);
- `answer_region(text, tag)`: the text inside the last `<answer>...</answer>` block.
"""

from __future__ import annotations

import re
from typing import Any, Sequence


def completion_text(sample: Any) -> str:
    """The text of one completion; anything unreadable gives "" (and so scores 0).

    Accepts a string, a chat message `{"role": ..., "content": ...}`, or a list of such messages
    (TRL's conversational format; the last message is the completion). Content given as a list
    of parts (`[{"type": "text", "text": ...}, ...]`) is joined.

    >>> completion_text([{"role": "assistant", "content": "<answer>B</answer>"}])
    '<answer>B</answer>'
    """
    if isinstance(sample, str):
        return sample
    if isinstance(sample, (list, tuple)) and sample:
        return completion_text(sample[-1])
    if isinstance(sample, dict):
        content = sample.get("content", sample.get("text", ""))
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):
            parts = [p.get("text", "") if isinstance(p, dict) else p for p in content]
            return "".join(p for p in parts if isinstance(p, str))
    return ""


def answer_region(text: str, tag: str = "answer") -> tuple[str, bool]:
    """The answer block of `text`, and whether one was found.

    - the content of the LAST complete `<tag>...</tag>` block: from the last opening tag before
      the last closing tag to that closing tag (tags matched case-insensitively);
    - else, when an opening `<tag>` was never closed (a truncated completion), the text after
      the last opening tag;
    - else the whole text, with found=False.

    >>> answer_region("<think>[1, 2, 3, 4]</think><answer> B </answer>")
    (' B ', True)
    >>> answer_region("no tags here")
    ('no tags here', False)
    """
    # one linear pass over the tags (a regex like <tag>(.*?)</tag> is quadratic on odd input)
    tags = list(re.finditer(f"<(/?){re.escape(tag)}>", text, flags=re.IGNORECASE))
    closes = [m for m in tags if m.group(1)]
    if closes:
        last_close = closes[-1]
        opens = [m for m in tags if not m.group(1) and m.end() <= last_close.start()]
        if opens:
            return text[opens[-1].end() : last_close.start()], True
    opens = [m for m in tags if not m.group(1)]
    if opens:
        return text[opens[-1].end() :], True
    return text, False


class FormatReward:
    """1.0 if a completion follows the `<think>..</think><answer>..</answer>` format, else 0.0.

    Args:
        think: True asks for `<think>...</think>` followed by `<answer>...</answer>`;
            False asks for the answer-only format `<answer>...</answer>`.
        think_tag, answer_tag: the tag names.

    Returns one float per sample (never None: a badly formatted output is the model's fault).
    See the module docstring for the exact whitespace rules.

    >>> reward = FormatReward()
    >>> reward(["<think>2+2 is 4</think>\\n<answer>4</answer>", "<answer>4</answer>", "4"], [None] * 3)
    [1.0, 0.0, 0.0]
    >>> FormatReward(think=False)(["  <answer>4</answer>\\n"], [None])
    [1.0]
    """

    name = "format"

    def __init__(self, think: bool = True, think_tag: str = "think", answer_tag: str = "answer"):
        for what, tag in (("think_tag", think_tag), ("answer_tag", answer_tag)):
            if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z_][\w\-]*", tag):
                raise ValueError(f"FormatReward: {what}={tag!r} is not a tag name; use letters, e.g. 'think'.")
        if think and think_tag == answer_tag:
            raise ValueError(f"FormatReward: think_tag and answer_tag are both {think_tag!r}; give two different tags.")
        self.think = think
        self.tags = [think_tag, answer_tag] if think else [answer_tag]
        self._expected = [f"{slash}{t}" for t in self.tags for slash in ("", "/")]  # think, /think, answer, /answer
        names = "|".join(re.escape(t) for t in sorted({think_tag, answer_tag}))
        self._any_tag = re.compile(f"<(/?(?:{names}))>")

    def score_one(self, text: str) -> float:
        # one linear pass: the tags must be exactly <think></think><answer></answer>, in order,
        # with only whitespace outside the blocks and some text inside each.
        tags = list(self._any_tag.finditer(text))
        if [m.group(1) for m in tags] != self._expected:
            return 0.0
        outside = [text[: tags[0].start()], text[tags[-1].end() :]]
        outside += [text[tags[k].end() : tags[k + 1].start()] for k in range(1, len(tags) - 1, 2)]
        inside = [text[tags[k].end() : tags[k + 1].start()] for k in range(0, len(tags), 2)]
        if any(part.strip() for part in outside) or not all(part.strip() for part in inside):
            return 0.0
        return 1.0

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any] | None = None, **meta: Any) -> list[float]:
        return [self.score_one(completion_text(s)) for s in samples]
