"""cntinit: data-driven LoRA initializations computed offline and exported as adapter files."""

__version__ = "0.1.0"

from .capture import capture  # noqa: E402
from .errors import CntinitError  # noqa: E402
from .store import Store, merge  # noqa: E402

__all__ = ["capture", "merge", "Store", "CntinitError", "__version__"]
