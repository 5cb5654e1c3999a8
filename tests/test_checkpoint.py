"""`capture --checkpoint-every N`: a capture killed (SIGKILL) or stopped (SIGINT) mid-way and run again
resumes from its checkpoint and ends with the statistics of an uninterrupted run, bit for bit."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cntinit.storage import checkpoint
from cntinit.storage.store import Store

from conftest import run
from imaging import build_sd, write_images

capture_module = importlib.import_module("cntinit.capture.recorder")

SLOW = """
import importlib, sys, time
capture = importlib.import_module("cntinit.capture.recorder")
original = capture.Recorder.run
def slow(self, *args, **kwargs):
    time.sleep(0.15)
    return original(self, *args, **kwargs)
capture.Recorder.run = slow
from cntinit import cli
cli.main(sys.argv[1:])
"""


def assert_identical(a: Path, b: Path) -> None:
    one, two = Store(a), Store(b)
    assert one.keys == two.keys
    for key in one.keys:
        x, y = one.tensors(key), two.tensors(key)
        assert all(torch.equal(x[name], y[name]) for name in x), key
    assert one.manifest["data"] == two.manifest["data"] and one.manifest["capture"] == two.manifest["capture"]
    assert one.manifest.get("gradients") == two.manifest.get("gradients")
    if one.has_gradients:
        assert all(torch.equal(one.gradient(name), two.gradient(name)) for name in one.manifest["modules"])


def start_slow(tmp_path, args) -> subprocess.Popen:
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(directory: Path, batches: int, job: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        try:
            if json.loads((directory / checkpoint.STATE).read_text())["batches"] >= batches:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of {batches} batches appeared (job exit {job.poll()})")


@pytest.fixture()
def capture_args(tiny, calibration):
    return ["capture", tiny["llama"], "--data", calibration, "--targets", "q_proj,down_proj", "--seq-len", "32",
            "--batch-size", "4", "--buckets", "2", "--checkpoint-every", "2"]


def test_killed_capture_resumes_to_the_same_statistics(tmp_path, capture_args, capsys):
    out = tmp_path / "stats"
    job = start_slow(tmp_path, [*capture_args, "-o", out])
    wait_for_checkpoint(checkpoint.location(out), 6, job)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not out.exists() and checkpoint.location(out).is_dir()
    code, _, err = run(capsys, *capture_args, "-o", out)
    assert code == 0 and "resuming from the checkpoint" in err, err
    assert not checkpoint.location(out).exists()  # removed once the store is written
    code, _, err = run(capsys, *capture_args, "-o", tmp_path / "whole")
    assert code == 0 and "resuming" not in err
    assert_identical(out, tmp_path / "whole")


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, capture_args, capsys):
    out = tmp_path / "stats"
    job = start_slow(tmp_path, [*capture_args, "-o", out])
    wait_for_checkpoint(checkpoint.location(out), 2, job)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130 and "interrupted: stopped by SIGINT after" in err and "run the same command to resume" in err, err
    batches = int(err.split("after ")[1].split(" batches")[0])
    assert json.loads((checkpoint.location(out) / checkpoint.STATE).read_text())["batches"] == batches  # saved at that batch
    assert not out.exists()
    assert run(capsys, *capture_args, "-o", out)[0] == 0
    assert run(capsys, *capture_args, "-o", tmp_path / "whole")[0] == 0
    assert_identical(out, tmp_path / "whole")


def test_a_checkpoint_of_other_arguments_is_not_used(tmp_path, capture_args, capsys, monkeypatch):
    out = tmp_path / "stats"
    stop_at = interrupt_at(monkeypatch, 3)
    code, _, err = run(capsys, *capture_args, "-o", out)
    assert code == 130 and stop_at() and checkpoint.location(out).is_dir()
    monkeypatch.undo()
    changed = [a if a != "32" else "24" for a in capture_args]  # another --seq-len
    code, _, err = run(capsys, *changed, "-o", out)
    assert code == 0 and "is from a capture with other arguments or data: starting from the beginning" in err
    assert run(capsys, *changed, "-o", tmp_path / "whole")[0] == 0
    assert_identical(out, tmp_path / "whole")


def interrupt_at(monkeypatch, batch: int):
    """Send this process SIGINT during batch `batch` (1-based); returns a probe: did it fire?"""
    original, seen = capture_module.Recorder.run, []

    def run_and_interrupt(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == batch:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(capture_module.Recorder, "run", run_and_interrupt)
    return lambda: len(seen) >= batch


@pytest.mark.parametrize("noising", [["--noise-timestep", "300"], ["--gradients"]])
def test_noised_pipeline_capture_resumes_with_the_same_noise(noising, tmp_path, capsys, monkeypatch):
    """The checkpoint holds the noise generator's state, so resumed draws (noise; with --gradients, the random
    timesteps too) continue the sequence."""
    pipe, images = build_sd(tmp_path / "sd"), write_images(tmp_path / "images", count=5)
    args = ["capture", pipe, "--data", images, "--targets", "to_q,to_k", "--batch-size", "1", *noising,
            "--seed", "7", "--checkpoint-every", "1"]
    fired = interrupt_at(monkeypatch, 3)
    code, _, err = run(capsys, *args, "-o", tmp_path / "stats")
    assert code == 130 and fired(), err
    monkeypatch.undo()
    code, _, err = run(capsys, *args, "-o", tmp_path / "stats")
    assert code == 0 and "3 batches already summed" in err, err
    assert run(capsys, *args, "-o", tmp_path / "whole")[0] == 0
    assert_identical(tmp_path / "stats", tmp_path / "whole")


@pytest.mark.parametrize("damage", ["garbage sums", "sums of another shape", "garbage state"])
def test_a_damaged_checkpoint_is_set_aside(damage, tmp_path, capture_args, capsys, monkeypatch):
    """It used to be loaded before its identity was checked, and a SafetensorError escaped: every
    later checkpointed capture to that --out failed, whatever its arguments."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "stats"
    stop_at = interrupt_at(monkeypatch, 3)
    assert run(capsys, *capture_args, "-o", out)[0] == 130 and stop_at()
    monkeypatch.undo()
    saved = checkpoint.location(out)
    if damage == "garbage sums":
        (saved / checkpoint.SUMS).write_bytes(b"\x00" * 64)
    elif damage == "sums of another shape":
        save_file({name: t[..., :1].contiguous() for name, t in load_file(saved / checkpoint.SUMS).items()}, saved / checkpoint.SUMS)
    else:
        (saved / checkpoint.STATE).write_text("{not json")
    code, _, err = run(capsys, *capture_args, "-o", out)
    assert code == 0 and "starting from the beginning" in err, err
    assert run(capsys, *capture_args, "-o", tmp_path / "whole")[0] == 0
    assert_identical(out, tmp_path / "whole")


def test_the_rate_after_a_resume_counts_only_this_runs_tokens(tmp_path, capture_args, capsys, monkeypatch):
    """It divided the checkpoint's tokens too by this run's time (201 tok/s shown for 36)."""
    out = tmp_path / "stats"
    stop_at = interrupt_at(monkeypatch, 5)
    assert run(capsys, *capture_args, "-o", out)[0] == 130 and stop_at()
    monkeypatch.undo()
    summed = json.loads((checkpoint.location(out) / checkpoint.STATE).read_text())["done"]
    ticks = iter(range(10**6))
    monkeypatch.setattr(importlib.import_module("cntinit.capture.stream"), "clock", lambda: 0.0 if next(ticks) == 0 else 1.0)  # this run takes 1 s
    code, _, err = run(capsys, *capture_args, "-o", out)
    total = Store(out).manifest["data"]["tokens"]
    assert code == 0 and 0 < summed < total
    assert f"{total - summed:,.1f} tok/s" in err, err
