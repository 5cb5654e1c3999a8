"""Corrupt, edited, foreign and mismatched directories are refused with one-line errors (issue 9's matrix)."""

import json

import pytest

from conftest import run


@pytest.fixture()
def dirs(captured, tmp_path, capsys):
    """A fresh copy of a store and a solve directory, safe to damage."""
    import shutil

    store = shutil.copytree(captured["bert"], tmp_path / "store")
    run(capsys, "solve", store, "-m", "cnt-s", "-r", "2", "-o", tmp_path / "solve", "-q")
    return {"store": store, "solve": tmp_path / "solve"}


def payload(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    return directory / next(iter(manifest["files"]))


def edit_manifest(directory, change):
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def first_stats_entry(manifest):
    return next(iter(manifest["stats"].values()))


DAMAGE = {
    "truncated payload": (lambda d: payload(d).write_bytes(payload(d).read_bytes()[:100]), "does not match its checksum"),
    "missing payload": (lambda d: payload(d).unlink(), "is missing"),
    "manifest not JSON": (lambda d: (d / "manifest.json").write_text("{oops"), "no valid manifest.json"),
    "other format version": (lambda d: edit_manifest(d, lambda m: m.update(format_version=99)), "format version 99, this cntinit reads 1"),
    "payload outside": (lambda d: edit_manifest(d, lambda m: m.update(files={"../x.safetensors": {"sha256": "0", "bytes": 1}})),
                        "names a payload outside"),
}


@pytest.mark.parametrize("kind", ["store", "solve"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_directories_are_refused_by_every_reader(kind, damage, dirs, tmp_path, capsys):
    harm, message = DAMAGE[damage]
    harm(dirs[kind])
    readers = [("inspect", dirs[kind])]
    readers.append(("solve", dirs["store"], "-m", "cnt-x", "-o", tmp_path / "again") if kind == "store"
                   else ("export", dirs["solve"], "-o", tmp_path / "adapter"))
    for args in readers:
        code, out, err = run(capsys, *args)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "again").exists() and not (tmp_path / "adapter").exists()


def test_a_statistics_file_outside_the_payload_list_is_refused(dirs, tmp_path, capsys):
    edit_manifest(dirs["store"], lambda m: first_stats_entry(m).update(file="../../elsewhere.safetensors"))
    code, _, err = run(capsys, "solve", dirs["store"], "-m", "cnt-s", "-o", tmp_path / "s")
    assert code == 2 and "names a payload outside" in err and err.count("\n") == 1


def test_rank_larger_than_a_module_is_refused_before_any_work(captured, tmp_path, capsys):
    code, _, err = run(capsys, "solve", captured["bert"], "-m", "cnt-s", "-r", "65", "-o", tmp_path / "s")
    assert code == 2 and "--rank 65 exceeds min(in, out) = 64 of" in err and "more): lower --rank, or use --vas" in err
    assert "solve cnt-s" not in err and not (tmp_path / "s").exists()
    code, _, _ = run(capsys, "solve", captured["bert"], "-m", "cnt-s", "-r", "65", "--vas", "-o", tmp_path / "s", "-q")
    assert code == 0
