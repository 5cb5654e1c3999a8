"""The export stage: turn a solve directory into adapter files that real trainers load, in one of the
formats registered in formats/ (PEFT, kohya, diffusers), plus the residual base where the init needs one.

The LoRA scale s is folded into the factors (B/√s, A/√s) so the adapter adds exactly B @ A
whatever α, rank pattern or rsLoRA — except where BA = 0 (lora, eva, mica): the update is zero
anyway and the factors keep the scale their method gave them. With --check the written files are
loaded in their real client before they replace what `out` held (check.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..console import log, warn
from ..errors import CntinitError, not_one_of
from ..models import pretrained
from ..models.linears import weight_values
from ..models.pipelines import DiffusionParts
from ..models.placement import DTYPES
from ..models.source import locate
from ..solve import learning_rate, modes
from ..solve.options import SCALES_OF_ALPHA
from ..solve.solution import Solution
from ..storage import store
from ..storage.atomic import atomic_directory
from . import formats
from .check import verify
from .formats import BASE_DIR, FORMAT, FORMAT_VERSION, Adapter, Format


def export(solve_dir: str | Path, out: str | Path, *, format: str = "peft", alpha: float | None = None,
           rslora: bool = False, dora: bool = False, fixed_alpha: bool = False, module_prefix: str = "",
           task_type: str = "auto", train_dtype: str = "auto", unet_only: bool = False, model: str | Path | None = None,
           overwrite: bool = False, trust_remote_code: bool = False, check: bool = False, revision: str | None = None,
           lora_lr: float | None = None) -> Path:
    """Write the adapter of the solve at `solve_dir` to `out` (and the residual base when the init needs one).
    `model` (a directory, or a Hub id at `revision`) stands in for the recorded model, the same weights elsewhere.
    With `check`, the export is loaded in its real client and verified (`verify`) before it replaces
    what `out` held, and the manifest records the largest error. `lora_lr`, the rate plain LoRA would train at, turns
    the learning rates the benchmarks found for this init (shares of LoRA's) into rates, recorded and printed."""
    options = {"format": format, "alpha": alpha, "rslora": rslora, "dora": dora, "fixed_alpha": fixed_alpha, "module_prefix": module_prefix,
               "task_type": task_type, "train_dtype": train_dtype} | ({"unet_only": True} if unet_only else {})
    plan = _plan(solve_dir, options)
    learning_rate.check_lora_lr(lora_lr)
    model = locate(model, revision, trust_remote_code) if model is not None else None
    sol, manifest, fmt = plan.sol, plan.sol.manifest, plan.format
    init_form = learning_rate.form(manifest["init"], manifest["params"].get("out_delta"))
    found = learning_rate.measured_range(manifest["mode"], manifest["init"], manifest["params"].get("out_delta"))
    store.check_out(out, manifest["model"]["fingerprint"], overwrite, FORMAT, "an export")
    residual = manifest["init"] == "residual"
    left_out = _unet_only(sol, fmt, residual) if unet_only else []
    writes_base = residual and fmt.writes_base  # kohya: the trainer subtracts the residual itself (--base_weights, multiplier −1)
    source = pretrained.open_recorded(manifest, model, trust_remote_code) if (dora or writes_base) else None
    factors = {name: pair for name, pair in sol.factors().items() if name not in left_out}
    bases = sol.dequantized_bases(source.dtype) if plan.quantized else {}
    adapter = _adapter(plan, Path(out), factors, source, bases, residual, dora)
    with atomic_directory(out) as tmp:
        fmt.write(tmp, adapter)
        if writes_base:
            precision = pretrained.Precision(source.dtype if train_dtype == "auto" else DTYPES[train_dtype])
            source.write_base(tmp / BASE_DIR, factors, {name: sol.modules[name]["fan_in_fan_out"] for name in factors}, bases, precision)
            precision.report()
        record = {
            **store.header(FORMAT, FORMAT_VERSION),
            "adapter_format": fmt.name,
            "adapter_file": fmt.file,
            "init": manifest["init"],
            "mode": manifest["mode"],
            "solve": {"path": str(Path(solve_dir).absolute()), "manifest_sha256": store.sha256_file(Path(solve_dir) / store.MANIFEST)},
            "model": manifest["model"],
            "alpha": adapter.alpha, "rslora": adapter.rslora, "dora": dora, "fixed_alpha": fixed_alpha, "module_prefix": plan.prefix,
            "options": options,
            "residual_base": BASE_DIR if writes_base else None,
            "quantized": manifest["params"].get("quantize"),
            "left_out": left_out,
            "learning_rate": {"measured": found, "lora_lr": lora_lr, "rates": learning_rate.rates(found, lora_lr)},
        }
        (tmp / store.MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        if check:  # before the swap: a failed check leaves what `out` held
            unchanged = source if isinstance(source, pretrained.Streamed) else None  # a loaded model holds the written base now
            record["check"] = {"max_relative_error": verify(tmp, solve_dir, model, trust_remote_code, shown=Path(out), source=unchanged)}
            (tmp / store.MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    if left_out:
        log(f"left out the {len(left_out)} text-encoder modules (--unet-only): the text encoder stays as it is")
    how = (f"load {Path(out) / BASE_DIR} in 4-bit — BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4') — as the base "
           "model; it quantizes to exactly the NF4 base the adapter was fitted to") if plan.quantized else \
        fmt.how_to_load(residual, Path(out), unet_only, manifest["model"].get("layout"))
    log(f"wrote a {fmt.name} adapter for {len(adapter.ranks)} modules to {out} ({manifest['init']} init: {how}); "
        f"{learning_rate.advice(found, lora_lr, manifest['mode'], init_form)}")
    return Path(out)


@dataclass
class _Plan:
    """An export's inputs, checked before any work: the solve, its format, the α and rsLoRA its
    factors are folded with, the module prefix and the format's own settings."""

    sol: Solution
    format: Format
    alpha: float | None
    rslora: bool
    fixed_alpha: bool
    prefix: str
    quantized: bool
    settings: object


def _plan(solve_dir, options: dict) -> _Plan:
    format, alpha, rslora, dora, fixed_alpha = (options[k] for k in ("format", "alpha", "rslora", "dora", "fixed_alpha"))
    module_prefix, task_type, train_dtype = options["module_prefix"], options["task_type"], options["train_dtype"]
    if train_dtype != "auto" and train_dtype not in DTYPES:
        raise not_one_of("--train-dtype", train_dtype, ("auto", *DTYPES))
    sol = Solution(solve_dir)
    manifest = sol.manifest
    alpha, rslora = _sized_for(manifest, alpha, rslora, fixed_alpha, format)
    _check_alpha(alpha, manifest["params"]["rank"])
    if not sol.modules:
        raise CntinitError(f"{solve_dir} gives every module rank 0: solve with a larger --budget or --min-rank 1")
    pipeline = manifest["model"].get("class") == DiffusionParts.__name__
    fmt = _check_format(format, pipeline, alpha, rslora, dora, fixed_alpha, module_prefix, task_type)
    mode = modes.get(manifest["mode"])
    if mode.peft_variant is not None:
        _check_variant(mode, fmt, dora)
    quantized = manifest["params"].get("quantize") is not None
    if quantized and fmt.pipelines:
        raise CntinitError(f"this solve's base is 4-bit NF4 for a QLoRA trainer (bitsandbytes, transformers models); --format {format} "
                           "carries no base: export --format peft")
    prefix = module_prefix.strip(".") + "." if module_prefix.strip(".") else ""
    settings = fmt.prepare(task_type, manifest["model"], prefix) if fmt.prepare is not None else None
    return _Plan(sol, fmt, alpha, rslora, fixed_alpha, prefix, quantized, settings)


def _adapter(plan: _Plan, out: Path, factors: dict, source, bases: dict, residual: bool, dora: bool) -> Adapter:
    """Each module's tensors under the format's keys, the scale folded in (and DoRA's magnitudes, as PEFT computes them)."""
    manifest, fmt = plan.sol.manifest, plan.format
    base_rank = manifest["params"]["rank"]
    alpha = float(plan.alpha if plan.alpha is not None else base_rank)
    # BA = 0 for any scale: the factors are written as drawn (their scale is the method's; MiCA's B stays orthonormal)
    zero_update = modes.get(manifest["mode"]).zero_update
    tensors, ranks, alphas = {}, {}, {}
    for name, (b, a) in factors.items():
        rank = manifest["modules"][name]["rank"]
        if fmt.fixed_scale:
            module_alpha = float(rank)  # diffusers' convention without alphas: scale 1 per module
        else:
            module_alpha = alpha if plan.fixed_alpha else alpha * (math.sqrt(rank / base_rank) if plan.rslora else rank / base_rank)
        scale = module_alpha / (math.sqrt(rank) if plan.rslora else rank)
        fold = 1.0 if zero_update else math.sqrt(scale)
        a, b = (a / fold).contiguous(), (b / fold).contiguous()
        key = fmt.key(name, manifest, plan.prefix)
        tensors |= fmt.tensors(key, b, a, module_alpha)
        if dora:
            w = weight_values(source.modules[name]).to(torch.float64)
            combined = bases[name].double() + b.double() @ a.double() * scale if plan.quantized else w if residual else \
                w + b.double() @ a.double() * scale
            tensors[f"{key}.lora_magnitude_vector"] = combined.norm(dim=1).to(torch.float32)
        ranks[plan.prefix + name], alphas[plan.prefix + name] = rank, module_alpha
    return Adapter(plan.sol, out, tensors, ranks, alphas, alpha, plan.rslora, dora, residual, plan.settings)


def _unet_only(sol: Solution, fmt: Format, residual: bool) -> list[str]:
    """The text-encoder modules a denoiser-only export leaves out. A residual init cannot leave them out:
    its base (written, or kohya's --base_weights −1) holds W − BA there, which without the adapter
    starts the text encoder off the pretrained one."""
    if not fmt.pipelines:
        raise CntinitError("--unet-only is for diffusion pipelines (--format kohya or diffusers), whose text encoder may stay frozen")
    encoder = [name for name in sol.modules if name.startswith("text_encoder")]
    if encoder and residual:
        raise CntinitError(f"--unet-only: this residual solve adapts {len(encoder)} text-encoder modules, whose base W − BA would then "
                           "train without its adapter (as with sd-scripts' --network_train_unet_only): solve the UNet or transformer "
                           "alone (--targets 're:(unet|transformer)\\..*'), or use --init offset")
    if len(encoder) == len(sol.modules):
        raise CntinitError("--unet-only: this solve adapts no UNet or transformer module: solve with its targets")
    return encoder


def _sized_for(manifest: dict, alpha: float | None, rslora: bool, fixed_alpha: bool, format: str) -> tuple[float | None, bool]:
    """(α, rsLoRA) to export with: for a gradient mode, the ones its factors were sized for (its B and A
    are the method's own only at that LoRA scale); a different --alpha, --rslora or --fixed-alpha is refused."""
    params = manifest["params"]
    if not modes.get(manifest["mode"]).sized_for_scale:
        return alpha, rslora
    sized, sized_rslora = params["alpha"], params["rslora"]
    fmt = formats.FORMATS.get(format)  # checked after this: an unknown format is refused then
    if fmt is not None and fmt.fixed_scale:  # its only scale is 1; --alpha and --rslora are refused for the format as ever
        if sized != (math.sqrt(params["rank"]) if sized_rslora else params["rank"]):
            raise CntinitError(f"{manifest['mode']}'s factors were sized for the LoRA scale of --alpha {sized:g}"
                               + (" --rslora" if sized_rslora else "") + f", and {fmt.client} loads its files at scale 1: export with "
                               f"--format kohya (which carries α), or solve again with --alpha {params['rank']} (scale 1)")
        return alpha, rslora
    if (alpha is not None and alpha != sized) or (rslora and not sized_rslora) or fixed_alpha:
        how = f"--alpha {sized:g}" + (" --rslora" if sized_rslora else "")
        given = "--fixed-alpha" if fixed_alpha else \
            f"--alpha {alpha if alpha is not None else params['rank']:g}" + (" --rslora" if rslora else "")
        raise CntinitError(f"{manifest['mode']}'s factors were sized for the LoRA scale of {how}, not {given}: export with {how} "
                           "(the default), or solve again with the α you train with (solve --alpha)")
    return sized, sized_rslora


SCALE_RANGE = SCALES_OF_ALPHA  # α/r: the folded factors stay well inside half precision's range


def _check_alpha(alpha: float | None, rank: int) -> None:
    if alpha is None:
        return
    if not math.isfinite(alpha) or alpha <= 0:
        raise CntinitError(f"--alpha must be a positive finite number, got {alpha}")
    low, high = SCALE_RANGE
    if not low <= alpha / rank <= high:
        raise CntinitError(f"--alpha {alpha:g} gives the scale α/r = {alpha / rank:.3g} at rank {rank}, outside [{low:g}, {high:g}] where "
                           f"the factors folded with it stay inside half precision: choose --alpha between {low * rank:g} and {high * rank:g}")


def _check_format(format: str, pipeline: bool, alpha, rslora: bool, dora: bool, fixed_alpha: bool, module_prefix: str,
                  task_type: str) -> Format:
    fmt = formats.get(format)
    if pipeline and not fmt.pipelines:
        raise CntinitError("this solve is of a diffusion pipeline: export it with --format diffusers or --format kohya")
    if not pipeline and fmt.pipelines:
        raise CntinitError(f"--format {format} is for diffusion pipelines (unet, text_encoder): use --format peft for this model")
    if module_prefix and not re.fullmatch(r"\w+(\.\w+)*\.?", module_prefix):
        raise CntinitError(f"--module-prefix {module_prefix!r} is not a module path: give attribute names joined by dots, e.g. "
                           "bert. (the path of the captured model inside the one training loads)")
    given = {"--rslora": rslora, "--dora": dora, "--module-prefix": bool(module_prefix), "--task-type": task_type != "auto"}
    unsupported = [option for option in fmt.lacks if given[option]]
    if fmt.fixed_scale:
        unsupported += [option for option, on in (("--alpha", alpha is not None), ("--fixed-alpha", fixed_alpha)) if on]
    if unsupported:
        why = f"{fmt.client} loads these files with α = r (scale 1) per module" if unsupported[0] in ("--alpha", "--fixed-alpha") \
            else f"the {format} format has no such field"
        raise CntinitError(f"{unsupported[0]} does not apply to --format {format}: {why}; leave it out")
    return fmt


def _check_variant(mode: modes.Mode, fmt: Format, dora: bool) -> None:
    """A mode PEFT trains as a LoRA variant of its own (MiCA: A under a frozen B; init_lora_weights says
    so); the pipeline formats carry no such flag."""
    if dora:
        raise CntinitError(f"--dora does not combine with --mode {mode.name}: PEFT's {mode.label} is a LoRA variant of its own (B frozen); "
                           "leave out --dora")
    if fmt.pipelines:
        warn(f"{mode.label} trains A only, under a frozen B, and the {fmt.name} format cannot say so: freeze the {fmt.b_name} "
             "weights in the trainer, or it trains both factors")
