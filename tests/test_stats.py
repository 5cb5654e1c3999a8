import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cntinit.capture.stats import InputStats, accumulate_upper, symmetrize


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), dim=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_triangular_gram_equals_full_product(rows, dim, seed):
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    upper = torch.zeros(dim, dim, dtype=torch.float64)
    accumulate_upper(upper, x)
    accumulate_upper(upper, 2 * x)
    torch.testing.assert_close(symmetrize(upper), 5 * x.T @ x)


@pytest.mark.parametrize("tile", [1, 7, 64, 512])
def test_symmetrize_mirrors_exactly_the_upper_triangle_whatever_the_tile(tile):
    upper = torch.randn(3, 150, 150, generator=torch.Generator().manual_seed(1))  # below the diagonal: noise it must ignore
    full = symmetrize(upper, tile)
    rows, columns = torch.triu_indices(150, 150)
    assert torch.equal(full[:, rows, columns], upper[:, rows, columns])
    assert torch.equal(full, full.mT)
    in_place = upper.clone()
    assert symmetrize(in_place, tile, in_place=True).data_ptr() == in_place.data_ptr() and torch.equal(in_place, full)


def test_input_stats_buckets_pool_to_the_whole():
    x = torch.randn(30, 260, dtype=torch.float64)
    stats = InputStats(260, buckets=3, dtype=torch.float64, device="cpu")
    for bucket, part in enumerate((x[:7], x[7:19], x[19:])):
        stats.add(part, bucket)
    t = stats.tensors("k")
    torch.testing.assert_close(t["k.xxt"], x.T @ x)
    torch.testing.assert_close(t["k.sum"], x.sum(0))
    assert int(t["k.count"]) == 30 and t["k.count"].dtype == torch.int64
    torch.testing.assert_close(t["k.bucket_xxt"][1], x[7:19].T @ x[7:19])
    assert t["k.bucket_count"].tolist() == [7, 12, 11]


def test_half_precision_inputs_accumulate_in_float32():
    x = torch.full((4096, 3), 1.0078125, dtype=torch.bfloat16)  # exactly representable
    stats = InputStats(3, buckets=1, dtype=torch.float32, device="cpu")
    for _ in range(8):
        stats.add(x, 0)
    t = stats.tensors("k")
    assert "k.bucket_xxt" not in t
    expected = 8 * 4096 * 1.0078125**2
    assert t["k.xxt"].dtype == torch.float32
    assert t["k.xxt"][0, 0].item() == pytest.approx(expected, rel=1e-4)  # bf16 sums would be off by >1%


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core path runs on CUDA only")
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_cuda_half_inputs_match_float64(half):
    x = torch.randn(5000, 700, device="cuda").to(half)
    stats = InputStats(700, buckets=1, dtype=torch.float32, device="cuda")
    stats.add(x, 0)
    exact = x.double().T @ x.double()
    got = stats.tensors("k")["k.xxt"].double()
    assert float((got - exact.cpu()).abs().max() / exact.abs().max()) < 1e-5  # float32 accumulation; bf16 sums give ~1e-3
