"""ConsNoTrainLoRA (METHODS.md): the target weight W_tar of each bucket's statistics — Cross (eq. 4),
Self (eq. 12) or Shift (eq. 17) — their robust average (eq. 18), and ΔW = W_est − W split at rank r.

The formulas take a leading batch dimension: W is (n, k, d), Σ is (n, d, d).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch

from ...models.linears import in_out_features
from ..inputs import CHUNK_BYTES, Batch, batch_size, sigmas, stacked_weights
from ..linalg import Eigen, eigen, floor, kept, pseudo_inverse, reciprocal, split
from .registry import OFFSET, STATISTICS, Factors, Job, Mode, register

SELF_FORMS = ("paper", "zca")
NORMALIZE = ("trace",)  # --normalize: Σ divided by its mean eigenvalue before the target


def cross(w: torch.Tensor, eig: Eigen, rcond: float) -> torch.Tensor:
    """CNTLoRA-X (eq. 4): W Σ⁺, eigenvalues below the floor treated as zero."""
    values, vectors = eig
    inverse = reciprocal(values, kept(values, rcond))
    return ((w @ vectors) * inverse.unsqueeze(-2)) @ vectors.mT


def self_(w: torch.Tensor, eig: Eigen, rcond: float, form: str) -> torch.Tensor:
    """CNTLoRA-S (eq. 12): W D^{-1/2} Pᵀ (paper) or W P D^{-1/2} Pᵀ = W Σ^{-1/2} (zca);
    eigenvalues below the floor are clamped to it. Where even the floor is zero (Σ = 0: an
    input that never varies) a direction gets 0, as in a pseudo-inverse, not 1/√0."""
    values, vectors = eig
    clamped = values.clamp(min=floor(values, rcond))
    root = torch.where(clamped > 0, clamped.clamp(min=torch.finfo(values.dtype).tiny).rsqrt(), torch.zeros_like(clamped))
    if form == "paper":
        return (w * root.unsqueeze(-2)) @ vectors.mT
    return ((w @ vectors) * root.unsqueeze(-2)) @ vectors.mT


def shift(w: torch.Tensor, sigma: torch.Tensor, rcond: float, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CNTLoRA-Sh (eq. 17): c · ((I − Σ) Wᵀ)⁺, singular values below rcond · s_max treated as zero.

    Returns the target and the number of singular values floored per matrix.
    """
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    inverse, floored = pseudo_inverse((eye - sigma) @ w.mT, rcond)
    return c * inverse, floored


def robust_estimate(w: torch.Tensor, targets: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Eq. 18: (W + Σ_j w_j W_tar,j) / (B + 1), W_0 = W."""
    total = w.clone()
    for weight, target in zip(weights, targets):
        total += weight * target
    return total / (len(targets) + 1)


def conditioned(sigma: torch.Tensor, normalize: str | None, damping: float | None) -> torch.Tensor:
    """Σ as the target reads it (B, d, d): the paper's assumes whitened inputs and leaves Σ's scale open.
    --normalize trace divides Σ by its mean eigenvalue m = tr Σ / d (so its eigenvalues average 1);
    --damping δ adds δ·m·I, a floor relative to the average variance instead of the largest one."""
    if normalize is None and damping is None:
        return sigma
    mean = (torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1) / sigma.shape[-1]).clamp(min=torch.finfo(sigma.dtype).tiny)
    if damping is not None:
        sigma = sigma + damping * mean[..., None, None] * torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    return sigma / mean[..., None, None] if normalize == "trace" else sigma


# Each mode's target of one bucket: (W_tar, singular values floored per matrix, or None where the eigenvalues say)
Target = Callable[[torch.Tensor, torch.Tensor, Eigen, object], tuple[torch.Tensor, torch.Tensor | None]]


def cross_target(w: torch.Tensor, sigma: torch.Tensor, eig: Eigen, options) -> tuple[torch.Tensor, None]:
    return cross(w, eig, options.rcond), None


def self_target(w: torch.Tensor, sigma: torch.Tensor, eig: Eigen, options) -> tuple[torch.Tensor, None]:
    return self_(w, eig, options.rcond, options.self_form), None


def shift_target(w: torch.Tensor, sigma: torch.Tensor, eig: Eigen | None, options) -> tuple[torch.Tensor, torch.Tensor]:
    return shift(w, sigma, options.rcond, options.shift_c)


def deltas(target: Target, eigendecompose: bool, stats, modules: dict, options, dev: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
    """ΔW = W_est − W for batches of equal-shape modules, one group of equal-dimension keys at a time
    (their Σ per bucket, and its eigendecomposition where the target needs one, computed once per key)."""
    readers: dict[str, list[str]] = {}
    for name in modules:
        readers.setdefault(stats.manifest["modules"][name]["key"], []).append(name)
    by_dim: dict[int, list[str]] = {}
    for key in readers:
        by_dim.setdefault(stats.manifest["stats"][key]["dim"], []).append(key)
    count = len(options.bucket_weights)
    for dim, keys in by_dim.items():
        per_chunk = max(1, CHUNK_BYTES // (3 * (count + 1) * dim * dim * 8))
        for start in range(0, len(keys), per_chunk):
            chunk = keys[start : start + per_chunk]
            sigma = torch.empty(len(chunk), count, dim, dim, device=dev, dtype=dtype)  # (keys, B, d, d)
            pooled = torch.empty(len(chunk), dim, dim, device=dev, dtype=dtype)
            for i, key in enumerate(chunk):  # one key's float64 temporaries at a time
                each, pooled[i] = sigmas(stats.tensors(key), key, options, stats.buckets, dev)
                sigma[i] = conditioned(each, options.normalize, options.damping)
            eig, floored = None, None
            if eigendecompose:
                eig = eigen(sigma)
                floored = (~kept(eig.values, options.rcond)).sum(-1).amax(-1)  # per key
            by_out: dict[int, list[str]] = {}
            for key in chunk:
                for name in readers[key]:
                    by_out.setdefault(in_out_features(modules[name])[1], []).append(name)
            for k, names in by_out.items():
                per_batch = batch_size(k, dim, 0, dev, dtype)
                for s in range(0, len(names), per_batch):
                    group = names[s : s + per_batch]
                    index = torch.tensor([chunk.index(stats.manifest["modules"][n]["key"]) for n in group], device=dev)
                    yield _group(target, group, modules, options, sigma, pooled, eig, floored, index, dev, dtype)


def _group(target: Target, names, modules, options, sigma, pooled, eig, floored, index, dev, dtype) -> Batch:
    w = stacked_weights(modules, names, dev, dtype)
    targets, target_floored = [], []
    for j in range(len(options.bucket_weights)):
        bucket_eig = Eigen(eig.values[index, j], eig.vectors[index, j]) if eig is not None else None
        made, count = target(w, sigma[index, j], bucket_eig, options)
        targets.append(made)
        if count is not None:
            target_floored.append(count)
    delta = robust_estimate(w, targets, options.bucket_weights) - w
    floor_counts = torch.stack(target_floored).amax(0) if target_floored else floored[index]
    return Batch(names, w, delta, pooled[index], floor_counts.tolist())


def split_delta(batch: Batch, job: Job) -> Factors:
    """B A = the rank-r split of ΔW (SVD, or QR with --decompose qr)."""
    b, a, values = split(batch.delta, job.rank, job.options.decompose, job.options.split_p)
    return Factors(b, a, values)


def _given(given, options):
    return given


def _register(name: str, target: Target, eigendecompose: bool) -> None:
    own = {"out_delta": _given, "normalize": _given}
    if eigendecompose:  # damping shifts the eigenvalues an inverse reads; cnt-sh inverts (I − Σ)Wᵀ instead
        own["damping"] = _given
    register(Mode(name, reads=STATISTICS, init=OFFSET, factor=split_delta, batches=functools.partial(deltas, target, eigendecompose),
                  decompose="svd", any_decompose=True, buckets=True, by_key=True, floors=True, options=own))


_register("cnt-x", cross_target, eigendecompose=True)
_register("cnt-s", self_target, eigendecompose=True)
_register("cnt-sh", shift_target, eigendecompose=False)
