"""cntinit against PEFT's own data-driven and SVD inits, side by side on one model and one data set.

    python benchmarks/speed.py                                   # embedded MiniLM, 256 KJV verses, CPU or GPU
    python benchmarks/speed.py --model DIR --data calib.jsonl --device cuda --targets q_proj,v_proj
    python benchmarks/speed.py --model DIR --inits pissa_niter_4,lora-ga_niter_4 --rounds 3   # the close rows, median of 3

Every step runs in its own fresh process (so each has its own peak memory: max RSS on CPU,
peak allocated on CUDA) and times the whole job as a user runs it, from files on disk: loading
the model, reading and tokenizing the data, the work, and (cntinit) writing its output; Python
imports excluded. cntinit captures once and solves cnt-x, corda and eva from that one capture;
PEFT runs `preprocess_corda` (one sample per forward, as it requires) and `get_eva_state_dict`
(batches) on the same tokenized samples, and `init_lora_weights="pissa"`, `"pissa_niter_4"`, `"olora"`,
`"mica"`, `"loftq"` (4 bits, 1 iteration) against `solve --mode` of the same. On a causal LM, also
LoRA-GA: `capture --gradients` + `solve --mode lora-ga` (exact, and `--niter 4`: PEFT's own
randomized SVD) against PEFT's `preprocess_loraga` (the same batches, one backward each) +
`init_lora_weights="lora_ga"`. Same target modules everywhere.

The "end to end" rows add `export` (a PEFT adapter, and the residual base where the init changes
the base weights: what a trainer loads) to cntinit's capture and solve: every command a user runs,
against PEFT's init in one process (which writes nothing: its trainer goes on in that process).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from peaks import peak_rss

# MiniLM's linears but the pooler: PEFT's CorDA hook squeezes the batch dimension, so a 2-D input
# (the pooler sees one token per sequence) becomes a vector and its covariance a scalar.
EMBEDDED_TARGETS = "query,key,value,intermediate.dense,output.dense"
PEERS = ["pissa", "pissa_niter_4", "olora", "mica", "loftq", "corda", "eva"]  # modes PEFT also computes; lora-ga below
READS = {"cnt-x": "capture", "corda": "capture", "eva": "capture", "lora-ga": "capture gradients",
         "lora-ga_niter_4": "capture gradients-only"}  # the store each solve reads: lora-ga --niter 4 is PEFT's own computation
STEPS = ["forward", "capture", "solve cnt-x", *(f"{stage} {peer}" for peer in PEERS for stage in ("solve", "export", "peft"))]
GRADIENT_STEPS = ["capture gradients", "capture gradients-only", "solve lora-ga", "export lora-ga", "solve lora-ga_niter_4", "export lora-ga_niter_4",
                  "peft lora-ga"]  # causal LMs only
CUDA_ONLY = {"peft loftq": "PEFT's loftq_init computes on CUDA (or XPU) only"}
# modules a step imports inside its work, imported before the clock as every other import is: peft 0.22 imports its
# bitsandbytes layers inside get_peft_model, and with them bitsandbytes and torch's inductor (0.3–1 s on the CPU)
LAZY_IMPORTS = ["peft.tuners.lora.bnb", "peft.utils.transformers_weight_conversion", "multiprocessing.synchronize"]
LAST = "peft eva"  # on an H100 it ran past 30 s where every other step takes seconds: it must not keep them from running


def run_step(step: str, args, scratch: Path) -> dict:
    """One step, timed in this process: {seconds, peak_mb}."""
    import peft
    import transformers
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.lora.eva import get_eva_state_dict

    from cntinit import capture, console, embedded, export, records, solve
    from cntinit.capture.feeds import samples as data
    from cntinit.capture.recorder import exact_float32
    from cntinit.models import linears, loading, placement

    console.quiet = True
    device = placement.resolve_device(args.device)
    model_dir = args.model or embedded.model_dir()
    stats = scratch / "stats"

    def fresh_model(tokenizer=True):
        """The model (and its tokenizer): PEFT's inits that read no data load the model alone, as a script would for them."""
        if tokenizer:
            net, tokenizer = loading.load(model_dir)
        else:
            config = transformers.AutoConfig.from_pretrained(model_dir)
            model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0], transformers.AutoModel)
            net, tokenizer = model_class.from_pretrained(model_dir, dtype="auto").eval(), None
        return net.to(device, placement.resolve_dtype(args.dtype, net.dtype, device)), tokenizer

    def tokenized(tokenizer):
        samples = records.read(args.data or embedded.data_file(), max_samples=args.samples).samples
        return data.tokenize(samples, tokenizer, args.seq_len)

    def lora_config(net, **kwargs):
        # full module paths: PEFT's preprocess_corda does not resolve "all-linear"
        names = sorted(linears.select_targets(net, args.targets))
        return peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=names, **kwargs)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if step == "forward":
        def work():
            net, tokenizer = fresh_model()
            root = linears.forward_root(net, list(linears.select_targets(net, args.targets)))
            with exact_float32(), torch.inference_mode():
                for ids, mask, _ in data.batches(tokenized(tokenizer), args.batch_size, tokenizer.pad_token_id or 0):
                    root(input_ids=ids.to(device), attention_mask=mask.to(device))
    elif step == "capture":
        def work():
            capture(model_dir, args.data or embedded.data_file(), stats, targets=args.targets, seq_len=args.seq_len,
                    batch_size=args.batch_size, max_samples=args.samples, device=args.device, overwrite=True)
    elif step.startswith("capture gradients"):
        def work():
            capture(model_dir, args.data or embedded.data_file(), scratch / step.split()[1], targets=args.targets, seq_len=args.seq_len,
                    batch_size=args.batch_size, max_samples=args.samples, device=args.device, gradients=True,
                    gradients_only=step.endswith("-only"), overwrite=True)
    elif step == "peft lora-ga":
        def work():
            net, tokenizer = fresh_model()
            batches = [(ids.to(device), mask.to(device))
                       for ids, mask, _ in data.batches(tokenized(tokenizer), args.batch_size, tokenizer.pad_token_id or 0)]
            config = lora_config(net, init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig())

            def train_step():
                for ids, mask in batches:
                    net(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
            peft.preprocess_loraga(net, config, train_step)
            peft.get_peft_model(net, config)
    elif step.startswith("solve"):
        variant = step.split()[1]
        mode, _, niter = variant.partition("_niter_")
        source = (scratch / READS[variant].split()[1], {}) if mode == "lora-ga" else (stats, {}) if variant in READS else \
            (None, {"model": model_dir, "targets": args.targets})

        def work():
            solve(source[0], scratch / f"solve-{variant}", mode=mode, rank=args.rank, precision=args.precision,
                  device=args.device, overwrite=True, niter=int(niter) if niter else None, **source[1])
    elif step.startswith("export"):
        def work():
            export(scratch / f"solve-{step.split()[1]}", scratch / f"export-{step.split()[1]}", overwrite=True)
    elif step == "peft corda":
        def work():
            net, tokenizer = fresh_model()
            sequences = tokenized(tokenizer)
            config = lora_config(net, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))

            def run_model():
                for sequence in sequences:
                    net(input_ids=torch.tensor([sequence], device=device))
            preprocess_corda(net, config, run_model=run_model)
            peft.get_peft_model(net, config)
    elif step == "peft eva":
        def work():
            net, tokenizer = fresh_model()
            batches = [{"input_ids": ids.to(device), "attention_mask": mask.to(device)}
                       for ids, mask, _ in data.batches(tokenized(tokenizer), args.batch_size, tokenizer.pad_token_id or 0)]
            config = lora_config(net, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0))
            get_eva_state_dict(net, batches, config, show_progress_bar=False)
    else:
        extra = {"loftq_config": peft.LoftQConfig(loftq_bits=4, loftq_iter=1)} if step == "peft loftq" else {}

        def work():
            net, _ = fresh_model(tokenizer=False)
            peft.get_peft_model(net, lora_config(net, init_lora_weights=step.split()[1], **extra))
    import_ahead(model_dir)
    if device.type == "cuda":
        torch.cuda.synchronize()
    before = set(sys.modules)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss() / 2**20
    return {"seconds": time.perf_counter() - started, "peak_mb": peak, "imported": sorted(set(sys.modules) - before)}


def import_ahead(model_dir) -> None:
    """Import what a step would import inside the clock — the model's transformers class (both sides build it),
    LAZY_IMPORTS — so the rows compare work, not imports (a user's wall clock with imports is
    a separate measurement)."""
    import transformers

    for architecture in transformers.AutoConfig.from_pretrained(model_dir).architectures or []:
        getattr(transformers, architecture, None)
    for name in LAZY_IMPORTS:
        with contextlib.suppress(ImportError):  # another PEFT version, or no bitsandbytes
            importlib.import_module(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local transformers model directory (default: embedded MiniLM)")
    parser.add_argument("--data", help="calibration .jsonl/.txt (default: embedded KJV verses)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--targets", help=f"module suffixes (default: {EMBEDDED_TARGETS} on the embedded model, else all-linear)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", default="float32", help="cntinit's solve precision (PEFT works in float32)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", help="also write the table's rows and each step's measurements to this JSON file")
    parser.add_argument("--in-process", action="store_true",
                        help="run every step in this process: no minute of imports and CUDA start-ups; GPU peaks stay per step, CPU peaks do not")
    parser.add_argument("--inits", help=f"only these end-to-end rows (comma-separated, of {', '.join(PEERS)}, lora-ga, lora-ga_niter_4)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every step this many times, in turn, and take each step's median: this machine's times swing by a third")
    parser.add_argument("--step", choices=STEPS + GRADIENT_STEPS, help=argparse.SUPPRESS)  # internal: run one step, print JSON
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.targets = args.targets or (EMBEDDED_TARGETS if args.model is None else "all-linear")
    if args.step:
        print(json.dumps(run_step(args.step, args, Path(args.scratch))))
        return
    passthrough = sys.argv[1:]  # a step ignores --json, --inits and --rounds
    title = (f"speed: {args.model or 'embedded MiniLM'}, {args.samples} samples × ≤{args.seq_len} tokens, "
             f"{args.targets}, rank {args.rank}, {args.device}")
    steps = [s for s in STEPS + (GRADIENT_STEPS if causal_lm(args.model) else []) if s != LAST] + [LAST]
    if args.inits:
        steps = [step for step in steps if step in steps_of(args.inits.split(","))]
    from cntinit.models.placement import resolve_device
    if resolve_device(args.device).type != "cuda":
        for step, why in CUDA_ONLY.items():
            if step in steps:
                steps.remove(step)
                Console(stderr=True).print(f"{step}: not run — {why}", highlight=False)
    rounds: dict[str, list] = {step: [] for step in steps}
    results = {}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as scratch:  # each round its own: writes into fresh folders, as the first did
            for step in steps:
                if args.json:  # rewritten before every step: a run stopped from outside keeps the comparisons it completed
                    Path(args.json).write_text(json.dumps({"title": title, "rows": comparisons(results), "steps": results, "rounds": rounds}, indent=1))
                rounds[step].append(measured(step, args, passthrough, Path(scratch)))
                results[step] = median(rounds[step])
                if rounds[step][-1] is not None:
                    Console(stderr=True).print(f"{step}: {rounds[step][-1]['seconds']:.2f} s, peak {rounds[step][-1]['peak_mb']:.0f} MB",
                                               highlight=False)
    rows = [row for row in comparisons(results) if not args.inits or "not run" not in row.values()]
    table = Table(*rows[0], title=title)
    for row in rows:
        table.add_row(*row.values())
    Console(width=160).print(table)
    for step, result in results.items():  # a row that counts imports says so
        if result and result["imported"]:
            Console(stderr=True).print(f"{step}: imported {len(result['imported'])} modules inside the clock "
                                       f"({', '.join(result['imported'][:3])}, …): its seconds include them", highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "rows": rows, "steps": results, "rounds": rounds}, indent=1))
    if None in results.values():
        raise SystemExit(f"failed: {', '.join(step for step, r in results.items() if r is None)}")


def measured(step: str, args, passthrough: list[str], scratch: Path) -> dict | None:
    """One run of `step` — in its own process unless --in-process — or None where it failed (the others still run).
    The disk's dirty pages are flushed first, outside every clock: the kernel writes an export's 540 MB base back while
    the next step runs, and PEFT's init, run right after it, took 2.2–2.3 s where it takes 1.2–1.6 s alone."""
    os.sync()
    if args.in_process:
        try:
            return run_step(step, args, scratch)
        except Exception as exc:  # noqa: BLE001 — the other comparisons still run, as with processes
            Console(stderr=True).print(f"{step} failed: {exc!r}", highlight=False, markup=False)
            return None
    done = subprocess.run([sys.executable, __file__, *passthrough, "--step", step, "--scratch", str(scratch)], capture_output=True, text=True)
    if done.returncode:  # this one's rows say "failed"
        Console(stderr=True).print(f"{step} failed:\n{done.stderr[-2000:]}", highlight=False, markup=False)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(runs: list[dict | None]) -> dict | None:
    """A step's median seconds over its rounds, and its highest peak; None where any round failed."""
    if any(run is None for run in runs):
        return None
    return {"seconds": statistics.median(run["seconds"] for run in runs), "peak_mb": max(run["peak_mb"] for run in runs),
            "imported": sorted({name for run in runs for name in run.get("imported", [])})}


def steps_of(variants: list[str]) -> set[str]:
    """The steps the end-to-end rows of `variants` compare: the store each reads, its solve and export, PEFT's init."""
    wanted = set()
    for variant in variants:
        if variant not in PEERS + ["lora-ga", "lora-ga_niter_4"]:
            raise SystemExit(f"--inits: {variant} is none of {', '.join(PEERS)}, lora-ga, lora-ga_niter_4")
        wanted |= {f"solve {variant}", f"export {variant}", "peft " + variant.replace("_niter_4", "") if variant.startswith("lora-ga")
                   else "peft " + variant} | ({READS[variant]} if variant in READS else set())
    return wanted


def causal_lm(model_dir: str | None) -> bool:
    """Whether the model's config names a causal LM class (gradients need a next-token loss)."""
    if model_dir is None:
        return False
    from cntinit.models import loading

    architectures = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or [""]
    return loading.task_type(architectures[0]) == "CAUSAL_LM"


def comparisons(results: dict) -> list[dict]:
    """The table's rows from each step's {seconds, peak_mb}: None where the step failed, absent where it has not run."""
    def seconds(steps):
        return sum(results[x]["seconds"] for x in steps) if all(results.get(x) for x in steps) else None

    def missing(steps):
        return "failed" if any(x in results and results[x] is None for x in steps) else "not run"

    def peak(steps):
        return f"{max(results[x]['peak_mb'] for x in steps):.0f}" if all(results.get(x) for x in steps) else missing(steps)

    def row(what, ours, theirs, ratio):
        o, t = seconds(ours), seconds(theirs)
        return {"what": what, "cntinit s": missing(ours) if o is None else f"{o:.2f}",
                "PEFT / plain s": missing(theirs) if t is None else f"{t:.2f}",
                "ratio": "-" if o is None or t is None else ratio(o, t), "peak MB (cntinit / other)": f"{peak(ours)} / {peak(theirs)}"}

    def faster(o, t):
        return f"{t / o:.2f}× faster" if t >= o else f"{t / o:.2f}× (PEFT {o / t:.2f}× faster)"

    rows = [row("capture vs plain forward", ["capture"], ["forward"], lambda o, t: f"{o / t:.2f}× (target ≤ 1.3× attention, ≤ 2× with MLPs)")]
    for mode in ("corda", "eva"):
        rows.append(row(f"{mode}: capture + solve vs PEFT", ["capture", "solve " + mode], ["peft " + mode], faster))
    rows.append(row("one capture + cnt-x, corda, eva vs PEFT corda + eva", ["capture", "solve cnt-x", "solve corda", "solve eva"],
                    ["peft corda", "peft eva"], lambda o, t: f"{t / o:.2f}× faster (target ≥ 2×)"))
    for variant in PEERS + (["lora-ga", "lora-ga_niter_4"] if any(step in results for step in GRADIENT_STEPS) else []):
        reads = [READS[variant]] if variant in READS else []
        peer = "peft " + variant.replace("_niter_4", "") if variant.startswith("lora-ga") else "peft " + variant
        label = " + ".join([*([" --".join(reads[0].split(" ", 1))] if reads else []), "solve", "export"])
        rows.append(row(f"{variant} end to end: {label} vs {peer}", [*reads, "solve " + variant, "export " + variant], [peer], faster))
    return rows


if __name__ == "__main__":
    main()
