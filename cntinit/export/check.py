"""`export --check`: load the written adapter in its real client — PEFT, or diffusers' load_lora_weights
for the pipeline formats — and compare every adapted module's output with (W + B@A) x computed
independently from the solve directory. A kohya file of a Flux or SD3 pipeline is read as sd-scripts
reads it (α/dim · up @ down on each original, fused layer): diffusers has no kohya-SD3 reader, and its
kohya-Flux reader assumes FLUX.1's widths and no T5 modules.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import console
from ..console import log
from ..errors import CntinitError
from ..models import loading, named_weights, pretrained
from ..models.pipelines import COMPONENTS
from ..solve import modes, quant
from ..solve.solution import Solution
from ..storage import store
from . import formats
from .formats import BASE_DIR, FORMAT, kohya_names

FUSED_LAYOUTS = ("flux", "sd3")  # kohya files of these are checked by check_kohya_layers
CHECK_TOLERANCE = 1e-4  # largest relative output difference `verify` accepts
CHECK_CHUNK_BYTES = 4 << 30  # adapted weights a check of a model read by name holds at a time (a PEFT load each)


def verify(out: str | Path, solve_dir: str | Path, model: str | Path | None = None, trust_remote_code: bool = False,
           shown: Path | None = None, source: pretrained.Streamed | None = None) -> float:
    """Load the export at `out` in its real client (PEFT, or diffusers for kohya/diffusers files),
    log how closely every adapted module computes the initial layer, and fail above CHECK_TOLERANCE
    (`shown`: the name to say, when `out` is the temporary directory an export is written in;
    `source`: the pretrained model the export read by name, for `check_peft`)."""
    exported = _exported(out)
    client = formats.get(exported["adapter_format"]).client
    layout = exported["model"].get("layout")  # the export records the solve's model
    if client == "PEFT":
        error = check_peft(out, solve_dir, model, trust_remote_code, source)
    elif exported["adapter_format"] == "kohya" and layout in FUSED_LAYOUTS:
        error, client = check_kohya_layers(out, solve_dir, model, trust_remote_code), "sd-scripts' arithmetic"
    else:
        error = check_pipeline(out, solve_dir, model, trust_remote_code)
    shown = shown or out
    if not math.isfinite(error):
        raise CntinitError(f"the adapter loaded from {shown} computes NaN or Inf: its files or its base hold non-finite values; "
                           "export again from an intact solve directory")
    if error > CHECK_TOLERANCE:
        raise CntinitError(f"the adapter loaded from {shown} differs from the initial layers by {error:.2e} (relative), above "
                           f"{CHECK_TOLERANCE:g}; see the warnings above")
    log(f"check: {client} {'reads' if client.startswith('sd-scripts') else 'loads'} {shown}; every adapted module computes the initial layer "
        f"(W + BA; for a residual init, the written base + BA) to {error:.1e} (relative)"
        + ("; bitsandbytes quantizes the base to the solve's NF4 codes and block maxima" if exported.get("quantized") else ""))
    return error


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
    sol = Solution(solve_dir)
    exported = _exported(out)
    if exported["module_prefix"]:
        raise CntinitError("the check loads the captured model class, which has no module prefix: export without --module-prefix to check")
    source = source or pretrained.open_recorded(sol.manifest, model, trust_remote_code)
    residual = bool(exported["residual_base"])
    import peft  # here: at the top, every command that imports the export stage paid for it and bitsandbytes (1.3 s of a solve)

    factors, nf4 = sol.factors(), sol.quantized_bases()
    bases = sol.dequantized_bases(source.dtype, nf4)
    worst = 0.0
    with console.progress() as bar:
        task = bar.add_task("check", total=len(factors))
        for names, base in _bases(source, Path(out) / BASE_DIR if residual else None, list(factors), trust_remote_code):
            if nf4:
                _requantizes(base, {name: nf4[name] for name in names if name in nf4})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations PEFT triggers, not ours to fix
                warnings.filterwarnings("ignore", ".*copying from a non-meta parameter")  # the modules of other chunks, left unread
                # a PEFT variant (MiCA): adapters made empty, or PEFT's init (mica_init) would run its SVD of every W before loading ours
                wrapped = peft.PeftModel.from_pretrained(base, str(out), low_cpu_mem_usage=modes.get(exported["mode"]).peft_variant is not None)
            chunk = {name: factors[name] for name in names}
            worst = max(worst, worst_error(dict(wrapped.base_model.model.named_modules()), source.layer, chunk, residual, bases))
            bar.advance(task, len(names))
    return worst


def _bases(source: pretrained.Streamed | pretrained.Loaded, written: Path | None, names: list[str], trust_remote_code: bool):
    """(module names, the base model holding their weights) for PEFT to load the adapter onto; the
    base is the `written` residual base, else the pretrained model. A loaded model gives one pair.
    A model read by name gives chunks of CHECK_CHUNK_BYTES: each a model built without weights in
    which only the chunk's modules are read (PEFT leaves the other modules' adapters on the meta device)."""
    if isinstance(source, pretrained.Loaded):
        yield names, loading.load(written, trust_remote_code)[0] if written else copy.deepcopy(source.net)
        return
    directory = written or source.path
    weights = named_weights.Weights(written, source.net) if written else source.weights  # the base: the checkpoint's files, config and dtype
    fix = "export again: the written base is damaged" if written else "save the model again with save_pretrained"
    for chunk in _chunks(names, source.modules):
        net = loading.load(directory, trust_remote_code, skeleton=True)[0]
        for name in chunk:
            tensors = [f"{name}.{tensor}" for tensor, _ in net.get_submodule(name).named_parameters()]
            named_weights.materialize(net, tensors, "", weights, source.dtype, torch.device("cpu"), source.dtype, "an adapted module", fix)
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


def worst_error(adapted: dict, reference, factors: dict, residual: bool, bases: dict | None = None) -> float:
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

    sol = Solution(solve_dir)
    exported = _exported(out)
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
    adapted = {f"{part}.{n}": m for part in COMPONENTS if getattr(pipe, part, None) is not None
               for n, m in getattr(pipe, part).named_modules()}
    factors = {name: pair for name, pair in sol.factors().items() if name not in exported.get("left_out", [])}
    return worst_error(adapted, reference.layer, factors, bool(exported["residual_base"]))


def check_kohya_layers(out: str | Path, solve_dir: str | Path, model: str | Path | None = None, trust_remote_code: bool = False) -> float:
    """Read a kohya file as sd-scripts does — each layer's update α/dim · up @ down, on the original
    model's (fused) layer — take each adapted module's rows of it, and return the largest relative
    difference between (W + those rows) x and (W + B@A) x; rows of a fused layer that belong to no
    adapted module must be zero, and every layer in the file must be one the solve adapts. (For a
    residual init sd-scripts' base is W minus that same update, so the initial layer is W whatever
    the file holds: what is checked is that the file's update is B@A.)"""
    sol = Solution(solve_dir)
    exported = _exported(out)
    layout = sol.manifest["model"]["layout"]
    file = load_file(Path(out) / exported["adapter_file"])
    updates = {key.removesuffix(".lora_down.weight"): None for key in file if key.endswith(".lora_down.weight")}
    for layer in updates:
        down, up = file[f"{layer}.lora_down.weight"].double(), file[f"{layer}.lora_up.weight"].double()
        updates[layer] = float(file[f"{layer}.alpha"]) / down.shape[0] * up @ down
    reference = pretrained.open_recorded(sol.manifest, model, trust_remote_code)
    factors = {name: pair for name, pair in sol.factors().items() if name not in exported.get("left_out", [])}
    adapted, claimed = {}, {}
    for name, (b, a) in factors.items():
        layer, part, swapped = kohya_names.parsed(kohya_names.kohya_name(name, layout))
        if layer not in updates:
            raise CntinitError(f"{Path(out) / exported['adapter_file']} lacks {layer}, the layer of {name}: export again")
        rows = kohya_names.fused_rows(layer, a.shape[1]) if part is not None else [updates[layer].shape[0]]
        start = sum(rows[:part or 0])
        claimed.setdefault(layer, []).append(range(start, start + rows[part or 0]))
        w, bias = reference.layer(name)
        update = updates[layer][start:start + rows[part or 0]]
        update = kohya_names.swap_halves(update, a.shape[1]) if swapped else update
        initial = w.double() + update
        adapted[name] = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=torch.float64)
        adapted[name].weight.data, adapted[name].bias = initial, None if bias is None else torch.nn.Parameter(bias.double())
    for layer, update in updates.items():
        kept = torch.zeros(update.shape[0], dtype=torch.bool)
        for rows in claimed.get(layer, []):
            kept[rows.start:rows.stop] = True
        if not kept.any() or bool((update[~kept] != 0).any()):
            raise CntinitError(f"{layer} in {Path(out) / exported['adapter_file']} changes rows that no adapted module owns: export again")
    return worst_error(adapted, reference.layer, factors, residual=False)


def _exported(out: str | Path) -> dict:
    """The manifest of the export at `out`, or the error saying it is not one."""
    manifest = store.read_manifest(out, FORMAT)
    if manifest is None:
        raise CntinitError(f"{out} is {store.what_it_is(Path(out))}, not an export cntinit wrote: give the directory `cntinit export` wrote")
    return manifest
