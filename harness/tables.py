"""Tables on the terminal that fit its width, and the same tables as markdown for files and pipes.

`realign report` used to print one markdown table with a column per metric of every task and a
row holding the full model, defense, task and judge specs: hundreds of characters per line, which
a terminal wraps into noise. A command now builds TextTables (a title, label columns, value
columns) and `show` writes them: on a terminal with rich, label cells wrapped and the value
columns split into several tables when they do not fit (the label columns repeated in each), every
table under its own heading; to a file or a pipe as markdown, one `###` heading per table, so
what scripts and README examples read stays plain text.
"""

from __future__ import annotations

import io
import shutil
import sys
from dataclasses import dataclass, field
from typing import IO, Any

from harness.spec_wrap import wrap

#: Columns a wrapped label may shrink to, and the largest share of the width labels may take.
MIN_LABEL = 10
LABEL_SHARE = 0.5
PAD = 3


@dataclass
class TextTable:
    """A titled table: `labels` leading columns name the row (repeated when the table is split)."""

    title: str | None
    head: list[str]
    rows: list[list[str]]
    labels: int = 1
    notes: list[str] = field(default_factory=list)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(tables: list[TextTable]) -> str:
    """Markdown: a `###` heading per titled table, a blank line between tables."""
    parts = []
    for t in tables:
        lines = [f"### {t.title}", ""] if t.title else []
        lines.append("| " + " | ".join(_cell(h) for h in t.head) + " |")
        lines.append("| " + " | ".join("---" for _ in t.head) + " |")
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
        lines += t.notes
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _natural(t: TextTable, j: int) -> int:
    """Characters column j needs unwrapped, with its padding (a space each side) and the rule between columns."""
    return max(len(line) for cell in [t.head[j], *(r[j] for r in t.rows)] for line in cell.split("\n")) + PAD


def label_caps(t: TextTable, width: int) -> list[int]:
    """Widths of the label columns: each its natural width when the labels fit in LABEL_SHARE of
    `width` (less if two value columns would not fit beside them), else the narrow ones whole and
    the rest sharing what is left (at least MIN_LABEL)."""
    values = sorted((_natural(t, j) for j in range(t.labels, len(t.head))), reverse=True)
    budget = min(int(width * LABEL_SHARE), width - sum(values[:2]))  # room for two value columns if it can
    budget = max(budget, MIN_LABEL * t.labels)
    natural = [_natural(t, j) for j in range(t.labels)]
    caps = list(natural)
    left, open_cols = budget, sorted(range(t.labels), key=lambda j: natural[j])
    while open_cols:
        share = left // len(open_cols)
        j = open_cols.pop(0)
        caps[j] = max(min(natural[j], share), min(natural[j], MIN_LABEL))
        left -= caps[j]
    return caps


def split(t: TextTable, width: int) -> list[TextTable]:
    """`t` as tables that fit `width` columns: label columns capped (their cells wrapped at spec
    separators), value columns in consecutive chunks, each chunk titled with the columns it holds."""
    caps = label_caps(t, width)
    label_width = sum(caps)
    chunks: list[list[int]] = []
    for j in range(t.labels, len(t.head)):
        if chunks and label_width + sum(_natural(t, k) for k in chunks[-1]) + _natural(t, j) <= width:
            chunks[-1].append(j)
        else:
            chunks.append([j])
    rows = [[wrap(c, caps[j] - PAD) if j < t.labels else c for j, c in enumerate(r)] for r in t.rows]
    head = [wrap(h, caps[j] - PAD) if j < t.labels else h for j, h in enumerate(t.head)]
    if len(chunks) <= 1:
        return [TextTable(t.title, head, rows, t.labels, t.notes)]
    out = []
    for n, chunk in enumerate(chunks, 1):
        cols = list(range(t.labels)) + chunk
        title = f"{t.title or 'table'}, part {n}/{len(chunks)}: {t.head[chunk[0]]} .. {t.head[chunk[-1]]}"
        out.append(TextTable(title, [head[j] for j in cols], [[r[j] for j in cols] for r in rows], t.labels,
                             t.notes if n == len(chunks) else []))
    return out


def render_rich(tables: list[TextTable], console: Any) -> None:
    """Print the tables on a rich Console, split and wrapped to its width."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    width = console.width
    for i, whole in enumerate(tables):
        caps = label_caps(whole, width)
        for t in split(whole, width):
            if t.title:  # above the table at the console's width, not wrapped to the table's
                console.print(Text(t.title, style="bold"))
            table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
            for j, h in enumerate(t.head):  # widths fixed here: split() made them fit the console
                need = _natural(t, j) - PAD
                table.add_column(h, overflow="fold", justify="left" if j < t.labels else "right",
                                 width=min(need, caps[j] - PAD) if j < t.labels else need)
            for row in t.rows:
                table.add_row(*(Text(c) for c in row))
            console.print(table)
            for note in t.notes:
                console.print(Text(note), style="dim")
        if i < len(tables) - 1:
            console.print()


def terminal(tables: list[TextTable], width: int) -> str:
    """The rich rendering as plain text at `width` columns (what a terminal of that width shows)."""
    from rich.console import Console

    buf = io.StringIO()
    render_rich(tables, Console(file=buf, width=width, color_system=None, force_terminal=False, soft_wrap=False))
    return buf.getvalue()


def show(tables: list[TextTable], stream: IO[str] | None = None) -> None:
    """Write the tables: fitted to the terminal when `stream` is one, else as markdown."""
    stream = stream or sys.stdout
    if hasattr(stream, "isatty") and stream.isatty():
        from rich.console import Console

        render_rich(tables, Console(file=stream, width=shutil.get_terminal_size((100, 24)).columns))
    else:  # print, not write: a reader that went away (`| head`) must raise BrokenPipeError here
        print(markdown(tables), file=stream)
