"""cluster(): argument checks, the cache (hits, keys, corruption, unwritable dir), recut, and
exactness against scipy's average linkage on a complete graph."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage

import cm_engine.knn
from cm_engine.cluster import Clustering, ClusterParams, GraphParams, cluster


def _canon(labels) -> np.ndarray:
    """Labels renumbered by first occurrence: equal iff the partitions are equal."""
    _, first, inv = np.unique(np.asarray(labels), return_index=True, return_inverse=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inv.reshape(-1)]


def _blobs(n=240, d=6, centres=12, seed=0, spread=0.25):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)) * 3
    x = c[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, d))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def X():
    return _blobs()


def _entries(root, stage):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(stage + "-"))


# ----------------------------------------------------------------------------- arguments

def test_exactly_one_of_epsilon_and_target(X):
    for kw, word in (({}, "neither"), ({"epsilon": 0.1, "target_mean_size": 10}, "both")):
        with pytest.raises(ValueError, match=f"epsilon.*target_mean_size.*{word}"):
            cluster(X, k=5, **kw)
    with pytest.raises(ValueError, match="epsilon"):
        cluster(X, k=5, epsilon=-0.1)
    with pytest.raises(ValueError, match="target_mean_size"):
        cluster(X, k=5, target_mean_size=0.5)
    with pytest.raises(ValueError, match="k: expected"):
        cluster(X, k=len(X), epsilon=0.1)
    with pytest.raises(ValueError, match="metric"):
        cluster(X, k=5, epsilon=0.1, metric="manhattan")
    with pytest.raises(ValueError, match="embeddings"):
        cluster(X[0], k=5, epsilon=0.1)
    with pytest.raises(ValueError, match="missing"):
        cluster(X, k=5, epsilon=0.1, missing="sometimes")


def test_unwritable_cache_dir_fails_before_any_work(X, tmp_path, monkeypatch):
    def boom(*a, **kw):  # pragma: no cover - must not be reached
        raise AssertionError("knn_graph ran before the cache_dir check")

    monkeypatch.setattr(cm_engine.knn, "knn_graph", boom)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cache_dir.*file.txt"):
        cluster(X, k=5, epsilon=0.1, cache_dir=blocker / "sub")


# ----------------------------------------------------------------------------- cache

def test_second_call_hits_the_cache(X, tmp_path, monkeypatch):
    a = cluster(X, k=8, target_mean_size=10, cache_dir=tmp_path)
    assert a.cache_hits == {"graph": False, "merges": False}
    assert isinstance(a, Clustering) and a.labels.dtype == np.int64 and a.labels.shape == (len(X),)
    assert a.n_clusters == len(np.unique(a.labels)) and a.labels.max() == a.n_clusters - 1
    assert {"fingerprint", "graph", "hac", "cut", "total"} <= set(a.timings)

    def boom(*args, **kw):  # pragma: no cover
        raise AssertionError("a cached re-run must not rebuild the graph")

    monkeypatch.setattr(cm_engine.knn, "knn_graph", boom)
    b = cluster(X, k=8, target_mean_size=10, cache_dir=tmp_path)
    assert b.cache_hits == {"graph": None, "merges": True}
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.epsilon == b.epsilon
    np.testing.assert_array_equal(a.merges.dist, b.merges.dist)
    # The same pool as a .npy path: same fingerprint, same entry.
    np.save(tmp_path / "x.npy", X)
    c = cluster(tmp_path / "x.npy", k=8, target_mean_size=10, cache_dir=tmp_path)
    assert c.cache_hits["merges"]
    np.testing.assert_array_equal(c.labels, a.labels)


def test_graph_reused_when_only_merges_missing(X, tmp_path):
    a = cluster(X, k=8, epsilon=0.05, cache_dir=tmp_path)
    (m,) = _entries(tmp_path, "hac_merges")
    import shutil

    shutil.rmtree(tmp_path / m)
    b = cluster(X, k=8, epsilon=0.05, cache_dir=tmp_path)
    assert b.cache_hits == {"graph": True, "merges": False}
    np.testing.assert_array_equal(a.labels, b.labels)
    # Another HAC rule reuses the graph but is a new merge list.
    c = cluster(X, k=8, epsilon=0.05, cache_dir=tmp_path, missing="edges")
    assert c.cache_hits == {"graph": True, "merges": False}
    assert len(_entries(tmp_path, "hac_merges")) == 2 and len(_entries(tmp_path, "knn_graph")) == 1
    # So does relinking switched off (graph edges only); the default's value is part of the key.
    d = cluster(X, k=8, epsilon=0.05, cache_dir=tmp_path, relink=0)
    assert d.cache_hits == {"graph": True, "merges": False} and d.params.hac.relink == 0
    assert a.params.hac.relink == 16
    assert cluster(X, k=8, epsilon=0.05, cache_dir=tmp_path, relink=16).cache_hits["merges"] is True
    with pytest.raises(ValueError, match="relink"):
        cluster(X, k=8, epsilon=0.05, relink=-1)
    assert len(_entries(tmp_path, "hac_merges")) == 3


def test_corrupt_entries_warn_and_rebuild_same_result(X, tmp_path, caplog):
    a = cluster(X, k=8, target_mean_size=10, cache_dir=tmp_path)
    for stage in ("hac_merges", "knn_graph"):
        (e,) = _entries(tmp_path, stage)
        f = tmp_path / e / ("dist.npy" if stage == "hac_merges" else "distances.npy")
        raw = bytearray(f.read_bytes())
        raw[-8] ^= 0x55
        f.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="cm_engine"):
        b = cluster(X, k=8, target_mean_size=10, cache_dir=tmp_path)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("hac_merges" in m and "checksum" in m for m in msgs), msgs
    assert any("knn_graph" in m and "checksum" in m for m in msgs), msgs
    assert b.cache_hits == {"graph": False, "merges": False}
    np.testing.assert_array_equal(a.labels, b.labels)
    c = cluster(X, k=8, target_mean_size=10, cache_dir=tmp_path)
    assert c.cache_hits["merges"] is True
    np.testing.assert_array_equal(a.labels, c.labels)


def test_different_params_or_pool_different_key(X, tmp_path):
    cluster(X, k=8, epsilon=0.05, cache_dir=tmp_path)
    for kw in ({"k": 9}, {"metric": "l2"}, {"seed": 1, "exact": False, "nlist": 4}):
        r = cluster(X, epsilon=0.05, cache_dir=tmp_path, **{"k": 8, **kw})
        assert r.cache_hits == {"graph": False, "merges": False}, kw
    r = cluster(X, k=8, epsilon=0.3, cache_dir=tmp_path)  # epsilon is a cut, not a key
    assert r.cache_hits["merges"] is True
    r = cluster(_blobs(seed=1), k=8, epsilon=0.05, cache_dir=tmp_path)
    assert r.cache_hits["merges"] is False
    assert len(_entries(tmp_path, "knn_graph")) == 5 and len(_entries(tmp_path, "hac_merges")) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_params_dataclasses_are_frozen_and_hashable():
    from cm_engine.hac import HACParams

    p = ClusterParams(graph=GraphParams(k=3), hac=HACParams())
    with pytest.raises(Exception):
        p.hac = HACParams(missing="edges")
    assert hash(p) == hash(ClusterParams(graph=GraphParams(k=3), hac=HACParams()))
    assert p != ClusterParams(graph=GraphParams(k=3), hac=HACParams(missing="edges"))


def test_no_cache_dir(X):
    r = cluster(X, k=8, epsilon=0.05)
    assert r.cache_hits == {"graph": None, "merges": None}
    assert "fingerprint" not in r.timings


# ----------------------------------------------------------------------------- recut

def test_recut_equals_fresh_call(X, tmp_path):
    base = cluster(X, k=10, epsilon=0.01, cache_dir=tmp_path)
    for kw in ({"epsilon": 0.02}, {"epsilon": 0.2}, {"target_mean_size": 5}, {"target_mean_size": 20}):
        fresh = cluster(X, k=10, cache_dir=tmp_path, **kw)
        again = base.recut(**kw)
        np.testing.assert_array_equal(fresh.labels, again.labels)
        assert fresh.epsilon == again.epsilon and fresh.n_clusters == again.n_clusters
        assert again.target_mean_size == kw.get("target_mean_size")
    with pytest.raises(ValueError, match="epsilon/target_mean_size"):
        base.recut()
    r = base.recut(target_mean_size=10)
    assert abs(r.mean_size - 10) < 3


# ----------------------------------------------------------------------------- exactness

def _gap_epsilons(heights, count=8):
    """Cut heights in the middle of well-separated gaps of the exact dendrogram, so that float32
    graph distances cannot move a merge across the cut."""
    h = np.unique(heights)
    mids, gaps = (h[1:] + h[:-1]) / 2, np.diff(h)
    ok = np.flatnonzero(gaps > 1e-4 * np.maximum(1, h[1:]))
    pick = ok[np.linspace(0, ok.size - 1, min(count, ok.size)).astype(int)]
    return mids[pick]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_complete_graph_equals_scipy_average_linkage(metric, data):
    n = 150
    X = (np.random.default_rng(3).normal(size=(n, 5)).astype(np.float32) if data == "random"
         else _blobs(n=n, d=5, centres=8, seed=3))
    Z = linkage(X.astype(np.float64), "average", metric="cosine" if metric == "cosine" else "euclidean")
    res = cluster(X, k=n - 1, metric=metric, epsilon=0.0, exact=True)
    for eps in _gap_epsilons(Z[:, 2]):
        want = fcluster(Z, eps, "distance")
        got = res.recut(epsilon=eps)
        np.testing.assert_array_equal(_canon(got.labels), _canon(want), err_msg=f"epsilon={eps}")
    # target_mean_size: the chosen epsilon is a merge height; scipy's float64 heights differ from
    # ours by float32 rounding, so cut scipy just above it.
    t = res.recut(target_mean_size=10)
    assert 7 <= t.mean_size <= 14
    assert t.n_clusters == len(np.unique(fcluster(Z, t.epsilon * (1 + 1e-5) + 1e-7, "distance")))


# ----------------------------------------------------------------------------- the graph

def test_graph_exposed_without_and_with_cache(X, tmp_path, monkeypatch):
    from cm_engine.knn import knn_graph

    ref = knn_graph(X, k=8)
    a = cluster(X, k=8, target_mean_size=10)  # no cache: the built graph is kept
    np.testing.assert_array_equal(a.graph.indices, ref.indices)
    np.testing.assert_array_equal(a.graph.distances, ref.distances)
    assert a.recut(epsilon=a.epsilon).graph is a.graph
    cluster(X, k=8, target_mean_size=10, cache_dir=tmp_path)
    calls = []
    real = cm_engine.knn.knn_graph

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(cm_engine.knn, "knn_graph", counting)
    b = cluster(X, k=8, target_mean_size=10, cache_dir=tmp_path)
    assert b.cache_hits == {"graph": None, "merges": True}  # the graph is not read unless asked
    np.testing.assert_array_equal(b.graph.indices, ref.indices)  # read from the cache entry, lazily
    np.testing.assert_array_equal(b.graph.distances, ref.distances)
    assert b.graph is b.graph and not calls
    # the graph entry gone: rebuilt into the cache on first access
    for p in tmp_path.iterdir():
        if p.name.startswith("knn_graph-"):
            import shutil

            shutil.rmtree(p)
    c = cluster(X, k=8, target_mean_size=10, cache_dir=tmp_path)
    np.testing.assert_array_equal(c.graph.indices, ref.indices)
    assert calls and len(_entries(tmp_path, "knn_graph")) == 1
    with pytest.raises(ValueError, match="graph"):
        Clustering(labels=a.labels, n_clusters=a.n_clusters, epsilon=0.0, target_mean_size=None, merges=None,
                   k=8, metric="cosine").graph
