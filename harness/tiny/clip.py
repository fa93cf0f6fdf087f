"""A tiny random CLIP (about 250 kB, built offline in ~0.1 s) for AdaShield-A, ETA and attack tests and benchmarks.

It loads with `CLIPModel.from_pretrained`, `AutoImageProcessor` and `AutoTokenizer` like the real
openai/clip-vit-base-patch32. The tokenizer wraps every text in start/end tokens, and the end
token's id is not 2, so CLIP pools at the real end-of-text position (id 2 triggers transformers'
legacy "argmax of the ids" pooling) and different texts get different embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

from harness.tiny.tokenizer import training_corpus

SPECIALS = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<|startoftext|>", eos_token="<|endoftext|>", model_max_length=77)


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=7),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).to(torch.float32).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)
    return out
