"""The solve directory: the on-disk contract between solve and export.

    DIR/manifest.json        format, version, mode, every parameter, init semantics, the capture
                             and model it came from, and per module: rank, shapes, statistics key
    DIR/adapter.safetensors  <module>.A (r×d) and <module>.B (k×r), float32, such that the
                             intended weight update is exactly B @ A (no LoRA scale folded in)
    DIR/report.json          per-module and total diagnostics of the solve

A module with rank 0 has no tensors. The README documents the format.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import CntinitError
from .store import MANIFEST, read_manifest, sha256_file, verify_payloads

FORMAT = "cntinit.solve"
FORMAT_VERSION = 1
ADAPTER = "adapter.safetensors"
REPORT = "report.json"


def new_manifest(**fields) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cntinit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }


def write(directory: Path, manifest: dict, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], report: dict) -> None:
    """Write tensors, report and manifest into `directory` (already a temporary one)."""
    tensors = {}
    for name, (b, a) in factors.items():
        tensors[f"{name}.A"] = a.to(torch.float32).contiguous()
        tensors[f"{name}.B"] = b.to(torch.float32).contiguous()
    save_file(tensors, directory / ADAPTER, metadata={"format": "pt"})
    (directory / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    manifest["files"] = {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size} for name in (ADAPTER, REPORT)
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


class Solution:
    """A solve directory opened for reading; checksums are verified on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CntinitError(f"{self.path} is not a directory: give the directory `cntinit solve` wrote")
        manifest = read_manifest(self.path, FORMAT)
        if manifest is None:
            raise CntinitError(f"{self.path} is not a cntinit solve directory (no valid {MANIFEST}): give the directory `cntinit solve` wrote")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CntinitError(f"{self.path} has solve format version {manifest.get('format_version')}, this cntinit reads {FORMAT_VERSION}: solve again")
        verify_payloads(self.path, manifest, "solve directory", "solve again")
        self.manifest = manifest

    @property
    def modules(self) -> dict[str, dict]:
        """Modules with an adapter (rank ≥ 1), in model order."""
        return {name: entry for name, entry in self.manifest["modules"].items() if entry["rank"] > 0}

    @property
    def report(self) -> dict:
        return json.loads((self.path / REPORT).read_text())

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (B, A), float32, with B @ A the intended weight update."""
        with safe_open(self.path / ADAPTER, framework="pt") as handle:
            return {name: (handle.get_tensor(f"{name}.B"), handle.get_tensor(f"{name}.A")) for name in self.modules}
