"""How far a 4-bit base starts from the pretrained model: plain QLoRA (NF4(W), adapter B = 0) against
QPiSSA (`pissa --quantize nf4`) and LoftQ (`--mode loftq`, 1 and 5 iterations), through the real
solve and export, with the trainer's quantizer (bitsandbytes) reading each exported base.

    python benchmarks/quantized.py --model SMOLLM2_DIR          # all-linear, rank 16, 32 held-out verses

Per init: the median and worst module of ‖W − Q − BA‖/‖W‖, and the initial model's logits against
the pretrained model's on held-out text (relative error, top-1 agreement) — with bitsandbytes'
default single quantization and with `bnb_4bit_use_double_quant` (its block maxima quantized to
8 bits, which moves Q off what the adapter was fitted to).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import bitsandbytes.functional as bnb
import torch
import transformers
from rich.console import Console
from rich.table import Table

from cntinit import console, embedded, export, records, solve
from cntinit.capture.feeds import samples as data
from cntinit.models import linears, loading
from cntinit.solve.solution import Solution

INITS = {"QLoRA (NF4(W), B = 0)": None, "QPiSSA (pissa --quantize nf4)": {"mode": "pissa", "quantize": "nf4"},
         "LoftQ, 1 iteration": {"mode": "loftq"}, "LoftQ, 5 iterations": {"mode": "loftq", "loftq_iter": 5}}


def initial_weights(base_dir: Path, names: list[str], double: bool) -> dict[str, torch.Tensor]:
    """What a 4-bit trainer computes with: each exported base weight quantized by bitsandbytes and dequantized."""
    net, _ = loading.load(base_dir)
    out = {}
    for name in names:
        weight = net.get_submodule(name).weight.detach()
        packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double)
        out[name] = bnb.dequantize_4bit(packed, state).float()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local causal LM directory (bfloat16 checkpoints are what QLoRA users have)")
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=32, help="verses of the embedded data, from its end, for the logits")
    args = parser.parse_args()
    console.quiet = True
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    samples = records.read(embedded.data_file()).samples[-args.held_out:]
    ids, mask, _ = next(data.batches(data.tokenize(samples, tokenizer, 64), args.held_out, tokenizer.pad_token_id or 0))
    names = list(linears.select_targets(pretrained, args.targets))
    with torch.no_grad():
        reference = pretrained(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    originals = {name: pretrained.get_submodule(name).weight.detach().clone() for name in names}
    table = Table("init", "bnb double quant", "‖W−Q−BA‖/‖W‖ median", "worst module", "logits rel. error", "top-1 agreement",
                  title=f"4-bit bases: {Path(args.model).name}, {args.targets} ({len(names)} modules), rank {args.rank}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for label, options in INITS.items():
            if options is None:  # plain QLoRA: the pretrained checkpoint, quantized at load
                base_dir, updates = Path(args.model), {name: torch.zeros_like(originals[name]) for name in names}
            else:
                solved = solve(None, scratch / "solve", model=args.model, targets=args.targets, rank=args.rank, overwrite=True, **options)
                exported = export(solved, scratch / "export", overwrite=True)
                base_dir = exported / "base"
                updates = {name: (b.double() @ a.double()).float() for name, (b, a) in Solution(solved).factors().items()}
            for double in (False, True):
                quantized = initial_weights(base_dir, names, double)
                errors = []
                with torch.no_grad():
                    for name in names:
                        initial = quantized[name] + updates[name]
                        w = originals[name]
                        errors.append(float((w - initial).norm() / w.norm()))
                        pretrained.get_submodule(name).weight.copy_(initial)
                    logits = pretrained(input_ids=ids, attention_mask=mask).logits[mask.bool()]
                    for name in names:
                        pretrained.get_submodule(name).weight.copy_(originals[name])
                table.add_row(label, "on" if double else "off", f"{statistics.median(errors):.4f}", f"{max(errors):.4f}",
                              f"{float((logits - reference).norm() / reference.norm()):.4f}",
                              f"{float((logits.argmax(-1) == reference.argmax(-1)).float().mean()):.3f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
