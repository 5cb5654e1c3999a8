"""What every stage pays per weight and per statistic at 70B widths, the naive way against cntinit's, side by side.

    python benchmarks/fixed_costs.py                   # Llama-3-70B widths (8192, MLP 28672), one block
    python benchmarks/fixed_costs.py --hidden 512 --mlp 1376

Every capture, solve and export fingerprints every target weight (sha256 over float32 values)
and checks it finite; a capture turns each Σxxᵀ's upper triangle into the full matrix and checks
it finite before writing it. At 70B widths one block holds 3.4 GB of float32 weights and a
28672² Σ of 3.3 GB, so these costs, nothing at small widths, add up over 80 blocks; the first solve
after a capture checks the sha256 of every statistics payload. Each row
times the naive way (cntinit's code until 2026-11-27) and cntinit's on the same tensors, in one
process, and reads the peak memory each adds (VmHWM, reset before each call).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cntinit.capture.stats import symmetrize
from cntinit.finite import all_finite
from cntinit.models import fingerprints
from cntinit.storage import memo


def rss() -> int:
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def measured(fn) -> tuple[object, float, int]:
    """(result, seconds, peak bytes above the memory held before the call)."""
    with open("/proc/self/clear_refs", "w") as refs:  # resets VmHWM to the current RSS
        refs.write("5")
    before = rss()
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started, _status("VmHWM") - before


def naive_symmetrize(upper: torch.Tensor) -> torch.Tensor:
    return upper.triu() + upper.triu(1).transpose(-2, -1)


def naive_fingerprint(modules: dict[str, torch.nn.Module]) -> str:
    digest = hashlib.sha256()
    for name in sorted(modules):
        weight = modules[name].weight.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(name)
        digest.update(f"{name}:{tuple(weight.shape)}\n".encode())
        digest.update(weight.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def payloads(directory: Path, sizes: list[int]) -> list[Path]:
    """Files of these sizes, as a capture's store holds them: one block's three hidden-width Σ (q/k/v,
    o and gate/up inputs) share a file, the MLP-width Σ has its own (over the 2 GiB a file holds)."""
    chunk = torch.randn(2**22).numpy().tobytes()  # 16 MiB; sha256 runs at one speed whatever the bytes
    files = []
    for number, size in enumerate(sizes):
        files.append(directory / f"stats-{number + 1:05d}.safetensors")
        with open(files[-1], "wb") as handle:
            for start in range(0, size, len(chunk)):
                handle.write(chunk[: size - start])
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--mlp", type=int, default=28672)
    parser.add_argument("--kv", type=int, default=1024, help="k/v projection width (Llama-3-70B: 8 heads × 128)")
    parser.add_argument("--store-blocks", type=int, default=2, help="blocks of statistics payloads to checksum (4.1 GB a block at 70B widths)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    h, m = args.hidden, args.mlp
    torch.manual_seed(0)
    shapes = {"q_proj": (h, h), "k_proj": (args.kv, h), "v_proj": (args.kv, h), "o_proj": (h, h),
              "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}
    block = {name: torch.nn.Linear(i, o, bias=False, dtype=torch.bfloat16) for name, (o, i) in shapes.items()}
    gigabytes = sum(o * i for o, i in shapes.values()) * 4 / 1e9
    rows = []

    def compare(what: str, naive, ours, same) -> None:
        """`same`: how to check both ways computed one result; None where they compute different things."""
        a, naive_s, naive_peak = measured(naive)
        b, ours_s, ours_peak = measured(ours)
        if same is not None and not same(a, b):
            raise SystemExit(f"{what}: the two ways disagree")
        rows.append({"what": what, "naive s": f"{naive_s:.2f}", "cntinit s": f"{ours_s:.2f}", "speed-up": f"{naive_s / ours_s:.1f}×",
                     "naive peak MiB": f"{naive_peak / 2**20:,.0f}", "cntinit peak MiB": f"{ours_peak / 2**20:,.0f}"})
        Console(stderr=True).print(rows[-1], highlight=False)

    compare(f"fingerprint of one block's 7 weights (bf16, {gigabytes:.1f} GB as float32), one stream (stores before 2026-11-27)",
            lambda: naive_fingerprint(block), lambda: fingerprints.fingerprint(block, scheme=fingerprints.LEGACY), str.__eq__)
    compare(f"fingerprint of the same weights, a sha256 per weight ({memo.threads()} threads)",
            lambda: naive_fingerprint(block), lambda: fingerprints.fingerprint(block), None)
    weight = block["down_proj"].weight.detach().float()
    compare(f"finite check of a {h}×{m} float32 weight", lambda: bool(torch.isfinite(weight).all()), lambda: all_finite(weight),
            bool.__eq__)
    del weight, block
    upper = torch.randn(m, m)
    compare(f"Σ of {m}² from its upper triangle ({upper.numel() * 4 / 1e9:.1f} GB; cntinit's in place, as capture does)",
            lambda: naive_symmetrize(upper), lambda: symmetrize(upper, in_place=True), torch.equal)
    with tempfile.TemporaryDirectory() as scratch:  # what the first solve after a capture verifies
        files = payloads(Path(scratch), [3 * h * h * 4, m * m * 4] * args.store_blocks)
        size = sum(f.stat().st_size for f in files) / 1e9
        compare(f"checksums of {args.store_blocks} blocks' statistics payloads ({len(files)} files, {size:.1f} GB, in the page cache): "
                f"one stream (until 2026-12-07), side by side ({memo.threads()} threads)",
                lambda: [memo.sha256(f) for f in files], lambda: memo.sha256_each(files, None), list.__eq__)
    title = f"fixed costs per block at widths {h}/{m} (k/v {args.kv}), CPU ({torch.get_num_threads()} threads)"
    table = Table(*rows[0], title=title)
    for row in rows:
        table.add_row(*row.values())
    Console(width=160).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
