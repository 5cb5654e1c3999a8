"""`cntinit export`: turn a solve directory into adapter files that real trainers load.

PEFT format (METHODS.md "Export formats"): the LoRA scale s is folded into the factors
(B/√s, A/√s) so the adapter adds exactly B @ A whatever α, rank pattern or rsLoRA — except
where B = 0 (lora, eva): the update is zero anyway and A keeps the scale its method gave it.
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

from . import models, modes, solution, store
from .atomic import atomic_directory
from .console import log, warn
from .errors import CntinitError

FORMAT = "cntinit.export"
FORMAT_VERSION = 1
FORMATS = ("peft",)
BASE_DIR = "base"
ADAPTER_FILE = "adapter_model.safetensors"
RESIDUAL_PRECISION = 1e-4  # warn when ‖BA‖/‖W‖ × eps(dtype) exceeds this: the base keeps too little of W


def export(solve_dir: str | Path, out: str | Path, *, format: str = "peft", alpha: float | None = None,
           rslora: bool = False, dora: bool = False, fixed_alpha: bool = False, module_prefix: str = "",
           model: str | Path | None = None, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Write the adapter of the solve at `solve_dir` to `out` (and the residual base when the init needs one)."""
    if format not in FORMATS:
        raise CntinitError(f"--format {format} is not one of {', '.join(FORMATS)}")
    if alpha is not None and alpha <= 0:
        raise CntinitError(f"--alpha must be positive, got {alpha}")
    sol = solution.Solution(solve_dir)
    manifest = sol.manifest
    if not sol.modules:
        raise CntinitError(f"{solve_dir} gives every module rank 0: solve with a larger --budget or --min-rank 1")
    prefix = module_prefix.strip(".") + "." if module_prefix.strip(".") else ""
    store.check_out(out, manifest["model"]["fingerprint"], overwrite, FORMAT, "an export")
    residual = manifest["init"] == "residual"
    base_rank = manifest["params"]["rank"]
    alpha = float(alpha if alpha is not None else base_rank)
    net, tokenizer = _load_solved_model(manifest, model, trust_remote_code) if (dora or residual) else (None, None)
    weights = dict(net.named_modules()) if net is not None else {}
    factors = sol.factors()

    zero_b = manifest["mode"] in modes.ZERO_B  # BA = 0 for any scale: A is written as drawn (its scale is the method's)
    tensors, ranks, alphas = {}, {}, {}
    for name, (b, a) in factors.items():
        rank = manifest["modules"][name]["rank"]
        module_alpha = alpha if fixed_alpha else alpha * (math.sqrt(rank / base_rank) if rslora else rank / base_rank)
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        fold = 1.0 if zero_b else math.sqrt(scale)
        key = f"base_model.model.{prefix}{name}"
        tensors[f"{key}.lora_A.weight"] = (a / fold).contiguous()
        tensors[f"{key}.lora_B.weight"] = (b / fold).contiguous()
        if dora:
            w = models.weight_matrix(weights[name]).detach().to(torch.float64)
            combined = w if residual else w + b.double() @ a.double()
            tensors[f"{key}.lora_magnitude_vector"] = combined.norm(dim=1).to(torch.float32)
        ranks[prefix + name], alphas[prefix + name] = rank, module_alpha

    targets = list(ranks)
    config = peft.LoraConfig(
        r=base_rank,
        lora_alpha=alpha,
        target_modules=targets,
        rank_pattern={_anchored(n): r for n, r in ranks.items() if r != base_rank},
        alpha_pattern={_anchored(n): a for n, a in alphas.items() if a != alpha},
        use_rslora=rslora,
        use_dora=dora,
        init_lora_weights=True,
        fan_in_fan_out=any(sol.modules[n]["fan_in_fan_out"] for n in sol.modules),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=str((Path(out) / BASE_DIR).absolute()) if residual else manifest["model"]["path"],
    )
    if residual and (dora or (rslora and config.rank_pattern)):
        warn("after training, PEFT's path_initial_model_for_weight_conversion " + (
            "ignores DoRA magnitudes, so converting this adapter to a plain LoRA gives wrong weights" if dora
            else "refuses rsLoRA with variable ranks") + ": keep training on the shipped residual base")
    with atomic_directory(out) as tmp:
        save_file(tensors, tmp / ADAPTER_FILE, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if residual:
            _write_residual_base(net, tokenizer, factors, sol.modules, tmp / BASE_DIR)
        (tmp / store.MANIFEST).write_text(json.dumps({
            **store.header(FORMAT, FORMAT_VERSION),
            "adapter_format": format,
            "init": manifest["init"],
            "mode": manifest["mode"],
            "solve": {"path": str(Path(solve_dir).absolute()), "manifest_sha256": store.sha256_file(Path(solve_dir) / store.MANIFEST)},
            "model": manifest["model"],
            "alpha": alpha, "rslora": rslora, "dora": dora, "fixed_alpha": fixed_alpha, "module_prefix": prefix,
            "residual_base": BASE_DIR if residual else None,
        }, indent=2) + "\n")
    log(f"wrote a PEFT adapter for {len(targets)} modules to {out} ({manifest['init']} init: "
        + (f"load {Path(out) / BASE_DIR} as the base model; it is the pretrained model minus B@A)" if residual
           else "the base model stays as it is; the initial model is W + B@A)"))
    return Path(out)


def _anchored(name: str) -> str:
    """A PEFT rank/alpha pattern key that matches exactly this module path and nothing else."""
    return "^" + re.escape(name)


def _load_solved_model(manifest: dict, model: str | Path | None, trust_remote_code: bool):
    """(model, tokenizer) the solve used, refusing other weights."""
    path = Path(model) if model is not None else Path(manifest["model"]["path"])
    net, tokenizer, _ = models.load_matching(path, list(manifest["modules"]), manifest["model"]["fingerprint"], trust_remote_code)
    return net, tokenizer


def _write_residual_base(net, tokenizer, factors: dict, modules: dict, directory: Path) -> None:
    """The pretrained model with W − B@A in every adapted module (computed in float64, stored in the model's dtype)."""
    named = dict(net.named_modules())
    worst = 0.0
    with torch.no_grad():
        for name, (b, a) in factors.items():
            weight = named[name].weight
            update = b.double() @ a.double()
            worst = max(worst, float(update.norm() / weight.double().norm().clamp(min=1e-30)))
            if modules[name]["fan_in_fan_out"]:
                update = update.T
            weight.copy_((weight.double() - update).to(weight.dtype))
    if worst * torch.finfo(net.dtype).eps > RESIDUAL_PRECISION:
        warn(f"some adapters are {worst:.3g}× larger than their weight: W − B@A rounded to {str(net.dtype).removeprefix('torch.')} "
             "loses that much of W, so the initial model only approximates the pretrained one (see export --check)")
    net.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def check_peft(out: str | Path, solve_dir: str | Path, model: str | Path | None = None) -> float:
    """Load the export at `out` with PEFT and return the largest relative difference, over every
    adapted module, between its output and (W + B@A) x computed from the solve directory.

    For a residual export the base is the written residual model and the reference is the
    pretrained W x (the initial model equals the pretrained one).
    """
    sol = solution.Solution(solve_dir)
    exported = json.loads((Path(out) / store.MANIFEST).read_text())
    if exported["module_prefix"]:
        raise CntinitError("the check loads the captured model class, which has no module prefix: export without --module-prefix to check")
    pretrained, _ = _load_solved_model(sol.manifest, model, trust_remote_code=False)
    base_path = Path(out) / BASE_DIR
    base, _ = models.load(base_path) if exported["residual_base"] else (copy.deepcopy(pretrained), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations PEFT triggers, not ours to fix
        wrapped = peft.PeftModel.from_pretrained(base, str(out))
    adapted = dict(wrapped.base_model.model.named_modules())
    original = dict(pretrained.named_modules())
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for name, (b, a) in sol.factors().items():
            w = models.weight_matrix(original[name]).double()
            x = torch.randn(4, w.shape[1], generator=generator, dtype=torch.float64)
            bias = original[name].bias.double() if original[name].bias is not None else 0.0
            want = x @ (w if exported["residual_base"] else w + b.double() @ a.double()).T + bias
            module = adapted[name]
            got = module(x.to(module.weight.dtype)).double()
            worst = max(worst, float((got - want).norm() / want.norm().clamp(min=1e-30)))
    return worst
