"""The learning-rate advice (solve/learning_rate.py): what the benchmarks measured for each init, in the
solve's report, the export's manifest and the lines both print."""

import json
import re
from pathlib import Path

import pytest

from cntinit import export, solve
from cntinit.solve import learning_rate
from conftest import assert_refused, run


@pytest.mark.parametrize("mode,options,key", [("pissa", {}, ("pissa", "residual")), ("lora", {}, ("lora", "offset")),
                                              ("cnt-s", {"init": "residual"}, ("cnt-s", "residual")),
                                              ("cnt-sh", {"out_delta": 0.01}, ("cnt-sh", "out-delta"))])
def test_solve_reports_the_measured_range_and_export_records_it_as_rates(mode, options, key, captured, tmp_path, capsys):
    found = learning_rate.MEASURED[key]
    solved = solve(captured["llama"], tmp_path / "s", mode=mode, rank=2, **options)
    assert json.loads((solved / "report.json").read_text())["lr_advice"] == {"low": found.low, "high": found.high, "settings": found.settings}
    out = export(solved, tmp_path / "e", lora_lr=2e-4)
    record = json.loads((out / "manifest.json").read_text())["learning_rate"]
    assert record["lora_lr"] == 2e-4 and record["rates"] == pytest.approx([found.low * 2e-4, found.high * 2e-4], rel=1e-12)
    err = capsys.readouterr().err.replace("\n", " ")
    assert "learning rate: " in err and "for plain LoRA's 0.0002, as measured (" in err


def test_cli_prints_the_rates_and_the_inits_never_swept_get_no_advice(captured, tmp_path, capsys):
    code, out, err = run(capsys, "solve", captured["llama"], "-m", "pissa", "-r", "2", "--lr", "2e-3", "--json", "-o", tmp_path / "p")
    report = json.loads(out)
    assert code == 0 and report["lr_range"] == pytest.approx([2e-4, 2e-3 / 3]) and "learning rate: 0.1–0.33 × plain LoRA's best = " \
        "0.0002–0.00067 for plain LoRA's 0.002, as measured (SmolLM2-135M" in err
    code, out, err = run(capsys, "solve", captured["llama"], "-m", "cnt-x", "-r", "2", "--lr", "2e-3", "--json", "-o", tmp_path / "x")
    assert code == 0 and json.loads(out)["lr_advice"] is None and "lr_range" not in json.loads(out)
    assert "learning rate: no advice for cnt-x (offset): its offset form moved the model too far to train at any rate" in err
    code, out, err = run(capsys, "solve", captured["llama"], "-m", "cnt-x", "-r", "2", "--out-delta", "1e-4", "-o", tmp_path / "xd")
    assert code == 0 and "learning rate: no advice for cnt-x (out-delta): with --out-delta 1e-4 it ended far behind plain LoRA" in err
    code, out, err = run(capsys, "solve", captured["llama"], "-m", "inilora-alpha", "-r", "2", "-o", tmp_path / "ia")
    assert code == 0 and "learning rate: no advice for inilora-alpha (residual): not measured in the benchmarks" in err


@pytest.mark.parametrize("value", ["nan", "0", "-1e-4", "2"])
def test_a_bad_lora_rate_is_refused(value, captured, tmp_path, capsys):
    message = "--lr is the learning rate you would give plain LoRA (e.g. 2e-4), a positive finite number up to 1"
    assert_refused(capsys, ["solve", captured["llama"], "-m", "pissa", "-r", "2", "--lr", value], message, tmp_path / "s")
    solved = solve(captured["llama"], tmp_path / "ok", mode="pissa", rank=2)
    capsys.readouterr()  # the solve's own lines
    assert_refused(capsys, ["export", solved, "--lr", value], message, tmp_path / "e")


def test_the_advice_is_the_range_benchmarks_results_md_lists_for_each_init():
    """learning_rate.MEASURED and RESULTS.md's advice table say the same: one row per measured init, its range."""
    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md").read_text()
    table = text.split("| init | best rate over LoRA's best, per setting | advice |\n")[1].split("\n\n")[0].splitlines()[1:]
    advice = {cells[0]: cells[2] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table)}
    for (mode, form), found in learning_rate.MEASURED.items():
        if mode == "lora":
            continue  # 1 × by definition
        rows = [label for label in advice if mode in re.split(r"[ ,()`]+", label)
                and ("--out-delta" in label if form == "out-delta" else ("residual" in label) == mode.startswith("cnt"))]
        share = f"{found.low:.2g}" if found.low == found.high else f"{found.low:.2g}–{found.high:.2g}"
        assert len(rows) == 1 and advice[rows[0]] == f"{share} ×", (mode, form, rows, share)
    assert len(advice) == len(learning_rate.MEASURED) - 2  # lora has no row; milora and lora-one share one
