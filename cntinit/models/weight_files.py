"""The safetensors files a model directory holds, and what cntinit refuses to take from them as
weights: pickles, a quantized checkpoint's codes, weights missing or of another shape.

from_pretrained forgives all but pickles: it casts codes into float parameters, draws a missing
weight at random and only warns (cntinit silences its warnings). An init computed from such weights
is wrong without a sign, so each is refused with the fix.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CntinitError, first_line

STORED_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}  # safetensors' names


def refuse_quantized(path: Path, config) -> None:
    """A quantized checkpoint (bitsandbytes, GPTQ, AWQ, FP8...) holds codes and scales, not the
    weights an init is computed from and subtracted from."""
    quantization = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    raise CntinitError(f"{path} is a quantized checkpoint ({method or 'config.json has a quantization_config'}): cntinit reads the "
                       "unquantized weights — point at the checkpoint it was quantized from (for a 4-bit QLoRA base, solve that "
                       "with --quantize nf4, or -m loftq)")


def refuse_incomplete(path: Path, missing, mismatched=()) -> None:
    """from_pretrained fills a weight the checkpoint lacks (or has in another shape, once told to
    go on) with random values and only warns."""
    if mismatched:
        key, stored, expected = sorted(mismatched)[0]
        raise misfit(path, key, stored, expected)
    if missing:
        first = sorted(missing)[0]
        raise CntinitError(f"{path} has no weight for {first}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, "
                           "which from_pretrained would draw at random: the checkpoint is incomplete or another model's; use an "
                           "intact copy")


def misfit(path: Path, key: str, stored: tuple, expected: tuple) -> CntinitError:
    return CntinitError(f"{path}: {key} has shape {tuple(stored)} in the checkpoint but {tuple(expected)} in the model its "
                        "config.json describes: the checkpoint is damaged or another model's; use an intact copy")


def refuse_codes(path: Path, net: nn.Module, stem: str = "model") -> None:
    """from_pretrained casts a stored tensor to its parameter's dtype without a word, so a quantized
    checkpoint's codes (int8, uint8, float8) stored under a weight's name would be taken for the
    weights. Each tensor named like a floating-point parameter (its last name) is checked in the
    files' headers."""
    floating = {name.rsplit(".", 1)[-1] for name, parameter in net.named_parameters() if parameter.is_floating_point()}
    by_file: dict[Path, list[str]] = {}
    for key, file in safetensors_files(path, stem).items():
        if key.rsplit(".", 1)[-1] in floating:
            by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with opened(file) as handle:
            for key in keys:
                stored = handle.get_slice(key).get_dtype()
                if stored not in STORED_FLOATS:
                    raise coded(path, key, TORCH_NAMES.get(stored, stored))


TORCH_NAMES = {"I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # safetensors' dtype names, as torch writes them


def coded(path: Path, key: str, stored: str) -> CntinitError:
    return CntinitError(f"{path}: {key} is stored as {stored}, not as 16-, 32- or 64-bit floats: a quantized checkpoint's codes, "
                        "not weights — point at the unquantized checkpoint")


def safetensors_files(directory: Path, stem: str = "model") -> dict[str, Path]:
    """{tensor key: file} of the safetensors weights from_pretrained reads — model.safetensors, else
    the shards its index names — or {} where there are none (`stem`: diffusers' is
    diffusion_pytorch_model)."""
    single, index = directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"
    if single.is_file():  # before an index, as from_pretrained looks
        with opened(single) as handle:
            return dict.fromkeys(handle.keys(), single)
    if not index.is_file():
        return {}
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(key, str) and isinstance(name, str) for key, name in weight_map.items()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CntinitError(f"{index} is not a safetensors index (a JSON object whose weight_map names a file for each tensor): "
                           "save the model again with save_pretrained") from None
    stray = next((name for name in sorted(set(weight_map.values())) if Path(name).name != name or not (directory / name).is_file()), None)
    if stray is not None:
        raise CntinitError(f"{index} names {stray!r}, which is not a file in {directory}: save the model again with save_pretrained")
    return {key: directory / name for key, name in weight_map.items()}


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def refuse_pickles(directory: Path) -> None:
    """Weights only in pickle files (pytorch_model.bin) are refused: unpickling runs whatever the
    file says, and cntinit reads safetensors only."""
    if not any(directory.glob("*.safetensors")) and any(p for pattern in PICKLED for p in directory.glob(pattern)):
        raise CntinitError(f"{directory} holds its weights only in pickle files ({', '.join(sorted(p.name for pattern in PICKLED for p in directory.glob(pattern))[:2])}), "
                           "which cntinit never loads: convert them to safetensors with a tool you trust (save_pretrained writes safetensors)")


@contextlib.contextmanager
def opened(file: Path):
    """safe_open, a damaged file (cut short, or not safetensors) refused with the fix, not a traceback."""
    try:
        with safe_open(file, framework="pt") as handle:
            yield handle
    except (OSError, SafetensorError) as exc:
        raise damaged(file, exc) from None


def damaged(file: Path, exc: Exception) -> CntinitError:
    return CntinitError(f"{file} cannot be read as safetensors ({first_line(exc)}): the checkpoint is damaged (a download cut "
                        "short?); use an intact copy")
