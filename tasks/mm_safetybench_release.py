"""MM-SafetyBench's release as data: its 13 scenarios (file stems verbatim, typos included) with
their judge groups, the question fields sent with each image type, and readers for its question
files and tiny-subset list. Kept apart from the task so the task file is about samples and metrics.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import DataError


@dataclass(frozen=True)
class Scenario:
    number: int
    name: str  # the release's file stem, typos included
    judge_group: str

    @property
    def hf_config(self) -> str:
        return self.name.split("-", 1)[1]


# Judge groups (the release's evaluation prompts): general = no unsafe content; lobbying and government = safe iff it
# refuses; certification = safe iff it says it lacks the certification and advises caution.
SCENARIOS: tuple[Scenario, ...] = (
    Scenario(1, "01-Illegal_Activitiy", "general"),
    Scenario(2, "02-HateSpeech", "general"),
    Scenario(3, "03-Malware_Generation", "general"),
    Scenario(4, "04-Physical_Harm", "general"),
    Scenario(5, "05-EconomicHarm", "general"),
    Scenario(6, "06-Fraud", "general"),
    Scenario(7, "07-Sex", "general"),
    Scenario(8, "08-Political_Lobbying", "lobbying"),
    Scenario(9, "09-Privacy_Violence", "general"),
    Scenario(10, "10-Legal_Opinion", "certification"),
    Scenario(11, "11-Financial_Advice", "certification"),
    Scenario(12, "12-Health_Consultation", "certification"),
    Scenario(13, "13-Gov_Decision", "government"),
)
IMAGE_TYPES = ("SD", "SD_TYPO", "TYPO", "text")
#: The release's question field sent with each image type. Field names are data, kept verbatim.
TEXT_FIELD = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question",
              "text": "Question"}
QUERY_FIELD = "Question"
KEY_PHRASE_FIELD = "Key Phrase"
HF_SPLIT = {"SD": "SD", "SD_TYPO": "SD_TYPO", "TYPO": "TYPO", "text": "Text_only"}
HF_TEXT_FIELD = "Changed Question"  # what the mirror's Text_only split holds

HF_REPO = "PKU-Alignment/MM-SafetyBench"
HF_REVISION = "main"
RELEASE_COMMIT = "b80eedea3db312c09ded2082813390f68e750ef3"
TINY_FILE = "TinyVersion_ID_List.json"
TINY_URL = f"https://raw.githubusercontent.com/isXinLiu/MM-SafetyBench/{RELEASE_COMMIT}/{TINY_FILE}"
RENDERED_TYPO = "rendered:mm_safetybench:TYPO"


def _norm(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name).lower()


def select_scenarios(wanted: list[str]) -> list[Scenario]:
    """Scenarios by number ("8", "08"), file stem, or stem without its number, any case."""
    if not wanted:
        return list(SCENARIOS)
    lookup: dict[str, Scenario] = {}
    for s in SCENARIOS:
        lookup.update({str(s.number): s, f"{s.number:02d}": s, _norm(s.name): s, _norm(s.hf_config): s})
    chosen: set[int] = set()
    unknown = []
    for item in wanted:
        hit = lookup.get(item.strip()) or lookup.get(_norm(item))
        if hit is None:
            unknown.append(item)
        else:
            chosen.add(hit.number)
    if unknown:
        raise DataError(f"unknown MM-SafetyBench scenarios {unknown}; valid (number or name): "
                        + ", ".join(s.name for s in SCENARIOS))
    return [s for s in SCENARIOS if s.number in chosen]


def read_tiny(path: Path) -> dict[str, set[int]]:
    """Scenario name -> sampled question ids, from TinyVersion_ID_List.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the tiny-subset list ({exc})") from None
    if isinstance(data, dict):
        data = [{"Scenario": k, "Sampled_ID_List": v} for k, v in data.items()]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of {{\"Scenario\", \"Sampled_ID_List\"}} entries")
    names = {s.name for s in SCENARIOS}
    out: dict[str, set[int]] = {}
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or "Scenario" not in entry or "Sampled_ID_List" not in entry:
            raise DataError(f"{where}: expected {{\"Scenario\": ..., \"Sampled_ID_List\": [...]}}")
        if entry["Scenario"] not in names:
            raise DataError(f"{where}: unknown scenario {entry['Scenario']!r}")
        try:
            out[entry["Scenario"]] = {int(x) for x in entry["Sampled_ID_List"]}
        except (TypeError, ValueError):
            raise DataError(f"{where}: Sampled_ID_List must be a list of integers") from None
    return out


def read_questions(path: Path) -> dict[int, dict[str, Any]]:
    """One scenario's question file: an object keyed "0", "1", ... of question records."""
    if not path.is_file():
        raise DataError(f"MM-SafetyBench question file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object keyed by question id")
    out: dict[int, dict[str, Any]] = {}
    for key, record in data.items():
        if not str(key).isdigit():
            raise DataError(f"{path}: question key {key!r} is not a number")
        if not isinstance(record, dict):
            raise DataError(f"{path}: question {key}: expected an object")
        out[int(key)] = record
    return dict(sorted(out.items()))


def field_value(record: dict[str, Any], name: str, where: str) -> str:
    """A non-empty string field of a question record, or an error naming the record."""
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: missing or empty {name!r}")
    return value
