"""The independent reference for tests/test_refusal_dir.py: transformers and hooks written here, one
sample at a time. No project code (`tests.reference` loads the model with transformers only), so a test
comparing the defense with it compares two implementations, not one with itself.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tests.reference import Reference


def _x(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def hooks(pairs):
    handles = []
    try:
        for module, kind, fn in pairs:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def ref_block_inputs(ref: Reference, text: str, last: int) -> torch.Tensor:
    """[last, L, H]: what each decoder layer receives, at the last positions of the prompt."""
    seen = {}
    pairs = [(layer, "pre", lambda m, a, k, i=i: seen.__setitem__(i, _x(a, k)[0, -last:].float().clone()))
             for i, layer in enumerate(ref.layers)]
    with hooks(pairs), torch.no_grad():
        ref.model(**ref.inputs(text, None))
    return torch.stack([seen[i] for i in range(len(ref.layers))], dim=1)


def ref_suffix_length(ref: Reference) -> int:
    """Tokens after the user's text: the full prompt's ids minus those of the prompt cut at the text's end."""
    text = "hello there"
    prompt = ref.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                               add_generation_prompt=True, tokenize=False)
    head = prompt[: prompt.rindex(text) + len(text)]
    tok = ref.processor.tokenizer
    return len(tok(prompt, add_special_tokens=False)["input_ids"]) - len(tok(head, add_special_tokens=False)["input_ids"])


def ref_ablation(ref: Reference, r: torch.Tensor):
    u = r / (r.norm() + 1e-8)

    def out(x):
        return x - (x @ u)[..., None] * u

    pairs = []
    for layer in ref.layers:
        pairs.append((layer, "pre", lambda m, a, k: ((out(_x(a, k)), *a[1:]), k) if a else (a, {**k, "hidden_states": out(_x(a, k))})))
        for sub in (layer.self_attn, layer.mlp):
            pairs.append((sub, "post", lambda m, a, o: (out(o[0]), *o[1:]) if isinstance(o, tuple) else out(o)))
    return hooks(pairs)


def ref_addition(ref: Reference, layer: int, v: torch.Tensor):
    """v added to what block `layer` receives, every position of every call."""
    def fn(m, a, k):
        return ((_x(a, k) + v, *a[1:]), k) if a else (a, {**k, "hidden_states": _x(a, k) + v})
    return hooks([(ref.layers[layer], "pre", fn)])


def ref_last_logits(ref: Reference, text: str, image=None) -> torch.Tensor:
    with torch.no_grad():
        return ref.model(**ref.inputs(text, image)).logits[0, -1].double()


def ref_generate(ref: Reference, text: str, image, context=None, n: int = 4) -> str:
    inputs = ref.inputs(text, image)
    with (context or hooks([])), torch.no_grad():
        out = ref.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return ref.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@contextmanager
def record_stream(model):
    """Per call of each layer: what it receives (after any edit hook) and what it returns."""
    layers = model.get_decoder().layers
    got = {"in": {i: [] for i in range(len(layers))}, "out": {i: [] for i in range(len(layers))}}
    pairs = [(layer, "pre", lambda m, a, k, i=i: got["in"][i].append(_x(a, k).detach().clone())) for i, layer in enumerate(layers)]
    pairs += [(layer, "post", lambda m, a, o, i=i: got["out"][i].append((o[0] if isinstance(o, tuple) else o).detach().clone()))
              for i, layer in enumerate(layers)]
    with hooks(pairs):
        yield got
