"""Models by Hugging Face Hub id: resolved from a Hub-layout cache the test builds (blobs, snapshots
of symbolic links, refs) under the session's HF_HUB_CACHE, offline; the download path with
huggingface_hub's snapshot_download stood in for (no network here)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import errors

from cntinit import capture, export, hub, runner, solve
from cntinit.errors import CntinitError
from cntinit.models.source import locate
from cntinit.storage.store import Store

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(autouse=True)
def own_hub_cache(tmp_path, monkeypatch):
    """Each test its own Hugging Face cache: repositories one test builds are not another's."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))


def cache_repo(model_dir: Path, repo: str, commit: str, ref: str | None = "main", kind: str = "models", skip: tuple = ()) -> Path:
    """Put `model_dir`'s files into the Hugging Face cache as huggingface_hub lays a download out."""
    folder = hub.cache_dir() / f"{kind}--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    for file in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name not in skip):
        blob = folder / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():  # a second download of the same commit adds files beside the first's
            link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def other_weights(tiny, tmp_path):
    """The tiny llama with one weight changed: another commit of the same repository."""
    from safetensors.torch import load_file, save_file
    changed = tmp_path / "changed"
    shutil.copytree(tiny["llama"], changed)
    weights = load_file(changed / "model.safetensors")
    name = next(n for n in weights if n.endswith("v_proj.weight"))
    weights[name] = weights[name] * 2
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    return changed


def test_a_capture_by_id_is_the_capture_of_its_snapshot_and_one_cache_entry(tiny, text_jsonl, tmp_path):
    snapshot = cache_repo(Path(tiny["llama"]), "org/tiny", COMMIT_A)
    by_id, hit = runner.cached_capture("org/tiny", text_jsonl, targets="q_proj,v_proj", cache_dir=tmp_path / "c")
    by_dir, again = runner.cached_capture(snapshot, text_jsonl, targets="q_proj,v_proj", cache_dir=tmp_path / "c")
    assert not hit and again and by_dir == by_id  # the snapshot's directory hits the entry the id made
    model = Store(by_id).manifest["model"]
    assert model["repo"] == "org/tiny" and model["revision"] == COMMIT_A and model["path"] == str(snapshot)
    plain = Store(capture(tiny["llama"], text_jsonl, tmp_path / "plain", targets="q_proj,v_proj"))
    assert plain.manifest["model"]["fingerprint"] == model["fingerprint"] and "repo" not in plain.manifest["model"]
    for key in plain.keys:
        for name, tensor in plain.tensors(key).items():
            assert torch.equal(tensor, Store(by_id).tensors(key)[name]), name


def test_revision_picks_a_branch_tag_or_commit(tiny, other_weights, text_jsonl, tmp_path):
    cache_repo(Path(tiny["llama"]), "org/two", COMMIT_A)
    cache_repo(other_weights, "org/two", COMMIT_B, ref="v2")
    main = Store(capture("org/two", text_jsonl, tmp_path / "main", targets="v_proj"))
    tagged = Store(capture("org/two", text_jsonl, tmp_path / "v2", targets="v_proj", revision="v2"))
    pinned = Store(capture("org/two", text_jsonl, tmp_path / "pinned", targets="v_proj", revision=COMMIT_B))
    assert main.manifest["model"]["revision"] == COMMIT_A and tagged.manifest["model"]["revision"] == COMMIT_B
    assert main.manifest["model"]["fingerprint"] != tagged.manifest["model"]["fingerprint"] == pinned.manifest["model"]["fingerprint"]


@pytest.mark.parametrize("case", ["not cached", "revision", "incomplete", "local with revision"])
def test_what_the_cache_cannot_give_is_one_line_naming_the_fix(tiny, tmp_path, case):
    if case == "not cached":
        with pytest.raises(CntinitError, match=r"^org/absent is neither a local path nor a model in the Hugging Face cache .* "
                                               r"HF_HUB_OFFLINE is set: .*`hf download org/absent`"):
            locate("org/absent")
    elif case == "revision":
        cache_repo(Path(tiny["llama"]), "org/refs", COMMIT_A)
        with pytest.raises(CntinitError, match=r"^org/refs is in the Hugging Face cache, but not at revision v9 \(it has main\): "
                                               r"give one of those with --revision"):
            locate("org/refs", "v9")
    elif case == "incomplete":  # an interrupted download: config and tokenizer, no weights
        cache_repo(Path(tiny["llama"]), "org/partial", COMMIT_A, skip=("model.safetensors",))
        with pytest.raises(CntinitError, match=r"^the cached snapshot of org/partial lacks model.safetensors and HF_HUB_OFFLINE is set"):
            locate("org/partial")
    else:
        with pytest.raises(CntinitError, match=r"^--revision picks a commit of a Hub id, and .* is a local path: leave out --revision"):
            locate(tiny["llama"], "main")


class FakeHub:
    """snapshot_download as the Hub would answer it: files of `source` matching the patterns, cached."""

    def __init__(self, source: Path, fail: Exception | None = None):
        self.source, self.fail, self.calls = source, fail, []

    def __call__(self, repo, *, revision, cache_dir, allow_patterns, ignore_patterns=None, repo_type=None):
        import fnmatch
        self.calls.append({"revision": revision, "allow": list(allow_patterns), "ignore": list(ignore_patterns or [])})
        if self.fail is not None:
            raise self.fail
        picked = Path(cache_dir) / "picked"
        shutil.rmtree(picked, ignore_errors=True)
        for file in self.source.rglob("*"):
            name = file.relative_to(self.source).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns) and \
                    not any(fnmatch.fnmatch(name, p) for p in ignore_patterns or []):
                (picked / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, picked / name)
        return str(cache_repo(picked, repo, COMMIT_A))


def test_online_it_downloads_only_what_a_stage_reads(tiny, tmp_path, monkeypatch):
    """The small files first, then the weights they name: not a *.bin beside them, not a stray checkpoint."""
    import huggingface_hub
    source = tmp_path / "repo"
    shutil.copytree(tiny["llama"], source)
    (source / "pytorch_model.bin").write_bytes(b"pickle")
    (source / "consolidated.safetensors").write_bytes(b"a second copy of the weights, in another layout")
    fake = FakeHub(source)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    path = locate("org/online")
    assert [call["revision"] for call in fake.calls] == ["main", COMMIT_A]
    assert "model.safetensors" in fake.calls[1]["allow"] and not any("*.safetensors" == p or "bin" in p for p in fake.calls[1]["allow"])
    assert (path / "model.safetensors").is_file() and not (path / "pytorch_model.bin").exists()
    assert not (path / "consolidated.safetensors").exists()


def test_a_repository_of_pickled_weights_only_is_refused_after_its_small_files(tiny, tmp_path, monkeypatch):
    import huggingface_hub
    source = tmp_path / "repo"
    shutil.copytree(tiny["llama"], source)
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(source))
    with pytest.raises(CntinitError, match=r"^org/pickled at main has no model.safetensors on the Hub: cntinit reads safetensors only"):
        locate("org/pickled")


def test_a_pipeline_download_takes_each_components_weights_and_no_variants(tmp_path):
    snapshot = tmp_path / "pipe"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                                                           "safety_checker": [None, None], "vae": ["diffusers", "AutoencoderKL"]}))
    assert hub.weight_patterns(snapshot) == ["unet/*.safetensors", "vae/*.safetensors"]
    assert "*.fp16.safetensors" in hub.VARIANTS


@pytest.mark.parametrize("failure, message", [
    (errors.GatedRepoError, r"^org/gated is gated on the Hugging Face Hub: accept its terms .* \(`hf auth login`, or set HF_TOKEN\)"),
    (errors.RepositoryNotFoundError, r"^there is no model org/gated on the Hugging Face Hub, or it is private"),
    (errors.RevisionNotFoundError, r"^org/gated has no revision main: give a branch, tag or commit"),
    (errors.HfHubHTTPError, r"^the Hugging Face Hub refused org/gated \(.*\): try again"),
])
def test_hub_refusals_are_one_line(tmp_path, monkeypatch, failure, message):
    import huggingface_hub
    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/gated"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tmp_path, failure("refused", response=response)))
    with pytest.raises(CntinitError, match=message):
        locate("org/gated")


def test_the_adapter_names_the_hub_id_and_loads_by_it_elsewhere(tiny, text_jsonl, tmp_path):
    """export writes the id and commit as PEFT's base model, so AutoPeftModel loads the base from any
    machine's cache (here: another process, offline), and the adapted output is W + BA."""
    cache_repo(Path(tiny["llama"]), "org/adapted", COMMIT_A)
    stats = capture("org/adapted", text_jsonl, tmp_path / "s", targets="q_proj,v_proj")
    sol = solve(stats, tmp_path / "init", mode="cnt-s", rank=4)
    adapter = export(sol, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/adapted" and config["revision"] == COMMIT_A
    probe = ("import sys, torch; from peft import AutoPeftModelForCausalLM; from cntinit.solve.solution import Solution\n"
             "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); s = Solution(sys.argv[2])\n"
             "name = next(iter(s.modules)); layer = m.get_submodule('base_model.model.' + name)\n"
             "b, a = s.factors()[name]; x = torch.randn(3, a.shape[1])\n"
             "want = x @ (layer.base_layer.weight + layer.scaling['default'] * b @ a).T\n"
             "print(float((layer(x) - want).abs().max() / want.abs().max()))")
    done = subprocess.run([sys.executable, "-c", probe, str(adapter), str(sol)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5


def test_a_solve_by_id_records_it(tiny, tmp_path):
    cache_repo(Path(tiny["llama"]), "org/free", COMMIT_A)
    sol = solve(None, tmp_path / "pissa", mode="pissa", rank=2, model="org/free", targets="v_proj")
    manifest = json.loads((sol / "manifest.json").read_text())
    assert manifest["model"]["repo"] == "org/free" and manifest["model"]["revision"] == COMMIT_A


def test_a_recorded_model_moved_away_is_found_in_this_machines_cache(tiny):
    """A store written on another machine records that machine's snapshot path; here the same commit is in the cache."""
    from cntinit.models.pretrained import recorded_path
    snapshot = cache_repo(Path(tiny["llama"]), "org/moved", COMMIT_A)
    assert recorded_path({"path": "/elsewhere/models--org--moved/snapshots/" + COMMIT_A, "repo": "org/moved", "revision": COMMIT_A}) == snapshot
    assert recorded_path({"path": str(tiny["llama"])}) == Path(tiny["llama"])
