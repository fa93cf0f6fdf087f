"""The run directory: append-only JSON Lines (through `jsonlines`) with fsync, atomic JSON, and the
resume index; and the readers every later stage (judge, agree, compare) uses to walk a run.

Layout (README, "Run directory"):
    DIR/run.json
    DIR/<model>/<defense>/<task>/generations.jsonl            (attack `none`: the task as released)
    DIR/<model>/<attack>/<defense>/<task>/generations.jsonl   (any other attack)
    DIR/<model>/[<attack>/]<defense>/<task>/verdicts/<judge>.jsonl
    DIR/results.json
The attack level is left out for `none`, so directories written before attacks existed are read
(and resumed) as they are.
Records are written as they are produced, so a killed run loses at most the batch in flight,
and a torn last line (a kill during a write) is dropped with a warning on the next open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import jsonlines

from harness.errors import RunDirError
from harness.lock import BOOKKEEPING
from harness.schema import Generation, RunConfig, Sample, dumps

log = logging.getLogger(__name__)

_SLUG_BAD = re.compile(r"[^A-Za-z0-9._=+,-]+")
MAX_SLUG = 80


def slug(spec: str) -> str:
    """A readable, filesystem-safe directory name for a spec string (hash-suffixed when shortened)."""
    s = _SLUG_BAD.sub("_", spec).strip("._") or "_"
    if len(s) > MAX_SLUG or s != spec:
        s = s[: MAX_SLUG - 9] + "-" + hashlib.sha256(spec.encode()).hexdigest()[:8]
    return s


def _unwritable(path: Path, exc: OSError) -> RunDirError:
    return RunDirError(f"{path}: cannot write ({exc.strerror or exc}); nothing of this write was kept, and the "
                       "records written before are intact: fix the cause and re-run to resume")


def atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so readers never see half a file; on failure (a
    full disk, a permission error) the temporary file is removed and the old file is untouched."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _unwritable(path, exc) from None


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _repair_torn_tail(path: Path) -> None:
    """Make the file end at a record boundary. A last line without its newline that is a complete
    JSON object (a full disk can leave one) is kept and given its newline; a last line that does not
    parse (a write interrupted by a kill) is cut."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            complete = isinstance(json.loads(data[start:]), dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            complete = False
        if complete and not data.endswith(b"\n"):
            fh.write(b"\n")
            log.warning("%s: the last record lacked its newline; kept and completed", path)
        elif not complete:
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", path, len(data) - start)
            fh.truncate(start)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn last line is dropped with a warning, other bad lines are errors
    naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records: list[dict[str, Any]] = []
    with jsonlines.Reader(lines) as reader:
        try:
            for record in reader.iter(skip_empty=True):
                records.append(record)
        except jsonlines.InvalidLineError as exc:
            number = exc.lineno
            if all(not rest.strip() for rest in lines[number:]):
                log.warning("%s line %d: dropping a torn last line", path, number)
            else:
                raise RunDirError(f"{path} line {number} is not valid JSON: {exc}") from None
    return records


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records (canonical one-line JSON) and fsync: once this returns they survive a crash.
    A failed write (full disk) is rolled back to the last complete record and reported."""
    records = list(records)
    if not records:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _repair_torn_tail(path)
        size = path.stat().st_size if path.exists() else 0
    except OSError as exc:
        raise _unwritable(path, exc) from None
    try:
        with open(path, "a", encoding="utf-8") as fh:
            with jsonlines.Writer(fh, dumps=dumps) as writer:
                writer.write_all(records)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise _unwritable(path, exc) from None


def supersede_jsonl(path: Path, records: list[dict[str, Any]], key: str) -> None:
    """Put `records` in the file, each replacing the record with the same `key` value in place (a
    retried error supersedes the failed record; ids are never duplicated), the rest appended. The
    whole file is rewritten atomically, so a kill leaves either the old or the new file."""
    new = {rec[key]: rec for rec in records}
    kept = []
    for rec in read_jsonl(path):
        if rec[key] in new:
            kept.append(new.pop(rec[key]))
        else:
            kept.append(rec)
    kept += list(new.values())
    atomic_write(path, "".join(dumps(r) + "\n" for r in kept))


NO_ATTACK = "none"


def cell_dir(root: Path, model: str, defense: str, task: str, attack: str = NO_ATTACK) -> Path:
    """Where a cell's records live: an attack other than `none` adds a level below the model."""
    under = root / slug(model) if attack == NO_ATTACK else root / slug(model) / slug(attack)
    return under / slug(defense) / slug(task)


class Cell:
    """The records of one (model, attack, defense, task) combination."""

    def __init__(self, root: Path, model: str, defense: str, task: str, attack: str = NO_ATTACK) -> None:
        self.model, self.defense, self.task, self.attack = model, defense, task, attack
        self.dir = cell_dir(root, model, defense, task, attack)
        #: Fitted defense state is shared by every attack: it depends on the model and defense only.
        self.fitted_dir = root / slug(model) / slug(defense) / "fitted"
        self.generations_path = self.dir / "generations.jsonl"
        self._check_identity()

    def _check_identity(self) -> None:
        ident = {"model": self.model, "defense": self.defense, "task": self.task}
        if self.attack != NO_ATTACK:  # cells of `none` keep the cell.json they had before attacks
            ident["attack"] = self.attack
        path = self.dir / "cell.json"
        if path.exists():
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored != ident:
                raise RunDirError(f"{path} belongs to {stored}, not {ident} (directory name collision)")
        else:
            atomic_write_json(path, ident)

    def generations(self) -> dict[str, dict[str, Any]]:
        """Saved generations by sample id (the first record of an id wins)."""
        out: dict[str, dict[str, Any]] = {}
        for rec in read_jsonl(self.generations_path):
            out.setdefault(rec["sample_id"], rec)
        return out

    def append_generations(self, records: list[dict[str, Any]], replace: bool = False) -> None:
        """Append, or (`replace`: some ids are already on disk, e.g. retried errors) supersede them."""
        if replace:
            supersede_jsonl(self.generations_path, records, "sample_id")
        else:
            append_jsonl(self.generations_path, records)

    def verdicts_path(self, judge: str) -> Path:
        return self.dir / "verdicts" / f"{slug(judge)}.jsonl"

    def verdicts(self, judge: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for rec in read_jsonl(self.verdicts_path(judge)):
            out.setdefault(rec["sample_id"], rec)
        return out

    def append_verdicts(self, judge: str, records: list[dict[str, Any]], replace: bool = False) -> None:
        if replace:
            supersede_jsonl(self.verdicts_path(judge), records, "sample_id")
        else:
            append_jsonl(self.verdicts_path(judge), records)

    def write_identity(self, identity: dict[str, Any]) -> None:
        """The identities (model, attack, defense, task) the cell's generations were made with, so a later
        judging stage builds exactly the record the run would have."""
        atomic_write_json(self.dir / "identity.json", identity)

    def identity(self) -> dict[str, Any] | None:
        path = self.dir / "identity.json"
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{path} is not valid JSON: {exc}") from None
        return data if isinstance(data, dict) else None

    def load(self) -> tuple[list[Sample], dict[str, Generation]]:
        """Samples (from the records) and generations, in the order they were generated."""
        samples: list[Sample] = []
        generations: dict[str, Generation] = {}
        for sid, rec in self.generations().items():
            if "sample" not in rec:
                raise RunDirError(f"{self.generations_path}: record {sid!r} has no saved sample; cannot re-judge it")
            samples.append(Sample.from_json(rec["sample"]))
            generations[sid] = Generation.from_json(rec)
        return samples, generations

    def judged_specs(self) -> list[str]:
        """Judge specs with a verdict file in the cell (each read from its file's first record)."""
        folder = self.dir / "verdicts"
        out: list[str] = []
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            records = read_jsonl(path)
            if records and records[0].get("judge") and records[0]["judge"] not in out:
                out.append(str(records[0]["judge"]))
        return out


class RunDir:
    """A run directory bound to one generation configuration."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.run_json = self.root / "run.json"
        self.results_json = self.root / "results.json"

    def load_run_info(self) -> dict[str, Any] | None:
        if not self.run_json.exists():
            return None
        try:
            info = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{self.run_json} is not valid JSON: {exc}") from None
        if not isinstance(info, dict):
            raise RunDirError(f"{self.run_json} is not a realign run.json (expected an object)")
        return info

    def check_compatible(self, identity: dict[str, Any]) -> dict[str, Any] | None:
        """Refuse to mix two configurations in one directory; return the stored run info."""
        if self.root.exists() and not self.root.is_dir():
            raise RunDirError(f"output path {self.root} exists and is not a directory")
        info = self.load_run_info()
        if info is None:
            if self.root.exists() and any(p.name not in BOOKKEEPING for p in self.root.iterdir()):
                raise RunDirError(f"output directory {self.root} is not empty and holds no run.json; choose another --out")
            return None
        stored = info.get("generation_identity")
        if stored != identity and not self.has_generations():
            # A run that failed before generating anything (a typo, a model that would not load)
            # must not block the corrected command: nothing in it depends on the old configuration.
            log.info("%s: replacing the configuration of a run that generated nothing", self.root)
            return None
        if stored != identity:
            diffs = sorted(k for k in set(stored or {}) | set(identity) if (stored or {}).get(k) != identity.get(k))
            raise RunDirError(
                f"{self.root} holds a run with another configuration (differs in: {', '.join(diffs)}); "
                "use a new --out directory, or the same options to resume"
            )
        return info

    def has_generations(self) -> bool:
        """Whether any cell holds a generation record (a run that got that far)."""
        return any(p.stat().st_size > 0 for p in self.root.rglob("generations.jsonl"))

    def cell(self, model: str, defense: str, task: str, attack: str = NO_ATTACK) -> Cell:
        return Cell(self.root, model, defense, task, attack)

    def config(self) -> tuple[RunConfig, dict[str, Any]]:
        """The run's configuration and its run.json, or an error saying this is no run directory."""
        info = self.load_run_info()
        if info is None or "config" not in info:
            raise RunDirError(f"{self.root} holds no run.json with a config: is it a realign run directory?")
        return RunConfig.from_json(info["config"]), info

    def saved_cells(self, config: RunConfig | None = None) -> Iterator[Cell]:
        """The cells of the run that have saved generations, in the run's order."""
        config = config or self.config()[0]
        for model in config.models:
            for attack in config.attacks:
                for defense in config.defenses:
                    for task in config.tasks:
                        if (cell_dir(self.root, model, defense, task, attack) / "generations.jsonl").is_file():
                            yield self.cell(model, defense, task, attack)

    def write_run_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.run_json, info)

    def write_results(self, records: list[dict[str, Any]]) -> None:
        atomic_write_json(self.results_json, {"results": records})

    def read_results(self) -> list[dict[str, Any]]:
        if not self.results_json.exists():
            raise RunDirError(f"{self.results_json} does not exist (has the run finished a cell?)")
        try:
            data = json.loads(self.results_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{self.results_json}: not a readable results.json ({exc})") from None
        records = data.get("results") if isinstance(data, dict) else None
        if not isinstance(records, list) or not all(isinstance(r, dict) and "metrics" in r for r in records):
            raise RunDirError(f"{self.results_json}: not a realign results.json (expected {{\"results\": [records]}})")
        return records
