"""Normal against layerwise capture of the same data at growing depth: wall time and peak memory.

    python benchmarks/layerwise.py                                   # CPU: Llama of width 512, 4/8/16/32 blocks
    python benchmarks/layerwise.py --shape llama-70b --blocks 2,3 --modes layerwise --device cuda   # 70B widths, per block

Synthetic Llamas of one width and several depths (random weights saved as safetensors, the
embedded model's tokenizer), all-linear, the same KJV verses. Every capture runs in a fresh
process; peak memory is the process's max RSS on CPU, `torch.cuda.max_memory_allocated` on a
GPU. Targets: layerwise peak memory flat in depth (within 10% from the shallowest to the
deepest) while the normal capture's grows, and layerwise wall time ≤ 1.1× the normal one's.
With two depths or more, the time of one more block is the slope between the deepest two.

`--solve-offload SIZE` then solves (cnt-s) the deepest layerwise store with `--offload
--max-memory cpu=SIZE` and without, and prints each one's peak RSS. `--gradients` captures the
loss gradients too (LoRA-GA's): the whole model's backward against the block-by-block one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from capture_overhead import SYNTHETIC, save_synthetic
from peaks import peak_rss


def child(args) -> None:
    """One capture (or solve) in this process; prints its measurements as JSON."""
    from cntinit import capture, console, embedded, solve

    console.quiet = True
    cuda = args.device == "cuda"
    started = time.perf_counter()
    if args.child == "solve":
        solve(args.model, args.out, mode="cnt-s", rank=8, offload=args.max_memory is not None, max_memory=args.max_memory)
    else:
        capture(args.model, embedded.data_file(), args.out, max_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                device=args.device, layerwise=args.child == "layerwise", gradients=args.gradients, overwrite=True)
    print(json.dumps({"seconds": time.perf_counter() - started,
                      "rss": peak_rss(),
                      "gpu": torch.cuda.max_memory_allocated() if cuda else None}))


def measure(what: str, model: Path, out: Path, args, max_memory: str | None = None) -> dict:
    command = [sys.executable, __file__, f"--child={what}", "--model", str(model), "--out", str(out), "--device", args.device,
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               *(["--gradients"] if args.gradients else [])]
    done = subprocess.run(command + (["--max-memory", max_memory] if max_memory else []), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{what} of {model.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="width-512", choices=sorted(SYNTHETIC), help="widths of the synthetic Llama")
    parser.add_argument("--blocks", default="4,8,16,32", help="comma-separated depths")
    parser.add_argument("--modes", default="normal,layerwise", help="normal, layerwise or both")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--solve-offload", metavar="SIZE", help="also solve the deepest store with --offload --max-memory cpu=SIZE")
    parser.add_argument("--gradients", action="store_true", help="capture the loss gradients too (--gradients)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    depths, modes = [int(b) for b in args.blocks.split(",")], args.modes.split(",")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    title = (f"normal vs layerwise capture{' --gradients' if args.gradients else ''}: {args.shape} widths, {args.samples} KJV verses × "
             f"≤{args.seq_len} tokens, all-linear, {args.device}, peak {'GPU allocated' if args.device == 'cuda' else 'RSS'}")
    results, solved = {}, []

    def write():  # after every depth: a run stopped from outside keeps the depths it measured
        if args.json:
            Path(args.json).write_text(json.dumps({"title": title, "rows": table_rows(results, depths, modes, args.device) + solved},
                                                  indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        for depth in depths:
            model = save_synthetic(Path(tmp) / f"model-{depth}", args.shape, args.device, dtype, layers=depth)
            for mode in modes:
                results[mode, depth] = measure(mode, model, Path(tmp) / f"stats-{mode}-{depth}", args)
                Console(stderr=True).print(f"{mode} {depth} blocks: {results[mode, depth]['seconds']:.1f} s", highlight=False)
            write()
            if depth != depths[-1]:  # only the deepest is kept (for --solve-offload)
                for mode in modes:
                    shutil.rmtree(Path(tmp) / f"stats-{mode}-{depth}")
                shutil.rmtree(model)
        if args.solve_offload:
            store = Path(tmp) / f"stats-{modes[-1]}-{depths[-1]}"
            for label, limit in (("solve", None), (f"solve --offload --max-memory cpu={args.solve_offload}", f"cpu={args.solve_offload}")):
                r = measure("solve", store, Path(tmp) / "solved", args, limit)
                solved.append({"blocks": f"{label} ({depths[-1]} blocks)", "layerwise s": f"{r['seconds']:.2f}",
                               "layerwise peak MiB": f"{r['rss'] / 2**20:,.0f} (RSS)"})
                write()
    rows = table_rows(results, depths, modes, args.device) + solved
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    Console(width=180).print(table)


def table_rows(results: dict, depths: list[int], modes: list[str], device: str) -> list[dict]:
    """One row per depth measured in every mode, then each mode's peak ratio and the time of one more block."""
    peak = "gpu" if device == "cuda" else "rss"
    depths = [d for d in depths if all((mode, d) in results for mode in modes)]
    rows = []
    for depth in depths:
        row = {"blocks": depth}
        for mode in modes:
            r = results[mode, depth]
            row |= {f"{mode} s": f"{r['seconds']:.2f}", f"{mode} peak MiB": f"{r[peak] / 2**20:,.0f}"}
        if len(modes) == 2:
            row["time ratio"] = f"{results['layerwise', depth]['seconds'] / results['normal', depth]['seconds']:.2f}×"
        rows.append(row)
    for mode in modes if len(depths) > 1 else []:
        low, high = results[mode, depths[0]][peak], results[mode, depths[-1]][peak]
        rows.append({"blocks": f"{mode}: peak {depths[-1]} / {depths[0]} blocks", f"{mode} peak MiB": f"{high / low:.2f}×"})
        slope = (results[mode, depths[-1]]["seconds"] - results[mode, depths[-2]]["seconds"]) / (depths[-1] - depths[-2])
        rows.append({"blocks": f"{mode}: one more block", f"{mode} s": f"{slope:.2f}"})
    return rows


if __name__ == "__main__":
    main()
