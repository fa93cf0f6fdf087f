"""Read and edit the decoder's residual stream with forward hooks on its layers.

Two operations serve every activation-steering defense (CMRM, ShiftDC): record the output of
chosen decoder layers at the last prompt token, and add a per-sample vector to chosen layers'
outputs at chosen positions while generating. Both work on an already encoded, LEFT-padded batch
(the HF backend encodes), so the last position is always the last prompt token and padding is
found through the attention mask.

Hooks are registered for one call and removed on every exit path; with zero vectors or after
removal, outputs are bit-identical to an unhooked model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from harness.contracts.backend import Edits


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    """The text decoder's layers; `get_decoder()` reaches them for every 5.x VLM we support."""
    return model.get_decoder().layers


def _check_layers(model: Any, layers: Sequence[int]) -> None:
    n = len(decoder_layers(model))
    bad = [layer for layer in layers if not 0 <= int(layer) < n]
    if bad:
        raise ValueError(f"decoder layers {bad} out of range: this model has layers 0-{n - 1}")


def _hidden(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor in transformers 5.x; older code returned a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _StopForward(Exception):
    """Raised by the deepest recording hook: later layers and the LM head are not needed."""


def last_token_states(model: Any, inputs: Mapping[str, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """[batch, len(layers), hidden] float32 CPU outputs of `layers` at the last position.

    One forward pass, stopped right after the deepest requested layer. The batch must be left
    padded, so the last position is each sample's last prompt token. Layer `l`'s state equals
    `hidden_states[l + 1][:, -1]` of a forward with `output_hidden_states`, except for the last
    layer, whose `hidden_states` entry is taken after the final norm.
    """
    layers = [int(layer) for layer in layers]
    if not layers:
        raise ValueError("last_token_states needs at least one layer")
    _check_layers(model, layers)
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask[:, -1].all()):
        raise ValueError("last_token_states needs a left-padded batch (the last position is padding)")
    modules = decoder_layers(model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def recorder(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured[index] = _hidden(output)[:, -1].detach().to("cpu", torch.float32, copy=True)
            if index == deepest:
                raise _StopForward

        return hook

    handles = [modules[i].register_forward_hook(recorder(i)) for i in sorted(set(layers))]
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(layers) - set(captured))
    if missing:
        raise RuntimeError(f"decoder layers {missing} did not run in the forward pass")
    return torch.stack([captured[i] for i in layers], dim=1)


@contextmanager
def edit_hooks(model: Any, edits: Edits | None, attention_mask: torch.Tensor) -> Iterator[None]:
    """While active, add `edits.vectors[layer][i]` to sample i's output of each edited layer.

    Positions: `last_prompt` (the last prompt token, prefill), `prompt` (every non-padding
    prompt token, prefill) and `generated` (each new token, decode steps). The first call of
    a hook is the prefill; later calls are decode steps, one new position each (KV cache).
    A position named twice gets the vector once. Hooks are prepended so that transformers'
    own `output_hidden_states` capture sees the edited states.
    """
    if edits is None or not edits.vectors:
        yield
        return
    weights = check_edits(model, edits, attention_mask)
    modules = decoder_layers(model)
    handles = [
        modules[int(layer)].register_forward_hook(
            _adder(vec, weights, "generated" in edits.positions), prepend=True
        )
        for layer, vec in edits.vectors.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_edits(model: Any, edits: Edits, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Validate `edits` against the model and this batch; return the prefill weights (see
    `_prefill_weights`). Shared by `edit_hooks` and the compiled path's permanent hooks
    (harness.models.hf_compile), so both refuse the same mistakes and edit the same positions."""
    _check_layers(model, list(edits.vectors))
    batch, hidden = attention_mask.shape[0], model.config.get_text_config().hidden_size
    for layer, vec in edits.vectors.items():
        if tuple(vec.shape) != (batch, hidden):
            raise ValueError(
                f"edit vectors for layer {layer} have shape {tuple(vec.shape)}; expected [{batch}, {hidden}]"
            )
    return _prefill_weights(attention_mask, edits.positions)


def cast_vector(vector: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """[batch, 1, hidden] copy of a [batch, hidden] edit in the hidden states' dtype and device."""
    return vector.detach().to(hidden.device, hidden.dtype).unsqueeze(1)


def edit_prefill(hidden: torch.Tensor, prefill: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """The prefill's hidden states with `vec` (from `cast_vector`) added at the prefill weights."""
    if prefill.shape[1] != hidden.shape[1]:
        raise RuntimeError(
            f"prefill hidden states cover {hidden.shape[1]} positions but the attention mask {prefill.shape[1]}"
        )
    return hidden + prefill.to(hidden.device, hidden.dtype) * vec


def _prefill_weights(attention_mask: torch.Tensor, positions: frozenset[str]) -> torch.Tensor | None:
    """[batch, seq, 1] 0/1 weights of the prompt positions to edit, or None for none."""
    if not positions & {"prompt", "last_prompt"}:
        return None
    weights = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
    if "prompt" in positions:
        weights = attention_mask.to(torch.float32, copy=True)
    if "last_prompt" in positions:
        weights[:, -1] = 1.0  # left padding: the last position is every sample's last prompt token
    return weights.unsqueeze(-1)


def _adder(vector: torch.Tensor, prefill: torch.Tensor | None, generated: bool) -> Callable[..., Any]:
    """A forward hook adding `vector` rows at the prefill weights, then at each decode step.

    Casts happen once, on the first call, when the output's dtype and device are known; the
    decode path is a single broadcast add.
    """
    state: dict[str, Any] = {"calls": 0}

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        hidden = _hidden(output)
        first = state["calls"] == 0
        state["calls"] += 1
        if first:
            state["vec"] = cast_vector(vector, hidden)
            if prefill is None:
                return None
            return _replace_hidden(output, edit_prefill(hidden, prefill, state["vec"]))
        if not generated:
            return None
        return _replace_hidden(output, hidden + state["vec"])

    return hook


class EditSlots:
    """Edit hooks for a compiled forward: registered once, before anything is compiled, on every
    decoder layer; each generate call fills them (`apply`) instead of registering hooks.

    Why not `edit_hooks`: torch.compile does not guard on module hooks
    (`torch._dynamo.config.skip_nnmodule_hook_guards`), so a compiled forward silently keeps the
    hooks that existed when it was traced, whatever is registered later. Here the hooks never change;
    only the tensors they read do, and those are inputs of the compiled graph. The prefill runs
    uncompiled in transformers' `generate`, and there a hook adds the prompt edit exactly as
    `edit_hooks` does; at every decode step it adds its layer's [batch, 1, hidden] decode vector,
    zeros for a layer without a `generated` edit (adding zeros leaves every value as it was). The
    decode graph so has no branch that depends on the defense, and a new edit needs no recompiling.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        modules = decoder_layers(model)
        self._active = False
        self._vectors: dict[int, torch.Tensor] = {}
        self._weights: torch.Tensor | None = None
        self._generated = False
        self._prefilled = [True] * len(modules)
        self._decode: list[torch.Tensor | None] = [None] * len(modules)
        self.hooks = [self._hook(i) for i in range(len(modules))]
        self.handles = [m.register_forward_hook(hook, prepend=True) for m, hook in zip(modules, self.hooks)]

    @contextmanager
    def apply(self, edits: Edits | None, attention_mask: torch.Tensor) -> Iterator[None]:
        """While active, the hooks edit one generate call's batch (`edits` may be None: no edit)."""
        if edits is not None and edits.vectors:
            self._weights = check_edits(self.model, edits, attention_mask)
            self._vectors = {int(layer): vec for layer, vec in edits.vectors.items()}
            self._generated = "generated" in edits.positions
        self._prefilled = [False] * len(self._prefilled)
        self._active = True
        try:
            yield
        finally:
            self._active, self._vectors, self._weights, self._generated = False, {}, None, False
            self._decode = [None] * len(self._decode)

    def _hook(self, index: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if not self._active:
                return None
            hidden = _hidden(output)
            if self._prefilled[index]:  # a decode step: the compiled path, no branch on the edit
                return _replace_hidden(output, hidden + self._decode[index])
            self._prefilled[index] = True
            vector = self._vectors.get(index)
            # A fresh contiguous tensor made here, under generate's inference mode, like the zeros:
            # the compiled graph's guards check layout and dispatch keys, and should see one kind.
            vec = None if vector is None else cast_vector(vector, hidden).clone(memory_format=torch.contiguous_format)
            keep = vec is not None and self._generated
            self._decode[index] = vec if keep else hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])
            if vec is None or self._weights is None:
                return None
            return _replace_hidden(output, edit_prefill(hidden, self._weights, vec))

        return hook
