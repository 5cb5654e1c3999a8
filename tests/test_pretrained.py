"""A safetensors model is never loaded whole by solve and export: solve reads each target's W by
name (the same factors as on the loaded model); the residual base is written file by file — the
same base, tensor for tensor, as the loaded model saves (tiny Llama, GPT-2's Conv1D, BERT, a
sharded checkpoint, SmolLM2's real bfloat16 weights), the checkpoint's files and index kept;
`export --check` reads a chunk of modules at a time, to the loaded check's figure. A residual
base of a weight another module shares is refused on both paths, and so are a shard index naming
files elsewhere and a weight that does not fit the model."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from cntinit import capture
from cntinit.errors import CntinitError
from cntinit.export import export
from cntinit.models import fingerprints, loading, pretrained
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
    empty, real = [], loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: empty.append(k.get("skeleton", False)) or real(*a, **k))
    export(tmp_path / "s", tmp_path / "streamed")
    assert empty == [True]  # a skeleton, built without weights; each adapted one read by name
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


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_check_reads_a_chunk_of_modules_at_a_time(kind, tiny, captured, tmp_path, monkeypatch):
    """export --check builds the model without weights and reads a chunk of adapted modules at a
    time (here one each), PEFT loading the adapter onto it: the same figure, bit for bit, as the check
    on the loaded models, for a residual base and an offset init; a damaged module in the last chunk
    is found."""
    export_module = importlib.import_module("cntinit.export.check")
    from cntinit.export import check_peft

    solve(None, tmp_path / "residual", model=tiny[kind], targets="all-linear", mode="pissa", rank=4)
    solve(captured[kind], tmp_path / "offset", mode="cnt-s", rank=4)
    for init in ("residual", "offset"):
        export(tmp_path / init, tmp_path / f"e-{init}")
    loads, real = [], loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: loads.append(k.get("skeleton", False)) or real(*a, **k))
    monkeypatch.setattr(export_module, "CHECK_CHUNK_BYTES", 1)
    by_name = {init: check_peft(tmp_path / f"e-{init}", tmp_path / init) for init in ("residual", "offset")}
    modules = {init: list(json.loads((tmp_path / init / "manifest.json").read_text())["modules"]) for init in by_name}
    assert loads == [True] * (len(modules["residual"]) + 1 + len(modules["offset"]) + 1)  # the model, then a chunk each
    monkeypatch.setattr(pretrained.Streamed, "open", classmethod(lambda cls, *a: None))
    whole = {init: check_peft(tmp_path / f"e-{init}", tmp_path / init) for init in by_name}
    assert by_name == whole and max(whole.values()) < 1e-12, (by_name, whole)
    monkeypatch.undo()
    monkeypatch.setattr(export_module, "CHECK_CHUNK_BYTES", 1)
    path = tmp_path / "e-residual" / "base" / "model.safetensors"
    tensors = load_file(path)
    tensors[modules["residual"][-1] + ".weight"] *= 1.01
    save_file(tensors, path, metadata={"format": "pt"})
    assert check_peft(tmp_path / "e-residual", tmp_path / "residual") > 1e-3
    del tensors[modules["residual"][-1] + ".weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CntinitError, match=f"has no weight for {modules['residual'][-1]}.weight \\(an adapted module\\): export again: "
                                           "the written base is damaged"):
        check_peft(tmp_path / "e-residual", tmp_path / "residual")


def test_export_check_reads_the_weights_once(tiny, tmp_path, monkeypatch):
    """Export verifies the model's fingerprint, a read of every target weight (about 130 GB for a
    70B, all-linear); --check takes the model export opened instead of reading them all again. A
    loaded model holds the written base after export, so there the check opens the model anew."""
    solve(None, tmp_path / "s", model=tiny["llama"], targets="all-linear", mode="pissa", rank=4)
    counted, real = [], fingerprints.fingerprint
    monkeypatch.setattr(fingerprints, "fingerprint", lambda *a, **k: counted.append(1) or real(*a, **k))
    export(tmp_path / "s", tmp_path / "streamed", check=True)
    assert len(counted) == 1
    monkeypatch.setattr(pretrained.Streamed, "open", classmethod(lambda cls, *a: None))
    export(tmp_path / "s", tmp_path / "loaded", check=True)
    assert len(counted) == 3
    streamed, loaded = (json.loads((tmp_path / name / "manifest.json").read_text())["check"] for name in ("streamed", "loaded"))
    assert streamed == loaded and streamed["max_relative_error"] < 1e-12


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


def test_a_weight_that_does_not_fit_the_model_is_refused(tmp_path, capsys):
    """A target weight of another shape than the config gives stopped solve with a traceback
    (from_pretrained refuses it); one stored as int8 or float8 — a quantized checkpoint's codes,
    their scales stored apart — was taken as the weights' values by solve and by every capture
    (from_pretrained casts it without a word); one missing was drawn at random by a normal capture.
    Each is refused with the fix, read by name (solve, capture --layerwise) and loaded (capture)."""
    key = "model.layers.0.self_attn.q_proj.weight"
    codes = "not as 16-, 32- or 64-bit floats: a quantized checkpoint's codes, not weights — point at the unquantized checkpoint"
    changes = {"shape": (lambda t: t[:, :32].contiguous(), "has shape (64, 32) in the checkpoint but (64, 64) in the model its "
                         "config.json describes: the checkpoint is damaged or another model's; use an intact copy"),
               "int8": (lambda t: (t * 100).to(torch.int8), f"is stored as int8, {codes}"),
               "float8": (lambda t: t.to(torch.float8_e4m3fn), f"is stored as float8_e4m3fn, {codes}"),
               "missing": (None, "")}
    for name, (change, message) in changes.items():
        model = build_tiny("llama", tmp_path / name)
        tensors = load_file(model / "model.safetensors")
        if change is None:
            del tensors[key]
        else:
            tensors[key] = change(tensors[key])
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
        capsys.readouterr()
        drawn = f"{model} has no weight for {key}, which from_pretrained would draw at random: the checkpoint is incomplete or " \
                "another model's; use an intact copy"
        by_name = f"{model} has no weight for {key} (a target's weight)" if change is None else f"{key} {message}"
        data = calibration_of(tmp_path)
        for command, expected in ((["solve", "--model", model, "--targets", "q_proj", "-m", "pissa", "-r", "4"], by_name if change else drawn),
                                  (["capture", model, "--data", data, "--targets", "q_proj", "--layerwise"], by_name),
                                  (["capture", model, "--data", data, "--targets", "q_proj"], by_name if change else drawn)):
            assert_refused(capsys, command, expected, tmp_path / f"{command[0]}-{name}")


def test_a_weight_file_cut_short_is_refused(tmp_path, capsys):
    """A safetensors file cut short (an interrupted download) stopped solve and capture --layerwise
    with safetensors' traceback; refused with the file and the fix, one file or one shard of many,
    and by export, which copies the files into the residual base."""
    model, sharded = build_tiny("llama", tmp_path / "one"), _sharded(tmp_path)
    solve(None, tmp_path / "s", model=sharded, targets="q_proj", mode="pissa", rank=4)
    capsys.readouterr()
    shard = sharded / json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]["model.layers.1.self_attn.q_proj.weight"]
    data = calibration_of(tmp_path)
    for path, file in ((model, model / "model.safetensors"), (sharded, shard)):
        file.write_bytes(file.read_bytes()[:-1000])
        damaged = f"{file} cannot be read as safetensors (Error while deserializing header: incomplete metadata, file not fully " \
                  "covered): the checkpoint is damaged (a download cut short?); use an intact copy"
        for command in (["solve", "--model", path, "--targets", "q_proj", "-m", "pissa", "-r", "4"],
                        ["capture", path, "--data", data, "--targets", "q_proj", "--layerwise"]):
            assert_refused(capsys, command, damaged, tmp_path / "out")
        assert_refused(capsys, ["capture", path, "--data", data], f"could not load the model at {path}: Error while deserializing "
                       "header: incomplete metadata", tmp_path / "out")
    assert_refused(capsys, ["export", tmp_path / "s"], f"{shard} cannot be read as safetensors", tmp_path / "out")


def test_a_quantized_checkpoint_is_refused(tiny, tmp_path, capsys):
    """A bitsandbytes/GPTQ/FP8 checkpoint holds codes and scales: its loading crashed a capture with
    a traceback (a bitsandbytes model cannot be cast). Refused by every command that reads it, by
    its config.json, with the way to a QLoRA base."""
    model = tmp_path / "bnb"
    shutil.copytree(tiny["llama"], model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (model / "config.json").write_text(json.dumps(config))
    message = (f"{model} is a quantized checkpoint (bitsandbytes): cntinit reads the unquantized weights — point at the checkpoint "
               "it was quantized from (for a 4-bit QLoRA base, solve that with --quantize nf4, or -m loftq)")
    for command in (["capture", model, "--data", calibration_of(tmp_path)], ["capture", model, "--data", calibration_of(tmp_path), "--layerwise"],
                    ["solve", "--model", model, "-m", "pissa", "-r", "4"]):
        assert_refused(capsys, command, message, tmp_path / "out")


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
    empty, real = [], loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: empty.append(k.get("skeleton", False)) or real(*a, **k))
    runs = {"cnt-s": lambda out: solve(captured["llama"], out, mode="cnt-s", rank=4),
            "inilora": lambda out: solve(None, out, model=tiny["gpt2"], mode="inilora", rank=4, steps=20)}
    for name, solving in runs.items():
        solving(tmp_path / f"{name}-streamed")
    assert empty == [True, True]
    monkeypatch.setattr(pretrained.Streamed, "open", classmethod(lambda cls, *a: None))
    for name, solving in runs.items():
        solving(tmp_path / f"{name}-loaded")
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
    empty, real = [], loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: empty.append(k.get("skeleton", False)) or real(*a, **k))
    solve(None, tmp_path / "s", model=t5, targets="wo", mode="pissa", rank=2)
    assert empty == [True, False]


@pytest.mark.parametrize("stored, trained", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("row_bytes", [1 << 20, 8 * 48 * 5])  # the whole weight in one block; 5 rows (and a short last block)
def test_the_residual_is_rounded_once_and_its_rounding_measured_exactly_where_it_could_warn(stored, trained, row_bytes, monkeypatch):
    """W − B@A in one fused float64 product, rounded once to W's dtype, block of rows by block; the rounding
    to the training dtype is measured only where a bound says it could reach the warning — so the worst
    case found equals the definition's (every module measured) whenever either one passes the threshold."""
    monkeypatch.setattr(pretrained, "ROW_BYTES", row_bytes)
    generator = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 30.0, 3e3, 1e6):
        w = torch.randn(48, 40, generator=generator).to(stored)
        b, a = torch.randn(48, 4, generator=generator, dtype=torch.float64), torch.randn(4, 40, generator=generator, dtype=torch.float64)
        b = b * (scale * float(w.double().norm()) / float((b @ a).norm()))
        for transposed in (False, True):
            weight, (fb, fa) = (w.T.contiguous(), (b, a)) if transposed else (w, (b, a))
            precision = pretrained.Precision(trained)
            got = torch.cat([block.clone() for block in precision.residual("m", weight, fb, fa, transposed, stored)])
            exact = (w.double() - b @ a)
            assert got.dtype == stored and torch.equal(got, (exact.T if transposed else exact).to(stored)) or \
                float((got.double() - (exact.T if transposed else exact)).abs().max()) <= float(exact.abs().max()) * torch.finfo(stored).eps
            size = w.double().norm()
            lost = float((exact.to(trained).double() + b @ a - w.double()).norm() / size)
            own = float((w.double().to(trained).double() - w.double()).norm() / size)
            warns = lost - own > pretrained.RESIDUAL_PRECISION
            assert (precision.worst > pretrained.RESIDUAL_PRECISION) == warns, (stored, trained, scale)
            if warns:
                assert precision.worst == pytest.approx(lost - own, rel=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_a_checkpoint_in_the_models_own_names_is_read_as_transformers_converts_it(kind, tiny):
    """Where every stored key is one of the model's names, they are read as they are — what transformers'
    conversion mapping (0.2 s to build, in every solve and export) gives for them too."""
    from cntinit.models import named_weights, weight_files

    net = loading.load(tiny[kind], skeleton=True)[0]
    keys = list(weight_files.safetensors_files(tiny[kind]))
    fast = named_weights._model_keys(net, keys)
    assert fast == named_weights._converted_keys(net, keys, net.state_dict()) and fast[1] == set() and len(fast[0]) == len(keys)


def test_a_rewritten_file_holds_the_replaced_tensors_and_every_other_byte_as_stored(tmp_path):
    """The residual base's writer (models/rewrite.py): replaced tensors in the dtype declared for them,
    every other tensor and the metadata as stored, a file without metadata given safetensors' "pt"."""
    from safetensors import safe_open

    from cntinit.models import rewrite

    tensors = {"a.weight": torch.randn(3, 5), "b.weight": torch.randn(4, 2).bfloat16(), "ids": torch.arange(7),
               "scale": torch.tensor(0.5, dtype=torch.float16)}
    for metadata, expected in (({"format": "pt", "note": "kept"}, {"format": "pt", "note": "kept"}), (None, {"format": "pt"})):
        source, out = tmp_path / "source.safetensors", tmp_path / "out.safetensors"
        save_file(tensors, source, metadata=metadata)
        read = []
        rewrite.rewrite(source, out, {"a.weight": torch.bfloat16, "b.weight": torch.bfloat16},
                        lambda key, rows: read.append(key) or [(rows[0:3] * 2).bfloat16(), (rows[3:] * 2).bfloat16()])
        assert sorted(read) == ["a.weight", "b.weight"]  # only the replaced tensors were read as tensors
        written = load_file(out)
        assert torch.equal(written["a.weight"], (tensors["a.weight"] * 2).bfloat16())
        assert torch.equal(written["b.weight"], (tensors["b.weight"] * 2).bfloat16())
        assert all(torch.equal(written[k], tensors[k]) and written[k].dtype == tensors[k].dtype for k in ("ids", "scale"))
        with safe_open(out, framework="pt") as handle:
            assert handle.metadata() == expected


def test_the_residual_base_reads_only_the_adapted_weights_as_tensors(tiny, tmp_path, monkeypatch):
    """Every other tensor goes from file to file as bytes: the export holds one weight, not the file."""
    from cntinit.models import rewrite

    solve(None, tmp_path / "s", model=tiny["llama"], targets="q_proj,down_proj", mode="pissa", rank=4)
    replaced, real = [], rewrite.rewrite
    monkeypatch.setattr(pretrained, "rewrite", lambda source, out, keys, compute: replaced.extend(keys) or real(source, out, keys, compute))
    export(tmp_path / "s", tmp_path / "e")
    adapted = {f"{m}.weight" for m in json.loads((tmp_path / "s" / "manifest.json").read_text())["modules"]}
    assert set(replaced) == adapted and len(replaced) == len(adapted)
    assert torch.equal(load_file(tmp_path / "e" / "base" / "model.safetensors")["model.embed_tokens.weight"],
                       load_file(tiny["llama"] / "model.safetensors")["model.embed_tokens.weight"])


def test_a_file_cut_short_while_it_is_copied_is_refused(tmp_path, monkeypatch):
    """Between the check of the header and the copy, the file lost its tail: refused, not written short."""
    import os

    from cntinit.models import rewrite

    source = tmp_path / "source.safetensors"
    save_file({"a.weight": torch.randn(3, 5), "b.weight": torch.randn(4, 2)}, source)
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)  # what the kernel answers at the end of the file
    with pytest.raises(CntinitError, match=f"^{source} ends before its header says it does: the checkpoint is damaged"):
        rewrite.rewrite(source, tmp_path / "out.safetensors", {"a.weight": torch.float32}, lambda key, rows: [rows[0:3]])


def test_a_malformed_header_is_refused_before_anything_is_written(tmp_path):
    """A header whose entry is not what safetensors writes is refused by safetensors' own check, not a KeyError."""
    import struct

    from cntinit.models import rewrite

    source = tmp_path / "source.safetensors"
    text = json.dumps({"a.weight": {"dtype": "F32", "shape": [2, 2]}}).encode()  # no data_offsets
    source.write_bytes(struct.pack("<Q", len(text)) + text + bytes(16))
    with pytest.raises(CntinitError, match=f"^{source} cannot be read as safetensors"):
        rewrite.rewrite(source, tmp_path / "out.safetensors", {}, lambda key, rows: [rows[0:3]])
    assert not (tmp_path / "out.safetensors").exists()



def test_a_write_the_kernel_cuts_short_goes_on_from_the_byte_it_stopped_at(tmp_path, monkeypatch):
    """os.write may write less than it was given (a signal, a pipe, some filesystems): the rest follows from
    that byte — a block's 2-D view was sliced by rows, not bytes, and the header's write was not retried."""
    import os

    from cntinit.models import rewrite

    source = tmp_path / "source.safetensors"
    tensors = {"a.weight": torch.randn(5, 3), "b.weight": torch.randn(4, 6)}
    save_file(tensors, source)
    real = os.write
    monkeypatch.setattr(rewrite.os, "write", lambda fd, data: real(fd, bytes(memoryview(data).cast("B")[:7])))
    rewrite.rewrite(source, tmp_path / "out.safetensors", {"a.weight": torch.float32, "b.weight": torch.float32},
                    lambda key, rows: [rows[0:2] * 2, rows[2:] * 2])
    written = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(written[key], tensors[key] * 2) for key in tensors)


def test_a_bfloat16_base_whose_rounding_cannot_warn_is_not_measured(monkeypatch):
    """Rounding W − BA to bfloat16 moves base + BA off W by at most u·‖W − BA‖ (u = 2⁻⁸): under the 1% warning
    wherever ‖W − BA‖ < 2.56‖W‖. The bound kept a 4× slack, which no bfloat16 base passed, so every adapted weight
    of a bfloat16 model was read again whole and measured in float64 (1 s a 4096 × 11008 weight on 2 cores)."""
    measured = []
    monkeypatch.setattr(pretrained.Precision, "_measure", lambda self, name, *rest: measured.append(name))
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=generator).bfloat16()
    b, a = torch.randn(64, 4, generator=generator, dtype=torch.float64), torch.randn(4, 48, generator=generator, dtype=torch.float64)
    for scale, expected in ((0.1, []), (1.0, []), (3.0, ["m"])):  # ‖BA‖ relative to ‖W‖
        measured.clear()
        factor = scale * float(w.double().norm()) / float((b @ a).norm())
        list(pretrained.Precision(torch.bfloat16).residual("m", w, b * factor, a, False, torch.bfloat16))
        assert measured == expected, scale
