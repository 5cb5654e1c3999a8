"""cntinit: data-driven LoRA initializations computed offline and exported as adapter files.

The Python API (`cntinit.capture`, `cntinit.solve`, ...) is imported on first use, so that the
command line starts without torch, transformers and peft when it only answers `--help`.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

API = {  # name -> (module, attribute)
    "capture": ("capture", "capture"),
    "merge": ("storage.store", "merge"),
    "solve": ("solve", "solve"),
    "export": ("export", "export"),
    "check_peft": ("export", "check_peft"),
    "Store": ("storage.store", "Store"),
    "Solution": ("solve.solution", "Solution"),
    "SolveOptions": ("solve", "Options"),
    "CntinitError": ("errors", "CntinitError"),
}
__all__ = [*API, "__version__"]


class _Package(types.ModuleType):
    """Resolves the API names on first use, and keeps them: importing the submodules `capture`,
    `solve` and `export` must not replace the functions of the same names on the package."""

    def __getattr__(self, name: str):
        if name not in API:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        module, attribute = API[name]
        value = getattr(importlib.import_module(f"{self.__name__}.{module}"), attribute)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if name in API and isinstance(value, types.ModuleType):
            return  # the import system announcing the submodule: the function keeps the name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
