"""The module names sd-scripts gives each pipeline layout's LoRA modules: the original (LDM, BFL, SAI)
checkpoints' paths, `.` → `_`, under a per-component prefix. Read from sd-scripts' networks/lora.py
(SD 1.x/2.x, SDXL), networks/lora_flux.py and networks/lora_sd3.py, and diffusers' converters of
the original checkpoints (which rows of a fused layer each diffusers module is, and where a
modulation's halves are swapped).

A diffusers module that is one part of a fused original layer is named `layer:i` (part i); kohya.py
joins the parts into one LoRA on the layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import CntinitError

SDXL_LAYERS = 3  # sd-scripts' SDXL UNet numbers its blocks in steps of layers_per_block + 1 = 3
SWAPPED = "~swapped"  # a name's mark: its rows are the diffusers module's with the two halves swapped (shift, scale ↔ scale, shift)


@dataclass(frozen=True)
class Layout:
    prefixes: dict[str, str]  # a component's module prefix -> sd-scripts' prefix
    denoiser: Callable[[str], str]  # a denoiser module path (without its prefix) -> sd-scripts' path
    clip: tuple[str, ...]  # the components that are CLIP text models (sd-scripts nests their modules under text_model.)


def _same(path: str) -> str:
    return path


def _sdxl_unet_path(path: str) -> str:
    """A diffusers SDXL UNet module path as sd-scripts' SDXL UNet names it (its transformer blocks
    only: those are what sd-scripts' SDXL LoRA adapts, and inside them the names agree)."""
    parts = path.split(".")
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        return ".".join(["input_blocks", str(1 + int(parts[1]) * SDXL_LAYERS + int(parts[3])), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", str(1 + 2 * int(parts[2])), *parts[3:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        return ".".join(["output_blocks", str(int(parts[1]) * SDXL_LAYERS + int(parts[3])), "1", *parts[4:]])
    raise CntinitError(f"unet.{path} lies outside the SDXL UNet's transformer blocks, the only UNet modules sd-scripts' SDXL LoRA "
                       "adapts: solve with attention targets (to_q,to_k,to_v,to_out.0), or export --format diffusers")


# diffusers' module inside a block -> the original's, with its part index in a fused layer
FLUX_DOUBLE = {"attn.to_q": "img_attn.qkv:0", "attn.to_k": "img_attn.qkv:1", "attn.to_v": "img_attn.qkv:2",
               "attn.to_out.0": "img_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "norm1.linear": "img_mod.lin",
               "attn.add_q_proj": "txt_attn.qkv:0", "attn.add_k_proj": "txt_attn.qkv:1", "attn.add_v_proj": "txt_attn.qkv:2",
               "attn.to_add_out": "txt_attn.proj", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
               "norm1_context.linear": "txt_mod.lin"}
FLUX_SINGLE = {"attn.to_q": "linear1:0", "attn.to_k": "linear1:1", "attn.to_v": "linear1:2", "proj_mlp": "linear1:3",
               "proj_out": "linear2", "norm.linear": "modulation.lin"}
FLUX_MLP_RATIO = 4  # Flux's single blocks: linear1 = q, k, v (the width each) and the MLP input (4 × the width)
SD3_JOINT = {"attn.to_q": "x_block.attn.qkv:0", "attn.to_k": "x_block.attn.qkv:1", "attn.to_v": "x_block.attn.qkv:2",
             "attn.to_out.0": "x_block.attn.proj", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
             "norm1.linear": "x_block.adaLN_modulation.1",
             "attn2.to_q": "x_block.attn2.qkv:0", "attn2.to_k": "x_block.attn2.qkv:1", "attn2.to_v": "x_block.attn2.qkv:2",
             "attn2.to_out.0": "x_block.attn2.proj",
             "attn.add_q_proj": "context_block.attn.qkv:0", "attn.add_k_proj": "context_block.attn.qkv:1",
             "attn.add_v_proj": "context_block.attn.qkv:2", "attn.to_add_out": "context_block.attn.proj",
             "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
             # the last block's context modulation (2 × the width: shift, scale) is stored swapped in diffusers
             "norm1_context.linear": "context_block.adaLN_modulation.1" + SWAPPED}


def _block_path(path: str, blocks: dict[str, tuple[str, dict[str, str]]], label: str, where: str) -> str:
    match = re.fullmatch(r"(\w+)\.(\d+)\.(.+)", path)
    block = blocks.get(match.group(1)) if match else None
    if block is None or match.group(3) not in block[1]:
        raise CntinitError(f"transformer.{path} lies outside {label}'s {where}, the only transformer modules sd-scripts' {label} LoRA "
                           "loads from a file: solve with targets inside them (e.g. to_q,to_k,to_v,to_out.0), or export --format diffusers")
    return f"{block[0]}.{match.group(2)}.{block[1][match.group(3)]}"


def _flux_path(path: str) -> str:
    return _block_path(path, {"transformer_blocks": ("double_blocks", FLUX_DOUBLE), "single_transformer_blocks": ("single_blocks", FLUX_SINGLE)},
                       "Flux", "double and single blocks")


def _sd3_path(path: str) -> str:
    return _block_path(path, {"transformer_blocks": ("joint_blocks", SD3_JOINT)}, "SD3", "joint blocks")


LAYOUTS = {  # a pipeline's layout (None: SD 1.x/2.x) -> its names
    None: Layout({"unet.": "lora_unet_", "text_encoder.": "lora_te_"}, _same, ("text_encoder.",)),
    "sdxl": Layout({"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}, _sdxl_unet_path,
                   ("text_encoder.", "text_encoder_2.")),
    "flux": Layout({"transformer.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te3_"}, _flux_path,
                   ("text_encoder.",)),
    "sd3": Layout({"transformer.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_",
                   "text_encoder_3.": "lora_te3_"}, _sd3_path, ("text_encoder.", "text_encoder_2.")),
}


def kohya_name(name: str, layout: str | None = None) -> str:
    """`unet.down_blocks.0.attentions.0.….to_q` → `lora_unet_down_blocks_0_attentions_0_…_to_q` (sd-scripts' naming).

    sd-scripts names CLIP text-encoder modules as transformers 4's CLIP text models nest them, under
    `text_model.`; transformers 5 dropped that level from CLIPTextModel, so it is put back (T5's
    `encoder.block.…` agree). The denoiser is named as the original checkpoint is: SD 1.x/2.x's UNet
    as diffusers names it, SDXL's as `input_blocks.N.1.…`, Flux's as `double_blocks.N.img_attn.qkv`,
    SD3's as `joint_blocks.N.x_block.attn.qkv`…"""
    if layout not in LAYOUTS:
        raise CntinitError(f"this solve is of a {layout} pipeline, whose module names sd-scripts' format has no map for here: "
                           "export --format diffusers")
    names = LAYOUTS[layout]
    component = max((p for p in names.prefixes if name.startswith(p)), key=len)  # text_encoder_2. also starts with text_encoder
    path = name.removeprefix(component)
    if component in names.clip and not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path
    if component in ("unet.", "transformer."):
        path = names.denoiser(path)
    layer, _, part = path.partition(":")
    return names.prefixes[component] + layer.replace(".", "_") + (f":{part}" if part else "")


def parsed(name: str) -> tuple[str, int | None, bool]:
    """(the file's layer, the part of it or None, whether its rows are swapped) of a kohya_name."""
    swapped = name.endswith(SWAPPED)
    layer, _, part = name.removesuffix(SWAPPED).partition(":")
    return layer, int(part) if part else None, swapped


def fused_rows(layer: str, width: int) -> list[int]:
    """The rows of each part of a fused layer (its key, without the part) whose parts read `width` inputs."""
    return [width] * 3 + [FLUX_MLP_RATIO * width] if layer.endswith("_linear1") else [width] * 3


def reordered(key: str, b: torch.Tensor, a: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(the key without its mark, B in the original's row order)."""
    return (key.removesuffix(SWAPPED), swap_halves(b, a.shape[1])) if key.endswith(SWAPPED) else (key, b)


def swap_halves(rows: torch.Tensor, width: int) -> torch.Tensor:
    """A marked module's rows in the other order: SD3's last block stores its context modulation
    (2 × the width: shift, scale) swapped relative to diffusers; the other blocks' (6 × the width) agree."""
    if rows.shape[0] != 2 * width:
        return rows
    first, second = rows.chunk(2, dim=0)
    return torch.cat([second, first]).contiguous()
