"""Baselines (random, uncertainty, CoreSet, BADGE, partitioned) against slow obvious references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cm_engine.baselines import (badge_select, coreset_select, partitioned, random_select, uncertainty_scores,
                                 uncertainty_select)


# ----------------------------------------------------------------------------- references

def ref_coreset(x, budget, exclude=(), seed=0, metric="l2"):
    """k-center greedy with numpy float64 loops: the textbook algorithm."""
    x = np.asarray(x, np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    exclude = set(int(i) for i in exclude)
    cand = [i for i in range(n) if i not in exclude]
    rng = np.random.default_rng(seed)
    mind = np.full(len(cand), np.inf)
    for c in exclude:
        for p, i in enumerate(cand):
            mind[p] = min(mind[p], np.sqrt(((x[i] - x[c]) ** 2).sum()))
    picked = []
    for t in range(min(budget, len(cand))):
        if not exclude and t == 0:
            p = int(rng.integers(len(cand)))
        else:
            best, p = -2.0, -1
            for q in range(len(cand)):
                v = -1.0 if q in picked else mind[q]
                if v > best:
                    best, p = v, q
        picked.append(p)
        for q in range(len(cand)):
            mind[q] = min(mind[q], np.sqrt(((x[cand[q]] - x[cand[p]]) ** 2).sum()))
    return np.array([cand[p] for p in picked], np.int64)


def softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def grad_embeddings(h, logits):
    """Materialized BADGE gradient embeddings: (p - onehot(argmax p)) (x) h, float64 [N, C*d]."""
    p = softmax(logits)
    u = p.copy()
    u[np.arange(len(u)), p.argmax(1)] -= 1
    return np.stack([np.kron(u[i], np.asarray(h[i], np.float64)) for i in range(len(h))])


def ref_badge(h, logits, budget, exclude=(), seed=0):
    """k-means++ seeding on materialized gradient embeddings; D^2 draws as the engine documents."""
    g = grad_embeddings(h, logits)
    exclude = set(int(i) for i in exclude)
    cand = [i for i in range(len(g)) if i not in exclude]
    gc = g[cand]
    rng = np.random.default_rng(seed)
    first = int(np.argmax(np.linalg.norm(gc, axis=1)))
    picked = [first]
    mind = np.linalg.norm(gc - gc[first], axis=1)
    while len(picked) < min(budget, len(cand)):
        w = mind ** 2
        w[picked] = 0
        cum = np.cumsum(w)
        u = rng.random()
        p = int(np.searchsorted(cum, u * cum[-1], side="right"))
        picked.append(p)
        mind = np.minimum(mind, np.linalg.norm(gc - gc[p], axis=1))
    return np.array([cand[p] for p in picked], np.int64)


def blobs(n, d, k=6, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, d)) * 3
    return (c[rng.integers(k, size=n)] + scale * rng.normal(size=(n, d))).astype(np.float32)


# ----------------------------------------------------------------------------- random / uncertainty

def test_random_select_uniform_and_excludes():
    picks = random_select(50, 10, exclude=np.arange(5), seed=3)
    assert picks.dtype == np.int64 and picks.size == 10 and len(set(picks)) == 10
    assert picks.min() >= 5
    assert np.array_equal(picks, random_select(50, 10, exclude=np.arange(5), seed=3))
    assert random_select(10, 100, exclude=[1, 2]).size == 8
    # each eligible point equally likely: chi-square-ish check on counts
    counts = np.zeros(20)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        counts[random_select(20, 5, exclude=[0], seed=rng)] += 1
    assert counts[0] == 0
    assert np.abs(counts[1:] / 2000 - 5 / 19).max() < 0.05


@pytest.mark.parametrize("measure", ["margin", "entropy", "least_confidence"])
@pytest.mark.parametrize("from_logits", [True, False])
def test_uncertainty_matches_reference(measure, from_logits):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(300, 7)).astype(np.float32) * 2
    p = softmax(z)
    out = z if from_logits else p.astype(np.float32)
    ps = np.sort(p, 1)
    ref = {"margin": ps[:, -1] - ps[:, -2], "least_confidence": ps[:, -1],
           "entropy": (p * np.log(p)).sum(1)}[measure]
    sc = uncertainty_scores(out, measure=measure, from_logits=from_logits, device="cpu", budget_bytes=4096)
    assert sc.dtype == np.float32 and sc.shape == (300,)
    np.testing.assert_allclose(sc, ref, atol=2e-5)
    excl = np.arange(0, 300, 3)
    picks = uncertainty_select(out, 40, measure=measure, from_logits=from_logits, exclude=excl, device="cpu")
    keep = np.setdiff1d(np.arange(300), excl)
    want = keep[np.argsort(ref[keep], kind="stable")[:40]]
    # same set (float rounding can swap exact near-ties at the boundary only)
    assert len(np.intersect1d(picks, want)) >= 39
    assert not np.isin(picks, excl).any()
    assert np.all(np.diff(sc[picks]) >= 0)  # most uncertain first


def test_uncertainty_bad_input():
    with pytest.raises(ValueError, match="measure"):
        uncertainty_select(np.zeros((5, 3)), 2, measure="bald")
    with pytest.raises(ValueError, match="outputs"):
        uncertainty_select(np.zeros(5), 2)
    with pytest.raises(ValueError, match="budget"):
        uncertainty_select(np.zeros((5, 3)), -1)
    with pytest.raises(ValueError, match="exclude"):
        uncertainty_select(np.zeros((5, 3)), 1, exclude=[7])


# ----------------------------------------------------------------------------- CoreSet

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_coreset_equals_exact_k_center_greedy(seed, with_exclude):
    x = blobs(150, 5, seed=seed)
    excl = np.random.default_rng(seed).choice(150, 7, replace=False) if with_exclude else None
    want = ref_coreset(x, 25, exclude=() if excl is None else excl, seed=seed)
    for kernel, budget_bytes in (("numba", None), ("numba", 2000), ("torch", None), ("torch", 2000)):
        # lazy numba greedy; torch traversal resident on the device vs. gathered in small blocks
        got = coreset_select(x, 25, exclude=excl, seed=seed, device="cpu", budget_bytes=budget_bytes,
                             kernel=kernel)
        assert np.array_equal(got, want), (kernel, budget_bytes, got, want)


def test_coreset_cosine_and_memmap(tmp_path):
    x = blobs(120, 6, seed=4)
    np.save(tmp_path / "x.npy", x)
    want = ref_coreset(x, 15, exclude=[3, 9], metric="cosine")
    for kernel in ("numba", "torch"):
        got = coreset_select(str(tmp_path / "x.npy"), 15, exclude=[3, 9], metric="cosine", device="cpu",
                             kernel=kernel)
        assert np.array_equal(got, want)
    want = ref_coreset(x, 15, exclude=[5])
    got = coreset_select(str(tmp_path / "x.npy"), 15, exclude=[5], device="cpu", kernel="numba")  # memmap in place
    assert np.array_equal(got, want)


def test_coreset_duplicates_and_budget_over_pool():
    x = np.repeat(blobs(10, 3, seed=5), 3, axis=0)  # every point three times
    for kernel in ("numba", "torch"):
        got = coreset_select(x, 100, device="cpu", kernel=kernel)
        assert sorted(got) == list(range(30))  # all of them, each once
        got = coreset_select(x, 12, exclude=[0], device="cpu", kernel=kernel)
        assert len(set(got)) == 12 and 0 not in got


def test_coreset_pruning_is_exact_on_clustered_pool():
    """A larger pool where the triangle-inequality pruning skips most groups: still the exact picks."""
    x = blobs(600, 8, k=40, seed=7, scale=0.05)
    want = ref_coreset(x, 60, seed=7)
    for kernel in ("numba", "torch"):
        got = coreset_select(x, 60, seed=7, device="cpu", budget_bytes=1 << 14, kernel=kernel)
        assert np.array_equal(got, want)


def test_coreset_bad_input():
    x = blobs(20, 3)
    with pytest.raises(ValueError, match="metric"):
        coreset_select(x, 2, metric="l1")
    with pytest.raises(ValueError, match="embeddings"):
        coreset_select(x[0], 2)
    with pytest.raises(ValueError, match="exclude"):
        coreset_select(x, 2, exclude=[1, 1])
    with pytest.raises(TypeError, match="budget"):
        coreset_select(x, 2.5)
    with pytest.raises(ValueError, match="kernel"):
        coreset_select(x, 2, kernel="cuda")


# ----------------------------------------------------------------------------- BADGE

def test_badge_distance_factorization_matches_kronecker():
    from cm_engine.baselines import _BadgeSpace
    from cm_engine.pool import Pool

    rng = np.random.default_rng(0)
    h = rng.normal(size=(40, 6)).astype(np.float32)
    z = rng.normal(size=(40, 5)).astype(np.float32) * 3
    g = grad_embeddings(h, z)
    cand = np.arange(40)
    sp = _BadgeSpace(Pool(h), Pool(z), cand, torch.device("cpu"), True, True)
    f = sp.feats(torch.arange(40))
    for c in (0, 7, 39):
        d = sp.dist(f, sp.feats(torch.tensor([c])))
        np.testing.assert_allclose(d.numpy(), np.linalg.norm(g - g[c], axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_BadgeSpace.norms(f).numpy(), np.linalg.norm(g, axis=1), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_badge_equals_kmeanspp_on_materialized_embeddings(seed):
    rng = np.random.default_rng(seed)
    h = blobs(120, 4, seed=seed)
    z = (h @ rng.normal(size=(4, 6)) + rng.normal(size=(120, 6))).astype(np.float32)
    excl = rng.choice(120, 10, replace=False) if seed % 2 else None
    want = ref_badge(h, z, 20, exclude=() if excl is None else excl, seed=seed)
    for budget_bytes in (None, 3000):
        got = badge_select(h, z, 20, exclude=excl, seed=seed, device="cpu", budget_bytes=budget_bytes,
                           kernel="torch")
        assert np.array_equal(got, want), (got, want)
    got = badge_select(h, z, 20, exclude=excl, seed=seed, device="cpu", kernel="numba")
    assert got[0] == want[0] and len(set(got)) == 20  # same first pick; D^2 draws checked statistically
    if excl is not None:
        assert not np.isin(got, excl).any()


def test_badge_probabilities_input_and_d2_statistics():
    """The second pick's frequencies follow D^2 weights (statistical check, many seeds)."""
    h = np.array([[0, 0], [1, 0], [0, 3], [2, 2], [5, 5]], np.float32)
    p = np.tile(np.array([[0.6, 0.4]], np.float32), (5, 1))
    g = grad_embeddings(h, np.log(p))
    first = int(np.argmax(np.linalg.norm(g, axis=1)))
    w = np.linalg.norm(g - g[first], axis=1) ** 2
    w /= w.sum()
    for kernel in ("torch", "numba"):
        counts = np.zeros(5)
        for s in range(1500):
            got = badge_select(h, p, 2, from_logits=False, seed=s, device="cpu", kernel=kernel)
            assert got[0] == first
            counts[got[1]] += 1
        np.testing.assert_allclose(counts / 1500, w, atol=0.04)


def _factors(h, z):
    from cm_engine.baselines import _BadgeSpace
    from cm_engine.pool import Pool

    sp = _BadgeSpace(Pool(h), Pool(z), np.arange(len(h)), torch.device("cpu"), True, True)
    U, H = (x.contiguous() for x in sp.x)
    return U, H, int(_BadgeSpace.norms((U, H)).argmax())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_badge_cpu_kernel_exact_mode_equals_reference(seed):
    """With every bound refreshed after every pick (skip_mass=0, max_batch=1) the CPU kernel is the
    plain algorithm with the reference's random stream: the same picks, GEMM tiles big or tiny."""
    from cm_engine.baselines import _badge_d2_cpu

    rng = np.random.default_rng(seed)
    h = blobs(300, 4, seed=seed)
    z = (h @ rng.normal(size=(4, 6)) + rng.normal(size=(300, 6))).astype(np.float32)
    want = ref_badge(h, z, 40, seed=seed)
    U, H, first = _factors(h, z)
    for budget_bytes in (None, 3000):
        got = _badge_d2_cpu(U, H, first, 40, np.random.default_rng(seed), budget_bytes, skip_mass=0.0,
                            max_batch=1)
        assert np.array_equal(got, want), (budget_bytes, got, want)


def test_badge_refresh_equals_materialized_running_minimum():
    """The GEMM refresh of the bounds equals min(w, distances to the centres) on materialized
    gradient embeddings, exactly 0 on duplicates of a centre, in small tiles too."""
    from cm_engine.baselines import _d2_refresh

    rng = np.random.default_rng(3)
    h = rng.normal(size=(200, 5)).astype(np.float32)
    z = rng.normal(size=(200, 7)).astype(np.float32) * 2
    h[50:60], z[50:60] = h[7], z[7]  # duplicates of centre 7
    g = grad_embeddings(h, z)
    U, H, _ = _factors(h, z)
    un, hn = (U * U).sum(1).numpy(), (H * H).sum(1).numpy()
    cpos = np.array([7, 3, 120, 199])
    rows = np.setdiff1d(np.arange(0, 200, 2), cpos)
    w0 = np.where(rng.random(200) < 0.5, np.inf, rng.random(200) * 20)
    d2 = ((g[:, None, :] - g[None, cpos, :]) ** 2).sum(-1).min(1)
    want = w0.copy()
    want[rows] = np.minimum(w0[rows], d2[rows])
    for budget_bytes in (None, 500):
        w = w0.copy()
        _d2_refresh(U, H, un, hn, un * hn, rows, cpos, w, budget_bytes)
        np.testing.assert_allclose(w, want, rtol=1e-4, atol=1e-5)
        assert np.all(w[np.intersect1d(rows, np.arange(50, 60))] == 0)


def test_badge_cpu_kernel_third_pick_follows_d2_with_stale_bounds():
    """Rejection from stale bounds (refreshes skipping 95% of the mass) keeps the exact D^2 law of
    the third pick given the second."""
    from cm_engine.baselines import _badge_d2_cpu

    rng = np.random.default_rng(0)
    h = rng.normal(size=(6, 3)).astype(np.float32)
    z = rng.normal(size=(6, 4)).astype(np.float32)
    g = grad_embeddings(h, z)
    U, H, first = _factors(h, z)
    trials = 3000
    pair_counts, third, stale = {}, {}, 0
    for s in range(trials):
        st = {}
        a, b, c = _badge_d2_cpu(U, H, first, 3, np.random.default_rng(s), None, skip_mass=0.95, stats=st)
        stale += st["trials"] > 2 or st["rejections"] > 0
        pair_counts[b] = pair_counts.get(b, 0) + 1
        third[(b, c)] = third.get((b, c), 0) + 1
    assert stale > 100  # the rejection path was taken
    d1 = np.linalg.norm(g - g[first], axis=1) ** 2
    for b, nb in pair_counts.items():
        if nb < 300:
            continue
        w = np.minimum(d1, np.linalg.norm(g - g[b], axis=1) ** 2)
        w[[first, b]] = 0
        w /= w.sum()
        emp = np.array([third.get((b, c), 0) for c in range(6)]) / nb
        np.testing.assert_allclose(emp, w, atol=0.07)


def test_badge_all_duplicates_falls_back_to_uniform():
    h = np.ones((8, 3), np.float32)
    z = np.zeros((8, 4), np.float32)
    for kernel in ("torch", "numba"):
        got = badge_select(h, z, 8, device="cpu", kernel=kernel)
        assert sorted(got) == list(range(8))


def test_badge_bad_input():
    h = blobs(20, 3)
    with pytest.raises(ValueError, match="outputs"):
        badge_select(h, np.zeros((19, 4)), 3)
    with pytest.raises(TypeError, match="from_logits"):
        badge_select(h, np.zeros((20, 4)), 3, from_logits=1)


# ----------------------------------------------------------------------------- partitioned

def test_partitioned_shares_and_disjoint_parts():
    seen = []

    def fn(idx, b, *, seed, exclude):
        assert not np.isin(idx, exclude).any()
        seen.append((idx.copy(), exclude.copy()))
        return idx[:b]

    excl = np.arange(0, 100, 10)
    got = partitioned(fn, 100, 30, 4, seed=1, exclude=excl)
    assert got.size == 30 and len(set(got)) == 30 and not np.isin(got, excl).any()
    allidx = np.concatenate([np.concatenate([a, b]) for a, b in seen])
    assert sorted(allidx) == list(range(100))  # the parts cover the pool exactly once
    assert np.array_equal(got, partitioned(fn, 100, 30, 4, seed=1, exclude=excl))


def test_coreset_and_badge_partitions_option():
    x = blobs(400, 5, seed=2)
    z = np.random.default_rng(0).normal(size=(400, 5)).astype(np.float32)
    for got in (coreset_select(x, 40, partitions=4, exclude=np.arange(10), device="cpu"),
                badge_select(x, z, 40, partitions=4, exclude=np.arange(10), device="cpu")):
        assert got.size == 40 and len(set(got)) == 40 and got.min() >= 10
    # one part equals the unpartitioned run of that part: check through the generic function
    def one(idx, b, *, seed, exclude):
        sub = coreset_select(x[idx], b, seed=seed, device="cpu")
        return idx[sub]
    got = partitioned(one, 400, 20, 2, seed=5)
    assert got.size == 20 and len(set(got)) == 20


@pytest.mark.gpu
def test_coreset_badge_gpu_equals_cpu():
    x = blobs(500, 8, seed=3)
    z = np.random.default_rng(0).normal(size=(500, 10)).astype(np.float32)
    assert np.array_equal(coreset_select(x, 30, device="cuda"), coreset_select(x, 30, device="cpu"))
    # the torch traversal on both devices (the CPU kernel draws from a different random stream)
    assert np.array_equal(badge_select(x, z, 30, device="cuda"), badge_select(x, z, 30, device="cpu", kernel="torch"))
