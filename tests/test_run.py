"""`cntinit run` recipes, the content-addressed cache, `cntinit cache`, and the cached stages."""

from __future__ import annotations

import json
import re
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cntinit import plots, recipe, runner
from cntinit.errors import CntinitError
from cntinit.solve.solution import Solution
from cntinit.storage import cache

from conftest import run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["capture.max_samples=48", "capture.seq_len=32", "capture.batch_size=16"]


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("CNTINIT_CACHE", str(directory))
    return directory


def write_recipe(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def tiny_recipe(tmp_path, tiny, calibration, **changes) -> Path:
    fields = {"model": str(tiny["llama"]), "targets": "q_proj,v_proj,down_proj", "out": str(tmp_path / "out"),
              "capture": {"data": str(calibration), "seq_len": 32},
              "solves": [{"mode": "cnt-s", "rank": 4}, {"mode": "cnt-x", "rank": 4, "vas": True}],
              "exports": [{"format": "peft", "alpha": 8}]} | changes
    return write_recipe(tmp_path / "recipe.yaml", **fields)


def forbid(monkeypatch, *stages):
    """Make running any of these stages fail the test: a cache hit must not call them."""
    for stage in stages:
        def refuse(*args, stage=stage, **kwargs):
            raise AssertionError(f"{stage} ran on a cache hit")
        monkeypatch.setattr(runner, stage, refuse)


def statuses(summary: dict) -> dict:
    return {(row["stage"], row["name"]): row["status"] for row in summary["stages"]}


def test_embedded_recipe_runs_end_to_end_then_hits_the_cache(tmp_path, cache_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["run", ROOT / "recipes" / "minilm-embedded.yaml", f"out={out}", *SMALL, "--json"]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    first = json.loads(stdout)
    assert set(statuses(first).values()) == {"computed"} and len(first["stages"]) == 1 + 3 * 2
    assert all(row["check"] < 1e-5 for row in first["stages"] if row["stage"] == "export")  # PEFT loaded each one
    for name in ("cnt-s-r8", "cnt-x-r8-vas", "pissa-r8"):
        assert (out / name / "peft" / "adapter_config.json").is_file()
        assert (out / name / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((out / name / "report.json").read_text())["mode"] == name.split("-r")[0]
    ranks = json.loads((out / "cnt-x-r8-vas" / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert len(set(ranks.values())) > 1  # VAS gave variable ranks

    entries = {e.path: e.path.stat().st_mtime_ns for e in cache.entries(cache_dir)}
    assert len(entries) == 4  # one capture, three solves
    forbid(monkeypatch, "capture", "solve", "export")
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    second = json.loads(stdout)
    assert statuses(second) == {key: ("up to date" if key[0] == "export" else "cache hit") for key in statuses(first)}
    assert {e.path: e.path.stat().st_mtime_ns for e in cache.entries(cache_dir)} == entries  # nothing rewritten
    assert second["exports"] == first["exports"]


def test_changed_solve_option_reuses_the_capture(tmp_path, tiny, calibration, cache_dir, capsys, monkeypatch):
    path = tiny_recipe(tmp_path, tiny, calibration)
    code, _, err = run(capsys, "run", path, "--quiet")
    assert code == 0, err
    forbid(monkeypatch, "capture")
    code, stdout, err = run(capsys, "run", path, "solves.0.rank=2", "--json")
    assert code == 0, err
    result = statuses(json.loads(stdout))
    assert result[("capture", "calib.jsonl")] == "cache hit"
    assert result[("solve", "cnt-s-r2")] == "computed" and result[("solve", "cnt-x-r4-vas")] == "cache hit"
    assert result[("export", "cnt-s-r2/peft")] == "computed"
    kinds = [e.kind for e in cache.entries(cache_dir)]
    assert kinds.count("capture") == 1 and kinds.count("solve") == 3


def test_a_solve_may_take_a_subset_of_the_captured_targets(tmp_path, tiny, calibration, cache_dir, capsys):
    path = tiny_recipe(tmp_path, tiny, calibration, solves=[
        {"mode": "cnt-s", "rank": 4}, {"name": "qv", "mode": "cnt-s", "rank": 4, "targets": ["q_proj", "v_proj"]}],
        exports=[{"format": "peft", "check": True}])
    code, stdout, err = run(capsys, "run", path, "--json", "-q")
    assert code == 0, err
    stages = {row["name"]: row for row in json.loads(stdout)["stages"]}
    whole = json.loads((Path(stages["cnt-s-r4"]["path"]) / "manifest.json").read_text())["modules"]
    subset = json.loads((Path(stages["qv"]["path"]) / "manifest.json").read_text())["modules"]
    assert len(whole) == 6 and sorted(subset) == sorted(n for n in whole if not n.endswith("down_proj"))
    assert stages["qv/peft"]["check"] < 1e-5
    code, _, err = run(capsys, "run", path, "solves.1.targets=[up_proj]")
    assert code == 2 and "recipe solves.1 (qv): --targets up_proj matched no captured module" in err


def test_changed_capture_option_or_data_misses(tmp_path, tiny, calibration, cache_dir):
    def capture_key(**options):
        return cache.key("capture", {"model": cache.tree_digest(tiny["llama"], cache_dir), **options})
    assert capture_key(data="a") != capture_key(data="b")
    path, hit = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    again, hit_again = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    longer, hit_longer = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=48, cache_dir=cache_dir)
    assert (hit, hit_again, hit_longer) == (False, True, False) and again == path != longer
    edited = tmp_path / "edited.jsonl"
    edited.write_text(calibration.read_text().replace("light", "night"))
    other, hit_other = runner.cached_capture(tiny["llama"], edited, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    assert not hit_other and other != path


def test_tree_digest_follows_contents_not_location(tmp_path, tiny, cache_dir):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(tiny["bert"]), str(copy)], check=True)
    assert cache.tree_digest(copy, cache_dir) == cache.tree_digest(tiny["bert"], cache_dir)
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    assert cache.tree_digest(copy, cache_dir) != cache.tree_digest(tiny["bert"], cache_dir)


def test_concurrent_runs_share_one_entry(tmp_path, tiny, calibration, cache_dir):
    path = tiny_recipe(tmp_path, tiny, calibration, solves=[{"mode": "cnt-s", "rank": 4}], exports=[])
    env = dict(os.environ, CNTINIT_CACHE=str(cache_dir))
    command = [sys.executable, "-m", "cntinit", "run", str(path), "--json"]
    jobs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [job.communicate(timeout=600) + (job.returncode,) for job in jobs]
    assert [code for _, _, code in results] == [0, 0], [err for _, err, _ in results]
    summaries = [json.loads(out) for out, _, _ in results]
    assert {s["stages"][0]["path"] for s in summaries} == {str(e.path) for e in cache.entries(cache_dir) if e.kind == "capture"}
    assert len(cache.entries(cache_dir)) == 2  # one capture, one solve
    assert sorted(s["stages"][0]["status"] for s in summaries) == ["cache hit", "computed"]  # the second waited, then hit
    assert not [p for p in (cache_dir / "captures").iterdir() if p.name.startswith(".")]


def _ready_many_times(cache_dir: str) -> None:
    for _ in range(300):
        cache.ready(Path(cache_dir))


def test_concurrent_cache_checks_do_not_trip_each_other(cache_dir):
    """Every run checks the cache is writable; runs starting together must not see each
    other's probe vanish (a shared probe name failed one of two concurrent runs in CI)."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_ready_many_times, args=(str(cache_dir),)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 4
    assert list((cache_dir / "locks").iterdir()) == []


BAD_RECIPES = [
    ({"solves.0.rnk": 8}, "recipe key solves.0.rnk is not known (did you mean solves.0.rank?)"),
    ({"solves.0.rank": "eight"}, "recipe key solves.0.rank must be an integer, got str 'eight'"),
    ({"capture.seq_length": 32}, "recipe key capture.seq_length is not known (did you mean capture.seq_len?); capture takes:"),
    ({"capture.max_samples": 1.5}, "recipe key capture.max_samples must be an integer or null"),
    ({"modle": "x"}, "recipe key modle is not known"),
    ({"solves": {"mode": "cnt-s"}}, "recipe key solves must be a list"),
    ({"solves.1.name": "cnt-s-r4"}, "two solves are named cnt-s-r4"),
    ({"solves.0.name": "../escape"}, "must be a plain name"),
    ({"capture.data": "-"}, "a recipe cannot read stdin"),
    ({"solves.0.vas": "yes"}, "recipe key solves.0.vas must be true or false"),
    ({"exports.0.format": "onnx"}, "recipe key exports.0.format onnx is not one of peft, kohya, diffusers"),
    ({"exports.0.format": "Kohya"}, "recipe key exports.0.format Kohya is not one of peft, kohya, diffusers: did you mean kohya?"),
    ({"solves.0.mode": "cnt_x"}, "recipe solves.0 (cnt_x-r4): --mode cnt_x is not one of cnt-x, cnt-s, cnt-sh, lora, pissa, milora, olora, mica, inilora, inilora-alpha, inilora-beta, eva, corda, lora-ga, lora-one, loftq: did you mean cnt-x?"),
    ({"solves.0.rank": 4, "solves.0.budget": 10}, "recipe solves.0 (cnt-s-r4): --budget, --min-rank and --max-rank shape variable ranks"),
    ({"capture": None}, "recipe key capture must be a mapping"),
    ({"model": "/nonexistent/model"}, "recipe key model: model path /nonexistent/model does not exist"),
    ({"capture.data": "/nonexistent.jsonl"}, "recipe key capture.data: data path /nonexistent.jsonl does not exist"),
]


@pytest.mark.parametrize("changes, message", BAD_RECIPES, ids=[m.split(":")[0][:40] for _, m in BAD_RECIPES])
def test_bad_recipes_name_the_key_and_run_nothing(tmp_path, tiny, calibration, cache_dir, capsys, changes, message):
    fields = yaml.safe_load(tiny_recipe(tmp_path, tiny, calibration).read_text())
    for dotted, value in changes.items():
        node, *path, last = [fields, *dotted.split(".")]
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value
    path = write_recipe(tmp_path / "bad.yaml", **fields)
    code, _, err = run(capsys, "run", path)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not cache.entries(cache_dir)


def test_needs_statistics_without_capture_is_refused(tmp_path, tiny, calibration, cache_dir, capsys):
    fields = yaml.safe_load(tiny_recipe(tmp_path, tiny, calibration).read_text())
    del fields["capture"]
    code, _, err = run(capsys, "run", write_recipe(tmp_path / "r.yaml", **fields))
    assert code == 2 and "recipe solves.0 (cnt-s-r4): --mode cnt-s needs activation statistics; add a capture section" in err


@pytest.mark.parametrize("override, message", [
    ("solves.5.rank=2", "override solves.5.rank: solves has 2 entries; 5 is not one of 0..1"),
    ("rank", "override 'rank' must be key=value"),
    ("model.path=x", "override model.path: model is a str, it has no keys"),
])
def test_bad_overrides(tmp_path, tiny, calibration, cache_dir, capsys, override, message):
    code, _, err = run(capsys, "run", tiny_recipe(tmp_path, tiny, calibration), override)
    assert code == 2 and message in err, err


def test_bad_yaml_names_the_line(tmp_path, cache_dir, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model: x\nsolves:\n  - mode: [cnt-s\n")
    code, _, err = run(capsys, "run", path)
    assert code == 2 and "is not valid YAML at line" in err


def test_recipe_yaml_is_never_executed(tmp_path, cache_dir, capsys):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['touch pwned']\nsolves: []\n")
    code, _, err = run(capsys, "run", path)
    assert code == 2 and "is not valid YAML" in err and not Path("pwned").exists()


def test_overrides_are_read_as_yaml_and_checked(tmp_path, tiny, calibration):
    plan = recipe.load(tiny_recipe(tmp_path, tiny, calibration), ["solves.1.rank=6", "capture.max_samples=10", "exports.0.rslora=true",
                                                                   "solves.0.bucket_weights=[1, 0.5]", "plot=false"])
    assert plan.solves[1]["rank"] == 6 and plan.solves[1]["name"] == "cnt-x-r6-vas" and plan.capture["max_samples"] == 10
    assert plan.exports[0]["rslora"] is True and plan.solves[0]["bucket_weights"] == [1.0, 0.5] and plan.plot is False


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    """Their keys and options; their models are Hub ids this offline machine does not have (load refuses those)."""
    plan = recipe.check(yaml.safe_load(path.read_text()), default_name=path.stem)
    assert plan.solves and all(s["mode"] for s in plan.solves)
    runner._checked_solves(plan)  # every solve's options hold together


def test_cache_ls_rm_prune(tmp_path, tiny, calibration, cache_dir, capsys):
    code, _, err = run(capsys, "run", tiny_recipe(tmp_path, tiny, calibration), "--quiet")
    assert code == 0, err
    code, stdout, _ = run(capsys, "cache", "ls", "--json")
    listed = json.loads(stdout)
    assert sorted(e["kind"] for e in listed) == ["capture", "solve", "solve"] and all(e["bytes"] > 0 for e in listed)
    code, _, err = run(capsys, "cache", "ls")
    assert code == 0
    solve_key = next(e["key"] for e in listed if e["kind"] == "solve")
    code, _, err = run(capsys, "cache", "rm", solve_key[:10])
    assert code == 0 and "removed solve" in err and not Path(next(e["path"] for e in listed if e["key"] == solve_key)).exists()
    assert run(capsys, "cache", "rm", "ffffffffffffff")[0] == 2
    assert run(capsys, "cache", "prune")[0] == 2
    code, _, err = run(capsys, "cache", "prune", "--older-than", "1w")
    assert code == 0 and len(cache.entries(cache_dir)) == 2  # all fresh
    code, _, err = run(capsys, "cache", "prune", "--max-size", "1K")
    assert code == 0 and not cache.entries(cache_dir)


def test_prune_keeps_the_recently_used(tmp_path, tiny, calibration, cache_dir):
    old, _ = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    new, _ = runner.cached_capture(tiny["llama"], calibration, targets="v_proj", seq_len=32, cache_dir=cache_dir)
    meta = old.with_suffix(".json")
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"used": 0}))
    removed, busy = cache.prune(None, max(e.bytes for e in cache.entries(cache_dir)), cache_dir)
    assert [e.path for e in removed] == [old] and not busy and new.exists()
    assert cache.parse_age("2w") == 14 * 86400 and cache.parse_size("1.5G") == int(1.5 * 1024**3)


def test_stages_without_out_use_the_cache_and_compose(tmp_path, tiny, calibration, cache_dir, capsys):
    """cntinit export $(cntinit solve $(cntinit capture ...) ...) --out adapter"""
    code, stats, err = run(capsys, "capture", tiny["llama"], "--data", calibration, "--targets", "q_proj,v_proj", "--seq-len", "32")
    assert code == 0 and Path(stats.strip()).parent == cache_dir / "captures", err
    code, again, err = run(capsys, "capture", tiny["llama"], "--data", calibration, "--targets", "q_proj,v_proj", "--seq-len", "32")
    assert again == stats and "cache hit" in err
    code, solved, err = run(capsys, "solve", stats.strip(), "--mode", "pissa", "--rank", "4", "--plot", tmp_path / "r.png")
    assert code == 0 and Path(solved.strip()).parent == cache_dir / "solves", err
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    code, adapter, err = run(capsys, "export", solved.strip(), "--out", tmp_path / "adapter", "--check")
    assert code == 0 and "check: PEFT loads" in err, err
    code, _, err = run(capsys, "capture", tiny["llama"], "--data", "-")
    assert code == 2 and "data from stdin cannot be cached" in err


def test_report_spectrum_is_the_split_matrix_spectrum(tmp_path, tiny, captured):
    """pissa splits W itself: the report's spectrum is W's singular values (at most SPECTRUM_LENGTH)."""
    import transformers

    from cntinit.models import linears
    from cntinit.solve import solve

    sol = Solution(solve(captured["llama"], tmp_path / "s", mode="pissa", rank=4))
    net = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"])
    modules = dict(net.named_modules())
    for name, row in sol.report["modules"].items():
        want = torch.linalg.svdvals(linears.weight_matrix(modules[name]).double())[:128]
        torch.testing.assert_close(torch.tensor(row["spectrum"], dtype=torch.float64), want, rtol=1e-5, atol=1e-9)


def test_a_damaged_entry_is_computed_again(tmp_path, tiny, calibration, cache_dir, capsys):
    path, _ = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    payload = next(path.glob("*.safetensors"))
    payload.write_bytes(payload.read_bytes()[:100])  # truncated
    again, hit = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    assert again == path and not hit and "is damaged (a file is missing or changed); computing it again" in capsys.readouterr().err
    from cntinit.storage.store import Store
    Store(again)  # checksums verify


def test_entries_in_use_are_kept_and_an_unwritable_cache_is_named(tmp_path, tiny, calibration, cache_dir, capsys, monkeypatch):
    path, _ = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    with cache._locked(cache_dir, path.name, "a run"):  # as a concurrent run computing or reading it holds it
        code, _, err = run(capsys, "cache", "rm", path.name[:8])
        assert code == 2 and "is in use by a running cntinit: try again when it has finished" in err
        assert cache.prune(0.0, None, cache_dir) == ([], cache.entries(cache_dir))
    assert path.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CNTINIT_CACHE", str(blocker / "cache"))
    code, _, err = run(capsys, "capture", tiny["llama"], "--data", calibration, "--targets", "q_proj")
    assert code == 2 and f"cannot write in the cache {blocker / 'cache'}" in err and "set CNTINIT_CACHE to a writable directory" in err


def test_without_matplotlib_the_run_says_once_how_to_get_plots(tmp_path, tiny, calibration, cache_dir, capsys, monkeypatch):
    from cntinit import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    code, _, err = run(capsys, "run", tiny_recipe(tmp_path, tiny, calibration))
    assert code == 0 and err.count("pip install 'cntinit[plot]'") == 1, err  # the extra's [plot] is text, not markup
    assert not list((tmp_path / "out").rglob("report.png")) and (tmp_path / "out" / "cnt-s-r4" / "report.json").is_file()


def test_the_report_plot_draws_each_modules_rank_and_its_spectrum_cut_there():
    """One bar per module at its rank, in model order; one line per spectrum over its largest value; a dot where
    each rank cuts (a rank-0 module has a bar of 0 and no dot; a module without a spectrum has no line)."""
    import numpy as np

    spectra = {"m.0.q_proj": [4.0, 2.0, 1.0], "m.0.v_proj": [9.0, 3.0, 1.0, 0.5], "m.1.q_proj": [2.0, 1.0], "m.1.v_proj": None}
    ranks = {"m.0.q_proj": 2, "m.0.v_proj": 3, "m.1.q_proj": 0, "m.1.v_proj": 4}
    report = {"mode": "cnt-s", "total_rank": 9, "budget": 9,
              "modules": {name: {"rank": ranks[name], "spectrum": spectra[name]} for name in ranks}}
    fig = plots.report_figure(report)
    bars, decay = fig.axes[0], fig.axes[1]
    heights = [path.vertices[:, 1].max() for path in bars.collections[0].get_paths()]
    assert heights == [2, 3, 0, 4] and "total 9, budget 9" in bars.get_title()
    lines = decay.collections[0].get_segments()
    assert len(lines) == 3 and np.allclose(lines[1], [[1, 1], [2, 1 / 3], [3, 1 / 9], [4, 0.5 / 9]]) and decay.get_yscale() == "log"
    assert np.allclose(decay.collections[1].get_offsets(), [[2, 0.5], [3, 1 / 9]])
    colours = bars.collections[0].get_facecolors()
    assert (colours[0] == colours[2]).all() and not (colours[0] == colours[1]).all()  # coloured by module kind


def test_a_corrupted_entry_of_the_right_size_is_computed_again(tiny, calibration, cache_dir, capsys):
    """A flipped byte kept the payload's size, so the entry stayed a hit that every solve refused."""
    path, _ = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    payload = next(path.glob("*.safetensors"))
    data = bytearray(payload.read_bytes())
    data[-7] ^= 0xFF
    payload.write_bytes(bytes(data))
    again, hit = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    assert again == path and not hit and "is damaged" in capsys.readouterr().err
    from cntinit.storage.store import Store

    Store(again)  # checksums verify
    assert runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)[1]  # a hit again


def test_rm_and_prune_say_how_much_they_freed(tiny, calibration, cache_dir, capsys):
    path, _ = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    capsys.readouterr()
    code, _, err = run(capsys, "cache", "rm", path.name[:10])
    assert code == 0 and f"{size / 1024:.1f} KiB" in err and "0 B" not in err, err
    runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    capsys.readouterr()
    code, _, err = run(capsys, "cache", "prune", "--all")
    assert code == 0 and f"removed 1 entries ({size / 1024:.1f} KiB)" in err, err


def test_prune_removes_leftovers_of_interrupted_runs_and_ls_reports_them(tiny, calibration, cache_dir, capsys):
    import socket

    path, _ = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
    host = socket.gethostname().replace("-", "_")
    stale = path.parent / f".{path.name[:20]}.tmp-{host}-999999999-xyz"
    stale.mkdir()
    code, out, _ = run(capsys, "cache", "ls")
    assert code == 0 and "1 temporary directory left by an interrupted run" in out, out
    assert run(capsys, "cache", "prune", "--older-than", "30d")[0] == 0
    assert not stale.exists() and path.exists()


def test_a_running_recipe_keeps_its_entries_from_rm(tmp_path, tiny, calibration, cache_dir, capsys, monkeypatch):
    """`cache rm` of the capture a run is solving from used to pull the store from under it."""
    attempts = []
    real_solve = runner.solve

    def solve_while_someone_removes(capture_dir, out, *args, **kwargs):
        attempts.append(run(capsys, "cache", "rm", Path(capture_dir).name[:12]))
        return real_solve(capture_dir, out, *args, **kwargs)

    monkeypatch.setattr(runner, "solve", solve_while_someone_removes)
    plan = recipe.load(write_recipe(tmp_path / "r.yaml", model=str(tiny["llama"]), targets="q_proj", out=str(tmp_path / "out"),
                                    capture={"data": str(calibration), "seq_len": 32}, solves=[{"mode": "cnt-s", "rank": 2}],
                                    plot=False), [])
    summary = runner.run(plan, cache_dir=cache_dir)
    assert attempts and attempts[0][0] == 2 and "is in use by a running cntinit" in attempts[0][2]
    assert [row["status"] for row in summary["stages"]] == ["computed", "computed"]


def test_recipes_that_are_not_text_or_nest_too_deep(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model: ./modèle\nsolves: [{mode: lora}]\n".encode("latin-1"))
    code, _, err = run(capsys, "run", latin)
    assert code == 2 and "is not UTF-8 (byte 12): save it as UTF-8" in err and err.count("\n") == 1, err
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: x\nsolves: " + "[" * 20000 + "]" * 20000 + "\n")
    code, _, err = run(capsys, "run", deep)
    assert code == 2 and "nests too deeply to be a recipe" in err and err.count("\n") == 1, err


def test_recipe_out_is_expanded_checked_first_and_never_a_root(tmp_path, tiny, calibration, cache_dir, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    plan = recipe.load(tiny_recipe(tmp_path, tiny, calibration, out="~/adapters"))
    assert plan.out == tmp_path / "home" / "adapters"  # not a directory named "~"
    for root in ("/", "~", "~/..", "/etc", "/usr/"):  # ~/.. and the system directories were taken
        code, _, err = run(capsys, "run", tiny_recipe(tmp_path, tiny, calibration, out=root))
        assert code == 2 and "would put the recipe's solves and exports straight into" in err and err.count("\n") == 1, err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "run", tiny_recipe(tmp_path, tiny, calibration, out=str(blocker / "out")))
    assert code == 2 and f"cannot write in {blocker} (not a directory): recipe key out" in err and err.count("\n") == 1, err
    assert not (cache_dir / "captures").exists()  # refused before the capture ran


def test_sigint_during_a_run_says_what_was_kept(tmp_path, tiny, calibration, cache_dir, capsys, monkeypatch):
    real_solve = runner.solve

    def interrupted_second_solve(*args, **kwargs):
        if interrupted_second_solve.calls:
            raise KeyboardInterrupt
        interrupted_second_solve.calls += 1
        return real_solve(*args, **kwargs)

    interrupted_second_solve.calls = 0
    monkeypatch.setattr(runner, "solve", interrupted_second_solve)
    code, _, err = run(capsys, "run", tiny_recipe(tmp_path, tiny, calibration), "-q")
    assert code == 130 and "interrupted: stopped by SIGINT; what finished is kept: capture calib.jsonl, solve cnt-s-r4" in err, err
    assert "nothing was written" not in err


def test_quiet_leaves_stderr_empty_even_with_warnings(tmp_path, tiny, calibration, cache_dir, capsys, monkeypatch):
    """`run -q` printed the missing-matplotlib warning; --quiet means nothing on stderr but errors."""
    monkeypatch.setattr(plots, "available", lambda: False)
    code, out, err = run(capsys, "run", tiny_recipe(tmp_path, tiny, calibration, capture={"data": str(calibration), "seq_len": 4}), "-q")
    assert code == 0 and err == "" and out.count("\n") == 2
    code, _, err = run(capsys, "run", tiny_recipe(tmp_path, tiny, calibration), "solves.0.rank=3")
    assert code == 0 and "warning: no rank/spectrum plots" in err


def test_cache_ls_tells_entries_apart_on_one_unwrapped_line(tmp_path, tiny, calibration, cache_dir, capsys):
    """Two captures both read "capture of llama over calib.jsonl", an offset and a residual solve both
    "cnt-s rank 2"; piped, rich wrapped the table at 80 columns, cutting names mid-word."""
    for targets in ("q_proj", "q_proj,v_proj"):
        assert run(capsys, "capture", tiny["llama"], "-d", calibration, "-t", targets, "--seq-len", "16", "-q")[0] == 0
    store = next(e.path for e in cache.entries(cache_dir) if e.meta.get("inputs", {}).get("targets") == "q_proj,v_proj")
    for init in ("offset", "residual"):
        assert run(capsys, "solve", store, "-m", "cnt-s", "-r", "2", "--init", init, "-q")[0] == 0
    code, out, _ = run(capsys, "cache", "ls")
    rows = [line for line in out.splitlines() if re.match(r"\s+[0-9a-f]{12}\s", line)]
    assert code == 0 and len(rows) == 4, out
    assert any("targets q_proj ·" in r for r in rows) and any("targets q_proj,v_proj ·" in r for r in rows)
    assert any("init offset · modules 4 · capture " + store.name[:12] in r for r in rows)
    assert any("init residual · modules 4 · capture " + store.name[:12] in r for r in rows)


def test_a_run_writes_nothing_into_what_the_user_keeps_under_out(tiny, calibration, tmp_path, cache_dir, capsys):
    """A recipe whose `out` holds the user's own files where the run would write (a report.json, a folder
    named like an export) is refused before any work, and those files stay as they were (a run that
    stopped at the export had already replaced the report)."""
    out = tmp_path / "out"
    (out / "cnt-s-r4" / "peft").mkdir(parents=True)
    (out / "cnt-s-r4" / "peft" / "notes.txt").write_text("mine")
    (out / "cnt-s-r4" / "report.json").write_text('{"my": "own report"}')
    recipe_file = tiny_recipe(tmp_path, tiny, calibration, solves=[{"mode": "cnt-s", "rank": 4}])
    code, stdout, err = run(capsys, "run", recipe_file)
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert f"{out / 'cnt-s-r4' / 'report.json'} is not a report cntinit wrote" in err
    assert (out / "cnt-s-r4" / "report.json").read_text() == '{"my": "own report"}' and not cache_dir.exists()
    (out / "cnt-s-r4" / "report.json").unlink()  # the folder named like the export is the user's too
    code, _, err = run(capsys, "run", recipe_file)
    assert code == 2 and f"{out / 'cnt-s-r4' / 'peft'} is a directory without manifest.json" in err and err.count("\n") == 1, err
    assert not (out / "cnt-s-r4" / "report.json").exists() and (out / "cnt-s-r4" / "peft" / "notes.txt").read_text() == "mine"
    (out / "cnt-s-r4" / "report.png").write_bytes(b"my picture")  # a plot without the report beside it is not the run's
    (out / "cnt-s-r4" / "peft" / "notes.txt").unlink()
    code, _, err = run(capsys, "run", recipe_file)
    assert code == 2 and "report.png is not a plot cntinit wrote" in err, err
    (out / "cnt-s-r4" / "report.png").unlink()
    code, _, err = run(capsys, "run", recipe_file)  # an empty folder is taken, as everywhere
    assert code == 0, err


def test_cache_rm_and_prune_remove_a_linked_entry_not_its_target(tiny, calibration, tmp_path, cache_dir, capsys):
    """An entry that is a symbolic link (a user's own arrangement) stopped `cache rm` with rmtree's traceback:
    the link goes, the directory it names stays, and the message says so."""
    elsewhere = tmp_path / "kept"
    for command in (["rm"], ["prune", "--all"]):
        path, _ = runner.cached_capture(tiny["llama"], calibration, targets="q_proj", seq_len=32, cache_dir=cache_dir)
        shutil.rmtree(elsewhere, ignore_errors=True)
        path.rename(elsewhere)
        path.symlink_to(elsewhere, target_is_directory=True)
        code, _, err = run(capsys, "cache", *command, *([path.name[:12]] if command == ["rm"] else []))
        assert code == 0 and "a link to" in err and ("left as it is" in err or "left as they are" in err), err
        assert not path.is_symlink() and not path.exists() and (elsewhere / "manifest.json").is_file()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="gives files to another user: needs root")
def test_a_cache_takes_entries_only_from_users_it_trusts(tiny, calibration, cache_dir, capsys, monkeypatch):
    """CNTINIT_CACHE shared with others: an entry another user planted was a hit (its checksums are its own,
    so they prove nothing). Entries, and the cache itself, count only when this user or CNTINIT_CACHE_TRUST owns them."""
    def plant(path):
        for item in [path, *path.iterdir()]:
            os.chown(item, 4242, 4242)  # a user this system has no name for

    args = dict(targets="q_proj", seq_len=32, cache_dir=cache_dir)
    path, _ = runner.cached_capture(tiny["llama"], calibration, **args)
    plant(path)
    capsys.readouterr()
    again, hit = runner.cached_capture(tiny["llama"], calibration, **args)
    assert again == path and not hit and path.stat().st_uid == os.getuid()
    assert "was written by 4242, whom CNTINIT_CACHE_TRUST does not name; computing it again" in capsys.readouterr().err
    plant(path)
    monkeypatch.setenv("CNTINIT_CACHE_TRUST", "someone, 4242")
    assert runner.cached_capture(tiny["llama"], calibration, **args) == (path, True)
    os.chown(cache_dir, 4242, 4242)
    monkeypatch.delenv("CNTINIT_CACHE_TRUST")
    with pytest.raises(CntinitError, match=f"the cache {cache_dir} belongs to 4242, not you, so entries anyone who can write there left "
                                           "would be taken as results: set CNTINIT_CACHE to a cache of your own, or trust its owner with "
                                           "CNTINIT_CACHE_TRUST=4242"):
        runner.cached_capture(tiny["llama"], calibration, **args)
    monkeypatch.setenv("CNTINIT_CACHE_TRUST", "group:nosuchgroup,4242")
    assert runner.cached_capture(tiny["llama"], calibration, **args) == (path, True)
