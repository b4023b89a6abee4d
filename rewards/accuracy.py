"""Accuracy reward: compare the answer a completion gives with the ground-truth answer.

Where the answer is taken from (`extract_answer`):
1. the content of the last `<answer>...</answer>` block, if the completion has one (an
   unclosed `<answer>` at the end counts: the text after it);
2. else the whole completion;
3. then, if that text holds a `\\boxed{...}`, the content of the last one.
Numeric mode then reads the LAST number of the extracted text (so an untagged
"... so the total is 42." scores on 42); choice mode looks for a letter (see `parse_choice`);
exact mode compares the whole extracted text after `normalize_text`.

Modes:
- "exact": normalised string equality (case, whitespace, punctuation and symbols ignored).
- "choice": multiple choice; the letter (A-E by default) found in the answer equals the
  ground-truth letter. "B", "(B)", "B.", "B) Paris", "answer: b", "\\boxed{B}" all read as B.
- "numeric": |pred - gt| <= max(rel_tol * max(|pred|, |gt|), abs_tol) (math.isclose). Reads
  "1,000" (thousands separators), "3.50", "-2", "1/2", "\\frac{1}{2}", "1e-3"; "50%" reads as 50.
- "auto" (default): numeric if the ground truth is a number (or a string that is one number or
  fraction), choice if it is a single letter such as "B" or "(B)", exact otherwise.

Ground truth: the prompt dict's field `answer_key` ("answer"), else the meta kwarg of that
name (`answer=[...]`, one entry per row). A list/tuple ground truth means "any of these".
Missing or unreadable ground truth scores None (could not score); a completion with no
readable answer scores 0.0.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, Sequence

from mmgrpo.rewards.format import answer_region, completion_text

MODES = ("auto", "exact", "choice", "numeric")

_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"  # "1,000" or "1000"
_DEC = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_SIGNED = rf"[-+\u2212]?{_DEC}(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(
    rf"\\[dt]?frac\{{\s*(?P<fn>{_SIGNED})\s*\}}\{{\s*(?P<fd>{_SIGNED})\s*\}}"  # \frac{1}{2}
    rf"|(?<![\w.])(?P<sn>{_SIGNED})\s*/\s*(?P<sd>{_SIGNED})(?![\w.])"  # 1/2
    rf"|(?<![\w.])(?P<n>{_SIGNED})"  # 3.50, -2, 1,000
)


def _to_float(token: str) -> float:
    return float(token.replace(",", "").replace("\u2212", "-"))


def _numbers(text: str) -> list[float]:
    values = []
    for m in _NUMBER_RE.finditer(text):
        try:
            if m.group("n") is not None:
                value = _to_float(m.group("n"))
            else:
                latex = m.group("fn") is not None
                num, den = (m.group("fn"), m.group("fd")) if latex else (m.group("sn"), m.group("sd"))
                value = _to_float(num) / _to_float(den)
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
        if math.isfinite(value):
            values.append(value)
    return values


def parse_number(text: str) -> float | None:
    """The last number in `text` (None if there is none).

    >>> parse_number("so it costs $1,000.50 in total")
    1000.5
    >>> parse_number("x = -3/4")
    -0.75
    >>> parse_number("\\\\frac{1}{2}")
    0.5
    """
    values = _numbers(text)
    return values[-1] if values else None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), or None.

    >>> last_boxed("so \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    """
    if "\\boxed" not in text:
        return None
    closing: dict[int, int] = {}  # position of each "{" -> position of its "}"
    stack: list[int] = []
    for j, ch in enumerate(text):
        if ch == "{":
            stack.append(j)
        elif ch == "}" and stack:
            closing[stack.pop()] = j
    for m in reversed(list(re.finditer(r"\\boxed *\{", text))):
        brace = m.end() - 1
        if brace in closing:
            return text[brace + 1 : closing[brace]]
    return None


def extract_answer(text: str, tag: str = "answer") -> str:
    """The answer part of a completion: the answer block (else all of it), then a \\boxed{} inside.

    >>> extract_answer("<think>maybe 3</think><answer>The result is \\\\boxed{4}.</answer>")
    '4'
    """
    region, _ = answer_region(text, tag)
    boxed = last_boxed(region)
    return boxed if boxed is not None else region


def parse_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The multiple-choice letter in `text`, upper case, or None. Rules, first that applies:

    1. the whole text is a letter, maybe wrapped: "b", "(B)", "[C]", "D.", "E:";
    2. an explicit "answer: X" / "answer is (X)" (last one); a lower-case letter here must end
       the phrase ("answer: b." yes, "answer is a cat" no);
    3. the text starts with "B.", "(B)", "B)" or "B:" followed by text ("B. Paris");
    4. the last upper-case "(X)" anywhere;
    5. the last standalone upper-case letter ("I think C is right").

    >>> [parse_choice(t) for t in ["(B)", "b.", "The answer is: c", "D) 42", "I pick E here", "none"]]
    ['B', 'B', 'C', 'D', 'E', None]
    """
    up, low = letters.upper(), letters.lower()
    cls = f"[{re.escape(up + low)}]"
    s = text.strip()
    m = re.fullmatch(rf"[\(\[]?\s*({cls})\s*[\)\]]?\s*[.:]?", s)
    if m:
        return m.group(1).upper()
    found = None
    for m in re.finditer(rf"answer\s*(?:is)?\s*[:\uff1a]?\s*[\(\[]?\s*({cls})(?![\w])", s, flags=re.IGNORECASE):
        letter = m.group(1)
        tail = s[m.end() :]
        if letter in up or re.match(r"\s*(?:$|[.)\]:;,!])", tail):
            found = letter.upper()
    if found:
        return found
    m = re.match(rf"[\(\[]?({cls})[\)\].:](?:\s|$)", s)
    if m:
        return m.group(1).upper()
    hits = re.findall(rf"[\(\[]([{re.escape(up)}])[\)\]]", s)
    if hits:
        return hits[-1]
    hits = re.findall(rf"(?<![\w'])([{re.escape(up)}])(?![\w'])", s)
    return hits[-1] if hits else None


def normalize_text(text: str) -> str:
    """Case-folded, punctuation and symbols dropped, whitespace collapsed (for exact matching).

    A "." between digits is kept (3.5 stays 3.5) and a "," between thousands digits is dropped.

    >>> normalize_text("  The  Eiffel-Tower!  ")
    'the eiffeltower'
    """
    s = unicodedata.normalize("NFKC", text).casefold()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    out = []
    for i, ch in enumerate(s):
        if ch == "." and 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit():
            out.append(ch)
        elif unicodedata.category(ch)[0] not in "PS":
            out.append(ch)
    return " ".join("".join(out).split())


def _infer_mode(gt: Any, letters: str) -> str:
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        return "numeric"
    s = str(gt).strip()
    if re.fullmatch(rf"\s*\$?(?:{_NUMBER_RE.pattern})\s*%?\s*\$?", s):
        return "numeric"
    if re.fullmatch(rf"[\(\[]?\s*[{re.escape(letters.upper() + letters.lower())}]\s*[\)\]]?\s*[.:]?", s):
        return "choice"
    return "exact"


class AccuracyReward:
    """1.0 if the completion's answer matches the ground truth, else 0.0 (None: no ground truth).

    Args:
        mode: "auto" | "exact" | "choice" | "numeric" (see the module docstring).
        abs_tol, rel_tol: numeric tolerances: match when
            |pred - gt| <= max(rel_tol * max(|pred|, |gt|), abs_tol).
        letters: the allowed multiple-choice letters.
        answer_key: the prompt field / meta kwarg holding the ground truth.
        answer_tag: the tag whose block holds the answer.

    >>> reward = AccuracyReward()
    >>> completions = ["<think>..</think><answer>1,000</answer>", "<answer>(B)</answer>", "it is \\\\boxed{Paris}"]
    >>> reward(completions, [{"answer": "1000"}, {"answer": "B"}, {"answer": "paris"}])
    [1.0, 1.0, 1.0]
    >>> AccuracyReward(mode="numeric", rel_tol=0.01)(["about 3.14"], ["q"], answer=[3.1416])
    [1.0]
    """

    name = "accuracy"

    def __init__(
        self,
        mode: str = "auto",
        abs_tol: float = 1e-6,
        rel_tol: float = 1e-6,
        letters: str = "ABCDE",
        answer_key: str = "answer",
        answer_tag: str = "answer",
    ):
        if mode not in MODES:
            raise ValueError(f"AccuracyReward: mode={mode!r} is unknown; use one of {MODES}.")
        if not (abs_tol >= 0 and rel_tol >= 0):
            raise ValueError(f"AccuracyReward: tolerances must be >= 0, got abs_tol={abs_tol}, rel_tol={rel_tol}.")
        if not letters or not letters.isalpha():
            raise ValueError(f"AccuracyReward: letters={letters!r} must be letters, e.g. 'ABCDE'.")
        self.mode, self.abs_tol, self.rel_tol = mode, abs_tol, rel_tol
        self.letters, self.answer_key, self.answer_tag = letters.upper(), answer_key, answer_tag

    def _ground_truth(self, prompt: Any, meta: dict[str, Any], i: int) -> Any:
        if isinstance(prompt, dict) and prompt.get(self.answer_key) is not None:
            return prompt[self.answer_key]
        values = meta.get(self.answer_key)
        if isinstance(values, (list, tuple)) and i < len(values):
            return values[i]
        return None

    def _match_one(self, answer: str, gt: Any) -> float | None:
        """1.0/0.0 for one ground-truth value; None if the ground truth is unreadable."""
        mode = self.mode if self.mode != "auto" else _infer_mode(gt, self.letters)
        if mode == "numeric":
            target = float(gt) if isinstance(gt, (int, float)) and not isinstance(gt, bool) else parse_number(str(gt))
            if target is None or not math.isfinite(target):
                return None
            pred = parse_number(answer)
            ok = pred is not None and math.isclose(pred, target, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
            return float(ok)
        if mode == "choice":
            target = parse_choice(str(gt), self.letters)
            if target is None:
                return None
            return float(parse_choice(answer, self.letters) == target)
        target = normalize_text(str(gt))
        if not target:
            return None
        return float(normalize_text(answer) == target)

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any], **meta: Any) -> list[float | None]:
        if len(prompts) != len(samples):
            raise ValueError(
                f"AccuracyReward: got {len(samples)} samples but {len(prompts)} prompts; pass one prompt per sample."
            )
        scores: list[float | None] = []
        for i, (sample, prompt) in enumerate(zip(samples, prompts)):
            gt = self._ground_truth(prompt, meta, i)
            gts = list(gt) if isinstance(gt, (list, tuple)) else [gt]
            answer = extract_answer(completion_text(sample), self.answer_tag)
            results = [self._match_one(answer, g) for g in gts if g is not None]
            results = [r for r in results if r is not None]
            scores.append(max(results) if results else None)
        return scores
