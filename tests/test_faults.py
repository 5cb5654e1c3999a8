"""Faults while writing: a disk that fills up mid-write leaves the previous output untouched and nothing partial."""

import errno
import hashlib
import importlib

import pytest
import safetensors.torch

from cntinit import solution, store
from conftest import leftovers, run


def contents(directory):
    """Every file under `directory` with its sha256: what 'untouched' means."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def full_disk(real_save_file):
    """A save_file that writes part of the file, then fails as a full disk does."""
    def save_file(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as handle:
            handle.truncate(max(1, handle.seek(0, 2) // 2))
        raise OSError(errno.ENOSPC, "No space left on device")
    return save_file


@pytest.mark.parametrize("stage", ["capture", "solve", "export"])
def test_a_full_disk_mid_write_leaves_the_previous_output_untouched(stage, tiny, calibration, captured, tmp_path, capsys, monkeypatch):
    commands = {
        "capture": ("capture", tiny["bert"], "-d", calibration),
        "solve": ("solve", captured["bert"], "-m", "cnt-s", "-r", "2"),
        "export": ("export", tmp_path / "s"),
    }
    if stage == "export":
        run(capsys, "solve", captured["bert"], "-m", "cnt-s", "-r", "2", "-o", tmp_path / "s", "-q")
    out = tmp_path / "out"
    code, _, _ = run(capsys, *commands[stage], "-o", out, "-q")
    assert code == 0
    before = contents(out)
    module = {"capture": store, "solve": solution, "export": importlib.import_module("cntinit.export")}[stage]
    monkeypatch.setattr(module, "save_file", full_disk(safetensors.torch.save_file))
    code, stdout, err = run(capsys, *commands[stage], "-o", out, "-q", "--overwrite")
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "No space left on device" in err and "untouched" in err
    assert contents(out) == before and leftovers(tmp_path) == []


def test_an_unwritable_place_is_refused_before_any_work(captured, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, "solve", captured["bert"], "-m", "cnt-s", "-o", blocker / "sub" / "s")
    assert code == 2 and err == f"error: cannot write in {blocker} (not a directory): choose an --out in a writable place\n"


def test_sigint_during_capture_stops_cleanly(tiny, tmp_path):
    """Ctrl-C (SIGINT) mid-capture: exit 130, one line saying so, no partial store, the previous one untouched."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"text": f"And the evening and the morning were day {i}."}) + "\n" for i in range(20000)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cntinit", "capture", str(tiny["bert"]), "-d", str(data), "-o", str(out), "-b", "1"]
    subprocess.run(command[:-2] + ["-b", "8", "-n", "16"], check=True, capture_output=True)
    before = contents(out)
    process = subprocess.Popen(command + ["--overwrite"], stderr=subprocess.PIPE, text=True, env=os.environ | {"COLUMNS": "200"})
    started = time.monotonic()
    while time.monotonic() - started < 60:
        line = process.stderr.readline()
        if line.startswith("loaded"):
            break
    time.sleep(2)  # inside the capture loop
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130
    assert rest.strip().splitlines()[-1] == "interrupted: nothing was written" and "Traceback" not in rest
    assert contents(out) == before and leftovers(tmp_path) == []
