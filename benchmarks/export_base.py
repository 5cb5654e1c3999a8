"""Peak memory and time of writing a residual base: file by file from the safetensors checkpoint
(what `export` does) against loading the model whole and saving it (what it did), side by side.

    python benchmarks/export_base.py                              # 16 blocks of width 2048 (1.9 GB in bf16), 500 MB shards
    python benchmarks/export_base.py --blocks 4 --hidden 512 --mlp 1376

A synthetic Llama (random bfloat16 weights) is saved in shards, solved data-free with pissa on
`--targets`, and exported twice, each export in a fresh process: its peak resident memory
(VmHWM), its seconds, and whether the two bases hold the same tensors bit for bit.
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


def child(way: str, solved: Path, out: Path) -> None:
    """One export in this process; prints its seconds and peak memory as JSON."""
    from cntinit import pretrained
    from cntinit.export import export

    if way == "loaded":
        pretrained.Streamed.open = classmethod(lambda cls, *a: None)
    started = time.perf_counter()
    export(solved, out, overwrite=True)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak": peak_rss()}))


def same_bases(a: Path, b: Path) -> bool:
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
    parser.add_argument("--child", nargs=3, metavar=("WAY", "SOLVED", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return

    from cntinit.solve import solve

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        size = build(root / "model", args)
        solve(None, root / "solved", model=root / "model", targets=args.targets, mode="pissa", rank=16)
        rows = {}
        for way in ("streamed", "loaded"):
            done = subprocess.run([sys.executable, __file__, "--child", way, str(root / "solved"), str(root / way)],
                                  capture_output=True, text=True, check=True)
            rows[way] = json.loads(done.stdout.strip().splitlines()[-1])
        equal = same_bases(root / "streamed" / "base", root / "loaded" / "base")
    table = Table(title=f"residual base of a {args.blocks}-block Llama, width {args.hidden} (MLP {args.mlp}), {size / 1e9:.2f} GB "
                        f"in {args.shard} shards, pissa on {args.targets}")
    for column in ("export", "seconds", "peak memory", "bases equal"):
        table.add_column(column)
    for way, row in rows.items():
        table.add_row("file by file (now)" if way == "streamed" else "model loaded whole (before)", f"{row['seconds']:.1f}",
                      f"{row['peak'] / 1e9:.2f} GB", "yes" if equal else "NO")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"model_bytes": size, "rows": [row | {"export": way, "equal": equal}
                                                                              for way, row in rows.items()]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
