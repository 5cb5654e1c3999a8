"""Values remembered by their files' identities (storage/memo.py): a repeated run reads nothing, and
a changed file never hits — not even one rewritten at its old size with its old mtime put back."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from cntinit.errors import CntinitError
from cntinit.models import fingerprints
from cntinit.storage import cache, memo, store
from conftest import run


class Counted:
    """A compute function that says how often it ran and returns the file's bytes, as read now."""

    def __init__(self, file):
        self.file, self.calls = file, 0

    def __call__(self) -> str:
        self.calls += 1
        return self.file.read_text()


@pytest.fixture
def settled(monkeypatch):
    """Files count as settled at once (their ctime is still ticks apart from any later change)."""
    monkeypatch.setattr(memo, "SETTLED", 0.0)


def test_a_value_is_computed_once_and_a_changed_file_never_hits(tmp_path, settled):
    file = tmp_path / "weights.bin"
    file.write_text("first")
    compute = Counted(file)
    assert memo.remembered(tmp_path / "memo", "what", [file], compute) == "first"
    assert memo.remembered(tmp_path / "memo", "what", [file], compute) == "first" and compute.calls == 1
    assert memo.remembered(tmp_path / "memo", "another value", [file], compute) == "first" and compute.calls == 2
    before = file.stat()
    time.sleep(0.05)  # past a tick of the kernel's coarse clock
    file.write_text("again")  # same size
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime put back: only ctime tells
    assert file.stat().st_size == before.st_size and file.stat().st_mtime_ns == before.st_mtime_ns
    assert memo.remembered(tmp_path / "memo", "what", [file], compute) == "again" and compute.calls == 3


def test_files_changed_within_the_last_seconds_are_not_remembered(tmp_path):
    """A change within one tick of the clock would keep the file's ctime: a fresh file is read every time."""
    file = tmp_path / "fresh.bin"
    file.write_text("fresh")
    compute = Counted(file)
    for _ in range(2):
        assert memo.remembered(tmp_path / "memo", "what", [file], compute) == "fresh"
    assert compute.calls == 2 and not (tmp_path / "memo").exists()


def test_a_value_changing_while_it_is_read_is_not_remembered(tmp_path, settled):
    file = tmp_path / "weights.bin"
    file.write_text("first")

    def rewritten_meanwhile() -> str:
        time.sleep(0.05)
        file.write_text("other")
        return "first"

    memo.remembered(tmp_path / "memo", "what", [file], rewritten_meanwhile)
    assert not (tmp_path / "memo").exists()


def test_another_users_memo_is_not_taken_and_an_unwritable_place_remembers_nothing(tmp_path, settled, monkeypatch):
    file = tmp_path / "weights.bin"
    file.write_text("true value")
    compute = Counted(file)
    memo.remembered(tmp_path / "memo", "what", [file], compute)
    (planted,) = (tmp_path / "memo").iterdir()
    planted.write_text("planted value")
    monkeypatch.setattr(os, "getuid", lambda: os.stat(planted).st_uid + 1)  # the memo now belongs to someone else
    assert memo.remembered(tmp_path / "memo", "what", [file], compute) == "true value" and compute.calls == 2
    monkeypatch.undo()
    (tmp_path / "blocked").write_text("a file where the memo folder would be")
    assert memo.remembered(tmp_path / "blocked", "what", [file], compute) == "true value" and compute.calls == 3


def test_a_models_fingerprint_is_remembered_for_its_files_and_recomputed_when_one_changes(tiny, tmp_path, settled, monkeypatch):
    """Capture, solve and export each fingerprint the same weights: the second hashes none of them."""
    directory = tmp_path / "model"
    shutil.copytree(tiny["llama"], directory)
    net = transformers.AutoModelForCausalLM.from_pretrained(directory)
    modules = {name: m for name, m in net.named_modules() if name.endswith("q_proj")}
    computed = []
    real = fingerprints._computed
    monkeypatch.setattr(fingerprints, "_computed", lambda *args: computed.append(1) or real(*args))
    expected = fingerprints.fingerprint(modules)
    assert fingerprints.fingerprint(modules, model_dir=directory) == expected
    assert fingerprints.fingerprint(modules, model_dir=directory) == expected and len(computed) == 2  # the plain call, then once
    assert list((cache.root() / "fingerprints").iterdir())
    with torch.no_grad():
        next(iter(modules.values())).weight[0, 0] += 1
    time.sleep(0.05)
    net.save_pretrained(directory)  # the weights on disk change
    changed = fingerprints.fingerprint(modules, model_dir=directory)
    assert changed != expected and changed == real(modules, None, None, fingerprints.SCHEME) and len(computed) == 3


@pytest.fixture
def store_copy(captured, tmp_path):
    """A statistics store of the tiny Llama that this test may change."""
    copied = tmp_path / "store"
    shutil.copytree(captured["llama"], copied)
    return copied


def test_a_stores_checksums_are_remembered_and_a_damaged_payload_is_still_refused(store_copy, settled, monkeypatch):
    """Every solve verified every payload's sha256: a capture solved for many modes and ranks is now
    hashed once while its files stay as they are, and a payload changed since is hashed and refused."""
    hashed, real = [], memo.sha256
    monkeypatch.setattr(memo, "sha256", lambda path: hashed.append(path.name) or real(path))
    payloads = sorted(store.Store(store_copy).manifest["files"])
    assert sorted(hashed) == payloads
    store.Store(store_copy)
    assert sorted(hashed) == payloads  # the second open read none of them
    time.sleep(0.05)
    payload = store_copy / payloads[0]
    data = bytearray(payload.read_bytes())
    data[-1] ^= 1  # one bit flipped, the size and name kept
    payload.write_bytes(bytes(data))
    with pytest.raises(CntinitError, match="does not match its checksum"):
        store.Store(store_copy)


def test_inspect_verify_reads_every_payload_again(store_copy, settled, monkeypatch, capsys):
    """What a remembered checksum cannot see — bytes changed under the filesystem, metadata untouched
    — `cntinit inspect --verify` still can: it reads every payload again."""
    store.Store(store_copy)  # verified, and remembered
    hashed, real = [], memo.sha256
    monkeypatch.setattr(memo, "sha256", lambda path: hashed.append(path.name) or real(path))
    store.Store(store_copy)
    assert hashed == []
    assert run(capsys, "inspect", store_copy)[0] == 0
    assert sorted(hashed) == sorted(store.Store(store_copy, verify=False).manifest["files"])


def _split_into_files(store_dir, parts: int) -> None:
    """Rewrite a store's payload as `parts` files (a 7B all-linear store is a dozen 2 GB shards)."""
    manifest = json.loads((store_dir / "manifest.json").read_text())
    [only] = manifest["files"]
    tensors = load_file(store_dir / only)
    keys = sorted(manifest["stats"])
    (store_dir / only).unlink()
    manifest["files"] = {}
    for part in range(parts):
        name = f"stats-{part + 1:05d}.safetensors"
        mine = keys[part::parts]
        save_file({n: t for n, t in tensors.items() if any(n.startswith(k + ".") for k in mine)}, store_dir / name, metadata={"format": "pt"})
        manifest["files"][name] = store.file_entry(store_dir / name)
        for k in mine:
            manifest["stats"][k]["file"] = name
    (store_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def test_a_stores_payloads_are_hashed_side_by_side_and_a_damaged_one_is_named(store_copy, monkeypatch):
    """A 7B all-linear store is a dozen 2 GB payloads and a 70B one 160: one stream of sha256 (1.8 GB/s
    on this project's CPU) took 12 s (7B) to three minutes (70B) of every first solve; they are hashed on as
    many cores as the process has (at most memo.MAX_THREADS). The first two hashes here each wait for the other."""
    import threading

    _split_into_files(store_copy, 3)
    monkeypatch.setattr(memo, "threads", lambda: 2)
    both = threading.Barrier(2, timeout=10)
    real = memo.sha256

    def side_by_side(path):
        if path.name != "stats-00003.safetensors":
            both.wait()  # the first two at once, or a BrokenBarrierError
        return real(path)

    monkeypatch.setattr(memo, "sha256", side_by_side)
    payloads = sorted(store.Store(store_copy, reread=True).manifest["files"])
    assert len(payloads) == 3
    monkeypatch.setattr(memo, "sha256", real)
    payload = store_copy / payloads[1]
    data = bytearray(payload.read_bytes())
    data[-1] ^= 1
    payload.write_bytes(bytes(data))
    with pytest.raises(CntinitError, match=f"{payloads[1]} does not match its checksum"):
        store.Store(store_copy, reread=True)


def test_hashing_side_by_side_leaves_the_umask_as_it_was(tmp_path, settled, monkeypatch):
    """Each remembered checksum is written through atomic_file, which reads the umask by setting it and
    putting it back: from threads at once, one could read the other's 0 and leave it set (every later
    file world-writable). The umask calls here yield to the other threads between them."""
    from cntinit.storage import atomic

    real = os.umask
    monkeypatch.setattr(atomic.os, "umask", lambda mask: (real(mask), time.sleep(0.002))[0])
    files = []
    for i in range(16):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes([i]) * 10)
    previous = real(0o027)
    try:
        assert memo.sha256_each(files, tmp_path / "digests") == [memo.sha256(f) for f in files]
        assert real(0o027) == 0o027
    finally:
        real(previous)
    remembered = list((tmp_path / "digests").iterdir())
    assert len(remembered) == len(files) and {oct(f.stat().st_mode & 0o777) for f in remembered} == {oct(0o640)}
