"""Near-duplicate filter, auto delta and redundancy report against plain-Python references."""
from __future__ import annotations

import numpy as np
import pytest

from cm_engine.redundancy import (auto_delta, filtered_cluster_margin, filtered_margin, near_duplicate_filter,
                                  redundancy_report)


def random_graph(n, k, rng, *, missing=0.0):
    """A random directed k-NN-like graph: distinct non-self neighbours, ascending distances, -1/inf holes."""
    ind = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        ind[i] = rng.choice(np.delete(np.arange(n), i), k, replace=False)
    dist = np.sort(rng.random((n, k)).astype(np.float32), axis=1)
    if missing:
        hole = np.sort(rng.random((n, k)) < missing, axis=1)  # holes at the end of rows
        ind[hole] = -1
        dist[hole] = np.inf
    return ind, dist


def near_sets(ind, dist, delta):
    """Reference: for each point, the set of points joined to it by an edge <= delta (either direction)."""
    n = ind.shape[0]
    near = [set() for _ in range(n)]
    for i in range(n):
        for j, d in zip(ind[i], dist[i]):
            if j >= 0 and j != i and d <= delta:
                near[i].add(int(j))
                near[int(j)].add(i)
    return near


def greedy_reference(order, ind, dist, delta, labeled):
    near = near_sets(ind, dist, delta)
    lab = set(int(x) for x in (labeled if labeled is not None else []))
    kept, kept_set = [], set()
    for c in order:
        c = int(c)
        if c in lab or near[c] & lab or near[c] & kept_set:
            continue
        kept.append(c)
        kept_set.add(c)
    return np.array(kept, dtype=np.int64)


@pytest.mark.parametrize("trial", range(12))
def test_filter_equals_greedy_loop(trial):
    rng = np.random.default_rng(trial)
    n, k = int(rng.integers(20, 300)), int(rng.integers(1, 8))
    ind, dist = random_graph(n, k, rng, missing=0.2 if trial % 3 == 0 else 0.0)
    delta = float(rng.choice([0.0, 0.05, 0.2, 0.5, 1.0]))
    m = int(rng.integers(0, n + 1))
    order = rng.permutation(n)[:m]
    labeled = None if trial % 2 else rng.choice(n, int(rng.integers(0, n // 3 + 1)), replace=True)
    got = near_duplicate_filter(order, (ind, dist), delta=delta, labeled=labeled)
    want = greedy_reference(order, ind, dist, delta, labeled)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def test_filter_chain_needs_many_rounds():
    # a path 0-1-2-...: the greedy keeps every other point; the round loop must still be exact
    n = 60
    ind = np.stack([np.arange(1, n + 1) % n, np.arange(-1, n - 1) % n], axis=1)
    dist = np.full((n, 2), 0.1, dtype=np.float32)
    ind[-1, 0], dist[-1, 0] = -1, np.inf
    ind[0, 1], dist[0, 1] = -1, np.inf
    dist = np.sort(dist, axis=1)
    order = np.arange(n)
    got = near_duplicate_filter(order, (ind, dist), delta=0.1)
    np.testing.assert_array_equal(got, np.arange(0, n, 2))
    np.testing.assert_array_equal(got, greedy_reference(order, ind, dist, 0.1, None))


def test_filter_on_copy_groups_keeps_one_per_group():
    from cm_engine.knn import knn_graph

    rng = np.random.default_rng(0)
    base = rng.standard_normal((100, 8)).astype(np.float32)
    X = np.repeat(base, 4, axis=0) + 1e-3 * rng.standard_normal((400, 8)).astype(np.float32)
    group = np.repeat(np.arange(100), 4)
    g = knn_graph(X, k=8, metric="l2", backend="torch", device="cpu")
    delta = auto_delta(g)
    assert delta > 0
    kept = near_duplicate_filter(rng.permutation(400), g, delta=delta)
    assert sorted(group[kept].tolist()) == list(range(100))
    # labeled copies suppress their whole group
    lab = np.flatnonzero(group < 30)[::4]
    kept = near_duplicate_filter(np.arange(400), g, delta=delta, labeled=lab)
    assert set(group[kept].tolist()) == set(range(30, 100))


def test_auto_delta_clean_vs_redundant():
    from cm_engine.knn import knn_graph

    rng = np.random.default_rng(1)
    clean = rng.standard_normal((800, 16)).astype(np.float32)
    g = knn_graph(clean, k=10, metric="l2", backend="torch", device="cpu")
    assert auto_delta(g) == 0.0  # no copy mode: only exact duplicates count
    red = np.repeat(clean[:200], 4, axis=0) + 0.01 * rng.standard_normal((800, 16)).astype(np.float32)
    g = knn_graph(red, k=10, metric="l2", backend="torch", device="cpu")
    d = auto_delta(g)
    # copies lie at about 0.01 * sqrt(2 * 16) ~ 0.057, distinct points at ~ sqrt(2 * 16) ~ 5.7
    assert 0.08 < d < 3.0
    copy_d = g.distances[:, :3]
    assert (copy_d <= d).mean() > 0.99 and (g.distances[:, 3:] > d).mean() > 0.99
    # deterministic
    assert auto_delta(g) == d


def test_report_matches_brute_force():
    rng = np.random.default_rng(5)
    for trial in range(8):
        n, k = 150, 5
        ind, dist = random_graph(n, k, rng, missing=0.1)
        delta = float(rng.choice([0.05, 0.2, 0.6]))
        picked = rng.permutation(n)[: int(rng.integers(1, 60))]
        labeled = rng.choice(np.setdiff1d(np.arange(n), picked), 30, replace=False) if trial % 2 else None
        rep = redundancy_report(picked, (ind, dist), delta=delta, labeled=labeled)
        near = near_sets(ind, dist, delta)
        lab = set() if labeled is None else set(labeled.tolist())
        ps = set(picked.tolist())
        nl = [bool(near[p] & lab) or p in lab for p in picked]
        nc = [bool(near[p] & (ps - {p})) for p in picked]
        assert rep["n_picked"] == picked.size
        assert rep["near_labeled"] == pytest.approx(np.mean(nl))
        assert rep["near_copicked"] == pytest.approx(np.mean(nc))
        assert rep["redundant"] == pytest.approx(np.mean(np.array(nl) | np.array(nc)))
        kept = greedy_reference(picked, ind, dist, delta, labeled)
        assert rep["dropped_by_filter"] == pytest.approx(1 - kept.size / picked.size)
    assert redundancy_report([], (ind, dist), delta=0.1)["redundant"] == 0.0


def test_filtered_margin_and_cluster_margin():
    rng = np.random.default_rng(2)
    n, k = 300, 6
    ind, dist = random_graph(n, k, rng)
    scores = rng.random(n).astype(np.float32)
    excl = rng.choice(n, 40, replace=False)
    delta = 0.3
    got = filtered_margin(scores, (ind, dist), 50, delta=delta, exclude=excl)
    order = np.setdiff1d(np.arange(n), excl)
    order = order[np.argsort(scores[order], kind="stable")]
    want = greedy_reference(order, ind, dist, delta, excl)[:50]
    np.testing.assert_array_equal(got, want)
    labels = rng.integers(0, 20, n)
    cm = filtered_cluster_margin(scores, labels, (ind, dist), 30, km_ratio=2.0, delta=delta, exclude=excl, seed=3)
    assert cm.size == 30 and np.unique(cm).size == 30
    assert set(cm.tolist()) <= set(greedy_reference(order, ind, dist, delta, excl)[:60].tolist())
    assert not set(cm.tolist()) & set(excl.tolist())
    # budget 0, and a budget larger than the survivors
    assert filtered_margin(scores, (ind, dist), 0, delta=delta).size == 0
    # a budget larger than the survivors: survivors first, then the rest in score order
    allkept = greedy_reference(np.argsort(scores, kind="stable"), ind, dist, delta, None)
    got = filtered_margin(scores, (ind, dist), n, delta=delta)
    np.testing.assert_array_equal(got[:allkept.size], allkept)
    rest = np.setdiff1d(np.arange(n), allkept)
    np.testing.assert_array_equal(got[allkept.size:], rest[np.argsort(scores[rest], kind="stable")])
    got = filtered_cluster_margin(scores, labels, (ind, dist), n - 40, km_ratio=1.0, delta=delta, exclude=excl)
    assert np.unique(got).size == n - 40 and not set(got.tolist()) & set(excl.tolist())


def test_bad_input():
    rng = np.random.default_rng(0)
    ind, dist = random_graph(30, 3, rng)
    with pytest.raises(ValueError, match="delta"):
        near_duplicate_filter([0, 1], (ind, dist), delta=-1.0)
    with pytest.raises(ValueError, match="delta"):
        near_duplicate_filter([0, 1], (ind, dist), delta=float("nan"))
    with pytest.raises(ValueError, match="order"):
        near_duplicate_filter([0, 0], (ind, dist), delta=0.1)
    with pytest.raises(ValueError, match="order"):
        near_duplicate_filter([0, 30], (ind, dist), delta=0.1)
    with pytest.raises(ValueError, match="labeled"):
        near_duplicate_filter([0], (ind, dist), delta=0.1, labeled=[-1])
    with pytest.raises(ValueError, match="distances"):
        near_duplicate_filter([0], (ind, dist[:, :2]), delta=0.1)
    with pytest.raises(TypeError, match="graph"):
        near_duplicate_filter([0], object(), delta=0.1)
    with pytest.raises(TypeError, match="order"):
        near_duplicate_filter([0.5], (ind, dist), delta=0.1)
    with pytest.raises(ValueError, match="graph"):
        filtered_margin(np.zeros(10), (ind, dist), 3, delta=0.1)
    with pytest.raises(ValueError, match="budget"):
        filtered_margin(np.zeros(30), (ind, dist), -1, delta=0.1)
    with pytest.raises(ValueError, match="km_ratio"):
        filtered_cluster_margin(np.zeros(30), np.zeros(30, int), (ind, dist), 3, km_ratio=0.5, delta=0.1)


# ---------------------------------------------------------------------------------------------
# the numba kernel (incremental windows, key ties, -1 entries) against the numpy rounds and the loop

@pytest.fixture(params=["numba", "numpy"])
def kernel(request, monkeypatch):
    import cm_engine.redundancy as R

    if request.param == "numba" and not R.HAVE_NUMBA:
        pytest.skip("numba not installed")
    monkeypatch.setattr(R, "NUMBA_MIN_WORK", 0 if request.param == "numba" else 10**12)
    return request.param


def test_kernels_equal_greedy_loop(kernel):
    for trial in range(40):
        rng = np.random.default_rng(1000 + trial)
        n, k = int(rng.integers(2, 160)), int(rng.integers(1, 7))
        k = max(1, min(k, n - 1))
        ind, dist = random_graph(n, k, rng, missing=0.25 if trial % 3 == 0 else 0.0)
        if trial % 4 == 1:
            dist = np.round(dist * 4) / 4  # equal distances, exactly delta among them
        if trial % 5 == 2:  # -1 entries with a finite distance inside a row: skipped, not an end
            hole = rng.random((n, k)) < 0.2
            ind[hole] = -1
        delta = float(rng.choice([0.0, 0.05, 0.25, 0.5, 1.0]))
        order = rng.permutation(n)[: int(rng.integers(0, n + 1))]
        labeled = None if trial % 2 else rng.choice(n, int(rng.integers(0, n // 3 + 1)), replace=True)
        graph = (ind.astype(np.int32) if trial % 3 == 2 else ind, dist)
        got = near_duplicate_filter(order, graph, delta=delta, labeled=labeled)
        np.testing.assert_array_equal(got, greedy_reference(order, ind, dist, delta, labeled))


@pytest.mark.parametrize("score_dtype", [np.float32, np.float64])
def test_window_growth_equals_greedy_loop(kernel, score_dtype, monkeypatch):
    # tiny first windows and a coarse sample force many extensions; rounded scores force key ties
    import cm_engine.redundancy as R
    from cm_engine.redundancy import _filtered_candidates

    for trial in range(30):
        rng = np.random.default_rng(2000 + trial)
        n, k = int(rng.integers(2, 200)), int(rng.integers(1, 6))
        k = max(1, min(k, n - 1))
        ind, dist = random_graph(n, k, rng)
        delta = float(rng.choice([0.05, 0.25, 0.5, 1.0]))
        s = rng.random(n).astype(score_dtype)
        if trial % 3 == 1:
            s = np.round(s * 5) / 5
        excl = None if trial % 4 == 0 else rng.choice(n, int(rng.integers(0, n // 2 + 1)), replace=False)
        want = int(rng.integers(1, n + 1))
        monkeypatch.setattr(R, "EXTEND_SAMPLE", int(rng.integers(1, 40)))
        got, _ = _filtered_candidates(s, (ind, dist), want, int(rng.integers(1, 5)), delta=delta, excl=excl)
        elig = np.arange(n) if excl is None else np.setdiff1d(np.arange(n), excl)
        order = elig[np.lexsort((elig, s[elig]))]
        np.testing.assert_array_equal(got, np.sort(greedy_reference(order, ind, dist, delta, excl)[:want]))


def test_filtered_strategies_same_on_both_kernels(monkeypatch):
    import cm_engine.redundancy as R

    if not R.HAVE_NUMBA:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(7)
    n = 3000
    group = rng.integers(0, 700, n)  # copy groups: near edges inside a group
    ind = np.empty((n, 6), np.int64)
    dist = np.empty((n, 6), np.float32)
    for i in range(n):
        mates = np.flatnonzero(group == group[i])
        mates = mates[mates != i][:3]
        others = rng.choice(n, 6 - mates.size, replace=False)
        ind[i] = np.concatenate([mates, others])
        dist[i] = np.concatenate([rng.uniform(0, 0.01, mates.size), rng.uniform(0.1, 1, others.size)])
        o = np.argsort(dist[i], kind="stable")
        ind[i], dist[i] = ind[i][o], dist[i][o]
    s = rng.random(n).astype(np.float32)
    labels = rng.integers(0, 50, n)
    excl = rng.choice(n, 300, replace=False)
    out = {}
    for name, mw in (("numba", 0), ("numpy", 10**12)):
        monkeypatch.setattr(R, "NUMBA_MIN_WORK", mw)
        out[name] = (filtered_margin(s, (ind, dist), 400, delta=0.02, exclude=excl),
                     filtered_cluster_margin(s, labels, (ind, dist), 200, km_ratio=1.25, delta=0.02, exclude=excl,
                                             seed=1),
                     redundancy_report(np.arange(0, n, 3), (ind, dist), delta=0.02, labeled=excl))
    np.testing.assert_array_equal(out["numba"][0], out["numpy"][0])
    np.testing.assert_array_equal(out["numba"][1], out["numpy"][1])
    assert out["numba"][2] == out["numpy"][2]


def test_auto_delta_same_on_both_kernels(monkeypatch):
    import cm_engine.redundancy as R

    if not R.HAVE_NUMBA:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(11)
    hist = R._numba_kernels()["histogram_uniform"]
    for t in range(60):  # numpy's uniform-bin histogram, values on the edges included
        v = rng.standard_normal(int(rng.integers(2, 2000)))
        if t % 3 == 0:
            v = np.round(v * 8) / 8
        if t % 2:
            e = np.linspace(v.min(), v.max(), R.BINS + 1)
            v = np.concatenate([v, e[rng.integers(0, R.BINS + 1, 40)]])
        want, edges = np.histogram(v, bins=R.BINS)
        np.testing.assert_array_equal(hist(v, np.linspace(v.min(), v.max(), R.BINS + 1)), want)
    for trial in range(6):
        n, k = 3000, 8
        ind = rng.integers(-1, n, (n, k))
        dist = np.sort(rng.random((n, k)).astype(np.float32), axis=1)
        if trial % 2:
            dist[:, :2] *= 1e-3  # a copy mode
        dist[ind < 0] = np.inf
        dist[rng.random((n, k)) < 0.01] = 0.0  # exact duplicates: left out
        got = {}
        for name, mw in (("numba", 0), ("numpy", 10**12)):
            monkeypatch.setattr(R, "NUMBA_MIN_WORK", mw)
            monkeypatch.setattr(R, "SAMPLE_ROWS", 1000 if trial < 3 else 65536)
            got[name] = auto_delta((ind, dist), seed=trial)
        assert got["numba"] == got["numpy"]
        assert (got["numba"] > 0) == bool(trial % 2)
