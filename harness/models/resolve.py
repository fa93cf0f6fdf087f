"""Turn a model spec into a backend: a bare hub id or path means the HF backend.

`llava-hf/llava-1.5-7b-hf`, `./my-model`, `hf:pretrained=<id>,dtype=bfloat16` and
`openai:model=gpt-4o,base_url=...,api_key_env=OPENAI_API_KEY` are all valid model specs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from harness.contracts.backend import Backend
from harness.registry import Entry, backends
from harness.spec import Spec, build_params, parse_spec

DEFAULT_BACKEND = "hf"


def parse_model_spec(text: str) -> Spec:
    name, sep, _ = text.partition(":")
    if sep and name in backends:
        return parse_spec(text)
    return Spec(DEFAULT_BACKEND, (("pretrained", text),))


def resolve_backend(text: str, overrides: dict[str, Any] | None = None) -> tuple[Entry, Any]:
    """The backend class and validated params, without loading anything.

    `overrides` (from --device / --dtype) fill parameters the spec leaves at their defaults.
    """
    spec = parse_model_spec(text)
    entry = backends.get(spec.name)
    params = build_params(entry.cls.Params, spec, "backend")
    given = {k for k, _ in spec.params}
    fields = {f.name for f in dataclasses.fields(params)}
    for key, value in (overrides or {}).items():
        if value is not None and key in fields and key not in given:
            params = dataclasses.replace(params, **{key: value})
    return entry, params


def load_backend(text: str, overrides: dict[str, Any] | None = None) -> Backend:
    entry, params = resolve_backend(text, overrides)
    backend = entry.cls(params)
    backend.spec = text
    return backend
