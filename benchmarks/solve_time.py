"""Wall time of `cntinit solve` per mode, precision and rank structure, in one run.

    python benchmarks/solve_time.py                          # captures the embedded MiniLM (512 verses) first
    python benchmarks/solve_time.py --store stats/ --device cuda --rank 16

Prints a table: solve seconds (model and statistics loading excluded, as report.json's
solve_seconds), median of --repeat runs, and the overall share of ‖ΔW‖² kept.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cntinit import capture, console, embedded
from cntinit.solve import Options, solve
from cntinit.solve.solution import Solution


NO_VAS = ("lora", "eva", "inilora", "inilora-alpha", "inilora-beta")  # modes that refuse --vas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="statistics store (default: capture the embedded model)")
    parser.add_argument("--samples", type=int, default=512, help="verses for the embedded capture")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="float64,float32", help="comma-separated precisions to time")
    parser.add_argument("--modes", default="cnt-x,cnt-s,cnt-sh")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    console.quiet = True
    with tempfile.TemporaryDirectory() as scratch:
        store = args.store or capture(embedded.model_dir(), embedded.data_file(), Path(scratch) / "stats",
                                      max_samples=args.samples, seq_len=128, batch_size=32, device=args.device)
        table = Table("mode", "precision", "ranks", "device", "solve s (median)", "runs", "‖ΔW‖² kept", title=f"cntinit solve, rank {args.rank}, {store}")
        for mode in args.modes.split(","):
            for precision in args.precision.split(","):
                for vas in (False,) if mode in NO_VAS else (False, True):
                    times = []
                    for _ in range(args.repeat):
                        out = solve(store, Path(scratch) / "solve", Options(mode=mode, rank=args.rank, precision=precision, vas=vas),
                                    device=args.device, overwrite=True)
                        sol = Solution(out)
                        times.append(sol.report["solve_seconds"])
                    row = (mode, precision, "VAS" if vas else "fixed", sol.manifest["device"], f"{statistics.median(times):.2f}",
                           " ".join(f"{t:.2f}" for t in times), "–" if sol.report["kept"] is None else f"{100 * sol.report['kept']:.1f}%")
                    table.add_row(*row)
                    console.err.print(" ".join(row), highlight=False)  # rows as they finish; the table comes at the end
        Console().print(table)


if __name__ == "__main__":
    main()
