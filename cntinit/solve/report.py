"""The solve's report (report.json): per module, its rank, how large the update is next to the
weight, how much of the wanted change it keeps and how much it changes the layer's output on the
calibration data; the learning rate the benchmarks found for the init; and the warning when an offset
init changes the outputs as much as the inits that failed to train did.
"""

from __future__ import annotations

import statistics

import torch

from ..console import warn
from . import learning_rate
from .linalg import singular_values
from .modes import GRADIENTS, Mode

SPECTRUM_LENGTH = 128  # leading singular values of each split kept in the report (for its plot)
# The fine-tuning benchmarks (benchmarks/RESULTS.md: MiniLM classification, SmolLM2 causal LM): every
# offset init measured had a median out Δ of 0.118 or more and ended far worse than plain LoRA (the
# one that trained, lora-one, had 6e-7); their residual forms trained.
FAR_OUT_DELTA = 0.1


def diagnostics(w, delta, b, a, sigma, rank, floored) -> dict:
    """What the report shows for one module; output change is on the pooled uncentered Σ. The
    update BA's terms come from its factors: ‖BA‖² = tr(BᵀB·AAᵀ), tr(BAΣAᵀBᵀ) = tr(BᵀB·AΣAᵀ),
    r·in² work where forming BA and BAΣ took out·in². The norms take no weight-sized temporary, and W's is
    not taken twice where the delta is W itself (the residual modes)."""
    weight_norm = float(torch.linalg.vector_norm(w))
    delta_sq = weight_norm**2 if delta is w else float(torch.linalg.vector_norm(delta)) ** 2
    gram = b.T @ b
    update_sq = float((gram * (a @ a.T)).sum())
    output_change = None
    if sigma is not None:
        base_energy = float(((w @ sigma) * w).sum())
        output_change = float((gram * (a @ sigma @ a.T)).sum()) / base_energy if base_energy > 0 else 0.0
    return {
        "rank": rank,
        "weight_norm": weight_norm,
        "delta_norm": delta_sq**0.5,
        "update_norm": update_sq**0.5,
        "kept": update_sq / delta_sq if delta_sq > 0 else 1.0,
        "output_change": output_change,
        "floored": int(floored),
    }


def fit_errors(w: torch.Tensor, update: torch.Tensor, rank: int) -> dict:
    """‖W − BA‖/‖W‖ and the Eckart–Young optimum ‖W − W_r‖/‖W‖ (truncated SVD)."""
    w = w.double()
    norm = float(w.norm()) or 1.0
    tail = singular_values(w)[rank:]
    return {"fit_error": float((w - update.double()).norm()) / norm, "optimal_error": float(tail.square().sum().sqrt()) / norm}


def spectrum(values: torch.Tensor) -> list[float]:
    """The leading singular values a report row keeps, for its plot."""
    return [float(f"{v:.6g}") for v in values[:SPECTRUM_LENGTH].tolist()]


def report(mode: Mode, options, rows: dict, ranks: dict, seconds: float, loaded: float, scaled_by: float | None = None) -> dict:
    """The solve's report.json; `scaled_by`: the factor --out-delta multiplied every update by. Its `lr_advice` is the
    learning rate the benchmarks found best for this init, as shares of plain LoRA's best (learning_rate.py)."""
    delta_sq = sum(r["delta_norm"] ** 2 for r in rows.values())
    update_sq = sum(r["update_norm"] ** 2 for r in rows.values())
    return {
        "mode": options.mode,
        "init": options.init,
        "rank": options.rank,
        "budget": options.budget,
        "total_rank": sum(ranks.values()),
        "modules_with_adapter": sum(1 for r in ranks.values() if r),
        "kept": None if mode.zero_update else _kept(mode, rows, update_sq, delta_sq),
        "rcond": options.rcond,
        "floored_modules": sum(1 for r in rows.values() if r["floored"]),
        "solve_seconds": round(seconds, 3),
        "load_seconds": round(loaded, 3),
        "lr_advice": learning_rate.measured_range(options.mode, options.init, options.out_delta),
    } | ({"out_delta_scale": scaled_by} if scaled_by is not None else {}) | {"modules": rows}


def warn_if_far(options, report: dict) -> None:
    """One line when an offset init changes the adapted layers' outputs as much as the offset inits
    that failed to train in the fine-tuning benchmarks (benchmarks/RESULTS.md)."""
    changes = [row["output_change"] for row in report["modules"].values() if row["output_change"] is not None]
    typical = statistics.median(changes) if options.init == "offset" and changes else 0.0
    if typical <= FAR_OUT_DELTA:
        return
    warn(f"{options.mode}'s offset init changes the adapted layers' outputs on the calibration data by a median out Δ of "
         f"{typical:.3g}; every offset init above {FAR_OUT_DELTA:g} failed to train in the fine-tuning "
         "benchmarks (benchmarks/RESULTS.md): solve with --init residual, which starts at the pretrained model, or fix the "
         "offset's size with --out-delta 1e-4")


def _kept(mode: Mode, rows: dict, update_sq: float, delta_sq: float) -> float:
    """The share of the change wanted (‖ΔW‖², or for the gradient modes ‖G‖²) in what the adapters hold."""
    if mode.reads == GRADIENTS:
        return sum(r["kept"] * r["delta_norm"] ** 2 for r in rows.values()) / delta_sq if delta_sq > 0 else 1.0
    return update_sq / delta_sq if delta_sq > 0 else 1.0
