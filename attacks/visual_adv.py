"""`visual_adv`: one universal adversarial image (Qi et al., AAAI 2024, arXiv 2306.13213), optimised
by PGD so the model (or the defended model, `through=`) finds a target corpus likely; at test time
each harmful request is sent as text with that image.

As the paper: the optimisation prompt is the image with no text (`prompt=`), every step scores a
random draw of `targets_per_step` corpus lines (8), sign steps of 1/255 for 5,000 iterations, budgets
eps in {16, 32, 64}/255 around a clean image or unconstrained (eps=255, start U(0, 1)). The paper's
corpus is 66 derogatory sentences; realign does not ship it. Its bundled corpus
(attacks/data/visual_adv_corpus.txt) is harmless affirmative openings in our own words ("Sure, here
is how to do that."), so the universal image pushes towards compliance rather than towards toxic
text; `corpus_file=` loads any other, one target per line. The paper's clean image is not shipped
either: `init=` names an image file (default: a gray image).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from attacks._whitebox import WhiteboxAttack, WhiteboxParams, png_loader, u_digest
from harness.errors import DataError
from harness.registry import attack
from harness.schema import Sample
from harness.whitebox import store
from harness.whitebox.pgd import Item, optimise


def load_corpus(path: str | None) -> tuple[list[str], str]:
    """(lines, sha256) of the target corpus: `path`, or the bundled harmless-affirmative one."""
    if path:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise DataError(f"visual_adv corpus_file {path}: cannot read it ({exc.strerror or exc})") from None
    else:
        text = resources.files("attacks").joinpath("data/visual_adv_corpus.txt").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise DataError(f"visual_adv corpus {path or '(bundled)'} has no target line")
    return lines, hashlib.sha256("\n".join(lines).encode()).hexdigest()


@attack("visual_adv")
class VisualAdv(WhiteboxAttack):
    """Qi et al.'s universal adversarial image (PGD on a target corpus), optionally through the defense."""

    @dataclass
    class Params(WhiteboxParams):
        steps: int = 5000
        init: str = "gray"
        corpus_file: str | None = None
        targets_per_step: int = 8
        prompt: str = ""  # the optimisation prompt's text (the paper: none)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.targets_per_step < 1:
                raise ValueError("targets_per_step must be at least 1")

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        self.corpus, self.corpus_sha = load_corpus(params.corpus_file)
        self.record: dict[str, Any] | None = None

    def cost(self) -> str:
        return (f"{self.params.steps} optimisation passes (forward and backward through the evaluated model, "
                f"{self.params.targets_per_step} corpus targets each) once per model and defense: one universal image, "
                "cached and reused for every sample")

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "corpus_sha256": self.corpus_sha, "corpus_lines": len(self.corpus),
                "corpus": self.params.corpus_file or "bundled harmless affirmative corpus"}

    def draw(self, step: int, gen: torch.Generator) -> list[tuple[str, str, Any]]:
        """This step's rows: `targets_per_step` corpus lines drawn without replacement (with
        replacement when the corpus is smaller)."""
        k = self.params.targets_per_step
        n = len(self.corpus)
        idx = torch.randperm(n, generator=gen)[:k].tolist() if k <= n else torch.randint(0, n, (k,), generator=gen).tolist()
        return [(self.params.prompt, self.corpus[i], "target") for i in idx]

    def universal(self, seed: int) -> dict[str, Any]:
        """The universal image's record: from the cache, or optimised now (once per run and defense)."""
        objective = self.ready()
        item_seed = self.seed_for(seed, "universal")
        u0 = self.clean_image(objective.pipeline, None, item_seed)
        parts = self.key_parts(item_seed, corpus=self.corpus_sha, clean=u_digest(u0))
        entry = store.Entry.at(self.cache_root(), "visual_adv", parts)
        if entry.done():
            return {**entry.load_result(self.params.eps)[1], "cache": "hit"}
        (rec,) = optimise(objective, [Item(entry, u0, self.params.prompt, self.draw, item_seed)], self.budget(),
                          bool(getattr(self.context, "progress", False)), desc=f"visual_adv {self._through or 'transfer'}")
        return {**rec, "cache": "resumed" if rec.get("resumed_from_step") else "optimised"}

    def apply_batch(self, samples: list[Sample], seed: int) -> list[Sample]:
        if not samples:
            return []
        key = (id(self.objective), seed)
        if self.record is None or self.record.get("_for") != key:
            self.record = {**self.universal(seed), "_for": key}
        rec = self.record
        fields = {k: rec.get(k) for k in ("key", "image", "sha256", "eps", "step", "steps", "random_start", "linf",
                                          "final_loss", "cache")}
        return [self.attacked(s, s.text, png_loader(rec["image"]), {"through": self._through, "universal": True,
                                                                      **fields}) for s in samples]
