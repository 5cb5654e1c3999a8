"""Capture checkpoints: the running sums and how many batches they hold, written atomically
every N batches (and on SIGINT/SIGTERM) beside the output, so a killed capture restarted
with the same arguments resumes where the last checkpoint left off and ends with the same
statistics, bit for bit, as an uninterrupted run.

    OUT/../.<name>.checkpoint/state.json         identity of the capture, batches done, noise RNG state
    OUT/../.<name>.checkpoint/sums.safetensors   every key's per-bucket Σxxᵀ (upper blocks), Σx, n
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..console import warn
from .atomic import atomic_directory
from .manifests import read_json

STATE, SUMS = "state.json", "sums.safetensors"


def location(out: str | Path, rank: int | None = None) -> Path:
    """Beside `out`; one per process under torchrun (`rank`)."""
    out = Path(out).absolute()
    return out.parent / (f".{out.name}.checkpoint" + (f"-rank{rank}" if rank is not None else ""))


def identity(*parts) -> str:
    """What must be equal for a checkpoint to continue this capture: model and data fingerprints and every option."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def save(directory: Path, ident: str, batches: int, done: int, sums: dict[str, torch.Tensor], rng: torch.Tensor | None) -> None:
    with atomic_directory(directory) as tmp:
        save_file({name: t.contiguous() for name, t in sums.items()} | ({"rng": rng} if rng is not None else {}), tmp / SUMS)
        (tmp / STATE).write_text(json.dumps({"identity": ident, "batches": batches, "done": done}))


def load(directory: Path, ident: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(state, tensors) of the checkpoint at `directory` when it continues this capture; else None,
    with a warning: a checkpoint of another capture, or a damaged one, is overwritten later.
    The identity is read first, so another capture's checkpoint is never loaded."""
    try:
        state = read_json(directory / STATE)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        warn(f"the checkpoint at {directory} is damaged ({STATE} cannot be read): starting from the beginning")
        return None
    if not isinstance(state, dict) or state.get("identity") != ident:
        warn(f"the checkpoint at {directory} is from a capture with other arguments or data: starting from the beginning")
        return None
    try:
        tensors = load_file(directory / SUMS)
    except (OSError, ValueError, SafetensorError):
        warn(f"the checkpoint at {directory} is damaged ({SUMS} cannot be read): starting from the beginning")
        return None
    return state, tensors


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
