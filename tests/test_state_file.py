"""Every fitted state goes through one file format (harness.defenses.state_file): the same atomic
write, sidecar manifest and errors for steering vectors, refusal-direction candidates, HiddenDetect
curves, JailGuard's theta and QGuard's threshold file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from harness.defenses.divergence import ThetaState
from harness.defenses.hiddendetect_state import HiddenDetectState
from harness.defenses.qguard_state import QGuardState
from harness.defenses.refusal_dir_state import RefusalDirState
from harness.defenses.state_file import read_state, write_state
from harness.defenses.vectors import FittedVectors
from harness.errors import DataError

STATES = {
    "vectors": (lambda: FittedVectors("cmrm-dataset-shift", torch.randn(3, 4), {"m": 1}),
                lambda p: FittedVectors.load(p, "cmrm-dataset-shift")),
    "refusal_dir": (lambda: RefusalDirState(torch.randn(2, 3, 4), {k: torch.rand(2, 3, dtype=torch.float64)
                                                                   for k in ("ablation_refusal", "steering", "kl")},
                                            {"gate_benign": torch.rand(5, 2, 3, dtype=torch.float64)}, {"m": 1}),
                    RefusalDirState.load),
    "hiddendetect": (lambda: HiddenDetectState({"unsafe": torch.rand(4, 3, dtype=torch.float64),
                                                "safe": torch.rand(5, 3, dtype=torch.float64)}, {"m": 1}),
                     HiddenDetectState.load),
    "jailguard": (lambda: ThetaState(np.random.default_rng(0).random(6), {"theta": 0.1}), ThetaState.load),
    "qguard": (lambda: QGuardState({"benign": np.random.default_rng(1).random(6)}, {"guard": {"spec": "self"}}),
               QGuardState.load),
}


def _tensors(state):
    for name in ("vectors", "candidates", "divergences"):
        if hasattr(state, name):
            yield getattr(state, name)
    for name in ("scores", "gate", "curves", "risks"):
        yield from getattr(state, name, {}).values()


@pytest.mark.parametrize("name", list(STATES))
def test_round_trip_sidecar_and_no_temporary_left(tmp_path, name):
    make, load = STATES[name]
    state = make()
    path = state.save(tmp_path / "sub" / f"{name}.safetensors")
    back = load(path)
    for a, b in zip(_tensors(state), _tensors(back), strict=True):
        assert np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    sidecar = json.loads((tmp_path / "sub" / f"{name}.safetensors.json").read_text())
    assert sidecar == back.manifest and back.manifest["kind"]
    assert load(str(path) + ".json").manifest == back.manifest  # the sidecar names the same state
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [f"{name}.safetensors", f"{name}.safetensors.json"]


@pytest.mark.parametrize("name", list(STATES))
def test_every_kind_of_bad_file_is_one_clear_error(tmp_path, name):
    _, load = STATES[name]
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a state")
    with pytest.raises(DataError, match="unreadable"):
        load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(DataError, match="no realign manifest"):
        load(tmp_path / "bare.safetensors")
    other = "qguard" if name != "qguard" else "jailguard"
    path = STATES[other][0]().save(tmp_path / "other.safetensors")
    with pytest.raises(DataError, match="not"):
        load(path)


def test_required_tensors_and_kind_are_checked(tmp_path):
    path = write_state(tmp_path / "s.safetensors", {"a": torch.zeros(2)}, {"kind": "k"})
    assert read_state(path, "state", "x", framework="pt", kind="k", required=("a",))[1]["a"].shape == (2,)
    with pytest.raises(DataError, match=r"holds 'k' state without b, not 'k'"):
        read_state(path, "state", "x", framework="pt", kind="k", required=("a", "b"))
    with pytest.raises(DataError, match=r"state .* holds 'k' state, not 'j'"):
        read_state(path, "state", "x", framework="pt", kind="j")
