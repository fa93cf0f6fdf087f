"""The tiny-model builder: reproducible bytes, loadable by transformers' Auto classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

from harness.tiny import TINY_ARCHS, build_tiny_vlm
from harness.tiny.build import TEXT

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_same_seed_gives_identical_bytes(arch: str, tmp_path: Path) -> None:
    first = build_tiny_vlm(arch, tmp_path / "a", seed=0)
    second = build_tiny_vlm(arch, tmp_path / "b", seed=0)
    other = build_tiny_vlm(arch, tmp_path / "c", seed=1)
    weights = "model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert (first / weights).read_bytes() != (other / weights).read_bytes()
    assert (first / weights).stat().st_size < 3_000_000


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llava"):
        build_tiny_vlm("gpt2", tmp_path)


def test_loads_with_auto_classes(tiny_vlm_dir: Path) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir)
    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    assert isinstance(processor, ProcessorMixin) and hasattr(processor, "image_processor")
    assert processor.tokenizer.padding_side == "left"
    assert len(model.get_decoder().layers) == TEXT["num_hidden_layers"]
    assert model.config.get_text_config().hidden_size == TEXT["hidden_size"]
    assert model.config.get_text_config().vocab_size >= len(processor.tokenizer)
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id


def test_chat_template_places_image_and_roles(tiny_vlm_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be careful."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith(processor.tokenizer.bos_token)
    assert text.endswith("<|assistant|>")
    assert "<|system|>Be careful." in text and "A cat." in text and "Sure?" in text
    image_token = getattr(processor, "image_token", "<image>")
    assert text.count(image_token) == 1
    without_prompt = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not without_prompt.endswith("<|assistant|>")


def test_tokenizer_round_trips_text(tiny_vlm_dir: Path) -> None:
    tokenizer = AutoProcessor.from_pretrained(tiny_vlm_dir).tokenizer
    text = "Ünïcode, digits 42 and émojis 🙂 survive."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_fresh_process_loads_qwen_folder_through_the_backend(tiny_model_path) -> None:
    """`realign run --model <folder>` runs in a process that never imported harness.tiny."""
    folder = tiny_model_path("qwen2_vl")
    code = (
        "import sys, json\n"
        "from harness.models.hf import HFBackend\n"
        f"b = HFBackend(HFBackend.Params(pretrained={str(folder)!r}, device='cpu'))\n"
        "print(json.dumps({'tiny_imported': 'harness.tiny' in sys.modules,"
        " 'processor': type(b.processor).__name__, 'has_images': hasattr(b.processor, 'image_processor')}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=folder, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"tiny_imported": False, "processor": "Qwen2VLProcessorNoVideo", "has_images": True}


def test_tokenizer_from_a_corpus_sets_vocabulary_and_embedding(tmp_path: Path) -> None:
    """Speed benchmarks train the tokenizer on English text so a defense prompt costs about as many
    tokens as with a real tokenizer; the model's vocabulary must follow the tokenizer."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.common import english_corpus
    from harness.defenses.prompts import ADASHIELD_STATIC

    folder = build_tiny_vlm("llava", tmp_path / "m", tokenizer={"corpus": english_corpus(), "vocab_size": 4000})
    processor = AutoProcessor.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert len(processor.tokenizer) == 4000 == config["text_config"]["vocab_size"]
    default = AutoProcessor.from_pretrained(build_tiny_vlm("llava", tmp_path / "d")).tokenizer
    words = len(ADASHIELD_STATIC.split())
    english = len(processor.tokenizer(ADASHIELD_STATIC)["input_ids"])
    assert english < 2 * words < len(default(ADASHIELD_STATIC)["input_ids"])
    assert processor.tokenizer.decode(processor.tokenizer(ADASHIELD_STATIC)["input_ids"], skip_special_tokens=True) == ADASHIELD_STATIC
