"""`hf:...,compile=true`: a static KV cache and compiled decode steps give the outputs of the
plain backend, steering included, without recompiling for each new edit.

Most checks compile with `realign_counting`, a backend registered below that wraps `aot_eager`
(dynamo tracing and AOT autograd, the path inductor takes, minus code generation) and counts how
often it compiles and how often a compiled graph runs; one test runs inductor itself. The eager
reference is the session's plain tiny LLaVA backend (float32, greedy).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo import list_backends, lookup_backend, register_backend

from harness import calibration
from harness.cli import main
from harness.contracts.backend import GenerationParams, user_request
from harness.errors import ModelLoadError
from harness.models.hf import HFBackend
from harness.models.hf_compile import CompiledDecoding
from harness.models.resolve import resolve_backend
from harness.registry import defenses
from harness.schema import Sample
from harness.spec import SpecError
from tests.test_cmrm_shiftdc import ctx, eval_samples, fitted_shiftdc, picture
from tests.test_refusal_dir import built, fake_state

NEW = 5
GREEDY = GenerationParams(max_new_tokens=NEW, min_new_tokens=NEW)
COUNTS = {"compiles": 0, "runs": 0}

if "realign_counting" not in list_backends(exclude_tags=()):

    @register_backend(name="realign_counting")
    def _counting(gm: torch.fx.GraphModule, example_inputs: list, **kwargs):  # type: ignore[no-untyped-def]
        COUNTS["compiles"] += 1
        compiled = lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):  # type: ignore[no-untyped-def]
            COUNTS["runs"] += 1
            return compiled(*args)

        return run


def compiled_backend(folder, backend: str = "realign_counting", **extra) -> HFBackend:
    return HFBackend(HFBackend.Params(pretrained=str(folder), device="cpu", dtype="float32", compile=True,
                                      compile_backend=backend, **extra))


@pytest.fixture(scope="module")
def plain(tiny_backend_for):
    backend = tiny_backend_for("llava")
    assert backend.model.dtype == torch.float32
    return backend


@pytest.fixture(scope="module")
def compiled(tiny_model_path):
    """Prompts up to 128 tokens (the tests' questions and ShiftDC's caption prompts) share one cache
    length, so the first test compiles once; the second adds other shapes on purpose."""
    return compiled_backend(tiny_model_path("llava"), pad_to_multiple=128)


def outputs(spec_or_defense, backend, samples, params=GREEDY) -> list[str]:
    d = defenses.build(spec_or_defense) if isinstance(spec_or_defense, str) else spec_or_defense
    return [g.output for g in d.generate(backend, samples, params)]


def counted(fn):
    """(result, compilations, compiled-graph runs) of calling fn()."""
    before = dict(COUNTS)
    result = fn()
    return result, COUNTS["compiles"] - before["compiles"], COUNTS["runs"] - before["runs"]


def test_none_cmrm_shiftdc_equal_the_plain_backend_and_new_edits_do_not_recompile(plain, compiled, tmp_path):
    samples = eval_samples()  # 8: six with a picture, two text-only
    base, compiles, runs = counted(lambda: outputs("none", compiled, samples))
    assert base == outputs("none", plain, samples)
    assert compiles >= 1 and runs >= NEW - 1  # the decode steps went through the compiled graph

    layers = plain.decoder_size().num_layers
    cmrm = f"cmrm:level=sample,alpha=0.5,layers={layers // 2}-{layers - 1},positions=prompt+generated"
    got, compiles, cmrm_runs = counted(lambda: outputs(cmrm, compiled, samples))
    want = outputs(cmrm, plain, samples)
    assert want != base  # the edit changes the answers, so equality below means the same edit
    assert got == want
    assert compiles == 0 and cmrm_runs == runs  # same shapes, another edit: the same graph, no recompiling

    direction = fitted_shiftdc(plain, tmp_path)
    spec = f"shiftdc:direction={direction},caption_max_new_tokens=3,alpha=4,positions=last_prompt+generated"
    steered = {}
    for name, backend in (("plain", plain), ("compiled", compiled)):
        d = defenses.build(spec)
        calibration.prepare(d, backend, ctx(tmp_path))
        steered[name] = outputs(d, backend, samples)
    assert steered["plain"] != base and steered["compiled"] == steered["plain"]


def test_other_batch_size_and_prompt_length(plain, compiled):
    long_text = "please describe every part of this picture in detail, " * 6
    samples = [Sample(f"l{i}", long_text + str(i), image=picture(i) if i != 1 else None) for i in range(3)]
    layers = plain.decoder_size().num_layers
    assert outputs("none", compiled, samples) == outputs("none", plain, samples)
    cmrm = f"cmrm:level=sample,alpha=0.5,layers=0-{layers - 1}"
    assert outputs(cmrm, compiled, samples) == outputs(cmrm, plain, samples)
    requests = [user_request(s.text, s.image) for s in samples]
    unpadded = compiled.encode(requests)["input_ids"].shape[1]
    padded = compiled._encode(requests, 128)["input_ids"].shape[1]
    assert padded % 128 == 0 and padded >= unpadded > 128  # longer than the first test's prompts: a longer cache


def test_other_hooks_run_uncompiled_and_count(plain, compiled):
    """A hook registered after compiling would be ignored by the compiled graph: the backend sees
    it and runs that call uncompiled, with the hook; without it, compiled again."""
    samples = eval_samples()[4:8]

    def shift(module, args, output):
        return (output[0] + 3.0, *output[1:]) if isinstance(output, tuple) else output + 3.0

    results = {}
    for name, backend in (("plain", plain), ("compiled", compiled)):
        handle = backend.model.get_decoder().layers[1].register_forward_hook(shift)
        try:
            results[name], _, runs = counted(lambda b=backend: outputs("none", b, samples))
        finally:
            handle.remove()
        if name == "compiled":
            assert runs == 0
    assert results["plain"] != outputs("none", plain, samples)
    assert results["compiled"] == results["plain"]
    again, _, runs = counted(lambda: outputs("none", compiled, samples))
    assert runs > 0 and again == outputs("none", plain, samples)

    state = fake_state(plain, scale=4.0)  # refusal_dir hooks block inputs itself: uncompiled, same answers
    want = outputs(built(plain, "refusal_dir:alpha=1", state), plain, samples)
    assert want != again
    got, _, runs = counted(lambda: outputs(built(compiled, "refusal_dir:alpha=1", state), compiled, samples))
    assert got == want and runs == 0


def test_defenses_that_call_generate_themselves(plain, compiled):
    samples = eval_samples()[:3]
    for spec in ("coca", "ecso:caption_max_new_tokens=3"):
        assert outputs(spec, compiled, samples) == outputs(spec, plain, samples), spec


def test_qwen2_vl(tiny_backend_for, tiny_model_path):
    plain = tiny_backend_for("qwen2_vl")
    backend = compiled_backend(tiny_model_path("qwen2_vl"))
    samples = eval_samples()[4:7]
    layers = plain.decoder_size().num_layers
    got, _, runs = counted(lambda: outputs("none", backend, samples))
    assert runs > 0 and got == outputs("none", plain, samples)
    cmrm = f"cmrm:level=sample,alpha=0.5,layers=0-{layers - 1}"
    assert outputs(cmrm, backend, samples) == outputs(cmrm, plain, samples)


def test_identity_records_compile(plain, compiled):
    ident = compiled.identity()
    assert ident["compile"] == {"backend": "realign_counting", "mode": "default", "cache": "static"}
    assert ident["pad_to_multiple"] == 128
    fresh = HFBackend(HFBackend.Params(pretrained=compiled.params.pretrained, device="cpu"))
    wrapped = HFBackend.from_loaded(fresh.model, fresh.processor, "in-memory", compile=True)  # benchmarks' route
    assert wrapped.identity()["compile"]["backend"] == "inductor" and wrapped.identity()["pad_to_multiple"] == 64
    assert "compile" not in plain.identity() and "pad_to_multiple" not in plain.identity()


@pytest.mark.parametrize("spec, name", [
    ("hf:pretrained=m,compile=maybe", "compile"),
    ("hf:pretrained=m,compile=true,compile_backend=nope", "compile_backend"),
    ("hf:pretrained=m,pad_to_multiple=0", "pad_to_multiple"),
])
def test_bad_values_are_one_line_errors(spec, name, tmp_path, capsys):
    with pytest.raises(SpecError, match=name):
        resolve_backend(spec)
    assert main(["run", "--model", spec, "--task", "demo", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("realign: error: ") and name in err[0]


def test_offloaded_models_are_refused():
    model = SimpleNamespace(hf_device_map={"language_model": "cuda:0", "lm_head": "cpu"})
    with pytest.raises(ModelLoadError, match="device_map"):
        CompiledDecoding(model, "inductor")


def test_inductor(plain, tiny_model_path, monkeypatch):
    """Inductor itself, once (last: it starts from a fresh dynamo state, so it compiles static
    shapes; one compile thread, since a pool of compiler processes costs more than it saves here)."""
    import torch._inductor.config

    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    backend = compiled_backend(tiny_model_path("llava"), "inductor")
    samples = eval_samples()[4:7]
    params = GenerationParams(max_new_tokens=3, min_new_tokens=3)
    assert outputs("none", backend, samples, params) == outputs("none", plain, samples, params)
    cmrm = "cmrm:level=sample,alpha=0.5,layers=1-2"
    assert outputs(cmrm, backend, samples, params) == outputs(cmrm, plain, samples, params)
