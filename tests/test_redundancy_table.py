"""NearCopies (the per-pool near-copy table): its build against a plain-Python reference, and every
filter entry point on the table against the graph path and the greedy loop, on both kernels."""
from __future__ import annotations

import numpy as np
import pytest

import cm_engine.redundancy as R
from cm_engine.redundancy import (NearCopies, filtered_cluster_margin, filtered_margin, near_duplicate_filter,
                                  redundancy_report)
from test_redundancy import greedy_reference, random_graph
from test_redundancy import kernel  # noqa: F401  (the fixture: numba and numpy kernels, as in test_redundancy)


def prefix_near_sets(ind, dist, delta):
    """Reference: j near i when listed by i (or i by j) inside the row's leading run of distances <=
    delta (rows ascending, as knn_graph writes them), j >= 0, j != i."""
    n = ind.shape[0]
    near = [set() for _ in range(n)]
    for i in range(n):
        for j, d in zip(ind[i], dist[i]):
            if not d <= delta:
                break
            if j >= 0 and j != i:
                near[i].add(int(j))
                near[int(j)].add(i)
    return near


def hard_graph(trial, rng):
    """Random directed graphs with the awkward cases: -1/inf holes, -1 inside a row, equal
    distances at exactly delta, self entries, int32 indices, one-directional edges."""
    n, k = int(rng.integers(2, 160)), int(rng.integers(1, 7))
    k = max(1, min(k, n - 1))
    ind, dist = random_graph(n, k, rng, missing=0.25 if trial % 3 == 0 else 0.0)
    if trial % 4 == 1:
        dist = np.round(dist * 4) / 4  # ties, exactly delta among them
    if trial % 5 == 2:
        ind[rng.random((n, k)) < 0.2] = -1  # a -1 with a finite distance: skipped, not an end
    if trial % 7 == 3:
        ind[:, 0] = np.arange(n)  # self entries: never a near-copy
    delta = float(rng.choice([0.0, 0.05, 0.25, 0.5, 1.0]))
    return (ind.astype(np.int32) if trial % 3 == 2 else ind), dist, delta


def test_table_build_matches_reference(kernel):
    for trial in range(14):
        rng = np.random.default_rng(3000 + trial)
        ind, dist, delta = hard_graph(trial, rng)
        t = NearCopies.from_graph((ind, dist), delta=delta)
        near = prefix_near_sets(ind, dist, delta)
        # the compact form: groups of near-copies on consecutive ids, pool order inside a group
        cid, coff, cnb = t._compact()
        has = np.flatnonzero(t.degree() > 0)
        assert sorted(cid[has].tolist()) == list(range(has.size)) and (cid[t.degree() == 0] == -1).all()
        node = np.empty(has.size, np.int64)
        node[cid[has]] = has
        for c in range(has.size):
            assert sorted(node[cnb[coff[c]:coff[c + 1]]].tolist()) == sorted(near[node[c]])
            for j in cnb[coff[c]:coff[c + 1]]:  # ids order near-copies as pool indices do
                assert (j < c) == (node[j] < node[c])
        assert t.n == ind.shape[0] and t.delta == delta
        assert t.offsets.dtype == np.int64 and t.neighbours.dtype == np.int32
        for i in range(t.n):
            row = t.neighbours[t.offsets[i]:t.offsets[i + 1]]
            np.testing.assert_array_equal(row, sorted(near[i]))
        assert t.n_pairs == sum(len(x) for x in near) // 2
        np.testing.assert_array_equal(t.degree(), [len(x) for x in near])
        rows = rng.permutation(t.n)[: int(rng.integers(0, t.n + 1))]
        src, dst = t.pairs(rows)
        want = [(int(r), j) for r in rows for j in sorted(near[r])]
        assert list(zip(src.tolist(), dst.tolist())) == want


def test_table_builds_agree():
    if not R.HAVE_NUMBA:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(9)
    for trial in range(10):
        ind, dist, delta = hard_graph(trial, rng)
        a = R._numba_kernels()["build_table"](ind, dist, dist.dtype.type(delta))
        b = R._table_numpy(ind, dist, dist.dtype.type(delta))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@pytest.fixture(params=["scan", "chunk"])
def walk(request, monkeypatch):
    """The chunk kernel's walk starts: every compact id in order, or the chunk's own ids."""
    monkeypatch.setattr(R, "SCAN_RATIO", 10**12 if request.param == "scan" else 0)
    return request.param


def test_table_filter_equals_graph_and_loop(kernel, walk):
    for trial in range(40):
        rng = np.random.default_rng(1000 + trial)
        ind, dist, delta = hard_graph(trial, rng)
        n = ind.shape[0]
        t = NearCopies.from_graph((ind, dist), delta=delta)
        order = rng.permutation(n)[: int(rng.integers(0, n + 1))]
        labeled = None if trial % 2 else rng.choice(n, int(rng.integers(0, n // 3 + 1)), replace=True)
        want = greedy_reference(order, ind, dist, delta, labeled)
        got = near_duplicate_filter(order, t, labeled=labeled)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, near_duplicate_filter(order, (ind, dist), delta=delta, labeled=labeled))
        picked = rng.permutation(n)[: int(rng.integers(0, n + 1))]
        lab = None if labeled is None else np.setdiff1d(labeled, picked)
        assert redundancy_report(picked, t, labeled=lab) == redundancy_report(picked, (ind, dist), delta=delta,
                                                                               labeled=lab)


@pytest.mark.parametrize("score_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("start", [None, "tiny"])
def test_table_window_growth_equals_loop(kernel, walk, score_dtype, start, monkeypatch):
    # tiny first windows and coarse samples force many extensions; rounded scores force key ties
    for trial in range(16):
        rng = np.random.default_rng(2000 + trial)
        ind, dist, delta = hard_graph(trial, rng)
        n = ind.shape[0]
        t = NearCopies.from_graph((ind, dist), delta=delta)
        s = rng.random(n).astype(score_dtype)
        if trial % 3 == 1:
            s = np.round(s * 5) / 5
        excl = None if trial % 4 == 0 else rng.choice(n, int(rng.integers(0, n // 2 + 1)), replace=False)
        want = int(rng.integers(1, n + 1))
        monkeypatch.setattr(R, "EXTEND_SAMPLE", int(rng.integers(1, 40)))
        monkeypatch.setattr(R, "WINDOW_MARGIN", float(rng.choice([0.3, 1.0, 1.25, 3.0])))
        st = None if start is None else int(rng.integers(1, 5))
        got, _ = R._filtered_candidates(s, t, want, st, delta=delta, excl=excl)
        elig = np.arange(n) if excl is None else np.setdiff1d(np.arange(n), excl)
        order = elig[np.lexsort((elig, s[elig]))]
        np.testing.assert_array_equal(got, np.sort(greedy_reference(order, ind, dist, delta, excl)[:want]))
        got_g, _ = R._filtered_candidates(s, (ind, dist), want, st, delta=delta, excl=excl)
        np.testing.assert_array_equal(got_g, got)


def test_table_strategies_equal_graph(kernel):
    # copy groups (mostly mutual near edges, some one-directional), ties in the scores
    rng = np.random.default_rng(7)
    n = 3000
    group = rng.integers(0, 700, n)
    ind = np.empty((n, 6), np.int64)
    dist = np.empty((n, 6), np.float32)
    for i in range(n):
        mates = np.flatnonzero(group == group[i])
        mates = mates[mates != i][: int(rng.integers(0, 4))]
        others = rng.choice(n, 6 - mates.size, replace=False)
        ind[i] = np.concatenate([mates, others])
        dist[i] = np.concatenate([rng.uniform(0, 0.01, mates.size), rng.uniform(0.1, 1, others.size)])
        o = np.argsort(dist[i], kind="stable")
        ind[i], dist[i] = ind[i][o], dist[i][o]
    s = (np.round(rng.random(n) * 200) / 200).astype(np.float32)
    labels = rng.integers(0, 50, n)
    excl = rng.choice(n, 300, replace=False)
    t = NearCopies.from_graph((ind, dist), delta=0.02)
    for b in (1, 50, 400, 2500):
        np.testing.assert_array_equal(filtered_margin(s, t, b, exclude=excl),
                                      filtered_margin(s, (ind, dist), b, delta=0.02, exclude=excl))
        for km in (1.0, 1.25, 10.0):
            for order in ("smallest", "random"):
                a = filtered_cluster_margin(s, labels, t, b, km_ratio=km, exclude=excl, seed=1, order=order)
                g = filtered_cluster_margin(s, labels, (ind, dist), b, km_ratio=km, delta=0.02, exclude=excl,
                                            seed=1, order=order)
                np.testing.assert_array_equal(a, g)
    from cm_engine.strategies import cluster_margin

    np.testing.assert_array_equal(cluster_margin(s, labels, 200, km_ratio=3.0, exclude=excl, dedup_graph=t),
                                  cluster_margin(s, labels, 200, km_ratio=3.0, exclude=excl, dedup_graph=(ind, dist),
                                                 delta=0.02))


def test_table_delta_and_bad_input():
    rng = np.random.default_rng(0)
    ind, dist = random_graph(30, 3, rng)
    t = NearCopies.from_graph((ind, dist), delta=0.3)
    assert "n_pairs" in repr(t)
    assert near_duplicate_filter([0, 1], t, delta=0.3).size >= 1
    with pytest.raises(ValueError, match="delta"):
        near_duplicate_filter([0, 1], t, delta=0.2)  # the table holds one delta
    with pytest.raises(ValueError, match="delta"):
        NearCopies.from_graph((ind, dist), delta=-1.0)
    with pytest.raises(ValueError, match="graph"):
        filtered_margin(np.zeros(10), t, 3)
    with pytest.raises(ValueError, match="order"):
        near_duplicate_filter([0, 30], t)
    with pytest.raises(ValueError, match="graph.indices"):
        NearCopies.from_graph((np.full((4, 2), 7), np.zeros((4, 2), np.float32)), delta=0.1)
    with pytest.raises(ValueError, match="offsets"):
        NearCopies(np.array([0, 2, 1]), np.array([1, 0]), 0.1)
    with pytest.raises(ValueError, match="neighbours"):
        NearCopies(np.array([0, 1, 2]), np.array([1, 5]), 0.1)
    # delta None: auto_delta of the graph, as the graph path
    assert NearCopies.from_graph((ind, dist)).delta == R.auto_delta((ind, dist))


def test_selectors_build_the_table_once(tmp_path, monkeypatch):
    from cm_engine.knn import knn_graph
    from cm_engine.selector import ClusterMarginSelector, Selector
    from cm_engine.strategies import cluster_margin

    rng = np.random.default_rng(4)
    base = rng.normal(size=(50, 8)).astype(np.float32) * 3
    x = np.repeat(base, 4, axis=0) + 1e-3 * rng.normal(size=(200, 8)).astype(np.float32)
    n = x.shape[0]
    lab = np.arange(n) % 9
    g = knn_graph(x, k=6, metric="l2")
    built = []
    orig = NearCopies.from_graph.__func__
    monkeypatch.setattr(NearCopies, "from_graph", classmethod(lambda cls, *a, **k: built.append(1) or orig(cls, *a, **k)))
    sel = ClusterMarginSelector(x, state_dir=tmp_path / "c", labels=lab, km_ratio=2.0, seed=1, graph=g, dedup=True)
    m = Selector("margin", n=n, state_dir=tmp_path / "m", dedup_graph=g)
    for r in range(3):
        before = sel.picked
        s = rng.random(n).astype(np.float32)
        new = sel.select_scores(s, 10)
        want = cluster_margin(s, lab, 10, km_ratio=2.0, exclude=before, seed=np.random.default_rng([1, r, 0x5E1]),
                              dedup_graph=g, delta=sel.delta)
        np.testing.assert_array_equal(new, want)
        assert sel.redundancy()["redundant"] == 0.0
        m.select(rng.standard_normal((n, 3)).astype(np.float32), 10)
    assert len(built) == 2  # one table per selector, reused by every round and report
    assert sel.redundancy(delta=sel.delta / 2)["n_picked"] == 10  # another delta: the graph serves it


def test_sample_stats_matches_reference():
    # the window estimate's kernel: -1 for a labeled point or a near-copy of one, else its near-copies
    # with a lower (score, index) key that are neither (rows without near-copies: 0)
    if not R.HAVE_NUMBA:
        pytest.skip("numba not installed")
    for trial in range(20):
        rng = np.random.default_rng(4000 + trial)
        ind, dist, delta = hard_graph(trial, rng)
        n = ind.shape[0]
        near = prefix_near_sets(ind, dist, delta)
        t = NearCopies.from_graph((ind, dist), delta=delta)
        s = rng.random(n).astype(np.float32)
        if trial % 2:
            s = np.round(s * 4) / 4
        lab = rng.choice(n, int(rng.integers(0, n // 3 + 1)), replace=False)
        f = R._TableFilter(t, lab, work=0, key_full=s, kernel="numba")
        rows = rng.permutation(n)[: int(rng.integers(0, n + 1))]
        L = set(lab.tolist())
        blocked = [bool(near[i]) and (i in L or bool(near[i] & L)) for i in range(n)]
        want = [-1 if blocked[a] else sum(1 for u in near[a] if (s[u], u) < (s[a], a) and not blocked[u])
                for a in rows]
        np.testing.assert_array_equal(f.sample_stats(rows, s), want)


def test_select_range_and_kept_kernels_match_reference():
    # the window kernels: select_range (first-window and split-at-i1 loops, with and without an
    # eligibility mask) against the numpy expression; compact_kept against a plain loop
    if not R.HAVE_NUMBA:
        pytest.skip("numba not installed")
    K = R._numba_kernels()
    for trial in range(60):
        rng = np.random.default_rng(5000 + trial)
        n = int(rng.integers(1, 300))
        s = rng.random(n).astype(np.float32 if trial % 2 else np.float64)
        if trial % 3 == 0:
            s = np.round(s * 6) / 6  # ties at t1 and t2
        if trial % 5 == 1:
            s[rng.random(n) < 0.1] = -np.inf
        elig = None if trial % 4 == 0 else rng.random(n) < 0.7
        t1 = s.dtype.type(-np.inf) if trial % 3 == 1 else s[int(rng.integers(0, n))]
        i1 = int(rng.choice([-1, 0, int(rng.integers(0, n)), n - 1, n + 5]))
        t2 = s.dtype.type(np.inf) if trial % 7 == 2 else s[int(rng.integers(0, n))]
        got = R._select_range(s, elig, t1, i1, t2, "numba")
        want = R._select_range(s, elig, t1, i1, t2, "numpy")
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)

        m = int(rng.integers(0, 50))
        cid = np.full(n, -1, dtype=np.int32)
        nodes = rng.permutation(n)[: min(m, n)]
        cid[nodes] = np.arange(nodes.size, dtype=np.int32)
        flag = rng.choice(np.array([0, 1, 3, 4], dtype=np.uint8), nodes.size)
        win = np.sort(rng.permutation(n)[: int(rng.integers(0, n + 1))]).astype(np.int64)
        want = [p for p, a in enumerate(win) if cid[a] < 0 or flag[cid[a]] == 3]
        np.testing.assert_array_equal(K["compact_kept"](win, cid, flag), np.array(want, dtype=np.int64))
