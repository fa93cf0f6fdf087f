"""`mml`: multimodal linkage (Wang et al., arXiv 2412.00473; recipe in /work/shared/specs/attacks.md, "MML").

A FigStep-style list image of an *encrypted* instruction, with a decoding prompt that frames the
image as a villain's game screen and asks the model to undo the encryption and fill in the list.

- Image: 760x760 white, Arial 60 (Liberation Sans, metric-compatible, bundled), the text wrapped
  at 20 characters (textwrap, as FigStep) followed by "\\n1. \\n2. \\n3. ", drawn at FigStep's (20, 10)
  with line spacing 11 (the generator is not released; OSB's sizes; the origin and spacing are
  FigStep's). Text running past the canvas is lost, as there; the record says when it does.
- Modes: `wr` replaces JJ*/NN* words by benign adjectives/foods (attacks/data/mml_words.json; no
  two words share a replacement and none is already in the text, so the map is invertible) and
  the prompt gets the map {shown: original} and the shuffled *original* words (OSB inverts the map
  and sends the replaced text: not done here); `mirror` flips the image left-right; `rotate` turns
  it 180 degrees; `base64` draws the instruction's Base64 and the prompt does not carry the string.
- Part-of-speech tags: `tagger=rule` (default) is a small harness rule (attacks/data/mml_tagger.json),
  `tagger=nltk` uses nltk.pos_tag when NLTK and its tagger data are installed (nothing is downloaded).
- Prompts: attacks/data/mml_prompts.json (our wording, the described structure); `prompt_file=`
  loads the original const.py prompts converted to that JSON.
- Randomness (replacement words, word shuffle) comes from attack_seed(seed, spec, sample id) and is
  recorded with every choice.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from PIL import Image

from attacks._textimg import (
    ARIAL_STANDIN,
    FontRef,
    draw_text,
    fill,
    font_ref,
    lazy,
    load_json,
    overflows,
    require_keys,
)
from harness.contracts.attack import Attack, attack_seed
from harness.errors import DataError
from harness.registry import attack
from harness.schema import Sample
from tasks.render import figstep_text

MODES = ("wr", "mirror", "rotate", "base64")
#: FigStep's placement (tasks/render.py FIGSTEP_CANVAS), used for MML's FigStep-style image.
ORIGIN = (20, 10)
SPACING = 11
log = logging.getLogger(__name__)
TAGGER_KEYS = ("function_words", "verbs", "verb_cues", "adjectives", "adjective_suffixes", "exempt_from_suffix")
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


# -- word replacement ----------------------------------------------------------------------------

def rule_tags(words: list[str], lists: dict[str, Any]) -> list[str]:
    """Penn-style tags by the harness rule (mml_tagger.json): JJ, NN, NNS, VB or O (other)."""
    function, verbs, cues = set(lists["function_words"]), set(lists["verbs"]), set(lists["verb_cues"])
    adjectives, exempt = set(lists["adjectives"]), set(lists["exempt_from_suffix"])
    suffixes = tuple(lists["adjective_suffixes"])
    tags: list[str] = []
    for i, word in enumerate(words):
        low, prev = word.lower(), words[i - 1].lower() if i else ""
        if low in function:
            tag = "O"
        elif low in verbs or i == 0 or prev in cues:
            tag = "VB"
        elif low in adjectives or (low.endswith(suffixes) and low not in exempt and len(low) > 4):
            tag = "JJ"
        elif len(low) >= 5 and low.endswith(("ing", "ed")):
            tag = "VB"
        elif low.endswith("ly"):
            tag = "O"
        elif len(low) >= 4 and low.endswith("s") and not low.endswith(("ss", "us", "is")):
            tag = "NNS"
        else:
            tag = "NN"
        tags.append(tag)
    return tags


def nltk_tags(words: list[str]) -> list[str]:
    try:
        import nltk
    except ImportError:
        raise DataError("mml tagger=nltk: NLTK is not installed (pip install nltk, then its "
                        "averaged_perceptron_tagger_eng data); tagger=rule needs nothing") from None
    try:
        return [tag for _, tag in nltk.pos_tag(words)]
    except LookupError as exc:
        raise DataError(f"mml tagger=nltk: NLTK's tagger data is missing (nothing is downloaded here): {exc}") from None


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _match_case(source: str, word: str) -> str:
    if source.isupper() and len(source) > 1:
        return word.upper()
    return word.capitalize() if source[:1].isupper() else word


def replace_words(text: str, tags: list[str], words: dict[str, list[str]], rng: random.Random) -> dict[str, Any]:
    """Replace JJ*/NN* words of `text` in place (spacing and punctuation kept). Each distinct
    original word gets its own replacement, never one already in the text, so {shown: original}
    is a true inverse; when a list runs out, the remaining words stay as they are (recorded)."""
    present = {w.lower() for w in WORD.findall(text)}
    pools = {"JJ": [w for w in words["adjectives"] if w not in present],
             "NN": [w for w in words["foods"] if w not in present and _plural(w) not in present]}
    chosen: dict[str, str] = {}  # original (lower) -> base replacement
    pieces, shown_to_original, unreplaced, last = [], {}, [], 0
    for match, tag in zip(WORD.finditer(text), tags):
        original = match.group(0)
        kind = "JJ" if tag.startswith("JJ") else "NN" if tag.startswith("NN") else None
        if kind is None or "'" in original:
            continue
        key = f"{kind}:{original.lower()}"
        if key not in chosen:
            if not pools[kind]:
                unreplaced.append(original)
                continue
            chosen[key] = pools[kind].pop(rng.randrange(len(pools[kind])))
        base = chosen[key]
        shown = _match_case(original, _plural(base) if tag in ("NNS", "NNPS") else base)
        pieces.append(text[last:match.start()] + shown)
        last = match.end()
        shown_to_original[shown] = original
    pieces.append(text[last:])
    return {"replaced": "".join(pieces), "replace_map": shown_to_original, "unreplaced": unreplaced}


def undo_replacement(replaced: str, replace_map: dict[str, str]) -> str:
    """Put the original words back (what the decoding prompt asks the model to do)."""
    return WORD.sub(lambda m: replace_map.get(m.group(0), m.group(0)), replaced)


# -- image ---------------------------------------------------------------------------------------

def list_text(text: str, wrap: int, steps: int) -> str:
    """FigStep's list layout: the text wrapped at `wrap` characters, then "1. ", "2. ", ... lines."""
    return figstep_text(text, steps=steps, width=wrap)


def render(drawn: str, mode: str, font: FontRef, font_size: int, size: int) -> Image.Image:
    image = draw_text((size, size), drawn, font.at(font_size), ORIGIN, SPACING)
    if mode == "mirror":
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if mode == "rotate":
        return image.transpose(Image.Transpose.ROTATE_180)
    return image


@attack("mml")
class MultimodalLinkage(Attack):
    """MML: a FigStep-style list image of the encrypted instruction (word replacement, mirror, 180-degree rotation or Base64) with its decoding prompt."""

    @dataclass(frozen=True)
    class Params:
        mode: Literal["wr", "mirror", "rotate", "base64"] = "wr"
        source: Literal["auto", "query", "instruction"] = "auto"  # auto: meta["instruction"] when present
        tagger: Literal["rule", "nltk"] = "rule"
        font: str = ARIAL_STANDIN  # a bundled font name or a path (e.g. arial.ttf)
        font_size: int = 60
        size: int = 760
        wrap: int = 20
        steps: int = 3
        words_file: str | None = None  # replacement words (default attacks/data/mml_words.json)
        prompt_file: str | None = None  # decoding prompts (default: ours)

        def __post_init__(self) -> None:
            if min(self.font_size, self.size, self.wrap) < 1 or self.steps < 0:
                raise ValueError("font_size, size and wrap must be >= 1 and steps >= 0")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.font = font_ref(params.font)
        self.prompts, self.prompt_source, self.prompt_sha = load_json("mml_prompts.json", params.prompt_file,
                                                                      "mml prompt")
        require_keys(self.prompts, (params.mode,), self.prompt_source, "mml prompt")
        self.words, self.words_source, self.words_sha = load_json("mml_words.json", params.words_file, "mml words")
        require_keys(self.words, ("adjectives", "foods"), self.words_source, "mml words")
        self.tagger_lists, _, self.tagger_sha = load_json("mml_tagger.json", None, "mml tagger")
        require_keys(self.tagger_lists, TAGGER_KEYS, "attacks/data/mml_tagger.json", "mml tagger")
        self._warned = False

    def identity(self) -> dict[str, Any]:
        ident = {"spec": self.spec, "params": asdict(self.params), **self.font.record(), "origin": list(ORIGIN),
                 "spacing": SPACING, "prompts": self.prompt_source, "prompts_sha256": self.prompt_sha}
        if self.params.mode == "wr":
            ident.update(words=self.words_source, words_sha256=self.words_sha)
            if self.params.tagger == "rule":
                ident["tagger_sha256"] = self.tagger_sha
            else:
                import nltk

                ident["nltk_version"] = nltk.__version__
        return ident

    def instruction(self, sample: Sample) -> tuple[str, str]:
        """(the instruction to encrypt, where it came from)."""
        given = sample.meta.get("instruction")
        if self.params.source == "instruction" or (self.params.source == "auto" and given):
            if not given:
                raise DataError(f"mml source=instruction: sample {sample.id!r} has no meta['instruction']")
            return str(given), "meta.instruction"
        return sample.query, "query"

    def apply(self, sample: Sample, seed: int) -> Sample:
        p = self.params
        instruction, origin = self.instruction(sample)
        sample_seed = attack_seed(seed, self.spec, sample.id)
        rng = random.Random(sample_seed)
        record: dict[str, Any] = {"mode": p.mode, "instruction": instruction, "instruction_from": origin,
                                  "sample_seed": sample_seed}
        values: dict[str, str] = {}
        if p.mode == "wr":
            words = WORD.findall(instruction)
            tags = rule_tags(words, self.tagger_lists) if p.tagger == "rule" else nltk_tags(words)
            done = replace_words(instruction, tags, self.words, rng)
            shown = done["replaced"]
            values["replace_map"] = json.dumps(done["replace_map"], ensure_ascii=False)
            record.update(tagger=p.tagger, tags=[[w, t] for w, t in zip(words, tags)], **done)
        elif p.mode == "base64":
            shown = base64.b64encode(instruction.encode("utf-8")).decode("ascii")
        else:
            shown = instruction
        shuffled = instruction.split()
        rng.shuffle(shuffled)
        values["shuffled_words"] = json.dumps(shuffled, ensure_ascii=False)
        text = fill(self.prompts[p.mode], **values)
        drawn = list_text(shown, p.wrap, p.steps)
        record.update(shown_text=shown, drawn_text=drawn, shuffled_words=shuffled,
                      overflow=overflows((p.size, p.size), drawn, self.font.at(p.font_size), ORIGIN, SPACING),
                      image={"size": [p.size, p.size], "font_size": p.font_size, "wrap": p.wrap, "steps": p.steps,
                             "origin": list(ORIGIN), "spacing": SPACING, **self.font.record(),
                             "transform": {"mirror": "flip left-right", "rotate": "rotate 180"}.get(p.mode)})
        if record["overflow"] and not self._warned:
            self._warned = True
            log.warning("mml: the text of sample %s runs past the %dx%d canvas and is partly cut (as in the "
                        "recipe; Base64 lines at wrap=20 do); a smaller wrap= or font_size= keeps it whole",
                        sample.id, p.size, p.size)
        image = lazy(render, drawn, p.mode, self.font, p.font_size, p.size)
        return self.attacked(sample, text, image, record)
