"""`cntinit export --format peft`, proven by loading the files with PEFT itself."""

import importlib
import json
import math
import re

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors import safe_open

from cntinit.errors import CntinitError
from cntinit.export import export
from cntinit.solve import Options, solve
from conftest import leftovers, run


def load(model_dir, cls=None):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    return (cls or getattr(transformers, config.architectures[0])).from_pretrained(model_dir).eval()


def factors(solve_dir):
    manifest = json.loads((solve_dir / "manifest.json").read_text())
    with safe_open(solve_dir / "adapter.safetensors", "pt") as f:
        return {n: (f.get_tensor(f"{n}.B").double(), f.get_tensor(f"{n}.A").double())
                for n, e in manifest["modules"].items() if e["rank"]}


def linear_weight(module):
    w = module.weight.detach().double()
    return w.T if type(module).__name__ == "Conv1D" else w


def assert_modules_add_exactly_ba(wrapped, pretrained, solved, prefix="", residual=False):
    """Every adapted module of the PEFT model computes (W + BA) x (residual: W x) for random x."""
    adapted = dict(wrapped.base_model.model.named_modules())
    original = dict(pretrained.named_modules())
    generator = torch.Generator().manual_seed(1)
    for name, (b, a) in solved.items():
        module, w = adapted[prefix + name], linear_weight(original[name])
        assert isinstance(module, peft.tuners.lora.LoraLayer), name
        assert module.r["default"] == b.shape[1], name
        x = torch.randn(3, w.shape[1], generator=generator, dtype=torch.float64)
        bias = original[name].bias.detach().double() if original[name].bias is not None else 0
        update = b @ a
        want = x @ (w if residual else w + update).T + bias
        with torch.no_grad():
            got = module(x.float()).double()
        # float32 weights: error scales with the larger of W and BA (the residual base stores W − BA)
        scale = (x.norm(dim=1, keepdim=True) * (w.norm() + update.norm())).max()
        assert (got - want).abs().max() <= 2e-6 * scale, (name, float((got - want).abs().max() / scale))


VARIANTS = [
    ("llama", Options(mode="cnt-s", rank=4), {}),
    ("llama", Options(mode="cnt-x", rank=4, vas=True), {"alpha": 16}),
    ("llama", Options(mode="cnt-sh", rank=4, vas=True, min_rank=1), {"rslora": True, "alpha": 8}),
    ("llama", Options(mode="cnt-s", rank=3, vas=True), {"dora": True, "alpha": 6}),
    ("bert", Options(mode="cnt-x", rank=4, vas=True), {"fixed_alpha": True, "alpha": 32}),
    ("bert", Options(mode="cnt-s", rank=2), {"dora": True, "rslora": True}),
    ("gpt2", Options(mode="cnt-s", rank=4, vas=True, self_form="zca"), {"dora": True}),
]


@pytest.mark.parametrize("kind,opts,flags", VARIANTS, ids=[f"{k}-{o.mode}-{'vas-' if o.vas else ''}{'-'.join(f) or 'plain'}"
                                                            for k, o, f in VARIANTS])
def test_peft_loads_the_offset_export_and_adds_exactly_ba(kind, opts, flags, tiny, captured, tmp_path):
    solve(captured[kind], tmp_path / "s", opts)
    export(tmp_path / "s", tmp_path / "e", **flags)
    solved = factors(tmp_path / "s")
    ranks = {n: b.shape[1] for n, (b, _) in solved.items()}
    if opts.vas:
        assert len(set(ranks.values())) > 1, "the variant should exercise variable ranks"
    pretrained = load(tiny[kind])
    wrapped = peft.PeftModel.from_pretrained(load(tiny[kind]), tmp_path / "e")
    assert_modules_add_exactly_ba(wrapped, pretrained, solved)

    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["use_rslora"] == bool(flags.get("rslora"))
    assert config["use_dora"] == bool(flags.get("dora")) and config["r"] == opts.rank
    assert all(key.startswith("^") for key in config["rank_pattern"]) and all(key.startswith("^") for key in config["alpha_pattern"])
    alpha = flags.get("alpha", opts.rank)
    adapted = dict(wrapped.base_model.model.named_modules())
    for name, rank in ranks.items():
        if flags.get("fixed_alpha"):
            module_alpha = alpha
        else:  # the scale α/r (α/√r with rsLoRA) is the same for every module
            module_alpha = alpha * (math.sqrt(rank / opts.rank) if flags.get("rslora") else rank / opts.rank)
        want_scale = module_alpha / (math.sqrt(rank) if flags.get("rslora") else rank)
        assert adapted[name].scaling["default"] == pytest.approx(want_scale), name
    with safe_open(tmp_path / "e" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        name = next(iter(solved))
        b = f.get_tensor(f"base_model.model.{name}.lora_B.weight").double()
        assert torch.allclose(b * math.sqrt(adapted[name].scaling["default"]), solved[name][0], rtol=1e-6, atol=1e-7)


def test_dora_magnitude_is_the_row_norm_peft_computes(tiny, captured, tmp_path):
    solve(captured["llama"], tmp_path / "s", Options(mode="cnt-s", rank=4))
    export(tmp_path / "s", tmp_path / "e", dora=True, alpha=8)
    wrapped = peft.PeftModel.from_pretrained(load(tiny["llama"]), tmp_path / "e")
    for name, (b, a) in factors(tmp_path / "s").items():
        module = dict(wrapped.base_model.model.named_modules())[name]
        lora_weight = module.lora_B["default"].weight @ module.lora_A["default"].weight
        peft_norm = module.lora_magnitude_vector["default"].get_weight_norm(
            module.get_base_layer().weight, lora_weight.detach(), module.scaling["default"])
        torch.testing.assert_close(module.lora_magnitude_vector["default"].weight.detach(), peft_norm.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,mode,flags", [("llama", "cnt-s", {}), ("bert", "cnt-sh", {"dora": True}), ("gpt2", "cnt-s", {"rslora": True})])
def test_residual_export_starts_at_the_pretrained_model(kind, mode, flags, tiny, captured, tmp_path, capsys):
    solve(captured[kind], tmp_path / "s", Options(mode=mode, rank=4, init="residual", self_form="zca"))
    export(tmp_path / "s", tmp_path / "e", **flags)
    assert ("ignores DoRA magnitudes" in capsys.readouterr().err) == bool(flags.get("dora"))
    assert (tmp_path / "e" / "base" / "config.json").is_file() and (tmp_path / "e" / "base" / "tokenizer.json").is_file()
    pretrained = load(tiny[kind])
    wrapped = peft.PeftModel.from_pretrained(load(tmp_path / "e" / "base"), tmp_path / "e")
    solved = factors(tmp_path / "s")
    assert_modules_add_exactly_ba(wrapped, pretrained, solved, residual=True)
    base = dict(load(tmp_path / "e" / "base").named_modules())
    for name, (b, a) in solved.items():  # the shipped base is W − BA
        torch.testing.assert_close(linear_weight(base[name]), linear_weight(dict(pretrained.named_modules())[name]) - b @ a,
                                   rtol=0, atol=1e-6 * float((b @ a).abs().max() + 1))
    ids = torch.randint(5, 500, (2, 9))
    with torch.no_grad():
        want, got = pretrained(input_ids=ids), wrapped(input_ids=ids)
    key = "logits" if "logits" in want else "last_hidden_state"
    torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)


def test_trained_residual_adapter_converts_back_to_plain_lora(tiny, captured, tmp_path):
    """The export directory works as PEFT's path_initial_model_for_weight_conversion."""
    solve(captured["llama"], tmp_path / "s", Options(mode="cnt-s", rank=4, init="residual", self_form="zca", vas=True))
    export(tmp_path / "s", tmp_path / "e", alpha=8)
    assert json.loads((tmp_path / "e" / "adapter_config.json").read_text())["rank_pattern"]
    trained = peft.PeftModel.from_pretrained(load(tmp_path / "e" / "base"), tmp_path / "e", is_trainable=True)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    trained.save_pretrained(tmp_path / "trained", path_initial_model_for_weight_conversion=str(tmp_path / "e"))
    converted = peft.PeftModel.from_pretrained(load(tiny["llama"]), tmp_path / "trained")
    ids = torch.randint(5, 500, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_module_prefix_targets_a_task_model(tiny, captured, tmp_path):
    """Captured on BertModel (encoder.*), loaded into BertForSequenceClassification (bert.encoder.*)."""
    solve(captured["bert"], tmp_path / "s", Options(mode="cnt-s", rank=3, vas=True))
    export(tmp_path / "s", tmp_path / "e", module_prefix="bert")
    task_model = load(tiny["bert"], transformers.BertForSequenceClassification)
    wrapped = peft.PeftModel.from_pretrained(task_model, tmp_path / "e")
    assert_modules_add_exactly_ba(wrapped, load(tiny["bert"]), factors(tmp_path / "s"), prefix="bert.")
    for bad in ("a b", "..", "bert..encoder", ".bert"):  # were written as keys no model has ("base_model.model.a b.encoder...")
        with pytest.raises(CntinitError, match=f"--module-prefix '{re.escape(bad)}' is not a module path: give attribute names"):
            export(tmp_path / "s", tmp_path / "bad", module_prefix=bad)
    assert not (tmp_path / "bad").exists()


def test_cli_export_with_check(captured, tmp_path, capsys):
    run(capsys, "solve", captured["bert"], "-m", "cnt-s", "-r", "2", "-o", tmp_path / "s", "-q")
    code, out, err = run(capsys, "export", tmp_path / "s", "--out", tmp_path / "e", "--check", "--dora")
    assert code == 0 and out == f"{tmp_path / 'e'}\n"
    figure = re.search(r"check: PEFT loads .*; every adapted module computes the initial layer .* to (\d\.\de-\d\d) \(relative\)", err)
    assert figure and float(figure[1]) < 1e-6, err  # in float64: what the files hold (DoRA's magnitudes: float32 norms)
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["init"] == "offset"


def test_bad_export_input(captured, tmp_path, capsys):
    run(capsys, "solve", captured["bert"], "-m", "cnt-s", "-r", "2", "-o", tmp_path / "s", "-q")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        ([captured["bert"]], "is a statistics store (from `cntinit capture`; `cntinit solve` takes it), not a cntinit solve directory"),
        ([tmp_path / "s", "--format", "onnx"], "--format onnx is not one of peft"),
        ([tmp_path / "s", "--alpha", "0"], "--alpha must be a positive finite number"),
        ([tmp_path / "s", "--out", foreign], "cntinit replaces only what it wrote"),
        ([tmp_path / "s", "--out", captured["bert"]], "is a statistics store (from `cntinit capture`; `cntinit solve` takes it), not an export"),
    ]
    for args, message in cases:
        out_args = [] if "--out" in args else ["--out", tmp_path / "e"]
        code, out, err = run(capsys, "export", *args, *out_args)
        assert code == 2 and out == "" and message in err.strip().split("\n")[-1], err
    assert not (tmp_path / "e").exists() and leftovers(tmp_path) == [] and (foreign / "notes.txt").read_text() == "mine"
    payload = tmp_path / "s" / "adapter.safetensors"
    payload.write_bytes(payload.read_bytes()[:-4] + b"\0\0\0\0")
    code, _, err = run(capsys, "export", tmp_path / "s", "--out", tmp_path / "e")
    assert code == 2 and "does not match its checksum" in err


def test_vas_rank_zero_modules_get_no_adapter(tiny, captured, tmp_path):
    solve(captured["llama"], tmp_path / "s", Options(mode="cnt-s", rank=1, vas=True, budget=3))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    zero = [n for n, e in manifest["modules"].items() if e["rank"] == 0]
    assert zero
    export(tmp_path / "s", tmp_path / "e")
    wrapped = peft.PeftModel.from_pretrained(load(tiny["llama"]), tmp_path / "e")
    adapted = dict(wrapped.base_model.model.named_modules())
    assert not any(isinstance(adapted[n], peft.tuners.lora.LoraLayer) for n in zero)
    assert np.sum([isinstance(m, peft.tuners.lora.LoraLayer) for m in adapted.values()]) == len(manifest["modules"]) - len(zero)


def test_bfloat16_checkpoint_residual_base_keeps_its_dtype(tmp_path, calibration):
    """Real LLM checkpoints are bf16: the solve works in float64, the base is saved back in bf16."""
    from cntinit import capture
    from conftest import build_tiny

    directory = build_tiny("llama", tmp_path / "bf16")
    load(directory).to(torch.bfloat16).save_pretrained(directory)
    capture(directory, calibration, tmp_path / "stats", targets="q_proj,v_proj")
    solve(tmp_path / "stats", tmp_path / "s", Options(mode="cnt-s", rank=2, init="residual", self_form="zca"))
    export(tmp_path / "s", tmp_path / "e")
    base = load(tmp_path / "e" / "base")
    assert base.dtype == torch.bfloat16
    pretrained = load(directory)
    wrapped = peft.PeftModel.from_pretrained(load(tmp_path / "e" / "base"), tmp_path / "e")
    for name, (b, a) in factors(tmp_path / "s").items():
        w = linear_weight(dict(pretrained.named_modules())[name])
        got = linear_weight(dict(base.named_modules())[name])
        # one bf16 rounding of W − BA: relative error 2⁻⁸ of the larger of the two
        assert (got - (w - b @ a)).abs().max() <= 2**-8 * float((w - b @ a).abs().max())
        assert dict(wrapped.base_model.model.named_modules())[name].r["default"] == 2


def test_check_passes_on_bfloat16_models_and_measures_the_residual_rounding(tmp_path, calibration, capsys):
    """On a bf16 checkpoint every --check failed (2.5e-3: the module computed in bf16), even for an
    offset init whose files are exact; a residual base is checked against what bf16 can hold, and the
    rounding's cost to the initial model is measured and named in the warning."""
    from cntinit import capture
    from conftest import build_tiny, run

    directory = build_tiny("llama", tmp_path / "bf16")
    load(directory).to(torch.bfloat16).save_pretrained(directory)
    capture(directory, calibration, tmp_path / "stats", targets="q_proj,v_proj")
    for init in ("offset", "residual"):
        solve(tmp_path / "stats", tmp_path / init, Options(mode="cnt-s", rank=2, init=init))
        code, _, err = run(capsys, "export", tmp_path / init, "-o", tmp_path / f"e-{init}", "--check")
        figure = re.search(r"to (\d\.\de-\d\d) \(relative\)", err)
        assert code == 0 and figure and float(figure[1]) < 1e-12, err  # the files are exact; the check computes in float64
        assert "moves the initial model" not in err
    solve(tmp_path / "stats", tmp_path / "huge", Options(mode="cnt-sh", rank=2, init="residual"))  # ‖BA‖ is hundreds of ‖W‖ here
    code, _, err = run(capsys, "export", tmp_path / "huge", "-o", tmp_path / "e-huge", "--check")
    assert code == 0 and re.search(r"W − B@A in bfloat16 moves the initial model off the pretrained one by up to "
                                   r"[\d.e-]+ \(relative, model\.layers\.\d\.self_attn\.[qv]_proj\) beyond rounding W itself", err), err


def test_the_residual_warning_follows_the_dtype_training_runs_in(captured, tmp_path, capsys):
    """A float32 checkpoint trained in bfloat16 loses W from a residual base with a large B@A, though
    the float32 base it ships is fine: --train-dtype says which dtype to judge by."""
    from conftest import run

    solve(captured["llama"], tmp_path / "s", Options(mode="cnt-sh", rank=2, init="residual"))
    capsys.readouterr()
    code, _, err = run(capsys, "export", tmp_path / "s", "-o", tmp_path / "e")
    assert code == 0 and "moves the initial model" not in err and "wrote a peft adapter" in err
    code, _, err = run(capsys, "export", tmp_path / "s", "-o", tmp_path / "e", "--train-dtype", "bfloat16")
    assert code == 0 and "W − B@A in bfloat16 moves the initial model off the pretrained one" in err
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["options"]["train_dtype"] == "bfloat16"
    code, _, err = run(capsys, "export", tmp_path / "s", "-o", tmp_path / "e", "--train-dtype", "bf16")
    assert code == 2 and "--train-dtype bf16 is not one of auto, float32, bfloat16, float16: did you mean bfloat16?" in err


def test_check_catches_a_tampered_adapter(captured, tmp_path):
    from safetensors.torch import load_file, save_file

    from cntinit.export import check_peft

    solve(captured["bert"], tmp_path / "s", Options(mode="cnt-s", rank=2))
    export(tmp_path / "s", tmp_path / "e")
    assert check_peft(tmp_path / "e", tmp_path / "s") < 1e-5
    path = tmp_path / "e" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, path, metadata={"format": "pt"})
    assert check_peft(tmp_path / "e", tmp_path / "s") > 1e-2


def test_a_failed_check_leaves_the_previous_export(captured, tmp_path, capsys, monkeypatch):
    """The check used to run after the swap: a failing one had already replaced the good export."""
    import hashlib

    export_module = importlib.import_module("cntinit.export.check")

    run(capsys, "solve", captured["llama"], "-m", "cnt-s", "-r", "2", "-o", tmp_path / "s", "-q")
    assert run(capsys, "export", tmp_path / "s", "-o", tmp_path / "e", "--check", "-q")[0] == 0
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["check"]["max_relative_error"] < 1e-5  # the check's result is recorded
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "e").iterdir() if p.is_file()}
    monkeypatch.setattr(export_module, "worst_error", lambda *a, **k: 0.5)
    code, _, err = run(capsys, "export", tmp_path / "s", "-o", tmp_path / "e", "--alpha", "4", "--check", "-q")
    assert code == 2 and "differs from the initial layers by 5.00e-01" in err and f"loaded from {tmp_path / 'e'}" in err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "e").iterdir() if p.is_file()} == before
    assert leftovers(tmp_path) == []


def test_the_check_honours_trust_remote_code(captured, tmp_path, monkeypatch):
    """The check loaded the model with trust_remote_code=False whatever the export was given."""
    from cntinit.models import loading

    solve(captured["llama"], tmp_path / "s", Options(mode="pissa", rank=2))
    seen = []
    real = loading.load
    monkeypatch.setattr(loading, "load", lambda path, trust, *a, **k: seen.append(trust) or real(path, trust, *a, **k))
    export(tmp_path / "s", tmp_path / "e", trust_remote_code=True, check=True)
    assert len(seen) == 2 and all(seen)  # the model export reads the base from (the check takes it too), then the check's chunk


@pytest.mark.parametrize("kind, expected, wrapper", [("llama", "CAUSAL_LM", "PeftModelForCausalLM"), ("gpt2", "CAUSAL_LM", "PeftModelForCausalLM"),
                                                     ("bert", "FEATURE_EXTRACTION", "PeftModelForFeatureExtraction")])
def test_the_adapter_config_names_the_task_type_the_model_class_implies(kind, expected, wrapper, tiny, captured, tmp_path, capsys):
    """task_type was null, so PEFT returned a plain PeftModel and axolotl's LoRA kernels raised
    `TypeError: Model must be a PeftModelForCausalLM`."""
    from conftest import run

    run(capsys, "solve", captured[kind], "-m", "cnt-s", "-r", "2", "-o", tmp_path / "s", "-q")
    code, _, err = run(capsys, "export", tmp_path / "s", "-o", tmp_path / "e", "--check")
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "adapter_config.json").read_text())["task_type"] == expected
    wrapped = peft.PeftModel.from_pretrained(load(tiny[kind]), tmp_path / "e")
    assert type(wrapped).__name__ == wrapper
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(wrapped(input_ids=ids, attention_mask=torch.ones_like(ids))[0]).all()  # the subclass's forward runs
    for args, task in ((["--module-prefix", "bert."], None), (["--task-type", "SEQ_CLS"], "SEQ_CLS"), (["--task-type", "none"], None)):
        code, _, err = run(capsys, "export", tmp_path / "s", "-o", tmp_path / "e2", "--overwrite", "-q", *args)
        assert code == 0 and json.loads((tmp_path / "e2" / "adapter_config.json").read_text())["task_type"] == task, (args, err)
    code, _, err = run(capsys, "export", tmp_path / "s", "-o", tmp_path / "e3", "--task-type", "CAUSAL-LM")
    assert code == 2 and "did you mean CAUSAL_LM?" in err


def test_a_residual_init_needs_a_named_reference_adapter_for_preference_training(tiny, captured, tmp_path):
    """TRL's DPOTrainer with ref_model=None computes the reference with the adapter switched off
    (`null_ref_context`: `disable_adapter()`): for a residual export that is W − BA, not the
    pretrained model. The same adapter loaded a second time as `ref_adapter_name` computes W
    (docs/export.md); for an offset export switching the adapter off is already W."""
    ids = torch.tensor([[5, 17, 230, 9, 41, 8]])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"])(input_ids=ids).logits
    residual = export(solve(None, tmp_path / "pissa", model=tiny["llama"], targets="q_proj,v_proj", mode="pissa", rank=4), tmp_path / "r")
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(residual / "base"), residual,
                                           is_trainable=True, adapter_name="policy")
    model.load_adapter(residual, adapter_name="reference")
    with torch.no_grad():
        model.set_adapter("reference")
        reference = model(input_ids=ids).logits
        with model.disable_adapter():
            switched_off = model(input_ids=ids).logits
    assert float((reference - want).norm() / want.norm()) < 1e-5
    assert float((switched_off - want).norm() / want.norm()) > 1e-2  # TRL's default reference is not the pretrained model
    offset = export(solve(captured["llama"], tmp_path / "cnt-s", mode="cnt-s", rank=4), tmp_path / "o")
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"]), offset)
    with torch.no_grad(), model.disable_adapter():
        assert float((model(input_ids=ids).logits - want).norm() / want.norm()) < 1e-6
