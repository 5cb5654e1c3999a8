"""How fast the command line answers: `--help` of each command, and a refusal of a mistyped model or
data path or a Hub id that is not in the cache, against the import of the stages.

    python benchmarks/startup.py              # 5 runs of each, median and slowest wall seconds
    python benchmarks/startup.py --json       # the rows as JSON

Each row is a fresh `python -m cntinit ...` process, timed whole (interpreter start included),
beside `python -c "import cntinit.capture"`: what every command cost before the stages were
imported lazily. Also says whether the process imported torch. The refusals run offline
(HF_HUB_OFFLINE=1, an empty HF_HUB_CACHE) against the embedded model and data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from rich.console import Console
from rich.table import Table

PROBE = "import sys, runpy; sys.argv = {argv!r}\ntry:\n    runpy.run_module('cntinit', run_name='__main__')\nexcept SystemExit:\n    pass\n" \
        "finally:\n    print('torch' in sys.modules, file=sys.stderr)"
COMMANDS = {
    "cntinit --help": ["cntinit", "--help"],
    "cntinit solve --help": ["cntinit", "solve", "--help"],
    "cntinit capture --help": ["cntinit", "capture", "--help"],
    "cntinit run --help": ["cntinit", "run", "--help"],
    "cntinit cache --help": ["cntinit", "cache", "--help"],
}
REFUSALS = {  # what a mistyped input costs before its one-line error
    "capture of a model path that is not there": ["cntinit", "capture", "./no-such-model", "-d", "{data}", "-o", "{out}"],
    "capture of a Hub id not in the cache": ["cntinit", "capture", "org/no-such-model", "-d", "{data}", "-o", "{out}"],
    "capture of a data file that is not there": ["cntinit", "capture", "{model}", "-d", "no-such.jsonl", "-o", "{out}"],
}
IMPORT_STAGES = "import cntinit.capture, cntinit.solve, cntinit.export, sys; print('torch' in sys.modules, file=sys.stderr)"


def timed(code: str, env: dict | None = None) -> tuple[float, bool]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return time.perf_counter() - started, done.stderr.strip().splitlines()[-1] == "True"


def measure(repeat: int) -> list[dict]:
    from cntinit import embedded
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": os.path.join(scratch, "hub")}
        places = {"model": str(embedded.model_dir()), "data": str(embedded.data_file()), "out": os.path.join(scratch, "out")}
        refusals = {name: [part.format(**places) for part in argv] for name, argv in REFUSALS.items()}
        cases = {name: PROBE.format(argv=argv) for name, argv in (COMMANDS | refusals).items()} | \
            {"import the stages (every command before)": IMPORT_STAGES}
        for name, code in cases.items():
            rows.append(_row(name, [timed(code, env) for _ in range(repeat)]))
    return rows


def _row(name: str, runs: list[tuple[float, bool]]) -> dict:
    seconds = [s for s, _ in runs]
    return {"what": name, "median_s": statistics.median(seconds), "max_s": max(seconds), "torch_imported": runs[0][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="Runs of each command.")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON instead of a table.")
    args = parser.parse_args()
    rows = measure(args.repeat)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("what", "median s", "slowest s", "torch imported", title=f"start-up, {args.repeat} fresh processes each")
    for row in rows:
        table.add_row(row["what"], f"{row['median_s']:.2f}", f"{row['max_s']:.2f}", "yes" if row["torch_imported"] else "no")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
