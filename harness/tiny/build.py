"""Build tiny random-weight VLMs of real architectures into a folder, offline, in well under a second.

The folders look like hub checkpoints (config.json, model.safetensors, generation_config.json,
tokenizer and processor files), so everything downstream (the HF backend, steering, lm-eval)
exercises the same code paths as with a real model; only the sizes are tiny and the weights
random. Same seed, same bytes: fixtures and the demo are reproducible.

Qwen2-VL and loading in a fresh process
---------------------------------------
`Qwen2VLProcessor` declares a video processor, and every video processor in transformers 5.x
needs torchvision, which this project must not install (it fails to import beside a CPU torch). The builder builds
the processor as `video_free(Qwen2VLProcessor)` (from `harness.models.hf`), a generated subclass
without the video slot, saved under its own name `Qwen2VLProcessorNoVideo`, and importing this
module registers that class with `AutoProcessor.register`.

Can plain `AutoProcessor.from_pretrained(folder)` load such a folder in a fresh process that never
imported `harness`? No (checked with transformers 5.23). transformers resolves the saved
`processor_class` only among its own classes and those registered in the running process; an
unknown name makes it fall back, silently, to the bare tokenizer (with or without torchvision).
Saving the real name `Qwen2VLProcessor` instead would make the loader ask `AutoVideoProcessor`,
which raises without torchvision, and would defeat the in-process registration (a built-in name
resolves first). `auto_map` custom code would need `trust_remote_code`. The one plain route found:
name an unrelated video-less processor that expands image tokens alike; `PaddleOCRVLProcessor`
gives identical encodings today, but it misdescribes the checkpoint and would break silently if
either class drifts, so it is not done.
Real Qwen2-VL checkpoints hit the same wall on a machine without torchvision, so the fix lives
where every model is loaded: `harness.models.hf_loading.load_processor` notices the missing image
processor and reloads with the video-free subclass. `realign run --model <folder>` (and
`HFBackend`) therefore work in a fresh process; tests/test_tiny_models.py checks that.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import (
    AutoProcessor,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.utils import logging as hf_logging

from harness.models.hf_loading import video_free
from harness.tiny.tokenizer import BOS, EOS, PAD, chat_template, train_tokenizer

TINY_ARCHS: tuple[str, ...] = ("llava", "qwen2_vl", "idefics3")

# Sizes that build for every architecture here: big enough to exercise every code path, small enough for < 1 s.
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
IMAGE_PX, PATCH = 28, 7


def build_tiny_vlm(arch: str, out_dir: str | Path, seed: int = 0, text: dict[str, int] | None = None,
                   tokenizer: dict[str, Any] | None = None) -> Path:
    """Write a tiny random VLM of `arch` (one of TINY_ARCHS) to `out_dir` and return the folder.

    The folder loads with `AutoModelForImageTextToText.from_pretrained` and (for Qwen2-VL see
    the module docstring) `AutoProcessor.from_pretrained`. `text` overrides the language model's
    sizes (e.g. `{"hidden_size": 512, "num_hidden_layers": 8}` for speed benchmarks where model
    compute must dominate). `tokenizer` holds keyword arguments for `train_tokenizer` (`corpus`,
    `vocab_size`): the vocabulary, and so the embedding size, follows the tokenizer.
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny architecture {arch!r}; valid: {', '.join(TINY_ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = _BUILDERS[arch](seed, dict(TEXT, **(text or {})), tokenizer or {})
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tok.convert_tokens_to_ids(BOS),
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
    )
    with _quiet():
        model.save_pretrained(out)
    processor.save_pretrained(out)
    _write_readme(out, arch, seed)
    return out


def _text_config(tok: Any, text: dict[str, int], **extra: Any) -> dict[str, Any]:
    return dict(
        text,
        vocab_size=len(tok),
        bos_token_id=tok.convert_tokens_to_ids(BOS),
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        **extra,
    )


def _init(model_cls: type, config: Any, seed: int) -> torch.nn.Module:
    """Random weights from a fixed seed, without touching the caller's RNG state; float32 so the
    saved bytes do not depend on torch's default dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    return model.eval()


@contextmanager
def _quiet() -> Iterator[None]:
    """No "Writing model shards" progress bar for a 1 MB file (the demo prints its own output)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _llava(seed: int, text: dict[str, int], tok_args: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tok = train_tokenizer(["<image>"], {"image_token": "<image>"}, **tok_args)
    config = LlavaConfig(
        text_config=dict(_text_config(tok, text), model_type="llama"),
        vision_config=dict(
            VISION, model_type="clip_vision_model", image_size=IMAGE_PX, patch_size=PATCH, projection_dim=32
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_PX // PATCH) ** 2,
        vision_feature_layer=-1,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template("<image>"),
    )
    return _init(LlavaForConditionalGeneration, config, seed), processor


def _qwen2_vl(seed: int, text: dict[str, int], tok_args: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import Qwen2VLImageProcessorPil

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = train_tokenizer(specials, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}, **tok_args)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # mrope_section splits head_dim/2 rotary frequencies over (time, height, width).
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    assert sum(rope["mrope_section"]) == head_dim // 2
    config = Qwen2VLConfig(
        text_config=_text_config(tok, text, rope_parameters=rope),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=text["hidden_size"], mlp_ratio=2, num_heads=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    # Every image is resized to about 56x56 px (aspect kept, sides multiples of 28): 4-6 image tokens.
    pixels = 56 * 56
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = video_free(Qwen2VLProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    return _init(Qwen2VLForConditionalGeneration, config, seed), processor


def _idefics3(seed: int, text: dict[str, int], tok_args: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    specials = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *grid]
    tok = train_tokenizer(specials, {"image_token": "<image>"}, **tok_args)
    scale = 2
    config = Idefics3Config(
        text_config=dict(_text_config(tok, text), model_type="llama"),
        vision_config=dict(VISION, image_size=IMAGE_PX, patch_size=PATCH),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
    )
    # No splitting: each image is one 28 px tile -> (28/7)^2 / 2^2 = 4 image tokens.
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_PX}, max_image_size={"longest_edge": IMAGE_PX}, do_image_splitting=False
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=(IMAGE_PX // PATCH) ** 2 // scale**2,
        chat_template=chat_template("<image>"),
    )
    return _init(Idefics3ForConditionalGeneration, config, seed), processor


def register_processors() -> None:
    """Let plain `AutoProcessor.from_pretrained` load tiny Qwen2-VL folders in this process.

    The saved `processor_class` is the video-free subclass's name, which transformers finds
    among registered processors by name. Real checkpoints name `Qwen2VLProcessor`, which
    resolves to the built-in class first, so this registration never changes how they load.
    """
    AutoProcessor.register(Qwen2VLConfig, video_free(Qwen2VLProcessor), exist_ok=True)


register_processors()

_BUILDERS: dict[str, Callable[[int, dict[str, int], dict[str, Any]], tuple[Any, Any]]] = {
    "llava": _llava,
    "qwen2_vl": _qwen2_vl,
    "idefics3": _idefics3,
}


def _write_readme(out: Path, arch: str, seed: int) -> None:
    """A note for whoever finds the folder: random weights, never a real model."""
    (out / "README.md").write_text(
        f"# tiny-{arch} (random weights)\n\nBuilt by `harness.tiny.build_tiny_vlm({arch!r}, seed={seed})` "
        "for offline tests and the `realign demo`. Its outputs are meaningless.\n"
    )
    (out / "tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}, sort_keys=True) + "\n")
