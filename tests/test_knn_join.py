"""The grouped search's batched self-join (CUDA, or a CPU without FAISS): its pieces against slow
obvious references, and the whole search exact when every row requests every cell."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cm_engine import _knn_join as kj
from cm_engine import _knn_torch
from cm_engine.knn import knn_graph
from test_knn import assert_same_neighbours, clustered


def reference_probes(req, counts, cap):
    """Per cell, in a plain loop: the non-empty cells its rows request, the cell itself first,
    then by request count descending, then cell id; at most cap. And the requests left out."""
    nlist = counts.size
    off = np.concatenate([[0], np.cumsum(counts)])
    probes = np.full((nlist, cap), -1, np.int64)
    cut = np.zeros(req.shape, bool)
    for c in range(nlist):
        creq = req[off[c]:off[c + 1]]
        if creq.size == 0:
            continue
        cnt = {}
        for p in creq.ravel():
            cnt[int(p)] = cnt.get(int(p), 0) + 1
        order = sorted((p for p in cnt if counts[p] > 0), key=lambda p: (p != c, -cnt[p], p))[:cap]
        probes[c, :len(order)] = order
        cut[off[c]:off[c + 1]] = ~np.isin(creq, order) & (counts[creq] > 0)
    return probes, cut


def random_requests():
    """(counts [9], req [N, 4]): 9 cells, one empty that rows still request; each row's own cell
    first, then 3 random requests."""
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 6, 9)
    counts[[0, 4]] = [3, 0]
    own = np.repeat(np.arange(9), counts)
    return counts, np.concatenate([own[:, None], rng.integers(0, 9, (own.size, 3))], 1)


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_probe_table_matches_the_loop(cap):
    counts, req = random_requests()
    want_p, want_cut = reference_probes(req, counts, cap)
    got_p, got_cut = kj.probe_table(torch.from_numpy(req), torch.from_numpy(counts), cap)
    np.testing.assert_array_equal(got_p.numpy(), want_p)
    np.testing.assert_array_equal(got_cut.numpy(), want_cut)


def test_cell_probes_skip_empty_cells():
    """_cell_probes (the CPU join's choice for one cell) against the loop reference of the batched
    join's probe table: own cell first, then most-asked non-empty cells, ties by cell id."""
    counts, req = random_requests()
    off = np.concatenate([[0], np.cumsum(counts)])
    for cap in (1, 2, 5):
        want, _ = reference_probes(req, counts, cap)
        for c in np.flatnonzero(counts):
            got = _knn_torch._cell_probes(req[off[c]:off[c + 1]], int(c), counts, cap)
            np.testing.assert_array_equal(got, want[c][want[c] >= 0])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_batched_search_matches_brute_force(metric):
    """BatchedJoin.search: each unit's nearest candidates among its own (padded) candidate list."""
    rng = np.random.default_rng(1)
    xs = torch.from_numpy(rng.normal(size=(60, 5)).astype(np.float32))
    if metric == "cosine":
        xs = torch.nn.functional.normalize(xs, dim=1)
    j = kj.BatchedJoin(xs, metric=metric, kc=4, cdt=torch.float32, dev=torch.device("cpu"), work=1 << 20)
    qpos = torch.tensor([[0, 1, 2, -1], [10, 11, -1, -1]])
    cpos = torch.tensor([[5, 6, 7, 8, 9, 20, -1], [30, 31, 32, -1, -1, -1, -1]])
    pos, dist = j.search(qpos, cpos)
    X = xs.double().numpy()
    for b in range(2):
        cand = cpos[b][cpos[b] >= 0].numpy()
        for qi in qpos[b][qpos[b] >= 0].tolist():
            d = (1 - X[cand] @ X[qi]) if metric == "cosine" else np.sqrt(((X[cand] - X[qi]) ** 2).sum(1))
            want = cand[np.argsort(d, kind="stable")][:4]
            row = list(qpos[b]).index(qi)
            got = pos[b, row].numpy()
            assert set(got[got >= 0]) == set(want[:len(cand)]), (b, qi)
            np.testing.assert_allclose(np.sort(dist[b, row].numpy()[got >= 0]), np.sort(d)[:len(got[got >= 0])],
                                       atol=1e-5)
    assert (pos[1, :, 3] == -1).all() and torch.isinf(dist[1, :, 3]).all()  # 3 candidates for kc 4


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_batched_join_exact_with_small_units_and_batches(metric, monkeypatch):
    """Every row requests every cell, a cell searches only itself: the cut requests' pass must
    make the graph exact, with cells cut into many units and tiny batches (rows repeated
    within a batch of cut requests are merged in rounds)."""
    monkeypatch.setattr(_knn_torch, "_faiss_importable", lambda: False)
    monkeypatch.setattr(kj, "_UNIT_ROWS", 16)
    X = clustered(900)
    g = knn_graph(X, k=6, metric=metric, backend="torch", exact=False, nlist=10, nprobe=10, max_cell_probes=1,
                  budget_bytes=1 << 16)
    assert g.info["cap_cut_requests"] > 900
    assert_same_neighbours(g, X, 6, metric)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_batched_join_on_cuda(metric):
    """On the card: exact when the cut requests cover every cell; the tuned search meets its
    target in float16 on a larger pool (against the exact torch search on the card)."""
    X = clustered(1500)
    g = knn_graph(X, k=8, metric=metric, backend="torch", exact=False, nlist=12, nprobe=12, max_cell_probes=1,
                  device="cuda")
    assert g.info["cap_cut_requests"] > 1500
    assert_same_neighbours(g, X, 8, metric)
    Y = clustered(40000, d=64).astype(np.float16)
    ex = knn_graph(Y, k=16, metric=metric, backend="torch", exact=True, device="cuda", compute_dtype="float32")
    ap = knn_graph(Y, k=16, metric=metric, backend="torch", exact=False, device="cuda")
    from cm_engine.knn import recall_at_k

    assert ap.info["compute_dtype"] == "float16"
    assert recall_at_k(ap, ex) >= 0.95 - 0.01


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_two_level_table_search_matches_a_loop(metric, fused, monkeypatch):
    """_Quantizer two-level search (the score table with a row's groups end to end; fused: the
    CPU workers' running top-p lists, `_two_level_fused`): each row's p nearest cells among the
    cells of its p1 nearest groups, with an empty group and groups of uneven sizes; fewer
    reachable cells than p give -1 (pad=False) or the nearest cell (pad)."""
    from cm_engine.knn import _prep

    rng = np.random.default_rng(5)
    C = _prep(torch.from_numpy(rng.normal(size=(23, 6)).astype(np.float32)), metric)
    C1 = _prep(torch.from_numpy(rng.normal(size=(5, 6)).astype(np.float32)), metric)
    goff = np.array([0, 9, 9, 12, 13, 23])  # group 1 is empty, group 3 has one cell
    qz = _knn_torch._Quantizer(C, metric, work=1 << 12, C1=C1, goff=goff)  # tiny work: many blocks
    qz.coarse_probes = 2
    if fused:
        qz.workers = _knn_torch._Workers(2)
        monkeypatch.setattr(_knn_torch, "_FUSED_ROWS", 64)  # several blocks per worker
    x = _prep(torch.from_numpy(rng.normal(size=(200, 6)).astype(np.float32)), metric)
    X, Cd, C1d = x.double().numpy(), C.double().numpy(), C1.double().numpy()

    def dist(a, B):
        return -(B @ a) if metric == "cosine" else ((B - a) ** 2).sum(1)

    for p in (3, 12):
        got = qz.search(x, p, pad=False)
        for r in range(len(X)):
            groups = np.argsort(dist(X[r], C1d), kind="stable")[:2]
            cells = np.concatenate([np.arange(goff[g], goff[g + 1]) for g in groups])
            want = cells[np.argsort(dist(X[r], Cd[cells]), kind="stable")][:p]
            assert list(got[r][got[r] >= 0]) == list(want), (p, r)
            assert (got[r][len(want):] == -1).all()
        padded = qz.search(x, p)
        assert (padded >= 0).all() and (padded[:, 0] == got[:, 0]).all()
    if fused:
        qz.workers.shutdown()


def test_held_out_rows_avoid_the_sample():
    """held_out_rows against np.setdiff1d: the same pick from the rows outside the sample, sorted
    and distinct; all rows when the sample leaves too few."""
    rng = np.random.default_rng(0)
    for n, ns, m in [(100, 30, 20), (50, 49, 1), (1000, 0, 10), (10, 5, 6)]:
        sample = np.sort(rng.choice(n, ns, replace=False))
        got = _knn_torch.held_out_rows(n, sample, m, seed=4)
        assert got.size == min(m, n) and (np.diff(got) > 0).all() and got.min() >= 0 and got.max() < n
        if n - ns >= m:
            rest = np.setdiff1d(np.arange(n), sample)
            want = rest[np.sort(np.random.default_rng([4, 0x2A]).choice(rest.size, size=m, replace=False))]
            np.testing.assert_array_equal(got, want)
