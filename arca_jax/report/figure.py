"""matplotlib figures on an Agg canvas, never pyplot: drawing changes no global matplotlib state
(notebooks keep their backend), and matplotlib is imported only when a figure is made.
"""

from __future__ import annotations


class ReportError(RuntimeError):
    """A report could not be made for a reason other than bad input (e.g. no matplotlib)."""


def _new_figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas, without pyplot or global backend changes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ReportError("the report's plots need matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=ax.transAxes)
