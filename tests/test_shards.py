"""`capture --shard i/N` + `merge` equals one capture over all the data (text and images, with buckets)."""

from __future__ import annotations

import pytest
import torch

from cntinit import capture, merge
from cntinit.storage.store import Store

from conftest import run
from imaging import build_vit, write_images


def assert_same_statistics(merged: Store, whole: Store) -> None:
    assert merged.keys == whole.keys
    for key in whole.keys:
        want, got = whole.tensors(key), merged.tensors(key)
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name].double(), want[name].double(), rtol=2e-5, atol=1e-4)
    for section in ("data", "capture"):
        mine = {k: v for k, v in merged.manifest[section].items() if k != "merged_from"}
        assert mine == whole.manifest[section], section


@pytest.mark.parametrize("count", [2, 3])
def test_text_shards_merge_to_one_run(tiny, calibration, tmp_path, count):
    options = dict(targets="q_proj,v_proj,down_proj", seq_len=32, batch_size=8, buckets=3)
    whole = Store(capture(tiny["llama"], calibration, tmp_path / "whole", **options))
    parts = [capture(tiny["llama"], calibration, tmp_path / f"part{i}", shard=f"{i}/{count}", **options) for i in range(count)]
    sizes = [Store(p).manifest["data"]["sequences"] for p in parts]
    assert sum(sizes) == whole.manifest["data"]["sequences"] and max(sizes) - min(sizes) <= 3  # disjoint, near-equal
    assert_same_statistics(Store(merge(parts, tmp_path / "merged")), whole)


def test_image_shards_merge_to_one_run(tmp_path):
    vit, folder = build_vit(tmp_path / "vit"), write_images(tmp_path / "images", count=7)
    options = dict(targets="q_proj,v_proj,fc2", batch_size=2, buckets=2)
    whole = Store(capture(vit, folder, tmp_path / "whole", **options))
    parts = [capture(vit, folder, tmp_path / f"part{i}", shard=f"{i}/2", **options) for i in range(2)]
    assert_same_statistics(Store(merge(parts, tmp_path / "merged")), whole)


def test_shard_errors(tiny, calibration, tmp_path, capsys):
    base = ["capture", tiny["llama"], "--data", calibration, "--targets", "q_proj", "--seq-len", "32"]
    for bad in ("2/2", "1", "a/b", "1/0"):
        code, _, err = run(capsys, *base, "--shard", bad, "-o", tmp_path / "x")
        assert code == 2 and "must be INDEX/COUNT" in err and not (tmp_path / "x").exists(), err
    code, _, err = run(capsys, *base, "--shard", "0/500", "--max-samples", "3", "-o", tmp_path / "x")
    assert code == 2 and "--shard 0/500 gets no samples of the 3: use fewer shards" in err
    for i in range(2):
        assert run(capsys, *base, "--shard", f"{i}/2", "-o", tmp_path / f"s{i}")[0] == 0
    for i in range(2):
        assert run(capsys, *base, "--shard", f"{i}/3", "-o", tmp_path / f"t{i}")[0] == 0
    assert run(capsys, *base, "-o", tmp_path / "all")[0] == 0
    for stores, message in (([tmp_path / "s0", tmp_path / "s0"], "shard 0/2 is given more than once"),
                            ([tmp_path / "s0", tmp_path / "t0"], "the shards are of different counts"),
                            ([tmp_path / "s0", tmp_path / "all"], "some stores are --shard captures and some are not")):
        code, _, err = run(capsys, "merge", *stores, "-o", tmp_path / "m")
        assert code == 2 and message in err and not (tmp_path / "m").exists(), err
    code, _, err = run(capsys, "merge", tmp_path / "t0", tmp_path / "t1", "-o", tmp_path / "part")
    assert code == 0 and "merging 2 of 3 shards" in err and Store(tmp_path / "part").manifest["capture"]["shard"] == "0/3,1/3"


def test_merging_a_store_with_itself_is_refused_unless_asked_for(tiny, calibration, tmp_path, capsys):
    """merge of a store with itself (or with another capture of the same data) counted every sample twice
    without a word; --allow-duplicates says it is meant."""
    base = ["capture", tiny["llama"], "--data", calibration, "--targets", "q_proj", "--seq-len", "32"]
    assert run(capsys, *base, "-o", tmp_path / "a")[0] == 0
    assert run(capsys, *base, "--buckets", "1", "-o", tmp_path / "b")[0] == 0
    for stores in ([tmp_path / "a", tmp_path / "a"], [tmp_path / "a", tmp_path / "b"]):
        code, _, err = run(capsys, "merge", *stores, "-o", tmp_path / "m")
        assert code == 2 and err.count("\n") == 1 and not (tmp_path / "m").exists(), err
        assert f"{stores[0]} and {stores[1]} hold statistics of the same data" in err and "pass --allow-duplicates" in err, err
    code, _, err = run(capsys, "merge", tmp_path / "a", tmp_path / "a", "--allow-duplicates", "-o", tmp_path / "m")
    once, twice = Store(tmp_path / "a"), Store(tmp_path / "m")
    assert code == 0 and twice.manifest["data"]["tokens"] == 2 * once.manifest["data"]["tokens"], err
    assert torch.equal(twice.tensors(twice.keys[0])["xxt"], 2 * once.tensors(once.keys[0])["xxt"])
