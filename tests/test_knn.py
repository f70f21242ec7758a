"""k-NN graph: exact backends against a float64 numpy reference (tie-aware), approximate recall
floors, self-exclusion with duplicates, chunked == unchunked, bad input."""
from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch

from cm_engine.knn import KNNGraph, exact_neighbors, knn_graph, recall_at_k
from cm_engine.synthetic import PoolSpec, generate_block

TOL = 1e-5  # float32 rounding of the distances; within it two distances count as a tie


def reference(X, k, metric):
    """Slow, obviously correct: full float64 distance matrix, self excluded, stable argsort."""
    Y = np.asarray(X, dtype=np.float64)
    if metric == "cosine":
        nr = np.linalg.norm(Y, axis=1, keepdims=True)
        Yn = np.where(nr > 0, Y / np.where(nr > 0, nr, 1), 0.0)  # zero rows: cos 0 with everything
        D = 1.0 - Yn @ Yn.T
    else:
        D = np.sqrt(((Y[:, None, :] - Y[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    I = np.argsort(D, axis=1, kind="stable")[:, :k]
    return I, np.take_along_axis(D, I, 1), D


def assert_same_neighbours(g: KNNGraph, X, k, metric):
    """Every row: the neighbour set equals the reference's up to ties at the k-th distance, the
    reported distances match the float64 ones, rows ascending, self never listed."""
    I, Dk, D = reference(X, k, metric)
    n = len(X)
    assert g.indices.shape == (n, k) and g.distances.shape == (n, k)
    assert g.indices.dtype == np.int32 and g.distances.dtype == np.float32
    assert (np.diff(g.distances, axis=1) >= 0).all()
    assert (g.indices != np.arange(n)[:, None]).all()
    for r in range(n):
        got = g.indices[r]
        assert len(set(got)) == k
        true_d = D[r, got]
        np.testing.assert_allclose(g.distances[r], true_d, atol=TOL, rtol=TOL)
        kth = Dk[r, -1]
        assert (true_d <= kth + TOL).all(), f"row {r}: a neighbour beyond the k-th distance"
        strict = set(I[r][Dk[r] < kth - TOL])  # those not tied with the k-th must all be there
        assert strict <= set(got), f"row {r}: missed {strict - set(got)}"


def data(n=300, d=12, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_exact_matches_reference(backend, metric, dtype):
    X = data(dtype=dtype)
    g = knn_graph(X, k=7, metric=metric, backend=backend, exact=True, device="cpu")
    assert g.metric == metric and g.k == 7 and g.n == len(X)
    assert_same_neighbours(g, X, 7, metric)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_chunked_equals_unchunked(backend, metric):
    X = data(n=400, d=8, seed=1)
    big = knn_graph(X, k=5, metric=metric, backend=backend, exact=True)
    tiny = knn_graph(X, k=5, metric=metric, backend=backend, exact=True, budget_bytes=4096)
    np.testing.assert_array_equal(big.indices, tiny.indices)
    np.testing.assert_allclose(big.distances, tiny.distances, atol=1e-6)


def test_torch_reduced_precision_reranked_in_float32():
    X = data(n=300, d=16, seed=2)
    g = knn_graph(X, k=6, metric="l2", backend="torch", exact=True, compute_dtype="bfloat16")
    assert_same_neighbours(g, X, 6, "l2")


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_duplicates_self_excluded(backend):
    X = data(n=200, d=6, seed=3)
    X[50:60] = X[50]  # ten exact copies: more than k + 1 at distance 0
    X[100] = X[101]
    g = knn_graph(X, k=4, metric="l2", backend=backend, exact=True)
    assert (g.indices != np.arange(200)[:, None]).all()
    assert set(g.indices[100]) >= {101} and g.distances[100, 0] == 0
    assert (g.distances[50:60] == 0).all() and set(g.indices[50:60].ravel()) <= set(range(50, 60))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_zero_vectors_cosine_distance_one(backend):
    X = data(n=100, d=5, seed=4)
    X[[3, 7]] = 0
    g = knn_graph(X, k=3, metric="cosine", backend=backend, exact=True)
    assert_same_neighbours(g, X, 3, "cosine")
    np.testing.assert_allclose(g.distances[3], 1.0, atol=1e-6)


def clustered(n, d=32, seed=0):
    spec = PoolSpec(n=n, d=d, n_clusters=max(10, n // 200), seed=seed)
    return generate_block(spec, 0, n)[0]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_approximate_recall_floor(backend, metric):
    X = clustered(6000)
    exact = knn_graph(X, k=10, metric=metric, backend="faiss", exact=True)
    opts = {"target_recall": 0.99} if backend == "faiss" else {}
    g = knn_graph(X, k=10, metric=metric, backend=backend, exact=False, seed=0, **opts)
    rec = recall_at_k(g, exact)
    print(f"recall@10 {backend} {metric}: {rec:.4f}")
    assert rec >= 0.98  # measured 0.996-1.000 on this pool
    assert (g.indices != np.arange(len(X))[:, None]).all()
    d = np.where(np.isinf(g.distances), np.float32(9e9), g.distances)
    assert (np.diff(d, axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_tuned_nprobe_is_the_smallest_that_reaches_the_target(metric):
    """FAISS IVF with nprobe=None: the chosen nprobe meets target_recall on the whole pool (the
    sample estimate is honest), the ladder step below it does not pass the 2-SE bound, and the
    graph equals the one built with that nprobe given explicitly."""
    from cm_engine.knn import NPROBE_LADDER

    X = clustered(6000)
    exact = knn_graph(X, k=10, metric=metric, backend="faiss", exact=True)
    target = 0.97
    g = knn_graph(X, k=10, metric=metric, backend="faiss", exact=False, target_recall=target, tune_rows=800)
    p, info = g.info["nprobe"], g.info
    assert info["target_recall"] == target and info["tune_rows"] == 800
    assert info["tune_recall"] - 2 * info["tune_recall_se"] >= target
    full = recall_at_k(g, exact)
    assert full >= target - 0.01
    assert abs(full - info["tune_recall"]) <= 4 * info["tune_recall_se"] + 0.005
    ladder = [q for q in NPROBE_LADDER if q < info["nlist"]] + [info["nlist"]]
    i = ladder.index(p)
    if i > 0:  # the step below was measured by the binary search or is implied failing by monotonicity
        below = knn_graph(X, k=10, metric=metric, backend="faiss", exact=False, nprobe=ladder[i - 1])
        assert recall_at_k(below, exact) < target + 3 * info["tune_recall_se"] + 0.005
    fixed = knn_graph(X, k=10, metric=metric, backend="faiss", exact=False, nprobe=p)
    np.testing.assert_array_equal(fixed.indices, g.indices)
    assert "tune_recall" not in fixed.info


def test_tuned_grouped_search_meets_its_estimate():
    """torch GEMM-shaped search with nprobe=None: the per-query estimate is a lower bound of what
    the grouped search reaches (it searches a superset of each row's own cells)."""
    X = clustered(6000)
    exact = knn_graph(X, k=10, backend="faiss", exact=True)
    g = knn_graph(X, k=10, backend="torch", exact=False, target_recall=0.97, tune_rows=800)
    info = g.info
    assert info["tune_recall"] - 2 * info["tune_recall_se"] >= 0.97
    assert recall_at_k(g, exact) >= 0.97 - 0.01
    assert info["sample_recall"] >= info["tune_recall"] - 3 * info["tune_recall_se"]
    fixed = knn_graph(X, k=10, backend="torch", exact=False, nprobe=info["nprobe"])
    np.testing.assert_array_equal(fixed.indices, g.indices)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("kernel", ["faiss", "torch"])
def test_grouped_search_covers_the_requests_the_cap_cuts(metric, kernel):
    """Every row requests every cell (nprobe = nlist) but a cell searches only itself
    (max_cell_probes=1): the second pass over the cut requests must make the graph exact."""
    X = clustered(1500)
    g = knn_graph(X, k=8, metric=metric, backend="torch", exact=False, nlist=12, nprobe=12, max_cell_probes=1,
                  kernel=kernel)
    assert g.info["cap_cut_requests"] > 1500
    assert_same_neighbours(g, X, 8, metric)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_grouped_search_without_faiss_covers_the_cut_requests(metric, monkeypatch):
    """The one-loop torch path (CUDA, or a CPU without FAISS) under the same exactness check."""
    from cm_engine import _knn_torch

    monkeypatch.setattr(_knn_torch, "_faiss_importable", lambda: False)
    X = clustered(1500)
    g = knn_graph(X, k=8, metric=metric, backend="torch", exact=False, nlist=12, nprobe=12, max_cell_probes=1)
    assert g.info["phase_s"].keys() >= {"join", "second_pass"} and g.info["cap_cut_requests"] > 1500
    assert_same_neighbours(g, X, 8, metric)


def test_grouped_search_same_graph_with_any_thread_count():
    """Cells on worker threads: the graph does not depend on how many (torch.get_num_threads()),
    and torch's thread count is restored afterwards."""
    X = clustered(4000)
    old = torch.get_num_threads()
    graphs = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            graphs.append(knn_graph(X, k=6, backend="torch", exact=False, nprobe=2, max_cell_probes=2))
            assert torch.get_num_threads() == t
    finally:
        torch.set_num_threads(old)
    assert graphs[0].info["cap_cut_requests"] > 0
    np.testing.assert_array_equal(graphs[0].indices, graphs[1].indices)
    np.testing.assert_array_equal(graphs[0].distances, graphs[1].distances)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("with_workers", [True, False])
def test_two_level_quantizer_probing_every_group_is_exhaustive(metric, with_workers, monkeypatch):
    """Two-level cells: with every coarse group probed, a row's p nearest cells are exactly the
    exhaustive ranking over all cells (numpy float64 reference); with the default probes, the
    nearest cell is the exhaustive one for nearly every row. Cells come in near nlist."""
    from cm_engine import _knn_torch as kt
    from cm_engine.knn import _prep

    X = _prep(torch.from_numpy(clustered(6000)), metric)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with kt._Workers(2) as w:
            workers = w if with_workers else None
            qz = kt._train_two_level(X, 120, niter=5, seed=0, metric=metric, work=1 << 24, workers=workers)
            assert qz.C1 is not None and 100 <= qz.nlist <= 140 and qz.goff[-1] == qz.nlist
            C, Y = qz.C.double().numpy(), X.double().numpy()
            key = -Y @ C.T if metric == "cosine" else ((Y[:, None, :] - C[None]) ** 2).sum(-1)
            want = np.argsort(key, axis=1, kind="stable")[:, :5]
            near = qz.search(X, 1)[:, 0]
            assert (near == want[:, 0]).mean() >= 0.98
            qz.coarse_probes = qz.C1.shape[0]
            got = qz.search(X, 5)
    finally:
        torch.set_num_threads(old)
    assert got.shape == (6000, 5) and got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("no_faiss", [False, True])
@pytest.mark.parametrize("coarse_probes", [8, 2])
def test_two_level_grouped_search_recall(no_faiss, coarse_probes, monkeypatch):
    """The grouped search with two-level cells (forced on a small pool) meets the recall target
    it tunes for, on the worker path and on the one-loop torch path; the tuning ranks cells as
    the two-level search does, so its estimate stays honest when that search is coarse (2 of
    ~6 groups probed)."""
    from cm_engine import _knn_torch as kt

    monkeypatch.setattr(kt, "_TWO_LEVEL_CELLS", 8)
    monkeypatch.setattr(kt, "_TWO_LEVEL_TRAIN_CELLS", 8)
    monkeypatch.setattr(kt, "_COARSE_PROBES", coarse_probes)
    if no_faiss:
        monkeypatch.setattr(kt, "_faiss_importable", lambda: False)
    X = clustered(6000)
    exact = knn_graph(X, k=10, backend="faiss", exact=True)
    g = knn_graph(X, k=10, backend="torch", exact=False, nlist=40, target_recall=0.95, tune_rows=600)
    info = g.info
    assert 30 <= info["nlist"] <= 50
    rec = recall_at_k(g, exact)
    print(f"two-level recall@10 (no_faiss={no_faiss}, probes {coarse_probes}): {rec:.4f}, nprobe {info['nprobe']}")
    assert rec >= 0.94
    assert info["sample_recall"] >= info["tune_recall"] - 3 * info["tune_recall_se"]


@pytest.mark.parametrize("no_faiss", [False, True])
def test_grouped_reach_is_each_rows_recall_in_the_graph(no_faiss, monkeypatch):
    """The grouped tuning's reach model against the search it models: for the tuning rows, the
    per-row reach at the chosen nprobe p, and at p - 1 (the graph rebuilt with nprobe=p - 1 given),
    equals each row's recall in the finished graph (CPU worker join, or the batched join) up to
    distance ties; p - 1 misses the 2-SE bound, and p is at most the per-query IVF estimate."""
    from cm_engine import _knn_torch as kt
    from cm_engine.knn import _recall_rows, mean_se

    if no_faiss:
        monkeypatch.setattr(kt, "_faiss_importable", lambda: False)
    seen = []
    real = kt._tune_grouped
    monkeypatch.setattr(kt, "_tune_grouped", lambda *a, **kw: seen.append((a, kw)) or real(*a, **kw))
    X = clustered(6000)
    exact = knn_graph(X, k=10, backend="faiss", exact=True)
    g = knn_graph(X, k=10, backend="torch", exact=False, target_recall=0.97, tune_rows=600)
    info = g.info
    (req, inv, counts, off, rows, nbrs), kw = seen[0]
    p = info["nprobe"]
    assert 1 < p <= info["nprobe_ivf"] and info["tune_recall"] - 2 * info["tune_recall_se"] >= 0.97

    def recall_rows(graph):
        return _recall_rows(KNNGraph(graph.indices[rows], graph.distances[rows], "cosine", 10),
                            KNNGraph(exact.indices[rows], exact.distances[rows], "cosine", 10))

    for q, graph in [(p, g), (p - 1, knn_graph(X, k=10, backend="torch", exact=False, nprobe=p - 1))]:
        reach = kt._grouped_reach(req, inv, counts, off, rows, nbrs, q, kt.cell_cap(counts.size, None, q))
        got = recall_rows(graph)
        # equal but for distance ties (near-duplicate rows): recall counts a tied row found in a
        # searched cell, reach only the one the exact list names
        assert (reach <= got + 1e-12).all(), f"nprobe {q}"
        assert (np.abs(reach - got) < 1e-12).mean() >= 0.99, f"nprobe {q}"
    below = kt._grouped_reach(req, inv, counts, off, rows, nbrs, p - 1, kt.cell_cap(counts.size, None, p - 1))
    mean, se = mean_se(below)
    assert mean - 2 * se < 0.97
    assert info["tune_recall"] <= info["sample_recall"] <= info["tune_recall"] + 0.005


@pytest.mark.parametrize("no_faiss", [False, True])
def test_two_level_training_with_flat_search(no_faiss, monkeypatch):
    """Between _TWO_LEVEL_TRAIN_CELLS and _TWO_LEVEL_CELLS the cells are trained in two levels and
    searched flat (every cell ranked): the grouped search still meets its recall target."""
    from cm_engine import _knn_torch as kt

    monkeypatch.setattr(kt, "_TWO_LEVEL_TRAIN_CELLS", 8)
    if no_faiss:
        monkeypatch.setattr(kt, "_faiss_importable", lambda: False)
    trained = []
    real = kt._train_two_level
    monkeypatch.setattr(kt, "_train_two_level", lambda *a, **kw: trained.append(1) or real(*a, **kw))
    X = clustered(6000)
    exact = knn_graph(X, k=10, backend="faiss", exact=True)
    g = knn_graph(X, k=10, backend="torch", exact=False, nlist=40, target_recall=0.95, tune_rows=600)
    assert trained, "the two-level training did not run"
    rec = recall_at_k(g, exact)
    assert 30 <= g.info["nlist"] <= 50 and rec >= 0.94, (g.info["nlist"], rec)
    assert g.info["sample_recall"] >= g.info["tune_recall"] - 3 * g.info["tune_recall_se"]


def test_numpy_finish_rows_and_split_knn_match_their_references():
    """finish_rows_np == finish_rows (torch; ties by index, self dropped, -1 last, padded when
    short); the workers' knn
    (torch tiles, the database split) == one faiss.knn."""
    import faiss

    from cm_engine._knn_torch import _Workers
    from cm_engine.knn import finish_rows, finish_rows_np

    rng = np.random.default_rng(1)
    rows = np.arange(40, 140)
    ci = rng.integers(-1, 200, size=(100, 12))
    ci[::7, 3] = rows[::7]  # the row itself among its candidates
    cd = rng.integers(0, 5, size=(100, 12)).astype(np.float32) / 4  # many ties
    for k in (6, 12):  # 12 > the 11 candidates left once the row itself is dropped: padded
        want = finish_rows(rows, torch.from_numpy(ci), torch.from_numpy(cd), k)
        got = finish_rows_np(rows, ci, cd, k)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w, g)
    X = data(n=500, d=16)
    with _Workers(3) as ex:
        for mt in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2):
            D, I = ex.knn(X[:50], X, 9, mt)
            D0, I0 = faiss.knn(X[:50], X, 9, metric=mt)
            np.testing.assert_allclose(D, D0, rtol=1e-5, atol=1e-5)
            assert (np.sort(I, 1) == np.sort(I0, 1)).mean() > 0.99  # equal up to ties


def test_bad_tuning_options():
    X = clustered(500)
    with pytest.raises(ValueError, match="target_recall"):
        knn_graph(X, k=3, exact=False, backend="faiss", target_recall=1.5)
    with pytest.raises(ValueError, match="tune_rows"):
        knn_graph(X, k=3, exact=False, backend="faiss", tune_rows=1)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_approximate_deterministic(backend):
    X = clustered(3000)
    a = knn_graph(X, k=5, backend=backend, exact=False, seed=3)
    b = knn_graph(X, k=5, backend=backend, exact=False, seed=3)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_exact_neighbors_sample_and_recall_tie_aware():
    X = data(n=300, d=10, seed=5)
    full = knn_graph(X, k=5, exact=True, backend="torch")
    rows = np.array([7, 3, 250])
    sub = exact_neighbors(X, rows, k=5)
    np.testing.assert_array_equal(sub.indices, full.indices[rows])
    assert recall_at_k(full, sub, rows=rows) == 1.0
    # A swap with a point at exactly the same distance is not a miss.
    tie = KNNGraph(full.indices.copy(), full.distances.copy(), "cosine", 5)
    tie.indices[0, -1] = 999_999
    assert recall_at_k(tie, full) == 1.0
    worse = KNNGraph(full.indices.copy(), full.distances.copy() + 1, "cosine", 5)
    worse.indices[:, -1] = -1
    assert recall_at_k(worse, full) == pytest.approx(0.8)


def test_out_dir_memmaps_and_torch_input(tmp_path):
    X = data(n=150, d=4, seed=6)
    g = knn_graph(torch.from_numpy(X), k=3, out_dir=tmp_path, exact=True)
    assert isinstance(g.indices, np.memmap)
    np.testing.assert_array_equal(np.load(tmp_path / "indices.npy"), g.indices)
    ref = knn_graph(X, k=3, exact=True)
    np.testing.assert_array_equal(ref.indices, g.indices)


@pytest.mark.parametrize("k", [0, -1, 50, 51])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k: expected 1 <= k < N = 50"):
        knn_graph(data(n=50), k=k)


def test_bad_inputs():
    X = data(n=50)
    with pytest.raises(TypeError, match="k: expected an integer"):
        knn_graph(X, k=2.5)
    bad = X.copy()
    bad[17, 2] = np.nan
    with pytest.raises(ValueError, match="row 17"):
        knn_graph(bad, k=3)
    bad[17, 2] = np.inf
    with pytest.raises(ValueError, match="finite"):
        knn_graph(bad, k=3)
    with pytest.raises(TypeError, match="floating dtype"):
        knn_graph(X.astype(np.int32), k=3)
    with pytest.raises(ValueError, match="metric"):
        knn_graph(X, k=3, metric="dot")
    with pytest.raises(ValueError, match="backend"):
        knn_graph(X, k=3, backend="annoy")
    with pytest.raises(ValueError, match="2-D"):
        knn_graph(X[0], k=3)
    with pytest.raises(TypeError, match="unexpected option"):
        knn_graph(X, k=3, nprobes=4)


def test_missing_faiss_names_package(monkeypatch):
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        knn_graph(data(n=50), k=3, backend="faiss")
    g = knn_graph(data(n=50), k=3, backend="auto", exact=True)  # falls back to torch
    assert g.info["backend"] == "torch"


@pytest.mark.data
@pytest.mark.slow
def test_cifar10_recall_defaults(data_dir):
    path = data_dir / "cifar10" / "cifar10_effnetlite0_128px_f16.npz"
    if not path.exists():
        pytest.skip(f"{path} absent")
    X = np.load(path)["X_train"]
    g = knn_graph(X, k=16, exact=False)  # the defaults (approximate forced: N=50K is under the exact cut)
    rows = np.sort(np.random.default_rng(0).choice(len(X), 1000, replace=False))
    ex = exact_neighbors(X, rows, k=16)
    rec = recall_at_k(g, ex, rows=rows)
    print(f"CIFAR-10 recall@16 (default approximate, {g.info}): {rec:.4f}")
    assert rec >= 0.95


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("p", [1, 5, 64, 65, 300])
def test_flat_quantizer_cpu_matches_a_sort(metric, p):
    """The CPU workers' flat cell search (matmul + fused top-p, `_flat_top`, behind
    `_Quantizer.search`) returns p distinct cells whose scores are the p best of a float64 sort,
    nearest first, equal scores by lower cell (which of the cells tied at the p-th score are
    kept is the kernel's choice). Small-integer rows make every score exact in float32 and give
    many ties; p = 65 and 300 take the torch.topk branch, p = 300 spans several row blocks."""
    from cm_engine import _knn_torch as kt

    rng = np.random.default_rng(3)
    C = torch.from_numpy(rng.integers(-2, 3, size=(400, 8)).astype(np.float32))
    x = torch.from_numpy(rng.integers(-2, 3, size=(5000, 8)).astype(np.float32))
    Cd, xd = C.double().numpy(), x.double().numpy()
    key = -(xd @ Cd.T) if metric == "cosine" else -(2 * xd @ Cd.T - (Cd ** 2).sum(1))
    want = np.argsort(key, axis=1, kind="stable")[:, :p]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with kt._Workers(2) as w:
            qz = kt._Quantizer(C, metric, work=1 << 20, workers=w)
            got = qz.search(x, p)
    finally:
        torch.set_num_threads(old)
    assert got.shape == (5000, p) and got.dtype == np.int64
    assert all(len(set(r)) == p for r in got)
    kg = np.take_along_axis(key, got, 1)
    np.testing.assert_array_equal(kg, np.take_along_axis(key, want, 1))  # the p best scores, in order
    tied = kg[:, 1:] == kg[:, :-1]
    assert (p == 1 or tied.any()) and (got[:, 1:] > got[:, :-1])[tied].all()  # equal scores: lower cell first
    # away from the p-th score's ties the cells are exactly the sort's
    np.testing.assert_array_equal(np.where(kg < kg[:, -1:], got, -1), np.where(kg < kg[:, -1:], want, -1))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_two_level_fused_search_matches_the_table(metric):
    """On the CPU workers path the two-level cells are ranked by running top-p lists
    (_two_level_fused: a row's nearest group first, then the others); it must rank the same cells
    as the torch score table (_two_level, the path without workers), for the tuned coarse probes
    and for pad=False rows that reach fewer than p cells."""
    from cm_engine import _knn_torch as kt

    X = clustered(6000)
    xt = kt._prep(torch.from_numpy(np.asarray(X, dtype=np.float32)), metric)
    with kt._Workers(2) as w:
        qz = kt._train_two_level(xt, 64, niter=5, seed=0, metric=metric, work=64 << 20, workers=w)
        table = kt._Quantizer(qz.C, metric, work=64 << 20, C1=qz.C1, goff=qz.goff)
        assert qz.C1 is not None and qz.workers is not None
        for probes in (1, 2, 8):
            qz.coarse_probes = table.coarse_probes = probes
            for p in (1, 5, 40):
                a = qz.search(xt, p, pad=False)
                b = table.search(xt, p, pad=False)
                same = np.mean(np.all(a == b, axis=1))
                assert same >= 0.999, (probes, p, same)
                assert np.array_equal(np.sort(a, 1)[:, :1] < 0, np.sort(b, 1)[:, :1] < 0)  # same short rows


def _lloyd_reference(X: np.ndarray, nlist: int, niter: int, seed: int, metric: str) -> np.ndarray:
    """Slow, obvious Lloyd's k-means in float64 with `kmeans`'s seeding (the same torch generator
    calls: a permutation for the initial rows, random rows for empty cells)."""
    n = X.shape[0]
    g = torch.Generator().manual_seed(seed)
    C = X[torch.randperm(n, generator=g)[:nlist].numpy()].astype(np.float64)
    for _ in range(niter):
        if metric == "cosine":
            a = np.argmax(X @ C.T, axis=1)
        else:
            a = np.argmin(((X[:, None, :] - C[None]) ** 2).sum(-1), axis=1)
        newC = np.zeros_like(C)
        empty = np.bincount(a, minlength=nlist) == 0
        for c in np.flatnonzero(~empty):
            newC[c] = X[a == c].astype(np.float64).mean(0)
        if empty.any():
            newC[empty] = X[torch.randint(0, n, (int(empty.sum()),), generator=g).numpy()]
        C = newC / np.linalg.norm(newC, axis=1, keepdims=True) if metric == "cosine" else newC
    return C


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_torch_kmeans_matches_lloyd_reference(metric):
    from cm_engine._knn_torch import kmeans

    rng = np.random.default_rng(5)
    centers = rng.normal(size=(12, 16)) * 5
    X = (centers[rng.integers(0, 12, 3000)] + rng.normal(size=(3000, 16))).astype(np.float32)
    if metric == "cosine":
        X /= np.linalg.norm(X, axis=1, keepdims=True)
    # 40 cells on 12 blobs: some cells empty out and are re-seeded along the way.
    got = kmeans(torch.from_numpy(X), 40, niter=6, seed=3, metric=metric, work=1 << 20).numpy()
    want = _lloyd_reference(X, 40, 6, 3, metric)
    assert got.dtype == np.float32 and got.shape == (40, 16)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("no_faiss", [False, True])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_bfloat16_ranked_grouped_search(metric, no_faiss, monkeypatch):
    """compute_dtype="bfloat16" on the CPU: cells' candidates ranked by bfloat16 products with
    _REDUCED_PAD spare, then re-ranked by float32 distances. With every cell searched the graph
    misses almost no true neighbour, and every reported distance is the float32 distance of the
    listed pair, not the bfloat16 score."""
    from cm_engine import _knn_torch as kt

    if no_faiss:
        monkeypatch.setattr(kt, "_faiss_importable", lambda: False)
    X = clustered(1200)
    g = knn_graph(X, k=8, metric=metric, backend="torch", exact=False, nlist=10, nprobe=10, max_cell_probes=4,
                  compute_dtype="bfloat16")
    assert g.info["compute_dtype"] == "bfloat16"
    I, _, D = reference(X, 8, metric)
    hit = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(g.indices.tolist(), I.tolist())])
    print(f"bfloat16-ranked graph, {metric}, no_faiss={no_faiss}: {hit:.4f} of the exact neighbours")
    assert hit >= 0.99
    np.testing.assert_allclose(g.distances, np.take_along_axis(D, g.indices.astype(np.int64), 1), atol=TOL, rtol=TOL)
    assert (np.diff(g.distances, axis=1) >= 0).all() and (g.indices != np.arange(len(X))[:, None]).all()


def test_top_largest_against_a_sort():
    """The fused selection against a sort, on scores with many ties (any of equal values at the
    boundary may be kept), kc from 1 to M, and rows whose best come last (every value replaces
    one)."""
    from cm_engine._knn_kernels import top_largest

    rng = np.random.default_rng(5)
    for m, M in ((7, 1), (9, 30), (40, 257)):
        S = rng.integers(-4, 5, size=(m, M)).astype(np.float32)
        S[0] = np.arange(M, dtype=np.float32)  # ascending: the worst case
        for kc in sorted({1, min(3, M), M // 2 or 1, M}):
            vals, pos = top_largest(S, kc)
            want = -np.sort(-S, axis=1)[:, :kc]
            np.testing.assert_array_equal(-np.sort(-vals, 1), want)
            np.testing.assert_array_equal(vals, np.take_along_axis(S, pos, 1))
            assert all(len(set(r)) == kc for r in pos.tolist()) and (0 <= pos).all() and (pos < M).all()
            if kc < M:  # nothing left out beats what was kept
                out = np.ones_like(S, bool)
                np.put_along_axis(out, pos, False, 1)
                assert (np.where(out, S, -np.inf).max(1) <= vals.min(1)).all()
    with pytest.raises(ValueError, match="kc"):
        top_largest(np.zeros((2, 3), np.float32), 4)


def test_top_update_against_a_sort():
    """Running top-kc lists fed in pieces (rows in shuffled order, each list meeting its scores in
    column blocks of uneven widths, some lists never or rarely fed) against a sort of each list's
    whole row, on scores with many ties; lists that saw fewer than kc values keep -inf / -1."""
    from cm_engine._knn_kernels import top_update

    rng = np.random.default_rng(8)
    for b, M, kc in ((5, 1, 1), (12, 40, 3), (30, 300, 16), (8, 20, 25)):
        full = rng.integers(-4, 5, size=(b, M)).astype(np.float32)
        full[0] = np.arange(M, dtype=np.float32)  # ascending: every value replaces one
        seen = np.zeros((b, M), bool)
        vals = np.full((b, kc), -np.inf, np.float32)
        pos = np.full((b, kc), -1, np.int64)
        cuts = np.unique(np.r_[0, rng.integers(0, M + 1, size=4), M])
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            rows = rng.permutation(b)[:max(1, b - 2)]  # some lists skip some blocks
            top_update(np.ascontiguousarray(full[rows, c0:c1]), rows, int(c0), vals, pos)
            seen[rows, c0:c1] = True
        for r in range(b):
            got = pos[r][pos[r] >= 0]
            want = -np.sort(-full[r][seen[r]])[:kc]
            assert got.size == want.size and len(set(got.tolist())) == got.size
            np.testing.assert_array_equal(-np.sort(-vals[r][:got.size]), want)
            np.testing.assert_array_equal(vals[r][:got.size], full[r, got])
            assert seen[r, got].all() and np.isneginf(vals[r][pos[r] < 0]).all()
            if got.size == kc:  # nothing left out beats what was kept
                rest = seen[r].copy()
                rest[got] = False
                assert not rest.any() or full[r][rest].max() <= vals[r].min()
    with pytest.raises(ValueError, match="float32"):
        top_update(np.zeros((2, 3)), np.arange(2), 0, np.zeros((2, 1), np.float32), np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match="rows"):
        top_update(np.zeros((2, 3), np.float32), np.arange(3), 0, np.zeros((3, 1), np.float32),
                   np.zeros((3, 1), np.int64))


def test_merge_sorted_against_a_lexsort():
    """merge_sorted (insertion into sorted k-NN rows) against the obvious merge: each row and its
    candidates lexsorted together by (distance, index; missing last), the first k kept. Many
    ties, rows with missing entries, candidates that are -1, rows merged twice, int32 and int64."""
    from cm_engine._knn_kernels import merge_sorted

    def reference(oi, od, rows, ii, dd, k):
        ci = np.concatenate([oi[rows].astype(np.int64), ii.astype(np.int64)], 1)
        cd = np.concatenate([od[rows], dd], 1)
        cd = np.where(ci < 0, np.float32(np.inf), cd)
        o = np.lexsort((np.where(ci < 0, np.iinfo(np.int64).max, ci), cd), axis=1)[:, :k]
        oi[rows] = np.take_along_axis(ci, o, 1)
        od[rows] = np.take_along_axis(cd, o, 1)

    rng = np.random.default_rng(11)
    for idt in (np.int32, np.int64):
        for n, k, c in ((50, 1, 3), (200, 6, 10), (120, 16, 25)):
            # finished rows: distinct indices per row, sorted by (distance, index), some missing
            oi = np.stack([rng.permutation(10 * n)[:k] for _ in range(n)]).astype(idt)
            od = rng.integers(0, 6, size=(n, k)).astype(np.float32) / 4
            od[rng.random((n, k)) < 0.1] = np.inf
            oi[np.isinf(od)] = -1
            o = np.lexsort((np.where(oi < 0, np.iinfo(np.int64).max, oi), od), axis=1)
            oi, od = np.take_along_axis(oi, o, 1), np.take_along_axis(od, o, 1)
            ai, ad = oi.copy(), od.copy()
            for call in (1, 2):  # candidates never listed before: a fresh index range per call
                rows = rng.choice(n, size=n // 2, replace=False).astype(np.int64)
                ii = (call * 100 * n + rng.permutation(100 * n)[:c * rows.size]).reshape(rows.size, c).astype(idt)
                dd = rng.integers(0, 6, size=ii.shape).astype(np.float32) / 4
                gone = rng.random(ii.shape) < 0.3
                ii[gone], dd[gone] = -1, np.inf
                merge_sorted(ai, ad, rows, ii, dd)
                reference(oi, od, rows, ii, dd, k)
                np.testing.assert_array_equal(ai, oi)
                np.testing.assert_array_equal(ad, od)
    with pytest.raises(ValueError, match="merge_sorted"):
        merge_sorted(np.zeros((3, 2), np.int64), np.zeros((3, 3), np.float32), np.arange(1),
                     np.zeros((1, 2), np.int64), np.zeros((1, 2), np.float32))


def test_coarse_probes_grow_by_a_quarter_until_the_reach_passes(monkeypatch):
    """Two-level tuning raises the coarse groups searched by +25% (at least +1) per step, not 2x
    (the assignment's cost is proportional to them), and stops at the first count whose reachable
    share (less 2 SE) passes target + 0.01; the graph still meets its target."""
    from cm_engine import _knn_torch as kt

    assert [kt.next_coarse_probes(p, 100) for p in (1, 3, 4, 8, 10, 12, 15, 90)] == [2, 4, 5, 10, 12, 15, 18, 100]
    monkeypatch.setattr(kt, "_TWO_LEVEL_CELLS", 8)
    monkeypatch.setattr(kt, "_TWO_LEVEL_TRAIN_CELLS", 8)
    monkeypatch.setattr(kt, "_COARSE_PROBES", 1)
    X = np.random.default_rng(0).normal(size=(6000, 16)).astype(np.float32)  # no clusters: groups cut neighbours
    g = knn_graph(X, k=10, backend="torch", exact=False, nlist=64, target_recall=0.95, tune_rows=600)
    tried = {int(c): v for c, v in g.info["coarse_tried"].items()}
    steps = sorted(tried)
    assert steps[0] == 1 and len(steps) >= 3  # here one group reaches 0.45, six 0.98
    assert all(kt.next_coarse_probes(a, 10 ** 6) == b for a, b in zip(steps, steps[1:]))
    assert g.info["coarse_probes"] == steps[-1]
    assert all(tried[c] < 0.96 for c in steps[:-1]) and tried[steps[-1]] >= 0.96
    assert recall_at_k(g, knn_graph(X, k=10, backend="faiss", exact=True)) >= 0.94
