"""Capture throughput with 1, 2, ... processes under torchrun, side by side on the same data.

    python benchmarks/scaling.py                                  # embedded MiniLM, 512 verses, 1 and 2 processes (CPU)
    python benchmarks/scaling.py --model DIR --data calib.jsonl --processes 1,2,4,8 --device cuda

Each run is a fresh `torchrun --standalone --nproc-per-node N -m cntinit capture ...`, timed
whole (start-up and model loading included); on CPU every process gets cores ÷ N threads so
the runs use the same cores. Prints wall seconds, tokens per second and the speed-up over one
process, and checks that every run's statistics agree with the first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cntinit import embedded
from cntinit.storage.store import Store


def run(processes: int, args, out: Path) -> float:
    threads = max(1, (os.cpu_count() or 1) // processes) if args.device == "cpu" else 1
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m", "cntinit",
               "capture", str(args.model), "--data", str(args.data), "--out", str(out), "--targets", args.targets,
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--max-samples", str(args.samples),
               "--device", args.device, "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="local model directory (default: embedded MiniLM)")
    parser.add_argument("--data", default=None, help="calibration data (default: embedded KJV verses)")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.model = args.model or embedded.model_dir()
    args.data = args.data or embedded.data_file()
    counts = [int(n) for n in args.processes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            seconds = run(n, args, Path(tmp) / f"p{n}")
            store = Store(Path(tmp) / f"p{n}")
            tokens = store.manifest["data"]["tokens"]
            reference = Store(Path(tmp) / f"p{counts[0]}")
            key = reference.keys[0]
            drift = float((store.tensors(key)["xxt"].double() - reference.tensors(key)["xxt"].double()).norm()
                          / reference.tensors(key)["xxt"].double().norm())
            rows.append((n, seconds, tokens / seconds, drift))
    table = Table("processes", "wall s", "tokens/s", "speed-up", "Σxxᵀ vs first (rel.)",
                  title=f"capture scaling: {Path(args.model).name}, {args.samples} samples, {args.device}")
    for n, seconds, rate, drift in rows:
        table.add_row(str(n), f"{seconds:.1f}", f"{rate:,.0f}", f"{rows[0][1] / seconds:.2f}×", f"{drift:.1e}")
    Console().print(table)


if __name__ == "__main__":
    main()
