"""Harmful-behaviour sets: what every set of plain harmful requests shares, whatever its source.

Why a set is a task of its own: an attack (harness.contracts.attack) starts from a plain harmful
request and decides itself how to deliver it (a typographic image, a shuffled sentence, a mixup).
JailbreakBench, HarmBench, AdvBench, SafeBench and MM-SafetyBench's questions differ only in where
their rows live and what their columns are called, so each set's module only reads its rows;
this one gives them the same sample contract and the same metrics:

- samples are text only (no image: the attack adds one); `Sample.text` and `meta["query"]` are
  the plain request, `Sample.category` the set's own category (None where the set has none),
  and `meta` carries the set's other fields (`target`, the affirmative opening white-box attacks
  aim for; `behavior`; `source`; ...);
- metrics (95% bootstrap intervals; judge errors are excluded from every rate and counted):
  on harmful requests `asr` (share judged unsafe, lower is safer; the headline) with `asr/<category>`,
  and `refused` (share the judge labelled a refusal; a detail, since a defense may make an answer
  safe without refusing, and a judge that never says `refusal` leaves it at 0) with
  `refused/<category>`; on benign requests (JailbreakBench's benign twins) `refusal_rate`, the
  over-refusal, a utility cost (lower is better), with `refusal_rate/<category>`.

Data comes from a local file or folder (`path=`), from the Hugging Face hub pinned to a commit
(`hub_file`), or from a release's raw-file URL pinned to a commit (`release_file`, cached once;
offline the error says to pass `path=`). Every malformed row fails with one line naming the file,
the row and the line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

from harness.contracts.meaning import rate
from harness.contracts.task import Task
from harness.errors import DataError
from harness.schema import Generation, MetricValue, Sample, Verdict
from harness.stats import attack_success_rate, bootstrap_mean
from tasks import release

_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_commit(revision: str | None) -> bool:
    """Whether a revision is a full commit id (a pin), rather than a branch or tag that can move."""
    return bool(revision and _COMMIT.fullmatch(revision))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- reading rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One data row of a CSV file: `number` counts data rows from 0, `line` is the file line where
    the row starts (1 = the header; a quoted field may span lines)."""

    path: Path
    line: int
    number: int
    values: dict[str, str]

    @property
    def where(self) -> str:
        return f"{self.path}: row {self.number} (line {self.line})"

    def get(self, column: str) -> str:
        return (self.values.get(column) or "").strip()

    def need(self, column: str) -> str:
        """A non-empty field, or an error naming the file, row and column."""
        value = self.get(column)
        if not value:
            raise DataError(f"{self.where}: empty {column}")
        return value


def read_csv(path: Path, required: Sequence[str], what: str) -> list[Row]:
    """Read a CSV with a header holding at least `required`; every error is one line naming the file
    (and the row and line when one is at fault). Blank lines are not rows."""
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); expected a CSV file") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[Row] = []
    try:
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise DataError(f"{path}: empty file; expected a header with {', '.join(required)}")
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}: line 1: missing column(s) {', '.join(missing)}; the header has {', '.join(header)}")
        end = reader.line_num
        for record in reader:
            line, end = end + 1, reader.line_num
            if not any(field.strip() for field in record):
                continue
            if len(record) != len(header):
                raise DataError(f"{path}: row {len(rows)} (line {line}): {len(record)} fields; the header has {len(header)}")
            rows.append(Row(path, line, len(rows), dict(zip(header, record))))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: {exc}") from None
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    return rows


def local_file(task: str, path: str, candidates: Iterable[str]) -> Path:
    """`path=` as given: a file is read as it is; a folder must hold one of `candidates` (relative
    paths: the upstream repository's layout first, then a flat copy)."""
    root = Path(path).expanduser()
    if root.is_file():
        return root
    if not root.is_dir():
        raise DataError(f"{task}: path {root} does not exist (give the data file or a folder holding it)")
    names = list(candidates)
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{task}: none of {', '.join(names)} under {root}")


def select_categories(task: str, samples: list[Sample], wanted: Sequence[str]) -> list[Sample]:
    """Samples whose category is named in `wanted` (any case; spaces, `_`, `-` and `/` alike)."""
    if not wanted:
        return samples

    def norm(name: str) -> str:
        return re.sub(r"[\s_/-]+", " ", name).strip().lower()

    present = sorted({s.category for s in samples if s.category})
    by_norm = {norm(c): c for c in present}
    unknown = [w for w in wanted if norm(w) not in by_norm]
    if unknown:
        raise DataError(f"{task}: unknown categories {unknown}; valid: {', '.join(present)}")
    keep = {by_norm[norm(w)] for w in wanted}
    return [s for s in samples if s.category in keep]


# -- fetching pinned data -------------------------------------------------------------------------


def release_file(task: str, base_url: str, revision: str, relpath: str, cache_dir: str | None) -> tuple[Path, str]:
    """A release file at `<base_url>/<revision>/<relpath>` (GitHub raw-content layout), downloaded
    once into the cache (`cache_dir`, else <cache root>/<task>/<revision>); (local path, URL)."""
    url = release.url_join(f"{base_url.rstrip('/')}/{revision}", *relpath.split("/"))
    root = Path(cache_dir).expanduser() if cache_dir else release.cache_root() / task / revision
    try:
        return release.cached(url, root / relpath), url
    except release.DownloadError as exc:
        why = "no network here?" if exc.status is None else "is the revision right?"
        raise DataError(f"{task}: {exc} ({why}); download {relpath} elsewhere and pass path=<that file>") from None


def hub_file(task: str, repo_id: str, revision: str, filename: str) -> tuple[Path, str | None]:
    """One file of a Hugging Face dataset repository at `revision`, through the hub's own cache (so a
    second run is offline); (local path, the commit it was read at)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - installed with transformers
        raise DataError(f"{task}: reading from the hub needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        local = Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision))
    except Exception as exc:  # offline, unknown revision, no such file: the same advice for each
        cause = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"{task}: cannot fetch {filename} of dataset {repo_id} at revision {revision} from the Hugging Face hub "
            f"({type(exc).__name__}: {cause}); download it elsewhere (hf download --repo-type dataset {repo_id} "
            f"{filename} --revision {revision} --local-dir DIR) and pass path=DIR"
        ) from None
    snapshot = local.parents[len(Path(filename).parts) - 1]
    return local, snapshot.name if _COMMIT.fullmatch(snapshot.name) else None


# -- the task -------------------------------------------------------------------------------------


def _group(sample: Sample) -> str | None:
    """A sample's category as a metric-name part: `/` separates metric levels, so a category such
    as JailbreakBench's "Harassment/Discrimination" becomes "Harassment-Discrimination"."""
    return sample.category.replace("/", "-") if sample.category else None


def refusal_rates(samples: list[Sample], verdicts: dict[str, Verdict] | None, prefix: str) -> dict[str, MetricValue]:
    """Share of judged samples labelled `refusal`, overall and per category (judge errors left out)."""
    verdicts = verdicts or {}
    overall: list[float] = []
    groups: dict[str, list[float]] = {}
    for sample in samples:
        verdict = verdicts.get(sample.id)
        if verdict is None or verdict.label == "error":
            continue
        hit = float(verdict.label == "refusal")
        overall.append(hit)
        key = _group(sample)
        if key is not None:
            groups.setdefault(key, []).append(hit)
    out = {prefix: bootstrap_mean(overall)}
    out.update({f"{prefix}/{key}": bootstrap_mean(groups[key]) for key in sorted(groups)})
    return out


class BehaviorSet(Task):
    """A set of plain requests with the safety metrics of this module; subclasses read the rows."""

    attackable: ClassVar[bool] = True
    meanings = {
        "asr": rate("safety", "lower"),
        "asr/*": rate("safety", "lower", headline=False),
        "refused": rate("safety", "higher", headline=False),
        "refused/*": rate("safety", "higher", headline=False),
        "refusal_rate": rate("utility", "lower"),
        "refusal_rate/*": rate("utility", "lower", headline=False),
    }
    #: Where the set comes from, its licence, and whether that licence was checked against the
    #: upstream licence file (False: taken from secondary sources).
    homepage: ClassVar[str] = ""
    licence: ClassVar[str] = ""
    licence_verified: ClassVar[bool] = False

    @property
    def harmful(self) -> bool:
        """Whether the requests are harmful (ASR, refusals) or benign (over-refusal)."""
        return True

    @staticmethod
    def request(sample_id: str, text: str, category: str | None, **meta: Any) -> Sample:
        """A text-only sample whose plain request is `text` (None values are left out of meta)."""
        return Sample(id=sample_id, text=text, category=category,
                      meta={"query": text, **{k: v for k, v in meta.items() if v is not None}})

    def metrics(
        self, samples: list[Sample], generations: dict[str, Generation], verdicts: dict[str, Verdict] | None
    ) -> dict[str, MetricValue]:
        """Harmful: `asr`, `asr/<category>`, `refused`, `refused/<category>`; benign: `refusal_rate`,
        `refusal_rate/<category>`; both: `judge_errors`."""
        if not self.harmful:
            judged = sum(1 for s in samples if verdicts and s.id in verdicts and verdicts[s.id].label != "error")
            return {**refusal_rates(samples, verdicts, "refusal_rate"),
                    "judge_errors": MetricValue(float(len(samples) - judged), n=len(samples))}
        out = attack_success_rate(samples, verdicts, group=_group)
        out.update(refusal_rates(samples, verdicts, "refused"))
        return out

    def per_sample(
        self, samples: list[Sample], generations: dict[str, Generation], verdicts: dict[str, Verdict] | None
    ) -> dict[str, dict[str, float]]:
        """Harmful: `asr` and `refused` per judged sample; benign: `refusal_rate` (refused = 1)."""
        judged = {s.id: verdicts[s.id].label for s in samples
                  if verdicts and s.id in verdicts and verdicts[s.id].label != "error"}
        refused = {sid: float(label == "refusal") for sid, label in judged.items()}
        if not self.harmful:
            return {"refusal_rate": refused}
        return {"asr": {sid: float(label == "unsafe") for sid, label in judged.items()}, "refused": refused}

    def described(self, **source: Any) -> dict[str, Any]:
        """identity(): the spec and the set's provenance, plus where this run's rows came from."""
        return {"spec": self.spec, "task": getattr(self, "registered_name", type(self).__name__),
                "homepage": self.homepage, "licence": self.licence, "licence_verified": self.licence_verified,
                **source}
