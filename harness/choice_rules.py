"""Which option letter a free-text reply to a multiple-choice question names, by the MMBench tools' rules.

Why in the core: the MMBench task (tasks/mmbench.py) reads replies with these rules, and its
optional LLM extractor (judges/mmbench_extractor.py) must apply the very same rules first, so that
it only asks the LLM about replies the rules cannot read, as the official tool does. A task may not
import a judge and a judge may not import a task, so the rules live below both.

Two rule sets, each reproduced from one pinned source and named so a result says which produced it
(they read some replies differently; the tests show where):

- `lmms-eval`: the MMBench evaluator kept in lmms-eval (`lmms_eval/tasks/mmbench/mmbench_evals.py`,
  commit 161c7a17), which carries the 2023 MMBench evaluation rules. In order: (1) exactly one of
  the letters A-E stands alone as a word (unless "A" is a word of a reply longer than three words:
  it may be the article, so this step is skipped); (2) exactly one letter appears in one of twelve
  bracket/punctuation patterns ("B.", "(B)", ":B", "B):" ...); (3) exactly one option's text occurs
  in the reply (case-insensitive). The letters tried are always A-E, so an "E" for a four-option
  question is read and scored wrong.
- `vlmevalkit`: VLMEvalKit's `can_infer` (`vlmeval/utils/matching_util.py`, commit 2cf2a36c).
  Known refusal sentences read as "Z" (no option, scored wrong); punctuation `.()[],:;!*#{}`
  becomes spaces; exactly one of the question's own letters as a word, and among the last four
  words, is the choice; no letter but a lone "Z" reads as "Z"; then "answer is X" (case-blind, as
  its regular expression is); then one option's text in a reply at most twice as long as all
  options together.

A reply the rules cannot read gives None: scored wrong by the task unless an LLM extractor reads it.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

#: Ends the reply of an API that failed, in both tools; never read as an answer.
API_FAILURE = "Failed to obtain answer via API"

# -- lmms-eval (the 2023 MMBench rules) -----------------------------------------------------------
_LMMS_LETTERS = "ABCDE"
#: (prefix, suffix) around a letter, tried in this order.
_LMMS_PATTERNS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                  (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))


def _count(words: list[str], letters: str, prefix: str = "", suffix: str = "") -> int:
    return sum(1 for c in letters if prefix + c + suffix in words)


def option_lmms_eval(reply: str) -> str | None:
    if API_FAILURE in reply:
        return None
    words = [w.strip() for w in reply.split()]
    if _count(words, _LMMS_LETTERS) == 1 and not ("A" in words and len(words) > 3):
        for letter in _LMMS_LETTERS:
            if letter in words:
                return letter
    for prefix, suffix in _LMMS_PATTERNS:
        if _count(words, _LMMS_LETTERS, prefix, suffix) == 1:
            for letter in _LMMS_LETTERS:
                if prefix + letter + suffix in words:
                    return letter
    return None


def text_lmms_eval(reply: str, options: Mapping[str, str]) -> str | None:
    answer = reply.lower()
    found = [k for k, v in options.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


def read_lmms_eval(reply: str, options: Mapping[str, str]) -> str | None:
    return option_lmms_eval(reply) or text_lmms_eval(reply, options)


# -- VLMEvalKit ----------------------------------------------------------------------------------
#: Data, kept verbatim: replies VLMEvalKit reads as "no option" (Z).
VLMEVALKIT_REJECTIONS = (
    "Sorry, I can't help with images of people yet.", "I can't process this file.",
    "I'm sorry, but without the image provided", "Cannot determine the answer",
)
_VLMEVALKIT_PUNCT = ".()[],:;!*#{}"
#: VLMEvalKit's `_VERBOSE_ANSWER_RE`, verbatim (case-blind: "answer is b" reads as B).
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def option_vlmevalkit(reply: str, options: Mapping[str, str]) -> str | None:
    if API_FAILURE in reply:
        return None
    if any(sentence in reply for sentence in VLMEVALKIT_REJECTIONS):
        return "Z"
    text = reply
    for mark in _VLMEVALKIT_PUNCT:
        text = text.replace(mark, " ")
    words = [w.strip() for w in text.split()]
    count = sum(1 for c in options if c in words)
    if count == 1:
        for letter in options:
            if letter in words and words.index(letter) > len(words) - 5:
                return letter
    elif count == 0 and "Z" in words:
        return "Z"
    match = _VERBOSE_ANSWER.search(reply)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    return None


def text_vlmevalkit(reply: str, options: Mapping[str, str]) -> str | None:
    answer = reply.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    found = [k for k, v in options.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


def read_vlmevalkit(reply: str, options: Mapping[str, str]) -> str | None:
    return option_vlmevalkit(reply, options) or text_vlmevalkit(reply, options)


RULES: dict[str, Callable[[str, Mapping[str, str]], str | None]] = {
    "lmms-eval": read_lmms_eval,
    "vlmevalkit": read_vlmevalkit,
}


def read_choice(reply: str, options: Mapping[str, str], rules: str = "lmms-eval") -> str | None:
    """The letter `reply` names under `rules` ("Z": it names none, on purpose), or None: unreadable.
    `options` maps each letter of the question, in order, to its text."""
    if rules not in RULES:
        raise ValueError(f"unknown choice rules {rules!r}; known: {', '.join(RULES)}")
    return RULES[rules](str(reply), options)
