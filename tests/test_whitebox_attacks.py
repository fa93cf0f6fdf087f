"""White-box attacks as attack components: the budget holds exactly after saving and reloading, a
resumed optimisation equals an uninterrupted one, a cached one is not redone, transfer and adaptive
images differ, transfer-only defenses are refused with the reason, and
`realign run` / `report --matrix` carry the three regimes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tests.attack_fixtures  # noqa: F401  (registers tiny-harm-test)
from harness.cli import main
from harness.contracts.backend import user_request
from harness.errors import DataError
from harness.images import load_image
from harness.registry import attacks, defenses
from harness.spec import SpecError
from harness.whitebox import store
from harness.whitebox.pixels import Pipeline, from_image, to_image
from harness.whitebox.status import STATUS
from tests.whitebox_fixtures import install, interrupted_then_resumed, run_attack, samples

CMRM = "cmrm:positions=last_prompt+generated,alpha=1"


@pytest.fixture(scope="module")
def backend(tiny_backend_for):
    return tiny_backend_for("llava")


def test_the_budget_and_pixel_range_hold_exactly_after_saving_and_reloading(backend, tmp_path):
    _, out = run_attack(backend, "pgd:eps=3,steps=4,checkpoint_every=2", tmp_path)
    pipe = Pipeline.for_backend(backend)
    for s, clean in zip(out, samples(2)):
        rec = s.meta["attack"]
        image = load_image(s.image)
        u, u0 = from_image(image), pipe.initial(backend, clean.image)
        assert image.size == (28, 28) and int(u.min()) >= 0 and int(u.max()) <= 255
        assert int((u - u0).abs().max()) == rec["linf"] <= 3 and rec["eps"] == 3 and rec["steps"] == 4
        sent = backend.encode([user_request("x", image)])
        assert torch.allclose(sent["pixel_values"][0], pipe(u.unsqueeze(0).float() / 255).values[0], atol=1e-6)
        assert s.meta["query"] == clean.text and s.text == clean.text and rec["target"] == ["Sure, here"]
    entry = store.Entry(Path(out[0].meta["attack"]["image"]).parent, "", {})
    tampered = from_image(load_image(out[0].image))
    tampered[0, 0, 0] = (int(tampered[0, 0, 0]) + 128) % 256
    to_image(tampered).save(entry.image_path)
    with pytest.raises(DataError):
        entry.load_result(3)


@pytest.mark.parametrize("spec", ["pgd:eps=8,steps=6,checkpoint_every=2,loss=both,through=shiftdc:positions=last_prompt+generated;layers=half,refresh=4",
                                  "visual_adv:eps=8,steps=6,checkpoint_every=2,targets_per_step=2"])
def test_a_resumed_optimisation_equals_an_uninterrupted_one(backend, tmp_path, monkeypatch, spec):
    defense = install(backend, "shiftdc:positions=last_prompt+generated,layers=half") if "through=" in spec else None
    _, whole = run_attack(backend, spec, tmp_path / "whole", defense)
    resumed = interrupted_then_resumed(backend, spec, tmp_path / "split", lambda: defense, 5, monkeypatch)
    for a, b in zip(whole, resumed):
        assert b.meta["attack"]["cache"] == "resumed" and a.meta["attack"]["cache"] == "optimised"
        assert torch.equal(from_image(load_image(a.image)), from_image(load_image(b.image)))
        assert a.meta["attack"]["final_loss"] == b.meta["attack"]["final_loss"]
    if spec.startswith("visual_adv"):  # one universal image, each sample's own request as the text
        assert len({s.meta["attack"]["image"] for s in resumed}) == 1
        assert [s.text for s in resumed] == [s.text for s in samples(2)]


def test_a_cached_optimisation_is_not_redone(backend, tmp_path, monkeypatch):
    _, first = run_attack(backend, "pgd:eps=4,steps=2", tmp_path)
    monkeypatch.setattr("attacks.pgd.optimise", lambda *a, **k: pytest.fail("optimised again"))
    _, again = run_attack(backend, "pgd:eps=4,steps=2", tmp_path)
    assert [s.meta["attack"]["cache"] for s in again] == ["hit", "hit"]
    assert [s.meta["attack"]["sha256"] for s in again] == [s.meta["attack"]["sha256"] for s in first]
    monkeypatch.undo()
    _, other = run_attack(backend, "pgd:eps=4,steps=2", tmp_path, seed=1)  # another seed: another key
    assert [s.meta["attack"]["cache"] for s in other] == ["optimised", "optimised"]


def test_transfer_and_adaptive_images_differ(backend, tmp_path):
    common = "eps=16,steps=4,random_start=false"
    transfer, t_out = run_attack(backend, f"pgd:{common}", tmp_path)
    adaptive, a_out = run_attack(backend, f"pgd:{common},through={CMRM.replace(',', ';')}", tmp_path, install(backend, CMRM))
    assert transfer.family() == adaptive.family()
    for t, a in zip(t_out, a_out):
        assert not torch.equal(from_image(load_image(t.image)), from_image(load_image(a.image)))
    assert adaptive.cell_identity(CMRM)["regime"] == "adaptive" and transfer.cell_identity(CMRM)["regime"] == "transfer"
    assert adaptive.cell_identity("none")["regime"] == "cross"
    assert adaptive.cell_identity("ecso")["evaluated_defense"]["whitebox_status"] == "transfer-only"


def test_every_defense_has_a_stated_status_and_transfer_only_ones_are_refused():
    assert set(defenses.names()) <= set(STATUS)
    for spec in ("pgd:through=ecso", "visual_adv:through=jailguard:mode=text", "pgd:through=adashield:mode=adaptive",
                 "pgd:through=qguard"):
        with pytest.raises(SpecError, match="transfer-only"):
            attacks.build(spec)


def test_run_and_matrix_carry_the_three_regimes(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "run"
    common = "eps=8,steps=2,target=Sure"
    args = ["run", "--model", str(tiny_model_path("llava")), "--attack", "none", f"pgd:{common}",
            f"pgd:{common},through=cmrm:level=sample", "--defense", "none", "cmrm:level=sample",
            "--task", "tiny-harm-test", "--judge", "keywords", "--max-new-tokens", "4", "--batch-size", "2",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    records = json.loads((out / "results.json").read_text())["results"]
    regimes = {(r["attack"], r["defense"]): r["identity"]["attack"].get("regime") for r in records}
    assert regimes[(f"pgd:{common}", "cmrm:level=sample")] == "transfer"
    assert regimes[(f"pgd:{common},through=cmrm:level=sample", "cmrm:level=sample")] == "adaptive"
    assert regimes[(f"pgd:{common},through=cmrm:level=sample", "none")] == "cross"
    assert len(list((out / "whitebox" / "pgd").iterdir())) == 8  # 4 samples x (transfer, adaptive)
    capsys.readouterr()
    assert main(["report", str(out), "--matrix"]) == 0
    text = capsys.readouterr().out
    assert "| defense | attack | no attack | transfer | adaptive |" in text
    table = json.loads((out / "matrix.json").read_text())["tables"][0]
    row = next(r for r in table["regimes"] if r["defense"] == "cmrm:level=sample")
    assert row["attack"] == f"pgd:{common}" and row["none"] and row["transfer"] and row["adaptive"]
    assert main(args) == 0  # resumed: nothing regenerated, nothing optimised


def test_a_state_fitted_now_and_loaded_from_its_file_give_one_cache_key(backend, tmp_path):
    """The through-defense built for a cross cell loads the state its own cells fitted: same key, so
    the adaptive image is optimised once per run."""
    fresh = install(backend, CMRM)
    path = fresh.state.save(tmp_path / "cmrm.safetensors")
    loaded = defenses.build(CMRM)
    loaded.use_state(loaded.load_state(path), backend)
    assert loaded.state.manifest != fresh.state.manifest
    assert store.defense_fingerprint(loaded) == store.defense_fingerprint(fresh)
