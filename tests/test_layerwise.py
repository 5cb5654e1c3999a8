"""`capture --layerwise` (one block at a time) writes the store the normal capture writes: the same
manifest records and statistics, for every model kind and capture option, resumed after a kill,
and under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from cntinit import capture, embedded, merge, runner
from cntinit.capture import blocks
from cntinit.errors import CntinitError
from cntinit.models import named_weights
from cntinit.storage import block_checkpoint, checkpoint
from cntinit.storage.store import Store

from conftest import assert_refused, run
from imaging import build_sd, build_vit, write_images

SECTIONS = ("model", "data", "capture", "modules")


def assert_same_store(normal: Path, blockwise: Path, tolerance: float = 1e-6) -> None:
    """Equal manifest records (payload file layout aside) and statistics within `tolerance` (relative Frobenius)."""
    a, b = Store(normal), Store(blockwise)
    for section in SECTIONS:
        theirs = {k: v for k, v in b.manifest[section].items() if k != "merged_from"}  # a merge also names its inputs
        assert a.manifest[section] == theirs, section
    strip = lambda stats: {key: {k: v for k, v in entry.items() if k != "file"} for key, entry in stats.items()}  # noqa: E731
    assert strip(a.manifest["stats"]) == strip(b.manifest["stats"])
    for key in a.keys:
        x, y = a.tensors(key), b.tensors(key)
        assert x.keys() == y.keys(), key
        for name in x:
            scale = float(x[name].double().norm()) or 1.0
            assert float((x[name].double() - y[name].double()).norm()) <= tolerance * scale, (key, name)


def both(model, data, tmp_path, **options) -> tuple[Path, Path]:
    return (capture(model, data, tmp_path / "normal", **options),
            capture(model, data, tmp_path / "layerwise", layerwise=True, **options))


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_tiny_models_every_target(tiny, calibration, tmp_path, kind):
    """Llama, BERT (its pooler runs after the blocks) and GPT-2 (Conv1D), all-linear."""
    assert_same_store(*both(tiny[kind], calibration, tmp_path, seq_len=32, batch_size=8))


def test_a_target_before_the_blocks(tmp_path, calibration):
    """ELECTRA projects its embeddings to the hidden size with a linear layer before the blocks."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded.model_dir())
    config = transformers.ElectraConfig(vocab_size=tokenizer.vocab_size, embedding_size=32, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, architectures=["ElectraModel"])
    torch.manual_seed(0)
    transformers.ElectraModel(config).save_pretrained(tmp_path / "electra")
    tokenizer.save_pretrained(tmp_path / "electra")
    normal, blockwise = both(tmp_path / "electra", calibration, tmp_path, seq_len=32, batch_size=8)
    assert_same_store(normal, blockwise)
    assert "embeddings_project" in Store(blockwise).manifest["modules"]


def test_smollm2_real_weights(smollm2, tmp_path):
    """Real bfloat16 weights (rounded through the checkpoint's dtype, run in float32 on CPU), all-linear."""
    assert_same_store(*both(smollm2, embedded.data_file(), tmp_path, max_samples=24, seq_len=48, batch_size=8))


def test_embedded_minilm_real_weights(tmp_path):
    """all-MiniLM-L6-v2 as installed: real weights, and its pooler after the blocks."""
    normal, blockwise = both(embedded.model_dir(), embedded.data_file(), tmp_path, max_samples=32, seq_len=64, batch_size=8)
    assert_same_store(normal, blockwise)
    assert "pooler.dense" in Store(blockwise).manifest["modules"]


def test_smollm2_tied_output_layer_after_the_blocks(smollm2, tmp_path):
    """lm_head shares the embeddings' weight (stored once) and runs after the last block."""
    normal, blockwise = both(smollm2, embedded.data_file(), tmp_path, targets="q_proj,lm_head", max_samples=12, seq_len=32)
    assert_same_store(normal, blockwise)
    assert "lm_head" in Store(blockwise).manifest["modules"]


def test_vision_transformer(tmp_path):
    vit, images = build_vit(tmp_path / "vit"), write_images(tmp_path / "images", count=6)
    assert_same_store(*both(vit, images, tmp_path, batch_size=4))


@pytest.mark.parametrize("options", [dict(buckets=3, pack=True), dict(sample_max_norm=True, batch_size=5),
                                     dict(stats_device="cpu", activations_device="cpu", accumulate="float64")],
                         ids=["buckets-pack", "sample-max-norm", "cpu-placement"])
def test_capture_options(tiny, calibration, tmp_path, options):
    options = dict(seq_len=24, batch_size=6, targets="q_proj,v_proj,down_proj") | options
    normal = capture(tiny["llama"], calibration, tmp_path / "normal", **{k: v for k, v in options.items() if k != "activations_device"})
    blockwise = capture(tiny["llama"], calibration, tmp_path / "layerwise", layerwise=True, **options)
    assert_same_store(normal, blockwise)


def test_only_the_blocks_up_to_the_last_target_run(deep_llama, calibration, tmp_path, monkeypatch):
    """Targets in blocks 1 and 2 of 6: blocks 3–5 are never read; block 0 runs for its outputs."""
    loaded = []
    original = named_weights.materialize
    monkeypatch.setattr(named_weights, "materialize", lambda *a, **k: loaded.append(a[-1]) or original(*a, **k))
    targets = r"re:model\.layers\.[12]\.self_attn\.(q|v)_proj"
    blockwise = capture(deep_llama, calibration, tmp_path / "layerwise", targets=targets, seq_len=24, layerwise=True)
    assert loaded == ["outside the blocks", "block 0 of layers", "block 1 of layers", "block 2 of layers"]
    assert_same_store(capture(deep_llama, calibration, tmp_path / "normal", targets=targets, seq_len=24), blockwise)


def test_shards_merge_to_the_normal_capture(tiny, calibration, tmp_path):
    options = dict(seq_len=24, batch_size=4, buckets=2)
    shards = [capture(tiny["bert"], calibration, tmp_path / f"shard-{i}", layerwise=True, shard=f"{i}/2", **options) for i in range(2)]
    merged = merge(shards, tmp_path / "merged")
    assert_same_store(capture(tiny["bert"], calibration, tmp_path / "whole", **options), merged, tolerance=1e-5)


def test_the_cache_serves_both(tiny, calibration, tmp_path):
    """--layerwise changes how, not what: a layerwise capture is a hit on the normal one's entry."""
    options = dict(targets="q_proj", seq_len=24, cache_dir=tmp_path / "cache")
    first, hit = runner.cached_capture(tiny["llama"], calibration, **options)
    second, again = runner.cached_capture(tiny["llama"], calibration, layerwise=True, **options)
    assert not hit and again and first == second


SLOW_BLOCKS = """
import importlib, sys, time
named_weights = importlib.import_module("cntinit.models.named_weights")
original = named_weights.materialize
def slow(*args, **kwargs):
    time.sleep(0.4)
    return original(*args, **kwargs)
named_weights.materialize = slow
from cntinit import cli
cli.main(sys.argv[1:])
"""


@pytest.fixture()
def deep_llama(tmp_path_factory):
    """A tiny Llama of 6 blocks, so that a run can be stopped between checkpoints."""
    from conftest import CONFIGS

    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded.model_dir())
    config = CONFIGS["llama"](tokenizer.vocab_size)
    config.num_hidden_layers = 6
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("deep")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_killed_layerwise_capture_resumes_at_its_block(deep_llama, calibration, tmp_path, capsys):
    args = ["capture", deep_llama, "--data", calibration, "--seq-len", "24", "--batch-size", "8", "--buckets", "2",
            "--layerwise", "--checkpoint-every", "1"]
    out = tmp_path / "stats"
    script = tmp_path / "slow.py"
    script.write_text(SLOW_BLOCKS)
    job = subprocess.Popen([sys.executable, str(script), *map(str, args), "-o", str(out)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    saved = checkpoint.location(out)
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        try:
            if json.loads((saved / checkpoint.STATE).read_text())["block"] >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    state = json.loads((saved / checkpoint.STATE).read_text())
    assert 2 <= state["block"] < 6 and not out.exists()
    code, _, err = run(capsys, *args, "-o", out)
    assert code == 0 and f"resuming from the checkpoint at {saved}: {state['block']} of 6 blocks done" in err, err
    assert not saved.exists()
    assert_same_store(capture(deep_llama, calibration, tmp_path / "whole", seq_len=24, batch_size=8, buckets=2), out)


def test_sigint_stops_after_the_block_with_a_checkpoint(deep_llama, calibration, tmp_path, capsys, monkeypatch):
    args = ["capture", deep_llama, "--data", calibration, "--seq-len", "24", "--targets", "q_proj,o_proj", "--layerwise",
            "--checkpoint-every", "4"]
    out = tmp_path / "stats"
    original, loads = named_weights.materialize, []

    def interrupt_in_block_2(*a, **k):
        loads.append(1)
        if len(loads) == 4:  # outside the blocks, block 0, block 1, block 2
            os.kill(os.getpid(), signal.SIGINT)
        return original(*a, **k)

    monkeypatch.setattr(named_weights, "materialize", interrupt_in_block_2)
    code, _, err = run(capsys, *args, "-o", out)
    assert code == 130 and "stopped by SIGINT after block 3 of 6" in err, err
    assert json.loads((checkpoint.location(out) / checkpoint.STATE).read_text())["block"] == 3  # saved there, not at 4
    monkeypatch.undo()
    assert run(capsys, *args, "-o", out)[0] == 0
    assert_same_store(capture(deep_llama, calibration, tmp_path / "whole", seq_len=24, targets="q_proj,o_proj"), out)


def test_a_damaged_checkpoint_starts_again_or_is_refused(deep_llama, calibration, tmp_path, capsys, monkeypatch):
    """A last hidden-state file that cannot be read: resume from the save before it, whose file the
    checkpoint keeps (a warning); neither readable: start from the beginning. One that reads but
    does not fit the batches, or a finished block's payload that changed or went while the capture
    was stopped: refused, naming the checkpoint to delete — never a store of wrong sums."""
    args = ["capture", deep_llama, "--data", calibration, "--seq-len", "24", "--targets", "q_proj,o_proj", "--layerwise",
            "--checkpoint-every", "1"]
    out, saved, kept = tmp_path / "stats", checkpoint.location(tmp_path / "stats"), tmp_path / "kept"
    original, loads = named_weights.materialize, []

    def interrupt_in_block_3(*a, **k):
        loads.append(1)
        if len(loads) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*a, **k)

    monkeypatch.setattr(named_weights, "materialize", interrupt_in_block_3)
    assert run(capsys, *args, "-o", out)[0] == 130
    monkeypatch.undo()
    hidden, before, payload = (saved / block_checkpoint.HIDDEN.format(4), saved / block_checkpoint.HIDDEN.format(3),
                               saved / "stats-00002.safetensors")
    assert hidden.is_file() and before.is_file() and payload.is_file()
    assert sorted(p.name for p in saved.glob("hidden-*")) == [before.name, hidden.name]  # the last two saves
    shutil.copytree(saved, kept)

    def damage(path: Path, change) -> tuple[int, str]:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(kept, saved)
        change(path)
        return run(capsys, *args, "-o", out)[::2]

    code, err = damage(payload, lambda p: p.write_bytes(p.read_bytes()[:-4] + b"\0\0\0\1"))
    assert code == 2 and f"{payload} changed after the checkpoint saved it (a disk fault, or another process): delete {saved}" in err, err
    code, err = damage(payload, Path.unlink)
    assert code == 2 and f"{payload} cannot be read (No such file or directory): delete {saved}" in err, err
    code, err = damage(hidden, lambda p: save_file({"0": torch.zeros(2, 3)}, p))
    assert code == 2 and f"the checkpoint at {saved} does not fit this capture's batches (its tensor '0'): delete it" in err, err
    assert not out.exists()
    whole = capture(deep_llama, calibration, tmp_path / "whole", seq_len=24, targets="q_proj,o_proj")
    truncate = lambda p: p.write_bytes(p.read_bytes()[:100])  # noqa: E731
    code, err = damage(hidden, truncate)
    assert code == 0 and (f"the checkpoint at {saved} is damaged ({hidden.name} cannot be read): resuming from the save before it, at "
                          "block 3") in err and "3 of 6 blocks done" in err, err
    assert_same_store(whole, out)
    code, err = damage(hidden, lambda p: [truncate(p), truncate(before)])
    assert code == 0 and f"the checkpoint at {saved} is damaged ({hidden.name} cannot be read): starting from the beginning" in err, err
    assert_same_store(whole, out)


def test_a_checkpoint_keeps_its_last_two_saves(tmp_path, capsys):
    """The state names the last save and the one before, whose files stay (older ones go); a
    resume takes the last, the one before when the last file cannot be read, and says why it takes
    none of another capture's checkpoint or of one whose state cannot be read."""
    from types import SimpleNamespace

    from cntinit import distributed
    from cntinit.storage import store

    saved, world = tmp_path / "saved", distributed.World()
    payloads, written = store.Payloads(tmp_path), SimpleNamespace(stats={}, modules={})
    for block in (1, 2, 3):
        block_checkpoint.save(saved, "id", "up", block, {"0": torch.full((2, 3), float(block))}, payloads, written, world)
    assert sorted(p.name for p in saved.glob("hidden-*")) == ["hidden-2.safetensors", "hidden-3.safetensors"]
    assert float(block_checkpoint.resume(saved, "id", world)["tensors"]["0"][0, 0]) == 3
    (saved / "hidden-3.safetensors").write_bytes(b"\0" * 10)
    resumed = block_checkpoint.resume(saved, "id", world)
    assert (resumed["block"], float(resumed["tensors"]["0"][0, 0])) == (2, 2)
    assert "damaged (hidden-3.safetensors cannot be read): resuming from the save before it, at block 2" in capsys.readouterr().err
    assert json.loads((saved / checkpoint.STATE).read_text())["block"] == 2  # the abandoned save is forgotten
    assert block_checkpoint.resume(saved, "another", world) is None
    assert "is from a capture with other arguments or data: starting from the beginning" in capsys.readouterr().err
    (saved / checkpoint.STATE).write_text("{not json")
    assert block_checkpoint.resume(saved, "id", world) is None
    assert f"the checkpoint at {saved} is damaged (state.json cannot be read): starting from the beginning" in capsys.readouterr().err


def test_gradients_checkpoint_on_the_way_down_and_resume_there(deep_llama, calibration, tmp_path, capsys, monkeypatch):
    """--gradients --layerwise --checkpoint-every: the way up saves nothing (a stop there says so and
    leaves an older checkpoint be); the way down saves every N blocks and on a stop; a resumed run
    goes up again to its block and ends with the uninterrupted run's store, bit for bit."""
    args = ["capture", deep_llama, "--data", calibration, "--seq-len", "24", "--targets", "q_proj,o_proj", "--gradients",
            "--layerwise", "--checkpoint-every", "2"]
    out, saved = tmp_path / "stats", checkpoint.location(tmp_path / "stats")
    materialize, save, saves = named_weights.materialize, block_checkpoint.save, []

    def interrupt_at(load: int) -> None:  # loads: outside the blocks, blocks 0 to 5 up, then 5 to 0 down
        loads = []

        def counting(*a, **k):
            loads.append(1)
            if len(loads) == load:
                os.kill(os.getpid(), signal.SIGINT)
            return materialize(*a, **k)
        monkeypatch.setattr(named_weights, "materialize", counting)

    monkeypatch.setattr(block_checkpoint, "save", lambda *a, **k: saves.append(a[2:4]) or save(*a, **k))
    interrupt_at(3)
    code, _, err = run(capsys, *args, "-o", out)
    assert code == 130 and "on the way up, after block 2 of 6; checkpoints begin on the way down, so none was made" in err, err
    assert saves == [] and not (saved / checkpoint.STATE).exists()
    interrupt_at(10)  # block 3 on the way down
    code, _, err = run(capsys, *args, "-o", out)
    assert code == 130 and "stopped by SIGINT on the way down, after block 3;" in err, err
    assert saves == [("down", 3), ("down", 2)]  # every 2 blocks (5 and 4 done), then at the stop
    state = json.loads((saved / checkpoint.STATE).read_text())
    assert (state["way"], state["block"]) == ("down", 2) and set(state["gradients"]) == {"batches", "tokens", "loss"}
    interrupt_at(3)  # block 1 on the way up again
    code, _, err = run(capsys, *args, "-o", out)
    assert code == 130 and "after block 2 of 2; the checkpoint at" in err and "still keeps the way down's blocks" in err, err
    assert json.loads((saved / checkpoint.STATE).read_text()) == state
    monkeypatch.undo()
    code, _, err = run(capsys, *args, "-o", out)
    assert code == 0 and "3 of 6 blocks done on the way down; the way up runs again to block 2" in err, err
    assert not saved.exists()
    whole = capture(deep_llama, calibration, tmp_path / "whole", seq_len=24, targets="q_proj,o_proj", gradients=True, layerwise=True)
    assert_same_store(whole, out, tolerance=0)
    resumed, whole = Store(out), Store(whole)
    assert resumed.manifest["gradients"] == whole.manifest["gradients"]
    for name in whole.manifest["modules"]:
        assert torch.equal(resumed.gradient(name), whole.gradient(name)), name


def test_torchrun_layerwise_equals_one_process(tiny, calibration, tmp_path):
    options = ["--targets", "q_proj,v_proj,down_proj", "--seq-len", "32", "--batch-size", "8", "--buckets", "2"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cntinit", "capture", str(tiny["llama"]), "--data", str(calibration), *options, "--layerwise",
                           "--out", str(tmp_path / "two")], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = capture(tiny["llama"], calibration, tmp_path / "one", targets="q_proj,v_proj,down_proj", seq_len=32, batch_size=8, buckets=2)
    assert_same_store(one, tmp_path / "two", tolerance=1e-5)  # float32 sums added in another order


def test_torchrun_layerwise_gradients_equal_one_process(tiny, calibration, tmp_path):
    """--gradients --layerwise under torchrun: each block's gradient sums are added across the
    processes with its statistics, the loss counters at the end; each process checkpoints on the
    way down, and the checkpoints go when the store is written."""
    options = ["--targets", "q_proj,down_proj", "--seq-len", "32", "--batch-size", "8", "--gradients", "--layerwise"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cntinit", "capture", str(tiny["llama"]), "--data", str(calibration), *options,
                           "--checkpoint-every", "1", "--out", str(tmp_path / "two")], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob(".two.checkpoint*"))
    one = capture(tiny["llama"], calibration, tmp_path / "one", targets="q_proj,down_proj", seq_len=32, batch_size=8, gradients=True,
                  layerwise=True)
    assert_same_store(one, tmp_path / "two", tolerance=1e-5)  # the statistics do not depend on how the batches were formed
    shards = [capture(tiny["llama"], calibration, tmp_path / f"shard{i}", targets="q_proj,down_proj", seq_len=32, batch_size=8,
                      gradients=True, layerwise=True, shard=f"{i}/2") for i in range(2)]
    merged, two = Store(merge(shards, tmp_path / "merged")), Store(tmp_path / "two")  # the ranks' batches are the shards'
    assert two.manifest["gradients"] == merged.manifest["gradients"] | {"mean_loss": two.manifest["gradients"]["mean_loss"]}
    assert two.manifest["gradients"]["mean_loss"] == pytest.approx(merged.manifest["gradients"]["mean_loss"], rel=1e-6)
    for name in merged.manifest["modules"]:
        want = merged.gradient(name).double()
        assert float((two.gradient(name).double() - want).norm() / want.norm()) < 1e-5, name


ONE_PROCESS_STOPPED = """
import importlib, os, signal, sys
named_weights = importlib.import_module("cntinit.models.named_weights")
original, loads = named_weights.materialize, []
def stop_rank_0_at(*args, **kwargs):  # loads: outside the blocks, blocks 0 to 5 up, then 5 to 0 down
    loads.append(1)
    if os.environ["RANK"] == "0" and len(loads) == 10:  # block 3 on the way down
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
named_weights.materialize = stop_rank_0_at
from cntinit import cli
cli.main(sys.argv[1:])
"""


def test_torchrun_gradients_stop_together_and_resume(deep_llama, calibration, tmp_path):
    """A SIGTERM that reaches one process of a torchrun --gradients --layerwise capture stops every
    process after the same block, each with its checkpoint there (each process used to stop where
    it saw the signal, the others on its failure, their checkpoints at different blocks: a resume
    started again). A process killed while saving leaves its save before; the same command resumes
    every process from the newest save they all hold and ends with the statistics of one process
    and the gradients of the processes' shards merged."""
    script = tmp_path / "stopped.py"
    script.write_text(ONE_PROCESS_STOPPED)
    options = ["--seq-len", "24", "--targets", "q_proj,o_proj", "--gradients", "--layerwise", "--checkpoint-every", "2"]
    out = tmp_path / "two"

    def torchrun(*command):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, command),
                               "capture", str(deep_llama), "--data", str(calibration), *options, "--out", str(out)],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)

    done = torchrun(script)
    assert done.returncode != 0 and done.stderr.count("stopped by SIGTERM on the way down, after block 3;") == 2, done.stderr[-3000:]
    states = [checkpoint.location(out, rank) / checkpoint.STATE for rank in range(2)]
    for path in states:
        state = json.loads(path.read_text())
        assert (state["way"], state["block"], state["previous"]["block"]) == ("down", 2, 3)  # the last save and the one before
    state = json.loads(states[1].read_text())  # process 1 killed while saving block 2: its state still names block 3
    states[1].write_text(json.dumps({"identity": state["identity"], **state["previous"], "previous": None}))
    done = torchrun("-m", "cntinit")
    assert done.returncode == 0 and "the processes' last saves name different blocks (one stopped while saving): resuming from " \
        "block 3, the last one they all saved" in done.stderr and "2 of 6 blocks done on the way down" in done.stderr, done.stderr[-3000:]
    assert not list(tmp_path.glob(".two.checkpoint*"))
    shards = [capture(deep_llama, calibration, tmp_path / f"shard{i}", seq_len=24, targets="q_proj,o_proj", gradients=True,
                      layerwise=True, shard=f"{i}/2") for i in range(2)]
    merged = merge(shards, tmp_path / "merged")  # the processes' batches are the shards'
    one = capture(deep_llama, calibration, tmp_path / "one", seq_len=24, targets="q_proj,o_proj", gradients=True, layerwise=True)
    assert_same_store(one, out, tolerance=1e-5)  # the statistics do not depend on how the batches were formed
    for name in Store(merged).manifest["modules"]:
        want = Store(merged).gradient(name).double()
        assert float((Store(out).gradient(name).double() - want).norm() / want.norm()) < 1e-5, name


def test_refusals(tiny, calibration, tmp_path, capsys):
    base = ["capture", tiny["llama"], "--data", calibration]
    assert_refused(capsys, [*base, "--layerwise", "--offload"], "--layerwise already reads one block at a time", tmp_path / "a")
    assert_refused(capsys, [*base, "--activations-device", "cpu"], "--activations-device says where --layerwise keeps", tmp_path / "b")
    assert_refused(capsys, ["capture", tiny["bert"], "--data", calibration, "--layerwise", "--targets", "pooler.dense"],
                   "no target lies in a list of repeated blocks", tmp_path / "c")
    pipe, images = build_sd(tmp_path / "sd"), write_images(tmp_path / "images", count=2)
    assert_refused(capsys, ["capture", pipe, "--data", images, "--layerwise"], "is a diffusers pipeline, whose UNet is not one",
                   tmp_path / "d")
    t5 = tmp_path / "t5"
    transformers.T5Model(transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                               architectures=["T5Model"])).save_pretrained(t5)
    assert_refused(capsys, ["capture", t5, "--data", calibration, "--layerwise"], "is an encoder-decoder model", tmp_path / "e")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for name in os.listdir(tiny["llama"]):
        if not name.endswith(".safetensors"):
            (weightless / name).write_bytes((Path(tiny["llama"]) / name).read_bytes())
    assert_refused(capsys, ["capture", weightless, "--data", calibration, "--layerwise"], "has no safetensors weights", tmp_path / "f")


def test_blocks_are_the_outermost_chain_holding_the_targets():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
            self.layers = nn.ModuleList([Block() for _ in range(4)])

    net = Net()
    assert blocks.find_blocks(net, ["layers.0.experts.1", "layers.3.experts.0"]) == "layers"  # not the experts inside
    with pytest.raises(CntinitError, match=r"the targets lie in 2 chains of blocks \(vision, layers\)"):
        blocks.find_blocks(net, ["vision.0", "layers.1.experts.0"])
