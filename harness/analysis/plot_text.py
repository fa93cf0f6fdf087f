"""Text in realign's figures: wrapped spec labels, a numbered key, and point labels that never collide.

Spec strings are long (`shiftdc:calibration_unsafe=organism:split=...` is 120 characters) and a run
may hold 15 defenses whose points sit on top of each other, so writing each spec beside its point
made the labels overprint one another and run off the figure. Instead every point gets a short
number, the numbers are placed where they overlap no other text and stay inside the axes (a
number that finds no free place is left out: the point's colour and marker still name it in the
key), and the full specs go into a key beside the plot, wrapped at their own separators.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from harness.spec_wrap import wrap

#: Offsets (points) tried in order around a point for its number: near first, then further out.
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_RADII = (6, 13, 20, 28)
__all__ = ["MARKERS", "key_label", "place_numbers", "style", "wrap"]

#: Distinct marker x colour pairs: ten colours (tab10), then the next marker.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def key_label(text: str, width: int = 34, max_lines: int = 3) -> str:
    """A key entry: the spec wrapped to `width`, at most `max_lines` lines (the rest elided with
    `...`; the full spec is in the run directory and the report)."""
    lines = wrap(text, width).split("\n")
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 3] + "..."
    return "\n".join(lines)


def style(i: int) -> tuple[Any, str]:
    """(colour, marker) of the i-th entry: distinct for the first 100."""
    import matplotlib.pyplot as plt

    return plt.get_cmap("tab10")(i % 10), MARKERS[(i // 10) % len(MARKERS)]


def _free(box: Any, inside: Any, taken: Iterable[Any]) -> bool:
    return (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1
            and not any(box.overlaps(t) for t in taken))


def place_numbers(ax: Any, xy: Sequence[tuple[float, float]], labels: Sequence[str], fontsize: float = 8,
                  marker_px: float = 14, rings: Sequence[tuple[float, float]] = (), ring_px: float = 30) -> list[Any]:
    """Write labels[i] near data point xy[i] where it overlaps no label placed before, no marker
    (`marker_px` wide), no ring drawn around a point (`rings`, `ring_px` wide) and no other text of
    the figure, inside the axes. The figure's layout must be final (drawn, engine off),
    since the check is done in display coordinates. Returns the texts placed."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    from matplotlib.transforms import Bbox

    taken = [t.get_window_extent(renderer) for t in fig.findobj(lambda a: hasattr(a, "get_text"))
             if t.get_visible() and t.get_text() and t.axes is not ax]
    for points, size in ((xy, marker_px), (rings, ring_px)):  # a number never hides a point or its ring
        half = size / 2
        for px, py in ax.transData.transform(list(points)) if len(points) else []:
            taken.append(Bbox.from_extents(px - half, py - half, px + half, py + half))
    placed = []
    for (x, y), label in zip(xy, labels):
        for radius in _RADII:
            found = None
            for dx, dy in _DIRECTIONS:
                text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx * radius, dy * radius),
                                   ha="left" if dx > 0 else "right" if dx < 0 else "center",
                                   va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                                   fontsize=fontsize, fontweight="bold", annotation_clip=False)
                box = text.get_window_extent(renderer)
                if _free(box, inside, taken):
                    found = text
                    taken.append(box)
                    break
                text.remove()
            if found is not None:
                placed.append(found)
                break
    return placed
