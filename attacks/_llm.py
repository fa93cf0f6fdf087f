"""A helper LLM for attacks that rewrite the request with a language model (CS-DJ's splitter).

A spec names the model the way `--model` does (`openai:model=NAME;base_url=URL`, with `;` for the
commas a nested spec cannot hold inside an attack spec; `hf:pretrained=...`; a bare hub id or
folder). A bare id of a *text-only* causal LM (the CS-DJ recipe's Qwen/Qwen2.5-3B-Instruct), which
the harness's HF backend refuses because it serves vision-language models, is loaded here with
`AutoModelForCausalLM` behind the same Backend interface.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.contracts.backend import Backend, Completion, Edits, GenerationParams, Request
from harness.errors import ModelLoadError
from harness.models.resolve import load_backend
from harness.registry import backends


def _is_vlm(name: str) -> bool:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load helper model {name!r}: {exc}") from exc
    auto_map = getattr(config, "auto_map", None) or {}
    return type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING or "AutoModelForImageTextToText" in auto_map


def load_helper_llm(spec: str) -> Backend:
    """A Backend for `spec`; text-only causal LMs given by bare id or folder load as `TextLM`."""
    text = spec.strip().replace(";", ",")
    name, sep, _ = text.partition(":")
    if (sep and name in backends) or _is_vlm(text):
        return load_backend(text)
    backend = TextLM(text)
    backend.spec = text
    return backend


def _plain(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


class TextLM(Backend):
    """A transformers causal LM with a chat template: text-only chat requests, one at a time."""

    def __init__(self, name: str, device: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForCausalLM.from_pretrained(name, dtype="auto").eval()
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load helper model {name!r}: {exc}") from exc
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)

    def identity(self) -> dict[str, Any]:
        return {"backend": "text-lm", "model": self.name,
                "commit": getattr(self.model.config, "_commit_hash", None)}

    @torch.inference_mode()
    def generate(self, requests: list[Request], params: GenerationParams,
                 edits: Edits | None = None) -> list[Completion]:
        if edits is not None:
            raise ValueError("a helper text LM takes no edits")
        out = []
        for request in requests:
            if request.has_image():
                raise ValueError(f"helper model {self.name!r} is text-only; the request holds an image")
            messages = [{"role": m["role"], "content": _plain(m["content"])} for m in request.messages]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
            ids = {k: v.to(self.device) for k, v in ids.items()}
            kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "do_sample": params.do_sample}
            if params.do_sample:
                kwargs.update(temperature=params.temperature, top_p=params.top_p)
            pad = self.tokenizer.pad_token_id
            kwargs["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
            if params.do_sample:  # seeded sampling that leaves the caller's random state alone
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    torch.manual_seed(params.seed)
                    generated = self.model.generate(**ids, **kwargs)
            else:
                generated = self.model.generate(**ids, **kwargs)
            new = generated[0, ids["input_ids"].shape[1]:]
            out.append(Completion(text=self.tokenizer.decode(new, skip_special_tokens=True),
                                  prompt_tokens=int(ids["input_ids"].shape[1]), completion_tokens=int(new.numel())))
        return out
