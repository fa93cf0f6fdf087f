"""QGuard's threshold calibration (harness/defenses/qguard.py, qguard_state.py): τ against the k-th
largest rule written out here, the boundary (a risk equal to τ is answered), the state file's round
trip and its refusal for another guard or other risk settings, the calibration stage's cache, and
`realign fit` on tiny LLaVA whose file a later defense applies to the same risks.

The scripted guard answers every question about a prompt "level N" with P(yes) = N / 10, so each
sample's risk is known in advance (the graph score of 35 equal answers)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import calibration
from harness.contracts.backend import Backend, Completion, GenerationParams, Request
from harness.contracts.defense import CalibrationSet, DefenseContext
from harness.defenses.qguard_state import QGuardState
from harness.errors import DataError
from harness.registry import backends, defenses
from harness.schema import Sample

PARAMS = GenerationParams(max_new_tokens=8)


def text_of(request: Request) -> str:
    return "\n".join(p["text"] for p in request.messages[-1]["content"] if p.get("type") == "text")


def level_logprobs(text: str) -> dict[str, float]:
    """P(yes) = N / 10 for the prompt "level N"; any other prompt a value from its length."""
    prompt = text.rsplit("prompt: ", 1)[-1]
    m = re.fullmatch(r"level (\d)", prompt)
    p = int(m.group(1)) / 10 if m else (len(prompt) % 9 + 1) / 10
    return {"Yes": math.log(p), "No": math.log(1 - p)}


class NamedGuard(Backend):
    """A target that answers "answer: <text>" and a guard scripted by `level_logprobs`; its model
    name is what a fitted state is keyed by. Registered as a backend for separate-guard specs."""

    @dataclass
    class Params:
        model: str = "g"

    def __init__(self, params: Any = None) -> None:
        self.model = params.model if params is not None else "g"
        self.calls: list[int] = []

    def generate(self, requests: list[Request], params: GenerationParams, edits: Any = None) -> list[Completion]:
        return [Completion(f"answer: {text_of(r)}", 3, 2) for r in requests]

    def next_token_logprobs(self, requests: list[Request], candidates: list[str]) -> list[dict[str, float]]:
        self.calls.append(len(requests))
        return [{c: level_logprobs(text_of(r)).get(c, -math.inf) for c in candidates} for r in requests]

    def identity(self) -> dict[str, Any]:
        return {"backend": "scripted", "model": self.model}


def named(model: str) -> NamedGuard:
    return NamedGuard(NamedGuard.Params(model))


def levels(*ns: int, prefix: str = "b") -> list[Sample]:
    return [Sample(f"{prefix}/{i}", f"level {n}") for i, n in enumerate(ns)]


def ctx(tmp_path: Path, ids: tuple[str, ...] = ()) -> DefenseContext:
    return DefenseContext(cache_dir=tmp_path, eval_ids=frozenset(ids), batch_size=8)


@pytest.fixture
def named_guard_spec(monkeypatch: pytest.MonkeyPatch) -> str:
    backends.names()  # built-ins registered before the registry is swapped for a copy
    monkeypatch.setattr(backends, "_entries", dict(backends._entries))
    backends.register("qguard-named-test")(NamedGuard)
    return "qguard-named-test"


def test_calibrated_tau_is_the_kth_largest_benign_risk_and_a_risk_at_tau_is_answered():
    target = named("m1")
    benign = levels(9, 1, 7, 3, 8, 7, 2, 5, 4, 6)  # n = 10; the third largest (level 7) is tied
    unsafe = levels(6, 9, 8, prefix="u")
    d = defenses.build("qguard:guard=self,calibration=unused,calibration_unsafe=unused,fpr=0.2")
    state = d.fit(target, {"benign": CalibrationSet("b", benign), "unsafe": CalibrationSet("u", unsafe)}, batch_size=4)
    assert target.calls == [140, 140, 70, 105]  # 35 questions per sample, one guard call per batch of 4
    risks, bad = state.risks["benign"].tolist(), state.risks["unsafe"].tolist()
    assert risks == pytest.approx([d.score([int(s.text[-1]) / 10] * 35)[0] for s in benign], abs=1e-12)
    # the rule, written out: k = floor(0.2 * 10) = 2 benign risks may lie strictly above τ
    tau = sorted(risks, reverse=True)[math.floor(0.2 * len(risks))]
    assert state.manifest["tau"] == tau == risks[2] == risks[5] and state.manifest["calibration_fpr"] == 0.2
    pairs = [(u, b) for u in bad for b in risks]
    assert state.manifest["auroc_calibration"] == pytest.approx(
        (sum(u > b for u, b in pairs) + 0.5 * sum(u == b for u, b in pairs)) / len(pairs))
    assert state.manifest["calibration_tpr"] == pytest.approx(2 / 3)  # levels 9 and 8 lie above τ, 6 does not
    d.use_state(state, target)
    gens = d.generate(target, benign, PARAMS)
    assert [g.trace["flagged"] for g in gens] == [r > tau for r in risks] and sum(r > tau for r in risks) == 2
    assert [g.trace["path"] for g in (gens[2], gens[5])] == ["answered"] * 2  # risk exactly τ: answered
    assert gens[2].output == "answer: level 7" and gens[0].trace["path"] == "blocked"
    assert (gens[0].trace["threshold"], gens[0].trace["threshold_source"]) == (tau, "calibrated")
    assert (d.identity()["threshold"], d.identity()["threshold_source"]) == (tau, "calibrated")


def test_state_round_trips_and_is_refused_for_another_guard_or_other_settings(tmp_path, named_guard_spec):
    benign = levels(1, 3, 5, 7, 9)
    fitted = defenses.build("qguard:guard=self,calibration=unused").fit(named("m1"), {"benign": CalibrationSet("b", benign)})
    path = fitted.save(tmp_path / "qg.safetensors")
    d = defenses.build(f"qguard:guard=self,threshold_file={path},fpr=0.2")
    loaded = d.load_state(str(path) + ".json")  # the sidecar names the same state
    assert loaded.risks["benign"].tolist() == fitted.risks["benign"].tolist() and "unsafe" not in loaded.risks
    assert loaded.manifest == {**fitted.manifest, "kind": "qguard-risks"} and loaded.calibration_ids() == {s.id for s in benign}
    calibration.prepare(d, named("m1"), ctx(tmp_path))
    assert d.tau == sorted(fitted.risks["benign"].tolist())[-2]  # fpr 0.2 of 5: one may lie above
    assert d.identity()["threshold_file_sha256"] and d.identity()["threshold_source"] == "calibrated"
    # guard=self on another model: another guard, refused by the calibration stage
    with pytest.raises(DataError, match="calibrated with guard=self on m1"):
        calibration.prepare(defenses.build(f"qguard:guard=self,threshold_file={path}"), named("m2"), ctx(tmp_path))
    # a separate guard that is another model: refused, whatever the target
    other = defenses.build(f"qguard:guard={named_guard_spec}:model=m2,threshold_file={path}")
    with pytest.raises(DataError, match=r"calibrated with guard 'self' \(m1.*guard 'qguard-named-test:model=m2' is m2"):
        calibration.prepare(other, named("m1"), ctx(tmp_path))
    # the same model as a separate guard gives the same risks: accepted
    calibration.prepare(defenses.build(f"qguard:guard={named_guard_spec}:model=m1,threshold_file={path}"),
                        named("m1"), ctx(tmp_path))
    with pytest.raises(DataError, match="damping=0.85"):
        calibration.prepare(defenses.build(f"qguard:guard=self,threshold_file={path},damping=0.8"), named("m1"), ctx(tmp_path))
    with pytest.raises(DataError, match="allow_overlap"):
        calibration.prepare(defenses.build(f"qguard:guard=self,threshold_file={path}"), named("m1"), ctx(tmp_path, ("b/0",)))
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(DataError, match="unreadable"):
        QGuardState.load(tmp_path / "bad.safetensors")


def test_a_separate_guards_state_does_not_depend_on_the_target(tmp_path, named_guard_spec):
    spec = f"qguard:guard={named_guard_spec}:model=g1"
    state = defenses.build(f"{spec},calibration=unused").fit(named("t1"), {"anchor": CalibrationSet("b", levels(2, 4, 6))})
    assert state.manifest["guard"]["key"]["model"] == "g1" and state.manifest["target"]["model"] == "t1"
    path = state.save(tmp_path / "g1.safetensors")
    d = defenses.build(f"{spec},threshold_file={path}")
    calibration.prepare(d, named("t2"), ctx(tmp_path))  # another target, the same guard: accepted
    assert d.tau == max(state.risks["benign"].tolist())
    with pytest.raises(DataError, match="'qguard-named-test:model=g1'.*guard 'self' is t2"):
        calibration.prepare(defenses.build(f"qguard:guard=self,threshold_file={path}"), named("t2"), ctx(tmp_path))


def test_the_calibration_stage_fits_once_and_bad_combinations_are_refused(tmp_path):
    spec = "qguard:guard=self,calibration=demo:images=none,calibration_limit=4"
    target = named("m1")
    with pytest.raises(RuntimeError, match="calibration stage"):
        defenses.build(spec).generate(target, levels(1), PARAMS)
    d = defenses.build(spec)
    calibration.prepare(d, target, ctx(tmp_path))
    assert target.calls == [140] and len(list(tmp_path.glob("qguard-*.safetensors"))) == 1
    again = defenses.build(spec)
    calibration.prepare(again, target, ctx(tmp_path))
    assert target.calls == [140] and again.tau == d.tau is not None
    nested = defenses.build("qguard:guard=self,calibration=organism:split=calibration_benign;templates=1")
    assert nested.calibration().sets == {"benign": "organism:split=calibration_benign,templates=1"}
    assert defenses.build("qguard:guard=self").calibration() is None
    for bad, why in (("threshold=0.6,calibration=demo", "threshold= .a fixed τ. or calibration="),
                     ("threshold=0.6,threshold_file=x", "not both"), ("calibration=demo,threshold_file=x", "not both"),
                     ("calibration_unsafe=demo", "give calibration= too"), ("fpr=1", "fpr")):
        with pytest.raises(ValueError, match=why):
            defenses.build(f"qguard:guard=self,{bad}")


def test_realign_fit_on_tiny_llava_then_the_file_sets_tau_on_the_same_risks(tiny_model_path, tiny_backend_for, tmp_path):
    from harness.cli import main

    model, out = str(tiny_model_path("llava")), tmp_path / "qguard.safetensors"
    spec = "qguard:guard=self,calibration=organism:split=calibration_benign,calibration_limit=4,fpr=0.25"
    assert main(["fit", "--model", model, "--defense", spec, "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    state = QGuardState.load(out)
    risks = state.risks["benign"].tolist()
    assert len(risks) == 4 and state.manifest["guard"]["spec"] == "self" and state.manifest["model_spec"] == model
    assert state.manifest["tau"] == sorted(risks, reverse=True)[math.floor(0.25 * 4)]
    backend = tiny_backend_for("llava")  # the same folder: matched by its fingerprint
    d = defenses.build(f"qguard:guard=self,threshold_file={out},fpr=0.25")
    calibration.prepare(d, backend, ctx(tmp_path))
    assert d.tau == state.manifest["tau"]
    (bench,) = calibration.load_sets({"benign": "organism:split=calibration_benign"}, 4).values()
    assert [s.id for s in bench.samples] == state.manifest["calibration_benign"]["ids"]
    gens = d.generate(backend, bench.samples, PARAMS)
    assert [g.trace["risk"] for g in gens] == [round(r, 6) for r in risks]  # the path generation takes
    assert [g.trace["flagged"] for g in gens] == [r > d.tau for r in risks]
    with pytest.raises(DataError, match="calibrated with guard=self on"):
        calibration.prepare(defenses.build(f"qguard:guard=self,threshold_file={out}"), named("m2"), ctx(tmp_path))
