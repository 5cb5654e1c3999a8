"""The weight-splitting baselines (pissa, milora, olora, mica) against PEFT's own inits and NumPy."""

import json

import numpy as np
import peft
import pytest
import torch
import transformers

from cntinit.errors import CntinitError
from cntinit.export import export
from cntinit.solve import Options, solve
from conftest import assert_refused, leftovers, run
from test_export import assert_modules_add_exactly_ba, factors, linear_weight, load

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


TARGETS["bert"] = ["query", "intermediate.dense"]


# PEFT 0.21's olora_init ignores fan_in_fan_out: on GPT-2's Conv1D it factors Wᵀ and gives lora_A/B the wrong shapes,
# so OLoRA has no peer there; cntinit factors W (out × in) for every layer type.
@pytest.mark.parametrize("kind,mode,rank", [("llama", "pissa", 4), ("gpt2", "pissa", 3), ("llama", "olora", 3), ("bert", "olora", 4)])
def test_agrees_with_peft_own_init(kind, mode, rank, tiny, tmp_path):
    """Same tiny model, PEFT's init_lora_weights=pissa/olora in-process: same s·BA and the same residual base."""
    solve(None, tmp_path / "s", Options(mode=mode, rank=rank), model=tiny[kind], targets=",".join(TARGETS[kind]))
    export(tmp_path / "s", tmp_path / "e")
    ours = factors(tmp_path / "s")
    base = dict(load(tmp_path / "e" / "base").named_modules())
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS[kind], init_lora_weights=mode,
                             fan_in_fan_out=kind == "gpt2")
    reference = peft.get_peft_model(load(tiny[kind]), config)
    theirs = dict(reference.base_model.model.named_modules())
    assert set(ours) == {n for n, m in theirs.items() if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, (b, a) in ours.items():
        layer = theirs[name]
        peft_update = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double()
        # PEFT factors in float32: its rank-r subspace moves by about ε₃₂·s₁/(s_r − s_r+1) (Davis–Kahan), times s₁ in BA
        s = torch.linalg.svdvals(linear_weight(layer.get_base_layer()) + peft_update)
        float32_error = 4 * torch.finfo(torch.float32).eps * float(s[0]) ** 2 / float(s[rank - 1] - s[rank]) if mode == "pissa" else 0.0
        torch.testing.assert_close(b @ a, peft_update, rtol=1e-5, atol=1e-5 * float(peft_update.abs().max()) + float32_error)  # signs cancel in BA
        torch.testing.assert_close(linear_weight(base[name]), linear_weight(layer.get_base_layer()), rtol=1e-5, atol=1e-6)


def test_olora_scale_differs_from_peft_only_when_alpha_is_not_rank(tiny, tmp_path):
    """PEFT's OLoRA moves s·Q_r R_r (s = α/r) out of W; cntinit moves exactly Q_r R_r for any α (METHODS.md)."""
    solve(None, tmp_path / "s", Options(mode="olora", rank=2), model=tiny["llama"], targets="q_proj")
    reference = peft.get_peft_model(load(tiny["llama"]), peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="olora"))
    for name, (b, a) in factors(tmp_path / "s").items():
        layer = dict(reference.base_model.model.named_modules())[name]
        torch.testing.assert_close(4 * b @ a, layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double(),
                                   rtol=1e-5, atol=1e-6)


def test_milora_takes_the_smallest_triplets(tiny, captured, tmp_path):
    solve(captured["bert"], tmp_path / "s", Options(mode="milora", rank=3, vas=True, min_rank=1))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["init"] == "residual" and manifest["params"]["decompose"] == "svd"
    weights = dict(load(tiny["bert"]).named_modules())
    solved = factors(tmp_path / "s")
    assert len({b.shape[1] for b, _ in solved.values()}) > 1
    for name, (b, a) in solved.items():
        w = linear_weight(weights[name]).numpy()
        u, s, vh = np.linalg.svd(w, full_matrices=False)
        r = b.shape[1]
        np.testing.assert_allclose((b @ a).numpy(), u[:, -r:] * s[-r:] @ vh[-r:], atol=1e-9)
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert all(row["output_change"] is not None for row in report["modules"].values())  # a capture gives out Δ


def test_pissa_residual_export_starts_at_the_pretrained_model(tiny, tmp_path):
    solve(None, tmp_path / "s", Options(mode="pissa", rank=4, vas=True), model=tiny["bert"])
    export(tmp_path / "s", tmp_path / "e", alpha=16, dora=True)
    wrapped = peft.PeftModel.from_pretrained(load(tmp_path / "e" / "base"), tmp_path / "e")
    assert_modules_add_exactly_ba(wrapped, load(tiny["bert"]), factors(tmp_path / "s"), residual=True)


def test_data_free_cli_and_its_errors(tiny, captured, tmp_path, capsys):
    code, out, err = run(capsys, "solve", "--model", tiny["gpt2"], "-m", "pissa", "-r", "2", "-o", tmp_path / "s")
    assert code == 0 and out == f"{tmp_path / 's'}\n" and "pissa · residual init" in err and "–" in err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["capture"] is None and len(manifest["modules"]) == 8
    for args, message in [
        (["-m", "cnt-x", "--model", tiny["gpt2"]], "--mode cnt-x needs activation statistics"),
        (["-m", "pissa"], "give a capture directory, or --model MODEL"),
        (["-m", "pissa", "--model", tiny["gpt2"], "--init", "offset"], "its base must be W − BA: use --init residual"),
        (["-m", "olora", "--model", tiny["gpt2"], "--decompose", "svd"], "--mode olora splits W by qr"),
        ([captured["gpt2"], "-m", "pissa", "--targets", "c_fc,nope"], "--targets nope matched no captured module; available:"),
    ]:
        code, out, err = run(capsys, "solve", *args, "-o", tmp_path / "bad")
        assert code == 2 and out == "" and message in err.strip().split("\n")[-1], err
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []


def spectral_model(source, directory, decay, seed=0):
    """The tiny model at `source` with every linear weight replaced by U diag(decay^i) Vᵀ (random U, V):
    a spectrum with gaps, so low-rank approximations are meaningful."""
    model = load(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[0] < 1000:  # not the vocabulary head
                k, d = module.weight.shape
                u = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64)).Q[:, : min(k, d)]
                v = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64)).Q[:, : min(k, d)]
                s = decay ** torch.arange(min(k, d), dtype=torch.float64)
                module.weight.copy_((u * s) @ v.T)
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def test_mica_takes_the_minor_left_directions_as_peft_does_and_peft_keeps_b_frozen(tiny, tmp_path, capsys):
    """MiCA: A = 0 and B = the left singular vectors of W's r smallest singular values — the definition in float64, and
    PEFT's mica_init on the same weights column for column (up to sign). The export loads in PEFT with B frozen and A
    trainable (init_lora_weights "mica"), the model unchanged, and B is ours, not PEFT's own SVD run again."""
    model = spectral_model(tiny["llama"], tmp_path / "m", decay=0.97)  # distinct singular values that float32 resolves
    targets, rank = ["q_proj", "v_proj", "down_proj"], 4
    solve(None, tmp_path / "s", Options(mode="mica", rank=rank), model=model, targets=",".join(targets))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["init"] == "offset" and manifest["params"]["decompose"] == "svd"
    ours = factors(tmp_path / "s")
    weights = dict(load(model).named_modules())
    reference = peft.get_peft_model(load(model), peft.LoraConfig(r=rank, lora_alpha=8, target_modules=targets, init_lora_weights="mica"))
    theirs = dict(reference.base_model.model.named_modules())
    assert set(ours) == {n for n, m in theirs.items() if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, (b, a) in ours.items():
        assert not a.any() and not theirs[name].lora_A["default"].weight.any()
        u = torch.linalg.svd(linear_weight(weights[name]))[0][:, : min(weights[name].weight.shape)]
        torch.testing.assert_close(b.T @ u[:, -rank:], torch.diag(torch.sign(torch.diagonal(b.T @ u[:, -rank:]))), rtol=0, atol=1e-6)
        peft_b = theirs[name].lora_B["default"].weight.detach().double()  # float32: each vector moves by about ε₃₂·s₁/gap
        torch.testing.assert_close((b.T @ peft_b).abs(), torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-4)
    export(tmp_path / "s", tmp_path / "e", alpha=8)
    assert json.loads((tmp_path / "e" / "adapter_config.json").read_text())["init_lora_weights"] == "mica"
    wrapped = peft.PeftModel.from_pretrained(load(model), tmp_path / "e", is_trainable=True, low_cpu_mem_usage=True)
    adapted = dict(wrapped.base_model.model.named_modules())
    for name, (b, _) in ours.items():
        assert not adapted[name].lora_B["default"].weight.requires_grad and adapted[name].lora_A["default"].weight.requires_grad
        assert torch.equal(adapted[name].lora_B["default"].weight.double(), b)  # no scale folded in: B stays orthonormal
    assert_modules_add_exactly_ba(wrapped, load(model), ours)
    code, _, err = run(capsys, "export", tmp_path / "s", "-o", tmp_path / "checked", "--check")
    assert code == 0 and "every adapted module computes the initial layer" in err, err
    assert_refused(capsys, ["export", tmp_path / "s", "--dora"], "--dora does not combine with --mode mica", tmp_path / "bad")
    for args, message in ((["--init", "residual"], "--mode mica starts with BA = 0, so there is nothing to subtract"),
                          (["--vas"], "--vas does not apply to --mode mica"), (["--decompose", "qr"], "--mode mica splits W by svd")):
        assert_refused(capsys, ["solve", "--model", model, "-m", "mica", *args], message, tmp_path / "bad")


def test_pissa_niter_agrees_with_peft_randomized_pissa(tiny, tmp_path):
    """PEFT's pissa_niter_4 and cntinit's --niter 4 draw different Gaussian test matrices (PEFT uses the global RNG);
    with a spectral gap both land on the exact truncated SVD, which is what they must agree on."""
    model = spectral_model(tiny["llama"], tmp_path / "m", decay=0.2)
    solve(None, tmp_path / "s", Options(mode="pissa", rank=4, niter=4), model=model, targets="q_proj,v_proj")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["params"]["niter"] == 4 and manifest["params"]["seed"] == 0 and manifest["params"]["precision"] == "float32"  # PEFT's
    torch.manual_seed(0)
    reference = peft.get_peft_model(load(model), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights="pissa_niter_4"))
    theirs = dict(reference.base_model.model.named_modules())
    weights = dict(load(model).named_modules())
    for name, (b, a) in factors(tmp_path / "s").items():
        layer = theirs[name]
        peft_update = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double()
        torch.testing.assert_close(b @ a, peft_update, rtol=0, atol=1e-6)
        u, s, vh = torch.linalg.svd(linear_weight(weights[name]))
        torch.testing.assert_close(b @ a, (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-7)


def test_niter_solves_in_float32_unless_told_and_every_exact_split_in_float64():
    """A randomized SVD's own error dwarfs float32's rounding and PEFT computes it in float32: --niter defaults to
    float32; exact splits keep float64; a precision given is kept either way, and a wrong one is refused by name."""
    assert Options(mode="pissa", niter=4).resolved().precision == "float32"
    assert Options(mode="lora-ga", niter=4).resolved().precision == "float32"
    assert Options(mode="pissa").resolved().precision == "float64" and Options(mode="cnt-s").resolved().precision == "float64"
    assert Options(mode="pissa", niter=4, precision="float64").resolved().precision == "float64"
    assert Options(mode="cnt-s", precision="float32").resolved().precision == "float32"
    with pytest.raises(CntinitError, match="--precision float16 is not one of"):
        Options(mode="pissa", niter=4, precision="float16").resolved()


def test_lora_draws_a_as_peft_does_and_export_keeps_it(tiny, tmp_path):
    """B = 0; A ~ U(±1/√d) (PEFT's kaiming_uniform_(a=√5)) or N(0, 1/r²) (gaussian); export does not fold the
    LoRA scale into A, so a trainer starts from the same A as PEFT's own init."""
    targets = ["q_proj", "v_proj", "down_proj"]
    for how, rank in (("kaiming", 8), ("gaussian", 8)):
        solve(None, tmp_path / how, Options(mode="lora", rank=rank, lora_init=how), model=tiny["llama"], targets=",".join(targets))
        torch.manual_seed(0)
        reference = peft.get_peft_model(load(tiny["llama"]), peft.LoraConfig(
            r=rank, target_modules=targets, init_lora_weights=True if how == "kaiming" else "gaussian"))
        theirs = dict(reference.base_model.model.named_modules())
        for name, (b, a) in factors(tmp_path / how).items():
            peft_a = theirs[name].lora_A["default"].weight.detach().double()
            assert not b.any() and a.shape == peft_a.shape
            if how == "kaiming":
                assert a.abs().max() <= a.shape[1] ** -0.5 and peft_a.abs().max() <= a.shape[1] ** -0.5
            assert abs(float(a.std() / peft_a.std()) - 1) < 0.15, (name, float(a.std()), float(peft_a.std()))
            assert abs(float(a.mean())) < 4 * float(a.std()) / a.numel() ** 0.5
    export(tmp_path / "gaussian", tmp_path / "e", alpha=32)  # scale 4
    wrapped = peft.PeftModel.from_pretrained(load(tiny["llama"]), tmp_path / "e")
    adapted = dict(wrapped.base_model.model.named_modules())
    for name, (_, a) in factors(tmp_path / "gaussian").items():
        torch.testing.assert_close(adapted[name].lora_A["default"].weight.detach().double(), a)
    assert_modules_add_exactly_ba(wrapped, load(tiny["llama"]), factors(tmp_path / "gaussian"))


def test_random_draws_follow_the_seed(tiny, tmp_path):
    for seed, out in ((0, "a"), (0, "b"), (1, "c")):
        solve(None, tmp_path / out, Options(mode="lora", rank=2, seed=seed), model=tiny["bert"], targets="query")
    same, other = factors(tmp_path / "a"), factors(tmp_path / "c")
    assert all(torch.equal(same[n][1], factors(tmp_path / "b")[n][1]) for n in same)
    assert not any(torch.equal(same[n][1], other[n][1]) for n in same)


def test_lora_and_pissa_errors(tiny, tmp_path, capsys):
    for args, message in [
        (["-m", "lora", "--vas"], "B = 0 leaves no spectrum"),
        (["-m", "lora", "--lora-init", "xavier"], "--lora-init xavier is not one of kaiming, gaussian"),
        (["-m", "pissa", "--lora-init", "gaussian"], "--lora-init applies to --mode lora"),
        (["-m", "olora", "--niter", "2"], "--niter applies to --mode pissa"),
        (["-m", "pissa", "--niter", "-1"], "--niter must be at least 0"),
        (["-m", "lora", "--decompose", "qr"], "does not split a matrix"),
    ]:
        assert_refused(capsys, ("solve", "--model", tiny["bert"], *args), message, tmp_path / "s")
