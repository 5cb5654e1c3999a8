"""The 4-bit base: LoftQ (METHODS.md), which fits BA to W − Q for Q the NF4 quantization of the
base, as PEFT's `loftq_init`; and the NF4 base any residual init ships with --quantize nf4, made as
the trainer's bitsandbytes quantizes the weight (its dtype and layout), with its errors for the report.
"""

from __future__ import annotations

import torch

from .. import quant
from ..inputs import Batch
from ..linalg import split
from .registry import RESIDUAL, WEIGHTS, Factors, Job, Mode, register


def nf4_base(matrix: torch.Tensor, dtype: torch.dtype, transposed: bool) -> quant.Quantized:
    """NF4 of `matrix` (out × in) as a base stored in `dtype` quantizes: Conv1D stores it transposed."""
    return quant.base((matrix.T if transposed else matrix).contiguous(), dtype)


def nf4_values(base: quant.Quantized, transposed: bool) -> torch.Tensor:
    values = quant.dequantize(base)
    return values.T if transposed else values


def quantization_errors(w: torch.Tensor, update: torch.Tensor, base: quant.Quantized, layout: tuple[torch.dtype, bool]) -> dict:
    """‖W − Q − BA‖/‖W‖ of the quantized residual base, and plain QLoRA's ‖W − Q(W)‖/‖W‖ beside it."""
    w = w.double()
    norm = float(w.norm()) or 1.0
    shipped = nf4_values(base, layout[1]).to(w)
    plain = nf4_values(nf4_base(w, *layout), layout[1]).to(w)
    return {"quant_error": float((w - shipped - update.double()).norm()) / norm, "qlora_error": float((w - plain).norm()) / norm}


def loftq(batch: Batch, job: Job) -> Factors:
    """PEFT's `loftq_init`: Q = NF4(R) from R = W, then B A = the rank-r SVD of W − Q (√S on both
    sides); each further iteration quantizes R = W − B A again."""
    w, layouts, iterations = batch.weight, job.layouts, job.options.loftq_iter
    remainder = w
    for step in range(iterations):
        bases = [nf4_base(remainder[i], *layouts[i]) for i in range(w.shape[0])]
        q = torch.stack([nf4_values(base, layouts[i][1]) for i, base in enumerate(bases)]).to(w)
        b, a, values = split(w - q, job.rank, "svd", 0.5)
        if step + 1 < iterations:  # the last round's remainder is not needed
            remainder = w - b @ a
    return Factors(b, a, values, bases=bases)


register(Mode("loftq", reads=WEIGHTS, init=RESIDUAL, factor=loftq, vas="each rank's fit changes the quantized base",
              options={"bits": lambda given, options: 4 if given is None else given,
                       "loftq_iter": lambda given, options: 1 if given is None else given},  # 0 is refused, not taken for the default
              defaults={"quantize": lambda given, options: given or "nf4"}))
