"""A tiny byte-level BPE tokenizer and chat template, trained in code so nothing is downloaded.

Random-weight models only need a tokenizer that round-trips any text and knows the
architecture's special tokens; a 512-entry byte-level BPE learned from a few hundred generated
sentences does that in a few milliseconds, and byte-level coverage means no input is ever
unknown. Training is deterministic, so the same corpus gives the same `tokenizer.json`.
"""

from __future__ import annotations

import itertools
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
VOCAB_SIZE = 512

_SUBJECTS = ("the cat", "a small robot", "the red car", "my neighbour", "a tall tree", "the old map",
             "this picture", "the chart", "a blue bird", "the kitchen", "the student", "a doctor")
_VERBS = ("shows", "describes", "contains", "explains", "hides", "points to", "looks like", "answers")
_OBJECTS = ("a sunny street.", "three apples.", "the safety rules.", "a question about science.",
            "how to cook rice.", "an empty room.", "the answer B.", "a list of steps.",
            "a warning sign.", "numbers from one to ten.")
_EXTRA = ("What is in the image?", "Answer with the letter of the correct option.",
          "I cannot help with that request.", "Sure, here are the steps:", "Is this image safe?",
          "Describe the image in detail.", "Yes.", "No.", "A) 1 B) 2 C) 3 D) 4", "0123456789 +-*/=?!")


def training_corpus() -> list[str]:
    """A few hundred plain sentences: every subject-verb-object combination plus fixed phrases."""
    sentences = [f"{s} {v} {o}" for s, v, o in itertools.product(_SUBJECTS, _VERBS, _OBJECTS)]
    sentences += [s.capitalize() for s in sentences[::7]]
    return sentences + list(_EXTRA)


def train_tokenizer(
    special_tokens: list[str],
    named_tokens: dict[str, str] | None = None,
    corpus: Iterable[str] | None = None,
    vocab_size: int = VOCAB_SIZE,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with pad/bos/eos, role markers and the architecture's special tokens.

    `named_tokens` become tokenizer attributes (e.g. `image_token="<image>"`), which processors
    such as Qwen2-VL's read instead of hard-coded defaults. `corpus` and `vocab_size` replace the
    generated sentences and the 512 entries: speed benchmarks need a tokenizer that spends about
    as many tokens per English word as a real one (~1.3), because a defense prompt's cost is its
    length in tokens, and the 512-entry one spends ~3.
    """
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    specials += [t for t in special_tokens if t not in specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus() if corpus is None else corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="left",
        extra_special_tokens=[t for t in specials if t not in (PAD, BOS, EOS)],
        model_max_length=4096,
        **(named_tokens or {}),
    )


def chat_template(image_placeholder: str) -> str:
    """One jinja template for every tiny model; only the image placeholder differs.

    Content may be a plain string or a list of typed parts; each `{"type": "image"}` part
    becomes the placeholder that the architecture's processor expands into image tokens.
    Each turn ends with EOS, so a model that learned the format would stop there.
    """
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|' + message['role'] + '|>' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{- '" + image_placeholder + "' -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- eos_token + '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
    )
