"""`cntinit solve` on tiny models against an independent NumPy computation of METHODS.md."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import cntinit
from cntinit import Store
from cntinit.solve import linalg
from cntinit.solve import Options, solve
from cntinit.solve.modes import cnt
from cntinit.solve.solution import Solution
from conftest import assert_refused, leftovers, run


def weights(model_dir):
    """module path -> W (out × in) as float64 NumPy, read through transformers."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = getattr(transformers, config.architectures[0]).from_pretrained(model_dir)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = module.weight.detach().double().numpy()
        elif type(module).__name__ == "Conv1D":
            out[name] = module.weight.detach().double().numpy().T
    return out


def sigmas(store_dir, key, centered, pooled):
    """Σ per bucket (or pooled), straight from the safetensors payload."""
    entry = Store(store_dir).manifest["stats"][key]
    with safe_open(store_dir / entry["file"], "np") as f:
        prefix = "" if pooled or f"{key}.bucket_xxt" not in f.keys() else "bucket_"
        xxt, total, count = (f.get_tensor(f"{key}.{prefix}{n}").astype(np.float64) for n in ("xxt", "sum", "count"))
    if not prefix:
        xxt, total, count = xxt[None], total[None], count[None]
    out = []
    for s, m, n in zip(xxt, total, count):
        sigma = s / n
        out.append(sigma - np.outer(m / n, m / n) if centered else sigma)
    return out


def reference_target(w, sigma, mode, rcond, form="paper", c=1.0):
    if mode == "cnt-x":
        return w @ np.linalg.pinv(sigma, rcond=rcond, hermitian=True)
    if mode == "cnt-sh":
        return c * np.linalg.pinv((np.eye(len(sigma)) - sigma) @ w.T, rcond=rcond)
    values, vectors = np.linalg.eigh(sigma)
    values, vectors = values[::-1], vectors[:, ::-1].copy()
    vectors *= np.sign(vectors[np.abs(vectors).argmax(0), range(len(values))])
    root = np.diag(np.maximum(values, rcond * values[0]) ** -0.5)
    return w @ root @ vectors.T if form == "paper" else w @ vectors @ root @ vectors.T


def conditioned(sigma, normalize, damping):
    """Σ as --normalize trace (Σ / m) and --damping δ (Σ + δ·m·I) make it, m = tr Σ / d."""
    mean = np.trace(sigma) / len(sigma)
    sigma = sigma + (damping or 0.0) * mean * np.eye(len(sigma))
    return sigma / mean if normalize == "trace" else sigma


def reference_delta(store_dir, model_dir, opts):
    manifest = Store(store_dir).manifest
    ws = weights(model_dir)
    deltas = {}
    for name, entry in manifest["modules"].items():
        w = ws[name]
        targets = [reference_target(w, s, opts.mode, opts.rcond, opts.self_form, opts.shift_c)
                   for s in sigmas(store_dir, entry["key"], opts.centered, opts.pooled)
                   for s in [conditioned(s, opts.normalize, opts.damping)]]
        bucket_weights = opts.bucket_weights or [1.0] * len(targets)
        deltas[name] = (w + sum(a * t for a, t in zip(bucket_weights, targets))) / (len(targets) + 1) - w
    return deltas


def truncate(delta, rank, decompose):
    if decompose == "qr":
        q, r = np.linalg.qr(delta)
        return q[:, :rank] @ r[:rank]
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    return u[:, :rank] * s[:rank] @ vh[:rank]


def solved(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    with safe_open(directory / "adapter.safetensors", "np") as f:
        return manifest, {n: (f.get_tensor(f"{n}.B").astype(np.float64), f.get_tensor(f"{n}.A").astype(np.float64))
                          for n, e in manifest["modules"].items() if e["rank"]}


CASES = [
    ("llama", Options(mode="cnt-x", rank=4)),
    ("llama", Options(mode="cnt-x", rank=3, pooled=True, rcond=1e-3)),
    ("llama", Options(mode="cnt-s", rank=4, bucket_weights=[1.0, 0.5, 2.0])),
    ("bert", Options(mode="cnt-s", rank=5, self_form="zca", centered=True)),
    ("bert", Options(mode="cnt-sh", rank=4, shift_c=0.5)),
    ("gpt2", Options(mode="cnt-s", rank=4, decompose="qr")),
    ("gpt2", Options(mode="cnt-sh", rank=2, split_p=0.25, precision="float32")),
    ("llama", Options(mode="cnt-x", rank=4, normalize="trace", damping=0.1)),
    ("bert", Options(mode="cnt-s", rank=4, damping=1.0)),
    ("gpt2", Options(mode="cnt-sh", rank=3, normalize="trace")),
]


@pytest.mark.parametrize("kind,opts", CASES, ids=[f"{k}-{o.mode}-{i}" for i, (k, o) in enumerate(CASES)])
def test_mode_equals_independent_computation(kind, opts, tiny, captured, tmp_path):
    opts = opts.resolved()
    want = reference_delta(captured[kind], tiny[kind], opts)
    solve(captured[kind], tmp_path / "s", opts)
    manifest, factors = solved(tmp_path / "s")
    tolerance = 2e-4 if opts.precision == "float32" else 1e-7
    assert set(factors) == set(want) and manifest["mode"] == opts.mode and manifest["init"] == "offset"
    for name, (b, a) in factors.items():
        rank = manifest["modules"][name]["rank"]
        assert b.shape == (want[name].shape[0], rank) and a.shape == (rank, want[name].shape[1])
        expected = truncate(want[name], rank, opts.decompose)
        assert np.linalg.norm(b @ a - expected) <= tolerance * np.linalg.norm(expected), name
        if opts.decompose == "svd":  # B = U S^(1−p), A = S^p Vᵀ
            s = np.linalg.svd(want[name], compute_uv=False)[:rank]
            np.testing.assert_allclose(np.linalg.norm(a, axis=1), s**opts.split_p, rtol=100 * tolerance)


def test_constraints_hold_on_the_captured_statistics(tiny, captured):
    """Self: W_tar Σ W_tarᵀ = W Wᵀ; shift: W_tar (I − Σ) Wᵀ = c I (for k ≤ d); cross with Σ = I: ΔW = 0."""
    store = Store(captured["llama"])
    ws = weights(tiny["llama"])
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"):
        key = store.manifest["modules"][name]["key"]
        t = store.tensors(key)
        sigma = linalg.second_moment(t["xxt"].double(), t["sum"].double(), t["count"], False)[None]
        w = torch.from_numpy(ws[name])[None]
        for form in ("paper", "zca"):
            target = cnt.self_(w, linalg.eigen(sigma), 0.0, form)
            torch.testing.assert_close(target @ sigma @ target.mT, w @ w.mT, rtol=1e-8, atol=1e-8 * float(w.norm() ** 2))
        if w.shape[1] <= w.shape[2]:
            target, _ = cnt.shift(w, sigma, 0.0, 0.7)
            eye = torch.eye(w.shape[2], dtype=torch.float64)
            torch.testing.assert_close(target @ (eye - sigma) @ w.mT, 0.7 * torch.eye(w.shape[1], dtype=torch.float64)[None], atol=1e-8, rtol=0)
        identity = linalg.eigen(torch.eye(w.shape[2], dtype=torch.float64)[None])
        assert (cnt.robust_estimate(w, [cnt.cross(w, identity, 1e-4)], [1.0]) - w).abs().max() < 1e-12


def test_vas_ranks_follow_pooled_variances_and_spend_the_budget(tiny, captured, tmp_path):
    opts = Options(mode="cnt-s", rank=3, vas=True, budget=30, pooled=True)
    want = reference_delta(captured["bert"], tiny["bert"], opts)
    pooled = []
    for name, delta in want.items():
        energy = np.linalg.svd(delta, compute_uv=False) ** 2
        pooled += [(v, name) for v in energy / energy.sum()]
    kept = sorted(pooled, key=lambda p: -p[0])[:30]
    expected = {name: sum(1 for _, n in kept if n == name) for name in want}
    solve(captured["bert"], tmp_path / "s", opts)
    manifest, factors = solved(tmp_path / "s")
    ranks = {n: e["rank"] for n, e in manifest["modules"].items()}
    assert ranks == expected and sum(ranks.values()) == 30 and len(set(ranks.values())) > 2
    assert set(factors) == {n for n, r in ranks.items() if r}
    for name, (b, a) in factors.items():
        np.testing.assert_allclose(b @ a, truncate(want[name], ranks[name], "svd"), atol=1e-7 * np.abs(want[name]).max())
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["total_rank"] == 30 and report["budget"] == 30


def test_vas_clamps_to_min_and_max_rank(captured, tmp_path):
    solve(captured["bert"], tmp_path / "s", Options(mode="cnt-x", rank=2, vas=True, min_rank=1, max_rank=3))
    ranks = [e["rank"] for e in solved(tmp_path / "s")[0]["modules"].values()]
    assert min(ranks) >= 1 and max(ranks) <= 3


def test_solve_is_deterministic(captured, tmp_path):
    for name in ("a", "b"):
        solve(captured["llama"], tmp_path / name, Options(mode="cnt-s", rank=4))
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == (tmp_path / "b" / "adapter.safetensors").read_bytes()


def test_report_diagnostics_match_their_definitions(tiny, captured, tmp_path):
    opts = Options(mode="cnt-x", rank=2, pooled=True)
    solve(captured["llama"], tmp_path / "s", opts)
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    manifest, factors = solved(tmp_path / "s")
    ws, want = weights(tiny["llama"]), reference_delta(captured["llama"], tiny["llama"], opts)
    for name, (b, a) in factors.items():
        row, w, update = report["modules"][name], ws[name], b @ a
        sigma = sigmas(captured["llama"], manifest["modules"][name]["stats_key"], False, True)[0]
        assert row["rank"] == 2
        np.testing.assert_allclose(row["update_norm"], np.linalg.norm(update), rtol=1e-6)
        np.testing.assert_allclose(row["kept"], np.linalg.norm(update) ** 2 / np.linalg.norm(want[name]) ** 2, rtol=1e-6)
        np.testing.assert_allclose(row["output_change"], np.trace(update @ sigma @ update.T) / np.trace(w @ sigma @ w.T), rtol=1e-6)
        values = np.linalg.eigvalsh(sigma)
        assert row["floored"] == int(np.sum(values < 1e-4 * values.max()))


def test_cli_solve_prints_the_table_and_the_path(captured, tmp_path, capsys, monkeypatch):
    code, out, err = run(capsys, "solve", captured["gpt2"], "--mode", "cnt-s", "--rank", "2", "--out", tmp_path / "s")
    assert code == 0 and out == f"{tmp_path / 's'}\n"
    assert "‖BA‖²/‖ΔW‖²" in err and "c_proj" in err and "total rank 16" in err
    code, out, _ = run(capsys, "solve", captured["gpt2"], "-m", "cnt-x", "-o", tmp_path / "s", "--json", "-q")
    assert code == 0 and json.loads(out)["mode"] == "cnt-x" and json.loads(out)["path"] == str(tmp_path / "s")
    monkeypatch.setenv("CNTINIT_CACHE", str(tmp_path / "cache"))
    code, out, _ = run(capsys, "solve", captured["gpt2"], "-m", "cnt-x", "--json", "-q")  # into the cache: where is it?
    assert code == 0 and Path(json.loads(out)["path"]).parent.parent == tmp_path / "cache"
    code, out, _ = run(capsys, "inspect", tmp_path / "s")
    assert code == 0 and "cnt-x · offset init" in out and "out Δ" in out
    code, out, _ = run(capsys, "inspect", tmp_path / "s", "--json")
    assert code == 0 and json.loads(out)["format"] == "cntinit.solve"


def test_changed_weights_are_refused(tiny, captured, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny["bert"], copy)
    code, _, _ = run(capsys, "solve", captured["bert"], "-m", "cnt-x", "-o", tmp_path / "ok", "--model", copy, "-q")
    assert code == 0
    model = transformers.BertModel.from_pretrained(copy)
    with torch.no_grad():
        model.encoder.layer[1].attention.self.query.weight[0, 0] += 1e-3
    model.save_pretrained(copy)
    code, out, err = run(capsys, "solve", captured["bert"], "-m", "cnt-x", "-o", tmp_path / "s", "--model", copy)
    assert code == 2 and out == "" and "differ from the ones captured" in err and not (tmp_path / "s").exists()


BAD = [
    (["-m", "cnt-z"], "--mode cnt-z is not one of cnt-x, cnt-s, cnt-sh"),
    (["-m", "cnt-x", "--rank", "0"], "--rank must be at least 1"),
    (["-m", "cnt-x", "--rcond", "1.5"], r"--rcond must be in \[0, 1\)"),
    (["-m", "cnt-s", "--self-form", "pca"], "--self-form pca is not one of paper, zca"),
    (["-m", "cnt-x", "--split-p", "2"], r"--split-p must be in \[0, 1\]"),
    (["-m", "cnt-x", "--init", "zero"], "--init zero is not one of offset, residual"),
    (["-m", "cnt-x", "--budget", "10"], "add --vas"),
    (["-m", "cnt-x", "--vas", "--min-rank", "3", "--max-rank", "2"], "--max-rank 2 must be at least 1 and at least --min-rank 3"),
    (["-m", "cnt-x", "--bucket-weights", "1,1"], r"--bucket-weights has 2 value\(s\) but the capture has 3 bucket\(s\): give 3"),
    (["-m", "cnt-x", "--bucket-weights", "1,x,2"], "not a comma-separated list of numbers"),
    (["-m", "cnt-x", "--device", "tpu"], "--device tpu is not one of auto, cpu, cuda"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_solve_input_one_line_exit_2_nothing_written(args, message, captured, tmp_path, capsys):
    code, out, err = run(capsys, "solve", captured["llama"], *args, "--out", tmp_path / "s")
    last = err.rstrip("\n").split("\n")[-1]
    assert code == 2 and out == "" and last.startswith("error: ") and re.search(message, last), err
    assert not (tmp_path / "s").exists() and leftovers(tmp_path) == []


def test_solve_refuses_what_is_not_a_store_and_foreign_outputs(captured, tmp_path, capsys):
    code, _, err = run(capsys, "solve", tmp_path, "-m", "cnt-x", "-o", tmp_path / "s")
    assert code == 2 and "is a directory without manifest.json, not a cntinit statistics store" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "solve", captured["llama"], "-m", "cnt-x", "-o", foreign)
    assert code == 2 and "cntinit replaces only what it wrote" in err
    code, _, err = run(capsys, "solve", captured["llama"], "-m", "cnt-x", "-o", captured["bert"])
    assert code == 2 and "is a statistics store (from `cntinit capture`; `cntinit solve` takes it), not a solve directory" in err
    run(capsys, "solve", captured["llama"], "-m", "cnt-x", "-o", tmp_path / "s", "-q")
    code, _, _ = run(capsys, "solve", captured["llama"], "-m", "cnt-s", "-o", tmp_path / "s", "-q")
    assert code == 0 and json.loads((tmp_path / "s" / "manifest.json").read_text())["mode"] == "cnt-s"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the CUDA solve with the CPU one")
@pytest.mark.parametrize("options", [Options(mode="cnt-x", rank=4, vas=True), Options(mode="cnt-s", rank=4, vas=True),
                                     Options(mode="cnt-sh", rank=4, vas=True), Options(mode="corda", rank=4),
                                     Options(mode="eva", rank=4), Options(mode="inilora", rank=4, steps=200)],
                         ids=lambda o: o.mode)
def test_cuda_solve_equals_cpu_solve(options, captured, tmp_path):
    for device in ("cpu", "cuda"):
        solve(captured["llama"], tmp_path / device, options, device=device)
    cpu_manifest, cpu = solved(tmp_path / "cpu")
    cuda_manifest, cuda = solved(tmp_path / "cuda")
    assert cpu_manifest["modules"] == cuda_manifest["modules"] and cuda_manifest["device"].startswith("cuda")
    for name, (b, a) in cpu.items():
        tolerance = 1e-4 if options.mode == "inilora" else 1e-6  # Adam runs in float32
        np.testing.assert_allclose(cuda[name][0] @ cuda[name][1], b @ a, rtol=0, atol=tolerance * max(np.abs(b @ a).max(), 1))
        if options.mode == "eva":
            np.testing.assert_allclose(np.abs(cuda[name][1]), np.abs(a), atol=1e-6)


def test_big_models_get_one_report_row_per_module_kind(captured, tmp_path, capsys, monkeypatch):
    from cntinit import tables

    monkeypatch.setattr(tables, "TABLE_ROWS", 4)
    run(capsys, "solve", captured["llama"], "-m", "cnt-s", "-r", "3", "-o", tmp_path / "s", "-q")
    code, out, _ = run(capsys, "inspect", tmp_path / "s")
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    q_rows = [row for name, row in report["modules"].items() if name.endswith("q_proj")]
    line = next(line for line in out.splitlines() if "self_attn.q_proj" in line)
    assert code == 0 and "medians over layers" in out and "layers.0" not in out
    assert line.split()[1] == "3" and line.split()[-1] == str(max(r["floored"] for r in q_rows))
    assert f"{100 * np.median([r['kept'] for r in q_rows]):.1f}%" in line


def test_vas_min_rank_above_a_modules_size_records_the_rank_it_has(captured, tmp_path):
    """k_proj maps 64 → 32: --min-rank 40 used to record rank 40 for factors of rank 32."""
    out = solve(captured["llama"], tmp_path / "s", Options(mode="cnt-s", rank=2, vas=True, min_rank=40))
    manifest, factors = solved(out)
    for name, (b, a) in factors.items():
        entry = manifest["modules"][name]
        assert entry["rank"] == b.shape[1] == a.shape[0] == min(40, entry["in_features"], entry["out_features"]), name


@pytest.mark.parametrize("options", [dict(mode="cnt-s", rank=2), dict(mode="cnt-x", rank=2, vas=True), dict(mode="corda", rank=2)])
def test_a_subset_of_a_capture_solves_as_a_capture_of_that_subset(options, tiny, calibration, captured, tmp_path, capsys):
    """One all-linear capture serves a q/v solve: the same factors, ranks and fingerprint as a capture
    of q_proj,v_proj alone (q and v read one shared statistic in both), and the export checks out."""
    subset = cntinit.solve(captured["llama"], tmp_path / "subset", Options(**options), targets="q_proj,re:.*layers\\.1\\.self_attn\\.v_proj")
    alone = cntinit.capture(tiny["llama"], calibration, tmp_path / "qv", targets="q_proj,re:.*layers\\.1\\.self_attn\\.v_proj", buckets=3)
    direct = cntinit.solve(alone, tmp_path / "direct", Options(**options))
    a, b = Solution(subset), Solution(direct)
    assert list(a.manifest["modules"]) == list(b.manifest["modules"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert a.manifest["model"]["fingerprint"] == b.manifest["model"]["fingerprint"]
    assert {n: m["rank"] for n, m in a.manifest["modules"].items()} == {n: m["rank"] for n, m in b.manifest["modules"].items()}
    fa, fb = a.factors(), b.factors()
    assert fa.keys() == fb.keys()
    for name in fa:
        for x, y in zip(fa[name], fb[name]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    code, _, err = run(capsys, "export", subset, "-o", tmp_path / "e", "--check")
    figure = re.search(r"check: PEFT loads .* to (\d\.\de-\d\d) \(relative\)", err)
    assert code == 0 and figure and float(figure[1]) < 1e-12, err  # exact files, checked in float64


def test_subset_solves_are_cached_apart(captured, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CNTINIT_CACHE", str(tmp_path / "cache"))
    paths = []
    for targets in (None, "q_proj", "q_proj", "v_proj"):
        code, out, err = run(capsys, "solve", captured["llama"], "-m", "cnt-s", "-r", "2", "-q", *(["-t", targets] if targets else []))
        assert code == 0, err
        paths.append(out.strip())
    assert len({paths[0], paths[1], paths[3]}) == 3 and paths[1] == paths[2]
    assert all(n.endswith("q_proj") for n in Solution(paths[1]).manifest["modules"])


def test_report_shows_rcond_and_floored_only_where_the_mode_floors(tiny, captured, tmp_path, capsys):
    """pissa's and inilora's titles showed rcond, and inilora's footer explained a `floored` column it did not have."""
    for mode, extra in (("pissa", []), ("inilora", ["--steps", "5"])):
        code, _, err = run(capsys, "solve", "--model", tiny["llama"], "-t", "q_proj", "-m", mode, "-r", "2", "-o", tmp_path / mode, *extra)
        assert code == 0 and f"{mode} · residual init" in err
        assert "rcond" not in err and "floored" not in err and "under the floor" not in err, err
    code, _, err = run(capsys, "solve", captured["llama"], "-m", "cnt-s", "-r", "2", "-o", tmp_path / "cnt")
    assert code == 0 and "cnt-s · offset init · rcond 0.0001" in err and "floored = eigenvalues under rcond·λmax" in err
    assert "fit ÷ opt" not in err


def test_an_offset_init_that_moves_the_outputs_far_warns_with_the_fix(captured, tmp_path, capsys):
    """The warning fires from the report's own out Δ (median over modules) above FAR_OUT_DELTA, for an
    offset init only, in one line that names the fix the benchmarks support."""
    from cntinit.solve.report import FAR_OUT_DELTA

    far, fired = "offset init changes the adapted layers' outputs", []
    for mode, init in (("cnt-x", "offset"), ("cnt-x", "residual"), ("lora", "offset")):
        code, _, err = run(capsys, "solve", captured["llama"], "--mode", mode, "--init", init, "--rank", "2", "-o", tmp_path / f"{mode}-{init}")
        assert code == 0, err
        report = json.loads((tmp_path / f"{mode}-{init}" / "report.json").read_text())
        median = float(np.median([m["output_change"] for m in report["modules"].values()]))
        warned = [line for line in err.splitlines() if far in line]
        expected = init == "offset" and median > FAR_OUT_DELTA
        assert len(warned) == expected, (mode, init, median, err)
        if expected:
            assert f"{median:.3g}" in warned[0] and "--init residual" in warned[0]
            fired.append(mode)
    assert fired == ["cnt-x"]  # the tiny model's offset cnt-x moves its outputs far
    assert (tmp_path / "cnt-x-offset" / "report.json").exists()  # the solve is written all the same


@pytest.mark.parametrize("mode", ["cnt-x", "cnt-sh"])
def test_out_delta_scales_every_update_by_one_factor_to_the_median_asked(captured, tmp_path, mode):
    """--out-delta T: the paper's factors, each BA times one c = √(T / median out Δ), so the report's
    median out Δ is T; the report says c; the manifest records T (and leaves it out when not set)."""
    plain = solve(captured["llama"], tmp_path / "plain", mode=mode, rank=2)
    scaled = solve(captured["llama"], tmp_path / "scaled", mode=mode, rank=2, out_delta=0.02)
    before, after = (json.loads((d / "report.json").read_text()) for d in (plain, scaled))
    median = float(np.median([m["output_change"] for m in before["modules"].values()]))
    c = math.sqrt(0.02 / median)
    assert after["out_delta_scale"] == pytest.approx(c, rel=1e-9) and "out_delta_scale" not in before
    assert float(np.median([m["output_change"] for m in after["modules"].values()])) == pytest.approx(0.02, rel=1e-9)
    for name, (b, a) in Solution(plain).factors().items():
        b2, a2 = Solution(scaled).factors()[name]
        want = c * (b.double() @ a.double())
        torch.testing.assert_close(b2.double() @ a2.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        assert after["modules"][name]["kept"] == before["modules"][name]["kept"]  # of ΔW's split, unscaled
    assert json.loads((scaled / "manifest.json").read_text())["params"]["out_delta"] == 0.02
    assert "out_delta" not in json.loads((plain / "manifest.json").read_text())["params"]  # older manifests stay as they were


def test_out_delta_normalize_and_damping_refusals(captured, tmp_path, capsys):
    for args, message in [(["-m", "pissa", "--out-delta", "0.02"], "--out-delta applies to --mode cnt-x or cnt-s or cnt-sh, not pissa"),
                          (["-m", "cnt-s", "--out-delta", "nan"], "--out-delta must be a positive finite number up to 1e6"),
                          (["-m", "cnt-s", "--out-delta", "0"], "--out-delta must be a positive finite number up to 1e6"),
                          (["-m", "cnt-s", "--init", "residual", "--quantize", "nf4", "--out-delta", "0.02"],
                           "--out-delta rescales BA after the split, and --quantize fits the NF4 base to the split itself"),
                          (["-m", "cnt-sh", "--damping", "0.1"], "--damping applies to --mode cnt-x or cnt-s, not cnt-sh"),
                          (["-m", "cnt-x", "--damping", "inf"], "--damping must be a positive finite number up to 1e6"),
                          (["-m", "cnt-s", "--normalize", "max"], "--normalize"),
                          (["-m", "eva", "--normalize", "trace"], "--normalize applies to --mode cnt-x or cnt-s or cnt-sh, not eva")]:
        assert_refused(capsys, ["solve", captured["llama"], "-r", "2", *args], message, tmp_path / "out")


def test_a_batch_of_weights_is_each_weight_converted_once_in_its_place():
    """The solve's batches: each W copied into its place in the solve's dtype (a model may keep some modules
    in float32 beside bfloat16 ones); the same values as stacking them and converting the stack."""
    from cntinit.solve.inputs import stacked_weights

    torch.manual_seed(0)
    modules = {"a": torch.nn.Linear(6, 4).bfloat16(), "b": torch.nn.Linear(6, 4), "c": torch.nn.Linear(6, 4).double()}
    for dtype in (torch.float32, torch.float64):
        batch = stacked_weights(modules, list(modules), torch.device("cpu"), dtype)
        assert batch.dtype == dtype and batch.shape == (3, 4, 6)
        for i, module in enumerate(modules.values()):
            assert torch.equal(batch[i], module.weight.detach().to(dtype))
