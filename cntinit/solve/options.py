"""The options of a solve: every parameter, recorded in the solve manifest. `resolved` fills in the
mode's defaults and refuses what does not apply to it, from what the mode registered (modes/);
`check` keeps every value in its domain.

A mode's own option (a field only some modes take) is a field here, a flag of `cntinit solve`
(cli.py) and an entry in its mode's `options`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

import torch

from ..errors import CntinitError, not_one_of
from . import modes
from .linalg import DECOMPOSE
from .modes.cnt import NORMALIZE, SELF_FORMS
from .modes.data_baselines import CORDA_MODES
from .modes.gradient import DIRECTIONS, SCALES
from .modes.weight_baselines import LORA_INITS

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
INITS = (modes.OFFSET, modes.RESIDUAL)
NEWER_OPTIONS = ("direction", "scale", "stable_gamma", "alpha", "rslora", "quantize", "bits", "loftq_iter", "out_delta", "normalize", "damping")  # None unless used; older manifests lack them
RECORDED_WHEN_SET = ("out_delta", "normalize", "damping")  # newer than the pinned formats: a solve manifest's params hold them only when set
QUANTIZE = ("nf4",)
GAMMAS = (1e-6, 1e12)  # --stable-gamma: B and A shrink by √γ (16 and 128 by default)
SCALES_OF_ALPHA = (1e-4, 1e4)  # α/r of --alpha: the scale export folds into the factors (export/stage.py takes the same)


@dataclass
class Options:
    """Every parameter of a solve; recorded in the solve manifest. None means the mode's default
    (or, for mode-specific options, that the mode does not use it)."""

    mode: str
    rank: int = 16
    rcond: float = 1e-4
    centered: bool = False
    self_form: str = "paper"
    shift_c: float = 1.0
    bucket_weights: list[float] | None = None
    pooled: bool = False
    decompose: str | None = None  # svd, except qr for olora
    split_p: float = 0.5
    init: str | None = None  # offset for the CNT modes (the paper's) and lora/eva; residual where BA is a piece of W
    vas: bool = False
    budget: int | None = None
    min_rank: int = 0
    max_rank: int | None = None
    precision: str | None = None  # float64; float32 with --niter (a randomized SVD's own error dwarfs float32's rounding; PEFT computes it in float32)
    seed: int = 0  # random draws: lora, pissa/lora-ga --niter, inilora*
    niter: int | None = None  # pissa, lora-ga: randomized SVD with this many subspace iterations (PEFT's)
    lora_init: str | None = None  # lora: kaiming (PEFT's default) or gaussian
    rho: float | None = None  # eva: a module may get up to round(rank × rho) (PEFT's default 2)
    corda_mode: str | None = None  # corda: ipm (principal) or kpm (minor)
    steps: int | None = None  # inilora*: exact Adam step count (default: inilora early-stops, alpha/beta draw only)
    direction: str | None = None  # lora-ga: which singular vectors go to A and B (PEFT's default ArB2r)
    scale: str | None = None  # lora-ga, lora-one: how B (and A) are sized (stable by default)
    stable_gamma: float | None = None  # the stable scale's γ (lora-ga 16, lora-one 128)
    alpha: float | None = None  # lora-ga, lora-one: the LoRA α the factors are sized for (default: the rank, scale 1)
    rslora: bool | None = None  # lora-ga, lora-one: the scale is α/√r instead of α/r
    quantize: str | None = None  # nf4: the shipped base is NF4(W − BA), as a 4-bit trainer loads it (loftq: always)
    bits: int | None = None  # loftq: 4 (PEFT's LoftQConfig default; NF4)
    loftq_iter: int | None = None  # loftq: alternations of quantizing and the rank-r SVD (PEFT's default 1)
    out_delta: float | None = None  # cnt-*: every update scaled by one factor so that the median out Δ is this
    normalize: str | None = None  # cnt-*: trace — Σ divided by its mean eigenvalue before the target (the paper's: as captured)
    damping: float | None = None  # cnt-x, cnt-s: δ·(tr Σ / d)·I added to Σ before its inverse

    @property
    def lora_scale(self) -> float:
        """s, by which the trainer multiplies BA: α/r, or α/√r with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def resolved(self) -> "Options":
        """These options with the mode's defaults filled in, checked."""
        mode = modes.get(self.mode)
        for option in OWN_OPTIONS:
            given = getattr(self, option)
            if option == "rslora":
                given = given or None  # off is not given
            owners = modes.owners(option)
            if given is not None and mode.name not in owners:
                raise CntinitError(f"--{option.replace('_', '-')} applies to --mode {' or '.join(owners)}, not {mode.name}")
        if (self.bucket_weights is not None or self.pooled) and not mode.buckets:
            raise CntinitError(f"--bucket-weights and --pooled shape the robust CNT estimate; --mode {mode.name} uses the pooled statistics")
        natural = mode.decompose or "svd"
        if self.decompose not in (None, natural) and not mode.any_decompose:
            what = f"splits W by {natural}" if mode.decompose else "does not split a matrix"
            raise CntinitError(f"--mode {mode.name} {what}; --decompose {self.decompose} would make it another method")
        if mode.init == modes.RESIDUAL and self.init == modes.OFFSET:
            raise CntinitError(f"--mode {mode.name} moves part of W into the adapter, so its base must be W − BA: use --init residual (the default)")
        if mode.zero_update and self.init == modes.RESIDUAL:
            raise CntinitError(f"--mode {mode.name} starts with BA = 0, so there is nothing to subtract from W: leave out --init")
        if self.vas and mode.vas is not None:
            raise CntinitError(f"--vas does not apply to --mode {mode.name}: {mode.vas}")
        settings = {name: resolve(getattr(self, name), self) for name, resolve in {**mode.options, **mode.defaults}.items()}
        options = replace(self, decompose=self.decompose or mode.decompose, init=self.init or mode.init,
                          precision=self.precision if self.precision is not None else "float32" if settings.get("niter") is not None else "float64",
                          **settings)
        if options.quantize is not None and (options.init != modes.RESIDUAL or mode.zero_update):
            why = "BA = 0 leaves the base W" if mode.zero_update else "an offset init's base is W itself"
            raise CntinitError(f"--quantize {options.quantize} makes the shipped base the 4-bit NF4(W − BA); {why}: quantize W in the "
                               "trainer (plain QLoRA), or use --init residual")
        if options.out_delta is not None and options.quantize is not None:
            raise CntinitError("--out-delta rescales BA after the split, and --quantize fits the NF4 base to the split itself: "
                               "use one of them")
        options.check()
        return options

    def check(self) -> None:
        """Every value in its domain (resolved or not: a solve manifest's params are checked with it)."""
        choices = {"--self-form": (self.self_form, SELF_FORMS), "--init": (self.init, INITS)}
        if self.precision is not None:
            choices["--precision"] = (self.precision, tuple(PRECISIONS))
        if self.decompose is not None:
            choices["--decompose"] = (self.decompose, DECOMPOSE)
        if self.lora_init is not None:
            choices["--lora-init"] = (self.lora_init, LORA_INITS)
        if self.corda_mode is not None:
            choices["--corda-mode"] = (self.corda_mode, CORDA_MODES)
        if self.direction is not None:
            choices["--direction"] = (self.direction, DIRECTIONS)
        if self.scale is not None:
            choices["--scale"] = (self.scale, SCALES.get(self.mode, SCALES["lora-ga"]))
        if self.quantize is not None:
            choices["--quantize"] = (self.quantize, QUANTIZE)
        if self.normalize is not None:
            choices["--normalize"] = (self.normalize, NORMALIZE)
        for option, (value, allowed) in choices.items():
            if value not in allowed:
                raise not_one_of(option, value, allowed)
        if self.rank < 1:
            raise CntinitError(f"--rank must be at least 1, got {self.rank}")
        if not 0 <= self.rcond < 1:
            raise CntinitError(f"--rcond must be in [0, 1), got {self.rcond}")
        if not 0 <= self.split_p <= 1:
            raise CntinitError(f"--split-p must be in [0, 1], got {self.split_p}")
        if self.budget is not None and self.budget < 1:
            raise CntinitError(f"--budget must be at least 1, got {self.budget}")
        if self.min_rank < 0:
            raise CntinitError(f"--min-rank must be at least 0, got {self.min_rank}")
        if self.max_rank is not None and self.max_rank < max(1, self.min_rank):
            raise CntinitError(f"--max-rank {self.max_rank} must be at least 1 and at least --min-rank {self.min_rank}")
        if not self.vas and (self.budget is not None or self.min_rank or self.max_rank is not None):
            raise CntinitError("--budget, --min-rank and --max-rank shape variable ranks: add --vas")
        if self.niter is not None and self.niter < 0:
            raise CntinitError(f"--niter must be at least 0, got {self.niter}")
        if self.rho is not None and not (math.isfinite(self.rho) and 1 <= self.rho <= 1e6):
            raise CntinitError(f"--rho must be at least 1 and finite, at most 1e6 (1 = no redistribution), got {self.rho}")
        if self.out_delta is not None and not (math.isfinite(self.out_delta) and 0 < self.out_delta <= 1e6):
            raise CntinitError(f"--out-delta must be a positive finite number up to 1e6 (the median out Δ the updates are scaled to), "
                               f"got {self.out_delta}")
        if self.damping is not None and not (math.isfinite(self.damping) and 0 < self.damping <= 1e6):
            raise CntinitError(f"--damping must be a positive finite number up to 1e6 (δ of Σ + δ·(tr Σ / d)·I), got {self.damping}")
        if not (math.isfinite(self.shift_c) and 0 < self.shift_c <= 1e6):
            raise CntinitError(f"--shift-c must be a positive finite number up to 1e6 (C = c·I scales the target), got {self.shift_c}")
        if self.bucket_weights is not None:
            bad = [w for w in self.bucket_weights if not (math.isfinite(w) and 0 <= w <= 1e6)]
            if bad or not any(w > 0 for w in self.bucket_weights):
                raise CntinitError(f"--bucket-weights are the buckets' shares of the robust estimate: give numbers from 0 to 1e6, "
                                   f"at least one above 0 (got {','.join(f'{w:g}' for w in self.bucket_weights)})")
        if self.steps is not None and self.steps < 0:
            raise CntinitError(f"--steps must be at least 0, got {self.steps}")
        if self.stable_gamma is not None and not (math.isfinite(self.stable_gamma) and GAMMAS[0] <= self.stable_gamma <= GAMMAS[1]):
            raise CntinitError(f"--stable-gamma must be from {GAMMAS[0]:g} to {GAMMAS[1]:g} (B and A shrink by √γ), got {self.stable_gamma}")
        if self.bits is not None and self.bits != 4:
            raise CntinitError(f"--bits {self.bits}: LoftQ here quantizes to 4-bit NF4 (bitsandbytes' QLoRA format); use --bits 4")
        if self.loftq_iter is not None and not 1 <= self.loftq_iter <= 1000:
            raise CntinitError(f"--loftq-iter must be from 1 to 1000 (PEFT's default 1), got {self.loftq_iter}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and 0 < self.alpha <= 1e12):
            raise CntinitError(f"--alpha must be a positive finite number (the trainer's lora_alpha), got {self.alpha}")
        if self.alpha is not None and not SCALES_OF_ALPHA[0] <= self.alpha / self.rank <= SCALES_OF_ALPHA[1]:
            low, high = SCALES_OF_ALPHA
            raise CntinitError(f"--alpha {self.alpha:g} gives the scale α/r = {self.alpha / self.rank:.3g} at rank {self.rank}, outside "
                               f"[{low:g}, {high:g}], where export folds it into factors that stay inside half precision: choose --alpha "
                               f"between {low * self.rank:g} and {high * self.rank:g}")


OWN_OPTIONS = [f.name for f in dataclasses.fields(Options) if modes.owners(f.name)]  # the options only some modes take, in field order
