"""Where a model is: a local directory, or a Hugging Face Hub id resolved to its cached snapshot
(hub.py). Light on purpose — no torch — so a mistyped model is refused before the stages load."""

from __future__ import annotations

from pathlib import Path

from .. import hub
from ..errors import CntinitError


def locate(model: str | Path, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """The local directory of `model` (a path, or `org/name` at `revision`), or the error every stage gives
    for a model that is not there."""
    path = hub.resolve(model, revision, "model", code=trust_remote_code)
    if not path.exists():
        raise CntinitError(f"model path {path} does not exist: give a local model directory, or a Hugging Face Hub id (org/name)")
    return path
