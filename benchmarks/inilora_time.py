"""IniLoRA solve time: cntinit's batched Adam against the authors' loop of one optimizer per module.

    python benchmarks/inilora_time.py                              # embedded MiniLM, all linear layers
    python benchmarks/inilora_time.py --model ./Llama-3.2-1B --targets q_proj,v_proj --device cuda --steps 2000

Both sides run the same step count from the same starting draws, on the same device, in
alternating order (median of --repeat); the table gives the wall times, their ratio and the
largest difference between the two results (they solve the same problems).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from cntinit import embedded
from cntinit.models import linears, loading, placement
from cntinit.solve.modes import inilora


def per_module_loop(weights: list[torch.Tensor], starts: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> list[torch.Tensor]:
    """The reference: one Adam + StepLR per module, modules one after another (as the authors' scripts)."""
    updates = []
    for w, (b, a) in zip(weights, starts):
        b, a = b.clone().requires_grad_(True), a.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([b, a], lr=inilora.LR)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, inilora.STEP_SIZE, inilora.GAMMA)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            (b @ a - w).square().mean().backward()
            optimizer.step()
            schedule.step()
        updates.append((b @ a).detach())
    return updates


def batched(groups: dict, steps: int) -> list[torch.Tensor]:
    """cntinit: one batched problem per weight shape."""
    updates = {}
    for shape, (names, w, b, a) in groups.items():
        fb, fa, _ = inilora.fit(w, b, a, steps)
        updates.update(zip(names, fb @ fa))
    return updates


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded MiniLM)")
    parser.add_argument("--targets", default=linears.ALL_LINEAR)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = placement.resolve_device(args.device)
    net, _ = loading.load(args.model or embedded.model_dir())
    modules = linears.select_targets(net, args.targets)
    generator = torch.Generator().manual_seed(0)
    groups: dict[tuple, tuple] = {}
    for name, module in modules.items():
        groups.setdefault(tuple(linears.weight_matrix(module).shape), ([], []))
        groups[tuple(linears.weight_matrix(module).shape)][0].append(name)
        groups[tuple(linears.weight_matrix(module).shape)][1].append(linears.weight_matrix(module).detach().float())
    batches, names, weights, starts = {}, [], [], []
    for (k, d), (group, ws) in groups.items():
        b, a = inilora.start(len(group), k, d, args.rank, "inilora", 0.02, generator)
        w = torch.stack(ws).to(device)
        batches[(k, d)] = (group, w, b.float().to(device), a.float().to(device))
        names += group
        weights += list(w)
        starts += list(zip(b.float().to(device), a.float().to(device)))

    times = {"loop": [], "batched": []}
    for _ in range(args.repeat):
        for side in ("loop", "batched"):
            synchronize(device)
            started = time.perf_counter()
            result = per_module_loop(weights, starts, args.steps) if side == "loop" else batched(batches, args.steps)
            synchronize(device)
            times[side].append(time.perf_counter() - started)
            if side == "loop":
                looped = dict(zip(names, result))
            else:
                together = result
    difference = max(float((looped[n] - together[n]).abs().max() / looped[n].abs().max()) for n in names)
    loop, fast = statistics.median(times["loop"]), statistics.median(times["batched"])
    table = Table("modules", "shapes", "rank", "steps", "device", "per-module loop s", "batched s", "speed-up", "max rel. diff",
                  title=f"IniLoRA fit, {args.model or 'embedded MiniLM'} ({args.targets})")
    table.add_row(str(len(names)), str(len(batches)), str(args.rank), str(args.steps), str(device), f"{loop:.2f}", f"{fast:.2f}",
                  f"{loop / fast:.1f}×", f"{difference:.1e}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
