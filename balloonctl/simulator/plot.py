"""Draw allocation, target and demand over time, one panel per policy.

matplotlib's object-oriented API with the Agg canvas writes the PNG without
a display and without pyplot's global state.
"""

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from balloonctl.simulator.engine import Run
from balloonctl.units import MIB

PANEL_HEIGHT_IN = 2.4
FIGURE_WIDTH_IN = 11.0


def plot_runs(runs: Sequence[Run], path: Path) -> None:
    """Write one PNG of the runs of a single trace to ``path``."""
    figure = Figure(figsize=(FIGURE_WIDTH_IN, PANEL_HEIGHT_IN * len(runs) + 0.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{index}" for index in range(10)]
    for axis, run in zip(axes, runs, strict=True):
        minutes = [time / 60 for time in run.times]
        for index, guest in enumerate(run.guests):
            color = colors[index % len(colors)]
            label = "" if len(run.guests) == 1 else f"{guest.name}: "
            need = [(run.model.overhead + demand) / MIB for demand in guest.demand]
            axis.plot(
                minutes,
                [a / MIB for a in guest.actual],
                color=color,
                label=f"{label}allocation",
            )
            axis.plot(
                minutes,
                [t / MIB for t in guest.target],
                color=color,
                linestyle="--",
                linewidth=0.8,
                label=f"{label}target",
            )
            axis.plot(
                minutes,
                need,
                color=color,
                linestyle=":",
                linewidth=1.2,
                label=f"{label}demand + overhead",
            )
            if any(guest.cache):
                with_cache = [
                    (run.model.overhead + demand + cache) / MIB
                    for demand, cache in zip(guest.demand, guest.cache, strict=True)
                ]
                axis.plot(
                    minutes,
                    with_cache,
                    color=color,
                    linestyle="-.",
                    linewidth=0.8,
                    label=f"{label}demand + cache + overhead",
                )
        axis.set_title(run.policy, loc="left", fontsize=9)
        axis.set_ylabel("MiB")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right", ncols=3)
    axes[-1].set_xlabel("minutes")
    figure.suptitle(f"trace {runs[0].trace}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
