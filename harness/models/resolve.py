"""Turn a model spec into a backend: a bare hub id or path means the HF backend.

`llava-hf/llava-1.5-7b-hf`, `./my-model`, `hf:pretrained=<id>,dtype=bfloat16` and
`openai:model=gpt-4o,base_url=...,api_key_env=OPENAI_API_KEY` are all valid model specs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from harness.contracts.backend import Backend
from harness.registry import Entry, backends
from harness.spec import Spec, SpecError, build_params, parse_spec

DEFAULT_BACKEND = "hf"
#: `--device` values that mean "let the backend pick" (a GPU when there is one, else the CPU).
AUTO_DEVICES = ("auto", "")


def parse_model_spec(text: str) -> Spec:
    name, sep, _ = text.partition(":")
    if sep and name in backends:
        return parse_spec(text)
    return Spec(DEFAULT_BACKEND, (("pretrained", text),))


def resolve_backend(text: str, overrides: dict[str, Any] | None = None) -> tuple[Entry, Any]:
    """The backend class and validated params, without loading anything.

    `overrides` (from --device / --dtype) fill parameters the spec leaves at their defaults. A
    device this machine lacks is refused here, at plan time, before any model loads.
    """
    spec = parse_model_spec(text)
    entry = backends.get(spec.name)
    params = build_params(entry.cls.Params, spec, "backend")
    given = {k for k, _ in spec.params}
    fields = {f.name for f in dataclasses.fields(params)}
    for key, value in (overrides or {}).items():
        if value is not None and key in fields and key not in given:
            params = dataclasses.replace(params, **{key: value})
    device = getattr(params, "device", None)
    if isinstance(device, str) and device.strip().lower() in AUTO_DEVICES:
        params = dataclasses.replace(params, device=None)
    elif isinstance(device, str):
        try:
            check_device(device)
        except ValueError as exc:
            where = f"model {text!r}: device={device}" if "device" in given else f"--device {device}"
            raise SpecError(f"{where}: {exc}; use cpu, or leave the device out (a GPU when there is one)") from None
    return entry, params


def check_device(device: str) -> None:
    """Raise ValueError (saying what this machine has) when torch cannot use `device` here: a
    `cuda:3` on a one-GPU machine, or `cuda` without a GPU, must fail before a 7B model is read
    from disk, not in `model.to()` after it."""
    import torch  # only when a device is named: an API-only plan needs no torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError("not a device torch knows (cpu, cuda, cuda:N, mps, auto)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError("no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("MPS (Apple GPU) is not available on this machine")
    elif dev.type != "cpu":
        available = getattr(getattr(torch, dev.type, None), "is_available", None)
        if available is None or not available():
            raise ValueError(f"torch has no usable {dev.type!r} device on this machine")


def load_backend(text: str, overrides: dict[str, Any] | None = None) -> Backend:
    entry, params = resolve_backend(text, overrides)
    backend = entry.cls(params)
    backend.spec = text
    return backend
