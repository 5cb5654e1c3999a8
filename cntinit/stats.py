"""Running input statistics of one attachment point: Σxxᵀ, Σx and n, per bucket.

Raw sums only; dividing by n happens at solve time (a running mean loses accuracy).
"""

from __future__ import annotations

import math

import torch


def gram_block(dim: int) -> int:
    """Column block for the triangular Gram update: about 8 blocks, none under 128 columns."""
    return max(128, math.ceil(dim / 8))


def accumulate_upper(xxt: torch.Tensor, x: torch.Tensor) -> None:
    """Add the upper block triangle of xᵀx to `xxt` in place.

    Σxxᵀ is symmetric, so only block rows right of the diagonal are computed: about
    (1 + 1/blocks)/2 of the full product, in a few large GEMMs. `symmetrize` fills the rest.
    """
    dim = x.shape[1]
    block = gram_block(dim)
    for start in range(0, dim, block):
        end = min(dim, start + block)
        xxt[start:end, start:].addmm_(x[:, start:end].T, x[:, start:])


def symmetrize(upper: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from one whose block upper triangle (diagonal blocks whole) is valid."""
    dim = upper.shape[-1]
    block = gram_block(dim)
    full = upper.clone()
    for start in range(0, dim, block):
        end = min(dim, start + block)
        # below the diagonal block row: mirror of the block column above
        full[end:, start:end] = upper[start:end, end:].transpose(0, 1)
    return full


class InputStats:
    """Σxxᵀ (upper blocks), Σx and token count of one unique input, split into K buckets."""

    def __init__(self, dim: int, buckets: int, dtype: torch.dtype, device: torch.device | str):
        self.dim = dim
        self.xxt = torch.zeros(buckets, dim, dim, dtype=dtype, device=device)
        self.sum = torch.zeros(buckets, dim, dtype=dtype, device=device)
        self.count = [0] * buckets

    def add(self, x: torch.Tensor, bucket: int) -> None:
        """Add the rows of `x` (n × dim), already free of padding, to bucket `bucket`."""
        x = x.to(self.xxt.dtype)
        accumulate_upper(self.xxt[bucket], x)
        self.sum[bucket].add_(x.sum(dim=0))
        self.count[bucket] += x.shape[0]

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The store's tensors for this input: pooled, plus per-bucket ones when K > 1."""
        full = torch.stack([symmetrize(b) for b in self.xxt]).cpu()
        sums = self.sum.cpu()
        counts = torch.tensor(self.count, dtype=torch.int64)
        out = {f"{key}.xxt": full.sum(0), f"{key}.sum": sums.sum(0), f"{key}.count": counts.sum()}
        if len(self.count) > 1:
            out |= {f"{key}.bucket_xxt": full, f"{key}.bucket_sum": sums, f"{key}.bucket_count": counts}
        return out
