"""FROC curve figure, drawn like the official plot (log2 x axis over 1/8..8 FPs per scan).

Figures are built on matplotlib's object API with the Agg canvas, so no global backend is
switched and nothing needs a display.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from tf_agg3d.evaluation.froc import BootstrapResult, FrocResult
from tf_agg3d.utils.atomic_write import atomic_write_bytes


def froc_figure(
    result: FrocResult, ci: BootstrapResult | None = None, label: str = "CAD"
) -> Figure:
    """A FROC figure: the curve, the sensitivities at the FP rates and the bootstrap band."""
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = min(result.fp_rates), max(result.fp_rates)
    xs = np.geomspace(lo, hi, 512)
    ys = np.interp(xs, result.curve.fps, result.curve.sensitivity)
    color = "tab:blue"
    ax.plot(xs, ys, color=color, lw=2, label=f"{label} (FROC {result.froc_score:.3f})")
    ax.plot(result.fp_rates, result.sensitivities, "o", color=color, ms=4)
    if ci is not None:
        ax.fill_between(
            ci.grid,
            ci.grid_lower,
            ci.grid_upper,
            color=color,
            alpha=0.15,
            lw=0,
            label=f"{ci.confidence:.0%} bootstrap CI ({ci.n}x)",
        )
        ax.plot(ci.grid, ci.grid_lower, ":", color=color, lw=1)
        ax.plot(ci.grid, ci.grid_upper, ":", color=color, lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(0.0, 1.0)
    ax.xaxis.set_major_locator(FixedLocator(list(result.fp_rates)))
    ax.xaxis.set_major_formatter(FixedFormatter([f"{r:g}" for r in result.fp_rates]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yticks(np.arange(0.0, 1.01, 0.1))
    ax.grid(True, which="both", alpha=0.4)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(f"FROC performance - {label}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str, dpi: int = 150) -> None:
    """Writes a figure as PNG atomically (local path or `tf.io.gfile` URL)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def plot_froc(
    path: str, result: FrocResult, ci: BootstrapResult | None = None, label: str = "CAD"
) -> None:
    """Draws the FROC curve (and CI band) and writes it to `path` as PNG."""
    save_figure(froc_figure(result, ci, label), path)
