"""A layerwise capture's checkpoint: the saves a stopped run resumes from.

A save is taken at a block boundary: a file of the batches' tensors there — the hidden states
entering the block on the way up, the gradient at its output on the way down — named by the
way and the block, then the state: the finished blocks' payload files (with their checksums),
their manifest records and, on the way down, the loss's counters. The state also keeps the save
before the last one, and its file stays: a process killed while saving (under torchrun the
others may have saved already), or a last file that cannot be read, leaves that one. Under
torchrun every process keeps its own checkpoint, and a resume takes the newest save that every
process holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import distributed
from ..console import warn
from . import checkpoint, store
from .atomic import atomic_file
from .manifests import read_json

HIDDEN = "hidden-{}.safetensors"  # a checkpoint's hidden states entering block {}, on the way up
OUTPUT_GRADIENTS = "output-gradients-{}.safetensors"  # ∂loss/∂(block {}'s output), on the way down (--gradients)
FILES = {"up": HIDDEN, "down": OUTPUT_GRADIENTS}


def save(saved: Path, ident: str, way: str, block: int, tensors: dict[str, torch.Tensor], payloads: store.Payloads, written,
         world: distributed.World, gradients: dict | None = None) -> None:
    """Save block `block` on the way `way`: its tensors' file (atomically), then the state naming
    it and the save before it (`written`: the manifest records so far; `gradients`: the loss's
    counters), then the files of older saves go."""
    saved.mkdir(parents=True, exist_ok=True)
    name = FILES[way].format(block)
    with atomic_file(saved / name) as tmp:
        save_file({j: t.contiguous().cpu() for j, t in tensors.items()}, tmp)
    entry = {"way": way, "block": block, "payloads": payloads.state() if world.leader else None, "stats": written.stats,
             "modules": written.modules, "gradients": gradients}
    last = next(iter(_entries(saved, ident) or []), None)
    previous = last if last is not None and _progress(last) < _progress(entry) else None
    _write_state(saved, ident, entry, previous)
    keep = {name} | ({_file(previous)} if previous else set())
    for old in [*saved.glob(HIDDEN.format("*")), *saved.glob(OUTPUT_GRADIENTS.format("*"))]:
        if old.name not in keep:
            old.unlink()


def resume(saved: Path, ident: str, world: distributed.World) -> dict | None:
    """The save this capture continues from, with its `tensors` — the newest whose file opens, and
    under torchrun the newest every process holds — else None; a warning says why a checkpoint
    there is not taken, or not its last save."""
    found = _entries(saved, ident)
    entries = found or []
    usable = [entry for entry in entries if _opens(saved / _file(entry))]
    common = [_key(entry) for entry in usable]
    if world.size > 1:
        held = distributed.everyone(world, common)
        common = [key for key in common if all(key in theirs for theirs in held)]
    chosen = max((entry for entry in usable if _key(entry) in common), key=_progress, default=None)
    tensors = None
    if chosen is not None:
        try:
            tensors = load_file(saved / _file(chosen))
        except (OSError, SafetensorError):
            usable.remove(chosen)
    if world.size > 1 and not all(distributed.everyone(world, tensors is not None)):
        tensors = None
    if tensors is None:
        chosen = None
    _say_why(saved, found, usable, chosen)
    if chosen is not None and _key(chosen) != _key(entries[0]):  # the later save is abandoned: the next one follows this
        _write_state(saved, ident, chosen, None)
    return dict(chosen, tensors=tensors) if chosen is not None else None


def _write_state(saved: Path, ident: str, entry: dict, previous: dict | None) -> None:
    with atomic_file(saved / checkpoint.STATE) as tmp:
        tmp.write_text(json.dumps({"identity": ident, **entry, "previous": previous}))


def _say_why(saved: Path, entries: list[dict] | None, usable: list[dict], chosen: dict | None) -> None:
    """Warn where a checkpoint at `saved` is left, or resumed from other than its last save."""
    if not entries:
        if entries is None and (saved / checkpoint.STATE).is_file():
            warn(f"the checkpoint at {saved} is damaged ({checkpoint.STATE} cannot be read): starting from the beginning")
        elif entries == []:
            warn(f"the checkpoint at {saved} is from a capture with other arguments or data: starting from the beginning")
        return
    damaged = next((_file(entry) for entry in entries if entry not in usable), None)
    if chosen is None:
        warn(f"the checkpoint at {saved} is damaged ({damaged} cannot be read): starting from the beginning" if damaged
             else "the processes' checkpoints hold no save in common: starting from the beginning")
    elif _key(chosen) != _key(entries[0]):
        warn(f"the checkpoint at {saved} is damaged ({damaged} cannot be read): resuming from the save before it, at block "
             f"{chosen['block']}" if damaged else f"the processes' last saves name different blocks (one stopped while saving): "
             f"resuming from block {chosen['block']}, the last one they all saved")


def _entries(saved: Path, ident: str) -> list[dict] | None:
    """The saves the state at `saved` names for this capture, the last first: none when it is
    another capture's; None when there is none or it cannot be read."""
    try:
        state = read_json(saved / checkpoint.STATE)
        if state.get("identity") != ident:
            return []
        entries = [state] + ([state["previous"]] if state.get("previous") else [])
        for entry in entries:
            entry.setdefault("way", "up")
            if entry["way"] not in FILES or not isinstance(entry["block"], int):
                return None
            if entry["way"] == "down":  # the loss's counters so far come back with it
                entry["gradients"] = {k: entry["gradients"][k] for k in ("batches", "tokens", "loss")}
        return [{k: v for k, v in entry.items() if k not in ("identity", "previous")} for entry in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _file(entry: dict) -> str:
    return FILES[entry["way"]].format(entry["block"])


def _key(entry: dict) -> list:
    return [entry["way"], entry["block"]]


def _progress(entry: dict) -> tuple[int, int]:
    """How far a save is: up the blocks, then down them."""
    return (0, entry["block"]) if entry["way"] == "up" else (1, -entry["block"])


def _opens(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt"):
            return True
    except (OSError, SafetensorError):
        return False
