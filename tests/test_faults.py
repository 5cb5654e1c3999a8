"""Faults while writing: a disk that fills up mid-write leaves the previous output untouched and nothing partial."""

import errno
import hashlib
import importlib

import pytest
import safetensors.torch
import torch

from cntinit.solve import solution
from cntinit.storage import store
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
    module = {"capture": store, "solve": solution, "export": importlib.import_module("cntinit.export.formats.peft")}[stage]
    monkeypatch.setattr(module, "save_file", full_disk(safetensors.torch.save_file))
    code, stdout, err = run(capsys, *commands[stage], "-o", out, "-q", "--overwrite")
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "No space left on device" in err and "untouched" in err
    assert contents(out) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("stage", ["capture", "solve"])
def test_a_device_out_of_memory_is_one_line_with_the_fix(stage, tiny, calibration, captured, tmp_path, capsys, monkeypatch):
    """A GPU out of memory mid-stage (torch's OutOfMemoryError) printed a traceback: now one line
    with what to change, and the previous output at --out untouched."""
    commands = {"capture": ("capture", tiny["bert"], "-d", calibration), "solve": ("solve", captured["bert"], "-m", "cnt-s", "-r", "2")}
    out = tmp_path / "out"
    assert run(capsys, *commands[stage], "-o", out, "-q")[0] == 0
    before = contents(out)

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB\nmore")
    module, function = {"capture": ("cntinit.capture.stream", "stream"), "solve": ("cntinit.solve.report", "diagnostics")}[stage]
    monkeypatch.setattr(importlib.import_module(module), function, exhausted)
    code, stdout, err = run(capsys, *commands[stage], "-o", out, "--overwrite")
    fix = {"capture": "lower --batch-size or --seq-len, keep the sums in CPU memory (--stats-device cpu), or read the model block by "
                      "block (--layerwise)", "solve": "free the device, or solve on the CPU (--device cpu)"}[stage]
    last = err.rstrip("\n").split("\n")[-1]
    assert code == 2 and stdout == "" and err.count("error") == 1
    assert last == ("error: the device ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                    f"of 79.10 GiB): {fix}"), err
    assert contents(out) == before and leftovers(tmp_path) == []
    if stage == "capture":  # block by block, the fix is what that capture holds on the device
        monkeypatch.setattr(importlib.import_module("cntinit.capture.layerwise"), "capture", exhausted)
        err = run(capsys, *commands[stage], "--layerwise", "-o", tmp_path / "layerwise")[2]
        assert err.rstrip("\n").split("\n")[-1].endswith("(--stats-device cpu --activations-device cpu)"), err


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
    # SIGINT as a terminal delivers it: a test run started in the background of a script inherits it ignored
    process = subprocess.Popen(command + ["--overwrite"], stderr=subprocess.PIPE, text=True, env=os.environ | {"COLUMNS": "200"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started = time.monotonic()
    while time.monotonic() - started < 60:
        line = process.stderr.readline()
        if line.startswith("loaded") or not line:  # past the loading (another library's warning may come first)
            break
    time.sleep(2)  # inside the capture loop
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130, (line, rest[-2000:])
    assert rest.strip().splitlines()[-1] == "interrupted: nothing was written" and "Traceback" not in rest
    assert contents(out) == before and leftovers(tmp_path) == []


@pytest.fixture()
def small_disk(tmp_path):
    """A real 320 KiB filesystem (tmpfs), where the machine lets this process mount one."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()[:80]}); the injected full disk above still runs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("stage", ["capture", "solve", "export", "cached capture"])
def test_a_real_full_filesystem(stage, small_disk, tiny, calibration, captured, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as SafetensorError, not OSError: it used to escape as a traceback."""
    small = ["-t", "q_proj", "-d", calibration]  # a store of 2 × 64² floats fits; all-linear with 3 buckets does not
    large = ["-d", calibration, "--buckets", "3"]
    if stage == "export":
        run(capsys, "solve", captured["llama"], "-m", "pissa", "-r", "2", "-o", tmp_path / "s", "-q")  # a base of ~1 MB
    commands = {"capture": (["capture", tiny["llama"], *small], ["capture", tiny["llama"], *large]),
                "solve": (["solve", captured["llama"], "-m", "cnt-s", "-r", "1", "--vas", "--budget", "2"],
                          ["solve", captured["llama"], "-m", "cnt-s", "-r", "16", "--vas", "--budget", "5000"]),  # full ranks
                "export": (None, ["export", tmp_path / "s"])}
    if stage == "cached capture":
        monkeypatch.setenv("CNTINIT_CACHE", str(small_disk / "cache"))
        code, _, err = run(capsys, "capture", tiny["llama"], *large, "-q")
        assert code == 2 and err.startswith("error: writing ") and "No space left on device" in err and err.count("\n") == 1, err
        assert leftovers(small_disk / "cache" / "captures") == []
        return
    first, second = commands[stage]
    out = small_disk / "out"
    if first is not None:
        assert run(capsys, *first, "-o", out, "-q")[0] == 0
    before = contents(out) if out.exists() else None
    code, stdout, err = run(capsys, *second, "-o", out, "-q", "--overwrite")
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "No space left on device" in err and "untouched" in err, err
    assert (contents(out) if out.exists() else None) == before and leftovers(small_disk) == []


SWAP_KILLED = """
import os, sys
import cntinit.storage.atomic as atomic
if sys.argv[1] == "between-renames":  # a filesystem without RENAME_EXCHANGE, killed after moving the old output aside
    atomic._exchange = lambda a, b: False
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if ".old-" in str(dst):
            os._exit(9)
    atomic.os.replace = replace
else:  # killed after the exchange, before the old output is deleted
    atomic.shutil.rmtree = lambda *a, **k: os._exit(9)
from cntinit import cli
cli.main(sys.argv[2:])
"""


@pytest.mark.parametrize("moment", ["between-renames", "after-exchange"])
def test_a_kill_during_the_swap_loses_nothing(moment, captured, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "s"
    args = ["solve", str(captured["llama"]), "-m", "cnt-s", "-r", "2", "-q", "-o", str(out)]
    assert run(capsys, *args)[0] == 0
    old = contents(out)
    script = tmp_path / "killed.py"
    script.write_text(SWAP_KILLED)
    done = subprocess.run([sys.executable, str(script), moment, *args[:-2], "-r", "3", "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 9
    if moment == "between-renames":
        assert not out.exists() and len(list(tmp_path.glob(".s.old-*/s"))) == 1  # the old output waits aside
    else:
        assert json_rank(out) == 3 and len(list(tmp_path.glob(".s.tmp-*"))) == 1  # the new one is in place, the old one aside
    code, _, err = run(capsys, *[a for a in args[:-2] if a != "-q"], "-r", "4", "-o", str(out))  # the next write repairs and cleans
    assert code == 0 and json_rank(out) == 4 and leftovers(tmp_path) == []
    if moment == "between-renames":
        assert "restored" in err and old != contents(out)


def json_rank(out):
    import json

    return json.loads((out / "manifest.json").read_text())["params"]["rank"]


def test_leftovers_of_dead_processes_are_removed_and_others_reported(captured, tmp_path, capsys):
    import socket

    host = socket.gethostname().replace("-", "_")
    dead = tmp_path / f".s.tmp-{host}-999999999-abc"  # no such process
    alive = tmp_path / f".s.tmp-{host}-{__import__('os').getpid()}-def"
    foreign = tmp_path / ".s.tmp-otherhost-123-ghi"
    for path in (dead, alive, foreign):
        path.mkdir()
    code, _, err = run(capsys, "solve", captured["llama"], "-m", "cnt-s", "-r", "2", "-o", tmp_path / "s")
    assert code == 0 and not dead.exists() and alive.exists() and foreign.exists()
    assert f"{foreign} was left by a write on host otherhost" in err and "removed 1 temporary directory" in err


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_permissions_the_umask_gives(umask, tiny, calibration, tmp_path, capsys, monkeypatch):
    """Stores, solve directories and exports were 0700 with 0600 payloads whatever the umask: a trainer
    running as another user on a shared filesystem could not read them."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        assert run(capsys, "capture", tiny["llama"], "-d", calibration, "-t", "q_proj", "-o", tmp_path / "stats", "-q")[0] == 0
        assert run(capsys, "solve", tmp_path / "stats", "-m", "cnt-s", "-r", "2", "-o", tmp_path / "s", "-q")[0] == 0
        assert run(capsys, "export", tmp_path / "s", "-o", tmp_path / "e", "-q")[0] == 0
        monkeypatch.setenv("CNTINIT_CACHE", str(tmp_path / "cache"))
        assert run(capsys, "solve", tmp_path / "stats", "-m", "cnt-x", "-r", "2", "-q")[0] == 0
    finally:
        os.umask(previous)
    for output in ("stats", "s", "e", "cache/solves"):
        for path in [tmp_path / output, *(tmp_path / output).rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


def test_a_name_longer_than_the_filesystem_takes_is_refused_before_any_work(captured, tiny, calibration, tmp_path, capsys):
    """--out with a 300-character name stopped with OSError's traceback (after the model had loaded)."""
    for out, message in ((tmp_path / ("a" * 300), "its name is 300 bytes, and the temporary names cntinit writes beside it must fit"),
                         (tmp_path / ("b" * 300) / "stats", "the folder name bbbbbbbbbbbbbbbbbbbbbbbb… is 300 bytes, longer than its filesystem")):
        for args in (["capture", tiny["llama"], "--data", calibration], ["solve", captured["llama"], "-m", "cnt-s", "-r", "2"]):
            code, stdout, err = run(capsys, *args, "-o", out)
            assert code == 2 and stdout == "" and err.count("\n") == 1 and message in err, err
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_full_disk_in_a_layerwise_checkpoint_is_one_line(tiny, calibration, tmp_path, capsys, monkeypatch):
    """capture --layerwise --checkpoint-every 1 on a full filesystem stopped with safetensors' own I/O error as a
    traceback: the block's payload file is written outside the atomic writes that catch it."""
    from safetensors import SafetensorError

    def full(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(store, "save_file", full)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "capture", tiny["llama"], "--data", calibration, "--layerwise", "--checkpoint-every", "1",
                            "--targets", "q_proj", "-q", "-o", out)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "No space left on device" in err and "failed" in err, err
    assert not out.exists()
