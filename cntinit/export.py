"""`cntinit export`: turn a solve directory into adapter files that real trainers load.

The LoRA scale s is folded into the factors (B/√s, A/√s) so the adapter adds exactly B @ A
whatever α, rank pattern or rsLoRA — except where B = 0 (lora, eva): the update is zero anyway
and A keeps the scale its method gave it. Formats (METHODS.md "Export formats"):
- `peft`: adapter_model.safetensors + adapter_config.json (rank/alpha patterns), any transformers model;
- `kohya`: one safetensors in sd-scripts' layout (`lora_unet_…`/`lora_te_…`, `.lora_down`/`.lora_up`,
  a per-module `.alpha`), for diffusion pipelines;
- `diffusers`: pytorch_lora_weights.safetensors with `unet.`/`text_encoder.` keys, which
  `pipe.load_lora_weights` reads with α = r (scale 1) per module, as diffusers does without alphas.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file

from . import console, layerwise, models, modes, named_weights, pipelines, pretrained, quant, solution, store
from .atomic import atomic_directory
from .console import log, warn
from .errors import CntinitError, not_one_of

FORMAT = "cntinit.export"
FORMAT_VERSION = 1
FORMATS = ("peft", "kohya", "diffusers")
PIPELINE_FORMATS = ("kohya", "diffusers")
BASE_DIR = "base"
ADAPTER_FILE = "adapter_model.safetensors"
KOHYA_FILE = "lora.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te_"}
KOHYA_SDXL_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}
SDXL_LAYERS = 3  # sd-scripts' SDXL UNet numbers its blocks in steps of layers_per_block + 1 = 3
CHECK_TOLERANCE = 1e-4  # largest relative output difference `verify` accepts
CHECK_CHUNK_BYTES = 4 << 30  # adapted weights a check of a model read by name holds at a time (a PEFT load each)


def export(solve_dir: str | Path, out: str | Path, *, format: str = "peft", alpha: float | None = None,
           rslora: bool = False, dora: bool = False, fixed_alpha: bool = False, module_prefix: str = "",
           task_type: str = "auto", train_dtype: str = "auto", unet_only: bool = False, model: str | Path | None = None,
           overwrite: bool = False, trust_remote_code: bool = False, check: bool = False) -> Path:
    """Write the adapter of the solve at `solve_dir` to `out` (and the residual base when the init needs one).
    With `check`, the export is loaded in its real client and verified (`verify`) before it replaces
    what `out` held, and the manifest records the largest error."""
    options = {"format": format, "alpha": alpha, "rslora": rslora, "dora": dora, "fixed_alpha": fixed_alpha, "module_prefix": module_prefix,
               "task_type": task_type, "train_dtype": train_dtype} | ({"unet_only": True} if unet_only else {})
    if train_dtype != "auto" and train_dtype not in models.DTYPES:
        raise not_one_of("--train-dtype", train_dtype, ("auto", *models.DTYPES))
    sol = solution.Solution(solve_dir)
    manifest = sol.manifest
    alpha, rslora = _sized_for(manifest, alpha, rslora, fixed_alpha, format)
    _check_alpha(alpha, manifest["params"]["rank"])
    if not sol.modules:
        raise CntinitError(f"{solve_dir} gives every module rank 0: solve with a larger --budget or --min-rank 1")
    pipeline = manifest["model"].get("class") == pipelines.DiffusionParts.__name__
    sdxl = manifest["model"].get("layout") == pipelines.SDXL
    _check_format(format, pipeline, alpha, rslora, dora, fixed_alpha, module_prefix, task_type)
    if manifest["mode"] == "mica":
        _check_mica(format, dora)
    quantized = manifest["params"].get("quantize") is not None
    if quantized and format != "peft":
        raise CntinitError(f"this solve's base is 4-bit NF4 for a QLoRA trainer (bitsandbytes, transformers models); --format {format} "
                           "carries no base: export --format peft")
    prefix = module_prefix.strip(".") + "." if module_prefix.strip(".") else ""
    peft_task = _task_type(task_type, manifest["model"], prefix) if format == "peft" else None
    store.check_out(out, manifest["model"]["fingerprint"], overwrite, FORMAT, "an export")
    residual = manifest["init"] == "residual"
    left_out = _unet_only(sol, format, residual) if unet_only else []
    writes_base = residual and format != "kohya"  # kohya merges the residual itself (--base_weights, multiplier −1)
    base_rank = manifest["params"]["rank"]
    alpha = float(alpha if alpha is not None else base_rank)
    source = pretrained.open_recorded(manifest, model, trust_remote_code) if (dora or writes_base) else None
    factors = {name: pair for name, pair in sol.factors().items() if name not in left_out}
    bases = _dequantized(sol, source.dtype) if quantized else {}

    # BA = 0 for any scale: the factors are written as drawn (their scale is the method's; MiCA's B stays orthonormal)
    zero_update = manifest["mode"] in modes.ZERO_UPDATE
    tensors, ranks, alphas = {}, {}, {}
    for name, (b, a) in factors.items():
        rank = manifest["modules"][name]["rank"]
        if format == "diffusers":
            module_alpha = float(rank)  # diffusers' convention without alphas: scale 1 per module
        else:
            module_alpha = alpha if fixed_alpha else alpha * (math.sqrt(rank / base_rank) if rslora else rank / base_rank)
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        fold = 1.0 if zero_update else math.sqrt(scale)
        a, b = (a / fold).contiguous(), (b / fold).contiguous()
        if format == "kohya":
            key = _kohya_name(name, sdxl)
            tensors |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(module_alpha)}
        else:
            key = name if format == "diffusers" else f"base_model.model.{prefix}{name}"
            tensors |= {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
        if dora:
            w = models.weight_values(source.modules[name]).to(torch.float64)
            combined = bases[name].double() + b.double() @ a.double() * scale if quantized else w if residual else \
                w + b.double() @ a.double() * scale
            tensors[f"{key}.lora_magnitude_vector"] = combined.norm(dim=1).to(torch.float32)
        ranks[prefix + name], alphas[prefix + name] = rank, module_alpha

    with atomic_directory(out) as tmp:
        if format == "peft":
            config = _peft_config(ranks, alphas, base_rank, alpha, rslora, dora, sol,
                                  str((Path(out) / BASE_DIR).absolute()) if residual else manifest["model"]["path"], peft_task)
            if residual and (dora or (rslora and config.rank_pattern)):
                warn("after training, PEFT's path_initial_model_for_weight_conversion " + (
                    "ignores DoRA magnitudes, so converting this adapter to a plain LoRA gives wrong weights" if dora
                    else "refuses rsLoRA with variable ranks") + ": keep training on the shipped residual base")
            save_file(tensors, tmp / ADAPTER_FILE, metadata={"format": "pt"})
            config.save_pretrained(tmp)
        elif format == "kohya":
            save_file(tensors, tmp / KOHYA_FILE, metadata=_kohya_metadata(ranks, alphas, manifest))
        else:
            save_file(tensors, tmp / DIFFUSERS_FILE, metadata={"format": "pt"})
        if writes_base:
            precision = pretrained.Precision(source.dtype if train_dtype == "auto" else models.DTYPES[train_dtype])
            source.write_base(tmp / BASE_DIR, factors, {name: sol.modules[name]["fan_in_fan_out"] for name in factors}, bases, precision)
            precision.report()
        record = {
            **store.header(FORMAT, FORMAT_VERSION),
            "adapter_format": format,
            "adapter_file": {"peft": ADAPTER_FILE, "kohya": KOHYA_FILE, "diffusers": DIFFUSERS_FILE}[format],
            "init": manifest["init"],
            "mode": manifest["mode"],
            "solve": {"path": str(Path(solve_dir).absolute()), "manifest_sha256": store.sha256_file(Path(solve_dir) / store.MANIFEST)},
            "model": manifest["model"],
            "alpha": alpha, "rslora": rslora, "dora": dora, "fixed_alpha": fixed_alpha, "module_prefix": prefix,
            "options": options,
            "residual_base": BASE_DIR if writes_base else None,
            "quantized": manifest["params"].get("quantize"),
            "left_out": left_out,
        }
        (tmp / store.MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        if check:  # before the swap: a failed check leaves what `out` held
            unchanged = source if isinstance(source, pretrained.Streamed) else None  # a loaded model holds the written base now
            record["check"] = {"max_relative_error": verify(tmp, solve_dir, model, trust_remote_code, shown=Path(out), source=unchanged)}
            (tmp / store.MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    if left_out:
        log(f"left out the {len(left_out)} text-encoder modules (--unet-only): the text encoder stays as it is")
    how = (f"load {Path(out) / BASE_DIR} in 4-bit — BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4') — as the base "
           "model; it quantizes to exactly the NF4 base the adapter was fitted to") if quantized else _how_to_load(format, residual, Path(out))
    if unet_only and format == "kohya":
        how = how.replace("--dim_from_weights", "--dim_from_weights --network_train_unet_only", 1)
    log(f"wrote a {format} adapter for {len(ranks)} modules to {out} ({manifest['init']} init: {how})")
    return Path(out)


def _unet_only(sol: solution.Solution, format: str, residual: bool) -> list[str]:
    """The text-encoder modules a UNet-only export leaves out. A residual init cannot leave them out:
    its base (written, or kohya's --base_weights −1) holds W − BA there, which without the adapter
    starts the text encoder off the pretrained one."""
    if format not in PIPELINE_FORMATS:
        raise CntinitError("--unet-only is for diffusion pipelines (--format kohya or diffusers), whose text encoder may stay frozen")
    encoder = [name for name in sol.modules if not name.startswith("unet.")]
    if encoder and residual:
        raise CntinitError(f"--unet-only: this residual solve adapts {len(encoder)} text-encoder modules, whose base W − BA would then "
                           "train without its adapter (as with sd-scripts' --network_train_unet_only): solve the UNet alone "
                           "(--targets 're:unet\\..*'), or use --init offset")
    if len(encoder) == len(sol.modules):
        raise CntinitError("--unet-only: this solve adapts no UNet module: solve with UNet targets")
    return encoder


def _sized_for(manifest: dict, alpha: float | None, rslora: bool, fixed_alpha: bool, format: str) -> tuple[float | None, bool]:
    """(α, rsLoRA) to export with: for a gradient mode, the ones its factors were sized for (its B and A
    are the method's own only at that LoRA scale); a different --alpha, --rslora or --fixed-alpha is refused."""
    params = manifest["params"]
    if manifest["mode"] not in modes.GRADIENT_MODES:
        return alpha, rslora
    sized, sized_rslora = params["alpha"], params["rslora"]
    if format == "diffusers":  # its only scale is 1; --alpha and --rslora are refused for the format as ever
        if sized != (math.sqrt(params["rank"]) if sized_rslora else params["rank"]):
            raise CntinitError(f"{manifest['mode']}'s factors were sized for the LoRA scale of --alpha {sized:g}"
                               + (" --rslora" if sized_rslora else "") + ", and diffusers loads its files at scale 1: export with "
                               f"--format kohya (which carries α), or solve again with --alpha {params['rank']} (scale 1)")
        return alpha, rslora
    if (alpha is not None and alpha != sized) or (rslora and not sized_rslora) or fixed_alpha:
        how = f"--alpha {sized:g}" + (" --rslora" if sized_rslora else "")
        given = "--fixed-alpha" if fixed_alpha else \
            f"--alpha {alpha if alpha is not None else params['rank']:g}" + (" --rslora" if rslora else "")
        raise CntinitError(f"{manifest['mode']}'s factors were sized for the LoRA scale of {how}, not {given}: export with {how} "
                           "(the default), or solve again with the α you train with (solve --alpha)")
    return sized, sized_rslora


SCALE_RANGE = (1e-4, 1e4)  # α/r: the folded factors stay well inside half precision's range


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
                  task_type: str) -> None:
    if format not in FORMATS:
        raise not_one_of("--format", format, FORMATS)
    if pipeline and format == "peft":
        raise CntinitError("this solve is of a diffusion pipeline: export it with --format diffusers or --format kohya")
    if not pipeline and format in PIPELINE_FORMATS:
        raise CntinitError(f"--format {format} is for diffusion pipelines (unet, text_encoder): use --format peft for this model")
    if module_prefix and not re.fullmatch(r"\w+(\.\w+)*\.?", module_prefix):
        raise CntinitError(f"--module-prefix {module_prefix!r} is not a module path: give attribute names joined by dots, e.g. "
                           "bert. (the path of the captured model inside the one training loads)")
    if format in PIPELINE_FORMATS:
        unsupported = [o for o, on in (("--rslora", rslora), ("--dora", dora), ("--module-prefix", bool(module_prefix)),
                                       ("--task-type", task_type != "auto")) if on]
        if format == "diffusers":
            unsupported += [o for o, on in (("--alpha", alpha is not None), ("--fixed-alpha", fixed_alpha)) if on]
        if unsupported:
            why = "diffusers loads these files with α = r (scale 1) per module" if unsupported[0] in ("--alpha", "--fixed-alpha") \
                else f"the {format} format has no such field"
            raise CntinitError(f"{unsupported[0]} does not apply to --format {format}: {why}; leave it out")


def _check_mica(format: str, dora: bool) -> None:
    """MiCA trains A under a frozen B: PEFT's own variant (init_lora_weights "mica") freezes it; the
    pipeline formats carry no such flag."""
    if dora:
        raise CntinitError("--dora does not combine with --mode mica: PEFT's MiCA is a LoRA variant of its own (B frozen); leave out --dora")
    if format != "peft":
        warn(f"MiCA trains A only, under a frozen B, and the {format} format cannot say so: freeze the lora_"
             f"{'up' if format == 'kohya' else 'B'} weights in the trainer, or it trains both factors")


TASK_TYPE_NAMES = tuple(dict.fromkeys([*models.TASK_TYPES.values(), "FEATURE_EXTRACTION"]))


def _task_type(requested: str, model: dict, prefix: str) -> str | None:
    """PEFT's task_type for adapter_config.json: `auto` reads it from the captured model class
    (axolotl's LoRA kernels refuse a plain PeftModel); None where the class does not say — a
    vision encoder, a VLM's `…ForConditionalGeneration`, or a `--module-prefix` export, whose
    training class is not the captured one — unless given."""
    if requested == "none":
        return None
    if requested != "auto":
        if requested not in TASK_TYPE_NAMES:
            raise not_one_of("--task-type", requested, ("auto", "none", *TASK_TYPE_NAMES))
        return requested
    if prefix or model.get("kind") != "text":
        return None
    name = model["class"]
    found = models.task_type(name)
    return found or ("FEATURE_EXTRACTION" if name.endswith("Model") else None)


def _peft_config(ranks: dict, alphas: dict, base_rank: int, alpha: float, rslora: bool, dora: bool, sol, base_path: str,
                 task_type: str | None):
    return peft.LoraConfig(
        task_type=task_type,
        r=base_rank,
        lora_alpha=alpha,
        target_modules=list(ranks),
        rank_pattern={_anchored(n): r for n, r in ranks.items() if r != base_rank},
        alpha_pattern={_anchored(n): a for n, a in alphas.items() if a != alpha},
        use_rslora=rslora,
        use_dora=dora,
        init_lora_weights="mica" if sol.manifest["mode"] == "mica" else True,  # PEFT's MiCA variant freezes B
        fan_in_fan_out=any(sol.modules[n]["fan_in_fan_out"] for n in sol.modules),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_path,
    )


def _kohya_name(name: str, sdxl: bool = False) -> str:
    """`unet.down_blocks.0.attentions.0.….to_q` → `lora_unet_down_blocks_0_attentions_0_…_to_q` (sd-scripts' naming).

    sd-scripts names text-encoder modules as transformers 4's CLIP text models nest them, under
    `text_model.`; transformers 5 dropped that level from CLIPTextModel, so it is put back. For
    SDXL the encoders are `lora_te1_`/`lora_te2_` and the UNet is sd-scripts' own SDXL UNet,
    named as the original (LDM) checkpoint is: `input_blocks.N.1.…`, `middle_block.1.…`,
    `output_blocks.N.1.…` for the diffusers `down_blocks.i.attentions.j.…` and the rest."""
    prefixes = KOHYA_SDXL_PREFIXES if sdxl else KOHYA_PREFIXES
    component = next(p for p in prefixes if name.startswith(p))  # "text_encoder_2." does not start with "text_encoder."
    path = name.removeprefix(component)
    if component.startswith("text_encoder") and not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path
    if sdxl and component == "unet.":
        path = _sdxl_unet_path(path)
    return prefixes[component] + path.replace(".", "_")


def _sdxl_unet_path(path: str) -> str:
    """A diffusers SDXL UNet module path as sd-scripts' SDXL UNet names it (its transformer blocks
    only: those are what sd-scripts' LoRA adapts, and inside them the names agree)."""
    parts = path.split(".")
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        return ".".join(["input_blocks", str(1 + int(parts[1]) * SDXL_LAYERS + int(parts[3])), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", str(1 + 2 * int(parts[2])), *parts[3:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        return ".".join(["output_blocks", str(int(parts[1]) * SDXL_LAYERS + int(parts[3])), "1", *parts[4:]])
    raise CntinitError(f"unet.{path} lies outside the SDXL UNet's transformer blocks, the only UNet modules sd-scripts' SDXL LoRA "
                       "adapts: solve with attention targets (to_q,to_k,to_v,to_out.0), or export --format diffusers")


def _kohya_metadata(ranks: dict, alphas: dict, manifest: dict) -> dict[str, str]:
    """sd-scripts' training metadata: dim and alpha, "Dynamic" when they vary across modules."""
    def one_or_dynamic(values):
        return str(next(iter(values))) if len(set(values)) == 1 else "Dynamic"

    return {"ss_network_module": "networks.lora", "ss_network_dim": one_or_dynamic(ranks.values()),
            "ss_network_alpha": one_or_dynamic(alphas.values()), "cntinit_mode": manifest["mode"], "cntinit_init": manifest["init"]}


def _how_to_load(format: str, residual: bool, out: Path) -> str:
    if format == "kohya":
        file = out / KOHYA_FILE
        # without --dim_from_weights sd-scripts builds the network from --network_dim/--network_alpha and ignores the file's alphas
        network = f"--network_module networks.lora --network_weights {file} --dim_from_weights"
        return (f"train with {network} --base_weights {file} --base_weights_multiplier -1, which makes the base W − B@A so the "
                "initial model equals the pretrained one (for --network_train_unet_only, which would keep the text encoder's W − B@A "
                "without its adapter, solve the UNet alone: --targets 're:unet\\..*'; not with --scale_weight_norms, which "
                "rescales the init)" if residual
                else f"train with {network} (not --scale_weight_norms, which rescales the init); the base model stays as it is "
                "and the initial model is W + B@A")
    if residual:
        return f"load {out / BASE_DIR} as the base model; it is the pretrained model minus B@A"
    return "the base model stays as it is; the initial model is W + B@A"


def _anchored(name: str) -> str:
    """A PEFT rank/alpha pattern key that matches exactly this module path and nothing else."""
    return "^" + re.escape(name)


def _dequantized(sol: solution.Solution, dtype: torch.dtype, bases: dict[str, quant.Quantized] | None = None) -> dict[str, torch.Tensor]:
    """module -> the dequantized NF4 base (out × in, in the weights' `dtype`) the solve fitted to
    (`bases`: the solve's, when already read)."""
    values = {}
    for name, base in (bases if bases is not None else sol.quantized_bases()).items():
        matrix = quant.dequantize(base).to(dtype)
        values[name] = matrix.T if sol.manifest["modules"][name]["fan_in_fan_out"] else matrix
    return values


def check_peft(out: str | Path, solve_dir: str | Path, model: str | Path | None = None, trust_remote_code: bool = False,
               source: pretrained.Streamed | None = None) -> float:
    """Load the export at `out` with PEFT and return the largest relative difference, over every
    adapted module, between its output and (W + B@A) x computed from the solve directory.

    For a residual export the base is the written residual model and the reference is the
    pretrained W x (the initial model equals the pretrained one). A model solve and export read by
    name is checked CHECK_CHUNK_BYTES of adapted weights at a time, so a 70B takes the memory of
    a chunk, not of the model (`_bases`). `source`: that model as export opened and verified it,
    so that its weights are not all read and fingerprinted again.
    """
    sol = solution.Solution(solve_dir)
    exported = json.loads((Path(out) / store.MANIFEST).read_text())
    if exported["module_prefix"]:
        raise CntinitError("the check loads the captured model class, which has no module prefix: export without --module-prefix to check")
    source = source or pretrained.open_recorded(sol.manifest, model, trust_remote_code)
    residual = bool(exported["residual_base"])
    factors, nf4 = sol.factors(), sol.quantized_bases()
    bases = _dequantized(sol, source.dtype, nf4)
    worst = 0.0
    with console.progress() as bar:
        task = bar.add_task("check", total=len(factors))
        for names, base in _bases(source, Path(out) / BASE_DIR if residual else None, list(factors), trust_remote_code):
            if nf4:
                _requantizes(base, {name: nf4[name] for name in names if name in nf4})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations PEFT triggers, not ours to fix
                warnings.filterwarnings("ignore", ".*copying from a non-meta parameter")  # the modules of other chunks, left unread
                # MiCA: adapters made empty, or PEFT's mica_init would run its SVD of every W before loading ours
                wrapped = peft.PeftModel.from_pretrained(base, str(out), low_cpu_mem_usage=exported["mode"] == "mica")
            chunk = {name: factors[name] for name in names}
            worst = max(worst, _worst_error(dict(wrapped.base_model.model.named_modules()), source.layer, chunk, residual, bases))
            bar.advance(task, len(names))
    return worst


def _bases(source: pretrained.Streamed | pretrained.Loaded, written: Path | None, names: list[str], trust_remote_code: bool):
    """(module names, the base model holding their weights) for PEFT to load the adapter onto; the
    base is the `written` residual base, else the pretrained model. A loaded model gives one pair.
    A model read by name gives chunks of CHECK_CHUNK_BYTES: each a model built without weights in
    which only the chunk's modules are read (PEFT leaves the other modules' adapters on the meta device)."""
    if isinstance(source, pretrained.Loaded):
        yield names, models.load(written, trust_remote_code)[0] if written else copy.deepcopy(source.net)
        return
    directory = written or source.path
    weights = named_weights.Weights(written, source.net) if written else source.weights  # the base: the checkpoint's files, config and dtype
    fix = "export again: the written base is damaged" if written else "save the model again with save_pretrained"
    for chunk in _chunks(names, source.modules):
        net = models.load(directory, trust_remote_code, empty=True)[0]
        for name in chunk:
            tensors = [f"{name}.{tensor}" for tensor, _ in net.get_submodule(name).named_parameters()]
            layerwise.materialize(net, tensors, "", weights, source.dtype, torch.device("cpu"), source.dtype, "an adapted module", fix)
        yield chunk, net


def _chunks(names: list[str], modules: dict[str, torch.nn.Module]) -> list[list[str]]:
    """`names` in runs whose weights (as `modules` hold them) add up to CHECK_CHUNK_BYTES at most, or one module."""
    chunks, size = [], 0
    for name in names:
        nbytes = modules[name].weight.nbytes
        if not chunks or size + nbytes > CHECK_CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += nbytes
    return chunks


def _requantizes(written: torch.nn.Module, bases: dict[str, quant.Quantized]) -> None:
    """bitsandbytes — the quantizer of a 4-bit trainer — turns the written base back into the solve's
    NF4 codes and block maxima, bit for bit."""
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        raise CntinitError("checking a 4-bit base quantizes it again with bitsandbytes, the trainer's quantizer: "
                           "pip install 'cntinit[quant]' (or export without --check)") from None
    for name, base in bases.items():
        packed, state = bnb.quantize_4bit(written.get_submodule(name).weight.detach(), blocksize=quant.BLOCKSIZE, quant_type="nf4",
                                          compress_statistics=False)
        if not (torch.equal(packed.reshape(-1), quant.pack(base.codes)) and torch.equal(state.absmax, base.absmax)):
            raise CntinitError(f"bitsandbytes quantizes the written base of {name} to other NF4 codes than the solve fitted to: "
                               "export again from an intact solve directory")


def _worst_error(adapted: dict, reference, factors: dict, residual: bool, bases: dict | None = None) -> float:
    """Largest relative difference, over the adapted modules, between a loaded module's output and
    (W + B@A) x, W and the bias from `reference(name)` — for a residual export, (W − B@A rounded to
    the base's dtype) x + B@A x, the initial model those files can hold; for a quantized one
    (Q + B@A) x with Q the NF4 base (`bases`) — on random inputs. The loaded module computes in
    float64, so the check measures the files, not the arithmetic: in bfloat16 its own rounding is
    1e-3 whatever the files hold, and even float32 loses ε·‖terms‖/‖output‖ where a residual base
    and B@A nearly cancel (4e-4 for a cnt-x whose B@A is 2,000× W, on files exact to 6e-13). Each
    measured module is dropped (to the meta device): the loaded model is not used after the check,
    and its modules in float64 would pile up."""
    bases = bases or {}
    worst = 0.0
    with torch.no_grad():
        for name, (b, a) in factors.items():
            module = adapted[name]
            stored = getattr(module, "base_layer", module).weight.dtype
            w, bias = reference(name)
            w, bias = w.double(), bias.double() if bias is not None else 0.0
            update = b.double() @ a.double()
            x = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()  # whatever the chunks
            initial = bases[name].double() + update if name in bases else (w - update).to(stored).double() + update if residual \
                else w + update
            want = x.double() @ initial.T + bias
            got = module.double()(x.double())
            module.to("meta")
            error = float((got - want).norm() / want.norm().clamp(min=1e-30))
            if not math.isfinite(error):  # max() would drop a NaN
                return math.inf
            worst = max(worst, error)
    return worst


def check_pipeline(out: str | Path, solve_dir: str | Path, model: str | Path | None = None, trust_remote_code: bool = False) -> float:
    """Load the pipeline (the written residual base where there is one) with diffusers, load the
    kohya or diffusers file with `pipe.load_lora_weights`, and return the largest relative
    difference between an adapted module's output and (W + B@A) x (W x for a residual base)."""
    import diffusers

    sol = solution.Solution(solve_dir)
    exported = json.loads((Path(out) / store.MANIFEST).read_text())
    ranks = {e["rank"] for e in sol.modules.values()}
    if exported["adapter_format"] == "kohya" and len(ranks) > 1 and not exported["fixed_alpha"]:
        raise CntinitError("diffusers (0.42) ignores the per-module alphas of a kohya file, so it cannot check one with variable "
                           "ranks; sd-scripts reads them: export with --fixed-alpha to check it with diffusers")
    reference = pretrained.open_recorded(sol.manifest, model, trust_remote_code)  # a pipeline: loaded
    base = Path(out) / BASE_DIR if exported["residual_base"] else Path(model or sol.manifest["model"]["path"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations and "no safety checker" notices, not ours to fix
        pipe = diffusers.DiffusionPipeline.from_pretrained(base, safety_checker=None)
        pipe.load_lora_weights(str(out), weight_name=exported["adapter_file"])
    adapted = {f"{part}.{n}": m for part in pipelines.COMPONENTS if getattr(pipe, part, None) is not None
               for n, m in getattr(pipe, part).named_modules()}
    factors = {name: pair for name, pair in sol.factors().items() if name not in exported.get("left_out", [])}
    return _worst_error(adapted, reference.layer, factors, bool(exported["residual_base"]))


def verify(out: str | Path, solve_dir: str | Path, model: str | Path | None = None, trust_remote_code: bool = False,
           shown: Path | None = None, source: pretrained.Streamed | None = None) -> float:
    """Load the export at `out` in its real client (PEFT, or diffusers for kohya/diffusers files),
    log how closely every adapted module computes the initial layer, and fail above CHECK_TOLERANCE
    (`shown`: the name to say, when `out` is the temporary directory an export is written in;
    `source`: the pretrained model the export read by name, for `check_peft`)."""
    exported = json.loads((Path(out) / store.MANIFEST).read_text())
    peft_format = exported["adapter_format"] == "peft"
    error = check_peft(out, solve_dir, model, trust_remote_code, source) if peft_format else \
        check_pipeline(out, solve_dir, model, trust_remote_code)
    shown = shown or out
    if not math.isfinite(error):
        raise CntinitError(f"the adapter loaded from {shown} computes NaN or Inf: its files or its base hold non-finite values; "
                           "export again from an intact solve directory")
    if error > CHECK_TOLERANCE:
        raise CntinitError(f"the adapter loaded from {shown} differs from the initial layers by {error:.2e} (relative), above "
                           f"{CHECK_TOLERANCE:g}; see the warnings above")
    log(f"check: {'PEFT' if peft_format else 'diffusers'} loads {shown}; every adapted module computes the initial layer "
        f"(W + BA; for a residual init, the written base + BA) to {error:.1e} (relative)"
        + ("; bitsandbytes quantizes the base to the solve's NF4 codes and block maxima" if exported.get("quantized") else ""))
    return error
