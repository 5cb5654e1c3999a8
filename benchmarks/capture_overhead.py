"""Capture time divided by plain forward time, same model, same batches, one run.

    python benchmarks/capture_overhead.py                       # embedded MiniLM on KJV verses
    python benchmarks/capture_overhead.py --model DIR --data calib.jsonl
    python benchmarks/capture_overhead.py --synthetic llama-1b  # random weights, random tokens (GPU)

Prints a table: forward seconds, capture seconds and their ratio, for attention targets
(q/k/v/o) and for all-linear. Targets: ≤ 1.3× (attention), ≤ 2× (all-linear).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

from cntinit import embedded, records
from cntinit.capture.feeds import samples as data
from cntinit.capture.recorder import Recorder, exact_float32, shared_input_groups
from cntinit.capture.stage import ACCUMULATE
from cntinit.models import linears, loading, placement

COLUMNS = ("targets", "modules", "statistics", "forward s", "capture s", "ratio", "target")
ATTENTION = {"q_proj": "q_proj,k_proj,v_proj,o_proj", "query": "query,key,value,attention.output.dense"}
SYNTHETIC = {  # Llama shapes; weights are random, which does not change the timing
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "llama-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "width-512": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=8),
}


def save_synthetic(directory: Path, shape: str, device: str, dtype: torch.dtype, layers: int | None = None) -> Path:
    """A Llama of `shape` with random weights (built on `device`), saved with the embedded model's
    tokenizer: a model directory of real shapes that needs no download."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded.model_dir())
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, architectures=["LlamaForCausalLM"],
                                      **SYNTHETIC[shape] | ({"num_hidden_layers": layers} if layers else {}))
    torch.manual_seed(0)
    with torch.device(device):
        net = transformers.LlamaForCausalLM(config).to(dtype)
    net.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del net
    if device == "cuda":
        torch.cuda.empty_cache()
    return Path(directory)


def load(args, device):
    if args.synthetic:
        config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SYNTHETIC[args.synthetic])
        torch.manual_seed(0)
        with torch.device(device):
            net = transformers.LlamaForCausalLM(config).to(placement.DTYPES.get(args.dtype, torch.bfloat16)).eval()
        rng = random.Random(0)
        sequences = [[rng.randrange(32000) for _ in range(rng.randint(args.seq_len // 2, args.seq_len))] for _ in range(args.samples)]
        return net.requires_grad_(False), sequences, 0
    net, tokenizer = loading.load(args.model or embedded.model_dir())
    net.to(device, placement.resolve_dtype(args.dtype, net.dtype, device))
    samples = records.read(args.data or embedded.data_file(), max_samples=args.samples).samples
    sequences = data.tokenize(samples, tokenizer, args.seq_len)
    return net, sequences, tokenizer.pad_token_id or 0


def seconds(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def side_by_side(first, second, device, repeat):
    """Medians of alternating runs, so drift in machine speed hits both alike."""
    pairs = [(seconds(first, device), seconds(second, device)) for _ in range(repeat)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local transformers model directory (default: embedded MiniLM)")
    parser.add_argument("--data", help="calibration .jsonl/.txt (default: embedded KJV verses)")
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="random-weight Llama of this shape with random tokens")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--accumulate", default="float32", choices=sorted(ACCUMULATE))
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (median reported) after one warm-up")
    parser.add_argument("--json", help="also write the table's rows to this JSON file")
    args = parser.parse_args()
    device = placement.resolve_device(args.device)
    net, sequences, pad_id = load(args, device)
    batches = [(ids, mask) for ids, mask, _ in data.batches(sequences, args.batch_size, pad_id)]
    tokens = sum(len(s) for s in sequences)
    root = linears.forward_root(net, list(linears.select_targets(net, linears.ALL_LINEAR)))
    suffixes = {linears.module_kind(name) for name in linears.linear_modules(net)}
    attention = next(v for k, v in ATTENTION.items() if any(s.endswith(k) for s in suffixes))

    def forward():
        with exact_float32(), torch.inference_mode():
            for ids, mask in batches:
                root(input_ids=ids.to(device), attention_mask=mask.to(device))

    rows = []
    table = Table(title=f"capture / forward on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
                        f"{type(net).__name__} {next(net.parameters()).dtype}, {len(sequences)} seqs, {tokens:,} tokens")
    for column in COLUMNS:
        table.add_column(column)
    for label, targets, goal in (("attention", attention, 1.3), ("all-linear", linears.ALL_LINEAR, 2.0)):
        modules = linears.select_targets(net, targets)
        probe = torch.tensor([sequences[0][:8]], device=device)
        groups = shared_input_groups(modules, lambda: root(input_ids=probe, attention_mask=torch.ones_like(probe)))
        recorder = Recorder(modules, groups, 1, ACCUMULATE[args.accumulate], device, root=root)

        def capture():
            with recorder, exact_float32(), torch.inference_mode():
                for ids, mask in batches:
                    recorder.run({"input_ids": ids, "attention_mask": mask}, mask, 0)

        forward(), capture()  # warm-up
        plain, captured = side_by_side(forward, capture, device, args.repeat)
        ratio = captured / plain
        rows.append(dict(zip(COLUMNS, (label, str(len(modules)), str(len(recorder.stats)), f"{plain:.3f}", f"{captured:.3f}",
                                       f"{ratio:.2f}×", f"≤ {goal}× {'ok' if ratio <= goal else 'MISSED'}"))))
        table.add_row(*rows[-1].values())
        del recorder
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"title": table.title, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
