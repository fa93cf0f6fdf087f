"""A new steering defense is a short file on the steering base, outside the package, that runs
through the normal runner: fitted on calibration data by the calibration stage, cached, checked,
traced. The plugin below (at most 25 non-blank lines) adds α times a harmful-minus-harmless
difference-in-means direction at the last prompt token of image inputs; an independent reference
with hand-written hooks must give the same greedy tokens.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.registry import defenses
from harness.runner import run
from harness.schema import RunConfig
from harness.store import RunDir
from tests.reference import Reference

PLUGIN = '''
"""Push: add alpha times a harmful-minus-harmless text direction to image inputs."""
from dataclasses import dataclass, field
import torch
from harness.contracts.defense import CalibrationPlan
from harness.defenses.steering_base import Steer, SteeringDefense
from harness.registry import defense

@defense("push")
class Push(SteeringDefense):
    """Adds alpha times a fitted harmful-minus-harmless direction to image inputs."""
    vectors_kind = "push-direction"

    @dataclass
    class Params:
        alpha: float = 1.0
        layers: str = "top:0.5"
        positions: list[str] = field(default_factory=lambda: ["last_prompt"])
        harmful: str = "organism:split=calibration_harmful"
        harmless: str = "organism:split=calibration_benign"

    def calibration(self):
        return CalibrationPlan("push", sets={"harmful": self.params.harmful, "harmless": self.params.harmless}, limit=6)

    def fit(self, backend, sets, batch_size=8, progress=False):
        means = self.mean_states(backend, {r: [s.query for s in cs.samples] for r, cs in sets.items()}, batch_size)
        return self.fitted_vectors(backend, means["harmful"] - means["harmless"], sets)

    def steer(self, backend, samples, layers):
        on = torch.tensor([float(s.image is not None) for s in samples])
        return Steer(self.params.alpha * self.fitted().vectors[layers] * on[:, None, None], [{"applied": bool(x)} for x in on])
'''


@pytest.fixture()
def push_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "push_plugin.py").write_text(textwrap.dedent(PLUGIN).lstrip(), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("push_plugin")
    yield tmp_path / "push_plugin.py"
    defenses._entries.pop("push", None)  # leave the registry as other tests expect it
    sys.modules.pop("push_plugin", None)
    del module


def test_plugin_is_short_and_registered(push_plugin: Path) -> None:
    lines = [line for line in push_plugin.read_text().splitlines() if line.strip()]
    assert len(lines) <= 25, len(lines)
    assert "push" in defenses.names() and defenses.build("push").requires == frozenset({"steering"})


def test_plugin_runs_fitted_cached_and_matches_a_reference(push_plugin: Path, tmp_path: Path) -> None:
    folder = Path(__file__).resolve().parents[1] / "organisms" / "seed0"  # a real (tiny) model: edits show
    task = "organism:images=shape+none,templates=1,kinds=harmful"
    config = RunConfig(models=[str(folder)], defenses=["push:alpha=1"], tasks=[task], judges=[], limit=6,
                       batch_size=3, max_new_tokens=5, min_new_tokens=5, device="cpu")
    run(config, tmp_path / "run", progress=False)
    records = list(RunDir(tmp_path / "run").cell(str(folder), "push:alpha=1", task).generations().values())
    fitted = list((tmp_path / "run").rglob("fitted/push-*.safetensors"))
    assert len(fitted) == 1  # the calibration stage fitted it once and cached it in the run directory
    assert [r["trace"]["layers"] for r in records] == [[2, 3]] * 6  # top:0.5 of 4 layers

    # Independent reference: the direction from hand-read states, added with a hand-written hook.
    from harness.registry import tasks

    ref = Reference(folder)
    means = {}
    for role, spec in (("harmful", "organism:split=calibration_harmful"), ("harmless", "organism:split=calibration_benign")):
        samples = list(tasks.build(spec).samples())[:6]
        means[role] = torch.stack([ref.states(s.query, None) for s in samples]).mean(0)
    direction = means["harmful"] - means["harmless"]
    changed = 0
    for rec in records:
        sample = next(s for s in tasks.build(task).samples() if s.id == rec["sample"]["id"])
        add = {layer: 1.0 * direction[layer] for layer in (2, 3)} if sample.image is not None else {}
        want = ref.generate(sample.text, sample.image, add, prompt_all=False, last=True, generated=False, n=5)
        assert rec["output"] == want, sample.id
        assert rec["trace"]["applied"] == (sample.image is not None)
        changed += rec["output"] != ref.generate(sample.text, sample.image, None, n=5)
    assert changed  # the edit really moved some image input's tokens
