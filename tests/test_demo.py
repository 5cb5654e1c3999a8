"""The README's main job: the embedded MiniLM over real KJV verses, through the real entry point."""

import json
import subprocess
import sys

from cntinit import Store


def test_demo_runs_capture_solve_export_and_peft_check(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cntinit", "demo", "--out", str(tmp_path), "--samples", "48"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'adapter'}\n"
    store = Store(tmp_path / "stats")
    m = store.manifest
    assert m["model"]["class"] == "BertModel" and m["data"]["samples"] == 48
    assert len(m["modules"]) == 6 * 6 + 1 and len(store.keys) == 6 * 4 + 1
    assert m["stats"]["pooler.dense"]["count"] == 48  # one row per sequence
    assert m["stats"]["encoder.layer.5.output.dense"]["dim"] == 1536
    assert m["stats"]["encoder.layer.0.attention.self.query"]["count"] == m["data"]["tokens"]
    report = json.loads((tmp_path / "solve-cnt-s-r8" / "report.json").read_text())
    assert report["mode"] == "cnt-s" and report["total_rank"] == 8 * 37
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True and len(config["target_modules"]) == 37
    for text in ("statistics key", "‖BA‖²/‖ΔW‖²", "check: PEFT loads", "cntinit demo", "load with PEFT"):
        assert text in done.stderr, text


def test_demo_keeps_what_it_did_not_write(tmp_path, capsys):
    """`demo -o DIR` used to replace DIR/stats, DIR/solve-… and DIR/adapter whatever they held."""
    from conftest import run

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    for overwrite in ([], ["--overwrite"]):
        code, _, err = run(capsys, "demo", "--out", tmp_path, "--samples", "8", *overwrite)
        assert code == 2 and "adapter is a directory without manifest.json: cntinit replaces only what it wrote" in err
    assert (tmp_path / "adapter" / "notes.txt").read_text() == "mine" and not (tmp_path / "stats").exists()
