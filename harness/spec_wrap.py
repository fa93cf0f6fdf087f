"""Line breaks for spec strings, at their own separators.

Specs (`cmrm:calibration=organism:split=calibration`) have no spaces, so a plot label or a
terminal table cell wrapped by a generic text wrapper is cut mid-word (`organ|ism`). Breaking after
`:`, `,`, `+`, `/`, `|` or a space keeps each line a readable piece of the spec; plots
(harness.analysis.plot_text) and tables (harness.tables) share this one rule.
"""

from __future__ import annotations

import re


def wrap(text: str, width: int = 16) -> str:
    """Break a spec after its separators (`:`, `,`, `+`, `/`, `|`, space) into lines of at most
    `width` characters (a trailing separator may overhang by one); a part longer than that is cut."""
    lines: list[str] = []
    current = ""
    for part in re.findall(r"[^,:+/| ]*[,:+/| ]|[^,:+/| ]+$", text):
        body, sep = (part[:-1], part[-1]) if part[-1] in ",:+/| " else (part, "")
        chunks = [body[i : i + width] for i in range(0, len(body), width)] or [""]
        chunks[-1] += sep
        for chunk in chunks:
            if current and len(current) + len(chunk.rstrip(",:+/| ")) > width:
                lines.append(current.rstrip())
                current = ""
            current += chunk
    out = [line for line in [*lines, current.rstrip()] if line]
    return "\n".join(out) if out else text
