"""Each formula of METHODS.md against an independent NumPy implementation on hand-built matrices."""

import numpy as np
import pytest
import torch

from cntinit.solve import linalg, vas
from cntinit.solve.modes import cnt

RNG = np.random.default_rng(0)


def spd(d, n=400, decay=1.0):
    """A second moment from n random columns with a decaying spectrum."""
    x = RNG.standard_normal((d, n)) * (np.arange(1, d + 1) ** -decay)[:, None]
    return x @ x.T / n


def t(a):
    return torch.from_numpy(np.array(a, dtype=np.float64))


def np_eigen(sigma):
    values, vectors = np.linalg.eigh(sigma)
    values, vectors = values[::-1], vectors[:, ::-1]
    for j in range(vectors.shape[1]):
        if vectors[np.argmax(np.abs(vectors[:, j])), j] < 0:
            vectors[:, j] = -vectors[:, j]
    return values, vectors


@pytest.mark.parametrize("rcond", [0.0, 1e-3])
def test_cross_is_w_times_the_floored_pseudo_inverse(rcond):
    w, sigma = RNG.standard_normal((5, 8)), spd(8, decay=2.0)
    want = w @ np.linalg.pinv(sigma, rcond=rcond, hermitian=True)
    got = cnt.cross(t(w)[None], linalg.eigen(t(sigma)[None]), rcond)[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-8 * np.abs(want).max())


def test_whitened_inputs_leave_cross_unchanged():
    w = RNG.standard_normal((6, 6))
    target = cnt.cross(t(w)[None], linalg.eigen(torch.eye(6, dtype=torch.float64)[None]), 1e-4)
    delta = cnt.robust_estimate(t(w)[None], [target], [1.0]) - t(w)
    assert delta.abs().max() < 1e-12


@pytest.mark.parametrize("form", ["paper", "zca"])
def test_self_mode_formula_and_its_quadratic_constraint(form):
    w, sigma = RNG.standard_normal((4, 7)), spd(7)
    values, vectors = np_eigen(sigma)
    root = np.diag(values**-0.5)
    want = w @ root @ vectors.T if form == "paper" else w @ vectors @ root @ vectors.T
    got = cnt.self_(t(w)[None], linalg.eigen(t(sigma)[None]), 0.0, form)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got @ sigma @ got.T, w @ w.T, rtol=1e-9, atol=1e-9)  # W_tar Σ W_tarᵀ = W Wᵀ


def test_self_mode_clamps_small_eigenvalues_to_the_floor():
    sigma = np.diag([4.0, 1.0, 1e-9])
    got = cnt.self_(torch.eye(3, dtype=torch.float64)[None], linalg.eigen(t(sigma)[None]), 1e-2, "zca")[0]
    np.testing.assert_allclose(np.diag(got.numpy()), [0.5, 1.0, (4e-2) ** -0.5], rtol=1e-12)


def test_eigenvectors_are_ordered_and_signed_deterministically():
    sigma = spd(6)
    eig = linalg.eigen(t(sigma)[None])
    assert torch.all(eig.values[0, :-1] >= eig.values[0, 1:])
    biggest = eig.vectors[0].gather(0, eig.vectors[0].abs().argmax(0, keepdim=True))
    assert torch.all(biggest > 0)
    flipped = linalg.eigen(t(sigma)[None].flip(-1).flip(-2))  # same matrix, coordinates reversed
    np.testing.assert_allclose(flipped.vectors[0].flip(0).numpy(), eig.vectors[0].numpy(), atol=1e-9)


@pytest.mark.parametrize("c", [1.0, 0.3])
def test_shift_formula_and_its_linear_constraint(c):
    w, sigma = RNG.standard_normal((3, 6)), spd(6)
    m = (np.eye(6) - sigma) @ w.T
    want = c * np.linalg.pinv(m)
    got, floored = cnt.shift(t(w)[None], t(sigma)[None], 0.0, c)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[0].numpy() @ w.T - got[0].numpy() @ sigma @ w.T, c * np.eye(3), atol=1e-9)  # eq. 16
    assert floored.tolist() == [0]


def test_shift_floor_drops_small_singular_values():
    w = np.diag([1.0, 1e-8])
    got, floored = cnt.shift(t(w)[None], torch.zeros(1, 2, 2, dtype=torch.float64), 1e-4, 1.0)
    np.testing.assert_allclose(got[0].numpy(), np.diag([1.0, 0.0]), atol=1e-12)
    assert floored.tolist() == [1]


def test_robust_estimate_is_eq_18():
    w = RNG.standard_normal((2, 3, 4))
    targets = [RNG.standard_normal((2, 3, 4)) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    got = cnt.robust_estimate(t(w), [t(x) for x in targets], weights)
    np.testing.assert_allclose(got.numpy(), (w + sum(a * x for a, x in zip(weights, targets))) / 4)


def test_centered_second_moment():
    x = RNG.standard_normal((5, 50)) + 3.0
    s, m, n = x @ x.T, x.sum(1), torch.tensor(50)
    np.testing.assert_allclose(linalg.second_moment(t(s), t(m), n, False).numpy(), s / 50)
    np.testing.assert_allclose(linalg.second_moment(t(s), t(m), n, True).numpy(), np.cov(x, bias=True), atol=1e-12)


@pytest.mark.parametrize("p", [0.5, 0.0, 1.0])
def test_svd_split_is_the_truncated_svd_with_p_sharing(p):
    delta = RNG.standard_normal((7, 5))
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    b, a, _ = linalg.split(t(delta)[None], 3, "svd", p)
    np.testing.assert_allclose((b[0] @ a[0]).numpy(), u[:, :3] * s[:3] @ vh[:3], atol=1e-12)
    np.testing.assert_allclose(b[0].norm(dim=0).numpy(), s[:3] ** (1 - p), rtol=1e-12)
    np.testing.assert_allclose(a[0].norm(dim=1).numpy(), s[:3] ** p, rtol=1e-12)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)], ids=["tall", "wide"])
def test_leading_svd_holds_on_rank_deficient_and_zero_matrices(shape):
    """The Gram-matrix route: on a rank-3 matrix asked for rank 5, BA is still the matrix (the two
    directions it lacks contribute nothing), U's used columns are orthonormal, and the reported
    spectrum is NumPy's to √ε·s_max; a zero matrix splits into zeros, not NaN."""
    k, d = shape
    m = RNG.standard_normal((k, 3)) @ RNG.standard_normal((3, d))
    u, s, vh = linalg.leading_svd(t(m)[None], 5)
    want = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(s[0].numpy(), want, rtol=0, atol=np.sqrt(np.finfo(float).eps) * want[0])
    np.testing.assert_allclose(s[0, :3].numpy(), want[:3], rtol=1e-12)  # the leading ones to rounding
    np.testing.assert_allclose((u[0, :, :3].T @ u[0, :, :3]).numpy(), np.eye(3), atol=1e-12)
    b, a, _ = linalg.split(t(m)[None], 5, "svd", 0.5)
    np.testing.assert_allclose((b[0] @ a[0]).numpy(), m, atol=1e-12 * np.abs(m).max())
    b, a, values = linalg.split(torch.zeros(1, k, d, dtype=torch.float64), 4, "svd", 0.5)
    assert torch.all(b == 0) and torch.all(a == 0) and torch.all(values == 0)


def test_qr_split_is_the_truncated_qr():
    delta = RNG.standard_normal((4, 6))
    q, r = np.linalg.qr(delta)
    b, a, _ = linalg.split(t(delta)[None], 2, "qr", 0.5)
    np.testing.assert_allclose((b[0] @ a[0]).numpy(), q[:, :2] @ r[:2], atol=1e-12)  # signs cancel in the product
    np.testing.assert_allclose((b[0].T @ b[0]).numpy(), np.eye(2), atol=1e-12)
    assert torch.all(torch.diagonal(a[0][:, :2]) > 0)


def independent_allocation(singular_values, budget):
    pooled = []
    for name, s in singular_values.items():
        energy = np.asarray(s, dtype=float) ** 2
        pooled += [(v, name) for v in energy / energy.sum()]
    order = sorted(range(len(pooled)), key=lambda i: (-pooled[i][0], i))
    counts = {name: 0 for name in singular_values}
    for i in order[:budget]:
        counts[pooled[i][1]] += 1
    return counts


def test_vas_follows_pooled_relative_variances_and_spends_the_budget():
    singular_values = {n: np.sort(RNG.gamma(1.0, size=12) * RNG.uniform(0.1, 10))[::-1] for n in "abcdef"}
    want = independent_allocation(singular_values, budget=24)
    got = vas.allocate({n: t(s) for n, s in singular_values.items()}, dict.fromkeys(singular_values, 12), 24)
    assert got == want and sum(got.values()) == 24


def test_vas_concentrated_spectra_get_small_ranks_and_clamps_apply():
    singular_values = {"flat": t(np.ones(8)), "spiky": t([10.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])}
    got = vas.allocate(singular_values, {"flat": 8, "spiky": 8}, budget=8)
    assert got == {"flat": 7, "spiky": 1}
    assert vas.allocate(singular_values, {"flat": 5, "spiky": 8}, budget=8, min_rank=2) == {"flat": 5, "spiky": 2}
    assert vas.allocate({"zero": torch.zeros(3), "one": t([1.0, 0, 0])}, {"zero": 3, "one": 3}, budget=1) == {"zero": 0, "one": 1}


@pytest.mark.parametrize("shape", [(12, 20), (16, 16), (24, 10)])
def test_minor_left_is_the_svds_minor_left_vectors_and_falls_back_where_a_tall_matrix_is_nearly_singular(shape):
    """MiCA's U of the r smallest singular triplets, from the float64 Gram matrix (wide: M Mᵀ's
    eigenvectors; tall: M v / s) equals the SVD's up to sign, in float32 and float64; a tall matrix
    with a singular value under MINOR_GAP·s₁ takes the SVD itself (u = M v / s would lose orthogonality)."""
    from cntinit.solve.linalg import MINOR_GAP, minor_left

    generator = torch.Generator().manual_seed(1)
    k, d = shape
    u0, _ = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    v0, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    spectrum = 0.8 ** torch.arange(min(k, d), dtype=torch.float64)  # distinct singular values
    m = u0[:, : min(k, d)] @ torch.diag(spectrum) @ v0[:, : min(k, d)].T
    for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        u, values = minor_left(m.to(dtype)[None], 3)
        expected = torch.linalg.svd(m)[0][:, min(k, d) - 3 : min(k, d)]
        assert u.dtype == dtype and u.shape == (1, k, 3)
        torch.testing.assert_close((u[0].double().T @ expected).abs(), torch.eye(3, dtype=torch.float64), rtol=0, atol=tolerance)
        torch.testing.assert_close(values[0].double(), spectrum.to(dtype).double(), rtol=0, atol=tolerance)
    if k > d:
        spectrum[-1] = MINOR_GAP / 10
        m = u0[:, :d] @ torch.diag(spectrum) @ v0.T
        u, _ = minor_left(m[None], 3)
        torch.testing.assert_close(u[0].T @ u[0], torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close((u[0].T @ torch.linalg.svd(m)[0][:, d - 3 : d]).abs(), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-9)


def _with_spectrum(k, d, spectrum, seed=2):
    generator = torch.Generator().manual_seed(seed)
    u0, _ = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    v0, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    n = min(k, d)
    return u0[:, :n] @ torch.diag(spectrum) @ v0[:, :n].T


@pytest.mark.parametrize("shape", [(60, 90), (90, 60), (70, 70)])
def test_pseudo_inverse_from_the_float64_gram_matrix_is_numpys_pinv(shape):
    """cnt-sh's M⁺ from the eigendecomposition of M's smaller Gram matrix in float64 equals numpy's pinv of the same M at the same floor to 1e-7, in float64 and with
    float32 inputs, down to a spectrum reaching GRAM_FLOOR; values under the floor are zeroed and counted."""
    k, d = shape
    spectrum = torch.logspace(0, np.log10(linalg.GRAM_FLOOR), min(k, d), dtype=torch.float64)
    spectrum[-3:] = torch.tensor([3e-6, 1e-7, 0.0])  # under the floor: dropped
    m = _with_spectrum(k, d, spectrum)
    for dtype in (torch.float64, torch.float32):
        given = m.to(dtype)
        rcond = max(1e-5, min(k, d) * torch.finfo(dtype).eps)
        want = np.linalg.pinv(given.double().numpy(), rcond=rcond)
        got, floored = linalg.pseudo_inverse(given[None], 1e-5)
        assert got.dtype == dtype and got.shape == (1, d, k)
        assert floored.tolist() == [int((spectrum.to(dtype).double() < rcond).sum())]
        error = np.linalg.norm(got[0].double().numpy() - want) / np.linalg.norm(want)
        assert error < (1e-7 if dtype == torch.float64 else 2e-7), error  # float32: the output's own rounding


def test_pseudo_inverse_takes_the_svd_below_the_gram_floor():
    """Under GRAM_FLOOR the Gram matrix's squared condition number would cost accuracy: --rcond 1e-9 in float64
    inverts singular values down to 1e-9·s_max, which the SVD resolves and the Gram matrix (ε/1e-18) would not."""
    spectrum = torch.logspace(0, -9, 40, dtype=torch.float64)
    m = _with_spectrum(40, 50, spectrum)
    got, floored = linalg.pseudo_inverse(m[None], 1e-9)
    want = np.linalg.pinv(m.numpy(), rcond=1e-9)
    assert floored.tolist() == [0]
    np.testing.assert_allclose(got[0].numpy(), want, rtol=0, atol=1e-6 * np.abs(want).max())
