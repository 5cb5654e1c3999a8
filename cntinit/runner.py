"""`cntinit run`: a recipe's capture, solves and exports, each stage taken from the cache when
its inputs were seen before.

Captures and solves live in the cache (storage/cache.py), keyed by what they were computed from;
exports are written under the recipe's `out` (`OUT/<solve>/<export>/`, next to the solve's
report.json and report.png) and are skipped when the directory already holds the same
export of the same solve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import inspect
import shutil
import time
from pathlib import Path

from . import console, embedded, hub, plots, recipe, records
from .capture import capture
from .errors import CntinitError, Interrupted, not_one_of
from .export import export
from .export.formats import FORMATS
from .models.linears import ALL_LINEAR, select_names
from .models.placement import resolve_device
from .models.source import locate
from .solve import Options, modes, solve
from .solve.options import NEWER_OPTIONS
from .solve.solution import REPORT, Solution
from .storage import cache, store
from .storage.atomic import atomic_file, check_writable
from .storage.manifests import read_json


def _defaults(function, keys) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if name in keys and p.default is not inspect.Parameter.empty}


CAPTURE_DEFAULTS = _defaults(capture, recipe.schemas()["capture"])
PLACEMENT = ("offload", "max_memory", "stats_device", "layerwise", "activations_device", "gradient_checkpointing")  # how the work runs, not what it computes: not in cache keys
PLOT = "report.png"  # beside each solve's report.json under the recipe's out
MAX_REPORT_BYTES = 1 << 30  # a report.json larger than this is not one a solve wrote (a 70B model's is tens of MB)
ONLY_WHEN_SET = ("gradients", "gradients_only", "unet_only", "split", "data_config", "shuffle_seed", "t5_tokens")  # options newer than cache entries and exports: recorded only when set, so older ones still match
EXPORT_DEFAULTS = _defaults(export, set(recipe.schemas()["exports"]) - {"check"})  # what an export manifest's "options" records


def _plain(value):
    """JSON-ready: tuples as lists, paths as text."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _targets(targets: str | list[str]) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)


def cached_capture(model: str | Path, data: str | Path, *, targets: str | list[str] = ALL_LINEAR, device: str = "auto",
                   trust_remote_code: bool = False, cache_dir: Path | None = None, revision: str | None = None,
                   **options) -> tuple[Path, bool]:
    """(the cached store of this capture, whether it was there already); `options` are capture()'s.
    The key holds the contents of the model's and the data's files, not their names: a Hub id and its
    snapshot's directory are one entry."""
    if str(data) == "-":
        raise CntinitError("data from stdin cannot be cached (the cache keys on the data's contents): give --out, or a file")
    model, data = locate(model, revision, trust_remote_code), records.locate(data)
    cache_dir = cache.ready(cache_dir)
    settings = CAPTURE_DEFAULTS | options
    result_options = {k: v for k, v in settings.items() if k not in PLACEMENT and not (k in ONLY_WHEN_SET and (v is None or v is False))}
    inputs = {"model": cache.tree_digest(model, cache_dir), "data": cache.tree_digest(data, cache_dir), "targets": _targets(targets),
              "device": str(resolve_device(device)), "options": _plain(result_options)}
    label = f"capture of {hub.origin(model).get('repo', model.name)} over {hub.origin(data).get('repo', data.name)}"
    return cache.obtain("capture", inputs, label, lambda out: capture(
        model, data, out, targets=targets, device=device, trust_remote_code=trust_remote_code, overwrite=True, **settings), cache_dir)


def cached_solve(capture_dir: str | Path | None, options: Options, *, model: str | Path | None = None, targets: str | None = None,
                 device: str = "auto", trust_remote_code: bool = False, cache_dir: Path | None = None, offload: bool = False,
                 max_memory: str | None = None, revision: str | None = None) -> tuple[Path, bool]:
    """(the cached solve directory, whether it was there already). With a capture the key holds the
    store's manifest (which holds every payload's checksum); without one, the model's contents and targets."""
    cache_dir = cache.ready(cache_dir)
    resolved = options.resolved()
    model = locate(model, revision, trust_remote_code) if model is not None else None
    if capture_dir is not None:
        source = {"capture": store.sha256_file(Path(capture_dir) / store.MANIFEST) if (Path(capture_dir) / store.MANIFEST).is_file() else str(capture_dir)}
        if targets is not None:  # a subset of the captured modules
            source["targets"] = _targets(targets)
    elif model is not None:
        source = {"model": cache.tree_digest(model, cache_dir), "targets": _targets(targets or ALL_LINEAR)}
    else:
        source = {}  # solve() itself explains what is missing
    chosen = {k: v for k, v in dataclasses.asdict(resolved).items() if not (k in NEWER_OPTIONS and v is None)}  # older keys stay
    inputs = source | {"options": _plain(chosen), "device": str(resolve_device(device))}
    label = f"{resolved.mode} rank {resolved.rank}" + (" (VAS)" if resolved.vas else "")
    return cache.obtain("solve", inputs, label, lambda out: solve(
        capture_dir, out, options, model=model, targets=targets, device=device, overwrite=True, trust_remote_code=trust_remote_code,
        offload=offload, max_memory=max_memory), cache_dir)


def run(plan: recipe.Recipe, trust_remote_code: bool = False, cache_dir: Path | None = None) -> dict:
    """Run a checked recipe; returns its summary (what each stage did, how long, where)."""
    solves = _checked_solves(plan)
    model = embedded.model_dir() if plan.model == recipe.EMBEDDED else recipe.located(
        "model", lambda: locate(plan.model, plan.revision, trust_remote_code))
    check_writable(plan.out, "recipe key out: name a writable directory (override: out=PATH)")
    _check_outputs(plan, list(solves))
    cache_dir = cache.ready(cache_dir)
    rows: list[dict] = []
    try:
        with contextlib.ExitStack() as held:  # entries this run reads are kept from `cache rm` and `prune` until it is done
            return _run(plan, model, solves, trust_remote_code, cache_dir, held, rows)
    except KeyboardInterrupt:
        kept = ", ".join(f"{row['stage']} {row['name']}" for row in rows)
        raise Interrupted(f"stopped by SIGINT; {'what finished is kept: ' + kept if rows else 'nothing had finished'} "
                          "(captures and solves in the cache, exports under out): run it again to go on from there") from None


def _run(plan: recipe.Recipe, model: Path, solves: dict[str, tuple[Options, str | None]], trust_remote_code: bool, cache_dir: Path,
         held: contextlib.ExitStack, rows: list[dict]) -> dict:
    capture_dir = None
    if plan.capture is not None:
        settings = dict(plan.capture)
        data = settings.pop("data")
        data = embedded.data_file() if data == recipe.EMBEDDED else recipe.located("capture.data", lambda: records.locate(data))
        started = time.perf_counter()
        capture_dir, hit = cached_capture(model, data, targets=plan.targets, device=plan.device, trust_remote_code=trust_remote_code,
                                          cache_dir=cache_dir, **settings)
        held.enter_context(cache.in_use(capture_dir, cache_dir))
        rows.append(_row("capture", data.name, hit, started, capture_dir))
        _check_subsets(solves, list(store.Store(capture_dir, verify=False).manifest["modules"]))
    plot = plan.plot and plots.available()
    if plan.plot and not plot:
        console.warn(f"no rank/spectrum plots: matplotlib is not installed ({plots.INSTALL})")
    exports = []
    for name, (options, targets) in solves.items():
        started = time.perf_counter()
        solve_dir, hit = cached_solve(capture_dir, options, model=None if capture_dir else model,
                                      targets=targets if capture_dir else _targets(targets or plan.targets), device=plan.device,
                                      trust_remote_code=trust_remote_code, cache_dir=cache_dir)
        held.enter_context(cache.in_use(solve_dir, cache_dir))
        rows.append(_row("solve", name, hit, started, solve_dir))
        _publish_report(solve_dir, plan.out / name, plot)
        for entry in plan.exports:
            exports.append(_export(solve_dir, plan.out / name / entry["name"], entry, name, trust_remote_code))
            rows.append(exports[-1])
    summary = {"recipe": plan.name, "out": str(plan.out.absolute()), "cache": str(cache_dir), "stages": rows,
               "exports": [row["path"] for row in exports]}
    return summary


def _checked_solves(plan: recipe.Recipe) -> dict[str, tuple[Options, str | None]]:
    """Every solve's options resolved, with its own targets (a subset of the capture's) if it
    names them, and every export's format known before any work starts."""
    solves = {}
    for i, entry in enumerate(plan.solves):
        fields = {k: v for k, v in entry.items() if k not in ("name", "targets")}
        try:
            options = Options(**fields)
            options.resolved()
        except CntinitError as exc:
            raise CntinitError(f"recipe solves.{i} ({entry['name']}): {exc}") from None
        if plan.capture is None and modes.get(options.mode).reads != modes.WEIGHTS:
            raise CntinitError(f"recipe solves.{i} ({entry['name']}): --mode {options.mode} needs activation statistics; add a capture section with data")
        solves[entry["name"]] = (options, _targets(entry["targets"]) if "targets" in entry else None)
    for i, entry in enumerate(plan.exports):
        if entry.get("format", "peft") not in FORMATS:
            raise not_one_of(f"recipe key exports.{i}.format", entry["format"], FORMATS)
    return solves


def _check_outputs(plan: recipe.Recipe, names: list[str]) -> None:
    """Before any work: every place the run writes under `out` — each solve's report.json and report.png,
    each export — is free, or what a run wrote there before: a run never writes over the user's files."""
    for name in names:
        directory = plan.out / name
        if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
            raise CntinitError(f"recipe key out: {directory} is not a directory, where the run writes the {name} solve's report and "
                               "exports: move it, or choose another out")
        report, plot = directory / REPORT, directory / PLOT
        ours = _is_report(report)
        if (report.exists() or report.is_symlink()) and not ours:
            raise CntinitError(f"recipe key out: {report} is not a report cntinit wrote, and the run writes its own there: move it, "
                               "or choose another out")
        if (plot.exists() or plot.is_symlink()) and not ours:
            raise CntinitError(f"recipe key out: {plot} is not a plot cntinit wrote (no report of a run beside it), and the run writes "
                               "its own there: move it, or choose another out")
        for entry in plan.exports:
            store.refuse_foreign((directory / entry["name"]).absolute())


REPORT_KEYS = ("mode", "init", "rank", "total_rank", "modules")  # what every report.json holds (solve/report.py)


def _is_report(path: Path) -> bool:
    """A regular file holding a solve's report, as a run publishes it."""
    if path.is_symlink():
        return False
    try:
        report = read_json(path, MAX_REPORT_BYTES)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and all(key in report for key in REPORT_KEYS)


def _check_subsets(solves: dict[str, tuple[Options, str | None]], captured: list[str]) -> None:
    """Before any solve: each solve's own targets pick some of the captured modules."""
    for i, (name, (_, targets)) in enumerate(solves.items()):
        if targets is not None:
            try:
                select_names(captured, targets, "captured module")
            except CntinitError as exc:
                raise CntinitError(f"recipe solves.{i} ({name}): {exc}") from None


def _row(stage: str, name: str, hit: bool, started: float, path: Path) -> dict:
    return {"stage": stage, "name": name, "status": "cache hit" if hit else "computed",
            "seconds": round(time.perf_counter() - started, 3), "path": str(path)}


def _publish_report(solve_dir: Path, directory: Path, plot: bool) -> None:
    """OUT/<solve>/report.json (and report.png), refreshed only when the solve's report changed."""
    report = solve_dir / REPORT
    target = directory / REPORT
    fresh = not (target.is_file() and filecmp.cmp(report, target, shallow=False))
    if fresh:
        with atomic_file(target) as tmp:
            shutil.copyfile(report, tmp)
    if not plot:
        return
    png = directory / PLOT
    if fresh or not png.is_file():
        plots.write_report_plot(Solution(solve_dir).report, png)


def _export(solve_dir: Path, out: Path, entry: dict, solve_name: str, trust_remote_code: bool) -> dict:
    """One export of one solve, unless `out` already holds exactly it."""
    started = time.perf_counter()
    settings = {k: v for k, v in entry.items() if k not in ("name", "check")}
    options = {k: v for k, v in (EXPORT_DEFAULTS | settings).items() if not (k in ONLY_WHEN_SET and not v)}
    existing = store.read_manifest(out, "cntinit.export")
    current = store.sha256_file(solve_dir / store.MANIFEST)
    if existing and existing.get("options") == options and existing.get("solve", {}).get("manifest_sha256") == current:
        row = _row("export", f"{solve_name}/{entry['name']}", True, started, out)
        return row | {"status": "up to date"}
    export(solve_dir, out, trust_remote_code=trust_remote_code, check=bool(entry.get("check")), **settings)
    row = _row("export", f"{solve_name}/{entry['name']}", False, started, out)
    if entry.get("check"):
        row["check"] = read_json(out / store.MANIFEST)["check"]["max_relative_error"]
    return row
