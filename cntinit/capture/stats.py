"""Running input statistics of one attachment point: Σxxᵀ, Σx and n, per bucket.

Raw sums only; dividing by n happens at solve time (a running mean loses accuracy).
"""

from __future__ import annotations

import math

import torch


def gram_block(dim: int, cuda: bool) -> int:
    """Column block of the triangular Gram update: about 8 blocks of at least 128 columns on
    CPU; on CUDA, where each extra launch costs more, 4 blocks of at least 1024 (measured)."""
    return max(1024, math.ceil(dim / 4)) if cuda else max(128, math.ceil(dim / 8))


def accumulate_upper(xxt: torch.Tensor, x: torch.Tensor) -> None:
    """Add the upper block triangle of xᵀx to `xxt` in place, never rounding below xxt's dtype.

    Σxxᵀ is symmetric, so only block rows right of the diagonal are computed: about
    (1 + 1/blocks)/2 of the full product, in a few large GEMMs. `symmetrize` fills the rest.
    Half-precision rows on CUDA go through tensor cores with float32 accumulation and output:
    products of bf16/fp16 values are exact in float32, so this equals converting first, at
    the half-precision GEMM rate instead of the (TF32-free) float32 one.
    """
    tensor_cores = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and xxt.dtype == torch.float32
    if not tensor_cores:
        x = x.to(xxt.dtype)
    dim = x.shape[1]
    block = gram_block(dim, x.is_cuda)
    for start in range(0, dim, block):
        end = min(dim, start + block)
        if tensor_cores:
            xxt[start:end, start:] += torch.mm(x[:, start:end].T, x[:, start:], out_dtype=torch.float32)
        else:
            xxt[start:end, start:].addmm_(x[:, start:end].T, x[:, start:])


def symmetrize(upper: torch.Tensor, tile: int = 256, in_place: bool = False) -> torch.Tensor:
    """The full symmetric matrix (or batch of them) from one whose upper triangle is valid.

    Reads only the upper triangle, which every block size leaves whole, so it does not
    depend on how (or on which device) the blocks were cut. Tile by tile, into a new tensor or,
    `in_place`, over the lower triangle (whose values nothing reads): at 70B widths (Σ of
    28672², 3.3 GB) whole-matrix `triu`s and a transposed add took four copies and 7× the time
    (`benchmarks/fixed_costs.py`).
    """
    n = upper.shape[-1]
    full = upper if in_place else torch.empty_like(upper)
    for start in range(0, n, tile):
        end = min(n, start + tile)
        right = upper[..., start:end, end:]
        if not in_place:
            full[..., start:end, end:] = right
        full[..., end:, start:end] = right.mT  # rows below this tile: never read as `right` again
        diagonal = upper[..., start:end, start:end]
        full[..., start:end, start:end] = diagonal.triu() + diagonal.triu(1).mT
    return full


class InputStats:
    """Σxxᵀ (upper blocks), Σx and token count of one unique input, split into K buckets — or, not
    `summed` (a --gradients-only capture), the token counts alone."""

    def __init__(self, dim: int, buckets: int, dtype: torch.dtype, device: torch.device | str, summed: bool = True):
        self.dim, self.summed = dim, summed
        self.xxt = torch.zeros(buckets, dim, dim, dtype=dtype, device=device) if summed else None
        self.sum = torch.zeros(buckets, dim, dtype=dtype, device=device) if summed else None
        self.count = [0] * buckets

    def add(self, x: torch.Tensor, bucket: int) -> None:
        """Add the rows of `x` (n × dim), already free of padding, to bucket `bucket`."""
        if self.summed:
            accumulate_upper(self.xxt[bucket], x)
            self.sum[bucket].add_(x.sum(dim=0, dtype=self.sum.dtype))
        self.count[bucket] += x.shape[0]

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The store's tensors for this input: pooled, plus per-bucket ones when K > 1 (none when not summed)."""
        if not self.summed:
            return {}
        full = symmetrize(self.xxt, in_place=True).cpu()  # the sums' last use: their own memory, not another Σ's worth
        sums = self.sum.cpu()
        counts = torch.tensor(self.count, dtype=torch.int64)
        out = {f"{key}.xxt": full.sum(0) if len(self.count) > 1 else full[0], f"{key}.sum": sums.sum(0), f"{key}.count": counts.sum()}
        if len(self.count) > 1:
            out |= {f"{key}.bucket_xxt": full, f"{key}.bucket_sum": sums, f"{key}.bucket_count": counts}
        return out

    def state(self, key: str) -> dict[str, torch.Tensor]:
        """The running sums exactly as held (upper blocks, per bucket), for a checkpoint."""
        sums = {f"{key}.xxt": self.xxt.cpu(), f"{key}.sum": self.sum.cpu()} if self.summed else {}
        return sums | {f"{key}.count": torch.tensor(self.count, dtype=torch.int64)}

    def fits(self, state: dict[str, torch.Tensor], key: str) -> bool:
        """Whether a checkpoint's `state` holds this input's sums, in their shapes."""
        shapes = ((f"{key}.xxt", self.xxt.shape), (f"{key}.sum", self.sum.shape)) if self.summed else ()
        return all(name in state and state[name].shape == shape for name, shape in (*shapes, (f"{key}.count", (len(self.count),))))

    def restore(self, state: dict[str, torch.Tensor], key: str) -> None:
        """Continue from a checkpoint's sums (bit for bit: the resumed run adds in the same order)."""
        if self.summed:
            self.xxt.copy_(state[f"{key}.xxt"])
            self.sum.copy_(state[f"{key}.sum"])
        self.count = state[f"{key}.count"].tolist()
