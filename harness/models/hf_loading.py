"""Loading a transformers VLM by hub id or folder, the way a user names it, with clear errors.

Kept apart from the backend (harness/models/hf.py) because it is about files and checkpoints, not
about running the model: where a model lives, whether it is a VLM, a processor that works without
torchvision, and a cheap content fingerprint of a local folder.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, ProcessorMixin
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from harness.errors import ModelLoadError

if TYPE_CHECKING:
    from harness.models.hf import HFBackend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" (or a legacy "name")


def load(params: HFBackend.Params) -> tuple[Any, Any]:  # noqa: F821
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
