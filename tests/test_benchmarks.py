"""The benchmark scripts run end to end on a tiny setting (their numbers live in benchmarks/RESULTS.md)."""

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
OFFLOAD_DRIFT = "max |ΔΣxxᵀ| / max |Σxxᵀ|"  # offload.py's column: a setting's statistics against the normal capture's


def run_script(name: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_convergence_benchmark_quick(tmp_path):
    out = run_script("convergence.py", "--quick", cwd=tmp_path)
    png = (tmp_path / "convergence.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    results = json.loads((tmp_path / "convergence.json").read_text())
    steps, seeds = results["args"]["steps"], results["args"]["seeds"]
    assert set(results["runs"]) == set(results["args"]["inits"].split(","))
    for spec, runs in results["runs"].items():
        assert len(runs) == seeds, spec
        for run in runs:
            assert len(run["losses"]) == steps and all(math.isfinite(x) and x > 0 for x in run["losses"]), spec
            assert 0 <= run["accuracy"] <= 1 and run["eval_loss"] > 0, spec
        assert spec in out
    runs = results["runs"]
    for plain, faster in zip(runs["lora"], runs["lora:lr=2e-3"]):  # same init, batches and head: only the lr differs
        assert plain["start"] == faster["start"] and plain["losses"][0] == faster["losses"][0]
        assert plain["losses"][1:] != faster["losses"][1:]
    assert all(r["start"]["delta"] == 0 and r["start"]["b"] == 0 and r["start"]["a"] > 0 for r in runs["lora"])
    assert all(r["start"]["delta"] > 0 and r["start"]["b"] > 0 for r in runs["cnt-x:vas=true"])
    # seeds change the batch order and head draw, so their losses differ; the same seed would not
    assert results["runs"]["lora"][0]["losses"] != results["runs"]["lora"][1]["losses"]
    assert "steps to lora's final" in out


def test_lm_convergence_benchmark_quick(tmp_path):
    """convergence_lm.py --quick: real SmolLM2 weights, every row through capture --gradients, solve, export, PEFT."""
    out = run_script("convergence_lm.py", "--quick", "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    assert (tmp_path / "convergence-lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "convergence-lm.json").read_text())
    runs, seeds, steps = results["runs"], results["args"]["seeds"], results["args"]["steps"]
    for spec, rows in runs.items():
        assert len(rows) == seeds and all(len(r["losses"]) == steps for r in rows), spec
        assert all(math.isfinite(r["eval_loss"]) and r["eval_loss"] > 0 for r in rows), spec
        assert "step0" in rows[0] and all("step0" not in r for r in rows[1:]), spec
        assert spec.split(":")[0] in out
    # the pretrained model is where LoRA (B = 0), MiCA (A = 0) and LoRA-GA (base W − s·BA) start; the offset cnt-s does not
    assert runs["mica"][0]["start"]["a"] == 0 and runs["mica"][0]["start"]["b"] > 0
    for exact in ("lora", "lora-ga", "mica"):
        start = runs[exact][0]["step0"]
        assert start["agreement"] > 0.99 and abs(start["kl"]) < 1e-3, (exact, start)
    assert runs["cnt-s"][0]["step0"]["kl"] > 0.1 and runs["cnt-s"][0]["out_delta"] > 0
    for quantized in ("lora:base=nf4", "loftq"):  # plain QLoRA and LoftQ start on an NF4 base: near, not at, the pretrained model
        assert 0 < runs[quantized][0]["step0"]["kl"] < runs["cnt-s"][0]["step0"]["kl"], quantized
    assert runs["lora"][0]["losses"] != runs["lora"][1]["losses"]  # seeds change the batches (and LoRA's A)
    # an init whose factors start larger than --rescale-above × LoRA's gets a second row at lr × √(LoRA's/its)
    lora_size = runs["lora"][0]["start"]["a"] + runs["lora"][0]["start"]["b"]
    rescaled = [spec for spec in runs if ":lr=" in spec]
    assert rescaled and all(spec.split(":lr=")[0] in runs for spec in rescaled)
    for spec in rescaled:
        plain = runs[spec.split(":lr=")[0]][0]
        ratio = (plain["start"]["a"] + plain["start"]["b"]) / lora_size
        assert ratio > results["args"]["rescale_above"]
        assert math.isclose(runs[spec][0]["lr"], results["args"]["lr"] / math.sqrt(ratio), rel_tol=1e-9)
        assert runs[spec][0]["losses"][0] == plain["losses"][0]  # same init and batch; only the step size differs
    again = run_script("convergence_lm.py", "--report", str(tmp_path / "convergence-lm.json"), cwd=tmp_path)  # trains nothing
    assert "each init at each learning rate" in again and all(spec.split(":")[0] in again for spec in runs)


def test_lm_benchmark_verses_task_trains_on_one_testament_and_holds_out_the_other(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import convergence_lm as lm

    from cntinit import embedded

    rows = [json.loads(line) for line in embedded.data_file().read_text().splitlines()]
    new = {row["text"] for row in rows[next(i for i, row in enumerate(rows) if row["book"] == "Matthew"):]}
    train, held_out = lm.verses("train", 400), lm.verses("test", 32)
    assert len(train) == 400 and len(held_out) == 32 and not new & set(train) and set(held_out) <= new
    books = {row["text"]: row["book"] for row in rows}
    assert books[train[0]] == "Genesis" and len({books[text] for text in train}) > 30  # spread over the Old Testament's 39 books


def test_lm_benchmark_sweeps_rates_and_names_each_init_s_best(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import convergence_lm as lm

    assert lm.swept(["lora", "cnt-s:init=residual"], [2e-4, 6e-4], 2e-4) == [
        "lora", "lora:lr=0.0006", "cnt-s:init=residual", "cnt-s:init=residual:lr=0.0006"]
    results = {"lora": [{"eval_loss": 4.0}, {"eval_loss": 4.2}], "lora:lr=0.0006": [{"eval_loss": 3.8}, {"eval_loss": 3.9}],
               "cnt-s:init=residual": [{"eval_loss": 3.9}, {"eval_loss": 3.9}],
               "cnt-s:init=residual:lr=0.0006": [{"eval_loss": math.nan}, {"eval_loss": 1.0}]}
    rows = {row["init"]: row for row in lm.best_rates(results, 2e-4)}
    assert rows["lora"]["rates"] == {2e-4: [4.0, 4.2], 6e-4: [3.8, 3.9]} and rows["lora"]["best"] == 6e-4
    assert rows["cnt-s:init=residual"]["best"] == 2e-4  # a rate where a seed diverged is never the best


def test_step_size_rule_known_answers(monkeypatch):
    """The rule both convergence benchmarks evaluate with --lr-rule: plain LoRA's own factors get ratio ≈ 1, orthonormal A
    with B = 0 (EVA) 1/√3, and the exact formula √k·√(r/3) / (√k‖A‖ + √d‖B‖) elsewhere."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch
    from safetensors.torch import save_file

    import convergence

    kaiming = torch.empty(16, 1024)
    torch.nn.init.kaiming_uniform_(kaiming, a=math.sqrt(5), generator=torch.Generator().manual_seed(0))  # PEFT's LoRA A
    assert convergence.step_ratio(torch.zeros(1024, 16), kaiming) == pytest.approx(1.0, abs=0.02)
    k, r, d = 12, 3, 27
    orthonormal = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64)).Q.T
    assert convergence.step_ratio(torch.zeros(k, r), orthonormal) == pytest.approx(3 ** -0.5, rel=1e-12)
    a, b = torch.full((r, d), 2 / math.sqrt(r * d)), torch.full((k, r), 5 / math.sqrt(k * r))  # ‖A‖ = 2, ‖B‖ = 5
    assert convergence.step_ratio(b, a) == pytest.approx(math.sqrt(12) / (math.sqrt(12) * 2 + math.sqrt(27) * 5), rel=1e-6)
    # --lr-rule: an init without its own rate trains at rule_factor × LoRA's best (the median over modules, to the 3/4,
    # at most 1), to 2 significant digits; LoRA at its own
    adapter = Path(tempfile.mkdtemp())
    save_file({"m.lora_A.weight": orthonormal.float().contiguous(), "m.lora_B.weight": torch.zeros(k, r),
               "n.lora_A.weight": a.float() * 1e-3, "n.lora_B.weight": b.float() * 1e-3,
               "o.lora_A.weight": a.float(), "o.lora_B.weight": b.float()}, adapter / "adapter_model.safetensors")
    assert convergence.rule_factor(adapter) == pytest.approx(3 ** -0.375, rel=1e-6)  # the median module's
    assert convergence.ruled("eva", lambda spec: adapter, 6e-4) == f"eva:lr={float(f'{3 ** -0.375 * 6e-4:.2g}'):g}" == "eva:lr=0.0004"
    assert convergence.ruled("lora", None, 6e-4) == "lora:lr=0.0006" and convergence.ruled("pissa:lr=1e-4", None, 6e-4) == "pissa:lr=1e-4"


def test_scaling_benchmark_tiny(tmp_path):
    out = run_script("scaling.py", "--samples", "16", "--seq-len", "16", "--processes", "1,2", "--targets", "query,value", cwd=tmp_path)
    rows = re.findall(r"│\s*(\d)\s*│\s*([\d.]+)\s*│\s*([\d,]+)\s*│\s*([\d.]+)×\s*│\s*([\d.e+-]+)\s*│", out)
    assert [r[0] for r in rows] == ["1", "2"], out
    assert all(float(r[1]) > 0 and float(r[4]) < 1e-4 for r in rows), out  # both runs sum the same statistics


def test_gpu_run_dry_run_measures_every_step(tmp_path):
    """benchmarks/gpu.sh --dry-run: every step of the prepared GPU run at tiny shapes on the CPU.
    Its speed and offload steps run speed.py and offload.py, so this is their smoke test too."""
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          env=os.environ | {"PYTHON": sys.executable}, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {name: step["status"] for name, step in results["steps"].items()} == {
        "tests": "ok", "solve": "ok", "primitives": "ok", "inilora": "ok", "speed": "ok", "capture": "ok", "offload": "ok",
        "layerwise": "ok", "gradients": "ok", "vlm": "ok", "flux": "ok"}
    tables = {name: table["rows"] for name, table in results["tables"].items()}
    markdown = (out / "results.md").read_text()
    assert all(table["title"] in markdown for table in results["tables"].values())

    assert [row["what"] for row in tables["vlm"]] == ["plain forward", "cntinit capture (all-linear)"]
    assert [row["what"] for row in tables["flux"]] == ["plain forward", "cntinit capture", "cntinit capture --gradients"]
    [tests] = tables["tests"]
    assert tests["failed"] == 0 and tests["passed"] + tests["skipped"] == 8  # the CUDA-only tests: skipped on a CPU

    assert {(r["targets"], r["precision"], r["mode"]) for r in tables["solve"]} == {
        (t, p, m) for t in ("q,v", "all-linear") for p in ("float32", "float64") for m in ("cnt-x", "cnt-s", "cnt-sh", "pissa", "corda", "eva")}
    for row in tables["solve"]:
        assert row["modules"] == (4 if row["targets"] == "q,v" else 14)  # 2 blocks
        assert math.isclose(float(row["whole model s"]), float(row["solve s"]) / 2 * 32, abs_tol=0.005 * 16 + 0.05)  # rounding
        assert row["target"].startswith({"cnt-x": "< 60 s: ", "cnt-s": "< 60 s: ", "cnt-sh": "< 120 s: "}.get(row["mode"], ""))
        assert bool(row["target"]) == row["mode"].startswith("cnt")

    assert len(tables["primitives"]) == 18 and all(float(r["seconds"]) >= 0 for r in tables["primitives"])

    fixed, compared, early = tables["inilora"]
    assert fixed["steps"] == 20 and float(fixed["seconds"]) >= 0
    assert float(compared["fit ÷ optimum"].split()[-1]) < 1e-5  # the batched fit equals one Adam per module
    assert 0 < early["steps"] <= 20000 and float(early["fit ÷ optimum"].split()[0]) < 1.05

    speed = {row["what"]: row for row in tables["speed"]}
    assert len(speed) == 13 and "one capture + cnt-x, corda, eva vs PEFT corda + eva" in speed
    assert "lora-ga_niter_4 end to end: capture --gradients-only + solve + export vs peft lora-ga" in speed  # a causal LM
    assert [what for what, row in speed.items() if row["PEFT / plain s"] == "not run"] == [
        "loftq end to end: solve + export vs peft loftq"]  # PEFT's loftq_init computes on CUDA only; the dry run is on the CPU
    for what, row in speed.items():
        if row["PEFT / plain s"] == "not run":
            continue
        ours, theirs = float(row["cntinit s"]), float(row["PEFT / plain s"])
        ratio = float(row["ratio"].split("×")[0])
        expected = ours / theirs if what.startswith("capture") else theirs / ours
        rounding = expected * (0.005 / ours + 0.005 / theirs) + 0.005  # the times are shown to 2 decimals, the ratio too
        assert ours > 0 and theirs > 0 and abs(ratio - expected) <= rounding, row  # the ratio is of the times shown

    assert [r["targets"] for r in tables["capture"]] == ["attention", "all-linear"]
    assert all(float(r["forward s"]) > 0 and float(r["ratio"].rstrip("×")) > 0 for r in tables["capture"])

    offload = {row["setting"]: row for row in tables["offload"]}
    assert list(offload) == ["normal", "--stats-device cpu", "--offload", "--offload --stats-device cpu"]  # --in-process: no idle row
    assert all(float(r[OFFLOAD_DRIFT]) == 0 and r["peak RSS MiB"] == "-" for r in offload.values())  # placement never changes the statistics
    assert offload["--offload"]["weights on"] == "disk"  # cpu=1MB: every weight streamed from disk

    blocks = {row["blocks"]: row for row in tables["layerwise"]}
    assert {2, 4} <= set(blocks) and all(float(blocks[b]["layerwise s"]) > 0 and float(blocks[b]["normal s"]) > 0 for b in (2, 4))
    assert "layerwise: peak 4 / 2 blocks" in blocks and "solve --offload --max-memory cpu=1MB (4 blocks)" in blocks
    backward = {row["blocks"]: row for row in tables["gradients"]}  # layerwise.py --gradients: the whole model's backward and the blockwise one
    assert "--gradients" in results["tables"]["gradients"]["title"]
    assert all(float(backward[b]["layerwise s"]) > 0 and float(backward[b]["normal s"]) > 0 for b in (2, 4))


def test_gpu_run_keeps_the_rows_of_a_script_stopped_at_its_step_limit(tmp_path, monkeypatch):
    """On the GPU leases, offload.py and layerwise.py overran their steps and every row they had
    measured was lost: the scripts now rewrite their JSON as rows complete, and the driver keeps them."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    slow = tmp_path / "slow.py"
    slow.write_text("import json, sys, time\n"
                    "path = sys.argv[sys.argv.index('--json') + 1]\n"
                    "open(path, 'w').write(json.dumps({'title': 'slow', 'rows': [{'setting': 'first', 'seconds': 1}]}))\n"
                    "time.sleep(120)\n")
    started = time.time()
    result = gpu.script(str(slow), timeout=3)  # an absolute name replaces benchmarks/
    assert time.time() - started < 60
    assert result["rows"] == [{"setting": "first", "seconds": 1}] and "1 rows kept" in result["stopped"]
    with pytest.raises(SystemExit, match="slow.py stopped at the step's limit"):
        gpu.stopped(result)


def test_offload_benchmark_measures_each_setting_in_its_own_process(tiny, calibration, tmp_path):
    """offload.py's process per setting (the peak RSS column; the GPU run takes --in-process, which
    its dry run covers): every setting's statistics equal the normal capture's."""
    run_script("offload.py", "--model", str(tiny["bert"]), "--data", str(calibration), "--samples", "8", "--seq-len", "16",
               "--json", str(tmp_path / "rows.json"), cwd=tmp_path)
    rows = {row["setting"]: row for row in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert list(rows) == ["(imports only)", "normal", "--stats-device cpu", "--offload", "--offload --stats-device cpu"]
    assert all(float(row["peak RSS MiB"].replace(",", "")) > 0 for row in rows.values())
    assert all(float(row[OFFLOAD_DRIFT]) == 0 for setting, row in rows.items() if setting != "(imports only)")


def test_fixed_costs_benchmark_compares_equal_results(tmp_path):
    """fixed_costs.py asserts each pair of ways gives the same result before it reports their times."""
    run_script("fixed_costs.py", "--hidden", "64", "--mlp", "96", "--kv", "32", "--json", str(tmp_path / "rows.json"), cwd=tmp_path)
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [row["what"].split()[0] for row in rows] == ["fingerprint", "fingerprint", "finite", "Σ", "checksums"]
    assert "(4 files" in rows[-1]["what"]  # two blocks: their hidden-width Σ in one file each, the MLP-width Σ in another
    assert all(float(row["naive s"]) >= 0 and float(row["cntinit s"]) >= 0 for row in rows)


def test_streamed_benchmark_compares_both_ways(tmp_path):
    """streamed.py: solve and export reading the model by name write the same tensors as on the loaded
    model, and the check measures the same error."""
    run_script("streamed.py", "--blocks", "2", "--hidden", "128", "--mlp", "256", "--vocab", "512", "--shard", "100KB",
               "--json", str(tmp_path / "rows.json"), cwd=tmp_path)
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(row["stage"], row["way"]) for row in rows] == [(stage, way) for stage in ("solve", "export", "check")
                                                                  for way in ("streamed", "loaded")]
    assert all(row["equal"] and row["peak"] > 0 for row in rows)
    assert all(row["error"] < 1e-4 for row in rows if row["stage"] == "check")


def test_startup_benchmark_help_never_imports_torch(tmp_path):
    """Every command imported torch, transformers and peft first (5 s before `--help` answered)."""
    rows = json.loads(run_script("startup.py", "--repeat", "1", "--json", cwd=tmp_path))
    helps = [row for row in rows if row["what"].endswith("--help")]
    assert len(helps) == 5 and not any(row["torch_imported"] for row in helps)
    refusals = [row for row in rows if row["what"].startswith("capture of")]
    assert len(refusals) == 3 and not any(row["torch_imported"] for row in refusals)  # refused before the stages load
    assert rows[-1]["what"].startswith("import the stages") and rows[-1]["torch_imported"]
    assert all(0 < row["median_s"] <= row["max_s"] for row in rows)


def test_breakdown_says_where_a_commands_seconds_go(tmp_path):
    """benchmarks/breakdown.py (issue 41's first step): each stage's phases add up to no more than its time."""
    run_script("breakdown.py", "--inits", "pissa --niter 4", "--samples", "4", "--targets", "query,value", "--rank", "2",
               "--json", str(tmp_path / "rows.json"), cwd=tmp_path)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["stage"] for row in rows] == ["solve", "export"]
    for row in rows:
        phases = [row[k] for k in row if k not in ("init", "stage", "seconds", "other")]
        assert row["seconds"] > 0 and all(p >= 0 for p in phases) and sum(phases) <= row["seconds"] + 0.05
    assert rows[0]["solve (reads its inputs)"] > 0 and rows[0]["load model"] > 0


def test_speed_rounds_take_each_steps_median_and_inits_pick_their_rows(tmp_path, monkeypatch):
    """speed.py --inits runs only the steps its rows compare; --rounds runs each that many times, in turn, and takes the median."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import speed

    assert speed.steps_of(["pissa_niter_4", "lora-ga_niter_4", "eva"]) == {
        "solve pissa_niter_4", "export pissa_niter_4", "peft pissa_niter_4", "capture gradients-only", "solve lora-ga_niter_4",
        "export lora-ga_niter_4", "peft lora-ga", "capture", "solve eva", "export eva", "peft eva"}
    with pytest.raises(SystemExit, match="pisa is none of"):
        speed.steps_of(["pisa"])
    runs = [{"seconds": 3.0, "peak_mb": 10.0, "imported": ["b"]}, {"seconds": 1.0, "peak_mb": 30.0, "imported": []},
            {"seconds": 2.0, "peak_mb": 20.0, "imported": ["a", "b"]}]
    assert speed.median(runs) == {"seconds": 2.0, "peak_mb": 30.0, "imported": ["a", "b"]} and speed.median([*runs, None]) is None
    run_script("speed.py", "--inits", "olora", "--rounds", "2", "--samples", "4", "--in-process", "--json", str(tmp_path / "s.json"), cwd=tmp_path)
    result = json.loads((tmp_path / "s.json").read_text())
    assert [row["what"] for row in result["rows"]] == ["olora end to end: solve + export vs peft olora"]
    assert sorted(result["rounds"]) == ["export olora", "peft olora", "solve olora"] and all(len(r) == 2 for r in result["rounds"].values())
    assert {step: r["imported"] for step, r in result["steps"].items() if r["imported"]} == {}  # the clock times work, not imports
    for step, rounds in result["rounds"].items():
        assert result["steps"][step]["seconds"] == pytest.approx(sorted(r["seconds"] for r in rounds)[0] / 2 + sorted(r["seconds"] for r in rounds)[1] / 2)
