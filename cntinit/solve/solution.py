"""The solve directory: the on-disk contract between solve and export.

    DIR/manifest.json        format, version, mode, every parameter, init semantics, the capture
                             and model it came from, and per module: rank, shapes, statistics key
    DIR/adapter.safetensors  <module>.A (r×d) and <module>.B (k×r), float32, such that the
                             intended weight update is exactly B @ A (no LoRA scale folded in);
                             with --quantize nf4 (and loftq) also the base's NF4 codes, two per
                             byte (<module>.nf4) and block maxima (<module>.absmax, float32)
    DIR/report.json          per-module and total diagnostics of the solve

A module with rank 0 has no tensors. The README documents the format.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CntinitError
from ..storage.manifests import FILES, HEADER, MODEL, Each, Maybe, problem
from ..storage.store import MANIFEST, file_entry, header, open_manifest
from . import modes, quant
from .options import NEWER_OPTIONS, Options

FORMAT = "cntinit.solve"
FORMAT_VERSION = 1
ADAPTER = "adapter.safetensors"
REPORT = "report.json"
SCHEMA = HEADER | {  # the manifest's shape, checked on open by storage/manifests.py's `problem`
    "mode": str,
    "init": str,
    "params": dict,  # Options' fields: checked by building Options from them
    "capture": Maybe({"path": str, "manifest_sha256": str, "data_fingerprint": str, "tokens": int, "buckets": int}),
    "model": MODEL,
    "device": str,
    "modules": Each({"rank": int, "in_features": int, "out_features": int, "stats_key": Maybe(str), "fan_in_fan_out": bool}),
    "files": FILES,
}


def manifest_problem(manifest: dict) -> str | None:
    """The first thing wrong with a solve directory's manifest, or None."""
    found = problem(manifest, SCHEMA)
    if found:
        return found
    if manifest["mode"] not in modes.MODES:
        return f"mode {manifest['mode']!r} is not a mode of this cntinit"
    missing = [f.name for f in dataclasses.fields(Options)
               if f.name not in ("mode", "init", *NEWER_OPTIONS) and f.name not in manifest["params"]]
    if missing:
        return f"params.{missing[0]} is missing"
    try:
        Options(mode=manifest["mode"], init=manifest["init"], **{k: v for k, v in manifest["params"].items()}).check()
    except TypeError as exc:
        return f"params do not fit this version's options ({exc})"
    except CntinitError as exc:
        return f"params: {exc}"
    for name, entry in manifest["modules"].items():
        if not 0 <= entry["rank"] <= min(entry["in_features"], entry["out_features"]):
            return f"modules.{name}.rank {entry['rank']} is outside 0..min(in, out) = {min(entry['in_features'], entry['out_features'])}"
    return None


def new_manifest(**fields) -> dict:
    return {**header(FORMAT, FORMAT_VERSION), **fields}


def write(directory: Path, manifest: dict, factors: dict[str, tuple[torch.Tensor, ...]], report: dict) -> None:
    """Write tensors, report and manifest into `directory` (already a temporary one). `factors` are
    (B, A), or (B, A, packed NF4 codes, block maxima) of a quantized base."""
    tensors = {}
    for name, (b, a, *base) in factors.items():  # clone: modules that read one input may hold views of one tensor (eva)
        tensors[f"{name}.A"] = a.to(torch.float32).clone(memory_format=torch.contiguous_format)
        tensors[f"{name}.B"] = b.to(torch.float32).clone(memory_format=torch.contiguous_format)
        if base:
            tensors[f"{name}.nf4"], tensors[f"{name}.absmax"] = base[0].contiguous(), base[1].to(torch.float32).contiguous()
    save_file(tensors, directory / ADAPTER, metadata={"format": "pt"})
    (directory / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    manifest["files"] = {name: file_entry(directory / name) for name in (ADAPTER, REPORT)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


class Solution:
    """A solve directory opened for reading; checksums are verified on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = open_manifest(self.path, FORMAT, FORMAT_VERSION, "solve directory", "solve", problem=manifest_problem)

    @property
    def modules(self) -> dict[str, dict]:
        """Modules with an adapter (rank ≥ 1), in model order."""
        return {name: entry for name, entry in self.manifest["modules"].items() if entry["rank"] > 0}

    @property
    def report(self) -> dict:
        return json.loads((self.path / REPORT).read_text())

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (B, A), float32, with B @ A the intended weight update; each of the shape its
        manifest entry says (out × rank, rank × in)."""
        factors = {}
        with safe_open(self.path / ADAPTER, framework="pt") as handle:
            present = set(handle.keys())
            for name, entry in self.modules.items():
                want = {"B": (entry["out_features"], entry["rank"]), "A": (entry["rank"], entry["in_features"])}
                for part, shape in want.items():
                    if f"{name}.{part}" not in present or tuple(handle.get_slice(f"{name}.{part}").get_shape()) != shape:
                        raise CntinitError(f"{self.path / ADAPTER} is corrupt: {name}.{part} is missing or not of shape {shape}: solve again")
                factors[name] = (handle.get_tensor(f"{name}.B"), handle.get_tensor(f"{name}.A"))
        return factors

    def quantized_bases(self) -> dict[str, quant.Quantized]:
        """module -> the NF4 base the solve fitted to (empty unless --quantize/loftq), of the weight's
        shape as stored (Conv1D's is in × out)."""
        if self.manifest["params"].get("quantize") is None:
            return {}
        bases = {}
        with safe_open(self.path / ADAPTER, framework="pt") as handle:
            present = set(handle.keys())
            for name, entry in self.modules.items():
                shape = (entry["in_features"], entry["out_features"]) if entry["fan_in_fan_out"] else \
                    (entry["out_features"], entry["in_features"])
                count = shape[0] * shape[1]
                want = {"nf4": ((count + 1) // 2,), "absmax": (-(-count // quant.BLOCKSIZE),)}
                for part, size in want.items():
                    if f"{name}.{part}" not in present or tuple(handle.get_slice(f"{name}.{part}").get_shape()) != size:
                        raise CntinitError(f"{self.path / ADAPTER} is corrupt: {name}.{part} is missing or not of shape {size}: solve again")
                codes = quant.unpack(handle.get_tensor(f"{name}.nf4"), count)
                absmax = handle.get_tensor(f"{name}.absmax")
                if not bool((torch.isfinite(absmax) & (absmax >= 0)).all()):
                    raise CntinitError(f"{self.path / ADAPTER} is corrupt: the NF4 base of {name} has invalid values: solve again")
                bases[name] = quant.Quantized(codes, absmax, shape)
        return bases

    def dequantized_bases(self, dtype: torch.dtype, bases: dict[str, quant.Quantized] | None = None) -> dict[str, torch.Tensor]:
        """module -> the dequantized NF4 base (out × in, in the weights' `dtype`) the solve fitted to
        (`bases`: `quantized_bases()`, when already read)."""
        values = {}
        for name, base in (bases if bases is not None else self.quantized_bases()).items():
            matrix = quant.dequantize(base).to(dtype)
            values[name] = matrix.T if self.manifest["modules"][name]["fan_in_fan_out"] else matrix
        return values
