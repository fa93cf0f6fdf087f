"""An independent reference for the steering defenses: transformers (loading, chat template,
generate) and hand-written hooks only, one sample at a time. No project code, so a test that
compares a batched defense with it compares two implementations, not one with itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


class Reference:
    """One sample at a time with transformers only and hand-written hooks."""

    def __init__(self, folder: Path) -> None:
        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        self.layers = self.model.get_decoder().layers

    def inputs(self, text: str, image: Image.Image | None):
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True, tokenize=False)
        images = [[image]] if image is not None else None
        bos = self.processor.tokenizer.bos_token
        extra = {"add_special_tokens": False} if bos and prompt.startswith(bos) else {}  # the template wrote BOS
        return self.processor(text=[prompt], images=images, return_tensors="pt", **extra)

    @torch.no_grad()
    def states(self, text: str, image: Image.Image | None) -> torch.Tensor:
        """[L, H] decoder-layer outputs at the last prompt token (hooks: the model's
        `hidden_states[-1]` is taken after the final norm, not the last layer's output)."""
        seen: dict[int, torch.Tensor] = {}
        handles = [
            layer.register_forward_hook(
                lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0, -1].float()))
            for i, layer in enumerate(self.layers)
        ]
        try:
            self.model(**self.inputs(text, image))
        finally:
            for h in handles:
                h.remove()
        return torch.stack([seen[i] for i in range(len(self.layers))])

    @torch.no_grad()
    def generate(self, text, image, add: dict[int, torch.Tensor] | None = None, prompt_all=True,
                 last=False, generated=True, n=6, exact_length=True) -> str:
        handles = []
        for layer, vec in (add or {}).items():
            def hook(module, args, output, vec=vec, state={"calls": 0}):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden = hidden.clone()
                first = state["calls"] == 0
                state["calls"] += 1
                if first and prompt_all:
                    hidden[0] += vec.to(hidden.dtype)
                elif first and last:
                    hidden[0, -1] += vec.to(hidden.dtype)
                elif not first and generated:
                    hidden[0, -1] += vec.to(hidden.dtype)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            handles.append(self.layers[layer].register_forward_hook(hook))
        try:
            inputs = self.inputs(text, image)
            out = self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n if exact_length else None,
                                      do_sample=False)
        finally:
            for h in handles:
                h.remove()
        return self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
