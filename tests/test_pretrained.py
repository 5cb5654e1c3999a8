"""A safetensors model is never loaded whole by solve and export: solve reads each target's W by
name (the same factors as on the loaded model); the residual base is written file by file — the
same base, tensor for tensor, as the loaded model saves (tiny Llama, GPT-2's Conv1D, BERT, a
sharded checkpoint, SmolLM2's real bfloat16 weights), the checkpoint's files and index kept; a
residual base of a weight another module shares is refused on both paths, and a shard index
naming files elsewhere is refused."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from cntinit import capture, models, pretrained
from cntinit.export import export
from cntinit.solve import solve

from conftest import TEXTS, assert_refused, build_tiny, run


def calibration_of(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def _state(directory) -> dict[str, torch.Tensor]:
    config = transformers.AutoConfig.from_pretrained(directory)
    return getattr(transformers, config.architectures[0]).from_pretrained(directory, dtype="auto").state_dict()


def _both(model_dir, tmp_path, monkeypatch, targets="all-linear"):
    """(streamed base, loaded base) of one residual solve; the streamed export built the model empty only."""
    solve(None, tmp_path / "s", model=model_dir, targets=targets, mode="pissa", rank=4)
    empty, real = [], models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: empty.append(k.get("empty", False)) or real(*a, **k))
    export(tmp_path / "s", tmp_path / "streamed")
    assert empty == [True]  # built without weights; each adapted one read by name
    monkeypatch.setattr(pretrained.Streamed, "open", classmethod(lambda cls, *a: None))
    export(tmp_path / "s", tmp_path / "loaded")
    monkeypatch.undo()
    return tmp_path / "streamed" / "base", tmp_path / "loaded" / "base"


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_the_streamed_base_is_the_loaded_model_s(kind, tiny, tmp_path, monkeypatch):
    streamed, loaded = _both(tiny[kind], tmp_path, monkeypatch)
    a, b = _state(streamed), _state(loaded)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    original = _state(tiny[kind])
    changed = {name for name in a if not torch.equal(a[name], original[name])}
    solved = json.loads((tmp_path / "s" / "manifest.json").read_text())["modules"]
    assert changed == {f"{m}.weight" for m in solved}  # W − BA in the adapted weights, every other tensor as it was
    assert transformers.AutoTokenizer.from_pretrained(streamed).vocab_size == transformers.AutoTokenizer.from_pretrained(tiny[kind]).vocab_size


def _sharded(tmp_path):
    source = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(build_tiny("llama", tmp_path / "model")).save_pretrained(source, max_shard_size="200KB")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "model").save_pretrained(source)
    return source


def test_a_sharded_checkpoint_keeps_its_files_and_index(tmp_path, monkeypatch):
    source = _sharded(tmp_path)
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    assert len(shards) > 3
    streamed, loaded = _both(source, tmp_path, monkeypatch)
    assert sorted(p.name for p in streamed.glob("*.safetensors")) == shards
    index = "model.safetensors.index.json"
    assert json.loads((streamed / index).read_text())["weight_map"] == json.loads((source / index).read_text())["weight_map"]
    a, b = _state(streamed), _state(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_smollm2_real_bfloat16_weights(smollm2, tmp_path, monkeypatch):
    streamed, loaded = _both(smollm2, tmp_path, monkeypatch, targets="q_proj,down_proj")
    a, b = _state(streamed), _state(loaded)
    assert a.keys() == b.keys() and all(a[name].dtype == torch.bfloat16 and torch.equal(a[name], b[name]) for name in a)


def test_a_shared_weight_gets_no_residual_base(tiny, captured, tmp_path, capsys, monkeypatch):
    """GPT-2's output layer is the token embeddings' matrix: W − BA there would change the
    embeddings too, so the initial model would not be the pretrained one. Solve refuses it (from a
    capture and data-free), offset inits of it are fine, and export refuses it on both paths."""
    message = "lm_head shares its weight with transformer.wte, so W − BA in the residual base would change that module too"
    assert_refused(capsys, ["solve", "--model", tiny["gpt2"], "--targets", "lm_head", "-m", "pissa", "-r", "4"], message, tmp_path / "a")
    tied = capture(tiny["gpt2"], calibration_of(tmp_path), tmp_path / "stats", targets="lm_head,c_fc", seq_len=16)
    capsys.readouterr()
    assert_refused(capsys, ["solve", tied, "-m", "cnt-s", "--init", "residual", "-r", "4"], message, tmp_path / "b")
    assert run(capsys, "solve", tied, "-m", "cnt-s", "--init", "offset", "-r", "4", "-o", tmp_path / "offset")[0] == 0
    monkeypatch.setattr(pretrained, "refuse_tied", lambda *a: None)  # a solve directory that slipped through
    solve(None, tmp_path / "s", model=tiny["gpt2"], targets="lm_head", mode="pissa", rank=4)
    monkeypatch.undo()
    capsys.readouterr()
    assert_refused(capsys, ["export", tmp_path / "s"], message, tmp_path / "streamed")
    monkeypatch.setattr(pretrained.Streamed, "open", classmethod(lambda cls, *a: None))
    assert_refused(capsys, ["export", tmp_path / "s"], message, tmp_path / "loaded")
    monkeypatch.setattr(pretrained.Streamed, "open", classmethod(lambda cls, *a: None))
    assert_refused(capsys, ["export", tmp_path / "s"], message, tmp_path / "loaded")


def test_a_shard_index_naming_files_elsewhere_is_refused(tmp_path, capsys):
    """The index decides which files are read: one naming a path outside the model directory, or
    not an index at all, is refused (not read another way)."""
    source = _sharded(tmp_path)
    solve(None, tmp_path / "s", model=source, targets="q_proj", mode="pissa", rank=4)
    capsys.readouterr()
    index = source / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = next(iter(content["weight_map"]))
    (tmp_path / "elsewhere.safetensors").write_bytes((source / content["weight_map"][first]).read_bytes())
    content["weight_map"][first] = "../elsewhere.safetensors"
    index.write_text(json.dumps(content))
    assert_refused(capsys, ["export", tmp_path / "s"], "names '../elsewhere.safetensors', which is not a file in", tmp_path / "a")
    index.write_text("[1, 2]")
    assert_refused(capsys, ["export", tmp_path / "s"], "is not a safetensors index (a JSON object whose weight_map names a file",
                   tmp_path / "b")


def test_solve_reads_each_weight_by_name(tiny, captured, tmp_path, monkeypatch):
    """solve builds the model without weights and reads each target's W when its batch comes: the
    same factors, bit for bit, and the same model record as solving on the loaded model."""
    empty, real = [], models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: empty.append(k.get("empty", False)) or real(*a, **k))
    runs = {"cnt-s": lambda out: solve(captured["llama"], out, mode="cnt-s", rank=4),
            "inilora": lambda out: solve(None, out, model=tiny["gpt2"], mode="inilora", rank=4, steps=20)}
    for name, run in runs.items():
        run(tmp_path / f"{name}-streamed")
    assert empty == [True, True]
    monkeypatch.setattr(pretrained.Streamed, "open", classmethod(lambda cls, *a: None))
    for name, run in runs.items():
        run(tmp_path / f"{name}-loaded")
        streamed, loaded = tmp_path / f"{name}-streamed", tmp_path / f"{name}-loaded"
        a, b = load_file(streamed / "adapter.safetensors"), load_file(loaded / "adapter.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
        manifest = lambda directory: json.loads((directory / "manifest.json").read_text())  # noqa: E731
        assert manifest(streamed)["model"] == manifest(loaded)["model"], name


def test_a_class_that_keeps_modules_in_float32_is_loaded(tmp_path, monkeypatch):
    """T5 keeps its `wo` in float32 whatever dtype it loads in: its weights are not all in the
    config's dtype, so solve loads it as before rather than read it by name."""
    t5 = tmp_path / "t5"
    transformers.T5Model(transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                               architectures=["T5Model"])).save_pretrained(t5)
    empty, real = [], models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: empty.append(k.get("empty", False)) or real(*a, **k))
    solve(None, tmp_path / "s", model=t5, targets="wo", mode="pissa", rank=2)
    assert empty == [True, False]
