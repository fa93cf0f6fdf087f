"""Differentiable hooks on the decoder for teacher-forced forwards: add per-row vectors at
per-position weights (to a layer's output, as `harness.models.steering` edits, or to a block's
input, as `harness.models.hf_directions` edits), and capture a layer's output at one position with
its gradient.

Why not reuse the generation hooks: those find positions by call order (the first call is the
prefill, each later call one decode step) and detach what they capture. A teacher-forced forward
is one call over prompt + target, so positions come from an explicit [rows, seq] weight matrix, and
captured states keep their graph so the loss can reach the pixels through them.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from harness.models.steering import decoder_layers

Gate = Callable[[torch.Tensor], torch.Tensor]


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def add_to_outputs(model: Any, vectors: Mapping[int, torch.Tensor], weights: torch.Tensor) -> Iterator[None]:
    """While active: layer l's output += weights[..., None] * vectors[l][:, None, :] (vectors [rows, hidden],
    weights [rows, seq]). The vectors may carry a graph (ShiftDC's correction); nothing is detached."""
    modules = decoder_layers(model)

    def adder(vector: torch.Tensor) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            hidden = _hidden(output)
            w = weights.to(hidden.device, hidden.dtype)[..., None]
            return _replace(output, hidden + w * vector.to(hidden.device, hidden.dtype)[:, None, :])
        return hook

    with ExitStack() as stack:
        for layer, vector in vectors.items():
            stack.callback(modules[int(layer)].register_forward_hook(adder(vector), prepend=True).remove)
        yield


@contextmanager
def add_to_inputs(model: Any, vectors: Mapping[int, torch.Tensor], weights: torch.Tensor,
                  gate: Gate | None = None) -> Iterator[None]:
    """While active: block l's input += weights * vectors[l]. `gate`, if given, is called with the
    lowest edited block's (unedited) input and returns [rows] factors scaling every vector."""
    modules = decoder_layers(model)
    lowest = min(int(layer) for layer in vectors) if vectors else 0
    shared: dict[str, torch.Tensor] = {}

    def adder(layer: int, vector: torch.Tensor) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer == lowest and gate is not None:
                shared["factor"] = gate(hidden).to(hidden.device, hidden.dtype)
            vec = vector.to(hidden.device, hidden.dtype)
            if "factor" in shared:
                vec = vec * shared["factor"][:, None]
            edited = hidden + weights.to(hidden.device, hidden.dtype)[..., None] * vec[:, None, :]
            return ((edited, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": edited})
        return hook

    with ExitStack() as stack:
        for layer, vector in sorted(vectors.items()):
            handle = modules[int(layer)].register_forward_pre_hook(adder(int(layer), vector), with_kwargs=True,
                                                                   prepend=True)
            stack.callback(handle.remove)
        yield


class StopForward(Exception):
    """Raised once the deepest captured layer ran: later layers are not needed for the loss term."""


@contextmanager
def capture_outputs(model: Any, layers: Sequence[int], position: int, stop: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """While active, `captured[l]` = layer l's output at `position` ([rows, hidden], WITH its graph).
    With `stop`, the forward raises StopForward after the deepest layer (catch it around the call)."""
    modules = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(int(layer) for layer in layers)

    def recorder(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured[index] = _hidden(output)[:, position]
            if stop and index == deepest:
                raise StopForward
        return hook

    with ExitStack() as stack:
        for layer in sorted({int(layer) for layer in layers}):
            stack.callback(modules[layer].register_forward_hook(recorder(layer)).remove)
        yield captured
