"""The transformers backend: any `AutoModelForImageTextToText` checkpoint, local or from the hub.

Requests are rendered with the processor's own chat template and run as one left-padded batch,
images and text-only samples mixed, so defenses can batch whatever they build. The backend also
exposes the decoder's residual stream (`harness.models.steering`) for CMRM and ShiftDC.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, ProcessorMixin
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from harness.errors import ModelLoadError
from harness.models import steering
from harness.contracts.backend import Backend, Completion, DecoderSize, Edits, GenerationParams, Request
from harness.registry import backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" (or a legacy "name")


@backend("hf")
class HFBackend(Backend):
    """A transformers vision-language model (AutoModelForImageTextToText); Steerable."""

    @dataclass
    class Params:
        pretrained: str
        revision: str | None = None
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
        device: str | None = None
        device_map: str | None = None
        trust_remote_code: bool = False
        attn_implementation: str | None = None

    def __init__(self, params: Params, loaded: tuple[Any, Any] | None = None) -> None:
        self.params = params
        self.processor, self.model = loaded if loaded is not None else load(params)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # the last position must be the last prompt token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._image_layout: str | None = None  # "nested" or "flat", learned on the first image batch

    @classmethod
    def from_loaded(cls, model: Any, processor: Any, name: str) -> HFBackend:
        """Wrap a model and processor already in memory, e.g. a 7B architecture with random
        weights built from its config for speed benchmarks (no checkpoint on disk)."""
        backend = cls(cls.Params(pretrained=name), loaded=(processor, model.eval()))
        backend.spec = name
        return backend

    # ---- the Backend contract -------------------------------------------------------------
    def generate(
        self, requests: list[Request], params: GenerationParams, edits: Edits | None = None
    ) -> list[Completion]:
        if not requests:
            return []
        batch = self._encode(requests)
        prompt_len = batch["input_ids"].shape[1]
        config = self._generation_config(params)
        with _seeded(params.seed, self.device), steering.edit_hooks(self.model, edits, batch["attention_mask"]):
            with torch.inference_mode():
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

    # ---- internals ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    def _encode(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        """Render each request with the chat template, then process the batch (left padding)."""
        texts = [
            self.processor.apply_chat_template(_template_messages(r), add_generation_prompt=True, tokenize=False)
            for r in requests
        ]
        images = [r.images() for r in requests]
        kwargs: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
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


# ---- loading ------------------------------------------------------------------------------------
def load(params: HFBackend.Params) -> tuple[Any, Any]:
    """Processor and model for `params`, or ModelLoadError saying which model and why."""
    name = params.pretrained
    common: dict[str, Any] = {"revision": params.revision, "trust_remote_code": params.trust_remote_code}
    _check_location(name)
    try:
        config = AutoConfig.from_pretrained(name, **common)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}") from exc
    auto_map = getattr(config, "auto_map", None) or {}
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING and "AutoModelForImageTextToText" not in auto_map:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise ModelLoadError(
            f"model {name!r} is a {config.model_type!r} model ({archs}), not a vision-language model: "
            "AutoModelForImageTextToText has no class for it"
        )
    processor = load_processor(name, **common)
    kwargs: dict[str, Any] = dict(common, config=config)
    kwargs["dtype"] = DTYPES.get(params.dtype, "auto")
    if params.device_map:
        kwargs["device_map"] = params.device_map
    if params.attn_implementation:
        kwargs["attn_implementation"] = params.attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}") from exc
    if not params.device_map:
        model = model.to(params.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return processor, model.eval()


def _check_location(name: str) -> None:
    """Fail early, and clearly, for a local path that is not a model folder."""
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "~")) or path.is_absolute() or not _HUB_ID.match(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {name!r} has no config.json, so it is not a transformers model")
    elif path.exists():
        raise ModelLoadError(f"model {name!r} is a file; expected a model folder or a hub id")
    elif looks_local:
        raise ModelLoadError(f"model folder {name!r} does not exist (and it is not a hub id like 'org/name')")


def load_processor(name: str, **kwargs: Any) -> Any:
    """`AutoProcessor.from_pretrained`, retried without a video processor where that is what fails.

    Video processors in transformers 5.x need torchvision. Without it, a processor that declares
    one (Qwen2-VL, Qwen2.5-VL, SmolVLM, InternVL) cannot load: `AutoProcessor` raises, or, when the
    saved class name is unknown to this process, silently returns the bare tokenizer. This
    harness sends images only, so the same processor class minus its video slot is a faithful
    replacement, for real checkpoints and tiny test models alike.
    """
    error: Exception | None = None
    try:
        processor = AutoProcessor.from_pretrained(name, **kwargs)
        if isinstance(processor, ProcessorMixin) and hasattr(processor, "image_processor"):
            return processor
    except (OSError, ImportError, ValueError, TypeError) as exc:
        error = exc
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
        cls = PROCESSOR_MAPPING[type(config)] if type(config) in PROCESSOR_MAPPING else None
        if cls is not None and "video_processor" in cls.get_attributes():
            return video_free(cls).from_pretrained(name, **kwargs)
    except (OSError, ImportError, ValueError, TypeError) as exc:
        error = exc
    why = f": {error}" if error else " (it has no image processor)"
    raise ModelLoadError(f"cannot load an image processor for model {name!r}{why}")


@functools.cache
def video_free(cls: type) -> type:
    """Subclass of processor class `cls` with the same arguments except `video_processor`.

    transformers decides which sub-processors to load from `__init__`'s signature and which
    saved settings (chat template, `image_seq_len`...) to pass from `__init__.__code__`'s argument
    names, so the subclass needs a real `__init__` listing the parent's named arguments; it is
    generated here rather than hand-written per model. The distinct class name lets
    `AutoProcessor.register` map a saved `processor_class` to it.
    """
    params = [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("self", "video_processor")
    ]
    defaults = {p.name: (None if p.default is p.empty else p.default) for p in params}
    names = [p.name for p in params]
    source = (
        f"def __init__(self, {''.join(f'{n}=_defaults[{n!r}], ' for n in names)}**kwargs):\n"
        f"    _parent.__init__(self, {''.join(f'{n}={n}, ' for n in names)}video_processor=None, **kwargs)\n"
    )
    namespace: dict[str, Any] = {"_parent": cls, "_defaults": defaults}
    exec(source, namespace)  # noqa: S102 - fixed template over identifiers from a signature
    name = f"{cls.__name__}NoVideo"
    return type(name, (cls,), {"__init__": namespace["__init__"], "__module__": __name__, "__qualname__": name})


#: Content sampled per weight file by `folder_fingerprint`: the safetensors header (tensor names,
#: dtypes, shapes, offsets; capped) plus SAMPLE_POINTS chunks of SAMPLE_BYTES spread evenly from the
#: first to the last byte of the tensor data: at most ~4.6 MiB read per file, whatever its size.
HEADER_CAP = 4 << 20
SAMPLE_BYTES = 64 << 10
SAMPLE_POINTS = 9  # odd, so one chunk starts at the exact middle


def folder_fingerprint(folder: Path) -> str:
    """Short content hash of a model folder: config.json, and per weight file its name, size and
    sampled bytes (see `_sample_weights`). Path-independent: the same folder reached by a relative
    or absolute path, or a byte copy elsewhere, gets the same fingerprint.

    Why sampled and not a full hash: hashing 14 GB of 7B weights on every run would cost minutes,
    while names and sizes alone cannot tell two checkpoints of one architecture apart (two seeds of
    the organism, a fine-tune of its base). Different initialisations and full trainings differ in
    nearly every tensor, so a few chunks at fixed relative offsets separate them. What it can miss:
    a change confined to bytes no chunk covers (one tensor edited by hand, an adapter merged into a
    few layers only); such a folder needs another name or config to be told apart.
    """
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(folder.glob("*.safetensors*")) + sorted(folder.glob("*.bin")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size};".encode())
        digest.update(_sample_weights(path, size))
    return digest.hexdigest()[:12]


def _sample_weights(path: Path, size: int) -> bytes:
    """The bytes of `path` the fingerprint covers: all of a small file; for a large one the
    safetensors header (if it has one, capped at HEADER_CAP) and SAMPLE_POINTS chunks of the data
    after it, at fixed relative offsets (0, 1/8, ..., 1 of the data span: beginning, middle, end)."""
    with open(path, "rb") as fh:
        if size <= HEADER_CAP + SAMPLE_POINTS * SAMPLE_BYTES:
            return fh.read()
        parts: list[bytes] = []
        start = 0
        head = fh.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        if path.suffix == ".safetensors" and 0 < header_len <= size - 8:  # else: not a header (.bin, odd file)
            parts.append(head + fh.read(min(header_len, HEADER_CAP)))
            start = 8 + header_len
        span = max(size - start - SAMPLE_BYTES, 0)
        for i in range(SAMPLE_POINTS):
            offset = start + span * i // (SAMPLE_POINTS - 1)
            fh.seek(offset)
            parts.append(offset.to_bytes(8, "little") + fh.read(SAMPLE_BYTES))
        return b"".join(parts)


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
