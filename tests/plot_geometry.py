"""Layout facts of a drawn matplotlib figure, measured with the renderer's own bounding boxes.

A plot can be "written" and still be unreadable: axes squashed to a strip, labels printed over
each other, a legend cut off at the edge. These helpers read what the renderer drew
(`get_window_extent`, in pixels of the saved image) so a test can state what readable means: the
axes cover a fair share of the canvas, and no text box overlaps another or leaves the canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Box:
    text: str
    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: Box, slack: float = 0.5) -> bool:
        return (min(self.x1, other.x1) - max(self.x0, other.x0) > slack
                and min(self.y1, other.y1) - max(self.y0, other.y0) > slack)


def _in_view(axis: Any, tick: Any) -> bool:
    lo, hi = sorted(axis.get_view_interval())
    loc = tick.get_loc()
    return lo - 1e-9 <= loc <= hi + 1e-9


def text_boxes(fig: Any) -> list[Box]:
    """Every drawn, non-empty text of the figure: titles, axis labels, tick labels in view,
    annotations, legend entries and titles, figure texts."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts: list[Any] = list(fig.texts)
    for leg in fig.legends:
        texts += [*leg.get_texts(), leg.get_title()]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks():
                if _in_view(axis, tick):
                    texts += [t for t in (tick.label1, tick.label2) if t.get_visible()]
        legend = ax.get_legend()
        if legend is not None:
            texts += [*legend.get_texts(), legend.get_title()]
    out = []
    for t in texts:
        if not (t.get_visible() and t.get_text().strip()):
            continue
        b = t.get_window_extent(renderer)
        out.append(Box(t.get_text(), b.x0, b.y0, b.x1, b.y1))
    return out


def overlapping(boxes: list[Box]) -> list[tuple[str, str]]:
    return [(a.text, b.text) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]


def off_canvas(fig: Any, boxes: list[Box]) -> list[str]:
    width, height = fig.get_size_inches() * fig.dpi
    return [b.text for b in boxes if b.x0 < -0.5 or b.y0 < -0.5 or b.x1 > width + 0.5 or b.y1 > height + 0.5]


def axes_share(fig: Any, ax: Any) -> tuple[float, float, float]:
    """(share of the canvas the axes cover, axes width px, axes height px)."""
    box = ax.get_window_extent(fig.canvas.get_renderer())
    width, height = fig.get_size_inches() * fig.dpi
    return box.width * box.height / (width * height), box.width, box.height


def assert_readable(fig: Any, ax: Any, min_share: float = 0.25, min_side: float = 250.0) -> None:
    """The figure's axes are large and its texts neither collide nor leave the canvas."""
    share, w, h = axes_share(fig, ax)
    assert share >= min_share and w >= min_side and h >= min_side, f"axes {w:.0f}x{h:.0f} px, {share:.0%} of the figure"
    boxes = text_boxes(fig)
    assert boxes, "no text drawn"
    assert overlapping(boxes) == [], f"overlapping texts: {overlapping(boxes)[:5]}"
    assert off_canvas(fig, boxes) == [], f"texts off the canvas: {off_canvas(fig, boxes)[:5]}"
