"""PEFT's adapter format: adapter_model.safetensors (`base_model.model.<module>.lora_A/B.weight`) and
adapter_config.json (rank and alpha patterns for variable ranks, the task type, PEFT's own LoRA
variant where a mode has one), for any transformers model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ...console import warn
from ...errors import not_one_of
from ...models import loading
from ...solve import modes
from .registry import BASE_DIR, Adapter, Format, register

if TYPE_CHECKING:
    import peft

FILE = "adapter_model.safetensors"
TASK_TYPE_NAMES = tuple(dict.fromkeys([*loading.TASK_TYPES.values(), "FEATURE_EXTRACTION"]))


def task_type(requested: str, model: dict, prefix: str) -> str | None:
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
    found = loading.task_type(name)
    return found or ("FEATURE_EXTRACTION" if name.endswith("Model") else None)


def _config(adapter: Adapter, base_path: str, revision: str | None = None) -> peft.LoraConfig:
    """PEFT's own LoraConfig, so adapter_config.json holds every key the installed PEFT writes. Imported here: peft
    (and bitsandbytes with it) is paid by PEFT-format exports alone, not by every command that imports export."""
    import peft

    sol, base_rank, alpha = adapter.sol, adapter.sol.manifest["params"]["rank"], adapter.alpha
    return peft.LoraConfig(
        task_type=adapter.settings,
        r=base_rank,
        lora_alpha=alpha,
        target_modules=list(adapter.ranks),
        rank_pattern={_anchored(n): r for n, r in adapter.ranks.items() if r != base_rank},
        alpha_pattern={_anchored(n): a for n, a in adapter.alphas.items() if a != alpha},
        use_rslora=adapter.rslora,
        use_dora=adapter.dora,
        init_lora_weights=modes.get(sol.manifest["mode"]).peft_variant or True,  # PEFT's MiCA variant freezes B
        fan_in_fan_out=any(sol.modules[n]["fan_in_fan_out"] for n in sol.modules),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_path,
        revision=revision,
    )




def write(directory: Path, adapter: Adapter) -> None:
    model = adapter.sol.manifest["model"]
    if adapter.residual:
        config = _config(adapter, str((adapter.out / BASE_DIR).absolute()))
    else:  # a Hub id and its commit, where the capture named one, load on any machine; a path only on this one
        config = _config(adapter, model.get("repo", model["path"]), model.get("revision"))
    if adapter.residual and (adapter.dora or (adapter.rslora and config.rank_pattern)):
        warn("after training, PEFT's path_initial_model_for_weight_conversion " + (
            "ignores DoRA magnitudes, so converting this adapter to a plain LoRA gives wrong weights" if adapter.dora
            else "refuses rsLoRA with variable ranks") + ": keep training on the shipped residual base")
    save_file(adapter.tensors, directory / FILE, metadata={"format": "pt"})
    config.save_pretrained(directory)


def _anchored(name: str) -> str:
    """A PEFT rank/alpha pattern key that matches exactly this module path and nothing else."""
    return "^" + re.escape(name)


def key(name: str, manifest: dict, prefix: str) -> str:
    return f"base_model.model.{prefix}{name}"


def tensors(key: str, b: torch.Tensor, a: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}


def how_to_load(residual: bool, out: Path, unet_only: bool = False, layout: str | None = None) -> str:
    """How a trainer starts from the adapter (PEFT's and diffusers' formats: a residual base is written beside it)."""
    if residual:
        return f"load {out / BASE_DIR} as the base model; it is the pretrained model minus B@A"
    return "the base model stays as it is; the initial model is W + B@A"


register(Format("peft", FILE, pipelines=False, client="PEFT", key=key, tensors=tensors, write=write, how_to_load=how_to_load,
                prepare=task_type))
