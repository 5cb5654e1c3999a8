"""The learning rate to train an init at, as the benchmarks measured it: each init's best rate over
plain LoRA's best in the same setting (benchmarks/RESULTS.md, "A learning rate for each init").

No rule computed from the factors held on the tasks it was not chosen on: the step-size rule that
benchmarks/convergence.py evaluates (`--lr-rule`) gave rates as good as each init's best on MiniLM
classification, but not on the verses for most inits, whose best rates did not move with LoRA's
from task to task. So this is advice, as measured: the lowest and highest ratio over the settings
each init was swept in, with the settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import CntinitError

BOTH = "SmolLM2-135M on reviews and verses (rank 8, 40 steps)"
MINILM = "MiniLM classification"
WIDER = "SmolLM2-135M on reviews (rank 8 and 32; 40 and 160 steps) and verses"


@dataclass(frozen=True)
class Measured:
    low: float  # the init's best learning rate over plain LoRA's best, lowest over the settings
    high: float  # and highest
    settings: str  # where it was measured


# (mode, init form) → what the sweeps found; the forms: "offset", "residual", "out-delta" (offset with --out-delta)
MEASURED = {
    ("lora", "offset"): Measured(1.0, 1.0, "by definition"),
    ("pissa", "residual"): Measured(0.1, 1 / 3, f"{WIDER}, {MINILM}"),
    ("olora", "residual"): Measured(0.1, 1 / 3, f"SmolLM2-135M on reviews (rank 8 and 32) and verses, {MINILM}"),
    ("corda", "residual"): Measured(0.1, 0.3, f"{BOTH}, {MINILM}"),
    ("cnt-s", "residual"): Measured(0.1, 1 / 3, f"{BOTH}, {MINILM}"),
    ("cnt-x", "residual"): Measured(0.1, 0.1, MINILM),
    ("cnt-sh", "residual"): Measured(0.3, 1 / 3, BOTH),
    ("eva", "offset"): Measured(0.3, 1.0, f"{WIDER}, {MINILM}"),
    ("lora-ga", "residual"): Measured(0.3, 1.0, WIDER),
    ("milora", "residual"): Measured(0.3, 1.0, BOTH),
    ("lora-one", "offset"): Measured(0.3, 1.0, BOTH),
    ("inilora", "residual"): Measured(0.3, 1 / 3, f"{BOTH}, 100 Adam steps"),
    ("cnt-s", "out-delta"): Measured(0.3, 1.0, f"{BOTH}, --out-delta 1e-4"),
    ("cnt-sh", "out-delta"): Measured(1.0, 1.0, f"{BOTH}, --out-delta 1e-4"),
    ("mica", "offset"): Measured(10 / 3, 10 / 3, "SmolLM2-135M on verses (rank 8, 40 steps)"),
}


def form(init: str, out_delta: float | None) -> str:
    """The init form MEASURED is keyed by: "out-delta" for an offset init scaled with --out-delta."""
    return "out-delta" if out_delta is not None and init == "offset" else init


def measured_range(mode: str, init: str, out_delta: float | None) -> dict | None:
    """What the benchmarks measured for this init, as report.json's lr_advice and the export's manifest hold it;
    None where it was not swept."""
    found = MEASURED.get((mode, form(init, out_delta)))
    return None if found is None else {"low": found.low, "high": found.high, "settings": found.settings}


def check_lora_lr(lora_lr: float | None) -> None:
    if lora_lr is not None and not (math.isfinite(lora_lr) and 0 < lora_lr <= 1):
        raise CntinitError(f"--lr is the learning rate you would give plain LoRA (e.g. 2e-4), a positive finite number up to 1, got {lora_lr}")


def rates(advice: dict | None, lora_lr: float | None) -> list[float] | None:
    """The measured range as rates, given plain LoRA's."""
    return None if advice is None or lora_lr is None else [advice["low"] * lora_lr, advice["high"] * lora_lr]


def _share(low: float, high: float) -> str:
    return f"{low:.2g}" if math.isclose(low, high) else f"{low:.2g}–{high:.2g}"


NO_ADVICE = {"offset": "its offset form moved the model too far to train at any rate",  # the CNT modes' (the rest have advice)
             "out-delta": "with --out-delta 1e-4 it ended far behind plain LoRA at every rate measured"}  # cnt-x's


def advice(found: dict | None, lora_lr: float | None, mode: str, init_form: str) -> str:
    """One line: the learning rate to train this init (`init_form`, as form() gives it) at, as measured (as rates,
    given plain LoRA's)."""
    if found is None:
        why = NO_ADVICE.get(init_form, "not measured in the benchmarks") if mode.startswith("cnt-") else "not measured in the benchmarks"
        return f"learning rate: no advice for {mode} ({init_form}): {why}"
    given = rates(found, lora_lr)
    rate = f" = {_share(*given)} for plain LoRA's {lora_lr:g}" if given else " (--lr gives the rates)"
    return (f"learning rate: {_share(found['low'], found['high'])} × plain LoRA's best{rate}, as measured ({found['settings']}); "
            "no rule predicted it across tasks (benchmarks/RESULTS.md)")
