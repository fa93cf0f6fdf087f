"""ETA's alignment step: sentence-level best-of-N on the target model (HF backend only).

After the forced prefix ("As an AI assistant"), the answer is grown one sentence at a time. At
sentence t the target samples N candidate sentences (N = 5), each token drawn from the top-k
(k = 5) of softmax(logits / 1.5); a candidate ends at a full stop, at EOS, or after 70 tokens.
Each candidate is scored by the reward model on prefix + answer so far + candidate, plus, for
t > 1 and only when no candidate reached EOS, (1/t) times the CLIP cosine of the image and the
candidate sentence; the best (first on ties) is kept and the next sentence starts after it. The
answer stops when the kept candidate ends with EOS or the token budget is spent.

How it runs here (the simplest correct way, and why):
- One `model.generate` call per sentence, over N identical rows (prompt + prefix + kept tokens,
  encoded once per sample by the backend's own processor, so images are expanded exactly as in
  any other call; later sentences append token ids, never re-tokenized text). Identical rows need
  no padding, so each row is the single-sample computation.
- Sampling is a logits processor that draws from the top-k with its own `torch.Generator`, seeded
  from (seed, sample id, sentence index), and leaves only the drawn token: decoding is otherwise
  the backend's greedy configuration (same generation config as the first answer). So a sample's
  candidates do not depend on the batch it came in or on the global RNG.
- "Full stop" is tokenizer-generic: every token whose decoded string ends in "." (the public
  code checks LLaMA's id 29889 alone; with LLaMA's vocabulary this also ends at tokens such as
  "▁." or "Mr."). EOS is the generation config's EOS id(s).
- Cost: the public code keeps the chosen candidate's KV cache; this re-prefills prompt + answer so
  far for the N rows at every sentence, i.e. about N x (prompt + answer) extra prefill tokens per
  sentence on top of the N x sentence-length decoded tokens (about 5x the decoding of a plain
  answer, as the spec says, plus the prefills). Exactness over speed: both give the same
  distribution; a KV-cache version would need per-architecture position handling.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from harness.contracts.backend import GenerationParams, Request


def derived_seed(seed: int, sample_id: str, step: int) -> int:
    """A 63-bit seed for one sentence of one sample: independent of batch, order and the global RNG."""
    digest = hashlib.sha256(f"eta:{seed}:{sample_id}:{step}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class _TopKDraw(LogitsProcessor):
    """Draw the next token from the top-k of softmax(logits / temperature); leave only it (0, others -inf)."""

    def __init__(self, top_k: int, temperature: float, generator: torch.Generator) -> None:
        self.top_k, self.temperature, self.generator = top_k, temperature, generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        values, idx = torch.topk(scores.float(), min(self.top_k, scores.shape[-1]), dim=-1)
        probs = torch.softmax(values / self.temperature, dim=-1).cpu()
        pick = torch.multinomial(probs, 1, generator=self.generator).to(idx.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, idx.gather(-1, pick), 0.0)


class _StopAt(StoppingCriteria):
    """Per row: stop once the last token is a sentence end."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = torch.tensor(sorted(ids), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.isin(input_ids[:, -1], self.ids.to(input_ids.device))


@dataclass
class Candidate:
    """One sampled sentence: its token ids, text, why it ended (`period`, `eos`, `length`) and its scores."""

    ids: list[int]
    text: str
    end: str
    rm: float | None = None
    clip: float | None = None
    score: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "ids": self.ids, "tokens": len(self.ids), "end": self.end,
                "rm": self.rm, "clip": self.clip, "score": self.score}


@dataclass
class Aligned:
    """The aligned answer of one sample and its record: every sentence's candidates and choice."""

    text: str
    kept_ids: list[int]
    steps: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "budget"
    generated: int = 0  # tokens decoded over all candidates
    target_calls: int = 0
    rm_calls: int = 0
    clip_calls: int = 0


class SentenceSampler:
    """Draws N candidate sentences from an HF backend's model after a given answer prefix."""

    def __init__(self, backend: Any, n: int, top_k: int, temperature: float, sentence_max_tokens: int) -> None:
        self.backend, self.n, self.top_k = backend, n, top_k
        self.temperature, self.sentence_max_tokens = temperature, sentence_max_tokens
        config = backend.generation_config(GenerationParams(max_new_tokens=1))
        eos = config.eos_token_id
        self.eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        self.period_ids = period_ids(backend.tokenizer)

    def encode(self, request: Request) -> dict[str, torch.Tensor]:
        """The request encoded as N identical rows (no padding)."""
        return self.backend.encode([request] * self.n)

    def ids(self, text: str) -> list[int]:
        return list(self.backend.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.backend.tokenizer.decode(ids, skip_special_tokens=True)

    def sample(self, base: dict[str, torch.Tensor], so_far: list[int], max_new: int, seed: int) -> list[Candidate]:
        """N candidate sentences continuing `base` + `so_far` (token ids), at most `max_new` tokens each."""
        inputs = _append(base, so_far)
        width = inputs["input_ids"].shape[1]
        config = self.backend.generation_config(GenerationParams(max_new_tokens=max_new))
        draw = _TopKDraw(self.top_k, self.temperature, torch.Generator().manual_seed(seed))
        stops = self.period_ids + self.eos_ids
        with torch.inference_mode():
            out = self.backend.model.generate(**inputs, generation_config=config,
                                              logits_processor=LogitsProcessorList([draw]),
                                              stopping_criteria=StoppingCriteriaList([_StopAt(stops)]))
        out_rows: list[Candidate] = []
        for row in out[:, width:].cpu().tolist():
            cut = next((i for i, tok in enumerate(row) if tok in stops), None)
            ids = row if cut is None else row[: cut + 1]
            end = "length" if cut is None else ("eos" if row[cut] in self.eos_ids else "period")
            out_rows.append(Candidate(ids, self.decode(ids), end))
        return out_rows


def period_ids(tokenizer: Any) -> list[int]:
    """Ids of the (non-special) tokens whose decoded string ends in "." (LLaMA: 29889 among others)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    return [i for i, t in zip(ids, texts) if t.endswith(".")]


def _append(base: dict[str, torch.Tensor], ids: list[int]) -> dict[str, torch.Tensor]:
    """`base` with `ids` appended to every row: attention 1, token-type tensors (e.g. Qwen2-VL's
    `mm_token_type_ids`) 0 (text); image tensors unchanged."""
    if not ids:
        return dict(base)
    rows, width = base["input_ids"].shape
    new = torch.tensor([ids] * rows, dtype=base["input_ids"].dtype, device=base["input_ids"].device)
    out = {}
    for key, value in base.items():
        if key == "input_ids":
            out[key] = torch.cat([value, new], dim=1)
        elif value.dim() == 2 and tuple(value.shape) == (rows, width) and not value.is_floating_point():
            fill = torch.ones_like(new) if key == "attention_mask" else torch.zeros_like(new)
            out[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
        else:
            out[key] = value
    return out


def _once(score: Callable[[list[str]], list[float]], texts: list[str]) -> list[float]:
    """Score each distinct text once: identical candidates (frequent with top-k sampling) get identical
    scores, so a tie goes to the first of them whatever rounding a batch row position brings."""
    distinct = list(dict.fromkeys(texts))
    values = dict(zip(distinct, score(distinct)))
    return [values[t] for t in texts]


def best_of_n(sampler: SentenceSampler, base: dict[str, torch.Tensor], prefix_ids: list[int], budget: int,
              seed_for: Callable[[int], int], rm: Callable[[list[str]], list[float]],
              clip: Callable[[list[str]], list[float]] | None) -> Aligned:
    """Grow the answer sentence by sentence from `prefix_ids`, keeping the best-scored candidate.

    `rm(texts)` rewards the whole answers (prefix + so far + candidate); `clip(sentences)` is the CLIP
    cosine of the image with each candidate sentence, None for a sample without an image.
    """
    result = Aligned(text="", kept_ids=[])
    t = 0
    while len(result.kept_ids) < budget:
        t += 1
        cands = sampler.sample(base, prefix_ids + result.kept_ids,
                               min(sampler.sentence_max_tokens, budget - len(result.kept_ids)), seed_for(t))
        result.target_calls += 1
        result.generated += sum(len(c.ids) for c in cands)
        rewards = _once(rm, [sampler.decode(prefix_ids + result.kept_ids + c.ids) for c in cands])
        result.rm_calls += 1
        clip_term = clip is not None and t > 1 and not any(c.end == "eos" for c in cands)
        cosines = _once(clip, [c.text for c in cands]) if clip_term and clip is not None else None
        result.clip_calls += int(cosines is not None)
        for i, c in enumerate(cands):
            c.rm = rewards[i]
            c.clip = cosines[i] if cosines is not None else None
            c.score = c.rm + (c.clip / t if c.clip is not None else 0.0)
        best = max(range(len(cands)), key=lambda i: cands[i].score)  # type: ignore[arg-type,return-value]
        result.kept_ids += cands[best].ids
        result.steps.append({"t": t, "clip_term": clip_term, "candidates": [c.to_json() for c in cands],
                             "chosen": best})
        if cands[best].end == "eos":
            result.stopped = "eos"
            break
    result.text = sampler.decode(prefix_ids + result.kept_ids)
    return result
