"""What every distsparse picture shares: matplotlib behind the ``[plots]`` extra, steps with epochs above.

Pictures are files, never windows: figures are made with matplotlib's object API, not pyplot, so
no display is needed and no global backend changes (a job run inside a notebook leaves the
notebook's plotting as it was), and a cluster node draws the same PNGs as a laptop.
"""
from __future__ import annotations

from pathlib import Path

from .extras import require

DPI = 100  # figure inches x DPI = the PNG's pixels (no tight bounding box: sizes stay as asked)


def figure_class(feature: str) -> type:
    """matplotlib's ``Figure``, or the one-line UserError naming the ``[plots]`` extra."""
    require("matplotlib", "plots", feature)
    from matplotlib.figure import Figure

    return Figure


def epoch_axis(ax, steps_per_epoch: int) -> None:
    """Epochs along the top of an axis drawn over optimizer steps."""
    ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch)
                       ).set_xlabel("epoch")


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return Path(path)
