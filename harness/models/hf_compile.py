"""Opt-in compiled decoding for the HF backend (`hf:...,compile=true`).

With it, `generate` decodes with a static KV cache and a `torch.compile`d forward, through
transformers' own auto-compile (`GenerationConfig.cache_implementation="static"` plus a
`CompileConfig`): the prefill runs uncompiled, every decode step through the compiled forward.
What this module adds around that:

- Steering keeps working: CMRM, ShiftDC and any other `Edits` go through permanent hooks that read
  their edit from tensors (`steering.EditSlots`), since a compiled forward ignores hooks registered
  after it was traced.
- Any other hook on the model (a defense that hooks modules itself: `refusal_dir`, CoCA, a test's
  recorder) makes that call run uncompiled, for the same reason; nothing is silently skipped.
- Prompts are left-padded to a multiple of `pad_to_multiple` tokens (default 64), so the static
  cache's length, which transformers keeps at the largest length seen, takes few distinct values
  and the decode graph is rarely recompiled. Extra left padding is masked out and does not move
  position ids (transformers counts positions from the attention mask).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
import transformers

from harness.contracts.backend import Edits
from harness.errors import ModelLoadError
from harness.models import steering

if TYPE_CHECKING:
    from harness.models.hf import HFBackend

#: Default `pad_to_multiple` when compile=true: prompt lengths 1-64 share one cache length, 65-128 the next...
DEFAULT_PAD_MULTIPLE = 64
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_TRANSFORMERS_RECORDERS = "transformers.utils.output_capturing"  # `output_hidden_states` capture hooks


def check_params(params: HFBackend.Params) -> None:
    """Raise ValueError (the spec layer turns it into a one-line error) for unusable values."""
    if params.pad_to_multiple is not None and params.pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple={params.pad_to_multiple}: give a positive number of tokens (1: no padding)")
    if params.compile and params.compile_backend not in _backends():
        raise ValueError(
            f"compile_backend={params.compile_backend!r} is not a torch.compile backend; "
            f"valid: {', '.join(_backends())}"
        )


def pad_multiple(params: HFBackend.Params) -> int | None:
    """Tokens the prompts of one batch are left-padded to a multiple of; None: no extra padding."""
    if params.pad_to_multiple is not None:
        return params.pad_to_multiple if params.pad_to_multiple > 1 else None
    return DEFAULT_PAD_MULTIPLE if params.compile else None


def compile_mode(backend: str, device: torch.device) -> str:
    """CUDA graphs (`reduce-overhead`, transformers' default) where they exist, else `default`."""
    return "reduce-overhead" if backend == "inductor" and device.type == "cuda" else "default"


class CompiledDecoding:
    """The compiled path of one loaded model: its permanent edit hooks and its generation settings."""

    def __init__(self, model: Any, backend: str) -> None:
        _refuse_offload(model)
        self.model = model
        self.backend = backend
        self.mode = compile_mode(backend, model.device)
        self.slots = steering.EditSlots(model)

    def edits(self, edits: Edits | None, attention_mask: torch.Tensor) -> AbstractContextManager[None]:
        return self.slots.apply(edits, attention_mask)

    def configure(self, config: transformers.GenerationConfig) -> bool:
        """Turn `config` into a compiled, static-cache one; False (config left uncompiled) when the
        model carries hooks other than the edit slots."""
        if _foreign_hooks(self.model, self.slots.hooks):
            config.disable_compile = True
            return False
        compile_config = transformers.CompileConfig(backend=self.backend, mode=self.mode)
        compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        config.cache_implementation = "static"
        config.compile_config = compile_config
        return True


def _backends() -> list[str]:
    from torch._dynamo import list_backends

    return list_backends(exclude_tags=())


def _refuse_offload(model: Any) -> None:
    """transformers skips compiling a model offloaded to the CPU or disk; say so instead."""
    devices = set(getattr(model, "hf_device_map", {}).values())
    if "disk" in devices or ("cpu" in devices and len(devices) > 1):
        raise ModelLoadError(
            f"compile=true cannot run a model offloaded by device_map (it is spread over "
            f"{', '.join(sorted(map(str, devices)))}); give it room on its devices or drop compile=true"
        )


def _foreign_hooks(model: Any, ours: list[Any]) -> bool:
    """Whether a forward hook or pre-hook other than the edit slots' and transformers' own output
    recorders (installed on first use, inert unless outputs are being recorded) is registered on the
    model's modules or globally."""
    from torch.nn.modules import module as nn_module

    known = {id(hook) for hook in ours}
    dicts = [getattr(m, d) for m in model.modules() for d in _HOOK_DICTS]
    dicts += [nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks]
    return any(
        id(hook) not in known and getattr(hook, "__module__", None) != _TRANSFORMERS_RECORDERS
        for hooks in dicts
        for hook in hooks.values()
    )
