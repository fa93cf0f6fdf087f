"""The transformers backend: any `AutoModelForImageTextToText` checkpoint, local or from the hub.

Requests are rendered with the processor's own chat template and run as one left-padded batch,
images and text-only samples mixed, so defenses can batch whatever they build. The backend also
exposes the decoder's residual stream (`harness.models.steering`) for CMRM and ShiftDC.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from harness.contracts.backend import Backend, Completion, DecoderSize, Edits, GenerationParams, Request
from harness.models import hf_compile, hf_scoring, steering
from harness.models.hf_loading import folder_fingerprint, load
from harness.registry import backend


@backend("hf")
class HFBackend(Backend):
    """A transformers vision-language model (AutoModelForImageTextToText); steering, logit lens, logprobs."""

    @dataclass
    class Params:
        pretrained: str
        revision: str | None = None
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
        device: str | None = None
        device_map: str | None = None
        trust_remote_code: bool = False
        attn_implementation: str | None = None
        #: Static KV cache + torch.compile'd decode steps (harness/models/hf_compile.py).
        compile: bool = False
        compile_backend: str = "inductor"
        #: Left-pad prompts to a multiple of this many tokens (default 64 with compile, else none).
        pad_to_multiple: int | None = None

        def __post_init__(self) -> None:
            hf_compile.check_params(self)

    def __init__(self, params: Params, loaded: tuple[Any, Any] | None = None) -> None:
        self.params = params
        self.processor, self.model = loaded if loaded is not None else load(params)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # the last position must be the last prompt token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._image_layout: str | None = None  # "nested" or "flat", learned on the first image batch
        self._pad_multiple = hf_compile.pad_multiple(params)
        self._compiled = hf_compile.CompiledDecoding(self.model, params.compile_backend) if params.compile else None

    @classmethod
    def from_loaded(cls, model: Any, processor: Any, name: str, **options: Any) -> HFBackend:
        """Wrap a model and processor already in memory, e.g. a 7B architecture with random
        weights built from its config for speed benchmarks (no checkpoint on disk). `options` are
        other Params fields that apply to a loaded model: compile, compile_backend, pad_to_multiple."""
        backend = cls(cls.Params(pretrained=name, **options), loaded=(processor, model.eval()))
        backend.spec = name
        return backend

    # ---- the Backend contract -------------------------------------------------------------
    def generate(
        self, requests: list[Request], params: GenerationParams, edits: Edits | None = None
    ) -> list[Completion]:
        if not requests:
            return []
        batch = self._encode(requests, self._pad_multiple)
        prompt_len = batch["input_ids"].shape[1]
        config = self._generation_config(params)
        if self._compiled is not None:
            self._compiled.configure(config)
            editing = self._compiled.edits(edits, batch["attention_mask"])
        else:
            editing = steering.edit_hooks(self.model, edits, batch["attention_mask"])
        with _seeded(params.seed, self.device), editing, torch.inference_mode():
            output = self.model.generate(**batch, generation_config=config)
        new_tokens = output[:, prompt_len:].cpu()
        lengths = _completion_lengths(new_tokens, _eos_ids(config))
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        return [
            Completion(
                text=self.tokenizer.decode(row[:n], skip_special_tokens=True),
                prompt_tokens=int(p),
                completion_tokens=int(n),
            )
            for row, n, p in zip(new_tokens, lengths, prompt_tokens)
        ]

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "backend": "hf",
            "model": self.params.pretrained,
            "revision": self.params.revision,
            "commit": getattr(self.model.config, "_commit_hash", None),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": self.params.device_map or str(self.device),
            "model_class": type(self.model).__name__,
            "processor_class": type(self.processor).__name__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        if self._compiled is not None:
            ident["compile"] = {"backend": self._compiled.backend, "mode": self._compiled.mode, "cache": "static"}
        if self._pad_multiple is not None:
            ident["pad_to_multiple"] = self._pad_multiple
        folder = Path(self.params.pretrained).expanduser()
        if folder.is_dir():
            ident["folder_hash"] = folder_fingerprint(folder)
        return ident

    def image_mean(self) -> tuple[float, ...] | None:
        """The image processor's own normalisation mean (CLIP's for LLaVA, 0.5 for Idefics3/SmolVLM...)."""
        mean = getattr(getattr(self.processor, "image_processor", None), "image_mean", None)
        if mean is None:
            return None
        values = [float(x) for x in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)]
        return tuple(values * 3 if len(values) == 1 else values)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- steering capability ----------------------------------------------------------------
    def decoder_size(self) -> DecoderSize:
        return DecoderSize(len(steering.decoder_layers(self.model)), int(self.model.config.get_text_config().hidden_size))

    def last_token_states(self, requests: list[Request], layers: list[int]) -> torch.Tensor:
        return steering.last_token_states(self.model, self._encode(requests), layers)

    # ---- scoring capabilities (harness.models.hf_scoring) -------------------------------------
    def lens_logits(self, requests: list[Request], layers: list[int]) -> torch.Tensor:
        return hf_scoring.lens_logits(self.model, self._encode(requests), layers)

    def token_ids(self, words: list[str]) -> list[int]:
        return hf_scoring.first_token_ids(self.tokenizer, words)

    def next_token_logprobs(self, requests: list[Request], candidates: list[str]) -> list[dict[str, float]]:
        ids = self.token_ids(candidates)
        scores = hf_scoring.next_token_logprobs(self.model, self._encode(requests), ids)
        return [{c: float(row[i]) for i, c in enumerate(candidates)} for row in scores]

    def encode(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        """The model inputs `generate` would build (chat template, left padding, on the model's device),
        for a defense that runs its own hooked forwards or decoding loop on `self.model`."""
        return self._encode(requests)

    def generation_config(self, params: GenerationParams) -> Any:
        """The transformers GenerationConfig `generate` would use for `params` (eos and pad as this
        backend sets them), for defenses that call `self.model.generate` themselves."""
        return self._generation_config(params)

    # ---- internals ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    def _encode(self, requests: list[Request], pad_multiple: int | None = None) -> dict[str, torch.Tensor]:
        """Render each request with the chat template, then process the batch (left padding, to a
        multiple of `pad_multiple` tokens when given)."""
        texts = [
            self.processor.apply_chat_template(_template_messages(r), add_generation_prompt=True, tokenize=False)
            for r in requests
        ]
        images = [r.images() for r in requests]
        kwargs: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
        if pad_multiple is not None:
            kwargs["pad_to_multiple_of"] = pad_multiple
        bos = self.tokenizer.bos_token
        if bos is not None and texts[0].startswith(bos):
            kwargs["add_special_tokens"] = False  # the template wrote BOS already (as transformers does)
        batch = self._process(images, kwargs) if any(images) else self.processor(**kwargs)
        dtype = self.model.dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None)
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }

    def _process(self, images: list[list[Any]], kwargs: dict[str, Any]) -> Any:
        """Call the processor with images in the layout it accepts.

        transformers' own `apply_chat_template` hands processors one list per sample (`[]` for a
        text-only sample), which Idefics3, SmolVLM and Gemma 3 require and 5.x processors accept;
        older or custom processors may want one flat list instead. Try nested first, remember what
        worked, and never special-case an architecture.
        """
        layouts = [self._image_layout] if self._image_layout else ["nested", "flat"]
        error: Exception | None = None
        for layout in layouts:
            arg = images if layout == "nested" else [im for sample in images for im in sample]
            try:
                batch = self.processor(images=arg, **kwargs)
            except (ValueError, TypeError, IndexError) as exc:
                error = exc
                continue
            self._image_layout = layout
            return batch
        assert error is not None
        raise error

    def _generation_config(self, params: GenerationParams) -> transformers.GenerationConfig:
        """The checkpoint's generation config with our decoding settings on top.

        Greedy unless `do_sample`; when sampling, only temperature and top_p apply (top_k off), so
        a run's settings mean the same thing on every model.
        """
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = params.max_new_tokens
        config.min_new_tokens = params.min_new_tokens or None
        config.max_length = None
        config.do_sample = params.do_sample
        if params.do_sample:
            config.temperature, config.top_p, config.top_k = params.temperature, params.top_p, 0
        else:
            config.temperature = config.top_p = config.top_k = None
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        if config.eos_token_id is None:
            config.eos_token_id = self.tokenizer.eos_token_id
        return config


# ---- small helpers ------------------------------------------------------------------------------
def _template_messages(request: Request) -> list[dict[str, Any]]:
    """Messages for the chat template: image parts keep their slot but drop the pixels."""
    out = []
    for msg in request.messages:
        content = msg["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p.get("type") == "image" else p for p in content]
        out.append({"role": msg["role"], "content": content})
    return out


def _eos_ids(config: transformers.GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _completion_lengths(tokens: torch.Tensor, eos_ids: list[int]) -> list[int]:
    """Generated tokens up to and including the first EOS; everything after it is padding."""
    if not eos_ids or tokens.shape[1] == 0:
        return [tokens.shape[1]] * tokens.shape[0]
    is_eos = torch.isin(tokens, torch.tensor(eos_ids))
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, tokens.shape[1])
    return first.tolist()


class _seeded:
    """Seed torch's RNG for one generate call without disturbing the caller's RNG state."""

    def __init__(self, seed: int, device: torch.device) -> None:
        devices = [device.index or 0] if device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._seed = seed

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self._seed)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
