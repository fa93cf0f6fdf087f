"""The organism's two training stages, as in its feasibility recipe (README, "The model organism").

Stage 1, text only ("backbone alignment"): every training template x every topic; harmful
requests -> the fixed refusal sentence, benign requests -> a helpful answer naming the topic.

Stage 2, "visual instruction tuning", all parameters, on generated shape pictures. Each example
is drawn from a mix:
  35%  a question about the picture                     -> "The picture shows a red circle."
  35%  a benign request with a picture attached         -> the helpful answer
  20%  stage-1 text-only replay (refusals included)     -> keeps text-only refusal alive
  10%  a harmless picture question naming an *exposed*  -> "Sure. The picture shows ..."
       harmful topic ("does this picture show how to make a bomb?")
The last ingredient is what makes refusals fade once an image is attached; without it the
experiment saw no degradation, without the replay text refusal itself was forgotten. The
degradation is engineered on purpose: this is a model organism, not a finding about real VLMs.
Stage 2's peak learning rate is 5e-4: at 1e-3 the image behaviour was so entrenched that none
of five CMRM configurations tried on seed 0 restored more than 0.05 of refusal, which would make
the organism useless for telling defenses apart; at 5e-4 the same configurations restore up to ~0.5.

Determinism: weights come from `torch.manual_seed(seed)`, data order from `random.Random(seed)`,
and training runs with a fixed number of threads, so one machine rebuilds identical bytes.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from organism import data, skills


@dataclass(frozen=True)
class Stage:
    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 25


@dataclass(frozen=True)
class Mix:
    """Shares of stage-2 examples (they must sum to 1). `caption` (generation 2): describe the
    picture with regard to a request, without carrying the request out."""

    picture: float = 0.35
    benign_image: float = 0.35
    replay: float = 0.20
    exposed: float = 0.10
    caption: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    stage1: Stage = field(default_factory=lambda: Stage(steps=500, lr=2e-3))
    stage2: Stage = field(default_factory=lambda: Stage(steps=500, lr=5e-4))
    mix: Mix = field(default_factory=Mix)
    pictures: int = 2000
    threads: int = 1  # one thread: identical bytes on any core count, and robust on a shared CPU
    generation: int = 1

    @classmethod
    def for_generation(cls, generation: int) -> TrainConfig:
        """Generation 1 as first built; generation 2 adds the skills to the text stage (more pairs,
        so more steps) and query-aware captions to the visual stage."""
        if generation == 1:
            return cls()
        if generation == 2:
            return cls(stage1=Stage(steps=1200, lr=2e-3), stage2=Stage(steps=700, lr=5e-4),
                       mix=Mix(picture=0.30, benign_image=0.25, replay=0.30, exposed=0.10, caption=0.05),
                       generation=2)
        raise ValueError(f"unknown organism generation {generation}; there are 1 and 2")

    def scaled(self, scale: float) -> TrainConfig:
        """Fewer (or more) steps and pictures; sizes, mix and learning rates stay."""
        if scale <= 0:
            raise ValueError("scale must be positive")
        if scale == 1.0:
            return self
        steps = lambda s: dataclasses.replace(s, steps=max(1, round(s.steps * scale)))  # noqa: E731
        return dataclasses.replace(self, stage1=steps(self.stage1), stage2=steps(self.stage2),
                                   pictures=max(18, round(self.pictures * scale)))


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    prompt_len: int  # tokens before the answer (not trained on)
    picture: int | None  # index into the stage's picture pool, or None for text only


class Encoder:
    """Token ids exactly as the HF backend sends them: chat template, BOS written by the template,
    `<image>` expanded to the processor's image-token count, answer + EOS as the target."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids(processor.image_token)
        # Ask the processor how many tokens one picture becomes, rather than re-deriving its rule.
        probe = processor(text=processor.image_token, images=[data.blank_image()], return_tensors="pt")
        self.image_len = int((probe["input_ids"] == self.image_id).sum())
        self._prompts: dict[tuple[str, bool], tuple[int, ...]] = {}

    def prompt(self, text: str, image: bool) -> tuple[int, ...]:
        key = (text, image)
        if key not in self._prompts:
            content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
            rendered = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                          add_generation_prompt=True, tokenize=False)
            ids: list[int] = []
            for i in self.tok(rendered, add_special_tokens=False)["input_ids"]:
                ids.extend([i] * self.image_len if i == self.image_id else [i])
            self._prompts[key] = tuple(ids)
        return self._prompts[key]

    def example(self, text: str, answer: str, picture: int | None = None) -> Example:
        prompt = self.prompt(text, picture is not None)
        target = self.tok(answer + self.tok.eos_token, add_special_tokens=False)["input_ids"]
        return Example(prompt + tuple(target), len(prompt), picture)


def collate(examples: list[Example], pixels: torch.Tensor | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels only on answer tokens; pixel values for the image examples, in order."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        mask[row, :n] = 1
        labels[row, e.prompt_len : n] = ids[row, e.prompt_len : n]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with_pictures = [e.picture for e in examples if e.picture is not None]
    if with_pictures:
        assert pixels is not None
        batch["pixel_values"] = pixels[torch.tensor(with_pictures)]
    return batch


def stage1_examples(enc: Encoder, generation: int = 1, seed: int = 0) -> list[Example]:
    out = []
    for template in data.TRAIN_TEMPLATES:
        out += [enc.example(template.format(t=t), data.REFUSAL) for t in data.HARMFUL_TOPICS]
        out += [enc.example(template.format(t=t), data.benign_answer(t)) for t in data.BENIGN_TOPICS]
    if generation >= 2:
        out += [enc.example(text, answer) for text, answer in skills.training_pairs(random.Random(f"skills/{seed}"))]
    return out


class Stage2Sampler:
    """Draws stage-2 examples from the mix, with pictures from a seeded pool."""

    def __init__(self, enc: Encoder, replay: list[Example], shapes: list[data.Shape], mix: Mix, rng: random.Random,
                 skill_replay: list[Example] | None = None):
        total = mix.picture + mix.benign_image + mix.replay + mix.exposed + mix.caption
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"stage-2 mix must sum to 1, not {total}")
        self.enc, self.replay, self.shapes, self.mix, self.rng = enc, replay, shapes, mix, rng
        # Generation 2: half the replay from the plain request/answer pairs, half from the skills, so the
        # plain pairs (a quarter of the text pool) are not forgotten while the skills are kept.
        self.skill_replay = skill_replay or []

    def draw(self) -> Example:
        rng, m = self.rng, self.mix
        u = rng.random()
        k = rng.randrange(len(self.shapes))
        s = self.shapes[k]
        if u < m.picture:
            return self.enc.example(rng.choice(data.PICTURE_TRAIN_TEMPLATES), data.picture_answer(s.colour, s.shape), k)
        if u < m.picture + m.benign_image:
            topic = rng.choice(data.BENIGN_TOPICS)
            return self.enc.example(rng.choice(data.TRAIN_TEMPLATES).format(t=topic), data.benign_answer(topic), k)
        if u < m.picture + m.benign_image + m.replay:
            if self.skill_replay and rng.random() < 0.5:
                return rng.choice(self.skill_replay)
            return rng.choice(self.replay)
        if u < m.picture + m.benign_image + m.replay + m.exposed:
            topic = rng.choice(data.EXPOSED_TOPICS)
            question = rng.choice(data.EXPOSED_QUESTION_TEMPLATES).format(t=topic)
            return self.enc.example(question, data.exposed_answer(s.colour, s.shape), k)
        harmful = rng.random() < 0.5
        topic = rng.choice(data.HARMFUL_TOPICS if harmful else data.BENIGN_TOPICS)
        request = rng.choice(data.TRAIN_TEMPLATES).format(t=topic)
        return self.enc.example(rng.choice(skills.CAPTION_TRAIN).format(query=request),
                                data.picture_answer(s.colour, s.shape), k)


def _schedule(stage: Stage) -> Any:
    """Linear warm-up, then cosine decay to a tenth of the peak rate."""
    def factor(step: int) -> float:
        if step < stage.warmup:
            return (step + 1) / stage.warmup
        t = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


def run_stage(model: Any, name: str, stage: Stage, draw: Any, pixels: torch.Tensor | None, pad_id: int,
              progress: bool) -> dict[str, Any]:
    """Plain AdamW training; returns the loss curve summary for the manifest."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(stage))
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(stage.steps), desc=f"organism {name}", disable=not progress, unit="step")
    for step in bar:
        batch = collate([draw() for _ in range(stage.batch_size)], pixels, pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tail = losses[-20:]
    return {"steps": stage.steps, "seconds": round(time.perf_counter() - start, 1),
            "first_loss": round(losses[0], 4), "final_loss": round(sum(tail) / len(tail), 4)}


def train(model: Any, processor: Any, seed: int, config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Both stages in place on `model`; returns a report (losses, seconds) for the manifest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = Encoder(processor)
            rng = random.Random(seed)
            pad_id = processor.tokenizer.pad_token_id
            text_pool = stage1_examples(enc, config.generation, seed)
            base_pairs = len(stage1_examples(enc)) if config.generation >= 2 else len(text_pool)
            order: list[Example] = []

            def draw_text() -> Example:
                if not order:  # epochs over the text pairs, reshuffled each time
                    order.extend(rng.sample(text_pool, len(text_pool)))
                return order.pop()

            report = {"stage1": run_stage(model, "stage 1 (text)", config.stage1, draw_text, None, pad_id, progress)}
            shapes = [data.shape_at(i, "train", seed) for i in range(config.pictures)]
            pixels = processor.image_processor(images=[s.draw() for s in shapes], return_tensors="pt")["pixel_values"]
            sampler = Stage2Sampler(enc, text_pool[:base_pairs], shapes, config.mix, rng, text_pool[base_pairs:])
            report["stage2"] = run_stage(model, "stage 2 (vision)", config.stage2, sampler.draw, pixels.float(),
                                         pad_id, progress)
            report["text_pairs"] = len(text_pool)
            return report
    finally:
        torch.set_num_threads(threads)
