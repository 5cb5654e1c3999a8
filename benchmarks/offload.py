"""Peak memory of a normal capture against `--stats-device cpu` and `--offload`, side by side.

    python benchmarks/offload.py                                   # embedded MiniLM, 256 verses (CPU)
    python benchmarks/offload.py --model DIR --data calib.jsonl --device cuda --max-memory cuda=2GiB

Each setting runs in a fresh process (so peaks do not mix) over the same data, or with
--in-process all in this one (imports and start-up once: on a GPU machine whose libraries compile
anew in every process, a minute saved; the GPU peak is reset per setting, the process's is not). Prints wall
seconds, the process's peak resident memory (VmHWM: weights, activations, sums, and the
libraries — the first row shows what importing them alone costs), the peak GPU memory torch
allocated, where the weights were, and the largest difference of Σxxᵀ from the normal run.
Default --max-memory: cpu=1MB on CPU (every weight streamed from disk), on CUDA a quarter of
the checkpoint's size on the GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cntinit import embedded
from peaks import peak_rss
from cntinit.storage.store import Store

SETTINGS = {  # name: extra capture options
    "normal": {},
    "--stats-device cpu": {"stats_device": "cpu"},
    "--offload": {"offload": True},
    "--offload --stats-device cpu": {"offload": True, "stats_device": "cpu"},
}


def run_setting(name: str, args, out: Path) -> float:
    """Capture with setting `name`'s options ("idle": nothing, the imports only); its seconds."""
    from cntinit import capture

    extra = SETTINGS.get(name, {})
    if extra.get("offload"):
        extra = extra | {"max_memory": args.max_memory}
    started = time.perf_counter()
    if name != "idle":
        capture(args.model, args.data, out, targets=args.targets, seq_len=args.seq_len, batch_size=args.batch_size,
                max_samples=args.samples, device=args.device, **extra)
    return time.perf_counter() - started


def gpu_peak(args) -> int | None:
    return torch.cuda.max_memory_allocated() if args.device == "cuda" else None


def weights_on(log: str) -> str:
    """Where the capture's log says the weights were ("device" when it names no placement)."""
    return next((line.split(", weights on ")[1].split(")")[0] for line in log.splitlines() if ", weights on " in line), "device")


def child(args) -> None:
    """One setting in this process; prints its measurements as JSON."""
    seconds = run_setting(args.child, args, args.out)
    print(json.dumps({"seconds": seconds, "rss": peak_rss(), "gpu": gpu_peak(args)}))


def measure_here(name: str, args, out: Path) -> dict:
    """One setting in this process: its seconds, GPU peak (reset before it) and where the weights were."""
    from cntinit import console

    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with console.err.capture() as log:
        seconds = run_setting(name, args, out)
    return {"seconds": seconds, "rss": None, "gpu": gpu_peak(args), "where": weights_on(log.get())}


def measure(name: str, args, out: Path) -> dict:
    """One setting in a fresh process (`child`)."""
    command = [sys.executable, __file__, f"--child={name}", "--out", str(out), "--model", str(args.model), "--data", str(args.data),
               "--targets", args.targets, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--samples", str(args.samples), "--device", args.device, "--max-memory", args.max_memory]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"where": weights_on(done.stderr)}


def default_max_memory(model: Path, device: str) -> str:
    if device != "cuda":
        return "cpu=1MB"
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    return f"cuda={max(1, size // 4)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="local model directory (default: embedded MiniLM)")
    parser.add_argument("--data", default=None, help="calibration data (default: embedded KJV verses)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-memory", default=None, help="--offload limits (default: see above)")
    parser.add_argument("--json", help="also write the table's rows to this JSON file")
    parser.add_argument("--in-process", action="store_true", help="every setting in this process (see above): no peak RSS column")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = Path(args.model or embedded.model_dir())
    args.data = args.data or embedded.data_file()
    args.max_memory = args.max_memory or default_max_memory(args.model, args.device)
    if args.child:
        return child(args)
    title = (f"capture memory: {args.model.name}, {args.samples} samples × {args.seq_len} tokens, {args.device}, "
             f"--max-memory {args.max_memory}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.in_process:
            rows["idle"] = measure("idle", args, Path(tmp) / "idle")
        for name in SETTINGS:
            rows[name] = (measure_here if args.in_process else measure)(name, args, Path(tmp) / name.replace(" ", "_"))
            reference, store = Store(Path(tmp) / "normal"), Store(Path(tmp) / name.replace(" ", "_"))
            rows[name]["drift"], rows[name]["worst"] = max(relative_drift(store, reference, k) for k in reference.keys)
            Console(stderr=True).print(f"{name}: {rows[name]['seconds']:.1f} s", highlight=False)
            if args.json:  # after every setting: a run stopped from outside keeps the settings it measured
                Path(args.json).write_text(json.dumps({"title": title, "rows": table_rows(rows)}, indent=1))
    shown = table_rows(rows)
    table = Table(*shown[0], title=title)
    for row in shown:
        table.add_row(*row.values())
    Console(width=140).print(table)


DRIFT = "max |ΔΣxxᵀ| / max |Σxxᵀ|"


def relative_drift(store: Store, reference: Store, key: str) -> tuple[float, str]:
    """How far a setting's Σxxᵀ is from the normal capture's, relative to its largest entry (an
    absolute figure says nothing: the sums grow with the tokens and the activations' scale)."""
    ours, theirs = store.tensors(key)["xxt"].double(), reference.tensors(key)["xxt"].double()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-300)), key


def table_rows(rows: dict) -> list[dict]:
    out = []
    for name, row in rows.items():
        idle = name == "idle"
        out.append({"setting": "(imports only)" if idle else name, "wall s": f"{row['seconds']:.1f}",
                    "peak RSS MiB": "-" if row["rss"] is None else f"{row['rss'] / 2**20:,.0f}",
                    "peak GPU MiB": "-" if row["gpu"] is None else f"{row['gpu'] / 2**20:,.0f}",
                    "weights on": "-" if idle else row["where"], DRIFT: "-" if idle else f"{row['drift']:.1e}" + (f" ({row['worst']})" if row["drift"] else "")})
    return out


if __name__ == "__main__":
    main()
