"""Stateful selectors: rounds recorded, atomic state, resume in a new process, foreign state refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cm_engine.selector import ClusterMarginSelector, Selector
from cm_engine.strategies import cluster_margin


def pool(n=300, d=8, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(12, d)) * 3
    return (c[rng.integers(12, size=n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def logits(n=300, c=5, seed=1):
    return np.random.default_rng(seed).normal(size=(n, c)).astype(np.float32)


def labels(n=300):
    return np.arange(n) % 17


def test_rounds_equal_cluster_margin_and_never_repeat(tmp_path):
    x, lab = pool(), labels()
    sel = ClusterMarginSelector(x, state_dir=tmp_path / "s", labels=lab, km_ratio=2.0, seed=3)
    seed_set = sel.mark_labeled(np.arange(10))
    assert seed_set.tolist() == list(range(10))
    assert sel.mark_labeled([0, 1, 2]).size == 0  # idempotent
    seen = set(range(10))
    for r in range(4):
        z = logits(seed=r)
        before = sel.picked
        new = sel.select(z, 30)
        # the same as calling the stage functions directly with the round's generator
        want = cluster_margin(sel.scores(z), lab, 30, km_ratio=2.0, exclude=before,
                              seed=np.random.default_rng([3, r, 0x5E1]))
        assert np.array_equal(new, want)
        assert not (set(new.tolist()) & seen)
        seen |= set(new.tolist())
        assert sel.round == r + 1
    assert sel.picked.size == 130 and np.unique(sel.picked).size == 130
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["round"] == 4 and man["n_picked"] == 130 and len(man["rounds"]) == 4
    assert [f for f in os.listdir(tmp_path / "s") if f.startswith("picked_")] == [man["picked_file"]]


def test_reopen_resumes_identically(tmp_path):
    x, lab = pool(), labels()
    a = ClusterMarginSelector(x, state_dir=tmp_path / "a", labels=lab, seed=1, km_ratio=3.0)
    b = ClusterMarginSelector(x, state_dir=tmp_path / "b", labels=lab, seed=1, km_ratio=3.0)
    outs = [a.select(logits(seed=r), 20) for r in range(3)]
    b.select(logits(seed=0), 20)
    b = ClusterMarginSelector.load(tmp_path / "b", x)  # a new object: state read from disk
    assert b.round == 1
    outs_b = [outs[0]] + [b.select(logits(seed=r), 20) for r in (1, 2)]
    for u, v in zip(outs, outs_b):
        assert np.array_equal(u, v)


def test_foreign_and_mismatched_state_is_refused(tmp_path):
    x, lab = pool(), labels()
    ClusterMarginSelector(x, state_dir=tmp_path / "s", labels=lab, km_ratio=2.0).select(logits(), 10)
    with pytest.raises(ValueError, match="different pool"):
        ClusterMarginSelector(pool(seed=9), state_dir=tmp_path / "s", labels=lab, km_ratio=2.0)
    with pytest.raises(ValueError, match="km_ratio"):
        ClusterMarginSelector(x, state_dir=tmp_path / "s", labels=lab, km_ratio=5.0)
    with pytest.raises(ValueError, match="cluster_margin"):
        Selector("random", n=300, state_dir=tmp_path / "s")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest"):
        ClusterMarginSelector(x, state_dir=tmp_path / "junk", labels=lab)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="state_dir"):
        ClusterMarginSelector(x, state_dir=tmp_path / "file", labels=lab)
    with pytest.raises(ValueError, match="budget"):
        ClusterMarginSelector(x, state_dir=tmp_path / "s", labels=lab, km_ratio=2.0).select(logits(), -1)


def test_stale_handle_cannot_pick_twice(tmp_path):
    x, lab = pool(), labels()
    a = ClusterMarginSelector(x, state_dir=tmp_path / "s", labels=lab)
    b = ClusterMarginSelector(x, state_dir=tmp_path / "s", labels=lab)
    a.select(logits(), 10)
    with pytest.raises(RuntimeError, match="changed by another selector"):
        b.select(logits(), 10)


_CHILD = textwrap.dedent("""
    import os, sys, numpy as np
    import cm_engine.selector as S
    from cm_engine.pool import save_npy
    x = np.load(sys.argv[1]); lab = np.arange(len(x)) % 17
    sel = S.ClusterMarginSelector(sys.argv[1], state_dir=sys.argv[2], labels=lab, km_ratio=2.0, seed=5)
    crash_round = int(sys.argv[3])
    real_save = S.save_npy
    def crashing_save(path, arr, **kw):
        real_save(path, arr, **kw)
        if sel.round + 1 == crash_round and "picked_" in str(path):
            os._exit(9)  # killed after the new picks file is written, before the manifest switches
    S.save_npy = crashing_save
    rng = np.random.default_rng(0)
    for r in range(sel.round, 4):
        z = np.random.default_rng(r).normal(size=(len(x), 5)).astype(np.float32)
        print(",".join(map(str, sel.select(z, 25))), flush=True)
""")


def test_crash_between_rounds_loses_nothing(tmp_path):
    x = pool()
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    state = tmp_path / "state"
    run = lambda crash: subprocess.run([sys.executable, str(script), str(tmp_path / "x.npy"), str(state), str(crash)],
                                       capture_output=True, text=True, timeout=120)
    p = run(3)  # completes rounds 1 and 2, dies while saving round 3
    assert p.returncode == 9, p.stderr
    done = [list(map(int, line.split(","))) for line in p.stdout.split()]
    assert len(done) == 2
    sel = ClusterMarginSelector.load(state)  # reopens the recorded .npy path
    assert sel.round == 2 and sel.picked.tolist() == done[0] + done[1]
    p = run(0)  # resume in a new process, no crash
    assert p.returncode == 0, p.stderr
    rest = [list(map(int, line.split(","))) for line in p.stdout.split()]
    allp = sum(done + rest, [])
    assert len(rest) == 2 and len(allp) == len(set(allp)) == 100
    # identical to an uninterrupted run
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "x.npy"), str(tmp_path / "clean"), "0"],
                       capture_output=True, text=True, timeout=120)
    clean = [list(map(int, line.split(","))) for line in p.stdout.split()]
    assert clean == done + rest


@pytest.mark.parametrize("strategy", ["random", "margin", "entropy", "least_confidence", "coreset", "badge"])
def test_baseline_selector(tmp_path, strategy):
    x = pool()
    sel = Selector(strategy, x, state_dir=tmp_path / strategy, seed=2)
    sel.mark_labeled(np.arange(5))
    a = sel.select(logits(), 20)
    b = sel.select(logits(seed=4), 20)
    allp = np.concatenate([np.arange(5), a, b])
    assert np.unique(allp).size == 45 and np.array_equal(sel.picked, allp)
    again = Selector(strategy, x, state_dir=tmp_path / strategy, seed=2)
    assert again.round == 2 and np.array_equal(again.picked, allp)


def test_cluster_margin_selector_builds_clustering_once(tmp_path):
    x = pool(200)
    sel = ClusterMarginSelector(x, state_dir=tmp_path / "s", target_mean_size=5, k=8, seed=0)
    assert (tmp_path / "s" / "labels.npy").exists() and sel.labels.shape == (200,)
    new = sel.select(logits(200), 15)
    assert new.size == 15
    import cm_engine.cluster as C

    orig = C.cluster
    C.cluster = lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-clustered"))
    try:
        again = ClusterMarginSelector(x, state_dir=tmp_path / "s", target_mean_size=5, k=8, seed=0)
    finally:
        C.cluster = orig
    assert np.array_equal(again.labels, sel.labels)


# ----------------------------------------------------------------------------- near-duplicate filter

def copy_pool(groups=60, copies=4, d=8, seed=0):
    """`groups` distinct points, each repeated `copies` times with tiny noise; group id per row."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(groups, d)).astype(np.float32) * 3
    x = np.repeat(base, copies, axis=0) + 1e-3 * rng.normal(size=(groups * copies, d)).astype(np.float32)
    return x.astype(np.float32), np.repeat(np.arange(groups), copies)


def test_dedup_selector_never_picks_a_near_copy(tmp_path):
    from cm_engine.knn import knn_graph

    x, group = copy_pool()
    n = x.shape[0]
    lab = np.arange(n) % 13
    sel = ClusterMarginSelector(x, state_dir=tmp_path / "s", labels=lab, km_ratio=2.0, seed=5, k=6, metric="l2",
                                dedup=True)
    assert sel.delta > 0 and (tmp_path / "s" / "graph_indices.npy").exists()
    g = knn_graph(x, k=6, metric="l2")
    np.testing.assert_array_equal(np.asarray(sel.graph[0]), g.indices)
    sel.mark_labeled(np.flatnonzero(group < 10)[::4])  # one copy of each of groups 0..9
    for r in range(3):
        before = sel.picked
        z = logits(n, seed=r)
        new = sel.select(z, 12)
        want = cluster_margin(sel.scores(z), lab, 12, km_ratio=2.0, exclude=before,
                              seed=np.random.default_rng([5, r, 0x5E1]), dedup_graph=g, delta=sel.delta)
        np.testing.assert_array_equal(new, want)
        # no pick shares a copy group with a labeled/earlier point or with another pick
        assert not set(group[new].tolist()) & set(group[before].tolist())
        assert np.unique(group[new]).size == new.size
        rep = sel.redundancy()
        assert rep["n_picked"] == 12 and rep["redundant"] == 0.0
    # without the filter, margin picks copies of labeled points: the report sees them
    plain = ClusterMarginSelector(x, state_dir=tmp_path / "p", labels=lab, km_ratio=1.0, seed=5, graph=g)
    plain.mark_labeled(sel.picked)
    plain.select(logits(n, seed=9), 40)
    rep = plain.redundancy()
    assert rep["near_labeled"] > 0 and rep["delta"] == pytest.approx(sel.delta)
    assert plain.delta is None and not (tmp_path / "p" / "graph_indices.npy").exists()


def test_dedup_state_round_trips(tmp_path):
    x, _ = copy_pool(seed=1)
    n = x.shape[0]
    np.save(tmp_path / "x.npy", x)
    lab = np.arange(n) % 11
    kw = dict(labels=lab, km_ratio=3.0, seed=2, k=6, metric="l2", dedup=True, delta=0.05)
    a = ClusterMarginSelector(tmp_path / "x.npy", state_dir=tmp_path / "a", **kw)
    b = ClusterMarginSelector(tmp_path / "x.npy", state_dir=tmp_path / "b", **kw)
    outs = [a.select(logits(n, seed=r), 10) for r in range(3)]
    b.select(logits(n, seed=0), 10)
    import cm_engine.knn as K

    orig = K.knn_graph
    K.knn_graph = lambda *a, **k: (_ for _ in ()).throw(AssertionError("graph rebuilt"))
    try:
        c = ClusterMarginSelector.load(tmp_path / "b")  # the graph and delta come from the state dir
    finally:
        K.knn_graph = orig
    assert c.dedup and c.delta == 0.05 and c.round == 1
    assert [c.select(logits(n, seed=r), 10).tolist() for r in (1, 2)] == [o.tolist() for o in outs[1:]]
    with pytest.raises(ValueError, match="delta"):
        ClusterMarginSelector(tmp_path / "x.npy", state_dir=tmp_path / "b", **dict(kw, delta=0.1))
    with pytest.raises(ValueError, match="delta"):
        ClusterMarginSelector(x, state_dir=tmp_path / "c", labels=lab, delta=0.1)  # delta without dedup
    with pytest.raises(ValueError, match="delta"):
        ClusterMarginSelector(x, state_dir=tmp_path / "d", labels=lab, dedup=True, delta=-1.0)
    with pytest.raises(ValueError, match="graph"):
        ClusterMarginSelector(x, state_dir=tmp_path / "e", labels=lab, dedup=True, graph=(np.zeros((3, 2), int),
                                                                                          np.zeros((3, 2))))


def test_margin_selector_with_dedup(tmp_path):
    from cm_engine.baselines import uncertainty_scores
    from cm_engine.knn import knn_graph
    from cm_engine.redundancy import filtered_margin

    x, group = copy_pool(seed=2)
    n = x.shape[0]
    g = knn_graph(x, k=6, metric="l2")
    sel = Selector("margin", n=n, state_dir=tmp_path / "m", dedup_graph=g)
    sel.mark_labeled(np.arange(0, 40, 4))
    z = logits(n, seed=3)
    before = sel.picked
    new = sel.select(z, 20)
    np.testing.assert_array_equal(new, filtered_margin(uncertainty_scores(z), g, 20, delta=sel.delta, exclude=before))
    assert np.unique(group[new]).size == 20 and not set(group[new].tolist()) & set(group[before].tolist())
    again = Selector("margin", n=n, state_dir=tmp_path / "m", dedup_graph=g)
    assert again.dedup and again.delta == sel.delta and again.redundancy()["redundant"] == 0.0
    with pytest.raises(ValueError, match="dedup"):
        Selector("margin", n=n, state_dir=tmp_path / "m")  # the filter cannot be dropped silently on resume
    with pytest.raises(ValueError, match="dedup_graph"):
        Selector("random", n=n, state_dir=tmp_path / "r", dedup_graph=g)
