"""Hooks on a transformers decoder for direction interventions (the refusal direction, Arditi et al.):
read the residual stream entering decoder blocks at positions counted from the prompt end, add a
vector to a block's input, project a direction out of every block input and every attention and MLP
output, and read the last position's logits.

"Block-l input" is what decoder layer l receives: the residual stream after layer l-1 (for l = 0,
the input embeddings with the image features merged in). It is read and edited by forward PRE-hooks
on layer l, as the public code does (andyrdt/refusal_direction `9d852fa`, pipeline/utils/hook_utils.py,
`model_block_modules[layer]`). In a decoder whose layers are chained directly, adding v to the input
of block l is the same as adding v to the output of block l-1, which is where `harness.models.steering`
edits (it cannot reach l = 0). HF's `hidden_states[l]` is the block-l input by value, but for l >= 1 it
is recorded as layer l-1's output, before any pre-hook of layer l runs: since the hooks here return new
tensors (they never edit in place), `output_hidden_states` shows block-input edits only at index 0.

All functions take an already encoded, LEFT-padded batch (the HF backend's `encode`), so position -1
is every sample's last prompt token and "k positions from the prompt end" are the same template
tokens for every sample. Hooks live for one `with` block and are removed on every exit path.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from harness.models.steering import decoder_layers

#: The public code's unit direction: r / (||r|| + 1e-8).
NORM_EPS = 1e-8
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
#: Stands in for the user's text when the chat template is rendered to find what follows it.
SENTINEL = "REFUSALDIRSENTINEL"


def unit(direction: torch.Tensor) -> torch.Tensor:
    """r̂ = r / (||r|| + 1e-8), as the public code's ablation hooks normalise."""
    return direction / (direction.norm(dim=-1, keepdim=True) + NORM_EPS)


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_block_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def sublayers(layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A decoder layer's attention and MLP modules (the public code's `block.self_attn`, `block.mlp`)."""
    attn = next((getattr(layer, n) for n in ATTENTION_NAMES if isinstance(getattr(layer, n, None), torch.nn.Module)), None)
    mlp = next((getattr(layer, n) for n in MLP_NAMES if isinstance(getattr(layer, n, None), torch.nn.Module)), None)
    if attn is None or mlp is None:
        raise RuntimeError(f"{type(layer).__name__} has no attention/MLP submodule named one of "
                           f"{ATTENTION_NAMES} / {MLP_NAMES}; direction ablation cannot hook it")
    return attn, mlp


def _check_left_padded(inputs: Mapping[str, torch.Tensor], need: int) -> None:
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask[:, -1].all()):
        raise ValueError("direction hooks need a left-padded batch (the last position is padding)")
    if mask is not None and int(mask.sum(dim=1).min()) < need:
        raise ValueError(f"a prompt is shorter than the {need} positions read from its end")


class _Stop(Exception):
    """Raised once the deepest requested block input is read: later layers are not needed."""


def block_inputs(model: Any, inputs: Mapping[str, torch.Tensor], layers: Sequence[int], last: int) -> torch.Tensor:
    """[batch, last, len(layers), hidden] float32 CPU: the input of each block in `layers` at the
    `last` positions before the prompt end (index 0 is position -last, index last-1 is position -1).
    One forward, stopped at the deepest requested block."""
    layers = [int(layer) for layer in layers]
    if not layers or last < 1:
        raise ValueError("block_inputs needs at least one layer and one position")
    _check_left_padded(inputs, last)
    modules = decoder_layers(model)
    deepest = max(layers)
    seen: dict[int, torch.Tensor] = {}

    def reader(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            seen[index] = _block_input(args, kwargs)[:, -last:].detach().to("cpu", torch.float32, copy=True)
            if index == deepest:
                raise _Stop

        return hook

    handles = [modules[i].register_forward_pre_hook(reader(i), with_kwargs=True) for i in sorted(set(layers))]
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([seen[i] for i in layers], dim=2)


def last_logits(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[batch, vocab] float32 CPU next-token logits after the prompt (with whatever hooks are active)."""
    _check_left_padded(inputs, 1)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.inference_mode():
        logits = model(**inputs, use_cache=False, **extra).logits
    return logits[:, -1, :].float().cpu()


@contextmanager
def _prompt_mask(model: Any) -> Iterator[dict[str, torch.Tensor | None]]:
    """Capture the 2-D attention mask of the first forward call (the prefill) while active."""
    seen: dict[str, torch.Tensor | None] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if "mask" not in seen:
            mask = kwargs.get("attention_mask")
            seen["mask"] = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


Gate = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def add_to_block_inputs(model: Any, vectors: Mapping[int, torch.Tensor], positions: frozenset[str],
                        gate: Gate | None = None) -> Iterator[None]:
    """While active, add `vectors[l][i]` ([batch, hidden]) to sample i's block-l input.

    Positions as in `harness.models.steering`: `prompt` (every non-padding prompt token of the
    prefill), `last_prompt` (the last prompt token) and `generated` (each decode step's new token).
    The first call of a block is the prefill; later calls are decode steps (KV cache). `gate`, if
    given, is called once with the prefill input of the lowest edited block (not yet edited) and
    returns [batch] factors that scale every vector of that sample for the whole call.
    """
    modules = decoder_layers(model)
    bad = [layer for layer in vectors if not 0 <= int(layer) < len(modules)]
    if bad:
        raise ValueError(f"decoder layers {bad} out of range: this model has layers 0-{len(modules) - 1}")
    if not vectors:
        yield
        return
    lowest = min(int(layer) for layer in vectors)
    shared: dict[str, Any] = {}

    def adder(layer: int, vector: torch.Tensor) -> Callable[..., Any]:
        calls = [0]

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            hidden = _block_input(args, kwargs)
            first = calls[0] == 0
            calls[0] += 1
            if layer == lowest and first and gate is not None:
                shared["factor"] = gate(hidden).to(hidden.device, hidden.dtype)
            vec = vector.to(hidden.device, hidden.dtype)
            if "factor" in shared:
                vec = vec * shared["factor"][:, None]
            if first:
                weights = torch.zeros(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
                if "prompt" in positions:
                    mask = mask_seen.get("mask")
                    weights = mask.to(hidden.device, hidden.dtype) if mask is not None and mask.shape == weights.shape \
                        else torch.ones_like(weights)
                if "last_prompt" in positions:
                    weights[:, -1] = 1.0
                if not bool(weights.any()):
                    return None
                return _with_block_input(args, kwargs, hidden + weights[..., None] * vec[:, None, :])
            if "generated" not in positions:
                return None
            return _with_block_input(args, kwargs, hidden + vec[:, None, :])

        return hook

    with ExitStack() as stack:
        mask_seen = stack.enter_context(_prompt_mask(model))
        for layer, vector in sorted(vectors.items()):
            handle = modules[int(layer)].register_forward_pre_hook(adder(int(layer), vector.detach()),
                                                                   with_kwargs=True, prepend=True)
            stack.callback(handle.remove)
        yield


@contextmanager
def ablate(model: Any, direction: torch.Tensor, rows: torch.Tensor | None = None) -> Iterator[None]:
    """While active, x <- x - (x·r̂)r̂ at every block input and every attention and MLP output, at every
    position (the public code's `get_all_direction_ablation_hooks`). `rows` ([batch] 0/1), if given,
    limits the ablation to those samples."""
    r_hat = unit(direction.detach().float())
    cast: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def project_out(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in cast:
            cast[key] = (r_hat.to(x.device, x.dtype), None if rows is None else rows.to(x.device, x.dtype))
        d, keep = cast[key]
        removed = (x @ d).unsqueeze(-1) * d
        return x - (removed if keep is None else keep.view(-1, *[1] * (x.ndim - 1)) * removed)

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        return _with_block_input(args, kwargs, project_out(_block_input(args, kwargs)))

    def post(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        return _replace_output(output, project_out(_output(output)))

    with ExitStack() as stack:
        for layer in decoder_layers(model):
            handles = [layer.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)]
            handles += [sub.register_forward_hook(post, prepend=True) for sub in sublayers(layer)]
            for handle in handles:
                stack.callback(handle.remove)
        yield


def project(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """x·r̂ over the last dimension in float64 on the CPU (one formula for calibration and the gate)."""
    return (x.detach().to("cpu", torch.float64) * r_hat.to("cpu", torch.float64)).sum(-1)


def template_suffix_ids(processor: Any, tokenizer: Any) -> list[int]:
    """The token ids the chat template puts after the user's text up to the assistant's first token
    (the public code's `eoi_toks`: the template's text after `{instruction}`, tokenised alone)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": SENTINEL}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if SENTINEL not in rendered:
        raise RuntimeError("the chat template dropped the user's text; cannot find the post-instruction tokens")
    suffix = rendered.split(SENTINEL)[-1]
    return [int(i) for i in tokenizer(suffix, add_special_tokens=False)["input_ids"]]
