"""The export stage: a solve directory into the adapter files a trainer loads.

    stage.py    export(): inputs checked, the scale folded into each module's factors, files and base written
    formats/    every adapter format, one module each (PEFT, kohya and its name maps, diffusers), registered
    check.py    --check: the written files loaded in their real client and compared with (W + BA) x
"""

from .check import check_peft, check_pipeline, verify
from .stage import export

__all__ = ["check_peft", "check_pipeline", "export", "verify"]
