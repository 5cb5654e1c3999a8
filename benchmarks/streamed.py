"""Peak memory and time of solve, export and `export --check` reading a safetensors model by name
(each target's W when it is needed; the residual base written file by file; the check a chunk of
modules at a time), against loading the model whole (what they did), side by side.

    python benchmarks/streamed.py                              # 16 blocks of width 2048 (1.9 GB in bf16), 500 MB shards
    python benchmarks/streamed.py --blocks 4 --hidden 512 --mlp 1376

A synthetic Llama (random bfloat16 weights) is saved in shards; a data-free pissa solve of
`--targets`, the export of its residual base and the check of that export each run twice, each in
a fresh process: peak resident memory (VmHWM), seconds, and whether both ways wrote the same
tensors bit for bit (for the check: measured the same largest error).
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
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from peaks import peak_rss  # noqa: E402


def build(directory: Path, args) -> int:
    """A bf16 Llama of the asked shape saved in shards; returns its bytes on disk."""
    import transformers

    from cntinit import embedded

    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded.model_dir())
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                                      num_hidden_layers=args.blocks, num_attention_heads=args.hidden // 64,
                                      num_key_value_heads=args.hidden // 64, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, max_shard_size=args.shard)
    tokenizer.save_pretrained(directory)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def child(stage: str, way: str, source: Path, out: Path, targets: str) -> None:
    """One solve, export or check in this process; prints its seconds and peak memory as JSON."""
    from cntinit.export import export, verify
    from cntinit.models import pretrained
    from cntinit.solve import solve

    if way == "loaded":
        pretrained.Streamed.open = classmethod(lambda cls, *a: None)
    started = time.perf_counter()
    error = None
    if stage == "solve":
        solve(None, out, model=source, targets=targets, mode="pissa", rank=16)
    elif stage == "export":
        export(source, out)
    else:
        error = verify(source, json.loads((source / "manifest.json").read_text())["solve"]["path"])
    print(json.dumps({"seconds": time.perf_counter() - started, "peak": peak_rss(), "error": error}))


def same_tensors(a: Path, b: Path) -> bool:
    """Whether the safetensors files in `a` and in `b` hold the same tensors, bit for bit."""
    def tensors(directory: Path) -> dict[str, Path]:
        found = {}
        for file in directory.glob("*.safetensors"):
            with safe_open(file, framework="pt") as handle:
                found |= dict.fromkeys(handle.keys(), file)
        return found

    left, right = tensors(a), tensors(b)
    if left.keys() != right.keys():
        return False
    for key in left:
        with safe_open(left[key], framework="pt") as x, safe_open(right[key], framework="pt") as y:
            if not torch.equal(x.get_tensor(key), y.get_tensor(key)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard", default="500MB", help="the checkpoint's shard size (save_pretrained's max_shard_size)")
    parser.add_argument("--targets", default="q_proj,down_proj")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child", nargs=4, metavar=("STAGE", "WAY", "SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child[:2], Path(args.child[2]), Path(args.child[3]), args.targets)
        return

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        size = build(root / "model", args)
        for stage, source, written in (("solve", "model", ""), ("export", "solve-streamed", "base"), ("check", "export-streamed", None)):
            for way in ("streamed", "loaded"):
                done = subprocess.run([sys.executable, __file__, "--targets", args.targets, "--child", stage, way, str(root / source),
                                       str(root / f"{stage}-{way}")], capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(done.stderr[-3000:])
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"stage": stage, "way": way})
            equal = rows[-1]["error"] == rows[-2]["error"] if written is None else \
                same_tensors(root / f"{stage}-streamed" / written, root / f"{stage}-loaded" / written)
            for row in rows[-2:]:
                row["equal"] = equal
    table = Table(title=f"pissa on {args.targets} of a {args.blocks}-block Llama, width {args.hidden} (MLP {args.mlp}), "
                        f"{size / 1e9:.2f} GB in {args.shard} shards")
    for column in ("stage", "weights", "seconds", "peak memory", "same tensors (check: error)"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["stage"], "read by name (now)" if row["way"] == "streamed" else "model loaded whole (before)",
                      f"{row['seconds']:.1f}", f"{row['peak'] / 1e9:.2f} GB",
                      ("yes" if row["equal"] else "NO") + (f" ({row['error']:.1e})" if row["error"] is not None else ""))
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"model_bytes": size, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
