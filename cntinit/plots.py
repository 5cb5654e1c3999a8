"""A PNG of a solve report: the rank each module got, and the singular-value spectra the ranks
were cut from — to see at a glance where VAS put the budget and how fast each ΔW decays.

matplotlib is an optional extra (`pip install 'cntinit[plot]'`); without it there is no plot.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .models.linears import module_kind
from .storage.atomic import atomic_file

INSTALL = "pip install 'cntinit[plot]'"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_report_plot(report: dict, path: str | Path) -> Path:
    """The report's figure (`report_figure`) as a PNG, swapped in whole."""
    with atomic_file(path) as tmp:
        report_figure(report).savefig(tmp, dpi=100, format="png")
    return Path(path)


def report_figure(report: dict):
    """Two panels: rank per module in model order, coloured by module kind; each module's
    singular values over its largest (log scale), with a dot where its rank cuts. Each panel is
    one collection, not an artist per module, and no pyplot: a 210-module report drew in 1.2 s
    as 630 artists (RESULTS.md, "The report plot")."""
    from matplotlib import colormaps
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = report["modules"]
    names = list(rows)
    kinds = [module_kind(name) for name in names]
    palette = {kind: colormaps["tab10"](i % 10) for i, kind in enumerate(dict.fromkeys(kinds))}
    colours = [palette[kind] for kind in kinds]
    spectra = {i: row["spectrum"] for i, row in enumerate(rows.values()) if row.get("spectrum")}
    fig = Figure(figsize=(11, 8 if spectra else 4.5))
    axes = fig.subplots(2 if spectra else 1, 1, squeeze=False)
    ranks = axes[0, 0]
    heights = [rows[name]["rank"] for name in names]
    ranks.add_collection(PolyCollection([[(i - 0.5, 0), (i - 0.5, h), (i + 0.5, h), (i + 0.5, 0)] for i, h in enumerate(heights)],
                                        facecolors=colours, linewidths=0))
    ranks.set_xlim(-0.5, len(names) - 0.5)
    ranks.set_ylim(0, max(heights + [1]) * 1.05)
    budget = f", budget {report['budget']}" if report.get("budget") else ""
    ranks.set_title(f"{report['mode']}: rank per module (total {report['total_rank']}{budget})")
    ranks.set_xlabel("module (model order)")
    ranks.set_ylabel("rank")
    handles = [Patch(color=colour, label=kind) for kind, colour in palette.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    if spectra:
        _draw_spectra(axes[1, 0], spectra, heights, colours)
    fig.tight_layout(rect=(0, 0.03 * (1 + (len(handles) - 1) // 4), 1, 1))
    return fig


def _draw_spectra(axis, spectra: dict[int, list[float]], ranks: list[int], colours: list) -> None:
    """Each module's spectrum over its largest value as one line collection, and its rank's cut as one scatter."""
    from matplotlib.collections import LineCollection

    lines, dots = [], []
    for i, values in spectra.items():
        top = values[0] or 1.0
        lines.append([(j + 1, max(v / top, 1e-12)) for j, v in enumerate(values)])
        if 0 < ranks[i] <= len(values):
            dots.append((ranks[i], max(values[ranks[i] - 1] / top, 1e-12), colours[i]))
    axis.set_yscale("log")
    axis.add_collection(LineCollection(lines, colors=[colours[i] for i in spectra], alpha=0.35, linewidths=0.8))
    if dots:
        axis.scatter([d[0] for d in dots], [d[1] for d in dots], c=[d[2] for d in dots], s=9, zorder=3)
    axis.autoscale_view()
    axis.set_title("singular values of each split, over the largest (dot: the module's rank)")
    axis.set_xlabel("index")
    axis.set_ylabel("s_i / s_1")
