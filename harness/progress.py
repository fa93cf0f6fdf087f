"""Progress of a run: one overall line (cell i/N, samples, elapsed, ETA) above the current cell's bar.

A run of 12 cells used to print 12 separate tqdm bars, each labelled with ~190 characters of specs
that wrapped across lines, and nothing said "cell 3 of 12" or how long the whole run had left. On a
terminal, rich now draws two lines in place: the run as a whole, then the stage the current cell is
in (generate, judge) under a short label (model, defense and task short names; the full specs are
in the run directory), and each finished cell leaves one line. When stderr is not a terminal (CI
logs, nohup, a file) the same facts are written as plain timestamped lines, at most every
LOG_EVERY seconds per stage, so a log shows progress without carriage-return noise. Disabled
(`--quiet`), it writes nothing.

The ETA is an estimate: seconds per sample generated so far in this session, times the samples
left (cells not reached yet count with their task's size once known, else the mean size seen).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator

LOG_EVERY = 30.0  # seconds between log lines of one stage when stderr is not a terminal
LABEL_PART = 24  # characters of one spec in a label


def short_spec(spec: str, width: int = LABEL_PART) -> str:
    """A spec cut to `width` characters; a path or hub id (`organisms/seed0`) keeps its last part."""
    head, sep, _ = spec.partition(":")
    if not sep and "/" in head:
        spec = head.rstrip("/").rsplit("/", 1)[-1]
    return spec if len(spec) <= width else spec[: width - 1] + "\u2026"


def cell_label(model: str, defense: str, task: str, attack: str | None = None) -> str:
    """`model · [attack ·] defense · task`, each part short."""
    parts = [model, *([attack] if attack and attack != "none" else []), defense, task]
    return " \u00b7 ".join(short_spec(p) for p in parts)


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunProgress:
    """What a run reports while it works; `cells` are the task specs of its cells in run order, and
    the samples of stage `counted` (generation; judging for `realign judge`) are its progress."""

    def __init__(self, cells: list[str], enabled: bool = True, stream: IO[str] | None = None,
                 now: Callable[[], float] = time.monotonic, counted: str = "generate") -> None:
        self.cells = list(cells)
        self.counted = counted
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.now = now
        self.started = now()
        self.sizes: dict[str, int] = {}
        self.index = 0  # cells started
        self.finished_samples = 0  # samples of the cells finished
        self.cell_done = 0  # samples of the current cell generated (earlier sessions included)
        self.generated = 0  # samples generated in this session (the ETA's rate)
        self.label = ""
        self.terminal = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._console: Any = None
        self._open: Bar | None = None

    # ---- what is known --------------------------------------------------------------------------
    def total(self) -> int:
        known = list(self.sizes.values())
        mean = sum(known) / len(known) if known else 0
        return int(sum(self.sizes.get(task, mean) for task in self.cells))

    def done(self) -> int:
        return self.finished_samples + self.cell_done

    def eta(self) -> float | None:
        if self.generated == 0:
            return None
        rate = (self.now() - self.started) / self.generated
        return max(self.total() - self.done(), 0) * rate

    def overall(self) -> str:
        return (f"cell {self.index}/{len(self.cells)} \u00b7 {self.done():,}/{self.total():,} samples \u00b7 "
                f"elapsed {clock(self.now() - self.started)} \u00b7 ETA {clock(self.eta())}")

    # ---- events ---------------------------------------------------------------------------------
    def start_cell(self, label: str, task: str, size: int, done: int) -> None:
        self.index += 1
        self.label = label
        self.sizes[task] = size
        self.cell_done = done

    def end_cell(self, size: int) -> None:
        self.close()
        self.finished_samples += size
        self.cell_done = 0
        self._say(f"done {self.label}", final=True)

    def bar(self, name: str, total: int, done: int) -> Bar:
        """A bar for one stage of the current cell (`generate ...`, `judge ...`): update(n), close()."""
        self.close()
        self._open = Bar(self, name, total, done, name.split(" ", 1)[0] == self.counted)
        return self._open

    @contextmanager
    def stage(self, name: str, total: int, done: int) -> Iterator[Callable[[int], None]]:
        """bar() as a context: yields its update(n), closes it however the block ends."""
        bar = self.bar(name, total, done)
        try:
            yield bar.update
        finally:
            bar.close()

    def close(self) -> None:
        """Stop the open bar, if any (also what an interrupted run calls, so the terminal is left clean)."""
        if self._open is not None:
            self._open.close()
            self._open = None

    # ---- output ---------------------------------------------------------------------------------
    def _say(self, what: str, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.terminal:
            if final:
                self._rich_console().print(f"[green]\u2713[/green] {self.overall()} \u00b7 {what}", highlight=False)
            return
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] realign: {self.overall()} | {what}", file=self.stream, flush=True)

    def _rich_console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stream)
        return self._console


class Bar:
    """One stage's bar: drawn live on a terminal (rich), logged every LOG_EVERY seconds otherwise."""

    def __init__(self, run: RunProgress, name: str, total: int, done: int, counts: bool) -> None:
        self.run, self.name, self.total, self.done, self.counts = run, name, total, done, counts
        self.logged = run.now()
        self.display: Any = None
        self.closed = not run.enabled
        if self.closed:
            return
        if run.terminal:
            self._start_live()
        else:
            run._say(self._line())

    def _line(self, suffix: str = "") -> str:
        return f"{self.name} {self.run.label} {self.done}/{self.total}{suffix}"

    def _start_live(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.text import Text

        run = self.run

        class Display(Progress):
            def get_renderables(self) -> Any:
                yield Text(run.overall(), style="bold")
                yield self.make_tasks_table(self.tasks)

        console = run._rich_console()
        width = max(console.width - 45, 20)  # the bar, counts and time take the rest
        desc = f"{self.name} {run.label}"
        desc = desc if len(desc) <= width else desc[: width - 1] + "\u2026"
        self.display = Display(TextColumn("{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
                               TimeRemainingColumn(), console=console, transient=True, expand=True)
        self.task = self.display.add_task(desc, total=self.total, completed=self.done)
        self.display.start()

    def update(self, n: int) -> None:
        if self.closed:
            return
        self.done += n
        if self.counts:
            self.run.cell_done += n
            self.run.generated += n
        if self.display is not None:
            self.display.advance(self.task, n)
        elif self.run.now() - self.logged >= LOG_EVERY:
            self.logged = self.run.now()
            self.run._say(self._line())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.display is not None:
            self.display.stop()
        else:
            self.run._say(self._line(" finished"))


def disabled() -> RunProgress:
    """A RunProgress that reports nothing (for callers that pass none)."""
    return RunProgress([], enabled=False)
