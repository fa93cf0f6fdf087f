"""Plain prompt files for the utility graders (MM-Vet's grader, MMBench's choice extractor).

Why not the rubric templates of judges/templates.py: those fence an untrusted answer and parse one
verdict word; a utility grader must reproduce a benchmark's own prompt byte for byte (MM-Vet's
grader completes a markdown table row; MMBench's extractor fills three slots), so its file is sent
as written. A file is:

    # name: mmvet_grader                 <- leading '#' lines: metadata, never sent
    # version: 1
    # retry: "Reply with the score: "    <- a value in double quotes is read as a JSON string
                                          <- one blank line after the metadata is skipped
    ...body, sent verbatim (trailing newline included)...

Placeholders (`{question}` ...) are substituted in one pass, only those the caller names, so other
braces in the body stay literal and a reply cannot inject a placeholder. A file with no metadata
lines is all body: paste a benchmark's original prompt into a file and pass it as `template_file=`.
The file's SHA-256 is part of the grader's identity and of every cache key.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import DataError

RUBRIC_DIR = Path(__file__).resolve().parent / "rubrics"
_META = re.compile(r"^#\s*([A-Za-z_][A-Za-z0-9_]*)\s*:(.*)$")


@dataclass(frozen=True)
class PromptFile:
    name: str
    version: str
    sha256: str
    source: str
    body: str
    meta: dict[str, str] = field(default_factory=dict)

    def fill(self, **values: str) -> str:
        """The body with each named `{placeholder}` replaced, in one pass."""
        if not values:
            return self.body
        pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in values) + r")\}")
        return pattern.sub(lambda m: values[m.group(1)], self.body)

    def identity(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "source": self.source}


def parse_prompt_file(text: str, source: str, default_name: str, placeholders: tuple[str, ...] = ()) -> PromptFile:
    """A PromptFile from file text; every name in `placeholders` must occur in the body."""
    lines = text.splitlines(keepends=True)
    meta: dict[str, str] = {}
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        match = _META.match(lines[start].rstrip("\r\n"))
        if match:
            value = match.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise DataError(f"prompt file {source}: metadata {match.group(1)!r} is not a valid quoted string "
                                    f"({exc.msg})") from None
            meta[match.group(1).lower()] = value
        start += 1
    if meta and start < len(lines) and not lines[start].strip():
        start += 1
    body = "".join(lines[start:])
    if not body.strip():
        raise DataError(f"prompt file {source}: no prompt text after the metadata lines")
    missing = [p for p in placeholders if "{" + p + "}" not in body]
    if missing:
        raise DataError(f"prompt file {source}: the text must contain the placeholder(s) "
                        f"{', '.join('{' + p + '}' for p in missing)}")
    return PromptFile(meta.get("name", default_name), meta.get("version", "unversioned"),
                      hashlib.sha256(text.encode("utf-8")).hexdigest(), source, body, meta)


def load_prompt_file(path: str | Path, placeholders: tuple[str, ...] = ()) -> PromptFile:
    """A prompt from any file (e.g. a benchmark's original prompt, pasted as it is)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"prompt file {file}: {exc.strerror or exc}") from None
    return parse_prompt_file(text, str(file), file.stem, placeholders)


def bundled_prompt(name: str, placeholders: tuple[str, ...] = ()) -> PromptFile:
    """One of this project's prompts (`judges/rubrics/<name>.txt`)."""
    file = RUBRIC_DIR / f"{name}.txt"
    return parse_prompt_file(file.read_text(encoding="utf-8"), f"bundled:{name}.txt", name, placeholders)
