"""The solve stage: per-module initializations (B, A) from a statistics store and the weights, into a
solve directory.

    stage.py     solve(): inputs opened, ranks bounded, modules shared out, factors computed, written
    options.py   Options: every parameter, the mode's defaults and refusals
    modes/       every mode, one module per family, registered with what it reads and its factor function
    inputs.py    what a mode reads, in batches of equal shape (W, Σ, G)
    factors.py   every batch split by its mode, and the report's rows (vas.py: variable ranks)
    report.py    report.json
    learning_rate.py  the learning rate the benchmarks measured for each init, as a share of plain LoRA's
    solution.py  the solve directory's format (quant.py: its NF4 bases)
    linalg.py    the eigendecompositions and rank-r splits the modes share
"""

from .options import Options
from .stage import solve

__all__ = ["Options", "solve"]
