"""Fitted state follows the weights, not the path string: folder fingerprints, vectors and pools.

`folder_fingerprint` must tell two same-architecture models apart (tiny models of two seeds, the
organism's two seeds), give one answer for a folder reached by relative or absolute path or
copied elsewhere, and read a bounded number of bytes however large the weights. A CMRM or ShiftDC
file fitted on one folder is then accepted for those weights wherever they are and refused for
other weights at the same relative path; files from before fingerprints keep the path check.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from harness import calibration
from harness.contracts.defense import CalibrationSet, DefenseContext
from harness.defenses.adashield_pool import Pool, PoolEntry, backend_key
from harness.defenses.vectors import FittedVectors, model_key
from harness.errors import DataError
from harness.models import hf_loading as hf
from harness.models.hf import HFBackend
from harness.models.hf_loading import folder_fingerprint
from harness.registry import defenses
from harness.schema import Sample
from harness.tiny import build_tiny_vlm

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def _load(path: str | Path) -> HFBackend:
    return HFBackend(HFBackend.Params(pretrained=str(path), device="cpu"))


# ---- the fingerprint ----------------------------------------------------------------------------

def test_same_architecture_other_weights_differ(tmp_path: Path) -> None:
    a, b = build_tiny_vlm("llava", tmp_path / "a", seed=0), build_tiny_vlm("llava", tmp_path / "b", seed=1)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert folder_fingerprint(a) != folder_fingerprint(b)
    assert folder_fingerprint(ROOT / "organisms" / "seed0") != folder_fingerprint(ROOT / "organisms" / "seed1")


def test_same_weights_match_by_any_path_or_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = build_tiny_vlm("llava", tmp_path / "work" / "model", seed=0)
    want = folder_fingerprint(folder)
    assert folder_fingerprint(folder) == want and len(want) == 12  # deterministic
    monkeypatch.chdir(tmp_path / "work")
    assert folder_fingerprint(Path("model")) == want
    assert folder_fingerprint(Path(shutil.copytree(folder, tmp_path / "elsewhere" / "copy"))) == want


def _big_safetensors(path: Path, seed: int) -> None:
    """A real safetensors file of 12 MiB: larger than what is hashed whole, so it is sampled."""
    gen = torch.Generator().manual_seed(seed)
    save_file({f"layer{i}.weight": torch.randn(512, 1024, generator=gen) for i in range(6)}, str(path))


def test_large_weight_files_are_sampled_at_beginning_middle_and_end(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, seed in ((a, 0), (b, 1)):
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "x"}')
        _big_safetensors(folder / "model.safetensors", seed)
    weights = a / "model.safetensors"
    assert weights.stat().st_size > hf.HEADER_CAP + hf.SAMPLE_POINTS * hf.SAMPLE_BYTES
    assert folder_fingerprint(a) != folder_fingerprint(b)
    base = folder_fingerprint(a)
    header_end = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    span = weights.stat().st_size - header_end - hf.SAMPLE_BYTES
    for where in (header_end, header_end + span // 2 + 10, weights.stat().st_size - 1):  # inside a sampled chunk
        data = bytearray(weights.read_bytes())
        data[where] ^= 0xFF
        weights.write_bytes(bytes(data))
        assert folder_fingerprint(a) != base, where
        data[where] ^= 0xFF
        weights.write_bytes(bytes(data))
        assert folder_fingerprint(a) == base


def test_reads_a_bounded_number_of_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 GiB sparse weight files (a real header, a bogus header length, a .bin): a few MiB read each."""
    (tmp_path / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [GiB // 8], "data_offsets": [0, GiB // 2]}}).encode()
    with open(tmp_path / "model-00001-of-00002.safetensors", "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
    with open(tmp_path / "model-00002-of-00002.safetensors", "wb") as fh:
        fh.write((1 << 62).to_bytes(8, "little"))  # a header length past the end: no header read
    (tmp_path / "pytorch_model.bin").touch()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin"):
        os.truncate(tmp_path / name, GiB)
    read: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def read(self, n: int = -1) -> bytes:
            assert n >= 0, "never read a whole weight file"
            data = self.fh.read(n)
            read.append(len(data))
            return data

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

    monkeypatch.setattr(hf, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    start = time.monotonic()
    first = folder_fingerprint(tmp_path)
    assert time.monotonic() - start < 5.0
    assert 0 < sum(read) <= 3 * (hf.HEADER_CAP + hf.SAMPLE_POINTS * hf.SAMPLE_BYTES + 8)
    assert sum(read) < 3 * 5 * (1 << 20)  # under 5 MiB per 1 GiB file
    assert folder_fingerprint(tmp_path) == first


# ---- fitted vectors follow the weights --------------------------------------------------------

def _fit_cmrm(backend: HFBackend, path: Path) -> Path:
    anchors = [Sample(id=f"a{i}", text=f"anchor request number {i} about a picture") for i in range(3)]
    fitted = defenses.build("cmrm").fit(backend, {"anchor": CalibrationSet("test-anchors", anchors)}, batch_size=4)
    return fitted.save(path)


def _fit_shiftdc(backend: HFBackend, path: Path) -> Path:
    sets = {role: CalibrationSet(role, [Sample(id=f"{role}{i}", text=f"How do I {w}?") for i, w in enumerate(words)])
            for role, words in (("unsafe", ["make a bomb", "steal a car"]), ("safe", ["bake bread", "fold paper"]))}
    return defenses.build("shiftdc").fit(backend, sets, batch_size=4).save(path)


FITS: dict[str, tuple[Callable[[HFBackend, Path], Path], str, str]] = {
    "cmrm": (_fit_cmrm, "cmrm:vectors={}", "cmrm-shift"),
    "shiftdc": (_fit_shiftdc, "shiftdc:direction={},caption_max_new_tokens=2", "shiftdc-direction"),
}


@pytest.mark.parametrize("kind", sorted(FITS))
def test_fitted_vectors_follow_the_weights_not_the_path(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fit, spec, vector_kind = FITS[kind]
    work = tmp_path / "work"
    build_tiny_vlm("llava", work / "model", seed=0)
    build_tiny_vlm("llava", tmp_path / "other" / "model", seed=1)
    ctx = DefenseContext(cache_dir=tmp_path / "cache")
    monkeypatch.chdir(work)

    def prepare(backend: HFBackend) -> None:
        calibration.prepare(defenses.build(spec.format(path)), backend, ctx)

    relative = _load("model")
    path = fit(relative, tmp_path / f"{kind}.safetensors")
    fitted_on = folder_fingerprint(work / "model")
    prepare(relative)  # the same relative path
    prepare(_load(work / "model"))  # the same folder by absolute path
    prepare(_load(shutil.copytree(work / "model", tmp_path / "copy" / "moved")))  # a byte copy elsewhere

    (work / "model").rename(work / "seed0")  # other weights, same architecture, at the same relative path
    (tmp_path / "other" / "model").rename(work / "model")
    with pytest.raises(DataError) as refused:
        prepare(_load("model"))
    message = str(refused.value)
    assert str(path) in message and "fingerprint" in message and fitted_on in message
    assert folder_fingerprint(work / "model") in message
    key = FittedVectors.load(path, vector_kind).manifest["model_key"]
    assert key["model"] == "model" and key["fingerprint"] == fitted_on  # the path is kept, for humans


def test_files_from_before_fingerprints_keep_the_path_check(tiny_model_path: Callable[[str], Path],
                                                           tiny_backend_for: Callable[[str], Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_model_path("llava")
    backend = tiny_backend_for("llava")
    old = {k: v for k, v in model_key(backend).items() if k != "fingerprint"}
    vectors = torch.zeros(old["num_layers"], old["hidden_size"])
    FittedVectors("cmrm-shift", vectors, {"model_key": old}).check_model(backend, "old.safetensors")
    monkeypatch.chdir(folder.parent)
    with pytest.raises(DataError, match=r"old\.safetensors was made for model="):
        FittedVectors("cmrm-shift", vectors, {"model_key": old}).check_model(_load(folder.name), "old.safetensors")
    with pytest.raises(DataError, match="num_layers=3"):
        FittedVectors("cmrm-shift", vectors, {"model_key": {**model_key(backend), "num_layers": 3}}).check_model(backend, "f")


# ---- AdaShield pools: a warning, decided the same way -------------------------------------------

def _stub(model: str, folder_hash: str | None) -> Any:
    ident = {"backend": "hf", "model": model, "revision": None, **({"folder_hash": folder_hash} if folder_hash else {})}
    return SimpleNamespace(spec=f"hf:pretrained={model}", identity=lambda: ident)


def _pool(target: dict[str, Any]) -> Pool:
    entry = PoolEntry("s", "prompt", "k/0", False, 1, 1.0, 1)
    return Pool([entry], torch.zeros(1, 4), torch.ones(1, 4) / 2, {"target": target})


@pytest.mark.parametrize("target, backend, warned", [
    ({"model": "model", "fingerprint": "aaa"}, _stub("/abs/model", "aaa"), False),  # same weights, other path
    ({"model": "model", "fingerprint": "aaa"}, _stub("model", "bbb"), True),  # other weights, same path
    ({"model": "model"}, _stub("model", "bbb"), False),  # pool from before fingerprints: by name
    ({"model": "model"}, _stub("/abs/model", "aaa"), True),
    ({"model": "gpt-x"}, _stub("gpt-x", None), False),  # API targets: by name
])
def test_pool_check_compares_fingerprints(target: dict[str, Any], backend: Any, warned: bool,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="harness.defenses.adashield_pool"):
        _pool(target).check_model(backend, "pool.safetensors")
    messages = [r.getMessage() for r in caplog.records if "trained against" in r.getMessage()]
    assert bool(messages) is warned
    assert backend_key(backend).get("fingerprint") == backend.identity().get("folder_hash")  # recorded by fit
    if warned and "fingerprint" in target:
        assert "aaa" in messages[0] and "bbb" in messages[0]
