"""Corrupt, edited, foreign and mismatched directories are refused with one-line errors (issue 9's matrix)."""

import json
import shutil

import pytest
import torch

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
    "manifest not JSON": (lambda d: (d / "manifest.json").write_text("{oops"), "whose manifest.json is not a cntinit manifest"),
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


def test_model_code_never_runs_without_trust_remote_code(tiny, text_jsonl, tmp_path, capsys):
    """A model directory shipping its own Python (auto_map) is refused unless --trust-remote-code; its code never runs."""
    import shutil

    model = shutil.copytree(tiny["bert"], tmp_path / "custom")
    marker = tmp_path / "code-ran"
    # subclasses: loading remote code marks its classes for auto-saving, which must not leak into BertModel itself
    (model / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import BertConfig\n"
                                                   "class CustomConfig(BertConfig):\n    model_type = 'custombert'\n")
    (model / "modeling_custom.py").write_text("from transformers import BertModel\nfrom .configuration_custom import CustomConfig\n"
                                              "class CustomModel(BertModel):\n    config_class = CustomConfig\n")
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "custombert", "architectures": ["CustomModel"],
               "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}}
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "capture", model, "-d", text_jsonl, "-o", tmp_path / "s")
    assert code == 2 and "contains custom code" in err and "--trust-remote-code" in err and err.count("\n") == 1, err
    assert not marker.exists() and not (tmp_path / "s").exists()
    run(capsys, "capture", model, "-d", text_jsonl, "-o", tmp_path / "s", "--trust-remote-code")
    assert marker.exists()  # the flag, and only the flag, lets the directory's code run


def test_the_package_never_unpickles():
    """Policy: safetensors and JSON only; torch.load only with weights_only=True; no pickle, no yaml.load."""
    import re
    from pathlib import Path

    import cntinit

    for source in Path(cntinit.__file__).parent.rglob("*.py"):
        text = source.read_text()
        assert not re.search(r"\bimport pickle\b|\bpickle\.|\bdill\b|yaml\.load\(|yaml\.unsafe_load", text), source
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), (source, call.group(0))


def test_pickled_weights_are_refused(tiny, text_jsonl, tmp_path, capsys):
    """A checkpoint with only pytorch_model.bin used to go through torch's unpickler; cntinit reads safetensors only."""
    import shutil

    import torch
    from safetensors.torch import load_file

    model = shutil.copytree(tiny["llama"], tmp_path / "pickled")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    code, _, err = run(capsys, "capture", model, "-d", text_jsonl, "-o", tmp_path / "s")
    assert code == 2 and "holds its weights only in pickle files (pytorch_model.bin), which cntinit never loads" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "s").exists()


def rewrite_payload(directory, change):
    """Change the first payload's tensors and update its checksum: damage the checksums cannot see."""
    from safetensors.torch import load_file, save_file

    from cntinit.storage.store import file_entry

    manifest = json.loads((directory / "manifest.json").read_text())
    name = next(n for n in manifest["files"] if n.endswith(".safetensors"))
    tensors = load_file(directory / name)
    change(tensors)
    save_file(tensors, directory / name, metadata={"format": "pt"})
    manifest["files"][name] = file_entry(directory / name)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def first_module(manifest):
    return next(iter(manifest["modules"].values()))


def shrink_first(suffix):
    def change(tensors):
        key = next(k for k in tensors if k.endswith(suffix))
        tensors[key] = tensors[key][..., :-1].contiguous()
    return change


def negate_count(tensors):
    key = next(k for k in tensors if k.endswith(".count"))
    tensors[key] = -tensors[key]


def integer_sums(tensors):
    key = next(k for k in tensors if k.endswith(".xxt"))
    tensors[key] = tensors[key].round().to(torch.int64)


MALFORMED = {  # (kind, damage, message)
    "files missing": ("store", lambda d: edit_manifest(d, lambda m: m.pop("files")), "is corrupt: files is missing"),
    "checksum not text": ("store", lambda d: edit_manifest(d, lambda m: next(iter(m["files"].values())).update(sha256=5)),
                          "sha256 is int 5, not str"),
    "stats missing": ("store", lambda d: edit_manifest(d, lambda m: m.pop("stats")), "is corrupt: stats is missing"),
    "capture missing": ("store", lambda d: edit_manifest(d, lambda m: m.pop("capture")), "is corrupt: capture is missing"),
    "unknown key": ("store", lambda d: edit_manifest(d, lambda m: m.update(extra=1)), "is corrupt: extra is not a field of this format"),
    "count 0": ("store", lambda d: edit_manifest(d, lambda m: first_stats_entry(m).update(count=0)), "and count 0"),
    "module without statistic": ("store", lambda d: edit_manifest(d, lambda m: first_module(m).update(key="nothing")),
                                 "key nothing is not among its statistics"),
    "version as text": ("store", lambda d: edit_manifest(d, lambda m: m.update(format_version="1")), "format_version is '1', not a number"),
    "payload of the wrong shape": ("store", lambda d: rewrite_payload(d, shrink_first(".xxt")), "is corrupt: "),
    "tensor missing": ("store", lambda d: rewrite_payload(d, lambda t: t.pop(next(k for k in t if k.endswith(".sum")))), ".sum is missing"),
    "payload with a negative count": ("store", lambda d: rewrite_payload(d, negate_count), ", not a positive number of tokens"),
    "payload of integer sums": ("store", lambda d: rewrite_payload(d, integer_sums), "is int64, not float32 or float64"),
    "params missing": ("solve", lambda d: edit_manifest(d, lambda m: m.pop("params")), "is corrupt: params is missing"),
    "rank as text": ("solve", lambda d: edit_manifest(d, lambda m: first_module(m).update(rank="2")), "rank is str '2', not an integer"),
    "params of another version": ("solve", lambda d: edit_manifest(d, lambda m: m["params"].update(learning_rate=1)),
                                  "params do not fit this version's options"),
    "rank above the module": ("solve", lambda d: edit_manifest(d, lambda m: first_module(m).update(rank=10_000)), "is outside 0..min(in, out)"),
    "mode of another version": ("solve", lambda d: edit_manifest(d, lambda m: m.update(mode="cnt-z")), "mode 'cnt-z' is not a mode of this cntinit"),
    "factor of the wrong shape": ("solve", lambda d: rewrite_payload(d, shrink_first(".A")), "adapter.safetensors is corrupt"),
}


@pytest.mark.parametrize("damage", list(MALFORMED))
def test_malformed_manifests_and_payloads_are_named(damage, dirs, tmp_path, capsys):
    kind, harm, message = MALFORMED[damage]
    harm(dirs[kind])
    reader = ("solve", dirs["store"], "-m", "cnt-x", "-q", "-o", tmp_path / "again") if kind == "store" else \
             ("export", dirs["solve"], "-q", "-o", tmp_path / "adapter")
    readers = [reader] if "payload" in damage or "tensor" in damage or "factor" in damage else [("inspect", dirs[kind]), reader]
    for args in readers:  # inspect reads manifests, not tensors
        code, out, err = run(capsys, *args)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "again").exists() and not (tmp_path / "adapter").exists()


def test_a_payload_linked_out_of_the_directory_is_refused(dirs, tmp_path, capsys):
    target = payload(dirs["store"])
    outside = tmp_path / "elsewhere.safetensors"
    target.rename(outside)
    target.symlink_to(outside)
    code, _, err = run(capsys, "inspect", dirs["store"])
    assert code == 2 and "names a payload outside the statistics store" in err and err.count("\n") == 1, err


def test_a_huge_or_endless_manifest_is_refused_without_reading_it(captured, tmp_path, capsys, monkeypatch):
    """A manifest.json that is a 6 GB sparse file, or a link to /dev/zero, made readers run out of memory
    (`cache ls`, `solve`): manifests are read no further than a bound, and such a directory is not one cntinit wrote."""
    store = shutil.copytree(captured["llama"], tmp_path / "store")
    (store / "manifest.json").unlink()
    (store / "manifest.json").symlink_to("/dev/zero")
    code, out, err = run(capsys, "solve", store, "-m", "cnt-s", "-o", tmp_path / "s")
    assert code == 2 and out == "" and err.count("\n") == 1 and "not a cntinit statistics store" in err, err
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("CNTINIT_CACHE", str(cache_dir))
    entry = shutil.copytree(captured["llama"], cache_dir / "captures" / ("0" * 64))
    with open(entry / "manifest.json", "r+b") as handle:
        handle.truncate(6 << 30)
    code, out, err = run(capsys, "cache", "ls", "--json")
    assert code == 0 and json.loads(out) == [], err


def test_a_manifest_whose_format_is_not_text_is_named_as_not_cntinits(tmp_path):
    """A `format` that is a list (hypothesis found it) raised TypeError where the directory is described."""
    from cntinit.errors import CntinitError
    from cntinit.solve.solution import Solution
    (tmp_path / "manifest.json").write_text(json.dumps({"format": ["cntinit.solve"]}))
    with pytest.raises(CntinitError, match=r"is a directory whose manifest.json is not a cntinit manifest, not a cntinit solve directory"):
        Solution(tmp_path)
