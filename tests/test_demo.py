"""The README's main job: the embedded MiniLM over real KJV verses, through the real entry point."""

import subprocess
import sys

from cntinit import Store


def test_demo_captures_the_embedded_model(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cntinit", "demo", "--out", str(tmp_path), "--samples", "48"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'stats'}\n"
    store = Store(tmp_path / "stats")
    m = store.manifest
    assert m["model"]["class"] == "BertModel" and m["data"]["samples"] == 48
    assert len(m["modules"]) == 6 * 6 + 1 and len(store.keys) == 6 * 4 + 1
    assert m["stats"]["pooler.dense"]["count"] == 48  # one row per sequence
    assert m["stats"]["encoder.layer.5.output.dense"]["dim"] == 1536
    assert m["stats"]["encoder.layer.0.attention.self.query"]["count"] == m["data"]["tokens"]
    assert "statistics key" in done.stderr
