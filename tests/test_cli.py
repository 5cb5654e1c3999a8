"""The command line: stdout carries only results, bad input gives one line on stderr, exit 2, nothing written."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import build_tiny, leftovers, run


def test_capture_prints_only_the_path_and_inspect_reads_it(tiny, text_jsonl, tmp_path, capsys):
    code, out, err = run(capsys, "capture", tiny["llama"], "--data", text_jsonl, "--out", tmp_path / "s", "--targets", "q_proj,o_proj")
    assert code == 0 and out == f"{tmp_path / 's'}\n"
    assert "capture" in err and "tok/s" in err
    code, out, _ = run(capsys, "inspect", tmp_path / "s")
    assert code == 0 and "model.layers.0.self_attn.q_proj" in out and "q_proj, k_proj, v_proj" not in out
    code, out, _ = run(capsys, "inspect", tmp_path / "s", "--json")
    assert json.loads(out)["capture"]["targets"] == "q_proj,o_proj"


def test_json_summary_and_quiet(tiny, text_jsonl, tmp_path, capsys):
    code, out, err = run(capsys, "capture", tiny["bert"], "-d", text_jsonl, "-o", tmp_path / "s", "--json", "--quiet", "--buckets", "2")
    summary = json.loads(out)
    assert code == 0 and err == ""
    assert summary["data"]["samples"] == 12 and summary["capture"]["buckets"] == 2 and summary["statistics"] == 9


def test_merge_command(tiny, text_jsonl, tmp_path, capsys):
    for name in ("a", "b"):
        run(capsys, "capture", tiny["bert"], "-d", text_jsonl, "-o", tmp_path / name, "-t", "query", "-q")
    # two captures of the same data: summing them counts every sample twice, which --allow-duplicates says is meant
    code, out, _ = run(capsys, "merge", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "m", "--json", "--allow-duplicates")
    assert code == 0 and json.loads(out)["data"]["tokens"] == 2 * json.loads(
        run(capsys, "inspect", tmp_path / "a", "--json")[1])["data"]["tokens"]


@pytest.fixture()
def inf_model(tmp_path):
    directory = build_tiny("bert", tmp_path / "inf")
    model = transformers.BertModel.from_pretrained(directory)
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight[0, 0] = 1e25  # finite, but its outputs' squares overflow float32
    model.save_pretrained(directory)
    return directory


def bad_cases(tiny, tmp_path, text_jsonl, inf_model):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": "fine"}\n{oops}\n')
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"prompt": "x"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    (tmp_path / "notmodel").mkdir()
    llama = tiny["llama"]
    return [
        ([tmp_path / "nowhere", "-d", text_jsonl], "model path .*nowhere does not exist"),
        ([tmp_path / "notmodel", "-d", text_jsonl], "not a transformers model directory"),
        ([unknown_architecture(tiny["bert"], tmp_path), "-d", text_jsonl],
         r"could not load the model at .*: The checkpoint .* model type `nosuchtype` .* — give a complete save_pretrained directory"),
        ([llama, "-d", text_jsonl, "-t", "query"], r"--targets query matched no linear module; available: self_attn.q_proj, self_attn.k_proj"),
        ([llama, "-d", empty], "no samples in"),
        ([llama, "-d", bad_json], r"bad.jsonl:3: not valid JSON"),
        ([llama, "-d", no_field], r"nofield.jsonl:1: no string field 'text'"),
        ([llama, "-d", text_jsonl, "--buckets", "0"], "--buckets must be at least 1"),
        ([llama, "-d", text_jsonl, "--dtype", "int8"], "--dtype int8 is not one of"),
        ([foreign_tokenizer(tiny["llama"], tmp_path), "-d", text_jsonl],
         r"the tokenizer gives token id \d+, but the model's embeddings have 500 rows: its tokenizer files are another model's; "
         r"put the model's own tokenizer beside its weights"),
        ([damaged_tokenizer(tiny["llama"], tmp_path), "-d", text_jsonl],
         r"could not load the tokenizer at .*: Expecting value: .* — its tokenizer files are damaged or of another version"),
        ([inf_model, "-d", text_jsonl], r"non-finite activations \(NaN/Inf, or squares beyond the sums' range\) entering "
                                        r"encoder.layer.0.output.dense: run with --dtype float32"),
    ]


def foreign_tokenizer(model, tmp_path):
    """A model of 500 token embeddings beside another model's tokenizer (30k ids): the forward
    stopped with torch's IndexError."""
    config = transformers.AutoConfig.from_pretrained(model)
    config.vocab_size = 500
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "small-vocab")
    transformers.AutoTokenizer.from_pretrained(model).save_pretrained(tmp_path / "small-vocab")
    return tmp_path / "small-vocab"


def damaged_tokenizer(model, tmp_path):
    copy = shutil.copytree(model, tmp_path / "damaged-tokenizer")
    (copy / "tokenizer.json").write_text("garbage")
    return copy


def unknown_architecture(model, tmp_path):
    """A copy of `model` whose config names a model type transformers does not know."""
    copy = shutil.copytree(model, tmp_path / "unknown-arch")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"model_type": "nosuchtype", "architectures": ["NoSuchModel"]}))
    return copy


def test_bad_input_one_line_exit_2_nothing_written(tiny, text_jsonl, tmp_path, inf_model, capsys):
    for args, message in bad_cases(tiny, tmp_path, text_jsonl, inf_model):
        code, out, err = run(capsys, "capture", *args, "--out", tmp_path / "out")
        assert code == 2, (args, err)
        last = err.rstrip("\n").split("\n")[-1]
        assert out == "" and last.startswith("error: ") and err.count("error") == 1, err
        assert re.search(message, last), (message, err)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_out_policy(tiny, text_jsonl, tmp_path, capsys):
    """--overwrite replaces only what cntinit wrote: it used to delete a user's file or folder at --out
    (as the error message advised) and put a store there."""
    foreign, data_file = tmp_path / "foreign", tmp_path / "results.csv"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    data_file.write_text("a,b\n1,2\n")
    for out in (foreign, data_file):
        for extra in ([], ["--overwrite"]):
            code, _, err = run(capsys, "capture", tiny["llama"], "-d", text_jsonl, "-o", out, "-t", "o_proj", *extra)
            assert code == 2 and "cntinit replaces only what it wrote" in err and "even with --overwrite" in err, err
    assert (foreign / "keep.txt").read_text() == "mine" and data_file.read_text() == "a,b\n1,2\n"
    code, _, err = run(capsys, "solve", "--model", tiny["llama"], "-m", "lora", "-r", "2", "-o", data_file, "--overwrite")
    assert code == 2 and "is a file, not a directory" in err and data_file.read_text() == "a,b\n1,2\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = run(capsys, "capture", tiny["llama"], "-d", text_jsonl, "-o", empty, "-t", "o_proj")
    assert code == 0 and (empty / "manifest.json").exists()  # an empty directory is taken as it is
    first = json.loads((empty / "manifest.json").read_text())["data"]["samples"]
    code, _, _ = run(capsys, "capture", tiny["llama"], "-d", text_jsonl, "-o", empty, "-t", "o_proj", "-n", "3")
    assert code == 0 and json.loads((empty / "manifest.json").read_text())["data"]["samples"] == 3 != first
    other = build_tiny("llama", tmp_path / "other", seed=3)
    code, _, err = run(capsys, "capture", other, "-d", text_jsonl, "-o", empty, "-t", "o_proj")
    assert code == 2 and "is a statistics store of another model, not a statistics store of this model" in err and "--overwrite" in err
    code, _, err = run(capsys, "solve", "--model", tiny["llama"], "-m", "lora", "-r", "2", "-o", empty)
    assert code == 2 and "is a statistics store (from `cntinit capture`" in err
    assert run(capsys, "capture", other, "-d", text_jsonl, "-o", empty, "-t", "o_proj", "--overwrite")[0] == 0
    assert leftovers(tmp_path) == []


def test_corrupt_store_is_refused(tiny, text_jsonl, tmp_path, capsys):
    run(capsys, "capture", tiny["bert"], "-d", text_jsonl, "-o", tmp_path / "s", "-t", "query", "-q")
    payload = tmp_path / "s" / "stats-00001.safetensors"
    payload.write_bytes(payload.read_bytes()[:-8])
    code, _, err = run(capsys, "inspect", tmp_path / "s")
    assert code == 2 and "does not match its checksum" in err


def test_stdin_pipeline_as_a_subprocess(tiny, tmp_path):
    """The real entry point: JSONL on stdin, path on stdout, exit 0; then a failing run exits 2."""
    lines = "".join(json.dumps({"text": f"sample number {i}"}) + "\n" for i in range(6))
    cmd = [sys.executable, "-m", "cntinit", "capture", str(tiny["bert"]), "--data", "-", "--out", str(tmp_path / "s"), "-t", "query"]
    done = subprocess.run(cmd, input=lines, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 's'}\n"
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["data"]["sources"] == ["-"]
    failed = subprocess.run(cmd[:-2] + ["-t", "nope"], input=lines, capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stdout == "" and "matched no linear module" in failed.stderr


def test_a_missing_model_is_named_in_readmes_words(tiny, text_jsonl, tmp_path, capsys, monkeypatch):
    """Through the cache it said "does not exist: check the path"; a Hub id not in the (offline) cache
    is told how to get it."""
    monkeypatch.chdir(tmp_path)
    for out in ([], ["-o", tmp_path / "s"]):
        code, _, err = run(capsys, "capture", "./llama-here", "-d", text_jsonl, *out)
        assert code == 2 and "model path llama-here does not exist: give a local model directory, or a Hugging Face Hub id" in err
        code, _, err = run(capsys, "capture", "meta-llama/Llama-3.2-1B", "-d", text_jsonl, *out)
        assert code == 2 and "meta-llama/Llama-3.2-1B is neither a local path nor a model in the Hugging Face cache" in err, err
        assert "`hf download meta-llama/Llama-3.2-1B`" in err and "HF_HUB_OFFLINE is set" in err
    code, _, err = run(capsys, "solve", "--model", "org/model", "-m", "lora")
    assert code == 2 and "org/model is neither a local path nor a model in the Hugging Face cache" in err
    code, _, err = run(capsys, "capture", tiny["bert"], "-d", "missing.jsonl")
    assert code == 2 and "data path missing.jsonl does not exist: give a .jsonl, .txt, .parquet" in err


def test_help_shows_flags_as_flags_and_misspellings_get_a_suggestion(capsys):
    for command in ([], ["capture"], ["solve"], ["export"], ["run"], ["cache"], ["cache", "ls"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0 and "<bool>" not in out and "--help" in out, command
    code, _, err = run(capsys, "solve", "--model", ".", "-m", "cnt_s")
    assert code == 2 and "--mode cnt_s is not one of" in err and "did you mean cnt-s?" in err


def test_usage_errors_are_one_line_pointing_at_help(tmp_path, capsys):
    """click's own errors (unknown option or command, a value of the wrong type, a missing argument) are one line
    like cntinit's, exit 2, instead of a boxed usage block."""
    cases = {("solve", "--nope"): "no such option: --nope", ("capture", "x", "-d", "y", "--seq-len", "nan"): "invalid value for '--seq-len'",
             ("capture",): "missing argument 'MODEL'", ("bogus",): "no such command 'bogus'", ("export", tmp_path): "missing option '--out'"}
    for args, message in cases.items():
        code, out, err = run(capsys, *args)
        command = " ".join(["cntinit", *[a for a in args if a in ("solve", "capture", "export")]])
        assert code == 2 and out == "" and err.startswith(f"error: {message}"), (args, err)
        assert err.count("\n") == 1 and err.rstrip().endswith(f"see {command} --help") and "╭" not in err, (args, err)
    code, out, err = run(capsys)  # a bare `cntinit` shows the help, as before
    assert code == 2 and "capture" in out and "Usage" in out and err == ""
    code, out, _ = run(capsys, "--version")
    assert code == 0 and re.fullmatch(r"cntinit \d+\.\d+\.\d+\n", out)


def test_inspect_names_what_an_export_is(captured, tmp_path, capsys):
    run(capsys, "solve", captured["bert"], "-m", "cnt-s", "-r", "2", "-o", tmp_path / "s", "-q")
    run(capsys, "export", tmp_path / "s", "-o", tmp_path / "e", "-q")
    code, _, err = run(capsys, "inspect", tmp_path / "e")
    assert code == 2 and "is an export (from `cntinit export`; a trainer loads it), not a cntinit statistics store" in err


def test_solve_imports_neither_peft_nor_bitsandbytes(tiny, tmp_path):
    """They took 1.3 s of every `cntinit solve` on 2 cores (bitsandbytes brings torch's inductor); a PEFT-format export and
    `export --check` import them when they need them."""
    probe = ("import sys, runpy; sys.argv = ['cntinit'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('cntinit', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
             "print(code, 'peft' in sys.modules, 'bitsandbytes' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, "solve", "--model", str(tiny["llama"]), "--mode", "pissa", "--niter", "2", "-r", "2",
                           "--targets", "q_proj", "-o", str(tmp_path / "s"), "-q"], capture_output=True, text=True, timeout=300)
    assert done.stderr.splitlines()[-1] == "0 False False", done.stderr[-2000:]
    assert (tmp_path / "s" / "manifest.json").is_file()
