"""4-bit bases for QLoRA trainers: NF4 against bitsandbytes bit for bit, LoftQ against PEFT's loop,
and exported bases that a 4-bit loader quantizes back to exactly what the adapter was fitted to."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
import transformers
from peft.utils.loftq_utils import _low_rank_decomposition

from cntinit import solve
from cntinit.solve import quant
from cntinit.solve.solution import Solution

from conftest import assert_refused, run

TARGETS = "q_proj,v_proj,down_proj"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (576, 192), (3, 7), (65, 3)])
def test_nf4_codes_and_maxima_equal_bitsandbytes(shape, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quant.quantize(w)
    assert torch.equal(quant.pack(ours.codes), packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(quant.unpack(quant.pack(ours.codes), ours.codes.numel()), ours.codes)
    if shape[-1] % 64 == 0:  # bitsandbytes' CPU kernel reads blocks within rows (model widths are multiples of 64); its CUDA and reference ones do not
        assert torch.equal(quant.dequantize(ours).to(dtype), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_base_written_in_its_dtype_quantizes_back_to_the_same_codes(dtype):
    """bitsandbytes' Params4bit (what load_in_4bit builds) on the written base: the same codes, the
    same block maxima (rounded to the dtype by construction), so its dequantized weight is ours."""
    torch.manual_seed(1)
    residual = torch.randn(128, 192, dtype=torch.float64) * 0.03
    base = quant.base(residual, dtype)
    written = quant.dequantize(base).to(dtype)
    loaded = bnb.nn.Params4bit(written, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
    assert torch.equal(loaded.data.reshape(-1), quant.pack(base.codes)) and torch.equal(loaded.quant_state.absmax, base.absmax)
    assert torch.equal(bnb_functional.dequantize_4bit(loaded.data, loaded.quant_state).float(), quant.dequantize(base).to(dtype).float())
    assert torch.equal(base.codes, quant.quantize(residual).codes)  # bitsandbytes' codes of the float matrix itself


def _peft_loftq(weight: torch.Tensor, rank: int, iterations: int):
    """PEFT's `loftq_init` loop with its own quantizer call (bitsandbytes Params4bit, on the CPU here:
    PEFT moves it to CUDA) and its own `_low_rank_decomposition`: (dequantized Q, lora_A, lora_B)."""
    weight = weight.float()
    res = weight.clone()
    for i in range(iterations):
        q = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        dequantized = bnb_functional.dequantize_4bit(q.data, q.quant_state)
        res = weight - dequantized
        out = _low_rank_decomposition(res, reduced_rank=rank)
        if i + 1 == iterations:
            break
        res = weight - out["L"] @ out["R"]
    return dequantized, out["R"], out["L"]


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_equals_peft_loop(iterations, tiny, tmp_path):
    """Targets whose rows are whole blocks (in_features 64): bitsandbytes' CPU dequantizer needs that."""
    solved = Solution(solve(None, tmp_path / "loftq", model=tiny["llama"], targets="q_proj,v_proj,up_proj", mode="loftq", rank=4,
                            loftq_iter=iterations))
    net = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"])
    bases = solved.quantized_bases()
    for name, (b, a) in solved.factors().items():
        q, lora_a, lora_b = _peft_loftq(net.get_submodule(name).weight.detach(), 4, iterations)
        ours = quant.dequantize(bases[name])
        # later rounds quantize W − BA, float64 here and float32 in PEFT: block maxima differ in the last bit, a code may sit on a tie
        changed = float((~torch.isclose(ours, q, rtol=0 if iterations == 1 else 1e-6, atol=0)).float().mean())
        assert changed == 0 if iterations == 1 else changed < 2e-3, (name, changed)
        update, theirs = b.double() @ a.double(), lora_b.double() @ lora_a.double()
        assert float((update - theirs).norm() / theirs.norm()) < (1e-5 if iterations == 1 else 2e-2), name
        row = solved.report["modules"][name]
        w = net.get_submodule(name).weight.detach().double()
        assert row["quant_error"] == pytest.approx(float((w - ours.double() - update).norm() / w.norm()), rel=1e-6)
        assert row["quant_error"] < row["qlora_error"]  # the point of LoftQ


def test_quantized_residual_export_loads_in_4bit_and_starts_at_q_plus_ba(tiny, tmp_path, capsys):
    """pissa --quantize nf4 (QPiSSA): transformers' load_in_4bit on the exported base (CPU) holds the
    solve's codes and maxima; export --check re-quantizes with bitsandbytes and checks PEFT's adapter."""
    solved = solve(None, tmp_path / "qpissa", model=tiny["llama"], targets=TARGETS, mode="pissa", rank=4, quantize="nf4")
    code, _, err = run(capsys, "export", solved, "-o", tmp_path / "x", "--check")
    assert code == 0 and "bitsandbytes quantizes the base to the solve's NF4 codes" in err and "load_in_4bit" in err, err
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "base", quantization_config=config, device_map="cpu")
    sol = Solution(solved)
    bases = sol.quantized_bases()
    for name, base in bases.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit)
        assert torch.equal(layer.weight.data.reshape(-1), quant.pack(base.codes)) and torch.equal(layer.weight.quant_state.absmax, base.absmax)
    code, _, err = run(capsys, "solve", "--model", tiny["llama"], "--targets", "v_proj", "--mode", "loftq", "--rank", "4",
                       "-o", tmp_path / "table")
    rows = Solution(tmp_path / "table").report["modules"]
    assert code == 0 and "W−Q−BA" in err and "plain QLoRA's" in err
    assert all(f"{row['quant_error']:.4f}" in err and f"{row['qlora_error']:.4f}" in err for row in rows.values())


def test_quantize_refusals(tiny, tmp_path, capsys):
    base = ["solve", "--model", tiny["llama"], "--targets", "v_proj", "--rank", "4"]
    assert_refused(capsys, [*base, "--mode", "pissa", "--quantize", "int3"], "--quantize int3 is not one of nf4", tmp_path / "a")
    assert_refused(capsys, [*base, "--mode", "lora", "--quantize", "nf4"], "BA = 0 leaves the base W", tmp_path / "b")
    assert_refused(capsys, [*base, "--mode", "loftq", "--bits", "8"], "use --bits 4", tmp_path / "c")
    assert_refused(capsys, [*base, "--mode", "loftq", "--bits", "0"], "--bits 0: LoftQ here quantizes to 4-bit NF4", tmp_path / "c")
    assert_refused(capsys, [*base, "--mode", "loftq", "--loftq-iter", "0"], "--loftq-iter must be from 1 to 1000", tmp_path / "c")  # 0 was 1
    assert_refused(capsys, [*base, "--mode", "pissa", "--loftq-iter", "2"], "--loftq-iter applies to --mode loftq", tmp_path / "d")
    assert_refused(capsys, [*base, "--mode", "loftq", "--init", "offset"], "use --init residual", tmp_path / "e")
    solved = solve(None, tmp_path / "loftq", model=tiny["llama"], targets="v_proj", mode="loftq", rank=4)
    capsys.readouterr()
    assert_refused(capsys, ["export", solved, "--format", "kohya"], "use --format peft", tmp_path / "f")


def test_check_without_bitsandbytes_names_the_extra(tiny, tmp_path, capsys, monkeypatch):
    """Solving and exporting a 4-bit base need no bitsandbytes (NF4 is computed here); --check, which
    re-quantizes the base with the trainer's quantizer, says how to get it."""
    solved = solve(None, tmp_path / "loftq", model=tiny["llama"], targets="v_proj", mode="loftq", rank=4)
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    code, _, err = run(capsys, "export", solved, "-o", tmp_path / "plain")
    assert code == 0 and (tmp_path / "plain" / "base").is_dir(), err
    assert_refused(capsys, ["export", solved, "--check", "-q"], "pip install 'cntinit[quant]'", tmp_path / "checked")


def test_a_recipe_solves_and_exports_4bit_bases(tiny, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": str(tiny["llama"]), "targets": "q_proj,v_proj", "out": str(tmp_path / "out"),
        "solves": [{"mode": "loftq", "rank": 4, "loftq_iter": 2}, {"name": "qpissa", "mode": "pissa", "rank": 4, "quantize": "nf4"}],
        "exports": [{"format": "peft", "check": True}]}))
    monkeypatch.setenv("CNTINIT_CACHE", str(tmp_path / "cache"))
    code, stdout, err = run(capsys, "run", recipe, "--json", "-q")
    assert code == 0, err
    stages = {row["name"]: row for row in json.loads(stdout)["stages"]}
    assert stages["loftq-r4/peft"]["check"] < 1e-5 and stages["qpissa/peft"]["check"] < 1e-5
    assert json.loads((Path(stages["loftq-r4"]["path"]) / "manifest.json").read_text())["params"]["loftq_iter"] == 2
