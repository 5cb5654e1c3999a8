"""Every batch's factors, and its modules' report rows: ranks first (VAS needs every module's
singular values, from every process), then each batch split by its mode's factor function.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import replace

import torch
from transformers.pytorch_utils import Conv1D

from .. import distributed
from ..errors import CntinitError
from . import quant, report, vas
from .linalg import singular_values
from .modes import GRADIENTS, Job, Mode
from .modes.gradient import share, warn_unreached
from .modes.quantized import nf4_base, quantization_errors


def generator(seed: int, name: str) -> torch.Generator:
    """The random stream of one module: from --seed and its name, so a module's draws do not
    depend on which modules share its batch or its process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def split_all(mode: Mode, batches, modules: dict, options, max_ranks: dict, world: distributed.World):
    """(options with the VAS budget filled in, ranks, factors, report rows) of the modules `batches`
    yields (this process's), for every mode solved batch by batch."""
    singular = {}
    if options.vas:
        options = replace(options, budget=options.budget or options.rank * len(modules))
        for batch, _ in batches("singular values"):
            split_input = batch.delta if batch.metric is None else batch.delta @ batch.metric[0]
            singular.update(zip(batch.names, singular_values(split_input).cpu()))
        singular = distributed.pooled(world, singular)
        ranks = vas.allocate({name: singular[name] for name in modules}, max_ranks, options.budget, options.min_rank)
    else:
        ranks = {name: min(options.rank, limit) for name, limit in max_ranks.items()}
    prepared = mode.prepare(modules, options) if mode.prepare is not None else None
    minor = mode.minor(options)
    factors, rows, unreached = {}, {}, []
    for batch, bar in batches(f"solve {options.mode}"):
        top = max(max(ranks[name] for name in batch.names), 1)
        layouts = [(modules[n].weight.dtype, isinstance(modules[n], Conv1D)) for n in batch.names]  # as the trainer quantizes it
        job = Job(top, options, [generator(options.seed, name) for name in batch.names], layouts, prepared, bar)
        made = mode.factor(batch, job)
        for i, name in enumerate(batch.names):
            r = ranks[name]
            keep = slice(top - r, top) if minor else slice(0, r)  # the r smallest of the top kept, for MiLoRA/kpm
            b_kept, a_kept = made.b[i, :, keep], made.a[i, keep]
            sigma = batch.sigma[i] if batch.sigma is not None else None
            weight = batch.weight[i]
            delta = weight if batch.delta is batch.weight else batch.delta[i]  # the residual modes split W itself
            rows[name] = row = report.diagnostics(weight, delta, b_kept, a_kept, sigma, r, batch.floored[i])
            if mode.zero_update:
                row["kept"] = None  # BA = 0: no change wanted, none kept
            update = b_kept @ a_kept if made.steps is not None or options.quantize is not None else None  # for the errors that need BA itself
            if made.steps is not None:
                row |= report.fit_errors(batch.weight[i], update, r) | {"steps": made.steps}
            if mode.reads == GRADIENTS:
                row["kept"] = share(made.values[i], r, batch.delta[i])  # of ‖G‖², in its rank-r subspace
                if not made.values[i].any():
                    unreached.append(name)
            if options.quantize is not None:
                base = made.bases[i] if made.bases is not None else nf4_base(batch.weight[i] - update, *layouts[i])
                row |= quantization_errors(batch.weight[i], update, base, layouts[i])
            spectrum = singular.get(name, made.values[i] if made.values is not None else None)
            if spectrum is not None:
                row["spectrum"] = report.spectrum(spectrum)
            if r:
                factors[name] = (b_kept.cpu(), a_kept.cpu())
                if options.quantize is not None:  # the base's codes and block maxima travel with the factors
                    factors[name] += (quant.pack(base.codes), base.absmax)
    if unreached:
        warn_unreached(options.mode, unreached)
    return options, ranks, factors, rows


def scale_to_out_delta(target: float, factors: dict, rows: dict) -> float:
    """--out-delta: every update BA times one factor c, so that the median out Δ over the modules is
    `target` — the paper's directions, at a size fixed from the calibration data. out Δ grows as c²,
    so c = √(target / median); B and A each take √c. Returns c; each report row's out Δ becomes the
    scaled update's (its update norm and kept stay those of the split of ΔW)."""
    changes = [rows[name]["output_change"] for name in factors if rows[name]["output_change"] is not None]
    median = statistics.median(changes) if changes else 0.0
    if not median > 0:
        raise CntinitError("--out-delta scales the updates to a median out Δ, and these change no adapted layer's output on the "
                           "calibration data (median out Δ 0): leave out --out-delta")
    scale = math.sqrt(target / median)
    for name, (b, a, *rest) in factors.items():
        factors[name] = (b * math.sqrt(scale), a * math.sqrt(scale), *rest)
    for row in rows.values():
        if row["output_change"] is not None:
            row["output_change"] *= scale * scale
    return scale
