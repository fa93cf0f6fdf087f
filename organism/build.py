"""`build_organism(seed, out)`: a real LLaVA folder, trained here in two stages (see train.py).

The architecture and the files are those of any `LlavaForConditionalGeneration` checkpoint
(tiny CLIP vision tower, tiny Llama, a byte-level BPE tokenizer trained on the organism's own
sentences, the project's chat template), so the HF backend, steering hooks and every defense
run on it unchanged. Sizes are those of the recipe's feasibility experiment (README, "The model organism"): 32 px pictures
(16 image tokens), a 4-layer Llama with hidden size 128; about 1.1 M parameters, under 5 MB.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import CLIPImageProcessorPil, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.utils import logging as hf_logging

from harness.errors import RunDirError
from organism import data, skills
from organism.train import TrainConfig, train
from harness.tiny.tokenizer import BOS, EOS, PAD, chat_template, train_tokenizer

IMAGE_TOKEN = "<image>"
PATCH = 8
TOKENIZER_VOCAB = {1: 1024, 2: 1536}  # upper bounds: generation 1's corpus yields about 920 entries


@dataclass(frozen=True)
class Sizes:
    """Model sizes (the feasibility experiment: CLIP ~114 k parameters, Llama ~1 M)."""

    hidden: int = 128
    intermediate: int = 320
    layers: int = 4
    heads: int = 4
    vision_hidden: int = 64
    vision_intermediate: int = 256
    vision_layers: int = 2
    vision_heads: int = 2


#: Generation 2 learns four more skills besides generation 1's behaviour; at generation 1's width
#: the skills and the plain behaviour competed (each seed lost a different one on held-out
#: wordings), so its language model is wider (hidden 192, same depth: 4 layers).
SIZES = {1: Sizes(), 2: Sizes(hidden=192, intermediate=512)}


def make_processor(generation: int = 1) -> LlavaProcessor:
    """The tiny-model tokenizer (harness.tiny) retrained on the organism corpus, plus a 32 px CLIP processor.

    Retraining the tiny tokenizer keeps its special tokens, byte-level alphabet and left padding;
    only the merges come from the organism's sentences, so a request is a handful of tokens.
    """
    base = train_tokenizer([IMAGE_TOKEN], {"image_token": IMAGE_TOKEN})
    corpus = data.corpus() + (skills.corpus() if generation >= 2 else [])
    tok = base.train_new_from_iterator(corpus, vocab_size=TOKENIZER_VOCAB[generation])
    tok.padding_side = "left"
    px = data.IMAGE_PX
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template(IMAGE_TOKEN),
    )


def make_model(processor: LlavaProcessor, seed: int, sizes: Sizes = Sizes()) -> LlavaForConditionalGeneration:
    """Random float32 weights from `seed`, without touching the caller's RNG state."""
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = LlavaConfig(
        text_config=dict(
            model_type="llama", vocab_size=len(tok), hidden_size=sizes.hidden,
            intermediate_size=sizes.intermediate, num_hidden_layers=sizes.layers,
            num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads, max_position_embeddings=512,
            bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        ),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=sizes.vision_hidden,
            intermediate_size=sizes.vision_intermediate, num_hidden_layers=sizes.vision_layers,
            num_attention_heads=sizes.vision_heads, image_size=data.IMAGE_PX, patch_size=PATCH, projection_dim=32,
        ),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(data.IMAGE_PX // PATCH) ** 2,
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    return model


def build_organism(seed: int, out: str | Path, scale: float = 1.0, progress: bool = True,
                   config: TrainConfig | None = None, generation: int = 1) -> Path:
    """Train the organism for `seed` and write it to `out` (atomically; an existing folder is an error).

    `scale` multiplies the training steps and the picture pool (e.g. 0.5 for a quicker CI
    rebuild). Same seed, same machine, same thread count: bit-identical weights.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} exists and is not empty; choose another --out (an organism is never overwritten)")
    config = (config or TrainConfig.for_generation(generation)).scaled(scale)
    start = time.perf_counter()
    processor = make_processor(config.generation)
    model = make_model(processor, seed, SIZES[config.generation])
    report = train(model, processor, seed, config, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.eval().save_pretrained(tmp)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        processor.save_pretrained(tmp)
        manifest = {
            **({"generation": config.generation} if config.generation != 1 else {}),
            "seed": seed,
            "scale": scale,
            "train": asdict(config),
            "report": report,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vision_parameters": sum(p.numel() for p in model.model.vision_tower.parameters()),
            "vocab_size": len(processor.tokenizer),
            "data_sha256": data_digest(config.generation),
            "weights_sha256": _sha256(tmp / "model.safetensors"),
            "seconds": round(time.perf_counter() - start, 1),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        (tmp / "organism.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes 0700; a shipped folder is readable by all
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def data_digest(generation: int = 1) -> str:
    """Generation 1's data digest as first recorded; generation 2's also covers every skill wording."""
    if generation == 1:
        return data.data_digest()
    return hashlib.sha256("\n".join([data.data_digest(), *skills.digest_parts()]).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "organism.json").read_text())
