"""kohya sd-scripts' LoRA format, for diffusion pipelines: one safetensors file (`lora_unet_…`/`lora_te_…`
modules, `.lora_down`/`.lora_up` weights, a per-module `.alpha`) that sd-scripts trains from with
--network_weights. A residual init writes no base: sd-scripts subtracts BA itself (--base_weights, −1).

sd-scripts names modules as the original checkpoints do, which differs per architecture: LAYOUTS
holds each one's name map (a pipeline's model record says its layout).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ...errors import CntinitError
from ...models.pipelines import SDXL
from .registry import Adapter, Format, register

FILE = "lora.safetensors"
SDXL_LAYERS = 3  # sd-scripts' SDXL UNet numbers its blocks in steps of layers_per_block + 1 = 3


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


def _same(path: str) -> str:
    return path


LAYOUTS = {  # a pipeline's layout -> (its components' prefixes in sd-scripts' names, its UNet's module paths as sd-scripts names them)
    None: ({"unet.": "lora_unet_", "text_encoder.": "lora_te_"}, _same),  # SD 1.x/2.x: the diffusers UNet's own paths
    SDXL: ({"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}, _sdxl_unet_path),
}


def kohya_name(name: str, layout: str | None = None) -> str:
    """`unet.down_blocks.0.attentions.0.….to_q` → `lora_unet_down_blocks_0_attentions_0_…_to_q` (sd-scripts' naming).

    sd-scripts names text-encoder modules as transformers 4's CLIP text models nest them, under
    `text_model.`; transformers 5 dropped that level from CLIPTextModel, so it is put back. For
    SDXL the encoders are `lora_te1_`/`lora_te2_` and the UNet is sd-scripts' own SDXL UNet,
    named as the original (LDM) checkpoint is: `input_blocks.N.1.…`, `middle_block.1.…`,
    `output_blocks.N.1.…` for the diffusers `down_blocks.i.attentions.j.…` and the rest."""
    if layout not in LAYOUTS:
        raise CntinitError(f"this solve is of a {layout} pipeline, whose module names sd-scripts' format has no map for here: "
                           "export --format diffusers")
    prefixes, unet_path = LAYOUTS[layout]
    component = next(p for p in prefixes if name.startswith(p))  # "text_encoder_2." does not start with "text_encoder."
    path = name.removeprefix(component)
    if component.startswith("text_encoder") and not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path
    if component == "unet.":
        path = unet_path(path)
    return prefixes[component] + path.replace(".", "_")


def metadata(ranks: dict, alphas: dict, manifest: dict) -> dict[str, str]:
    """sd-scripts' training metadata: dim and alpha, "Dynamic" when they vary across modules."""
    def one_or_dynamic(values):
        return str(next(iter(values))) if len(set(values)) == 1 else "Dynamic"

    return {"ss_network_module": "networks.lora", "ss_network_dim": one_or_dynamic(ranks.values()),
            "ss_network_alpha": one_or_dynamic(alphas.values()), "cntinit_mode": manifest["mode"], "cntinit_init": manifest["init"]}



def key(name: str, manifest: dict, prefix: str) -> str:
    return kohya_name(name, manifest["model"].get("layout"))


def tensors(key: str, b: torch.Tensor, a: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(alpha)}


def write(directory: Path, adapter: Adapter) -> None:
    save_file(adapter.tensors, directory / FILE, metadata=metadata(adapter.ranks, adapter.alphas, adapter.sol.manifest))


def how_to_load(residual: bool, out: Path, unet_only: bool = False) -> str:
    file = out / FILE
    # without --dim_from_weights sd-scripts builds the network from --network_dim/--network_alpha and ignores the file's alphas
    network = f"--network_module networks.lora --network_weights {file} --dim_from_weights" + (" --network_train_unet_only" if unet_only else "")
    return (f"train with {network} --base_weights {file} --base_weights_multiplier -1, which makes the base W − B@A so the "
            "initial model equals the pretrained one (for --network_train_unet_only, which would keep the text encoder's W − B@A "
            "without its adapter, solve the UNet alone: --targets 're:unet\\..*'; not with --scale_weight_norms, which "
            "rescales the init)" if residual
            else f"train with {network} (not --scale_weight_norms, which rescales the init); the base model stays as it is "
            "and the initial model is W + B@A")


register(Format("kohya", FILE, pipelines=True, client="diffusers", key=key, tensors=tensors, write=write, how_to_load=how_to_load,
                lacks=("--rslora", "--dora", "--module-prefix", "--task-type"), writes_base=False, b_name="lora_up"))
