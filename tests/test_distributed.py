"""A 2-process gloo capture under torchrun equals one process over the same data (and solves alike)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from cntinit import capture, solve
from cntinit.solution import Solution
from cntinit.store import Store


def test_torchrun_capture_equals_one_process(tiny, calibration, tmp_path):
    options = ["--targets", "q_proj,v_proj,down_proj", "--seq-len", "32", "--batch-size", "8", "--buckets", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "cntinit", "capture", str(tiny["llama"]), "--data", str(calibration), *options,
                             "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == [str(tmp_path / "two")]  # rank 0 prints the store path
    assert result.stderr.count("capture ━") <= 1  # one progress bar: rank 0's
    two = Store(tmp_path / "two")
    one = Store(capture(tiny["llama"], calibration, tmp_path / "one", targets="q_proj,v_proj,down_proj", seq_len=32,
                        batch_size=8, buckets=2))
    assert two.manifest["data"] == one.manifest["data"] and two.manifest["capture"] == one.manifest["capture"]
    for key in one.keys:
        want, got = one.tensors(key), two.tensors(key)
        for name in want:
            torch.testing.assert_close(got[name].double(), want[name].double(), rtol=2e-5, atol=1e-4)
    factors = [Solution(solve(store.path, tmp_path / f"s-{store.path.name}", mode="cnt-s", rank=4)).factors() for store in (one, two)]
    for name, (b, a) in factors[0].items():
        other = factors[1][name][0] @ factors[1][name][1]  # float32 sums in another order, through Σ^-1/2: ~1e-4
        assert float((other - b @ a).norm() / (b @ a).norm()) < 1e-3, name
