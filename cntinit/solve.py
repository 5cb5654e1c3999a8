"""`cntinit solve`: per-module initializations from a statistics store and the model's weights.

Modules are solved in batches of equal shape on the chosen device. Statistics are loaded
one group of equal-dimension keys at a time, so memory stays bounded by CHUNK_BYTES plus
the model itself.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from transformers.pytorch_utils import Conv1D

from . import models, modes, solution, store, vas
from .atomic import atomic_directory
from .console import log, progress
from .errors import CntinitError

CHUNK_BYTES = 1 << 30
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
INITS = ("offset", "residual")


@dataclass
class Options:
    """Every parameter of a solve; recorded in the solve manifest."""

    mode: str
    rank: int = 16
    rcond: float = 1e-4
    centered: bool = False
    self_form: str = "paper"
    shift_c: float = 1.0
    bucket_weights: list[float] | None = None
    pooled: bool = False
    decompose: str | None = None  # svd, except qr for olora
    split_p: float = 0.5
    init: str | None = None  # offset for the CNT modes (the paper's), residual for pissa/milora/olora
    vas: bool = False
    budget: int | None = None
    min_rank: int = 0
    max_rank: int | None = None
    precision: str = "float64"

    def resolved(self) -> "Options":
        """These options with the mode's defaults filled in, checked."""
        weight_mode = self.mode in modes.WEIGHT_MODES
        natural = "qr" if self.mode == "olora" else "svd"
        if weight_mode and self.decompose not in (None, natural):
            raise CntinitError(f"--mode {self.mode} splits W by {natural}; --decompose {self.decompose} would make it another method")
        if weight_mode and self.init == "offset":
            raise CntinitError(f"--mode {self.mode} moves part of W into the adapter, so its base must be W − BA: use --init residual (the default)")
        options = replace(self, decompose=self.decompose or natural, init=self.init or ("residual" if weight_mode else "offset"))
        options.check()
        return options

    def check(self) -> None:
        choices = {"--mode": (self.mode, modes.MODES + modes.WEIGHT_MODES), "--self-form": (self.self_form, modes.SELF_FORMS),
                   "--decompose": (self.decompose, modes.DECOMPOSE), "--init": (self.init, INITS),
                   "--precision": (self.precision, tuple(PRECISIONS))}
        for option, (value, allowed) in choices.items():
            if value not in allowed:
                raise CntinitError(f"{option} {value} is not one of {', '.join(allowed)}")
        if self.rank < 1:
            raise CntinitError(f"--rank must be at least 1, got {self.rank}")
        if not 0 <= self.rcond < 1:
            raise CntinitError(f"--rcond must be in [0, 1), got {self.rcond}")
        if not 0 <= self.split_p <= 1:
            raise CntinitError(f"--split-p must be in [0, 1], got {self.split_p}")
        if self.budget is not None and self.budget < 1:
            raise CntinitError(f"--budget must be at least 1, got {self.budget}")
        if self.min_rank < 0:
            raise CntinitError(f"--min-rank must be at least 0, got {self.min_rank}")
        if self.max_rank is not None and self.max_rank < max(1, self.min_rank):
            raise CntinitError(f"--max-rank {self.max_rank} must be at least 1 and at least --min-rank {self.min_rank}")
        if not self.vas and (self.budget is not None or self.min_rank or self.max_rank is not None):
            raise CntinitError("--budget, --min-rank and --max-rank shape variable ranks: add --vas")


class Batch(NamedTuple):
    names: list[str]
    weight: torch.Tensor  # (n, k, d)
    delta: torch.Tensor  # (n, k, d): W_est − W for the CNT modes; W itself for pissa/milora/olora
    sigma: torch.Tensor | None  # (n, d, d): pooled uncentered second moment, for the report; None without a capture
    floored: list[int]  # eigen/singular values under the floor, worst bucket


def solve(capture_dir: str | Path | None, out: str | Path, options: Options | None = None, *, model: str | Path | None = None,
          targets: str | None = None, device: str = "auto", overwrite: bool = False, trust_remote_code: bool = False,
          **params) -> Path:
    """Solve every module of the store at `capture_dir` (or, for a data-free mode, the `targets`
    of `model`); write a solve directory at `out`.

    Parameters come as `Options` or as its fields: `solve("stats", "init", mode="cnt-s", rank=8)`.
    """
    options = (options or Options(**params)).resolved()
    started = time.perf_counter()
    stats, modules, model_info, source = _open(capture_dir, model, targets, options, trust_remote_code)
    captured = stats.manifest if stats is not None else None
    bucket_weights = _bucket_weights(options, stats.buckets) if stats is not None else [1.0]
    store.check_out(out, model_info["fingerprint"], overwrite, solution.FORMAT, "a solve directory")
    dev = models.resolve_device(device)
    dtype = PRECISIONS[options.precision]
    loaded = time.perf_counter() - started
    log(f"loaded {len(modules)} modules of {source} in {loaded:.1f}s")

    def deltas(label: str) -> Iterator[Batch]:
        with progress() as bar:
            task = bar.add_task(label, total=len(modules))
            batches = _weights(stats, modules, dev, dtype) if options.mode in modes.WEIGHT_MODES else \
                _deltas(stats, modules, options, bucket_weights, dev, dtype)
            for batch in batches:
                yield batch
                bar.update(task, advance=len(batch.names))

    max_ranks = {}
    for name, module in modules.items():
        d, k = models.in_out_features(module)
        max_ranks[name] = min(k, d, options.max_rank or k)
    if options.vas:
        options = replace(options, budget=options.budget or options.rank * len(modules))
        singular_values = {}
        for batch in deltas("singular values"):
            singular_values.update(zip(batch.names, torch.linalg.svdvals(batch.delta).cpu()))
        ranks = vas.allocate(singular_values, max_ranks, options.budget, options.min_rank)
    else:
        ranks = {name: min(options.rank, limit) for name, limit in max_ranks.items()}

    factors, rows = {}, {}
    for batch in deltas(f"solve {options.mode}"):
        top = max(max(ranks[name] for name in batch.names), 1)
        minor = options.mode == "milora"
        b, a = modes.split(batch.delta, top, options.decompose, options.split_p, minor)
        for i, name in enumerate(batch.names):
            r = ranks[name]
            keep = slice(top - r, top) if minor else slice(0, r)  # the r smallest of the top kept, for MiLoRA
            update = b[i, :, keep] @ a[i, keep]
            sigma = batch.sigma[i] if batch.sigma is not None else None
            rows[name] = _diagnostics(batch.weight[i], batch.delta[i], update, sigma, r, batch.floored[i])
            if r:
                factors[name] = (b[i, :, keep].cpu(), a[i, keep].cpu())
    seconds = time.perf_counter() - started - loaded

    report = _report(options, rows, ranks, seconds, loaded)
    manifest = solution.new_manifest(
        mode=options.mode,
        init=options.init,
        params={k: v for k, v in asdict(options).items() if k not in ("mode", "init")} | {"bucket_weights": bucket_weights},
        capture=None if captured is None else {
            "path": str(Path(capture_dir).absolute()),
            "manifest_sha256": store.sha256_file(Path(capture_dir) / store.MANIFEST),
            "data_fingerprint": captured["data"]["fingerprint"],
            "tokens": captured["data"]["tokens"],
            "buckets": stats.buckets,
        },
        model=model_info,
        device=str(dev),
        modules={
            name: {
                "rank": ranks[name],
                "in_features": models.in_out_features(module)[0],
                "out_features": models.in_out_features(module)[1],
                "stats_key": captured["modules"][name]["key"] if captured else None,
                "fan_in_fan_out": isinstance(module, Conv1D),
            }
            for name, module in modules.items()
        },
    )
    with atomic_directory(out) as tmp:
        solution.write(tmp, manifest, factors, report)
    log(f"solved {options.mode} for {len(factors)} modules (total rank {sum(ranks.values())}) in {seconds:.1f}s after {loaded:.1f}s of loading")
    return Path(out)


def _open(capture_dir, model, targets, options: Options, trust_remote_code: bool):
    """(store or None, target modules, model record, description): from a capture, whose recorded
    (or --model) weights must match its fingerprint, or — data-free modes only — from --model and --targets."""
    if capture_dir is not None:
        if targets is not None:
            raise CntinitError("--targets picks modules only without a capture: the capture already fixed them")
        stats = store.Store(capture_dir)
        captured = stats.manifest
        model_path = Path(model) if model is not None else Path(captured["model"]["path"])
        _, _, modules = models.load_matching(model_path, list(captured["modules"]), captured["model"]["fingerprint"], trust_remote_code)
        return stats, modules, dict(captured["model"], path=str(model_path.absolute())), f"{model_path} and the statistics of {capture_dir}"
    if options.mode in modes.MODES:
        raise CntinitError(f"--mode {options.mode} needs activation statistics: give the directory `cntinit capture` wrote")
    if model is None:
        raise CntinitError("give a capture directory, or --model MODEL for a data-free mode (pissa, milora, olora)")
    net, _ = models.load(model, trust_remote_code)
    modules = models.select_targets(net, targets or models.ALL_LINEAR)
    record = {"path": str(Path(model).absolute()), "class": type(net).__name__, "fingerprint": models.fingerprint(modules)}
    return None, modules, record, str(model)


def _bucket_weights(options: Options, buckets: int) -> list[float]:
    """w_j of eq. 18: one per bucket (all 1 by default), or [1] for the pooled statistics."""
    count = 1 if options.pooled else buckets
    weights = options.bucket_weights or [1.0] * count
    if len(weights) != count:
        what = "the pooled statistics take one weight" if options.pooled else f"the capture has {buckets} bucket(s)"
        raise CntinitError(f"--bucket-weights has {len(weights)} value(s) but {what}: give {count} comma-separated numbers")
    return [float(w) for w in weights]


def _pooled_sigma(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pooled uncentered second moment (d, d), float64: what the report measures output energy with."""
    return modes.second_moment(tensors["xxt"].double(), tensors["sum"].double(), tensors["count"], centered=False)


def _sigmas(tensors: dict[str, torch.Tensor], key: str, options: Options, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ per bucket used by the mode (B, d, d), pooled uncentered Σ (d, d)), float64."""
    t = {name: value.to(torch.float64) for name, value in tensors.items()}
    pooled = _pooled_sigma(t)
    if options.pooled or buckets == 1:
        return modes.second_moment(t["xxt"], t["sum"], t["count"], options.centered)[None], pooled
    empty = (t["bucket_count"] == 0).nonzero().flatten().tolist()
    if empty:
        raise CntinitError(f"bucket {empty[0]} of {key} holds no tokens: capture with fewer --buckets, or solve with --pooled")
    return modes.second_moment(t["bucket_xxt"], t["bucket_sum"], t["bucket_count"], options.centered), pooled


def _deltas(stats: store.Store, modules: dict, options: Options, bucket_weights: list[float],
            dev: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
    """ΔW = W_est − W for batches of equal-shape modules, one group of equal-dimension keys at a time."""
    readers: dict[str, list[str]] = {}
    for name in modules:
        readers.setdefault(stats.manifest["modules"][name]["key"], []).append(name)
    by_dim: dict[int, list[str]] = {}
    for key in readers:
        by_dim.setdefault(stats.manifest["stats"][key]["dim"], []).append(key)
    count = len(bucket_weights)
    for dim, keys in by_dim.items():
        per_chunk = max(1, CHUNK_BYTES // (3 * (count + 1) * dim * dim * 8))
        for start in range(0, len(keys), per_chunk):
            chunk = keys[start : start + per_chunk]
            pairs = [_sigmas(stats.tensors(key), key, options, stats.buckets) for key in chunk]
            sigma = torch.stack([p[0] for p in pairs]).to(dev, dtype)  # (keys, B, d, d)
            pooled = torch.stack([p[1] for p in pairs]).to(dev, dtype)
            eig, floored = None, None
            if options.mode != "cnt-sh":
                values, vectors = modes.eigen(sigma)
                eig = (values, vectors)
                floored = (~modes.kept(values, options.rcond)).sum(-1).amax(-1)  # per key
            by_out: dict[int, list[str]] = {}
            for key in chunk:
                for name in readers[key]:
                    by_out.setdefault(models.in_out_features(modules[name])[1], []).append(name)
            for k, names in by_out.items():
                per_batch = max(1, CHUNK_BYTES // (6 * k * dim * 8))
                for s in range(0, len(names), per_batch):
                    group = names[s : s + per_batch]
                    index = torch.tensor([chunk.index(stats.manifest["modules"][n]["key"]) for n in group], device=dev)
                    yield _solve_group(group, modules, options, bucket_weights, sigma, pooled, eig, floored, index, dev, dtype)


def _weights(stats: store.Store | None, modules: dict, dev: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
    """W itself, for the modes that split the weight (pissa, milora, olora), in batches of equal shape;
    with a capture, the pooled Σ of each module rides along for the report."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, module in modules.items():
        by_shape.setdefault(models.in_out_features(module), []).append(name)
    for (d, k), names in by_shape.items():
        per_batch = max(1, CHUNK_BYTES // (6 * k * d * 8))
        for s in range(0, len(names), per_batch):
            group = names[s : s + per_batch]
            w = torch.stack([models.weight_matrix(modules[n]).detach() for n in group]).to(dev, dtype)
            sigma = None
            if stats is not None:
                keys = [stats.manifest["modules"][n]["key"] for n in group]
                pooled = {key: _pooled_sigma(stats.tensors(key)) for key in dict.fromkeys(keys)}
                sigma = torch.stack([pooled[key] for key in keys]).to(dev, dtype)
            yield Batch(group, w, w, sigma, [0] * len(group))


def _solve_group(names, modules, options, bucket_weights, sigma, pooled, eig, floored, index, dev, dtype) -> Batch:
    w = torch.stack([models.weight_matrix(modules[n]).detach() for n in names]).to(dev, dtype)
    targets, shift_floored = [], []
    for j in range(len(bucket_weights)):
        if options.mode == "cnt-x":
            targets.append(modes.cross(w, modes.Eigen(eig[0][index, j], eig[1][index, j]), options.rcond))
        elif options.mode == "cnt-s":
            targets.append(modes.self_(w, modes.Eigen(eig[0][index, j], eig[1][index, j]), options.rcond, options.self_form))
        else:
            target, count = modes.shift(w, sigma[index, j], options.rcond, options.shift_c)
            targets.append(target)
            shift_floored.append(count)
    delta = modes.robust_estimate(w, targets, bucket_weights) - w
    floor_counts = torch.stack(shift_floored).amax(0) if shift_floored else floored[index]
    return Batch(names, w, delta, pooled[index], floor_counts.tolist())


def _diagnostics(w, delta, update, sigma, rank, floored) -> dict:
    """What the report shows for one module; output change is on the pooled uncentered Σ."""
    delta_sq = float(delta.square().sum())
    update_sq = float(update.square().sum())
    output_change = None
    if sigma is not None:
        base_energy = float(((w @ sigma) * w).sum())
        output_change = float(((update @ sigma) * update).sum()) / base_energy if base_energy > 0 else 0.0
    return {
        "rank": rank,
        "weight_norm": float(w.norm()),
        "delta_norm": delta_sq**0.5,
        "update_norm": update_sq**0.5,
        "kept": update_sq / delta_sq if delta_sq > 0 else 1.0,
        "output_change": output_change,
        "floored": int(floored),
    }


def _report(options: Options, rows: dict, ranks: dict, seconds: float, loaded: float) -> dict:
    delta_sq = sum(r["delta_norm"] ** 2 for r in rows.values())
    update_sq = sum(r["update_norm"] ** 2 for r in rows.values())
    return {
        "mode": options.mode,
        "init": options.init,
        "rank": options.rank,
        "budget": options.budget,
        "total_rank": sum(ranks.values()),
        "modules_with_adapter": sum(1 for r in ranks.values() if r),
        "kept": update_sq / delta_sq if delta_sq > 0 else 1.0,
        "rcond": options.rcond,
        "floored_modules": sum(1 for r in rows.values() if r["floored"]),
        "solve_seconds": round(seconds, 3),
        "load_seconds": round(loaded, 3),
        "modules": rows,
    }
