"""Property tests of the numeric core: random PSD Σ (rank-deficient, badly conditioned, one massive
eigenvalue, all zero) and random W shapes — outputs finite, shapes right, each mode's constraint
held where METHODS.md says it holds, rank-r splits never above r."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cntinit.solve import linalg, vas
from cntinit.solve.modes import cnt, data_baselines, inilora

EPS = torch.finfo(torch.float64).eps
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    """(W (1, k, d), Σ (1, d, d), eigenvalues) in float64: Σ = Q diag(λ) Qᵀ with λ spanning up to 15 decades,
    some exactly zero, sometimes one massive outlier or Σ = 0."""
    d = draw(st.integers(1, 10))
    k = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    logs = draw(st.lists(st.one_of(st.none(), st.floats(-12, 3)), min_size=d, max_size=d))
    if draw(st.booleans()):
        logs[0] = 6.0  # a massive activation direction
    generator = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64)).Q
    values = torch.tensor([0.0 if x is None else 10.0**x for x in logs], dtype=torch.float64)
    sigma = (q * values) @ q.T
    sigma = (sigma + sigma.T) / 2
    w = torch.randn(1, k, d, generator=generator, dtype=torch.float64) * 10.0 ** draw(st.floats(-3, 1))
    return w, sigma[None], values


def finite(x):
    """Finite, and so is its squared norm (what the report computes)."""
    return bool(torch.isfinite(x).all()) and bool(torch.isfinite(x.square().sum()))


@SETTINGS
@given(problems(), st.sampled_from([0.0, 1e-8, 1e-4, 1e-2]))
def test_eigen_is_ordered_orthonormal_and_signed(problem, rcond):
    _, sigma, _ = problem
    values, vectors = linalg.eigen(sigma)
    assert finite(values) and finite(vectors)
    assert bool((values[0, :-1] >= values[0, 1:]).all())
    eye = torch.eye(sigma.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(vectors[0].T @ vectors[0], eye, atol=1e-10, rtol=0)
    largest = vectors[0].gather(0, vectors[0].abs().argmax(0, keepdim=True))
    assert bool((largest > 0).all())


@SETTINGS
@given(problems(), st.sampled_from([0.0, 1e-8, 1e-4, 1e-2]))
def test_cross_is_finite_and_inverts_sigma_on_the_kept_space(problem, rcond):
    """W_tar Σ = W P_kept, P_kept the projector onto eigenvectors above the floor."""
    w, sigma, _ = problem
    eig = linalg.eigen(sigma)
    target = cnt.cross(w, eig, rcond)
    assert target.shape == w.shape and finite(target)
    keep = linalg.kept(eig.values, rcond)[0]
    kept_vectors = eig.vectors[0][:, keep]
    condition = float(eig.values[0, 0] / eig.values[0, keep][-1]) if bool(keep.any()) else 1.0
    tolerance = float(w.abs().max()) * (1e-9 + 100 * condition * EPS)  # rounding grows with the kept condition number
    torch.testing.assert_close(target[0] @ sigma[0], w[0] @ kept_vectors @ kept_vectors.T, atol=tolerance, rtol=0)


@SETTINGS
@given(problems(), st.sampled_from([0.0, 1e-4, 1e-2]), st.sampled_from(cnt.SELF_FORMS))
def test_self_is_finite_and_whitens_when_nothing_is_floored(problem, rcond, form):
    """W_tar Σ W_tarᵀ = W Wᵀ when every eigenvalue is positive and above the floor (METHODS eq. 12)."""
    w, sigma, _ = problem
    eig = linalg.eigen(sigma)
    target = cnt.self_(w, eig, rcond, form)
    assert target.shape == w.shape and finite(target)
    values = eig.values[0]
    if bool(linalg.kept(eig.values, rcond).all()) and float(values[-1] / values[0]) > 1e-6:
        got = target[0] @ sigma[0] @ target[0].T
        want = w[0] @ w[0].T
        torch.testing.assert_close(got, want, atol=1e-6 * float(want.abs().max()), rtol=0)


@SETTINGS
@given(problems(), st.sampled_from([0.0, 1e-4, 1e-2]), st.floats(0.1, 2.0))
def test_shift_is_finite_and_solves_its_equation_when_nothing_is_floored(problem, rcond, c):
    """W_tar (I − Σ) Wᵀ = c I_k when (I − Σ)Wᵀ has k well-separated nonzero singular values (eq. 17)."""
    w, sigma, _ = problem
    target, floored = cnt.shift(w, sigma, rcond, c)
    assert target.shape == w.shape and finite(target)
    k, d = w.shape[-2:]
    m = (torch.eye(d, dtype=torch.float64) - sigma[0]) @ w[0].T
    s = torch.linalg.svdvals(m)
    if k <= d and int(floored) == 0 and float(s[-1] / s[0]) > 1e-6:
        torch.testing.assert_close(target[0] @ m, c * torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)


@SETTINGS
@given(problems(), st.integers(1, 12), st.sampled_from(["svd", "qr", "minor", "randomized"]), st.floats(0, 1))
def test_splits_never_exceed_the_rank(problem, rank, how, p):
    w, _, _ = problem
    k, d = w.shape[-2:]
    rank = min(rank, k, d)
    generator = torch.Generator().manual_seed(0)
    b, a, values = linalg.split(w, rank, "qr" if how == "qr" else "svd", p, minor=how == "minor",
                       niter=2 if how == "randomized" else None, generators=[generator])
    assert b.shape == (1, k, rank) and a.shape == (1, rank, d) and finite(b) and finite(a)
    update = b[0] @ a[0]
    assert int(torch.linalg.matrix_rank(update)) <= rank
    assert (values is None) == (how == "qr")
    if how in ("svd", "minor"):  # the values the split reports are ΔW's whole spectrum
        torch.testing.assert_close(values, torch.linalg.svdvals(w))
    if how == "svd":  # the best rank-r approximation (Eckart–Young)
        s = torch.linalg.svdvals(w[0])
        optimum = float(s[rank:].square().sum().sqrt())
        assert math.isclose(float((w[0] - update).norm()), optimum, rel_tol=1e-7, abs_tol=1e-9 * float(s[0]))


@SETTINGS
@given(problems())
def test_corda_metric_is_invertible_even_for_zero_or_singular_sigma(problem):
    _, sigma, _ = problem
    metric, inverse = data_baselines.corda_metric(sigma)
    assert finite(metric) and finite(inverse)
    eye = torch.eye(sigma.shape[-1], dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(metric[0] @ inverse[0] - eye)) < data_baselines.CORDA_INVERSE_ERROR


@SETTINGS
@given(st.lists(st.lists(st.floats(0, 1e6), min_size=1, max_size=8), min_size=1, max_size=6), st.integers(1, 40),
       st.integers(0, 3), st.integers(1, 8))
def test_vas_ranks_stay_in_their_clamps_and_within_the_budget(spectra, budget, min_rank, max_rank):
    singular = {f"m{i}": torch.tensor(sorted(s, reverse=True), dtype=torch.float64) for i, s in enumerate(spectra)}
    limits = {name: max(min_rank, min(len(s), max_rank)) for name, s in singular.items()}
    ranks = vas.allocate(singular, limits, budget, min_rank)
    assert all(min_rank <= ranks[name] <= limits[name] for name in singular)
    counts = vas.top_counts({n: vas.relative_variances(s) for n, s in singular.items()}, budget)
    assert sum(counts.values()) == min(budget, sum(len(s) for s in spectra))
    assert all(0 <= float(data_baselines.explained_variance(s).sum()) <= 1 + 1e-12 for s in singular.values())


@SETTINGS
@given(problems(), st.integers(1, 4), st.sampled_from(list(inilora.DEFAULT_STEPS)))
def test_inilora_stays_finite(problem, rank, mode):
    w, _, _ = problem
    k, d = w.shape[-2:]
    generator = torch.Generator().manual_seed(0)
    b, a = inilora.start(k, d, rank, mode, float(w.std()) if w.numel() > 1 else 0.02, [generator])
    fitted_b, fitted_a, steps = inilora.fit(w.float(), b, a, steps=20)
    assert steps == 20 and fitted_b.shape == (1, k, rank) and finite(fitted_b) and finite(fitted_a)
