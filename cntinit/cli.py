"""The command line: thin glue over the Python API. Results go to stdout, everything else to stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import console, embedded
from .capture import capture as run_capture
from .errors import CntinitError
from .store import Store
from .store import merge as run_merge

app = typer.Typer(
    help="Data-driven LoRA initializations: capture activation statistics, solve inits, export adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

QUIET = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr.")
JSON = typer.Option(False, "--json", help="Print a JSON summary on stdout instead of the output path.")


def _finish(path: Path, as_json: bool) -> None:
    """stdout carries only the path (so `$(cntinit capture ...)` composes), or a JSON summary."""
    if as_json:
        typer.echo(json.dumps(summary(Store(path, verify=False)), indent=2))
    else:
        typer.echo(str(path))


def summary(store: Store) -> dict:
    m = store.manifest
    return {
        "path": str(store.path),
        "format": m["format"],
        "format_version": m["format_version"],
        "model": m["model"],
        "data": m["data"],
        "capture": m["capture"],
        "modules": len(m["modules"]),
        "statistics": len(m["stats"]),
        "bytes": sum(f["bytes"] for f in m["files"].values()),
    }


@app.command()
def capture(
    model: Path = typer.Argument(..., help="Local transformers model directory (config.json, weights, tokenizer)."),
    data: str = typer.Option(..., "--data", "-d", help="A .jsonl (field `text` or chat `messages`), a .txt (one sample per line), a directory of them, or - for JSONL on stdin."),
    out: Path = typer.Option(..., "--out", "-o", help="Store directory to write."),
    targets: str = typer.Option("all-linear", "--targets", "-t", help="Comma-separated module-name suffixes (q_proj,v_proj) or all-linear (every linear layer but the output head)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence; longer samples are truncated."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Sequences per forward pass."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", "-n", help="Use only the first N samples."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present), cpu, or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: auto (checkpoint's on GPU, float32 on CPU), float32, bfloat16, float16."),
    buckets: int = typer.Option(1, "--buckets", help="Keep K partial sums over consecutive slices of the data (for the robust estimate)."),
    pack: bool = typer.Option(False, "--pack", help="Concatenate samples and cut them into --seq-len pieces instead of one sample per sequence."),
    accumulate: str = typer.Option("float32", "--accumulate", help="Precision of the sums: float32 or float64."),
    text_field: str = typer.Option("text", "--text-field", help="JSONL field holding the text."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it is not a store of this model."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model directory's own Python code to run."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Stream calibration data through MODEL and save per-layer input statistics (Σxxᵀ, Σx, n).

    Examples:

      cntinit capture ./Llama-3.2-1B --data calib.jsonl --targets q_proj,k_proj,v_proj,o_proj --out stats/

      cat calib.jsonl | cntinit capture ./model --data - --out stats/ --buckets 4
    """
    console.quiet = quiet
    path = run_capture(
        model, data, out, targets=targets, seq_len=seq_len, batch_size=batch_size, max_samples=max_samples,
        device=device, dtype=dtype, buckets=buckets, pack=pack, accumulate=accumulate, text_field=text_field,
        overwrite=overwrite, trust_remote_code=trust_remote_code,
    )
    _finish(path, as_json)


@app.command()
def merge(
    stores: list[Path] = typer.Argument(..., help="Two or more stores of the same model and targets."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged store directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it is not a store of this model."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Sum statistics stores of one model (shards of one calibration set) into one.

    Example:  cntinit merge stats-0 stats-1 stats-2 --out stats
    """
    console.quiet = quiet
    _finish(run_merge(stores, out, overwrite), as_json)


@app.command()
def inspect(
    directory: Path = typer.Argument(..., help="A statistics store."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check payload checksums."),
) -> None:
    """Show what a store holds: model, data, options, and each statistics entry."""
    store = Store(directory, verify=verify)
    if as_json:
        typer.echo(json.dumps(store.manifest, indent=2))
        return
    print_store(store, Console())


def print_store(store: Store, out: Console) -> None:
    s = summary(store)
    out.print(f"[bold]{s['path']}[/]  {s['format']} v{s['format_version']}")
    out.print(f"model  {s['model']['class']} at {s['model']['path']}  ({s['model']['fingerprint'][:19]}…)")
    d = s["data"]
    out.print(f"data   {d['samples']:,} samples, {d['sequences']:,} sequences, {d['tokens']:,} tokens  ({d['fingerprint'][:19]}…)")
    c = s["capture"]
    out.print(f"capture  targets={c['targets']} seq_len={c['seq_len']} buckets={c['buckets']} dtype={c['dtype']} accumulate={c['accumulate']}")
    table = Table("statistics key", "dim", "count", "modules reading it")
    for key, entry in store.manifest["stats"].items():
        short = [name.rsplit(".", 1)[-1] for name in entry["modules"]]
        table.add_row(key, str(entry["dim"]), f"{entry['count']:,}", ", ".join(short))
    out.print(table)
    out.print(f"{s['modules']} modules, {s['statistics']} statistics, {s['bytes'] / 2**20:.1f} MiB")


@app.command()
def demo(
    out: Path = typer.Option(Path("cntinit-demo"), "--out", "-o", help="Directory for the demo's outputs."),
    samples: int = typer.Option(512, "--samples", "-n", help="Calibration verses to use."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Run the main job end to end on the embedded default: all-MiniLM-L6-v2 over KJV verses."""
    stats_dir = out / "stats"
    run_capture(embedded.model_dir(), embedded.data_file(), stats_dir, max_samples=samples, seq_len=128,
                batch_size=32, device=device, overwrite=True)
    print_store(Store(stats_dir), console.err)
    typer.echo(str(stats_dir))


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv)
    except CntinitError as exc:
        console.err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.err.print("[bold red]interrupted[/]")
        sys.exit(130)
