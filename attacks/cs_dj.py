"""CS-DJ (CVPR 2025): content split and distraction.

Recipe (shared/specs/attacks.md, CS-DJ; TeamPigeonLab/CS-DJ 4577b05):

1. Split: an LLM (Qwen/Qwen2.5-3B-Instruct; T=1, 200 tokens) breaks the request into 3
   sub-questions, retried until it gives 3 (here at most `split_retries` times, then the rule
   below, recorded as `split: rule-fallback`). `splitter=rule` is the harness's deterministic
   stand-in: the request's words cut into three consecutive pieces of near-equal length.
2. Each sub-question is drawn red on white, 50 pt, 500 px wide, 60 px per line. The paper's font
   (Super Moods) is not shipped: Liberation Sans (tasks/fonts) stands in; `font=` takes a path to
   the original. Lines wrap while
   the measured width stays <= 480, are centred, start 10 px down, and the canvas is
   60 x lines + 20 high (the layout of OmniSafeBench-MM's port, at the recipe's sizes).
3. Distractors: a seeded sample of `num_images` (100) pictures of `distractor_folder=` (the paper:
   LLaVA-CC3M-Pretrain-595K; without a folder the harness's generated stand-in set), embedded with
   CLIP (`clip=`, sentence-transformers/clip-ViT-L-14). Greedily pick 15 that minimise the mean
   cosine to {request embedding} + the pictures picked so far (picked ones are not excluded, as in
   the release); the first 9 are used. `clip=none`: 9 distinct pictures drawn at random from the
   per-sample seed instead (a harness choice, recorded as `selection: random`).
4. Grid: 12 cells, the 9 distractors then the 3 sub-questions as #10-12; each picture is shrunk
   (PIL thumbnail) into 500x500 white, centred, with its number below (20 pt black; a cell is
   500x530); 3 per row, giving 1500x2120.
5. Text: a teacher's problem pictures; solve pictures 10, 11 and 12, the rest are optional. Both
   prompts are the harness's own wording of that structure (attacks/data/cs_dj.json);
   `prompt_file=` and `split_prompt_file=` (with `{query}`) replace them.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from attacks._pictures import Picture, pictures
from attacks._textimg import FontRef, font_ref
from harness.contracts.attack import Attack, attack_seed
from harness.contracts.backend import Backend, GenerationParams, user_request
from harness.errors import DataError, ModelLoadError
from harness.registry import attack
from harness.schema import Sample

RULE = "rule"
DEFAULT_SPLITTER = "Qwen/Qwen2.5-3B-Instruct"
DEFAULT_CLIP = "sentence-transformers/clip-ViT-L-14"
FONT = "LiberationSans-Regular.ttf"  # stands in for Super Moods.ttf (font= takes a path to it)
TEXT_WIDTH, TEXT_SIZE, LINE_HEIGHT, TEXT_MARGIN = 500, 50, 60, 10
RED, WHITE, BLACK = (255, 0, 0), (255, 255, 255), (0, 0, 0)
CELL, NUMBER_SIZE, PER_ROW = 500, 20, 3
CELL_HEIGHT = CELL + NUMBER_SIZE + 10
GREEDY_PICKS, DISTRACTORS, SUBQUESTIONS = 15, 9, 3
SPLIT_TOKENS, SPLIT_TEMPERATURE = 200, 1.0
_NUMBERED = re.compile(r"^\s*(\d+)\s*[.)]\s*(.+?)\s*$")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise DataError(f"cs_dj {what} {path!r}: {exc.strerror or exc}") from None


def rule_split(query: str, parts: int = SUBQUESTIONS) -> list[str]:
    """The request's words in `parts` consecutive pieces, the earlier ones one word longer when uneven."""
    words = query.split()
    base, extra = divmod(len(words), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(" ".join(words[start:end]))
        start = end
    return out


def parse_subquestions(reply: str) -> list[str]:
    """The numbered items ("1. ...", "2) ...") of an LLM reply, in order."""
    return [m.group(2) for line in reply.splitlines() if (m := _NUMBERED.match(line))]


def greedy_distractors(query: torch.Tensor, images: torch.Tensor, picks: int = GREEDY_PICKS) -> list[int]:
    """Indices of `picks` images, each minimising the mean cosine to the query and the images
    picked before it (first index on ties; picked images stay candidates, as in the release)."""
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    cand = unit(images.double())
    chosen: list[torch.Tensor] = [unit(query.double().reshape(-1))]
    out: list[int] = []
    for _ in range(picks):
        mean_cos = (torch.stack(chosen) @ cand.T).mean(dim=0)
        idx = int(torch.argmin(mean_cos))
        out.append(idx)
        chosen.append(cand[idx])
    return out


def render_text(text: str, font_ref_: FontRef | None = None) -> Image.Image:
    """A sub-question in red on white: 500 wide, wrapped at 480 px, 60 px per centred line."""
    font = (font_ref_ or font_ref(FONT)).at(TEXT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if measure.textlength(trial, font=font) <= TEXT_WIDTH - 2 * TEXT_MARGIN or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    image = Image.new("RGB", (TEXT_WIDTH, len(lines) * LINE_HEIGHT + 2 * TEXT_MARGIN), WHITE)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        width = draw.textlength(line, font=font)
        draw.text(((TEXT_WIDTH - width) // 2, TEXT_MARGIN + i * LINE_HEIGHT), line, fill=RED, font=font)
    return image


def cell(image: Image.Image, number: int, font_ref_: FontRef | None = None) -> Image.Image:
    """One grid cell: the picture shrunk into 500x500 white, centred, its number below (500x530)."""
    image = image.convert("RGB")
    image.thumbnail((CELL, CELL))
    out = Image.new("RGB", (CELL, CELL_HEIGHT), WHITE)
    out.paste(image, ((CELL - image.width) // 2, (CELL - image.height) // 2))
    draw = ImageDraw.Draw(out)
    font = (font_ref_ or font_ref(FONT)).at(NUMBER_SIZE)
    label = str(number)
    draw.text(((CELL - draw.textlength(label, font=font)) // 2, CELL + NUMBER_SIZE // 2), label, fill=BLACK, font=font)
    return out


def grid(images: list[Image.Image], font_ref_: FontRef | None = None) -> Image.Image:
    """Cells numbered from 1, three per row (12 pictures: 1500x2120)."""
    rows = (len(images) + PER_ROW - 1) // PER_ROW
    canvas = Image.new("RGB", (CELL * PER_ROW, CELL_HEIGHT * rows), WHITE)
    for i, image in enumerate(images):
        canvas.paste(cell(image, i + 1, font_ref_), ((i % PER_ROW) * CELL, (i // PER_ROW) * CELL_HEIGHT))
    return canvas


def load_clip(name: str, device: str | None) -> Any:
    """A CLIP embedder; a sentence-transformers CLIP repository keeps the model in 0_CLIPModel/."""
    from harness.models.clip import ClipEmbedder

    try:
        return ClipEmbedder(name, device, purpose="CS-DJ distractor selection")
    except ModelLoadError as first:
        try:
            return ClipEmbedder(name, device, purpose="CS-DJ distractor selection", subfolder="0_CLIPModel")
        except ModelLoadError:
            raise first from None


@attack("cs_dj")
class CSDJ(Attack):
    """CS-DJ: 3 sub-questions as red typography after 9 CLIP-chosen distractor pictures, in one grid."""

    @dataclass(frozen=True)
    class Params:
        splitter: str = DEFAULT_SPLITTER  # a model spec (`;` for `,`), or "rule"
        split_retries: int = 10
        split_prompt_file: str | None = None  # replaces the split prompt; {query} is the request
        prompt_file: str | None = None  # replaces the teacher prompt (the text sent)
        distractor_folder: str | None = None  # None: the generated stand-in pictures
        num_images: int = 100
        clip: str | None = DEFAULT_CLIP  # none: seeded random distractors
        clip_device: str | None = None
        font: str = FONT  # a bundled font name or a path (e.g. the paper's Super Moods.ttf)

        def __post_init__(self) -> None:
            if self.split_retries < 1:
                raise ValueError(f"split_retries must be >= 1, got {self.split_retries}")
            if self.num_images < 1:
                raise ValueError(f"num_images must be >= 1, got {self.num_images}")
            if not self.splitter.strip():
                raise ValueError("splitter must name a model, or be 'rule'")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        raw = resources.files("attacks").joinpath("data", "cs_dj.json").read_bytes()
        data = json.loads(raw)
        split = _read(params.split_prompt_file, "split_prompt_file") if params.split_prompt_file else None
        teacher = _read(params.prompt_file, "prompt_file") if params.prompt_file else None
        self.split_prompt = split.decode() if split else data["split_prompt"]["text"]
        self.prompt = teacher.decode().strip() if teacher else data["teacher_prompt"]["text"]
        if "{query}" not in self.split_prompt:
            raise DataError(f"cs_dj split_prompt_file {params.split_prompt_file!r} has no {{query}} placeholder")
        self.prompts_sha256 = hashlib.sha256(raw + (split or b"") + (teacher or b"")).hexdigest()
        self.use_llm = params.splitter.strip() != RULE
        self.calls_per_sample = 1 if self.use_llm else 0  # at least; a malformed reply is retried
        self.font = font_ref(params.font)
        self.pictures: list[Picture] = pictures(params.distractor_folder, "cs_dj distractor_folder")
        self._llm: Backend | None = None
        self._clip: Any = None
        self._pools: dict[int, tuple[list[Picture], torch.Tensor | None]] = {}

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"spec": self.spec, "prompts_sha256": self.prompts_sha256, **self.font.record(),
                                 "distractors": self.params.distractor_folder or "stand-in",
                                 "splitter": {"spec": self.params.splitter}, "clip": {"model": self.params.clip}}
        if self._llm is not None:  # what was loaded (absent when a resumed run had nothing left to attack)
            ident["splitter"] = {"spec": self.params.splitter, **self._llm.identity()}
        if self._clip is not None:
            ident["clip"] = self._clip.identity()
        return ident

    # ---- split ----------------------------------------------------------------------------------
    def _splitter(self) -> Backend:
        if self._llm is None:
            from attacks._llm import load_helper_llm

            self._llm = load_helper_llm(self.params.splitter)
        return self._llm

    def split(self, query: str, seed: int) -> tuple[list[str], dict[str, Any]]:
        if not self.use_llm:
            return rule_split(query), {"split": "rule"}
        llm = self._splitter()
        request = user_request(self.split_prompt.replace("{query}", query))
        for attempt in range(1, self.params.split_retries + 1):
            params = GenerationParams(max_new_tokens=SPLIT_TOKENS, do_sample=True, temperature=SPLIT_TEMPERATURE,
                                      seed=(seed + attempt) % 2**31)
            (completion,) = llm.generate([request], params)
            if completion.error:
                raise RuntimeError(f"cs_dj splitter {self.params.splitter!r} failed: {completion.error}")
            parts = parse_subquestions(completion.text)
            if len(parts) == SUBQUESTIONS:
                return parts, {"split": "llm", "split_attempts": attempt}
        return rule_split(query), {"split": "rule-fallback", "split_attempts": self.params.split_retries}

    # ---- distractors ----------------------------------------------------------------------------
    def _pool(self, seed: int) -> tuple[list[Picture], torch.Tensor | None]:
        """The run's seeded sample of `num_images` pictures, with their CLIP embeddings (once per seed)."""
        if seed not in self._pools:
            order = list(self.pictures)
            random.Random(attack_seed(seed, self.spec, "\x00distractor-pool")).shuffle(order)
            pool = order[: self.params.num_images]
            embeddings = None
            if self.params.clip:
                if self._clip is None:
                    self._clip = load_clip(self.params.clip, self.params.clip_device)
                embeddings = self._clip.embed_images([p.load() for p in pool])
            self._pools[seed] = (pool, embeddings)
        return self._pools[seed]

    def distractors(self, query: str, seed: int, rng: random.Random) -> tuple[list[Picture], dict[str, Any]]:
        pool, embeddings = self._pool(seed)
        if embeddings is None:
            if len(pool) >= DISTRACTORS:
                idx = rng.sample(range(len(pool)), DISTRACTORS)
            else:
                idx = [rng.randrange(len(pool)) for _ in range(DISTRACTORS)]
            return [pool[i] for i in idx], {"selection": "random", "pool_size": len(pool)}
        picks = greedy_distractors(self._clip.embed_texts([query])[0], embeddings)
        return [pool[i] for i in picks[:DISTRACTORS]], {
            "selection": "clip-greedy", "pool_size": len(pool), "clip": self.params.clip,
            "greedy_picks": [pool[i].name for i in picks]}

    def apply(self, sample: Sample, seed: int) -> Sample:
        sample_seed = attack_seed(seed, self.spec, sample.id)
        rng = random.Random(sample_seed)
        query = sample.query
        subquestions, split_record = self.split(query, sample_seed)
        chosen, choice_record = self.distractors(query, seed, rng)
        font = self.font
        record: dict[str, Any] = {"sub_questions": subquestions, **split_record,
                                  "distractors": [p.name for p in chosen], **choice_record}
        if self.use_llm:
            record["splitter"] = self.params.splitter

        def render() -> Image.Image:
            return grid([p.load() for p in chosen] + [render_text(q, font) for q in subquestions], font)

        return self.attacked(sample, self.prompt, render, record)
