"""NF4, bitsandbytes' 4-bit NormalFloat (QLoRA), in plain torch: the codes and block maxima
`bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4")` computes, bit for bit.

A matrix is read row-major in blocks of 64 values (the last may be shorter); each block keeps
its largest |value| (`absmax`, float32) and each value the index of the nearest of 16 levels
after dividing by it (ties to the lower level, as `torch.bucketize` does). The dequantized
value is level × absmax, in float32.

`base` is what a quantized residual init ships: the block maxima rounded to the dtype the base
is written in, so that quantizing that base again — what a trainer's `load_in_4bit` does —
gives the same codes and the same maxima, and its dequantized weights are the ones the
factors were fitted to.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit, what transformers' BitsAndBytesConfig uses
LEVELS = torch.tensor([  # bitsandbytes' NF4 table (QLoRA: quantiles of N(0, 1), scaled to [−1, 1])
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)
BOUNDS = (LEVELS[:-1] + LEVELS[1:]) / 2
ZERO = 7  # the code of 0.0


class Quantized(NamedTuple):
    codes: torch.Tensor  # uint8, one 0..15 per value, row-major
    absmax: torch.Tensor  # float32, one per block
    shape: tuple[int, int]


def quantize(matrix: torch.Tensor) -> Quantized:
    """NF4 codes and block maxima of `matrix`, as bitsandbytes computes them (in float32)."""
    flat = matrix.reshape(-1).float()
    full = flat.numel() - flat.numel() % BLOCKSIZE
    blocks = [flat[:full].reshape(-1, BLOCKSIZE)] + ([flat[full:].reshape(1, -1)] if full < flat.numel() else [])
    codes, maxima = [], []
    for part in blocks:
        absmax = part.abs().amax(dim=-1)
        scaled = torch.clamp(part * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1)
        codes.append(torch.bucketize(scaled.reshape(-1), BOUNDS.to(flat.device)).to(torch.uint8))
        maxima.append(absmax)
    return Quantized(torch.cat(codes), torch.cat(maxima), tuple(matrix.shape))


def dequantize(q: Quantized) -> torch.Tensor:
    """level × absmax per value, float32, in the matrix's shape."""
    levels = LEVELS.to(q.codes.device)[q.codes.long()]
    scale = q.absmax.repeat_interleave(BLOCKSIZE)[: levels.numel()]
    return (levels * scale).reshape(q.shape)


def base(matrix: torch.Tensor, dtype: torch.dtype) -> Quantized:
    """The quantization of `matrix` a base written in `dtype` reproduces exactly: bitsandbytes'
    codes, block maxima rounded to `dtype` (each block's largest value is ±absmax, so its maximum
    after rounding is the rounded maximum, and the other values stay nearest their own levels)."""
    q = quantize(matrix)
    return q._replace(absmax=q.absmax.to(dtype).float())


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the first in the high half, as bitsandbytes stores them (an odd count
    padded with the code of 0, as it pads)."""
    padded = torch.cat([codes, codes.new_full((codes.numel() % 2,), ZERO)])
    return (padded[::2] << 4) | padded[1::2]


def unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[:count]
