"""How a free-text reply to an MME question becomes "yes", "no" or "other".

MME scores exact yes/no answers, so the rule that reads a reply decides the number. Three rules are
in use and give different scores for the same replies; each is reproduced here under its own name
so a result says which one produced it:

- `official`: MME's eval_tool (`calculation.py`). Lowercase; an exact "yes"/"no" is taken; otherwise
  the first four characters decide: "yes" in them -> yes, else "no" in them -> no, else other.
  The official tool reads replies from one-line result files that LLaVA-style scripts write
  stripped, so surrounding whitespace is removed first (a reply cannot carry it into that file).
- `lmms-eval`: lmms-eval's `mme` task (rule credited to Otter). Lowercase, strip whitespace, delete
  every "."; then exact yes/no, a lone "y"/"n", or the same four-character rule.
- `vlmevalkit`: VLMEvalKit's `YOrN_Extraction`. Lowercase, normalise punctuation as VQA evaluation
  does, split into words; "yes" without "no" -> yes, "no" without "yes" -> no, else other
  (VLMEvalKit may then ask an LLM about those; this harness does not, so they stay wrong).

"other" is always scored wrong and counted as unparseable.

| reply               | official | lmms-eval | vlmevalkit |
| ------------------- | -------- | --------- | ---------- |
| "The answer is no." | other    | other     | no         |
| "Yes, there is"     | yes      | yes       | yes        |
| "No."               | no       | no        | no         |
| ""                  | other    | other     | other      |
| "Y"                 | other    | yes       | other      |
"""

from __future__ import annotations

import re
from typing import Callable, Literal

Label = Literal["yes", "no", "other"]


def _first_four(text: str) -> Label:
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def parse_official(reply: str) -> Label:
    text = reply.strip().lower()
    if text in ("yes", "no"):
        return text  # type: ignore[return-value]
    return _first_four(text)


def parse_lmms_eval(reply: str) -> Label:
    text = reply.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text  # type: ignore[return-value]
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")  # type: ignore[return-value]
    return _first_four(text)


# VQA-style punctuation handling, as VLMEvalKit applies it before splitting into words.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
#: VLMEvalKit passes `re.UNICODE` (32) where `re.sub` expects `count`, so at most 32 periods go.
_PERIOD_LIMIT = 32


def _vqa_punctuation(text: str) -> str:
    out = text
    numbers_with_commas = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _VQA_PUNCT:
        # A mark next to a space (or any digit-comma-digit in the text) is deleted; otherwise it
        # becomes a space, so "yes,no" splits into two words but "yes, no" does not gain one.
        if f"{mark} " in text or f" {mark}" in text or numbers_with_commas:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def parse_vlmevalkit(reply: str) -> Label:
    words = _vqa_punctuation(reply.lower()).split()
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "yes"
    if has_no and not has_yes:
        return "no"
    return "other"


PARSERS: dict[str, Callable[[str], Label]] = {
    "official": parse_official,
    "lmms-eval": parse_lmms_eval,
    "vlmevalkit": parse_vlmevalkit,
}
