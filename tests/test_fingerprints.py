"""The model fingerprint: per-weight sha256 digests hashed together (`sha256-weights:`), equal to
an independent computation, whatever the chunking and the threads; stores written before it
(`sha256:`, one stream) are still verified in their own kind, and never taken for another model's."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import transformers

from cntinit import CntinitError, capture, merge, solve
from cntinit.models import fingerprints
from cntinit.storage import memo
from cntinit.storage.store import Store

from conftest import run


def _weights(model_dir, dtype=torch.float32) -> dict[str, torch.nn.Module]:
    net = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return {name: m for name, m in net.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in name}


def _expected(modules, scheme: str) -> str:
    """The definition, written out: sha256 over `name:(shape)\\n` + float32 bytes of W, per weight
    (joined as `digest\\n` lines and hashed again) or in one stream, in name order."""
    parts = []
    for name in sorted(modules):
        w = modules[name].weight.detach().float().contiguous()
        parts.append(f"{name}:{tuple(w.shape)}\n".encode() + w.numpy().tobytes())
    if scheme == "sha256":
        return "sha256:" + hashlib.sha256(b"".join(parts)).hexdigest()
    lines = "".join(hashlib.sha256(part).hexdigest() + "\n" for part in parts)
    return "sha256-weights:" + hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("chunk_bytes, threads", [(64 * 2**20, 8), (100, 1), (100, 3)])
def test_fingerprint_equals_its_definition_whatever_the_chunks_and_threads(tiny, monkeypatch, chunk_bytes, threads):
    monkeypatch.setattr(fingerprints, "CHUNK_BYTES", chunk_bytes)  # 100 B: one row at a time
    monkeypatch.setattr(memo, "MAX_THREADS", threads)
    modules = _weights(tiny["llama"], torch.bfloat16)  # converted to float32 as hashed
    for scheme in ("sha256-weights", "sha256"):
        assert fingerprints.fingerprint(modules, scheme=scheme) == _expected(modules, scheme)
    assert fingerprints.fingerprint(modules).startswith("sha256-weights:")  # what new stores record
    with torch.no_grad():
        next(iter(modules.values())).weight[3, 1] = float("inf")
    with pytest.raises(CntinitError, match="holds NaN or Inf"):
        fingerprints.fingerprint(modules)


def _as_written_before(store_or_solve, legacy: str) -> None:
    """Make a directory look as an earlier cntinit wrote it: its fingerprint in the one-stream kind."""
    path = store_or_solve / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model"]["fingerprint"] = legacy
    path.write_text(json.dumps(manifest))


def test_stores_written_before_are_verified_in_their_own_kind(tiny, calibration, tmp_path, capsys):
    """An old store still solves (its weights verified in the old kind) and its solve exports; a new
    capture refuses to replace it without --overwrite, and will not merge with it, saying why."""
    store = capture(tiny["llama"], calibration, tmp_path / "old", targets="q_proj,v_proj", max_samples=8)
    legacy = _expected({n: m for n, m in _weights(tiny["llama"]).items() if n.endswith(("q_proj", "v_proj"))}, "sha256")
    _as_written_before(store, legacy)
    solved = solve(store, tmp_path / "solved", mode="cnt-s", rank=2)
    assert Store(store).manifest["model"]["fingerprint"] == legacy
    assert json.loads((solved / "manifest.json").read_text())["model"]["fingerprint"] == legacy
    _as_written_before(store, legacy.replace(legacy[-4:], "0000"))  # an old store of other weights: refused as before
    with pytest.raises(CntinitError, match="differ from the ones captured"):
        solve(store, tmp_path / "other", mode="cnt-s", rank=2)
    _as_written_before(store, legacy)
    capsys.readouterr()
    code, _, err = run(capsys, "capture", tiny["llama"], "--data", calibration, "--targets", "q_proj,v_proj", "--max-samples", "8",
                       "-o", store)
    assert code == 2 and "an earlier cntinit wrote, whose weight fingerprint is of another kind" in err and err.count("\n") == 1, err
    assert Store(store).manifest["model"]["fingerprint"] == legacy  # left as it was
    new = capture(tiny["llama"], calibration, tmp_path / "new", targets="q_proj,v_proj", max_samples=8)
    with pytest.raises(CntinitError, match="captured by different cntinit versions"):
        merge([store, new], tmp_path / "merged")
