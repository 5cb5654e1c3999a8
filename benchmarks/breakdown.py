"""Where cntinit's seconds go, stage by stage: each command a user runs for an init (capture, solve,
export), in-process under cProfile, split into loading the model, reading/fingerprinting the
weights, the data, the statistics (forward/backward), the solve's arithmetic, reading the store and
writing outputs — the first step of matching PEFT on the inits that are a few calls per weight.

    python benchmarks/breakdown.py --model SMOLLM2_DIR --samples 128           # pissa (exact, --niter 4) and lora-ga (both captures)
    python benchmarks/breakdown.py --inits pissa --samples 16                   # the embedded MiniLM, quick

A phase is the cumulative time of the functions named for it, chosen so that none runs inside
another's ("read + fingerprint weights" includes reading them where they are read by name; "solve"
includes reading the store and the weights it needs); "other" is the rest of the command (imports
excluded: they happen before). cProfile adds overhead to Python-heavy code (not to torch kernels):
compare the phases' shares, and the totals against `speed.py`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

PHASES = {  # phase -> (module file suffix, function name) whose cumulative time it is; chosen so that none runs inside another
    "load model": [("models/loading.py", "load"), ("models/pretrained.py", "open_model")],
    "read + fingerprint weights": [("models/fingerprints.py", "fingerprint")],
    "data": [("records/__init__.py", "read"), ("feeds/samples.py", "tokenize")],
    "statistics": [("capture/stream.py", "stream")],
    "solve (reads its inputs)": [("solve/factors.py", "split_all")],
    "write": [("storage/store.py", "finish"), ("solve/stage.py", "_write"), ("export/formats/peft.py", "write"),
              ("models/rewrite.py", "rewrite")],  # the residual base, W − BA computed as each weight is written
}
NESTED = {"load model"}  # open_model calls loading.load where it does not read the weights by name: the outer one counts

INITS = {  # init -> the commands a user runs, as (stage, arguments) for the Python API
    "pissa": [("solve", {"mode": "pissa"}), ("export", {})],
    "pissa --niter 4": [("solve", {"mode": "pissa", "niter": 4}), ("export", {})],
    "lora-ga": [("capture", {"gradients": True}), ("solve", {"mode": "lora-ga"}), ("export", {})],
    "lora-ga --gradients-only --niter 4": [("capture", {"gradients_only": True}), ("solve", {"mode": "lora-ga", "niter": 4}), ("export", {})],
}


def phases(profile: cProfile.Profile) -> dict[str, float]:
    """Seconds per phase: the cumulative time of its functions (of the outermost, for a phase whose functions nest)."""
    stats = pstats.Stats(profile).stats
    out = {}
    for phase, functions in PHASES.items():
        times = [cumulative for (file, _, name), (_, _, _, cumulative, _) in stats.items()
                 if any(file.endswith(suffix) and name == wanted for suffix, wanted in functions)]
        out[phase] = max(times, default=0.0) if phase in NESTED else sum(times)
    return out


def run(stage: str, options: dict, args, scratch: Path, model: Path, data: Path) -> tuple[float, dict[str, float]]:
    from cntinit import capture, export, solve
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    if stage == "capture":
        capture(model, data, scratch / "stats", targets=args.targets, max_samples=args.samples, seq_len=args.seq_len,
                batch_size=args.batch_size, overwrite=True, **options)
    elif stage == "solve":
        source = scratch / "stats" if options["mode"] == "lora-ga" else None
        solve(source, scratch / "init", model=None if source else model, targets=None if source else args.targets, rank=args.rank,
              overwrite=True, **options)
    else:
        export(scratch / "init", scratch / "adapter", overwrite=True)
    profile.disable()
    return time.perf_counter() - started, phases(profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: the embedded MiniLM; lora-ga needs a causal LM)")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--inits", default=",".join(INITS), help=f"comma-separated, of {', '.join(INITS)}")
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    from cntinit import console, embedded
    console.quiet = True
    model, data = args.model or embedded.model_dir(), args.data or embedded.data_file()
    rows = []
    for init in args.inits.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            for stage, options in INITS[init]:
                seconds, split = run(stage, options, args, Path(tmp), model, data)
                rows.append({"init": init, "stage": stage, "seconds": round(seconds, 2)} | {k: round(v, 2) for k, v in split.items()}
                            | {"other": round(seconds - sum(split.values()), 2)})
    table = Table("init", "stage", "seconds", *PHASES, "other", title=f"where the seconds go ({model.name}, {args.targets}, rank {args.rank})")
    for row in rows:
        table.add_row(*(str(row[k]) for k in ("init", "stage", "seconds", *PHASES, "other")))
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
