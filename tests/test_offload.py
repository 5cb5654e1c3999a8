"""--offload (accelerate's device map: device, CPU memory, disk) and --stats-device change where the
work runs, never its result: an offloaded capture or solve equals a normal one."""

from __future__ import annotations

import pytest
import torch

from cntinit import capture, solve
from cntinit.models import linears, loading, placement
from cntinit.solve.solution import Solution
from cntinit.storage.store import Store

from conftest import assert_refused, run

TARGETS = "q_proj,v_proj,down_proj"
ALL_ON_DISK = "cpu=1MB"  # below the largest layer, so accelerate puts every weight on disk


def test_a_capture_with_every_weight_on_disk_equals_a_normal_one(tiny, calibration, tmp_path, capsys):
    normal = Store(capture(tiny["llama"], calibration, tmp_path / "normal", targets=TARGETS, seq_len=32, buckets=2))
    code, out, err = run(capsys, "capture", tiny["llama"], "--data", calibration, "--targets", TARGETS, "--seq-len", 32,
                         "--buckets", 2, "--offload", "--max-memory", ALL_ON_DISK, "--stats-device", "cpu", "--out", tmp_path / "offloaded")
    assert code == 0 and "weights on disk" in err, err
    offloaded = Store(tmp_path / "offloaded")
    assert offloaded.manifest["model"] == normal.manifest["model"]  # the fingerprint reads the weights from disk
    assert offloaded.manifest["capture"] == normal.manifest["capture"] and offloaded.manifest["modules"] == normal.manifest["modules"]
    for key in normal.keys:
        for name, tensor in normal.tensors(key).items():
            assert torch.equal(offloaded.tensors(key)[name], tensor), (key, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["normal", "offloaded"]  # the offload folder is gone


def test_weights_are_read_from_disk_one_module_at_a_time(tiny, tmp_path):
    on_disk = placement.Placement(torch.device("cpu"), torch.float32, tmp_path, placement.parse_max_memory(ALL_ON_DISK))
    net, _ = loading.load(tiny["llama"], placement=on_disk)
    q = net.get_submodule("model.layers.1.self_attn.q_proj")
    assert q.weight.device.type == "meta"
    reference, _ = loading.load(tiny["llama"])
    assert torch.equal(linears.weight_values(q), reference.get_submodule("model.layers.1.self_attn.q_proj").weight)
    assert q.weight.device.type == "meta"  # back on disk after the read


@pytest.mark.parametrize("options", [dict(mode="cnt-s", rank=4, vas=True), dict(mode="corda", rank=4)], ids=["cnt-s-vas", "corda"])
def test_an_offloaded_solve_equals_a_normal_one(captured, tmp_path, options):
    normal = Solution(solve(captured["llama"], tmp_path / "normal", **options)).factors()
    offloaded = Solution(solve(captured["llama"], tmp_path / "offloaded", offload=True, max_memory=ALL_ON_DISK, **options)).factors()
    assert list(offloaded) == list(normal)
    for name, (b, a) in normal.items():
        assert torch.equal(offloaded[name][0], b) and torch.equal(offloaded[name][1], a), name


def test_a_data_free_solve_can_offload_too(tiny, tmp_path):
    options = dict(mode="pissa", rank=4, model=tiny["gpt2"], targets="c_attn,c_fc")  # Conv1D: W stored transposed
    normal = Solution(solve(None, tmp_path / "normal", **options)).factors()
    offloaded = Solution(solve(None, tmp_path / "offloaded", offload=True, max_memory=ALL_ON_DISK, **options)).factors()
    assert list(offloaded) == list(normal) and all(torch.equal(offloaded[n][1], normal[n][1]) for n in normal)


@pytest.mark.parametrize("args, message", [
    (["--max-memory", "cpu=1GiB"], "--max-memory limits where --offload puts the weights: add --offload"),
    (["--offload", "--max-memory", "gpu=1GiB"], "--max-memory gpu=1GiB: each entry is cuda=SIZE or cpu=SIZE"),
    (["--offload", "--max-memory", "cpu=lots"], "--max-memory cpu=lots: each entry is cuda=SIZE or cpu=SIZE"),
    (["--stats-device", "tpu"], "--stats-device tpu is not one of auto, cpu, cuda"),
    (["--device", "cpu", "--offload", "--max-memory", "cuda=1GiB"], "--max-memory cuda=SIZE limits a GPU, but here --offload keeps"),
])
def test_bad_placement_options_are_refused(tiny, calibration, tmp_path, capsys, args, message):
    assert_refused(capsys, ["capture", tiny["llama"], "--data", calibration, *args], message, tmp_path / "out")


def test_solve_offload_keeps_weights_off_the_gpu(captured, tmp_path, capsys):
    assert_refused(capsys, ["solve", captured["llama"], "--mode", "cnt-s", "--offload", "--max-memory", "cuda=1GiB"],
                   "--max-memory cuda=SIZE limits a GPU, but here --offload keeps the weights in CPU memory and on disk: "
                   "give --max-memory cpu=SIZE", tmp_path / "out")
