"""Every initialization `cntinit solve` computes, one module per family, each mode registered in
registry.MODES with what it reads, its base, its options and its factor function:

    cnt.py               ConsNoTrainLoRA: cnt-x, cnt-s, cnt-sh (statistics)
    weight_baselines.py  lora, pissa, milora, olora, mica (W alone)
    inilora.py           inilora, inilora-alpha, inilora-beta (W alone, Adam)
    data_baselines.py    eva, corda (statistics)
    gradient.py          lora-ga, lora-one (loss gradients)
    quantized.py         loftq (W alone, a 4-bit base); the NF4 base of --quantize

The imports below register the modes, in the order --mode lists them.
"""

from . import cnt, weight_baselines, inilora, data_baselines, gradient, quantized  # isort: skip (the order --mode lists them in)
from .registry import GRADIENTS, MODES, OFFSET, RESIDUAL, STATISTICS, WEIGHTS, Factors, Job, Mode, get, owners

__all__ = ["cnt", "weight_baselines", "inilora", "data_baselines", "gradient", "quantized",
           "GRADIENTS", "MODES", "OFFSET", "RESIDUAL", "STATISTICS", "WEIGHTS", "Factors", "Job", "Mode", "get", "owners"]
