"""IniLoRA: the batched Adam fit, its optimum gap, the residual base and the alpha/beta draws."""

import json
import math

import peft
import torch

from cntinit.export import check_peft, export
from cntinit.solve import Options, solve
from cntinit.solve.modes import inilora
from conftest import assert_refused, run
from test_baselines import spectral_model
from test_export import assert_modules_add_exactly_ba, factors, linear_weight, load


def test_one_batched_problem_equals_one_optimizer_per_module():
    """Adam is elementwise and the summed loss separates, so the batch (with its written-out gradient) reproduces
    the authors' per-layer loop: one autograd-traced Adam + StepLR per module."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(3, 24, 16, generator=generator, dtype=torch.float64)
    b, a = inilora.start(24, 16, 4, "inilora", 0.1, [generator] * 3)
    fitted_b, fitted_a, steps = inilora.fit(w, b, a, steps=300)
    assert steps == 300
    for i in range(3):
        alone_b, alone_a = b[i].clone().requires_grad_(True), a[i].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([alone_b, alone_a], lr=5e-4)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, 5000, 0.9)
        for _ in range(300):
            optimizer.zero_grad()
            (alone_b @ alone_a - w[i]).square().mean().backward()
            optimizer.step()
            schedule.step()
        torch.testing.assert_close(fitted_b[i], alone_b.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fitted_a[i], alone_a.detach(), rtol=1e-9, atol=1e-12)


def test_fit_reaches_the_eckart_young_optimum_and_the_base_is_the_residual(tiny, tmp_path):
    """Weights with spectrum 0.8^i: the rank-4 optimum error is 0.8⁴ = 0.41 of ‖W‖ (BA = 0 would be 1.0)."""
    model = spectral_model(tiny["llama"], tmp_path / "m", decay=0.8)
    solve(None, tmp_path / "s", Options(mode="inilora", rank=4), model=model, targets="q_proj,k_proj,down_proj")
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    weights = dict(load(model).named_modules())
    solved = factors(tmp_path / "s")
    for name, (b, a) in solved.items():
        w = linear_weight(weights[name])
        s = torch.linalg.svdvals(w)
        optimum = float(s[4:].square().sum().sqrt() / w.norm())
        fit = float((w - b @ a).norm() / w.norm())
        row = report["modules"][name]
        assert math.isclose(row["optimal_error"], optimum, rel_tol=1e-9) and math.isclose(row["fit_error"], fit, rel_tol=1e-6)
        assert 0.3 < optimum < 0.5 and fit <= 1.1 * optimum, (name, fit / optimum)
        assert 0 < row["steps"] < inilora.MAX_STEPS  # stopped early
    export(tmp_path / "s", tmp_path / "e", alpha=8)
    base = dict(load(tmp_path / "e" / "base").named_modules())
    for name, (b, a) in solved.items():
        torch.testing.assert_close(linear_weight(base[name]) + b @ a, linear_weight(weights[name]), rtol=0, atol=1e-6)
    wrapped = peft.PeftModel.from_pretrained(load(tmp_path / "e" / "base"), tmp_path / "e")
    assert_modules_add_exactly_ba(wrapped, load(model), solved, residual=True)
    assert check_peft(tmp_path / "e", tmp_path / "s") < 1e-5


def test_starting_draws_have_the_stated_distributions(tiny, tmp_path):
    """inilora N(0, σ²) with σ the mean weight std; alpha N(0, 0.5²); beta Kaiming-normal (std √2/√fan_in)."""
    model = load(tiny["llama"])
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    weights = [m.weight.detach().double() for n, m in model.named_modules() if n.split(".")[-1] in targets]
    sigma = float(torch.stack([w.std() for w in weights]).mean())
    expected = {"inilora": (sigma, sigma), "inilora-alpha": (0.5, 0.5), "inilora-beta": (math.sqrt(2 / 8), None)}
    for mode, (b_std, a_std) in expected.items():
        steps = 0 if mode == "inilora" else None  # alpha/beta draw only unless --steps asks for a fit
        solve(None, tmp_path / mode, Options(mode=mode, rank=8, steps=steps), model=tiny["llama"], targets=",".join(targets))
        solved = factors(tmp_path / mode)
        assert json.loads((tmp_path / mode / "manifest.json").read_text())["init"] == "residual"
        all_b = torch.cat([b.flatten() for b, _ in solved.values()])
        assert abs(float(all_b.std()) / b_std - 1) < 0.05 and abs(float(all_b.mean())) < 0.05 * b_std
        for b, a in solved.values():
            want = a_std if a_std is not None else math.sqrt(2 / a.shape[1])  # beta: fan_in of A is d
            assert abs(float(a.std()) / want - 1) < 0.15, (mode, float(a.std()), want)
        assert all(row["steps"] == 0 for row in json.loads((tmp_path / mode / "report.json").read_text())["modules"].values())
    solve(None, tmp_path / "fit", Options(mode="inilora-alpha", rank=8, steps=25), model=tiny["llama"], targets="q_proj")
    report = json.loads((tmp_path / "fit" / "report.json").read_text())
    assert {row["steps"] for row in report["modules"].values()} == {25}


def test_inilora_cli_report_and_errors(tiny, tmp_path, capsys):
    code, out, err = run(capsys, "solve", "--model", tiny["bert"], "-m", "inilora", "-r", "2", "--steps", "30", "-t", "query", "-o", tmp_path / "s")
    assert code == 0 and out == f"{tmp_path / 's'}\n" and "fit ÷ opt" in err and "Adam ran 30 steps" in err
    for args, message in [
        (["-m", "inilora", "--vas"], "--vas does not apply to --mode inilora"),
        (["-m", "inilora-beta", "--init", "offset"], "use --init residual"),
        (["-m", "inilora", "--steps", "-1"], "--steps must be at least 0"),
        (["-m", "pissa", "--steps", "10"], "--steps applies to --mode inilora"),
    ]:
        assert_refused(capsys, ("solve", "--model", tiny["bert"], *args), message, tmp_path / "x")
