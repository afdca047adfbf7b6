"""What every distsparse picture shares: matplotlib behind the ``[plots]`` extra, steps with epochs above.

Pictures are files, never windows: the Agg backend needs no display, so a job on a cluster node
draws the same PNGs as a laptop.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from .extras import require

DPI = 100  # figure inches x DPI = the PNG's pixels (no tight bounding box: sizes stay as asked)


def pyplot(feature: str) -> ModuleType:
    """matplotlib's pyplot on the Agg backend, or the one-line UserError naming the ``[plots]`` extra."""
    require("matplotlib", "plots", feature).use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def epoch_axis(ax, steps_per_epoch: int) -> None:
    """Epochs along the top of an axis drawn over optimizer steps."""
    ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch)
                       ).set_xlabel("epoch")


def save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)
