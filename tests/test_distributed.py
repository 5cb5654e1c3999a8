"""Under torchrun, a 2-process gloo capture equals one process over the same data (and solves alike),
and a 2-process solve equals a one-process solve."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cntinit import capture, distributed, merge, solve
from cntinit.solve.solution import Solution
from cntinit.storage.store import Store


def test_torchrun_capture_equals_one_process(tiny, calibration, tmp_path):
    """Statistics and (--gradients) loss gradients are summed across the processes."""
    options = ["--targets", "q_proj,v_proj,down_proj", "--seq-len", "32", "--batch-size", "8", "--buckets", "2", "--gradients"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "cntinit", "capture", str(tiny["llama"]), "--data", str(calibration), *options,
                             "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == [str(tmp_path / "two")]  # rank 0 prints the store path
    assert result.stderr.count("capture ━") <= 1  # one progress bar: rank 0's
    two = Store(tmp_path / "two")
    one = Store(capture(tiny["llama"], calibration, tmp_path / "one", targets="q_proj,v_proj,down_proj", seq_len=32,
                        batch_size=8, buckets=2, gradients=True))
    assert two.manifest["data"] == one.manifest["data"] and two.manifest["capture"] == one.manifest["capture"]
    assert two.manifest["gradients"]["tokens"] == one.manifest["gradients"]["tokens"]
    assert two.manifest["gradients"]["mean_loss"] == pytest.approx(one.manifest["gradients"]["mean_loss"], rel=1e-6)
    shards = [capture(tiny["llama"], calibration, tmp_path / f"shard{i}", targets="q_proj,v_proj,down_proj", seq_len=32, batch_size=8,
                      buckets=2, gradients=True, shard=f"{i}/2") for i in range(2)]
    merged = Store(merge(shards, tmp_path / "merged"))  # the ranks' batches are the shards': their gradient sums add up the same
    assert two.manifest["gradients"] == merged.manifest["gradients"] | {"mean_loss": two.manifest["gradients"]["mean_loss"]}
    for name in one.manifest["modules"]:
        want = merged.gradient(name).double()
        assert float((two.gradient(name).double() - want).norm() / want.norm()) < 1e-5, name
    for key in one.keys:
        want, got = one.tensors(key), two.tensors(key)
        for name in want:
            torch.testing.assert_close(got[name].double(), want[name].double(), rtol=2e-5, atol=1e-4)
    factors = [Solution(solve(store.path, tmp_path / f"s-{store.path.name}", mode="cnt-s", rank=4)).factors() for store in (one, two)]
    for name, (b, a) in factors[0].items():
        other = factors[1][name][0] @ factors[1][name][1]  # float32 sums in another order, through Σ^-1/2: ~1e-4
        assert float((other - b @ a).norm() / (b @ a).norm()) < 1e-3, name


def test_units_go_largest_first_to_the_least_loaded_rank():
    owner = distributed.assign({"a": 10, "b": 7, "c": 5, "d": 4, "e": 3}, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}  # loads 14 and 15 (the best split is 14/15)
    assert distributed.assign({"x": 1, "y": 1, "z": 1}, 4) == {"x": 0, "y": 1, "z": 2}  # an idle rank is fine
    assert distributed.assign({}, 2) == {}


SOLVES = {  # name: options; VAS and eva exchange spectra between ranks, lora and pissa --niter draw per module
    "cnt-s-vas": dict(mode="cnt-s", rank=4, vas=True),
    "eva": dict(mode="eva", rank=4),
    "lora": dict(mode="lora", rank=4),
    "pissa-niter": dict(mode="pissa", rank=4, niter=2),
}

SCRIPT = """
import json, sys
import torch.distributed as dist
from cntinit import solve
dist.init_process_group("gloo")  # solve() joins this group instead of making its own
for name, options in json.loads(sys.argv[2]).items():
    solve(sys.argv[1], sys.argv[3] + "/" + name, **options)
dist.destroy_process_group()
"""


def test_torchrun_solve_equals_one_process(tiny, calibration, tmp_path):
    stats = capture(tiny["llama"], calibration, tmp_path / "stats", targets="q_proj,k_proj,v_proj,o_proj,down_proj", seq_len=32)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cli = subprocess.run([*torchrun, "-m", "cntinit", "solve", str(stats), "--mode", "cnt-x", "--rank", "4", "--out", str(tmp_path / "cli")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert cli.stdout.strip().splitlines() == [str(tmp_path / "cli")]  # rank 0 writes and prints
    assert "2 processes: this one solves" in cli.stderr
    script = tmp_path / "solves.py"
    script.write_text(SCRIPT)
    api = subprocess.run([*torchrun, str(script), str(stats), json.dumps(SOLVES), str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert api.returncode == 0, api.stderr[-3000:]
    for name, options in ({"cnt-x": dict(mode="cnt-x", rank=4)} | SOLVES).items():
        two = Solution(tmp_path / "cli" if name == "cnt-x" else tmp_path / "two" / name)
        one = Solution(solve(stats, tmp_path / "one" / name, **options))
        assert two.manifest["modules"] == one.manifest["modules"] and two.manifest["params"] == one.manifest["params"], name
        assert list(two.report["modules"]) == list(one.report["modules"])
        want, got = one.factors(), two.factors()
        assert list(got) == list(want), name  # the same modules, in model order
        for module, (b, a) in want.items():
            torch.testing.assert_close(got[module][0], b, rtol=1e-9, atol=1e-12, msg=f"{name} {module}")
            torch.testing.assert_close(got[module][1], a, rtol=1e-9, atol=1e-12, msg=f"{name} {module}")
        for module, row in one.report["modules"].items():
            assert two.report["modules"][module]["rank"] == row["rank"], (name, module)


def test_a_module_draws_the_same_numbers_whatever_else_is_solved(tiny, tmp_path):
    """Random draws come from --seed and the module's name, not from its batch: how torchrun splits
    the modules cannot change them."""
    every = Solution(solve(None, tmp_path / "all", mode="lora", rank=2, model=tiny["llama"], targets="q_proj,k_proj")).factors()
    alone = Solution(solve(None, tmp_path / "one", mode="lora", rank=2, model=tiny["llama"], targets="k_proj")).factors()
    assert alone and all(torch.equal(alone[name][1], every[name][1]) for name in alone)
    other = Solution(solve(None, tmp_path / "seed", mode="lora", rank=2, seed=1, model=tiny["llama"], targets="k_proj")).factors()
    assert not any(torch.equal(other[name][1], alone[name][1]) for name in alone)


def test_under_torchrun_the_output_goes_to_out_not_the_cache(captured, tiny, calibration, monkeypatch, capsys):
    from conftest import run

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group is joined
    for args in (["capture", tiny["llama"], "--data", calibration], ["solve", captured["llama"], "--mode", "cnt-s"]):
        code, out, err = run(capsys, *args)
        assert code == 2 and out == "" and "under torchrun give --out (a directory every process can reach)" in err, err


FAILING_ON_RANK_1 = """
import importlib, os, sys
from cntinit import cli
from cntinit.errors import CntinitError

module_name, attribute = sys.argv[1], sys.argv[2]
owner = importlib.import_module(module_name)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)

def failing(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise CntinitError("unreadable image (simulated, rank 1 only)")
    return real(*args, **kwargs)

setattr(owner, name, failing)
cli.main(sys.argv[3:])
"""


@pytest.mark.parametrize("stage, where", [
    ("capture", "cntinit.capture.recorder Recorder.run"),  # mid-stream, before the sums are added
    ("eva", "cntinit.solve.modes.data_baselines eigen"),  # before the first meeting (the explained variances)
    ("vas", "cntinit.solve.report diagnostics"),  # between the VAS meeting and the gather
])
def test_a_failure_on_one_rank_stops_every_rank_with_its_message(tiny, calibration, captured, tmp_path, stage, where):
    """Rank 0 says which process failed and why, in one line, instead of a broken-connection traceback."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_ON_RANK_1)
    out = tmp_path / "out"
    args = {"capture": ["capture", str(tiny["llama"]), "--data", str(calibration), "--batch-size", "2"],
            "eva": ["solve", str(captured["llama"]), "--mode", "eva", "--rank", "2"],
            "vas": ["solve", str(captured["llama"]), "--mode", "cnt-s", "--rank", "2", "--vas"]}[stage]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
                           *where.split(), *args, "--out", str(out)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(errors) == ["error: process 1 of 2 stopped, so this one stops too: unreadable image (simulated, rank 1 only)",
                              "error: unreadable image (simulated, rank 1 only)"], done.stderr[-3000:]
    assert "[rank0]: Traceback" not in done.stderr and "Connection closed" not in done.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
