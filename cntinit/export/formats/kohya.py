"""kohya sd-scripts' LoRA format, for diffusion pipelines: one safetensors file (`lora_unet_…`/`lora_te…_`
modules, `.lora_down`/`.lora_up` weights, a per-module `.alpha`) that sd-scripts trains from with
--network_weights. A residual init writes no base: sd-scripts subtracts BA itself (--base_weights, −1).

sd-scripts names modules as the original checkpoints do, which differs per architecture: a layout's
names live in kohya_names.py (a pipeline's model record says its layout). Where the original model
fuses layers diffusers keeps apart — Flux's and SD3's q, k, v (and Flux's single-block MLP input)
in one `qkv`/`linear1` — the file holds one LoRA on the fused layer whose rank is the sum of its
parts': `lora_down` their A's stacked, `lora_up` their B's block-diagonal (zero rows for a part not
adapted). That LoRA adds exactly each part's BA to the part's rows; it is what sd-scripts' own
split_qkv networks save, and what diffusers' kohya-Flux converter splits back into to_q, to_k, to_v.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ...solve import modes
from . import kohya_names
from .registry import Adapter, Format, register

FILE = "lora.safetensors"
NETWORK_MODULES = {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}  # sd-scripts' network module per layout (else networks.lora)
TRAIN_SCRIPTS = {"flux": "flux_train_network.py", "sd3": "sd3_train_network.py", "sdxl": "sdxl_train_network.py"}


def key(name: str, manifest: dict, prefix: str) -> str:
    return kohya_names.kohya_name(name, manifest["model"].get("layout"))


def tensors(key: str, b: torch.Tensor, a: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    key, b = kohya_names.reordered(key, b, a)
    return {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(alpha)}


def fuse(file: dict[str, torch.Tensor], zero_update: bool) -> dict[str, torch.Tensor]:
    """The parts of fused layers (keys `layer:i`, see kohya_names) as one LoRA per layer: A's stacked,
    B's block-diagonal at each part's rows, α the sum of the parts' — so a layer whose parts share
    one scale keeps it, and each part's B and A are rescaled to the fused scale where they differ
    (not for an init whose BA is zero: its factors keep the scale their method gave them)."""
    out, groups = {}, {}
    for name, tensor in file.items():
        module, _, kind = name.partition(".")
        layer, _, part = module.partition(":")
        if part:
            groups.setdefault(layer, {}).setdefault(int(part), {})[kind] = tensor
        else:
            out[name] = tensor
    for layer, parts in groups.items():
        width = next(iter(parts.values()))["lora_down.weight"].shape[1]
        rows = kohya_names.fused_rows(layer, width)
        alpha = sum(float(p["alpha"]) for p in parts.values())
        rank = sum(p["lora_down.weight"].shape[0] for p in parts.values())
        downs, up, column = [], None, 0
        for index in sorted(parts):
            down, b = parts[index]["lora_down.weight"], parts[index]["lora_up.weight"]
            part_rank = down.shape[0]
            if not zero_update:  # s_part/s_fused, each scale α/r
                ratio = (float(parts[index]["alpha"]) / part_rank) / (alpha / rank)
                down, b = down * ratio ** 0.5, b * ratio ** 0.5
            if up is None:
                up = b.new_zeros(sum(rows), rank)
            start = sum(rows[:index])
            up[start:start + b.shape[0], column:column + part_rank] = b
            downs.append(down)
            column += part_rank
        out |= {f"{layer}.lora_down.weight": torch.cat(downs).contiguous(), f"{layer}.lora_up.weight": up,
                f"{layer}.alpha": torch.tensor(alpha)}
    return out


def metadata(file: dict[str, torch.Tensor], manifest: dict) -> dict[str, str]:
    """sd-scripts' training metadata: dim and alpha, "Dynamic" when they vary across modules."""
    def one_or_dynamic(values):
        values = set(values)
        return str(next(iter(values))) if len(values) == 1 else "Dynamic"

    downs = [name.removesuffix(".lora_down.weight") for name in file if name.endswith(".lora_down.weight")]
    return {"ss_network_module": NETWORK_MODULES.get(manifest["model"].get("layout"), "networks.lora"),
            "ss_network_dim": one_or_dynamic(file[f"{m}.lora_down.weight"].shape[0] for m in downs),
            "ss_network_alpha": one_or_dynamic(float(file[f"{m}.alpha"]) for m in downs),
            "cntinit_mode": manifest["mode"], "cntinit_init": manifest["init"]}


def write(directory: Path, adapter: Adapter) -> None:
    manifest = adapter.sol.manifest
    file = fuse(adapter.tensors, modes.get(manifest["mode"]).zero_update)
    save_file(file, directory / FILE, metadata=metadata(file, manifest))


def how_to_load(residual: bool, out: Path, unet_only: bool = False, layout: str | None = None) -> str:
    file = out / FILE
    # without --dim_from_weights sd-scripts builds the network from --network_dim/--network_alpha and ignores the file's alphas
    network = (f"{TRAIN_SCRIPTS.get(layout, 'train_network.py')} --network_module {NETWORK_MODULES.get(layout, 'networks.lora')} "
               f"--network_weights {file} --dim_from_weights" + (" --network_train_unet_only" if unet_only else ""))
    denoiser = "transformer" if layout in NETWORK_MODULES else "UNet"
    return (f"train with {network} --base_weights {file} --base_weights_multiplier -1, which makes the base W − B@A so the "
            f"initial model equals the pretrained one (for --network_train_unet_only, which would keep the text encoder's W − B@A "
            f"without its adapter, solve the {denoiser} alone: --targets 're:(unet|transformer)\\..*'; not with --scale_weight_norms, "
            "which rescales the init)" if residual
            else f"train with {network} (not --scale_weight_norms, which rescales the init); the base model stays as it is "
            "and the initial model is W + B@A")


register(Format("kohya", FILE, pipelines=True, client="diffusers", key=key, tensors=tensors, write=write, how_to_load=how_to_load,
                lacks=("--rslora", "--dora", "--module-prefix", "--task-type"), writes_base=False, b_name="lora_up"))
