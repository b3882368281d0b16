"""The small matplotlib plots of the dock widgets (shell-intensity curve, feature scatter plots).

Plots are optional: without matplotlib the widgets work and show the numbers only
(:func:`shell_plot` and :func:`feature_plot` then return a :class:`NoPlot`).
"""

from __future__ import annotations

__all__ = ["shell_plot", "feature_plot", "ShellPlot", "FeaturePlot", "NoPlot"]

try:
    import matplotlib  # noqa: F401

    HAS_MPL = True
except ImportError:  # pragma: no cover - matplotlib is in cryoves[napari]
    HAS_MPL = False

_BG = "#262930"


class NoPlot:
    """Stands in for a plot when matplotlib is not installed (does nothing, no canvas)."""

    canvas = None

    def show(self, *args):
        pass

    def mark(self, *args):
        pass

    def clear(self):
        pass


def _canvas(figsize, min_h, max_h):
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=90, facecolor=_BG)
    canvas = FigureCanvasQTAgg(fig)
    canvas.setMinimumHeight(min_h)
    canvas.setMaximumHeight(max_h)
    canvas.setVisible(False)
    return fig, canvas


def _style_axes(ax, xlabel="", ylabel=""):
    ax.set_facecolor(_BG)
    for s in ax.spines.values():
        s.set_color("#aaaaaa")
    ax.tick_params(colors="#dddddd", labelsize=7)
    ax.set_xlabel(xlabel, fontsize=8, color="#dddddd")
    ax.set_ylabel(ylabel, fontsize=8, color="#dddddd")


class ShellPlot:
    """Mean shell intensity per candidate threshold (why the global threshold was chosen)."""

    def __init__(self):
        self.fig, self.canvas = _canvas((3.2, 1.5), 120, 160)
        self.ax = self.fig.add_subplot(111)
        _style_axes(self.ax, "threshold", "shell mean")
        self.fig.subplots_adjust(left=0.2, right=0.97, bottom=0.28, top=0.95)
        self._line = None

    def show(self, thresholds, means, chosen):
        self.ax.clear()
        _style_axes(self.ax, "threshold", "shell mean")
        self.ax.plot(thresholds, means, "-o", color="#9ecae1", ms=3, lw=1)
        self._line = self.ax.axvline(chosen, color="#ffd700", lw=1.2)
        self.canvas.setVisible(True)
        self.canvas.draw_idle()

    def mark(self, value):
        if self._line is not None:
            self._line.set_xdata([value, value])
            self.canvas.draw_idle()

    def clear(self):
        self.canvas.setVisible(False)


class FeaturePlot:
    """Radius vs thickness and radius vs density of the accepted vesicles; flagged ones in red."""

    def __init__(self):
        self.fig, self.canvas = _canvas((3.4, 2.6), 220, 260)
        self.axes = self.fig.subplots(1, 2)
        self.fig.subplots_adjust(left=0.16, right=0.98, bottom=0.2, top=0.95, wspace=0.45)

    def show(self, columns: dict, accepted, flagged):
        """Plot ``columns`` (``radius``, ``thickness``, ``density`` and their ``unit``)."""
        unit = columns["unit"]
        r, t, d = columns["radius"], columns["thickness"], columns["density"]
        pairs = [(r, t, f"radius ({unit})", f"thickness ({unit})"), (r, d, f"radius ({unit})", "density")]
        keep = accepted & ~flagged
        for ax, (x, y, xl, yl) in zip(self.axes, pairs):
            ax.clear()
            _style_axes(ax, xl, yl)
            ax.scatter(x[keep], y[keep], s=9, c="#ffd700", alpha=0.8, lw=0)
            ax.scatter(x[accepted & flagged], y[accepted & flagged], s=14, c="#ff3030", lw=0)
        self.canvas.setVisible(True)
        self.canvas.draw_idle()

    def clear(self):
        self.canvas.setVisible(False)


def shell_plot():
    """A :class:`ShellPlot`, or a :class:`NoPlot` without matplotlib."""
    return ShellPlot() if HAS_MPL else NoPlot()


def feature_plot():
    """A :class:`FeaturePlot`, or a :class:`NoPlot` without matplotlib."""
    return FeaturePlot() if HAS_MPL else NoPlot()
