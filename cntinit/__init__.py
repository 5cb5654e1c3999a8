"""cntinit: data-driven LoRA initializations computed offline and exported as adapter files."""

__version__ = "0.1.0"

from .capture import capture  # noqa: E402
from .errors import CntinitError  # noqa: E402
from .export import check_peft, export  # noqa: E402
from .solution import Solution  # noqa: E402
from .solve import Options as SolveOptions  # noqa: E402
from .solve import solve  # noqa: E402
from .store import Store, merge  # noqa: E402

__all__ = ["capture", "merge", "solve", "export", "check_peft", "Store", "Solution", "SolveOptions", "CntinitError", "__version__"]
