"""Ordinary mistakes give one line naming the option, file or path, exit status 2, no traceback.

Every case drives `realign` through `harness.cli.main` (one a real pipe through a subprocess) and
checks the three promises of the README's exit statuses: status 2 for bad input, a single
`realign: error: ...` line that names what to fix, and no Python traceback. None loads a model:
each mistake must be caught before one would load.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.models.hf import HFBackend
from harness.schema import DTYPE_CHOICES, RunConfig
from harness.spec import SpecError
from tests.synthetic_runs import metric, record, write_run

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys: pytest.CaptureFixture[str], *names: str) -> str:
    """The command's stderr, checked to be one error line naming each of `names`."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("realign: error: "), err
    for name in names:
        assert name in lines[0], (name, err)
    return lines[0]


def _run(tmp_path: Path, *options: str, model: str = "x") -> int:
    return main(["run", "--model", model, "--task", "demo", "--out", str(tmp_path / "run"), "--quiet", *options])


# ---- 1. generation options: refused before anything is written or loaded --------------------------
@pytest.mark.parametrize("options, option", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--limit", "-1"], "--limit"),
    (["--limit", "0"], "--limit"),
    (["--do-sample", "--temperature", "-1"], "--temperature"),
    (["--do-sample", "--temperature", "0"], "--temperature"),
    (["--top-p", "2"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--min-new-tokens", "50", "--max-new-tokens", "10"], "--min-new-tokens"),
    (["--dtype", "banana"], "--dtype"),
    (["--device", "banana"], "--device"),
])
def test_run_option_out_of_range(tmp_path, capsys, options, option):
    assert _run(tmp_path, *options) == 2
    _one_line_error(capsys, option)
    assert not (tmp_path / "run").exists()  # refused before the run directory is claimed


def test_python_api_refuses_the_same_values():
    with pytest.raises(SpecError, match="--batch-size"):
        RunConfig(models=["m"], defenses=["none"], tasks=["demo"], batch_size=0)
    with pytest.raises(SpecError, match="--dtype"):
        RunConfig(models=["m"], defenses=["none"], tasks=["demo"], dtype="float64")
    # a config read back from run.json is taken as recorded (old runs stay re-judgeable)
    assert RunConfig.from_json({"models": ["m"], "defenses": ["none"], "tasks": ["demo"], "dtype": "x"}).dtype == "x"


def test_dtype_choices_are_the_hf_backends():
    assert DTYPE_CHOICES == typing.get_args(typing.get_type_hints(HFBackend.Params)["dtype"])


@pytest.mark.parametrize("device, gpus, option", [
    ("cuda", 0, "--device cuda"), ("cuda:3", 1, "--device cuda:3"), ("mps", 0, "--device mps")])
def test_missing_device_refused_at_plan_time(tmp_path, capsys, monkeypatch, device, gpus, option):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert _run(tmp_path, "--device", device) == 2
    line = _one_line_error(capsys, option)
    assert ("cuda:0 to cuda:0" in line) if gpus else ("available" in line)


def test_device_in_the_model_spec_is_named_as_such(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _run(tmp_path, model="hf:pretrained=x,device=cuda") == 2
    _one_line_error(capsys, "device=cuda", "hf:pretrained=x")


def test_cpu_and_auto_devices_pass_the_check(tmp_path, capsys):
    out = _unwritable(tmp_path)[0]
    for device in ("cpu", "auto"):  # refused later only because the run directory cannot be made
        assert main(["run", "--model", "x", "--task", "demo", "--device", device, "--out", out]) == 2
        _one_line_error(capsys, out)


@pytest.mark.parametrize("options, option", [
    (["--batch-size", "0"], "--batch-size"), (["--limit", "0"], "--limit"), (["--dtype", "banana"], "--dtype"),
    (["--device", "cuda:7"], "--device cuda:7")])
def test_fit_options(tmp_path, capsys, monkeypatch, options, option):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "fitted.safetensors"
    assert main(["fit", "--model", "x", "--defense", "cmrm", "--out", str(out), *options]) == 2
    _one_line_error(capsys, option)
    assert not out.exists()


# ---- 2. --out where nothing can be written ---------------------------------------------------------
def _unwritable(tmp_path: Path) -> list[str]:
    """Paths no one can create, root included (permissions would not stop root): below a plain
    file, and on Linux inside /proc."""
    (tmp_path / "file.txt").write_text("not a folder\n")
    return [str(tmp_path / "file.txt" / "out"), *(["/proc/x/out"] if sys.platform == "linux" else [])]


def test_run_and_demo_out_unwritable(tmp_path, capsys):
    for out in _unwritable(tmp_path):
        assert main(["run", "--model", "x", "--task", "demo", "--out", out, "--quiet"]) == 2
        _one_line_error(capsys, out)
    out = _unwritable(tmp_path)[0]
    assert main(["demo", "--out", out, "--quiet"]) == 2
    _one_line_error(capsys, out)


def test_fit_out_unwritable(tmp_path, capsys):
    for out in _unwritable(tmp_path):
        args = ["fit", "--model", "x", "--defense", "cmrm", "--calibration", "demo", "--out", out + "/f.safetensors"]
        assert main(args) == 2
        _one_line_error(capsys, out)


def _a_run(tmp_path: Path, **metrics_) -> Path:
    return write_run(tmp_path / "r", [record("m", "none", "demo", "keywords",
                                             metrics_ or {"asr": metric(0.4, 0.3, 0.5, 24)})])


def test_leaderboard_out_unwritable(tmp_path, capsys):
    run = _a_run(tmp_path)
    for out in _unwritable(tmp_path):
        assert main(["leaderboard", str(run), "--out", out]) == 2
        _one_line_error(capsys, out)


# ---- 3. report on a corrupt results.json -----------------------------------------------------------
@pytest.mark.parametrize("content, problem", [
    ("{not json", "not a readable results.json"),
    ('[1, 2]', "not a realign results.json"),
    ('{"results": {"a": 1}}', "not a realign results.json"),
    ('{"results": [{"metrics": {}}]}', "lacks model"),
    (json.dumps({"results": [record("m", "none", "demo", "keywords", {"asr": {"value": "high"}})]}), "'high'"),
    (json.dumps({"results": [record("m", "none", "demo", "keywords", {"asr": metric(0.4, "x", 0.5)})]}), "low"),
    (json.dumps({"results": [record("m", "none", "demo", "keywords", {"asr": 0.4})]}), "'asr'"),
    (json.dumps({"results": [{**record("m", "none", "demo", "keywords", {}), "n": "many"}]}), "n must be"),
])
def test_report_corrupt_results(tmp_path, capsys, content, problem):
    (tmp_path / "results.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    _one_line_error(capsys, str(tmp_path / "results.json"), problem)


# ---- 4. leaderboard --out that is a file ------------------------------------------------------------
def test_leaderboard_out_is_a_plain_file(tmp_path, capsys):
    run = _a_run(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    assert main(["leaderboard", str(run), "--out", str(notes)]) == 2
    _one_line_error(capsys, str(notes), "is a file")
    assert notes.read_text() == "keep me\n"  # nothing already written is lost
    (tmp_path / "lb.json").mkdir()
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "lb.json")]) == 2
    _one_line_error(capsys, "lb.json", "is a folder")


def test_leaderboard_rejects_a_non_numeric_metric(tmp_path, capsys):
    run = _a_run(tmp_path, asr={"value": "high", "low": None, "high": None, "n": 3})
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "lb")]) == 2
    _one_line_error(capsys, "results.json", "'asr'", "not a number")


# ---- 5. requests:file= on a file that is not text --------------------------------------------------
def test_requests_file_binary_or_not_utf8(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "pic.png"
    Image.new("RGB", (4, 4)).save(png)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("hello\ncaf\xe9\n".encode("latin-1"))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    for path, where in ((png, "line 1"), (latin, "line 2"), (bad_json, "line 2")):
        code = main(["run", "--model", "x", "--task", f"requests:file={path}", "--out", str(tmp_path / f"o-{path.name}"),
                     "--quiet"])
        assert code == 2
        _one_line_error(capsys, str(path), where)


# ---- 6. a closed pipe on stdout ------------------------------------------------------------------------
def test_report_into_a_closed_pipe_is_quiet(tmp_path):
    records = [record(f"model-{i}", "none", "demo", "keywords", {"asr": metric(0.4, 0.3, 0.5, 24)}) for i in range(3000)]
    write_run(tmp_path, records)  # a table far larger than a pipe's buffer, so the writer meets EPIPE
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = f'"{sys.executable}" -m harness.cli report "{tmp_path}" | head -c 10; exit ${{PIPESTATUS[0]}}'
    done = subprocess.run(["bash", "-c", cmd], check=False, cwd=REPO, env=env, capture_output=True, timeout=120)
    assert done.stderr == b"", done.stderr.decode()
    assert len(done.stdout) == 10
    assert done.returncode == 141  # like a Unix tool stopped by SIGPIPE


# ---- 7. OS errors from any layer -----------------------------------------------------------------------
@pytest.mark.parametrize("exc, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/some/file"), "realign: error: /some/file: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/some/dir"), "realign: error: /some/dir: Is a directory"),
    (OSError(errno.ENOSPC, "No space left on device"), "realign: error: No space left on device"),
])
def test_os_errors_are_one_line(tmp_path, capsys, monkeypatch, exc, expected):
    from harness.store import RunDir

    def fail(self):
        raise exc

    monkeypatch.setattr(RunDir, "read_results", fail)
    assert main(["report", str(tmp_path)]) == 2
    assert _one_line_error(capsys) == expected


# ---- 8. gate with a malformed baseline ----------------------------------------------------------------
def test_gate_baseline_with_a_string_metric(tmp_path, capsys):
    run = _a_run(tmp_path)
    base = write_run(tmp_path / "base", [record("m", "none", "demo", "keywords", {"asr": {"value": "high", "n": 3}})])
    assert main(["gate", "--baseline", str(base / "results.json"), "--run", str(run), "--max-asr-increase", "5"]) == 2
    _one_line_error(capsys, "baseline", str(base / "results.json"), "'asr'", "'high'")


def test_gate_leaderboard_baseline_with_a_string_metric(tmp_path, capsys):
    run = _a_run(tmp_path)
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "lb")]) == 0
    capsys.readouterr()
    path = tmp_path / "lb" / "leaderboard.json"
    doc = json.loads(path.read_text())
    doc["entries"][0]["metrics"]["demo|keywords|asr"]["value"] = "high"
    path.write_text(json.dumps(doc))
    assert main(["gate", "--baseline", str(path), "--run", str(run), "--max-asr-increase", "5"]) == 2
    _one_line_error(capsys, str(path), "demo|keywords|asr")
