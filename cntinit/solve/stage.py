"""The solve stage: per-module initializations from a statistics store (or, for a data-free mode,
the model alone) into a solve directory (solution.py).

The inputs are opened and checked against the weights they were captured from, each module's rank
is bounded, the modules are shared out among torchrun's processes, and the mode (modes/) computes
their factors batch by batch (factors.py) — or, for EVA, all at once — before the solve directory
and its report (report.py) are written whole.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import torch
from rich.progress import Progress
from transformers.pytorch_utils import Conv1D

from .. import console, distributed, hub
from ..console import log, progress
from ..errors import CntinitError
from ..finite import all_finite
from ..models import fingerprints, loading, pretrained
from ..models.linears import ALL_LINEAR, in_out_features, select_names, select_targets
from ..models.placement import Placement, offload_placement, resolve_device
from ..models.source import locate
from ..storage import store
from ..storage.atomic import atomic_directory
from . import inputs, modes, report, solution
from .factors import scale_to_out_delta, split_all
from .modes import GRADIENTS, STATISTICS, Mode
from .options import PRECISIONS, RECORDED_WHEN_SET, Options


def solve(capture_dir: str | Path | None, out: str | Path, options: Options | None = None, *, model: str | Path | None = None,
          targets: str | None = None, device: str = "auto", overwrite: bool = False, trust_remote_code: bool = False,
          offload: bool = False, max_memory: str | None = None, revision: str | None = None, **params) -> Path:
    """Solve every module of the store at `capture_dir` (or, for a data-free mode, the `targets`
    of `model`: a directory, or a Hub id at `revision`); write a solve directory at `out`.

    Parameters come as `Options` or as its fields: `solve("stats", "init", mode="cnt-s", rank=8)`.
    Under `torchrun`, every process solves its share of the modules and rank 0 writes the result.
    With `offload`, the model's weights stay within `max_memory` ('cpu=64GiB') of CPU memory, the
    rest on disk, and are read one module at a time.
    """
    options = (options or Options(**params)).resolved()
    model = locate(model, revision, trust_remote_code) if model is not None else None
    with distributed.joined() as world, contextlib.ExitStack() as scratch:
        # weights in CPU memory, then on disk: the solve moves each batch of them to its device itself
        placement = offload_placement(scratch, out, offload, max_memory, torch.device("cpu"), "auto")
        return _solve(world, capture_dir, out, options, model, targets, device, overwrite, trust_remote_code, placement)


def _solve(world: distributed.World, capture_dir, out, options: Options, model, targets, device, overwrite, trust_remote_code,
           placement: Placement | None) -> Path:
    mode = modes.get(options.mode)
    if not world.leader:
        console.quiet = True  # one progress bar and log, rank 0's
    started = time.perf_counter()
    stats, modules, model_info, source = _open(capture_dir, model, targets, mode, options, trust_remote_code, placement)
    if mode.buckets:  # the robust estimate's weights, one per bucket of this capture
        options = replace(options, bucket_weights=inputs.bucket_weights(options, stats.buckets))
    store.check_out(out, model_info["fingerprint"], overwrite, solution.FORMAT, "a solve directory")
    dev = resolve_device(device)
    dtype = PRECISIONS[options.precision]
    loaded = time.perf_counter() - started
    log(f"loaded {len(modules)} modules of {source} in {loaded:.1f}s")
    max_ranks = _max_ranks(modules, mode, options)
    mine = _share(modules, stats, mode, options, world)
    if world.size > 1:
        log(f"{world.size} processes: this one solves {len(mine)} of {len(modules)} modules")

    def batches(label: str) -> Iterator[tuple[inputs.Batch, Progress]]:
        with progress() as bar:
            task = bar.add_task(label, total=len(mine))
            for batch in mode.batches(stats, mine, options, dev, dtype):
                yield batch, bar
                bar.update(task, advance=len(batch.names))

    if mode.solve_all is not None:
        ranks, factors, rows = mode.solve_all(stats, modules, mine, options, dev, dtype, world)
    else:
        options, ranks, factors, rows = split_all(mode, batches, modules, options, max_ranks, world)
    if world.size > 1:
        factors, rows = distributed.gather_factors(world, factors, rows)
        if not world.leader:
            return Path(out)
    seconds = time.perf_counter() - started - loaded
    overflow = next((name for name, pair in factors.items() if not all(all_finite(t) for t in pair)), None)
    if overflow:
        raise CntinitError(f"the factors of {overflow} come out NaN or Inf (beyond float32, which the solve directory stores): "
                           "these options make the target too large; use smaller --bucket-weights or --shift-c, or a larger --rcond")
    scaled_by = scale_to_out_delta(options.out_delta, factors, rows) if options.out_delta is not None else None
    made = report.report(mode, options, {name: rows[name] for name in modules}, ranks, seconds, loaded, scaled_by)  # model order
    report.warn_if_far(options, made)
    _write(out, capture_dir, stats, options, modules, model_info, str(dev), ranks, factors, made)
    log(f"solved {options.mode} for {len(factors)} modules (total rank {sum(ranks.values())}) in {seconds:.1f}s after {loaded:.1f}s of loading")
    return Path(out)


def _open(capture_dir, model, targets, mode: Mode, options: Options, trust_remote_code: bool, placement: Placement | None):
    """(store or None, target modules, model record, description): from a capture, whose recorded
    (or --model) weights must match its fingerprint, or — data-free modes only — from --model and --targets."""
    if capture_dir is not None:
        stats = store.Store(capture_dir)
        captured = stats.manifest
        if mode.reads == GRADIENTS and not stats.has_gradients:
            raise CntinitError(f"--mode {options.mode} needs loss gradients, and {capture_dir} holds activation statistics only: "
                               "capture again with --gradients")
        if mode.reads == STATISTICS and not stats.has_statistics:
            raise CntinitError(f"--mode {options.mode} needs activation statistics, and {capture_dir} holds loss gradients only "
                               "(--gradients-only): capture again without --gradients-only")
        names = list(captured["modules"]) if targets is None else select_names(list(captured["modules"]), targets, "captured module")
        source = pretrained.open_recorded(captured, model, trust_remote_code, placement)
        modules, model_path = source.modules, source.path
        record = dict(captured["model"], path=str(model_path.absolute())) | hub.origin(model_path)
        if len(names) < len(modules):  # a subset: exports check the weights of the modules solved
            modules = {name: modules[name] for name in names}
            record["fingerprint"] = fingerprints.fingerprint(modules, model_dir=model_path)
        if options.init == "residual":
            pretrained.refuse_tied(list(modules), source)
        return stats, modules, record, f"{model_path} and the statistics of {capture_dir}"
    if mode.reads == GRADIENTS:
        raise CntinitError(f"--mode {options.mode} needs loss gradients: give the directory `cntinit capture --gradients` wrote")
    if mode.reads == STATISTICS:
        raise CntinitError(f"--mode {options.mode} needs activation statistics: give the directory `cntinit capture` wrote")
    if model is None:
        raise CntinitError("give a capture directory, or --model MODEL for a data-free mode (lora, pissa, milora, olora, mica, inilora*, "
                           "loftq)")
    source = pretrained.open_model(model, trust_remote_code, lambda net: select_targets(net, targets or ALL_LINEAR), placement)
    if options.init == "residual":
        pretrained.refuse_tied(list(source.modules), source)
    return None, source.modules, loading.record(source.net, source.path, fingerprints.fingerprint(source.modules, model_dir=source.path)), str(model)


def _max_ranks(modules: dict, mode: Mode, options: Options) -> dict[str, int]:
    """The largest rank each module can take (min(in, out), or --max-rank); without --vas, every
    module must take --rank (LoRA-GA: pick it from 2 × rank singular vectors)."""
    max_ranks = {}
    for name, module in modules.items():
        d, k = in_out_features(module)
        max_ranks[name] = min(k, d, options.max_rank or k)
    needed = mode.picks * options.rank
    too_small = [name for name, module in modules.items() if min(in_out_features(module)) < needed]
    if too_small and not options.vas:
        smallest = min(in_out_features(modules[too_small[0]]))
        more = f" (and {len(too_small) - 1} more)" if len(too_small) > 1 else ""
        if mode.picks > 1:
            raise CntinitError(f"--mode {mode.name} at --rank {options.rank} picks from {mode.picks}r = {needed} singular vectors, more than "
                               f"min(in, out) = {smallest} of {too_small[0]}{more}: lower --rank to {smallest // mode.picks} or less")
        raise CntinitError(f"--rank {options.rank} exceeds min(in, out) = {smallest} of {too_small[0]}{more}: lower --rank, "
                           "or use --vas, which caps each module at its own size")
    return max_ranks


def _share(modules: dict, stats: store.Store | None, mode: Mode, options: Options, world: distributed.World) -> dict:
    """The modules this process solves. Units of work are modules, or for the modes that
    eigendecompose Σ (CNT, eva) all modules reading one statistic; a unit costs about
    d³ for its eigendecomposition plus the mode's cost per module (k·d·min(k, d) per split, k·d per IniLoRA step)."""
    if world.size == 1:
        return modules
    by_key = stats is not None and mode.by_key
    units: dict[str, list[str]] = {}
    for name in modules:
        units.setdefault(stats.manifest["modules"][name]["key"] if by_key else name, []).append(name)
    costs = {}
    for unit, names in units.items():
        shapes = [in_out_features(modules[n]) for n in names]
        costs[unit] = sum(mode.cost(k, d) for d, k in shapes) + (shapes[0][0] ** 3 if by_key else 0)
    owner = distributed.assign(costs, world.size)
    return {name: modules[name] for unit, names in units.items() if owner[unit] == world.rank for name in names}


def _write(out, capture_dir, stats: store.Store | None, options: Options, modules: dict, model_info: dict, device: str, ranks: dict,
           factors: dict, made: dict) -> None:
    """The solve directory, whole or not at all."""
    captured = stats.manifest if stats is not None else None
    manifest = solution.new_manifest(
        mode=options.mode,
        init=options.init,
        params={k: v for k, v in asdict(options).items() if k not in ("mode", "init") and not (k in RECORDED_WHEN_SET and v is None)},
        capture=None if captured is None else {
            "path": str(Path(capture_dir).absolute()),
            "manifest_sha256": store.sha256_file(Path(capture_dir) / store.MANIFEST),
            "data_fingerprint": captured["data"]["fingerprint"],
            "tokens": captured["data"]["tokens"],
            "buckets": stats.buckets,
        },
        model=model_info,
        device=device,
        modules={
            name: {
                "rank": ranks[name],
                "in_features": in_out_features(module)[0],
                "out_features": in_out_features(module)[1],
                "stats_key": captured["modules"][name]["key"] if captured else None,
                "fan_in_fan_out": isinstance(module, Conv1D),
            }
            for name, module in modules.items()
        },
    )
    with atomic_directory(out) as tmp:
        solution.write(tmp, manifest, {name: factors[name] for name in modules if name in factors}, made)
