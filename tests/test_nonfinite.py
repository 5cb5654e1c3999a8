"""NaN and Inf are bad input wherever they enter — options, weights, statistics, adapters — and
each gets a one-line error naming where, before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cntinit import CntinitError, Store, export, solve
from cntinit.export import verify
from cntinit.finite import all_finite
from cntinit.storage.store import MANIFEST, file_entry

from conftest import assert_refused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_finds_one_bad_value_anywhere_and_no_false_alarm_on_overflowing_sums(dtype):
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, 4_999, 9_999):
            t = torch.randn(100, 100).to(dtype)
            t.view(-1)[where] = bad
            assert not all_finite(t)
    big = torch.finfo(dtype).max
    assert all_finite(torch.full((64,), big, dtype=dtype))  # its sum overflows to Inf; every value is finite
    assert all_finite(torch.tensor([big, -big], dtype=dtype))
    assert not all_finite(torch.tensor([float("inf"), float("-inf")], dtype=dtype))  # the sum is NaN
    assert all_finite(torch.arange(5))


def test_check_fails_on_a_nan_adapter(captured, tmp_path):
    """A NaN output used to vanish in max() and the check reported 0.0e+00."""
    solve(captured["llama"], tmp_path / "s", mode="cnt-s", rank=2)
    export(tmp_path / "s", tmp_path / "e")
    path = tmp_path / "e" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    with pytest.raises(CntinitError, match="computes NaN or Inf"):
        verify(tmp_path / "e", tmp_path / "s")


@pytest.mark.parametrize("args, message", [
    (["--shift-c", "nan"], "--shift-c must be a positive finite number"),
    (["--shift-c", "inf"], "--shift-c must be a positive finite number"),
    (["--shift-c", "1e308"], "--shift-c must be a positive finite number"),
    (["--bucket-weights", "nan,1,1"], "--bucket-weights are the buckets' shares"),
    (["--bucket-weights", "-1,1,1"], "--bucket-weights are the buckets' shares"),
    (["--bucket-weights", "0,0,0"], "--bucket-weights are the buckets' shares"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cnt_float_options_must_be_finite(args, message, captured, tmp_path, capsys):
    mode = "cnt-sh" if "--shift-c" in args else "cnt-s"
    assert_refused(capsys, ["solve", captured["llama"], "--mode", mode, "--rank", "2", *args], message, tmp_path / "s")


@pytest.mark.parametrize("rho", ["nan", "inf"])
def test_rho_must_be_finite(rho, captured, tmp_path, capsys):
    assert_refused(capsys, ["solve", captured["llama"], "--mode", "eva", "--rank", "2", "--rho", rho], "--rho must be at least 1 and finite",
                   tmp_path / "s")


@pytest.mark.parametrize("alpha, message", [("nan", "--alpha must be a positive finite number"),
                                            ("inf", "--alpha must be a positive finite number"),
                                            ("-1", "--alpha must be a positive finite number"),
                                            ("1e-310", "outside [0.0001, 10000]"), ("1e308", "outside [0.0001, 10000]")])
def test_alpha_must_be_finite_and_in_range(alpha, message, captured, tmp_path, capsys):
    solve(captured["llama"], tmp_path / "s", mode="cnt-s", rank=2)
    capsys.readouterr()
    assert_refused(capsys, ["export", tmp_path / "s", "--alpha", alpha], message, tmp_path / "e")


@pytest.mark.parametrize("option, value", [("--image-mean", "nan,0.5,0.5"), ("--image-std", "0.5,0,0.5"), ("--image-std", "inf,1,1")])
def test_image_normalization_must_be_finite(option, value, tiny, calibration, tmp_path, capsys):
    assert_refused(capsys, ["capture", tiny["llama"], "--data", calibration, option, value], "must be finite", tmp_path / "stats")


@pytest.fixture(params=["nan", "inf"])
def poisoned(request, tiny, tmp_path):
    """The tiny Llama with one NaN (or Inf) in the last layer's down_proj."""
    import transformers

    net = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"])
    with torch.no_grad():
        net.model.layers[1].mlp.down_proj.weight[3, 5] = float(request.param)
    directory = tmp_path / "poisoned"
    net.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (tiny["llama"] / name).exists():
            shutil.copy(tiny["llama"] / name, directory / name)
    return directory


@pytest.mark.parametrize("stage", ["capture", "capture --layerwise", "pissa", "olora", "inilora"])
def test_non_finite_weights_are_named(stage, poisoned, calibration, tmp_path, capsys):
    """NaN in the last layer's down_proj used to pass capture (no later activation check sees it) and
    crash or poison the solve; now every stage that reads the weights names the module."""
    if stage.startswith("capture"):
        args = ["capture", poisoned, "--data", calibration, *stage.split()[1:]]
    else:
        args = ["solve", "--model", poisoned, "--mode", stage, "--rank", "2", *(["--steps", "5"] if stage == "inilora" else [])]
    assert_refused(capsys, args, "the weight of model.layers.1.mlp.down_proj holds NaN or Inf", tmp_path / "out")


def test_non_finite_statistics_are_refused(captured, tmp_path, capsys):
    """A payload with NaN in Σxxᵀ whose checksum was updated to match used to solve to finite garbage."""
    store = tmp_path / "store"
    shutil.copytree(captured["llama"], store)
    manifest = json.loads((store / MANIFEST).read_text())
    key = next(iter(manifest["stats"]))
    name = manifest["stats"][key]["file"]
    tensors = load_file(store / name)
    tensors[f"{key}.xxt"][0, 0] = float("nan")
    save_file(tensors, store / name, metadata={"format": "pt"})
    manifest["files"][name] = file_entry(store / name)
    (store / MANIFEST).write_text(json.dumps(manifest))
    Store(store)  # the checksums agree
    for mode in ("cnt-s", "eva", "corda"):
        assert_refused(capsys, ["solve", store, "--mode", mode, "--rank", "2", "-q"], f"holds NaN or Inf in the statistics of {key}",
                       tmp_path / mode)  # found when the statistics are read, after the loading log: -q leaves the error alone
