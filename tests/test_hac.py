"""Graph average-linkage HAC (cm_engine.hac) against scipy and a slow, obvious reference."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist, pdist, squareform

from cm_engine.hac import HACParams, Merges, cut, epsilon_for_mean_size, graph_hac, hac_merges

MISSING = ["constant", "bound", "edges"]  # the rules that need only the graph
ALL = ["exact"] + MISSING  # "exact" also needs the embeddings, and a cosine graph


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(params=["fused", "torch"])
def ops(request, monkeypatch):
    """The rounds' CPU ops: the fused numba kernels (the CPU default) or torch's whole-array ops,
    which a GPU runs (`_hac_kernels.CPU_KERNELS`)."""
    from cm_engine import _hac_kernels as K

    monkeypatch.setattr(K, "CPU_KERNELS", request.param == "fused")
    return request.param


def knn(X, k, metric):
    """Brute-force k-NN in float64: indices int64 [N, k], distances [N, k] ascending, self excluded."""
    D = squareform(pdist(X, metric))
    np.fill_diagonal(D, np.inf)
    idx = np.argsort(D, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(D, idx, 1)


def clustered(n, d, rng, centers=8):
    c = rng.normal(size=(centers, d)) * 4
    return c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))


def same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def ref_rac(idx, dist, missing="constant", missing_value=None, X=None, relink=0):
    """Slow reference: the same rounds (all reciprocal nearest-neighbour pairs of adjacent
    clusters merge, ties to the smaller slot), with dense pair sums and Python loops.
    missing="exact": the linkage is the mean of the dense cosine distances of X over all member
    pairs (adjacency still from the graph). relink > 0 (with "exact"): after the round in which
    the clusters first number <= n/2 (then <= that count / 2, ...), and whenever no pair is left
    (once per count), every cluster becomes adjacent to the `relink` clusters whose sums of unit
    rows have the largest cosine with its own; a stall that adds nothing ends the run.
    Returns sorted heights and a function eps -> labels."""
    n, k = idx.shape
    Dfull = squareform(pdist(X, "cosine")) if missing == "exact" else None
    S = np.zeros((n, n))
    C = np.zeros((n, n))
    M = np.zeros((n, n))
    r = np.array([max([dist[i, j] for j in range(k) if idx[i, j] >= 0], default=0.0) for i in range(n)])
    seen = {}
    for i in range(n):
        for j in range(k):
            t = idx[i, j]
            if t >= 0:
                seen.setdefault((min(i, t), max(i, t)), []).append(dist[i, j])
    for (a, b), ds in seen.items():
        S[a, b] = S[b, a] = np.mean(ds)
        C[a, b] = C[b, a] = 1
        M[a, b] = M[b, a] = (r[a] + r[b]) / 2
    cval = missing_value if missing_value is not None else r.max()
    size = {i: 1 for i in range(n)}
    Rsum = {i: r[i] for i in range(n)}
    members = {i: [i] for i in range(n)}
    height = {i: 0.0 for i in range(n)}
    merges = []  # (height, members-after)

    def L(a, b):
        prod = size[a] * size[b]
        if missing == "exact":
            return Dfull[np.ix_(members[a], members[b])].mean()
        if C[a, b] == prod or missing == "edges":
            return S[a, b] / C[a, b]
        if missing == "bound":
            return (S[a, b] + (size[b] * Rsum[a] + size[a] * Rsum[b]) / 2 - M[a, b]) / prod
        return (S[a, b] + cval * (prod - C[a, b])) / prod

    U = X / np.linalg.norm(X, axis=1, keepdims=True) if X is not None else None

    def add_links():
        alive = sorted(size)
        kk = min(relink, len(alive) - 1)
        if kk < 1:
            return False
        sums = np.stack([U[members[a]].sum(0) for a in alive])
        unit = sums / np.linalg.norm(sums, axis=1, keepdims=True)
        cos = unit @ unit.T
        new = False
        for i, a in enumerate(alive):
            order = [j for j in np.argsort(-cos[i], kind="stable") if j != i][:kk]
            for j in order:
                b = alive[j]
                if C[a, b] == 0:
                    C[a, b] = C[b, a] = 1  # adjacency only: the "exact" linkage ignores C
                    new = True
        return new

    next_level, stalled_at = (n // 2 if relink else -1), n + 1
    while True:
        alive = sorted(size)
        nn = {}
        for a in alive:
            best = (np.inf, None)
            for b in alive:
                if b != a and C[a, b] > 0:
                    cand = (L(a, b), b)
                    if cand < best:
                        best = cand
            nn[a] = best
        pairs = [(a, nn[a][1], nn[a][0]) for a in alive
                 if nn[a][1] is not None and a < nn[a][1] and nn[nn[a][1]][1] == a]
        if not pairs:
            if not relink or len(size) >= stalled_at or len(size) < 2:
                break
            stalled_at = len(size)
            next_level = min(next_level, len(size) // 2)
            if not add_links():
                break
            continue
        for a, b, h in pairs:
            h = max(h, height[a], height[b])
            for arr in (S, C, M):
                arr[a, :] += arr[b, :]
                arr[:, a] += arr[:, b]
                arr[b, :] = 0
                arr[:, b] = 0
                arr[a, a] = 0
            size[a] += size.pop(b)
            Rsum[a] += Rsum.pop(b)
            members[a] += members.pop(b)
            height[a] = h
            height.pop(b)
            merges.append((h, list(members[a])))
        if relink and len(size) <= next_level:
            next_level = len(size) // 2
            add_links()
    heights = np.array(sorted(h for h, _ in merges))

    def labels(eps):
        lab = np.arange(n)
        for h, mem in sorted(merges, key=lambda t: t[0]):
            if h <= eps:
                lab[mem] = min(mem)
        return lab

    return heights, labels


def midpoints(h):
    """Cut heights strictly between distinct consecutive merge heights (no near-ties)."""
    h = np.unique(h)
    gaps = np.diff(h)
    mids = (h[:-1] + h[1:]) / 2
    return np.concatenate([[h[0] / 2], mids[gaps > 1e-9 * np.maximum(1, h[1:])], [h[-1] * 1.01]])


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("metric,missing", [(mt, ms) for mt in ["euclidean", "cosine"] for ms in ALL
                                            if mt == "cosine" or ms != "exact"])
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_complete_graph_equals_scipy(metric, data, missing):
    rng = np.random.default_rng(hash((metric, data, missing)) % 2**32)
    n = 120
    X = rng.normal(size=(n, 6)) if data == "random" else clustered(n, 6, rng)
    idx, dist = knn(X, n - 1, metric)
    m = hac_merges((idx, dist), embeddings=X if missing == "exact" else None, missing=missing, device="cpu")
    Z = linkage(X, "average", metric=metric)
    assert len(m) == n - 1
    np.testing.assert_allclose(m.dist, np.sort(Z[:, 2]), rtol=1e-12, atol=1e-12)
    for eps in midpoints(Z[:, 2])[:: 3]:
        assert same_partition(cut(m, eps), fcluster(Z, eps, "distance")), eps
    # to_linkage is a valid scipy linkage with the same flat clusters
    for eps in np.quantile(Z[:, 2], [0.2, 0.6, 0.9]):
        assert same_partition(fcluster(m.to_linkage(), eps, "distance"), fcluster(Z, eps, "distance"))


@pytest.mark.parametrize("metric,n,missing", [("euclidean", 2000, "constant"), ("cosine", 700, "constant"),
                                              ("cosine", 700, "exact")])
def test_complete_graph_large(metric, n, missing):
    rng = np.random.default_rng(7)
    X = clustered(n, 5, rng, centers=12)
    idx, dist = knn(X, n - 1, metric)
    m = hac_merges((idx, dist), embeddings=X if missing == "exact" else None, missing=missing, device="cpu")
    Z = linkage(X, "average", metric=metric)
    np.testing.assert_allclose(m.dist, np.sort(Z[:, 2]), rtol=1e-10, atol=1e-12)
    mids = midpoints(Z[:, 2])
    for eps in mids[np.linspace(0, len(mids) - 1, 25).astype(int)]:
        assert same_partition(cut(m, eps), fcluster(Z, eps, "distance")), eps


def test_graph_hac_contract_complete():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(150, 4))
    idx, dist = knn(X, 149, "euclidean")
    Z = linkage(X, "average")
    for eps in np.quantile(Z[:, 2], [0.05, 0.3, 0.7, 0.99]):
        lab = graph_hac((idx, dist), epsilon=eps, device="cpu")
        assert lab.dtype == np.int64
        assert same_partition(lab, fcluster(Z, eps, "distance"))
        assert set(np.unique(lab)) == set(range(lab.max() + 1))


# ------------------------------------------------------------------------------ sparse graphs vs reference


@pytest.mark.parametrize("missing", MISSING)
@pytest.mark.parametrize("k", [3, 8])
def test_knn_graph_equals_reference(missing, k, ops):
    rng = np.random.default_rng(k)
    X = clustered(70, 4, rng, centers=5)
    idx, dist = knn(X, k, "euclidean")
    idx = idx.copy()
    idx[rng.random(idx.shape) < 0.1] = -1  # some missing entries
    m = hac_merges((idx, dist), missing=missing, device="cpu")
    h, labels = ref_rac(idx, dist, missing)
    np.testing.assert_allclose(m.dist, h, rtol=1e-12, atol=1e-12)
    for eps in midpoints(h):
        assert same_partition(cut(m, eps), labels(eps)), eps


@pytest.mark.parametrize("k", [3, 8])
def test_exact_rule_equals_reference(k, ops):
    """missing="exact" on a sparse cosine graph: the dense mean over member pairs, adjacency
    from the graph; float32 embeddings give the same merges up to float32 rounding."""
    rng = np.random.default_rng(20 + k)
    X = clustered(70, 4, rng, centers=5)
    idx, dist = knn(X, k, "cosine")
    idx = idx.copy()
    idx[rng.random(idx.shape) < 0.1] = -1
    # relink=0: merges along graph edges only (the rule itself); relinking is tested below.
    m = hac_merges((idx, dist), embeddings=X, relink=0, device="cpu")  # missing=None: "exact" with embeddings
    h, labels = ref_rac(idx, dist, "exact", X=X)
    np.testing.assert_allclose(m.dist, h, rtol=1e-10, atol=1e-12)
    for eps in midpoints(h):
        assert same_partition(cut(m, eps), labels(eps)), eps
    m32 = hac_merges((idx, dist), embeddings=torch.from_numpy(X.astype(np.float32)), missing="exact", relink=0,
                     device="cpu")
    np.testing.assert_allclose(m32.dist, h, rtol=1e-4, atol=1e-5)
    mids = midpoints(h)
    eps = mids[len(mids) // 2]
    assert same_partition(cut(m32, eps), labels(eps))
    assert same_partition(graph_hac((idx, dist), epsilon=eps, embeddings=X, relink=0, device="cpu"), labels(eps))


@pytest.mark.parametrize("k,relink", [(2, 3), (3, 2), (4, 6), (8, 16)])
def test_relink_equals_reference(k, relink, ops):
    """Relinking (the default with "exact"): the same rounds as the slow reference, whose links are
    a dense argsort of the cosines between cluster sums, on graphs with missing entries and
    several components (the stall relinks join them)."""
    rng = np.random.default_rng(40 + k)
    X = clustered(80, 5, rng, centers=6)
    idx, dist = knn(X, k, "cosine")
    idx = idx.copy()
    idx[rng.random(idx.shape) < 0.2] = -1
    m = hac_merges((idx, dist), embeddings=X, relink=relink, device="cpu")
    h, labels = ref_rac(idx, dist, "exact", X=X, relink=relink)
    assert len(m) == len(h) == 79  # the stall relinks leave one tree
    np.testing.assert_allclose(m.dist, h, rtol=1e-10, atol=1e-12)
    for eps in midpoints(h):
        assert same_partition(cut(m, eps), labels(eps)), eps
    assert len(hac_merges((idx, dist), embeddings=X, relink=0, device="cpu")) < 79  # it did relink


def test_relink_default_and_closer_to_exact():
    """relink=None is RELINK_K with "exact" (and off otherwise); on data where a sparse graph's
    adjacency misleads average linkage, relinking agrees with all-pairs average linkage (scipy)
    better than merging along graph edges only, at every cut tried."""
    from sklearn.metrics import adjusted_rand_score

    from cm_engine.hac import RELINK_K

    assert HACParams().relink == RELINK_K and HACParams(missing="constant").relink == 0
    rng = np.random.default_rng(1)
    # wide, overlapping blobs (like CNN features): near neighbours are a poor guide to average linkage
    X = clustered(600, 16, rng, centers=12) + rng.normal(scale=3.0, size=(600, 16))
    idx, dist = knn(X, 5, "cosine")
    Z = linkage(X, "average", metric="cosine")
    default = hac_merges((idx, dist), embeddings=X, device="cpu")
    on = hac_merges((idx, dist), embeddings=X, relink=RELINK_K, device="cpu")
    np.testing.assert_array_equal(default.dist, on.dist)
    off = hac_merges((idx, dist), embeddings=X, relink=0, device="cpu")
    for size in (4, 10, 30):
        want = fcluster(Z, len(X) // size, "maxclust")
        a_on = adjusted_rand_score(want, cut(on, epsilon_for_mean_size(on, size)))
        a_off = adjusted_rand_score(want, cut(off, epsilon_for_mean_size(off, size)))
        # measured: relinked 1.000 at all three sizes, graph edges only 0.964 / 0.983 / 0.954
        assert a_on > 0.999 and a_off < 0.99, (size, a_on, a_off)


def test_exact_rule_is_not_the_graph_rules():
    """On a sparse graph "exact" differs from "constant" (it sees the true far-pair distances)."""
    rng = np.random.default_rng(4)
    X = clustered(200, 6, rng, centers=10)
    idx, dist = knn(X, 4, "cosine")
    a = hac_merges((idx, dist), embeddings=X, relink=0, device="cpu")
    b = hac_merges((idx, dist), missing="constant", device="cpu")
    assert not np.allclose(a.dist, b.dist)


def test_missing_value_and_max_epsilon():
    rng = np.random.default_rng(11)
    X = clustered(80, 3, rng)
    idx, dist = knn(X, 5, "euclidean")
    m = hac_merges((idx, dist), missing="constant", missing_value=3.0, device="cpu")
    h, labels = ref_rac(idx, dist, "constant", 3.0)
    np.testing.assert_allclose(m.dist, h, rtol=1e-12)
    eps = float(np.median(h))
    part = hac_merges((idx, dist), missing="constant", missing_value=3.0, max_epsilon=eps, device="cpu")
    assert np.all(part.dist <= eps) and len(part) == int(np.sum(h <= eps))
    assert same_partition(cut(part, eps), cut(m, eps))
    assert same_partition(graph_hac((idx, dist), epsilon=eps, missing_value=3.0, device="cpu"), labels(eps))


def test_disconnected_graph_leaves_several_trees():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(30, 2)), rng.normal(size=(30, 2)) + 100])
    idx, dist = knn(X, 4, "euclidean")
    m = hac_merges((idx, dist), device="cpu")
    assert len(m) == 58
    lab = cut(m, 1e9)
    assert lab.max() == 1 and same_partition(lab, np.repeat([0, 1], 30))


def test_input_forms_agree():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(60, 3))
    idx, dist = knn(X, 6, "euclidean")

    class G:  # a KNNGraph-like object
        indices = idx.astype(np.int32)
        distances = dist.astype(np.float32)
        n = 60
        k = 6
        metric = "l2"

    mat = sp.csr_matrix((dist.astype(np.float32).ravel(), idx.ravel(), np.arange(0, 61 * 6, 6)), shape=(60, 60))
    ref = hac_merges((idx, dist.astype(np.float32)), device="cpu")
    for g in (G(), mat, (torch.from_numpy(idx), torch.from_numpy(dist.astype(np.float32)))):
        m = hac_merges(g, device="cpu")
        np.testing.assert_array_equal(m.a, ref.a)
        np.testing.assert_array_equal(m.b, ref.b)
        np.testing.assert_array_equal(m.dist, ref.dist)


def test_small_budget_equals_default():
    rng = np.random.default_rng(9)
    X = clustered(400, 5, rng)
    idx, dist = knn(X, 10, "cosine")
    for missing in ALL:
        emb = X if missing == "exact" else None
        a = hac_merges((idx, dist), embeddings=emb, missing=missing, device="cpu")
        b = hac_merges((idx, dist), embeddings=emb, missing=missing, device="cpu", budget_bytes=4096)
        for f in ("a", "b", "dist", "size"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    # relinking's candidate pairs go in row blocks (256 rows of 16 at this budget; ~750 clusters at n/2)
    X = clustered(1500, 5, rng)
    idx, dist = knn(X, 6, "cosine")
    a = hac_merges((idx, dist), embeddings=X, device="cpu")
    b = hac_merges((idx, dist), embeddings=X, device="cpu", budget_bytes=4096)
    for f in ("a", "b", "dist", "size"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_equals_cpu():
    rng = np.random.default_rng(2)
    X = clustered(3000, 8, rng)
    idx, dist = knn(X, 16, "cosine")
    for missing in ALL:
        emb = X if missing == "exact" else None
        a = hac_merges((idx, dist), embeddings=emb, missing=missing, device="cpu")
        b = hac_merges((idx, dist), embeddings=emb, missing=missing, device="cuda")
        np.testing.assert_allclose(a.dist, b.dist, rtol=1e-9)
        for eps in np.quantile(a.dist, [0.3, 0.7, 0.95]):
            assert same_partition(cut(a, eps), cut(b, eps))


# ------------------------------------------------------------------------------ merges, cut, epsilon


def _merges(seed=1, n=300):
    rng = np.random.default_rng(seed)
    X = clustered(n, 4, rng)
    idx, dist = knn(X, 8, "euclidean")
    return hac_merges((idx, dist), device="cpu")


def test_merges_format():
    m = _merges()
    assert isinstance(m, Merges) and m.n == 300
    assert m.a.dtype == m.b.dtype == m.size.dtype == np.int64 and m.dist.dtype == np.float64
    assert np.all(np.diff(m.dist) >= 0)
    i = np.arange(len(m))
    assert np.all(m.a < m.b) and np.all(m.b < m.n + i)
    # sizes add up along the tree
    sz = np.concatenate([np.ones(m.n, np.int64), m.size])
    np.testing.assert_array_equal(m.size, sz[m.a] + sz[m.b])
    assert m.to_linkage().shape == (len(m), 4)


def test_cut_monotone_and_numbering():
    m = _merges()
    prev = None
    for eps in np.concatenate([[0.0], np.quantile(m.dist, np.linspace(0, 1, 15)), [np.inf]]):
        lab = cut(m, min(eps, 1e300))
        k = lab.max() + 1
        _, first = np.unique(lab, return_index=True)
        assert np.all(np.diff(first) > 0)  # numbered by smallest member
        assert k == m.n - np.sum(m.dist <= min(eps, 1e300))
        if prev is not None:  # coarser: every old cluster inside one new cluster
            assert len(np.unique(np.stack([prev, lab], 1), axis=0)) == prev.max() + 1
        prev = lab


def test_epsilon_for_mean_size():
    m = _merges(n=400)
    for target in [1.0, 2.0, 5.0, 10.0, 40.0]:
        eps = epsilon_for_mean_size(m, target)
        got = m.n / (cut(m, eps).max() + 1)
        # brute force over every distinct cut
        cands = [m.n / (cut(m, e).max() + 1) for e in np.concatenate([[0.0], np.unique(m.dist)])]
        assert abs(got - target) <= min(abs(c - target) for c in cands) + 1e-12
    assert epsilon_for_mean_size(m, 1e9) == m.dist[-1]


def test_hac_params_frozen_and_checked():
    p = HACParams()
    assert p.missing == "exact" and hash(p) == hash(HACParams())
    with pytest.raises(Exception):
        p.missing = "bound"
    with pytest.raises(ValueError, match="missing"):
        HACParams(missing="nope")
    assert HACParams(relink=None) == HACParams(relink=HACParams().relink)  # the default is filled in (cache key)
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="relink"):
            HACParams(relink=bad)
    with pytest.raises(ValueError, match='relink.*missing="exact"'):
        HACParams(missing="constant", relink=4)
    X = np.random.default_rng(0).normal(size=(30, 4))
    idx, dist = knn(X, 3, "cosine")
    with pytest.raises(ValueError, match="relink"):
        hac_merges((idx, dist), missing="constant", relink=2, device="cpu")


def _cut_reference(m: Merges, eps: float) -> np.ndarray:
    """Slow, obvious cut: union-find over the merges at height <= eps, clusters numbered in
    the order of their smallest member."""
    n = m.n
    parent = list(range(n + len(m)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for j in range(len(m)):
        if m.dist[j] <= eps:
            parent[int(m.a[j])] = n + j
            parent[int(m.b[j])] = n + j
    ids, out = {}, []
    for i in range(n):
        out.append(ids.setdefault(find(i), len(ids)))
    return np.array(out, dtype=np.int64)


def _random_forest_merges(n, rng, trees):
    """A random valid merge list over n leaves (several trees), in height order."""
    live = list(rng.permutation(n))
    a, b, h, sz = [], [], [], []
    size = {i: 1 for i in range(n)}
    while len(live) > trees:
        i, j = sorted(rng.choice(len(live), 2, replace=False))
        x, y = live[i], live[j]
        node = n + len(a)
        a.append(min(x, y)), b.append(max(x, y))
        h.append((h[-1] if h else 0.0) + float(rng.integers(0, 2)))  # non-decreasing, with ties
        sz.append(size[x] + size[y])
        size[node] = sz[-1]
        live[i] = node
        live.pop(j)
    return Merges(n, np.array(a, dtype=np.int64), np.array(b, dtype=np.int64), np.array(h), np.array(sz))


@pytest.mark.parametrize("trees", [1, 7])
def test_cut_matches_union_find_reference(trees):
    rng = np.random.default_rng(trees)
    for n in (1, 2, 5, 60, 400):
        m = _random_forest_merges(n, rng, min(trees, n))
        for eps in [0.0, 0.5, 1.0, 3.0] + list(np.unique(m.dist)) + [1e9]:
            got = cut(m, eps)
            assert got.dtype == np.int64
            assert np.array_equal(got, _cut_reference(m, eps)), (n, eps)


def test_cut_rejects_a_merge_of_a_node_made_later():
    m = Merges(3, np.array([0, 2]), np.array([4, 3]), np.array([0.1, 0.2]), np.array([2, 3]))
    with pytest.raises(ValueError, match=r"merges: expected merge 0 .* got a=0, b=4"):
        cut(m, 1.0)
    assert cut(m, 0.05).tolist() == [0, 1, 2]  # merges above the cut are not applied (nor checked)


# ------------------------------------------------------------------------------ bad input


def test_bad_input():
    rng = np.random.default_rng(0)
    idx, dist = knn(rng.normal(size=(20, 2)), 4, "euclidean")
    m = hac_merges((idx, dist), device="cpu")
    with pytest.raises(ValueError, match="epsilon"):
        cut(m, -0.1)
    with pytest.raises(ValueError, match="epsilon"):
        graph_hac((idx, dist), epsilon=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        graph_hac((idx, dist), epsilon=float("nan"))
    bad = idx.copy()
    bad[3, 1] = 20
    with pytest.raises(ValueError, match=r"graph.indices.*\[0, 20\)"):
        hac_merges((bad, dist))
    bad[3, 1] = -2
    with pytest.raises(ValueError, match="graph.indices"):
        hac_merges((bad, dist))
    bad = idx.copy()
    bad[5, 0] = 5
    with pytest.raises(ValueError, match="self-loop"):
        hac_merges((bad, dist))
    with pytest.raises(ValueError, match="graph.distances.*shape"):
        hac_merges((idx, dist[:, :3]))
    with pytest.raises(ValueError, match="2-D"):
        hac_merges((idx[:, 0], dist[:, 0]))
    d2 = dist.copy()
    d2[2, 2] = np.inf
    with pytest.raises(ValueError, match="finite"):
        hac_merges((idx, d2))
    d2[2, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        hac_merges((idx, d2))
    with pytest.raises(TypeError, match="graph.indices"):
        hac_merges((idx.astype(np.float32), dist))
    with pytest.raises(TypeError, match="graph"):
        hac_merges("not a graph")
    with pytest.raises(ValueError, match="missing"):
        hac_merges((idx, dist), missing="zero")
    with pytest.raises(ValueError, match="self-loops"):
        hac_merges(sp.eye(5, format="csr"))
    with pytest.raises(ValueError, match="target_mean_size"):
        epsilon_for_mean_size(m, 0.5)
    with pytest.raises(TypeError, match="merges"):
        cut((idx, dist), 0.5)
    X = rng.normal(size=(20, 3))
    with pytest.raises(ValueError, match="embeddings"):
        hac_merges((idx, dist), missing="exact")  # no embeddings
    with pytest.raises(ValueError, match=r"embeddings.*\[20, d\]"):
        hac_merges((idx, dist), embeddings=X[:19])
    with pytest.raises(ValueError, match="embeddings"):
        hac_merges((idx, dist), embeddings=X, missing="constant")
    Xn = X.copy()
    Xn[3, 1] = np.nan
    with pytest.raises(ValueError, match="embeddings.*finite"):
        hac_merges((idx, dist), embeddings=Xn)

    class L2Graph:
        indices, distances, metric = idx, dist, "l2"

    with pytest.raises(ValueError, match="cosine"):
        hac_merges(L2Graph(), embeddings=X)
    # a missing (-1) entry may carry any distance
    d3, i3 = dist.copy(), idx.copy()
    i3[4, 3], d3[4, 3] = -1, np.inf
    assert len(hac_merges((i3, d3), device="cpu")) > 0


def test_tiny_graphs():
    m = hac_merges((np.zeros((1, 0), np.int64), np.zeros((1, 0))), device="cpu")
    assert len(m) == 0 and cut(m, 1.0).tolist() == [0]
    m = hac_merges((np.array([[1], [0]]), np.array([[0.5], [0.5]])), device="cpu")
    assert m.dist.tolist() == [0.5] and cut(m, 0.4).tolist() == [0, 1] and cut(m, 0.5).tolist() == [0, 0]
    assert epsilon_for_mean_size(m, 2.0) == 0.5 and epsilon_for_mean_size(m, 1.0) == 0.0


# ------------------------------------------------------------------------------ real data (ARI floor)


DATA = Path(os.environ.get("CM_ENGINE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.mark.data
@pytest.mark.skipif(not (DATA / "text" / "banking77_minilm_l6_f16.npz").exists(), reason="needs shared data")
def test_ari_text_floor():
    from sklearn.metrics import adjusted_rand_score

    X = np.load(DATA / "text" / "banking77_minilm_l6_f16.npz")["X_train"][:1500].astype(np.float64)
    n = len(X)
    Z = linkage(X, "average", metric="cosine")
    eps = np.sort(Z[:, 2])[n - n // 10 - 1]
    idx, dist = knn(X, 16, "cosine")
    ref = fcluster(Z, eps, "distance")
    m = hac_merges((idx, dist), embeddings=X, device="cpu")  # cluster()'s default rule for cosine
    assert adjusted_rand_score(ref, cut(m, epsilon_for_mean_size(m, 10))) > 0.95
    m = hac_merges((idx, dist), device="cpu")  # graph only: "constant"
    assert adjusted_rand_score(ref, cut(m, epsilon_for_mean_size(m, 10))) > 0.3


def test_sort_groups_matches_numpy_unique_and_keeps_order():
    from cm_engine import _hac_kernels as K

    rng = np.random.default_rng(3)
    for e in (0, 1, 7, 5000):
        key = rng.integers(0, max(1, e // 3), e).astype(np.int64)
        uniq, perm, inv = K.sort_groups(torch.from_numpy(key))
        ref_u, ref_inv = np.unique(key, return_inverse=True)
        np.testing.assert_array_equal(uniq.numpy(), ref_u)
        np.testing.assert_array_equal(key[perm.numpy()], ref_u[inv.numpy()])
        # Stable: within a group, the original positions stay increasing.
        p, g = perm.numpy(), inv.numpy()
        assert np.all((np.diff(g) > 0) | (np.diff(p) > 0))
        # symmetrize: the mean distance of each key's copies, keys unique and sorted.
        dist = rng.random(e).astype(np.float32)
        ku, d = K.symmetrize([torch.from_numpy(key), torch.from_numpy(dist)], 10**9)
        np.testing.assert_array_equal(ku.numpy(), ref_u)
        want = np.bincount(ref_inv.ravel(), weights=dist.astype(np.float64), minlength=ref_u.size) / \
            np.maximum(1, np.bincount(ref_inv.ravel(), minlength=ref_u.size))
        np.testing.assert_allclose(d.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("path", ["workers", "torch"])
def test_relink_with_approximate_searches(path, monkeypatch):
    """The relink searches of a large pool are approximate (above knn's exact cut): forced here on a
    6K pool, on the CPU workers' path and on the one-loop torch path that a GPU takes (no FAISS).
    The merges still form one tree and cut as the exactly relinked run does."""
    from sklearn.metrics import adjusted_rand_score

    from cm_engine import _knn_torch, knn as knn_mod

    rng = np.random.default_rng(3)
    c = rng.normal(size=(60, 24)) * 2.0
    X = (c[rng.integers(0, 60, 6000)] + rng.normal(size=(6000, 24))).astype(np.float32)
    g = knn_mod.knn_graph(X, k=8, exact=True)
    ref = hac_merges(g, embeddings=X, device="cpu")  # every relink search exact (at most 3K sums)
    monkeypatch.setitem(knn_mod.EXACT_MAX_N, "cpu", 400)
    if path == "torch":
        monkeypatch.setattr(_knn_torch, "_faiss_importable", lambda: False)
        monkeypatch.setattr(knn_mod, "_faiss_available", lambda: False)
    searches = []
    real = knn_mod.knn_graph

    def spy(*a, **kw):
        out = real(*a, **kw)
        searches.append((out.info["exact"], out.info["backend"]))
        return out

    monkeypatch.setattr(knn_mod, "knn_graph", spy)
    m = hac_merges(g, embeddings=X, device="cpu")
    assert searches[0] == (False, "torch") and sum(not e for e, _ in searches) >= 3, searches
    assert len(m) == 5999
    for size in (5, 20, 100):
        ari = adjusted_rand_score(cut(ref, epsilon_for_mean_size(ref, size)), cut(m, epsilon_for_mean_size(m, size)))
        assert ari > 0.99, (size, ari)  # measured: 0.996-1.000


@pytest.mark.parametrize("exact_cut", [20_000, 300])
def test_relink_links_ranked_in_half(exact_cut, monkeypatch):
    """On a GPU the torch relink search ranks the float32 sums in float16 (`_relink_dtype`); here the
    same ranking on the CPU (torch backend forced) against float64 neighbours: sums of large norm
    (normalized before the cast, so no float16 overflow), exact and approximate searches."""
    from cm_engine import _knn_torch, knn as knn_mod
    from cm_engine.hac import RELINK_HALF, _relink_dtype, _relinker

    assert _relink_dtype(torch.device("cpu"), 10**6, 64) is None
    assert _relink_dtype(torch.device("cuda"), 10**6, 64) == (RELINK_HALF if not knn_mod._faiss_gpus(
        knn_mod._import_faiss()) else None)  # faiss-gpu takes its own path
    monkeypatch.setitem(knn_mod.EXACT_MAX_N, "cpu", exact_cut)
    monkeypatch.setattr(_knn_torch, "_faiss_importable", lambda: False)
    monkeypatch.setattr(knn_mod, "_faiss_available", lambda: False)
    rng = np.random.default_rng(5)
    S = (clustered(3000, 32, rng, centers=40) * rng.uniform(1, 5e4, size=(3000, 1))).astype(np.float32)
    want, _ = knn(S.astype(np.float64), 16, "cosine")
    for cdt, floor in (("float16", 0.99 if exact_cut > 3000 else 0.8), ("float32", 0.999 if exact_cut > 3000 else 0.8)):
        got = _relinker(16, torch.device("cpu"), 64 << 20, compute_dtype=cdt)(torch.from_numpy(S)).numpy()
        assert got.shape == (3000, 16)
        recall = np.mean([len(set(a) & set(b)) / 16 for a, b in zip(got, want)])
        assert recall >= floor, (cdt, recall)


@pytest.mark.parametrize("bucket_bits", [16, 0])
@pytest.mark.parametrize("n_keys,key_max", [(5000, 400), (5000, 2**40), (3000, 2**62)])
def test_sort_groups_and_sorted_unique_against_torch(n_keys, key_max, bucket_bits, monkeypatch):
    """The CPU's packed sort (key and position in one int64) groups as torch's stable sort does.
    Keys too wide to pack (the last case) are first split into buckets by their top bits; with no
    buckets allowed (MAX_BUCKET_BITS = 0) they take torch.sort itself."""
    from cm_engine import _hac_kernels as K
    from cm_engine._hac_kernels import sort_groups, sorted_unique

    monkeypatch.setattr(K, "MAX_BUCKET_BITS", bucket_bits)

    rng = np.random.default_rng(n_keys + key_max % 97)
    key = torch.from_numpy(rng.integers(0, key_max, n_keys // 3)[rng.integers(0, n_keys // 3, n_keys)])
    uniq, perm, inv = sort_groups(key)
    skey, sperm = torch.sort(key, stable=True)
    torch.testing.assert_close(perm, sperm, rtol=0, atol=0)
    torch.testing.assert_close(uniq, torch.unique(key), rtol=0, atol=0)
    torch.testing.assert_close(uniq[inv], skey, rtol=0, atol=0)
    torch.testing.assert_close(sorted_unique(key), torch.unique(key), rtol=0, atol=0)
    for tiny in (key[:0], key[:1]):
        torch.testing.assert_close(sorted_unique(tiny), torch.unique(tiny), rtol=0, atol=0)
        assert [t.tolist() for t in sort_groups(tiny)] == [torch.unique(tiny).tolist(), list(range(tiny.numel())),
                                                         [0] * tiny.numel()]


def _edge_state(rng, n, E, dead=0.2):
    """Random live edges (u < v, some dead: both ends n) with tied linkages, and a dirty slot set."""
    u = rng.integers(0, n, E)
    v = rng.integers(0, n, E)
    u, v = np.minimum(u, v), np.maximum(u, v)
    keep = u != v
    u, v = u[keep], v[keep]
    L = rng.integers(0, 20, u.size) / 20.0  # many ties: the smallest-slot rule decides
    d = rng.random(u.size) < dead
    u[d] = v[d] = n
    L[d] = np.inf
    return u.astype(np.int64), v.astype(np.int64), L


@pytest.mark.parametrize("frac", [0.05, 0.5, 1.0])
def test_nearest_fused_equals_torch_and_loop(frac, monkeypatch):
    """Round step 1 (`nearest`): the fused CPU scan, torch's scatter_reduce path (a GPU's), and a
    Python loop over the edges give the same best linkage and the same nearest slot (the
    smallest at that linkage) for every dirty slot, and leave clean slots as they were."""
    from cm_engine import _hac_kernels as K

    rng = np.random.default_rng(int(frac * 100))
    n = 400
    u, v, L = _edge_state(rng, n, 3000)
    dirty = np.sort(rng.choice(n, max(1, int(frac * n)), replace=False))
    # Clean slots hold their true minimum already (the invariant rac keeps): start from the answer.
    want_best = np.full(n + 1, np.inf)
    want_nn = np.full(n + 1, n)
    for a, b, x in zip(u, v, L):
        if a == n:
            continue
        for p, q in ((a, b), (b, a)):
            if x < want_best[p] or (x == want_best[p] and q < want_nn[p]):
                want_best[p], want_nn[p] = x, q
    got = {}
    for mode in ("fused", "torch"):
        monkeypatch.setattr(K, "CPU_KERNELS", mode == "fused")
        A = {"u": torch.from_numpy(np.concatenate([u, [n] * 7])), "v": torch.from_numpy(np.concatenate([v, [n] * 7])),
             "L": torch.from_numpy(np.concatenate([L, [np.inf] * 7]))}  # spare capacity past E
        best = torch.from_numpy(want_best.copy())
        nn = torch.from_numpy(want_nn.copy())
        stale = torch.from_numpy(dirty)
        best[stale] = -1.0  # dirty slots' old values must not survive
        nn[stale] = 0
        flag = torch.zeros(n + 1, dtype=torch.bool)

        def edges_of(mask):
            return torch.nonzero(mask[A["u"][:u.size]] | mask[A["v"][:u.size]]).squeeze(1)

        K.nearest(A, u.size, stale, flag, best, nn, n, n, edges_of)
        assert not bool(flag.any())
        got[mode] = (best.numpy()[:n], nn.numpy()[:n])
    for mode, (b, q) in got.items():
        np.testing.assert_array_equal(b, want_best[:n], err_msg=mode)
        np.testing.assert_array_equal(q, want_nn[:n], err_msg=mode)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_linkage_fused_against_torch_and_float64(dtype, monkeypatch):
    """`cosine_linkage`: 1 - (sum_A x) . (sum_B x) / (|A||B|). The fused CPU kernel (float64 dots)
    against a float64 numpy reference, and torch's gather-einsum path (a GPU's) to its dtype."""
    from cm_engine import _hac_kernels as K

    rng = np.random.default_rng(5)
    F = (rng.normal(size=(500, 24)) * rng.integers(1, 9, (500, 1))).astype(dtype)
    size = rng.integers(1, 9, 500).astype(np.float64)
    nu = rng.integers(0, 500, 7000)
    nv = rng.integers(0, 500, 7000)
    F64 = F.astype(np.float64)
    want = 1.0 - (F64[nu] * F64[nv]).sum(1) / (size[nu] * size[nv])
    got = {}
    for mode in ("fused", "torch"):
        monkeypatch.setattr(K, "CPU_KERNELS", mode == "fused")
        out = K.cosine_linkage(torch.from_numpy(F), torch.from_numpy(size), torch.from_numpy(nu),
                               torch.from_numpy(nv), 4096)
        assert out.dtype == torch.float64 and out.shape == (7000,)
        got[mode] = out.numpy()
    np.testing.assert_allclose(got["fused"], want, rtol=0, atol=1e-12)
    if dtype == np.float64:
        np.testing.assert_allclose(got["torch"], want, rtol=0, atol=1e-12)
    else:  # float32 dots: rounding relative to the dot's terms
        scale = np.abs(F64[nu]).sum(1) * np.abs(F64[nv]).max(1) / (size[nu] * size[nv])
        assert np.all(np.abs(got["torch"] - want) <= 1e-6 * scale + 1e-12)
    empty = K.cosine_linkage(torch.from_numpy(F), torch.from_numpy(size), torch.zeros(0, dtype=torch.int64),
                             torch.zeros(0, dtype=torch.int64), 4096)
    assert empty.shape == (0,)


def test_fused_and_torch_rounds_agree(monkeypatch):
    """A whole relinked HAC with the CPU's fused kernels and with torch's ops (a GPU's): float64
    embeddings, so the two differ by the order of float64 sums only: the same merges and heights
    to rounding."""
    from cm_engine import _hac_kernels as K

    rng = np.random.default_rng(8)
    X = clustered(1500, 12, rng, centers=20) + rng.normal(scale=0.5, size=(1500, 12))
    idx, dist = knn(X, 8, "cosine")
    out = {}
    for mode in ("fused", "torch"):
        monkeypatch.setattr(K, "CPU_KERNELS", mode == "fused")
        out[mode] = hac_merges((idx, dist), embeddings=X, device="cpu")
    a, b = out["fused"], out["torch"]
    assert len(a) == len(b) == 1499
    np.testing.assert_array_equal(a.a, b.a)
    np.testing.assert_array_equal(a.b, b.b)
    np.testing.assert_allclose(a.dist, b.dist, rtol=1e-12, atol=1e-14)
