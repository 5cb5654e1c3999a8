"""`cntinit solve`: per-module initializations from a statistics store and the model's weights.

Modules are solved in batches of equal shape on the chosen device. Statistics are loaded
one group of equal-dimension keys at a time, so memory stays bounded by CHUNK_BYTES plus
the model itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, NamedTuple

from rich.progress import Progress

import torch
from transformers.pytorch_utils import Conv1D

from . import baselines, console, distributed, fingerprints, gradient_modes, inilora, models, modes, pretrained, quant, solution, store, vas
from .atomic import atomic_directory
from .console import log, progress, warn
from .errors import CntinitError, not_one_of
from .finite import all_finite

CHUNK_BYTES = 1 << 30
SPECTRUM_LENGTH = 128  # leading singular values of each split kept in the report (for its plot)
# The fine-tuning benchmarks (benchmarks/RESULTS.md: MiniLM classification, SmolLM2 causal LM): every
# offset init measured had a median out Δ of 0.118 or more and ended far worse than plain LoRA (the
# one that trained, lora-one, had 6e-7); their residual forms trained.
FAR_OUT_DELTA = 0.1
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
INITS = ("offset", "residual")


NEWER_OPTIONS = ("direction", "scale", "stable_gamma", "alpha", "rslora", "quantize", "bits", "loftq_iter")  # None unless used; older manifests lack them
QUANTIZE = ("nf4",)


@dataclass
class Options:
    """Every parameter of a solve; recorded in the solve manifest. None means the mode's default
    (or, for mode-specific options, that the mode does not use it)."""

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
    init: str | None = None  # offset for the CNT modes (the paper's) and lora/eva; residual where BA is a piece of W
    vas: bool = False
    budget: int | None = None
    min_rank: int = 0
    max_rank: int | None = None
    precision: str = "float64"
    seed: int = 0  # random draws: lora, pissa --niter, inilora*
    niter: int | None = None  # pissa: randomized SVD with this many subspace iterations
    lora_init: str | None = None  # lora: kaiming (PEFT's default) or gaussian
    rho: float | None = None  # eva: a module may get up to round(rank × rho) (PEFT's default 2)
    corda_mode: str | None = None  # corda: ipm (principal) or kpm (minor)
    steps: int | None = None  # inilora*: exact Adam step count (default: inilora early-stops, alpha/beta draw only)
    direction: str | None = None  # lora-ga: which singular vectors go to A and B (PEFT's default ArB2r)
    scale: str | None = None  # lora-ga, lora-one: how B (and A) are sized (stable by default)
    stable_gamma: float | None = None  # the stable scale's γ (lora-ga 16, lora-one 128)
    alpha: float | None = None  # lora-ga, lora-one: the LoRA α the factors are sized for (default: the rank, scale 1)
    rslora: bool | None = None  # lora-ga, lora-one: the scale is α/√r instead of α/r
    quantize: str | None = None  # nf4: the shipped base is NF4(W − BA), as a 4-bit trainer loads it (loftq: always)
    bits: int | None = None  # loftq: 4 (PEFT's LoftQConfig default; NF4)
    loftq_iter: int | None = None  # loftq: alternations of quantizing and the rank-r SVD (PEFT's default 1)

    @property
    def lora_scale(self) -> float:
        """s, by which the trainer multiplies BA: α/r, or α/√r with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def resolved(self) -> "Options":
        """These options with the mode's defaults filled in, checked."""
        mode = self.mode
        if mode not in modes.ALL_MODES:
            raise not_one_of("--mode", mode, modes.ALL_MODES)
        specific = {"--niter": (self.niter, ("pissa",)), "--lora-init": (self.lora_init, ("lora",)), "--rho": (self.rho, ("eva",)),
                    "--corda-mode": (self.corda_mode, ("corda",)), "--steps": (self.steps, modes.INILORA_MODES),
                    "--direction": (self.direction, ("lora-ga",)), "--scale": (self.scale, modes.GRADIENT_MODES),
                    "--stable-gamma": (self.stable_gamma, modes.GRADIENT_MODES), "--alpha": (self.alpha, modes.GRADIENT_MODES),
                    "--rslora": (self.rslora or None, modes.GRADIENT_MODES), "--bits": (self.bits, ("loftq",)),
                    "--loftq-iter": (self.loftq_iter, ("loftq",))}
        for option, (value, owners) in specific.items():
            if value is not None and mode not in owners:
                raise CntinitError(f"{option} applies to --mode {' or '.join(owners)}, not {mode}")
        if (self.bucket_weights is not None or self.pooled) and mode not in modes.MODES:
            raise CntinitError(f"--bucket-weights and --pooled shape the robust CNT estimate; --mode {mode} uses the pooled statistics")
        natural = "qr" if mode == "olora" else "svd"
        splits_delta = mode in modes.MODES + modes.WEIGHT_MODES + ("corda", "mica")
        if self.decompose not in (None, natural) and (mode not in modes.MODES):
            what = f"splits W by {natural}" if splits_delta else "does not split a matrix"
            raise CntinitError(f"--mode {mode} {what}; --decompose {self.decompose} would make it another method")
        if mode in modes.RESIDUAL_ONLY and self.init == "offset":
            raise CntinitError(f"--mode {mode} moves part of W into the adapter, so its base must be W − BA: use --init residual (the default)")
        if mode in modes.ZERO_UPDATE and self.init == "residual":
            raise CntinitError(f"--mode {mode} starts with BA = 0, so there is nothing to subtract from W: leave out --init")
        if self.vas and mode in modes.ZERO_UPDATE + modes.INILORA_MODES + modes.GRADIENT_MODES + modes.QUANTIZED_MODES:
            hint = {"eva": "eva redistributes ranks itself (see --rho)", "lora": "B = 0 leaves no spectrum to allocate by",
                    "lora-ga": "its factors are sized for one rank", "lora-one": "its factors are sized for one rank",
                    "loftq": "each rank's fit changes the quantized base", "mica": "A = 0 leaves no spectrum to allocate by"}.get(
                mode, "a fit of one rank cannot be cut to another; use pissa for the rank-r optimum")
            raise CntinitError(f"--vas does not apply to --mode {mode}: {hint}")
        options = replace(
            self,
            decompose=self.decompose or (natural if splits_delta else None),
            init=self.init or ("residual" if mode in modes.RESIDUAL_ONLY else "offset"),
            lora_init=self.lora_init or ("kaiming" if mode == "lora" else None),
            rho=self.rho if self.rho is not None else (2.0 if mode == "eva" else None),
            corda_mode=self.corda_mode or ("ipm" if mode == "corda" else None),
        )
        if mode == "loftq":
            options = replace(options, quantize=self.quantize or "nf4", bits=4 if self.bits is None else self.bits,
                              loftq_iter=1 if self.loftq_iter is None else self.loftq_iter)  # 0 is refused, not taken for the default
        if options.quantize is not None and (options.init != "residual" or mode in modes.ZERO_UPDATE):
            why = "BA = 0 leaves the base W" if mode in modes.ZERO_UPDATE else "an offset init's base is W itself"
            raise CntinitError(f"--quantize {options.quantize} makes the shipped base the 4-bit NF4(W − BA); {why}: quantize W in the "
                               "trainer (plain QLoRA), or use --init residual")
        if mode in modes.GRADIENT_MODES:
            options = replace(options, direction=self.direction or ("ArB2r" if mode == "lora-ga" else None),
                              scale=self.scale or "stable", rslora=bool(self.rslora),
                              stable_gamma=float(self.stable_gamma if self.stable_gamma is not None else gradient_modes.STABLE_GAMMA[mode]),
                              alpha=float(self.alpha if self.alpha is not None else self.rank))
        options.check()
        return options

    def check(self) -> None:
        choices = {"--self-form": (self.self_form, modes.SELF_FORMS), "--init": (self.init, INITS),
                   "--precision": (self.precision, tuple(PRECISIONS))}
        if self.decompose is not None:
            choices["--decompose"] = (self.decompose, modes.DECOMPOSE)
        if self.lora_init is not None:
            choices["--lora-init"] = (self.lora_init, baselines.LORA_INITS)
        if self.corda_mode is not None:
            choices["--corda-mode"] = (self.corda_mode, baselines.CORDA_MODES)
        if self.direction is not None:
            choices["--direction"] = (self.direction, gradient_modes.DIRECTIONS)
        if self.scale is not None:
            choices["--scale"] = (self.scale, gradient_modes.SCALES.get(self.mode, gradient_modes.SCALES["lora-ga"]))
        if self.quantize is not None:
            choices["--quantize"] = (self.quantize, QUANTIZE)
        for option, (value, allowed) in choices.items():
            if value not in allowed:
                raise not_one_of(option, value, allowed)
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
        if self.niter is not None and self.niter < 0:
            raise CntinitError(f"--niter must be at least 0, got {self.niter}")
        if self.rho is not None and not (math.isfinite(self.rho) and 1 <= self.rho <= 1e6):
            raise CntinitError(f"--rho must be at least 1 and finite, at most 1e6 (1 = no redistribution), got {self.rho}")
        if not (math.isfinite(self.shift_c) and 0 < self.shift_c <= 1e6):
            raise CntinitError(f"--shift-c must be a positive finite number up to 1e6 (C = c·I scales the target), got {self.shift_c}")
        if self.bucket_weights is not None:
            bad = [w for w in self.bucket_weights if not (math.isfinite(w) and 0 <= w <= 1e6)]
            if bad or not any(w > 0 for w in self.bucket_weights):
                raise CntinitError(f"--bucket-weights are the buckets' shares of the robust estimate: give numbers from 0 to 1e6, "
                                   f"at least one above 0 (got {','.join(f'{w:g}' for w in self.bucket_weights)})")
        if self.steps is not None and self.steps < 0:
            raise CntinitError(f"--steps must be at least 0, got {self.steps}")
        if self.stable_gamma is not None and not (math.isfinite(self.stable_gamma) and 0 < self.stable_gamma <= 1e12):
            raise CntinitError(f"--stable-gamma must be a positive finite number (B and A shrink by √γ), got {self.stable_gamma}")
        if self.bits is not None and self.bits != 4:
            raise CntinitError(f"--bits {self.bits}: LoftQ here quantizes to 4-bit NF4 (bitsandbytes' QLoRA format); use --bits 4")
        if self.loftq_iter is not None and not 1 <= self.loftq_iter <= 1000:
            raise CntinitError(f"--loftq-iter must be from 1 to 1000 (PEFT's default 1), got {self.loftq_iter}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and 0 < self.alpha <= 1e12):
            raise CntinitError(f"--alpha must be a positive finite number (the trainer's lora_alpha), got {self.alpha}")


class Batch(NamedTuple):
    names: list[str]
    weight: torch.Tensor  # (n, k, d)
    delta: torch.Tensor  # (n, k, d): W_est − W for the CNT modes; W itself for the residual modes; 0 for lora
    sigma: torch.Tensor | None  # (n, d, d): pooled uncentered second moment, for the report; None without a capture
    floored: list[int]  # eigen/singular values under the floor, worst bucket
    metric: tuple[torch.Tensor, torch.Tensor] | None = None  # corda: (C, C⁻¹), split ΔW C then A ← A C⁻¹


def solve(capture_dir: str | Path | None, out: str | Path, options: Options | None = None, *, model: str | Path | None = None,
          targets: str | None = None, device: str = "auto", overwrite: bool = False, trust_remote_code: bool = False,
          offload: bool = False, max_memory: str | None = None, **params) -> Path:
    """Solve every module of the store at `capture_dir` (or, for a data-free mode, the `targets`
    of `model`); write a solve directory at `out`.

    Parameters come as `Options` or as its fields: `solve("stats", "init", mode="cnt-s", rank=8)`.
    Under `torchrun`, every process solves its share of the modules and rank 0 writes the result.
    With `offload`, the model's weights stay within `max_memory` ('cpu=64GiB') of CPU memory, the
    rest on disk, and are read one module at a time.
    """
    options = (options or Options(**params)).resolved()
    with distributed.joined() as world, contextlib.ExitStack() as scratch:
        # weights in CPU memory, then on disk: the solve moves each batch of them to its device itself
        placement = models.offload_placement(scratch, out, offload, max_memory, torch.device("cpu"), "auto")
        return _solve(world, capture_dir, out, options, model, targets, device, overwrite, trust_remote_code, placement)


def _solve(world: distributed.World, capture_dir, out, options: Options, model, targets, device, overwrite, trust_remote_code,
           placement: models.Placement | None) -> Path:
    if not world.leader:
        console.quiet = True  # one progress bar and log, rank 0's
    started = time.perf_counter()
    stats, modules, model_info, source = _open(capture_dir, model, targets, options, trust_remote_code, placement)
    captured = stats.manifest if stats is not None else None
    bucket_weights = _bucket_weights(options, stats.buckets) if stats is not None and options.mode in modes.MODES else None
    store.check_out(out, model_info["fingerprint"], overwrite, solution.FORMAT, "a solve directory")
    dev = models.resolve_device(device)
    dtype = PRECISIONS[options.precision]
    loaded = time.perf_counter() - started
    log(f"loaded {len(modules)} modules of {source} in {loaded:.1f}s")

    max_ranks = {}
    for name, module in modules.items():
        d, k = models.in_out_features(module)
        max_ranks[name] = min(k, d, options.max_rank or k)
    needed = 2 * options.rank if options.mode == "lora-ga" else options.rank  # LoRA-GA picks r of 2r singular vectors
    too_small = [name for name, module in modules.items() if min(models.in_out_features(module)) < needed]
    if too_small and not options.vas:
        smallest = min(models.in_out_features(modules[too_small[0]]))
        more = f" (and {len(too_small) - 1} more)" if len(too_small) > 1 else ""
        if options.mode == "lora-ga":
            raise CntinitError(f"--mode lora-ga at --rank {options.rank} picks from 2r = {needed} singular vectors, more than "
                               f"min(in, out) = {smallest} of {too_small[0]}{more}: lower --rank to {smallest // 2} or less")
        raise CntinitError(f"--rank {options.rank} exceeds min(in, out) = {smallest} of {too_small[0]}{more}: lower --rank, "
                           "or use --vas, which caps each module at its own size")
    mine = _share(modules, stats, options, world)
    if world.size > 1:
        log(f"{world.size} processes: this one solves {len(mine)} of {len(modules)} modules")

    def batches(label: str) -> Iterator[tuple[Batch, Progress]]:
        with progress() as bar:
            task = bar.add_task(label, total=len(mine))
            if options.mode in modes.MODES:
                source = _deltas(stats, mine, options, bucket_weights, dev, dtype)
            elif options.mode in modes.GRADIENT_MODES:
                source = _gradients(stats, mine, options, dev, dtype)
            else:
                source = _weights(stats, mine, options, dev, dtype)
            for batch in source:
                yield batch, bar
                bar.update(task, advance=len(batch.names))

    if options.mode == "eva":
        ranks, factors, rows = _eva(stats, modules, mine, options, dev, dtype, world)
    else:
        options, ranks, factors, rows = _split_all(batches, modules, options, max_ranks, world)
    if world.size > 1:
        factors, rows = distributed.gather_factors(world, factors, rows)
        if not world.leader:
            return Path(out)
    seconds = time.perf_counter() - started - loaded
    overflow = next((name for name, pair in factors.items() if not all(all_finite(t) for t in pair)), None)
    if overflow:
        raise CntinitError(f"the factors of {overflow} come out NaN or Inf (beyond float32, which the solve directory stores): "
                           "these options make the target too large; use smaller --bucket-weights or --shift-c, or a larger --rcond")

    report = _report(options, {name: rows[name] for name in modules}, ranks, seconds, loaded)  # model order
    _warn_if_far(options, report)
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
        solution.write(tmp, manifest, {name: factors[name] for name in modules if name in factors}, report)
    log(f"solved {options.mode} for {len(factors)} modules (total rank {sum(ranks.values())}) in {seconds:.1f}s after {loaded:.1f}s of loading")
    return Path(out)


def _split_all(batches, modules: dict, options: Options, max_ranks: dict, world: distributed.World):
    """(options with the VAS budget filled in, ranks, factors, report rows) for every mode but eva:
    ranks first (VAS needs every module's singular values, from every rank), then each batch's
    factors — of this process's modules, the ones `batches` yields."""
    if options.vas:
        options = replace(options, budget=options.budget or options.rank * len(modules))
        singular_values = {}
        for batch, _ in batches("singular values"):
            split_input = batch.delta if batch.metric is None else batch.delta @ batch.metric[0]
            singular_values.update(zip(batch.names, modes.singular_values(split_input).cpu()))
        singular_values = distributed.pooled(world, singular_values)
        ranks = vas.allocate({name: singular_values[name] for name in modules}, max_ranks, options.budget, options.min_rank)
    else:
        singular_values = {}
        ranks = {name: min(options.rank, limit) for name, limit in max_ranks.items()}
    spread = _mean_weight_std(modules) if options.mode == "inilora" else 0.0
    minor = options.mode in ("milora", "mica") or options.corda_mode == "kpm"
    factors, rows, unreached = {}, {}, []
    for batch, bar in batches(f"solve {options.mode}"):
        top = max(max(ranks[name] for name in batch.names), 1)
        generators = [_generator(options.seed, name) for name in batch.names]
        layouts = [(modules[n].weight.dtype, isinstance(modules[n], Conv1D)) for n in batch.names]  # as the trainer quantizes it
        b, a, steps, values, bases = _factor(batch, top, options, generators, spread, bar, layouts)
        for i, name in enumerate(batch.names):
            r = ranks[name]
            keep = slice(top - r, top) if minor else slice(0, r)  # the r smallest of the top kept, for MiLoRA/kpm
            b_kept, a_kept = b[i, :, keep], a[i, keep]
            sigma = batch.sigma[i] if batch.sigma is not None else None
            rows[name] = _diagnostics(batch.weight[i], batch.delta[i], b_kept, a_kept, sigma, r, batch.floored[i])
            if options.mode in modes.ZERO_UPDATE:
                rows[name]["kept"] = None  # BA = 0: no change wanted, none kept
            update = b_kept @ a_kept if steps is not None or options.quantize is not None else None  # for the errors that need BA itself
            if steps is not None:
                rows[name] |= _fit_errors(batch.weight[i], update, r) | {"steps": steps}
            if options.mode in modes.GRADIENT_MODES:
                rows[name]["kept"] = gradient_modes.share(values[i], r)  # of ‖G‖², in its rank-r subspace
                if not values[i].any():
                    unreached.append(name)
            if options.quantize is not None:
                base = bases[i] if bases is not None else _nf4_base(batch.weight[i] - update, *layouts[i])
                rows[name] |= _quantization_errors(batch.weight[i], update, base, layouts[i])
            spectrum = singular_values.get(name, values[i] if values is not None else None)
            if spectrum is not None:
                rows[name]["spectrum"] = [float(f"{v:.6g}") for v in spectrum[:SPECTRUM_LENGTH].tolist()]
            if r:
                factors[name] = (b_kept.cpu(), a_kept.cpu())
                if options.quantize is not None:  # the base's codes and block maxima travel with the factors
                    factors[name] += (quant.pack(base.codes), base.absmax)
    if unreached:
        start = "B = 0 (plain LoRA's start)" if options.mode == "lora-ga" else "A = B = 0, which never trains"
        warn(f"{len(unreached)} modules have a zero loss gradient, so their output never reaches the loss (e.g. {unreached[0]}; "
             f"SDXL's first text encoder's last layer is one): {options.mode} gives them {start}; leave them out of --targets")
    return options, ranks, factors, rows


def _open(capture_dir, model, targets, options: Options, trust_remote_code: bool, placement: models.Placement | None):
    """(store or None, target modules, model record, description): from a capture, whose recorded
    (or --model) weights must match its fingerprint, or — data-free modes only — from --model and --targets."""
    if capture_dir is not None:
        stats = store.Store(capture_dir)
        captured = stats.manifest
        if options.mode in modes.GRADIENT_MODES and not stats.has_gradients:
            raise CntinitError(f"--mode {options.mode} needs loss gradients, and {capture_dir} holds activation statistics only: "
                               "capture again with --gradients")
        names = list(captured["modules"]) if targets is None else models.select_names(list(captured["modules"]), targets, "captured module")
        source = pretrained.open_recorded(captured, model, trust_remote_code, placement)
        modules, model_path = source.modules, source.path
        record = dict(captured["model"], path=str(model_path.absolute()))
        if len(names) < len(modules):  # a subset: exports check the weights of the modules solved
            modules = {name: modules[name] for name in names}
            record["fingerprint"] = fingerprints.fingerprint(modules)
        if options.init == "residual":
            pretrained.refuse_tied(list(modules), source)
        return stats, modules, record, f"{model_path} and the statistics of {capture_dir}"
    if options.mode in modes.GRADIENT_MODES:
        raise CntinitError(f"--mode {options.mode} needs loss gradients: give the directory `cntinit capture --gradients` wrote")
    if options.mode in modes.NEED_STATISTICS:
        raise CntinitError(f"--mode {options.mode} needs activation statistics: give the directory `cntinit capture` wrote")
    if model is None:
        raise CntinitError("give a capture directory, or --model MODEL for a data-free mode (lora, pissa, milora, olora, mica, inilora*, "
                           "loftq)")
    source = pretrained.open_model(model, trust_remote_code, lambda net: models.select_targets(net, targets or models.ALL_LINEAR), placement)
    if options.init == "residual":
        pretrained.refuse_tied(list(source.modules), source)
    return None, source.modules, models.record(source.net, model, fingerprints.fingerprint(source.modules)), str(model)


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


def _sigmas(tensors: dict[str, torch.Tensor], key: str, options: Options, buckets: int,
            dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ per bucket used by the mode (B, d, d), pooled uncentered Σ (d, d)), float64 on `dev`
    (on a GPU this arithmetic over d² entries costs a fraction of what it costs on the CPU)."""
    t = {name: value.to(dev, torch.float64) for name, value in tensors.items()}
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
            sigma = torch.empty(len(chunk), count, dim, dim, device=dev, dtype=dtype)  # (keys, B, d, d)
            pooled = torch.empty(len(chunk), dim, dim, device=dev, dtype=dtype)
            for i, key in enumerate(chunk):  # one key's float64 temporaries at a time
                sigma[i], pooled[i] = _sigmas(stats.tensors(key), key, options, stats.buckets, dev)
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


def _weights(stats: store.Store | None, modules: dict, options: Options, dev: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
    """W itself, in batches of equal shape, for every mode but the CNT ones and eva. With a capture,
    the pooled Σ of each module rides along for the report; corda also gets its metric (C, C⁻¹)."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, module in modules.items():
        by_shape.setdefault(models.in_out_features(module), []).append(name)
    for (d, k), names in by_shape.items():
        per_batch = max(1, CHUNK_BYTES // (6 * k * d * 8))
        for s in range(0, len(names), per_batch):
            group = names[s : s + per_batch]
            w = torch.stack([models.weight_values(modules[n]) for n in group]).to(dev, dtype)
            sigma, metric = None, None
            if stats is not None:
                keys = [stats.manifest["modules"][n]["key"] for n in group]
                tensors = {key: {t: v.to(dev, torch.float64) for t, v in stats.tensors(key).items()} for key in dict.fromkeys(keys)}
                sigma = torch.stack([_pooled_sigma(tensors[key]) for key in keys]).to(dev, dtype)
                if options.mode == "corda":
                    own = {key: modes.second_moment(t["xxt"], t["sum"], t["count"], options.centered) for key, t in tensors.items()}
                    metric = baselines.corda_metric(torch.stack([own[key] for key in keys]).to(dev, dtype))
            delta = torch.zeros_like(w) if options.mode == "lora" else w
            yield Batch(group, w, delta, sigma, [0] * len(group), metric)


def _gradients(stats: store.Store, modules: dict, options: Options, dev: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
    """The mean loss gradient G (the stored sum over the K batches / K) as each batch's delta, with W
    and the pooled Σ (for the report), in batches of equal shape."""
    count = stats.manifest["gradients"]["batches"]
    for batch in _weights(stats, modules, options, dev, dtype):
        grad = torch.stack([stats.gradient(name) for name in batch.names]).to(dev, dtype) / count
        yield batch._replace(delta=grad)


def _factor(batch: Batch, top: int, options: Options, generators: list[torch.Generator], spread: float, bar: Progress,
            layouts: list[tuple[torch.dtype, bool]]):
    """(B, A, Adam steps run or None, singular values of the split or None, LoftQ's quantized bases or None)
    of rank `top` for one batch, random draws from each module's own generator; see METHODS.md for each mode."""
    if options.mode == "loftq":
        return _loftq(batch.weight, top, options.loftq_iter, layouts)
    b, a, steps, values = _factor_unquantized(batch, top, options, generators, spread, bar)
    return b, a, steps, values, None


def _loftq(w: torch.Tensor, rank: int, iterations: int, layouts: list[tuple[torch.dtype, bool]]):
    """PEFT's `loftq_init`: Q = NF4(R) from R = W, then B A = the rank-r SVD of W − Q (√S on both
    sides); each further iteration quantizes R = W − B A again."""
    remainder = w
    for step in range(iterations):
        bases = [_nf4_base(remainder[i], *layouts[i]) for i in range(w.shape[0])]
        q = torch.stack([_nf4_values(base, layouts[i][1]) for i, base in enumerate(bases)]).to(w)
        b, a, values = modes.split(w - q, rank, "svd", 0.5)
        if step + 1 < iterations:  # the last round's remainder is not needed
            remainder = w - b @ a
    return b, a, None, values, bases


def _nf4_base(matrix: torch.Tensor, dtype: torch.dtype, transposed: bool) -> quant.Quantized:
    """NF4 of `matrix` (out × in) as a base stored in `dtype` quantizes: Conv1D stores it transposed."""
    return quant.base((matrix.T if transposed else matrix).contiguous(), dtype)


def _nf4_values(base: quant.Quantized, transposed: bool) -> torch.Tensor:
    values = quant.dequantize(base)
    return values.T if transposed else values


def _quantization_errors(w: torch.Tensor, update: torch.Tensor, base: quant.Quantized, layout: tuple[torch.dtype, bool]) -> dict:
    """‖W − Q − BA‖/‖W‖ of the quantized residual base, and plain QLoRA's ‖W − Q(W)‖/‖W‖ beside it."""
    w = w.double()
    norm = float(w.norm()) or 1.0
    shipped = _nf4_values(base, layout[1]).to(w)
    plain = _nf4_values(_nf4_base(w, *layout), layout[1]).to(w)
    return {"quant_error": float((w - shipped - update.double()).norm()) / norm, "qlora_error": float((w - plain).norm()) / norm}


def _factor_unquantized(batch: Batch, top: int, options: Options, generators: list[torch.Generator], spread: float, bar: Progress):
    count, k, d = batch.weight.shape
    dev, dtype = batch.weight.device, batch.weight.dtype
    if options.mode == "lora":
        a = baselines.lora_a(top, d, options.lora_init, generators)
        return torch.zeros(count, k, top, device=dev, dtype=dtype), a.to(dev, dtype), None, None
    if options.mode == "mica":  # B = U of the r smallest singular triplets (p = 1 puts S on A, which MiCA zeroes)
        b, _, values = modes.split(batch.weight, top, "svd", 1.0, minor=True)
        return b, torch.zeros(count, top, d, device=dev, dtype=dtype), None, values
    if options.mode == "lora-ga":
        b, a, values = gradient_modes.lora_ga(batch.delta, batch.weight, top, options.direction, options.scale, options.stable_gamma,
                                              options.lora_scale, generators)
        return b * options.lora_scale**0.5, a * options.lora_scale**0.5, None, values
    if options.mode == "lora-one":
        b, a, values = gradient_modes.lora_one(batch.delta, top, options.scale, options.stable_gamma, options.lora_scale)
        return b * options.lora_scale**0.5, a * options.lora_scale**0.5, None, values
    if options.mode in modes.INILORA_MODES:
        b, a = inilora.start(k, d, top, options.mode, spread, generators)
        steps = options.steps if options.steps is not None else (None if options.mode == "inilora" else 0)
        done = 0
        if steps != 0:
            task = bar.add_task(f"Adam × {count} of {k}×{d}", total=steps or inilora.MAX_STEPS)
            b, a, done = inilora.fit(batch.weight.float(), b, a, steps, on_step=lambda: bar.advance(task))
            bar.remove_task(task)
        return b.to(dev, dtype), a.to(dev, dtype), done, None
    if batch.metric is None:
        b, a, values = modes.split(batch.delta, top, options.decompose, options.split_p, options.mode == "milora", options.niter, generators)
        return b, a, None, values
    metric, inverse = batch.metric  # corda: split W C, then A ← A C⁻¹
    b, a, values = modes.split(batch.delta @ metric, top, "svd", options.split_p, options.corda_mode == "kpm")
    return b, a @ inverse, None, values


def _generator(seed: int, name: str) -> torch.Generator:
    """The random stream of one module: from --seed and its name, so a module's draws do not
    depend on which modules share its batch or its process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _share(modules: dict, stats: store.Store | None, options: Options, world: distributed.World) -> dict:
    """The modules this process solves. Units of work are modules, or for the modes that
    eigendecompose Σ (CNT, eva) all modules reading one statistic; a unit costs about
    d³ for its eigendecomposition plus k·d·min(k, d) per module split (k·d per IniLoRA step)."""
    if world.size == 1:
        return modules
    by_key = stats is not None and options.mode in modes.MODES + ("eva",)
    units: dict[str, list[str]] = {}
    for name in modules:
        units.setdefault(stats.manifest["modules"][name]["key"] if by_key else name, []).append(name)
    costs = {}
    for unit, names in units.items():
        shapes = [models.in_out_features(modules[n]) for n in names]
        per_module = [k * d * (1 if options.mode in modes.INILORA_MODES else min(k, d)) for d, k in shapes]
        costs[unit] = sum(per_module) + (shapes[0][0] ** 3 if by_key else 0)
    owner = distributed.assign(costs, world.size)
    return {name: modules[name] for unit, names in units.items() if owner[unit] == world.rank for name in names}


def _mean_weight_std(modules: dict) -> float:
    """IniLoRA's σ: the mean over target modules of each weight's standard deviation."""
    return float(torch.stack([models.weight_values(m).double().std() for m in modules.values()]).mean())


def _fit_errors(w: torch.Tensor, update: torch.Tensor, rank: int) -> dict:
    """‖W − BA‖/‖W‖ and the Eckart–Young optimum ‖W − W_r‖/‖W‖ (truncated SVD)."""
    w = w.double()
    norm = float(w.norm()) or 1.0
    tail = modes.singular_values(w)[rank:]
    return {"fit_error": float((w - update.double()).norm()) / norm, "optimal_error": float(tail.square().sum().sqrt()) / norm}


def _eva(stats: store.Store, modules: dict, mine: dict, options: Options, dev: torch.device, dtype: torch.dtype,
         world: distributed.World):
    """EVA: A = the top eigenvectors of each input's Σ, B = 0; ranks redistributed as PEFT's
    `get_eva_state_dict` does: every module offers its first round(r·ρ) explained-variance
    ratios λ_i / tr Σ, the r × modules largest of the pool are kept (ties to the earlier module).
    This process computes the eigenvectors of `mine`; the ratios of all are shared for the ranks."""
    cap = round(options.rank * options.rho)
    keys = {name: stats.manifest["modules"][name]["key"] for name in modules}
    own_keys = list(dict.fromkeys(keys[name] for name in mine))
    components, explained = {}, {}
    with progress() as bar:
        task = bar.add_task("eigenvectors", total=len(own_keys))
        for key in own_keys:
            t = {name: value.double() for name, value in stats.tensors(key).items()}
            sigma = modes.second_moment(t["xxt"], t["sum"], t["count"], options.centered)
            values, vectors = modes.eigen(sigma.to(dev, dtype)[None])
            components[key] = vectors[0, :, :cap].mT.cpu()
            explained[key] = baselines.explained_variance(values[0])[:cap].cpu()
            bar.update(task, advance=1)
    explained = distributed.pooled(world, explained)
    ranks = vas.top_counts({name: explained[key] for name, key in keys.items()}, options.rank * len(modules))
    factors, rows = {}, {}
    for name, module in mine.items():
        r, key = ranks[name], keys[name]
        w = models.weight_values(module)
        rows[name] = {"rank": r, "weight_norm": float(w.double().norm()), "delta_norm": 0.0, "update_norm": 0.0,
                      "kept": float(explained[key][:r].sum()), "output_change": 0.0, "floored": 0}
        if r:
            factors[name] = (torch.zeros(w.shape[0], r), components[key][:r])
    return ranks, factors, rows


def _solve_group(names, modules, options, bucket_weights, sigma, pooled, eig, floored, index, dev, dtype) -> Batch:
    w = torch.stack([models.weight_values(modules[n]) for n in names]).to(dev, dtype)
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


def _diagnostics(w, delta, b, a, sigma, rank, floored) -> dict:
    """What the report shows for one module; output change is on the pooled uncentered Σ. The
    update BA's terms come from its factors: ‖BA‖² = tr(BᵀB·AAᵀ), tr(BAΣAᵀBᵀ) = tr(BᵀB·AΣAᵀ),
    r·in² work where forming BA and BAΣ took out·in²."""
    delta_sq = float(delta.square().sum())
    gram = b.T @ b
    update_sq = float((gram * (a @ a.T)).sum())
    output_change = None
    if sigma is not None:
        base_energy = float(((w @ sigma) * w).sum())
        output_change = float((gram * (a @ sigma @ a.T)).sum()) / base_energy if base_energy > 0 else 0.0
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
        "kept": None if options.mode in modes.ZERO_UPDATE else _kept(options, rows, update_sq, delta_sq),
        "rcond": options.rcond,
        "floored_modules": sum(1 for r in rows.values() if r["floored"]),
        "solve_seconds": round(seconds, 3),
        "load_seconds": round(loaded, 3),
        "modules": rows,
    }


def _warn_if_far(options: Options, report: dict) -> None:
    """One line when an offset init changes the adapted layers' outputs as much as the offset inits
    that failed to train in the fine-tuning benchmarks (benchmarks/RESULTS.md)."""
    changes = [row["output_change"] for row in report["modules"].values() if row["output_change"] is not None]
    typical = statistics.median(changes) if options.init == "offset" and changes else 0.0
    if typical <= FAR_OUT_DELTA:
        return
    warn(f"{options.mode}'s offset init changes the adapted layers' outputs on the calibration data by a median out Δ of "
         f"{typical:.3g}; every offset init above {FAR_OUT_DELTA:g} failed to train in the fine-tuning "
         "benchmarks (benchmarks/RESULTS.md): solve with --init residual, which starts at the pretrained model")


def _kept(options: Options, rows: dict, update_sq: float, delta_sq: float) -> float:
    """The share of the change wanted (‖ΔW‖², or for the gradient modes ‖G‖²) in what the adapters hold."""
    if options.mode in modes.GRADIENT_MODES:
        return sum(r["kept"] * r["delta_norm"] ** 2 for r in rows.values()) / delta_sq if delta_sq > 0 else 1.0
    return update_sq / delta_sq if delta_sq > 0 else 1.0
