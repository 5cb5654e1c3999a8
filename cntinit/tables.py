"""What the commands print beside their paths: a store's summary, a solve's report, a run's stages,
the cache's entries — rich tables, on stderr (or stdout where the table is the command's result).

Nothing here imports torch at import time: `cntinit --help` loads this module too.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .storage.store import Store


def summary(store: Store) -> dict:
    m = store.manifest
    return {
        "path": str(store.path),
        "format": m["format"],
        "format_version": m["format_version"],
        "model": m["model"],
        "data": m["data"],
        "capture": m["capture"],
        "modules": len(m["modules"]),
        "statistics": len(m["stats"]),
        "bytes": sum(f["bytes"] for f in m["files"].values()),
    } | ({"gradients": m["gradients"]} if "gradients" in m else {})


def print_store(store: Store, out: Console) -> None:
    s = summary(store)
    out.print(f"[bold]{s['path']}[/]  {s['format']} v{s['format_version']}")
    model, d = s["model"], s["data"]
    where = f"{model['repo']}@{model['revision'][:12]} ({model['path']})" if "repo" in model else model["path"]
    out.print(f"model  {model['class']} at {where}  ({model['fingerprint'][:19]}…)")
    source = d.get("repo") or ", ".join(d["sources"][:2]) + (" …" if len(d["sources"]) > 2 else "")
    chosen = " ".join(f"{key} {d[key]}" for key in ("config", "split") if key in d)
    out.print(f"data   {source}{' (' + chosen + ')' if chosen else ''}: {d['samples']:,} samples, {d['sequences']:,} sequences, "
              f"{d['tokens']:,} tokens  ({d['fingerprint'][:19]}…)")
    c = s["capture"]
    out.print(f"capture  targets={c['targets']} seq_len={c['seq_len']} buckets={c['buckets']} dtype={c['dtype']} accumulate={c['accumulate']}")
    if "gradients" in s:
        g = s["gradients"]
        out.print(f"gradients  of every module, over {g['batches']:,} batches and {g['tokens']:,} predicted tokens "
                  f"(mean loss {g['mean_loss']:.4g}): for --mode lora-ga, lora-one")
    if not store.has_statistics:
        out.print("statistics  none (--gradients-only): token counts alone; the modes that read Σ need another capture")
    table = Table("statistics key", "dim", "count", "modules reading it")
    for key, entry in store.manifest["stats"].items():
        short = [name.rsplit(".", 1)[-1] for name in entry["modules"]]
        table.add_row(key, str(entry["dim"]), f"{entry['count']:,}", ", ".join(short))
    out.print(table)
    out.print(f"{s['modules']} modules, {s['statistics']} statistics, {s['bytes'] / 2**20:.1f} MiB")


TABLE_ROWS = 48


def print_report(report: dict, out: Console, lora_lr: float | None = None) -> None:
    """Per module — or, past TABLE_ROWS modules, per module kind (rank range, medians over layers,
    floored max) — rank, ‖ΔW‖, ‖BA‖/‖W‖, kept share, output change, floored values (IniLoRA:
    the fit's error over the Eckart–Young optimum instead); then the learning rate the benchmarks
    found for the init (as rates, given plain LoRA's `lora_lr`)."""
    from .models.linears import module_kind
    from .solve import modes

    mode = modes.get(report["mode"])
    rows = report["modules"]
    grouped = len(rows) > TABLE_ROWS
    fitted = "fit_error" in next(iter(rows.values()))
    shared = os.path.commonprefix(list(rows))
    shared = "" if grouped else shared[: shared.rfind(".") + 1]  # e.g. "model.layers.", left out of every row
    groups: dict[str, list[dict]] = {}
    for name, row in rows.items():
        groups.setdefault(module_kind(name) if grouped else name[len(shared):], []).append(row)
    floors = mode.floors  # only the CNT modes floor eigenvalues at rcond
    last = "fit ÷ opt" if fitted else "floored" if floors else None
    notes = list(mode.notes)
    if floors:
        notes.append("floored = eigenvalues under rcond·λmax")
    if fitted:
        notes.append("fit ÷ opt = ‖W − BA‖ / ‖W − W_r‖ (Eckart–Young optimum)")
    quantized = "quant_error" in next(iter(rows.values()))
    if quantized:
        notes.append("W−Q−BA = ‖W − Q − BA‖/‖W‖ with Q the NF4 base; W−Q(W) = plain QLoRA's ‖W − NF4(W)‖/‖W‖")
    if grouped:
        notes.append(f"per module kind: rank range, medians over layers{', floored max' if floors else ''}; per module in report.json")
    title = f"{report['mode']} · {report['init']} init" + (f" · rcond {report['rcond']:g}" if floors else "")
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("module kind" if grouped else f"module ({shared}…)" if shared else "module", overflow="fold", min_width=22)
    for header in ("rank", "‖ΔW‖", "‖BA‖/‖W‖", "kept", "out Δ", *([last] if last else []), *(("W−Q−BA", "W−Q(W)") if quantized else ())):
        table.add_column(header, justify="right", no_wrap=True)
    typical = statistics.median if grouped else max  # max of one value is the value
    for label, members in groups.items():
        ranks = [m["rank"] for m in members]
        cells = [
            label,
            f"{min(ranks)}" if min(ranks) == max(ranks) else f"{min(ranks)}–{max(ranks)}",
            f"{typical(m['delta_norm'] for m in members):.3g}",
            f"{typical(m['update_norm'] / m['weight_norm'] if m['weight_norm'] else 0.0 for m in members):.3g}",
            "–" if members[0]["kept"] is None else f"{100 * typical(m['kept'] for m in members):.1f}%",
            "–" if members[0]["output_change"] is None else f"{typical(m['output_change'] for m in members):.3g}",
        ]
        if last:
            cells.append(f"{typical(_fit_ratio(m) for m in members):.4f}" if fitted else f"{max(m['floored'] for m in members)}")
        if quantized:
            cells += [f"{typical(m['quant_error'] for m in members):.4f}", f"{typical(m['qlora_error'] for m in members):.4f}"]
        table.add_row(*cells)
    out.print(table)
    out.print(" · ".join(notes), style="dim", highlight=False)  # not a caption: that would wrap at the table's width
    budget = f" of budget {report['budget']}" if report["budget"] else ""
    wanted = "‖G‖² in rank r" if mode.reads == modes.GRADIENTS else "‖ΔW‖² kept"
    kept = "" if report["kept"] is None else f"{wanted} overall {100 * report['kept']:.1f}%; "
    floored = f"{report['floored_modules']} modules had values under the floor; " if floors else ""
    steps = f"; Adam ran {max(m['steps'] for m in rows.values())} steps at most" if fitted else ""
    out.print(f"{report['modules_with_adapter']}/{len(rows)} modules get an adapter, total rank {report['total_rank']}{budget}; "
              f"{kept}{floored}solved in {report['solve_seconds']:.1f}s{steps}", highlight=False)
    if "lr_advice" in report:  # reports before the advice lack it
        from .solve.learning_rate import advice, form

        init_form = form(report["init"], report.get("out_delta_scale"))  # the scale is there exactly when --out-delta was set
        out.print(advice(report["lr_advice"], lora_lr, report["mode"], init_form), highlight=False)


def _fit_ratio(row: dict) -> float:
    return row["fit_error"] / row["optimal_error"] if row["optimal_error"] > 0 else 1.0


def print_run(summary: dict, out: Console) -> None:
    """One row per stage: what it did (computed, cache hit, up to date), how long, where (cache key or path)."""
    table = Table("stage", "name", "result", "seconds", "check", "where", title=f"cntinit run {summary['recipe']}",
                  box=box.SIMPLE_HEAD, caption=f"cache: {summary['cache']} · check: PEFT/diffusers output vs (W + BA)x, relative")
    table.columns[-1].overflow = "fold"
    for row in summary["stages"]:
        path = Path(row["path"])
        where = f"cache {path.name[:12]}" if row["stage"] != "export" else _relative(path)
        table.add_row(row["stage"], row["name"], row["status"], f"{row['seconds']:.1f}", f"{row['check']:.1e}" if "check" in row else "",
                      where, style=None if row["status"] == "computed" else "dim")
    out.print(table)


def _relative(path: Path) -> str:
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_cache(found: list, root: Path, stale: list, out: Console) -> None:
    """`cntinit cache ls`: an entry per row, what tells it apart from the others of its label."""
    table = Table("key", "kind", "what", "details", "size", "last used", title=str(root), box=box.SIMPLE_HEAD)
    details = _details(found)
    for e in found:
        table.add_row(e.key[:12], e.kind, e.meta.get("label", "?"), details[e.key], size(e.bytes),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used)))
    out.print(table)
    out.print(f"{len(found)} entries, {size(sum(e.bytes for e in found))}", highlight=False)
    if stale:
        out.print(f"and {len(stale)} temporary director{'y' if len(stale) == 1 else 'ies'} left by an interrupted run "
                  "(`cntinit cache prune` removes those of runs no longer alive)", highlight=False)


def _details(found: list) -> dict[str, str]:
    """key -> what tells an entry apart: the main facts of every entry (a capture's targets and
    samples; a solve's init, module count and capture), plus any other option in which entries
    of one label differ."""
    facts = {e.key: _facts(e) for e in found}
    shown = {}
    for e in found:
        peers = [facts[p.key] for p in found if p.meta.get("label") == e.meta.get("label")]
        varying = {name for name in facts[e.key] if len({str(f.get(name)) for f in peers}) > 1}
        main = ("targets", "samples") if e.kind == "capture" else ("init", "modules", "capture")
        shown[e.key] = " · ".join(f"{name} {value}" for name, value in facts[e.key].items() if name in main or name in varying)
    return shown


def _facts(entry) -> dict[str, object]:
    manifest = entry.manifest
    if entry.kind == "capture":
        settings = {k: v for k, v in manifest.get("capture", {}).items() if k not in ("targets", "max_samples")}
        return {"targets": manifest.get("capture", {}).get("targets"), "samples": manifest.get("data", {}).get("samples"),
                "tokens": manifest.get("data", {}).get("tokens")} | settings
    source = (manifest.get("capture") or {}).get("path")
    params = {k: v for k, v in manifest.get("params", {}).items() if k != "rank"}
    return {"init": manifest.get("init"), "modules": len(manifest.get("modules", {})),
            "capture": Path(source).name[:12] if source else "none (data-free)"} | params


def size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""
