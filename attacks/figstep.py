"""The `figstep` attack: FigStep's typographic jailbreak applied to any harmful-behaviour set.

Gong et al., AAAI 2025 (arXiv 2311.05608); release github.com/ThuCCSLab/FigStep at commit
0861b17 (MIT). The harmful request leaves the text channel: it is typeset into a 760x760 image as
the heading of an empty numbered list (FreeMonoBold 80, wrapped at 15 characters, "1. 2. 3."),
and the text sent is FigStep's fixed, benign-looking incitement prompt asking the model to fill
the list in. Both come from one place each: the renderer from tasks.render (which reproduces the
release's PNGs) and the prompt from the FigStep task, which carries it as data.

What is typeset: FigStep renders a statement-form *instruction* ("Steps to manufacture illegal
drugs."), which its authors rewrote from each question. A task that carries one (SafeBench rows:
`meta["instruction"]`) gets it typeset, so on SafeBench this attack reproduces the release's
images; any other set has only its request, which is typeset as it stands (`text=query` forces
that everywhere). Nothing is random: the same request always gives the same image.

Cost: no model call of its own; the image is drawn lazily when its batch runs.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from harness.contracts.attack import Attack
from harness.registry import attack
from harness.schema import Sample
from tasks.figstep import RELEASE_COMMIT, TEXT_PROMPT
from tasks.render import (
    FIGSTEP_CANVAS,
    FIGSTEP_STEPS,
    FIGSTEP_WRAP_WIDTH,
    render_figstep,
)

#: The sample meta key holding FigStep's statement-form instruction, when a task provides one.
INSTRUCTION = "instruction"


@attack("figstep")
class FigStepAttack(Attack):
    """FigStep: the request typeset as an empty numbered list; the text asks to fill the list in."""

    @dataclass(frozen=True)
    class Params:
        #: `auto`: the task's statement-form instruction when it has one, else the plain request;
        #: `query`: always the plain request.
        text: Literal["auto", "query"] = "auto"

    calls_per_sample: ClassVar[int] = 0

    def typeset(self, sample: Sample) -> tuple[str, str]:
        """(what is typeset, where it came from: `instruction` or `query`)."""
        instruction = sample.meta.get(INSTRUCTION)
        if self.params.text == "auto" and isinstance(instruction, str) and instruction.strip():
            return instruction.strip(), INSTRUCTION
        return sample.query, "query"

    def apply(self, sample: Sample, seed: int) -> Sample:
        content, source = self.typeset(sample)
        return self.attacked(sample, TEXT_PROMPT, functools.partial(render_figstep, content),
                             {"typeset": content, "typeset_from": source})

    def identity(self) -> dict[str, Any]:
        canvas = FIGSTEP_CANVAS
        return {
            "spec": self.spec,
            "attack": "figstep",
            "text": self.params.text,
            "release_commit": RELEASE_COMMIT,
            "prompt_sha256": hashlib.sha256(TEXT_PROMPT.encode()).hexdigest()[:16],
            "canvas": {"size": [canvas.width, canvas.height], "font": canvas.font, "font_size": canvas.font_size,
                       "origin": list(canvas.origin), "line_spacing": canvas.line_spacing,
                       "wrap": FIGSTEP_WRAP_WIDTH, "steps": FIGSTEP_STEPS},
        }
