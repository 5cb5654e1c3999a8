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
    """Two panels: rank per module in model order, coloured by module kind; each module's
    singular values over its largest (log scale), with a dot where its rank cuts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = report["modules"]
    names = list(rows)
    kinds = [module_kind(name) for name in names]
    palette = {kind: plt.get_cmap("tab10")(i % 10) for i, kind in enumerate(dict.fromkeys(kinds))}
    spectra = {name: row["spectrum"] for name, row in rows.items() if row.get("spectrum")}
    fig, axes = plt.subplots(2 if spectra else 1, 1, figsize=(11, 8 if spectra else 4.5), squeeze=False)
    ranks = axes[0, 0]
    ranks.bar(range(len(names)), [rows[n]["rank"] for n in names], color=[palette[k] for k in kinds], width=1.0)
    budget = f", budget {report['budget']}" if report.get("budget") else ""
    ranks.set_title(f"{report['mode']}: rank per module (total {report['total_rank']}{budget})")
    ranks.set_xlabel("module (model order)")
    ranks.set_ylabel("rank")
    ranks.set_xlim(-0.5, len(names) - 0.5)
    handles = [Patch(color=colour, label=kind) for kind, colour in palette.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    if spectra:
        decay = axes[1, 0]
        for name, values in spectra.items():
            top = values[0] or 1.0
            colour = palette[kinds[names.index(name)]]
            decay.semilogy(range(1, len(values) + 1), [max(v / top, 1e-12) for v in values], color=colour, alpha=0.35, linewidth=0.8)
            r = rows[name]["rank"]
            if 0 < r <= len(values):
                decay.plot([r], [max(values[r - 1] / top, 1e-12)], "o", color=colour, markersize=3)
        decay.set_title("singular values of each split, over the largest (dot: the module's rank)")
        decay.set_xlabel("index")
        decay.set_ylabel("s_i / s_1")
    fig.tight_layout(rect=(0, 0.03 * (1 + (len(handles) - 1) // 4), 1, 1))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
