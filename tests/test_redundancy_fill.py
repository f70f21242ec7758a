"""The tiered fill of filtered_margin / filtered_cluster_margin (fewer survivors than the budget)
against a plain-Python sequential reference, on the graph and on its NearCopies table, both kernels."""
from __future__ import annotations

import numpy as np
import pytest

import cm_engine.redundancy as R
from cm_engine.redundancy import NearCopies, filtered_cluster_margin, filtered_margin
from cm_engine.sampler import _round_robin
from test_redundancy import kernel  # noqa: F401  (the fixture: numba and numpy kernels)
from test_redundancy_table import hard_graph, prefix_near_sets


def greedy(order, near, block):
    """Sequential greedy: keep c unless c is blocked or near a blocked or an earlier kept point."""
    block = set(block)
    kept = []
    for c in order:
        if c in block or near[c] & block:
            continue
        kept.append(c)
        block.add(c)  # kept points block their near-copies from here on
    return kept


def tiered_reference(s, near, budget, excl, *, km_ratio=None, labels=None, seed=0, order="smallest",
                     label_aware=False):
    """The documented tiers, one pick at a time: (1) the greedy against labeled + kept points,
    (2) the greedy over the rest against this batch's picks only, in (labeled near-copies, score,
    index) order, (3) plain score order. Cluster-
    Margin (km_ratio given): each of the first two tiers' round(km_ratio * still wanted) survivors
    go through the same round-robin (the engine's, a tested component) with one generator."""
    n = s.size
    excl = [] if excl is None else [int(x) for x in excl]
    ex = set(excl)
    elig = [i for i in sorted(range(n), key=lambda i: (s[i], i)) if i not in ex]
    rng = np.random.default_rng(seed)
    picked, sizes = [], [0, 0, 0]
    for tier in (1, 2):
        short = budget - len(picked)
        if short <= 0:
            break
        taken = set(picked)
        rest = [c for c in elig if c not in taken]
        if tier == 2:  # fewest labeled near-copies first, then (score, index)
            rest.sort(key=lambda c: (len(near[c] & ex), s[c], c))
        want = short if km_ratio is None else int(round(km_ratio * short))
        surv = greedy(rest, near, excl if tier == 1 else picked)[:want]
        if km_ratio is None:
            picked += surv
        else:
            lab = None
            if label_aware and (excl or picked):
                lab = np.array(excl + (picked if tier == 2 else []), dtype=np.int64)
            picked += _round_robin(np.sort(np.array(surv, dtype=np.int64)), labels, short, rng, order=order,
                                   labeled=lab).tolist()
        sizes[tier - 1] = len(picked) - sum(sizes)
        if tier == 1 and len(picked) < budget:
            assert len(surv) < want  # the second tier starts only when every survivor is picked
    taken = set(picked)
    picked += [c for c in elig if c not in taken][: budget - len(picked)]
    sizes[2] = len(picked) - sum(sizes)
    return np.array(picked, dtype=np.int64), sizes


def copy_pool(rng, n, k, groups):
    """A graph whose near edges (<= 0.02) join points of random copy groups; other edges far."""
    group = rng.integers(0, groups, n)
    ind = np.empty((n, k), np.int64)
    dist = np.empty((n, k), np.float32)
    for i in range(n):
        mates = np.flatnonzero(group == group[i])
        mates = mates[mates != i][: int(rng.integers(0, k))]  # sometimes one-directional
        others = rng.choice(np.delete(np.arange(n), i), k - mates.size, replace=False)
        ind[i] = np.concatenate([mates, others])
        dist[i] = np.concatenate([rng.uniform(0, 0.01, mates.size), rng.uniform(0.1, 1, others.size)])
        o = np.argsort(dist[i], kind="stable")
        ind[i], dist[i] = ind[i][o], dist[i][o]
    return ind, dist, 0.02


def cases(n_trials):
    for trial in range(n_trials):
        rng = np.random.default_rng(3000 + trial)
        if trial % 2:
            ind, dist, delta = hard_graph(trial, rng)
        else:
            n = int(rng.integers(8, 160))
            ind, dist, delta = copy_pool(rng, n, int(rng.integers(2, 6)), max(1, n // int(rng.integers(2, 6))))
        n = ind.shape[0]
        s = rng.random(n).astype(np.float32)
        if trial % 3 == 1:
            s = np.round(s * 5) / 5  # key ties
        excl = None if trial % 5 == 0 else rng.choice(n, int(rng.integers(0, n // 2 + 1)), replace=False)
        n_elig = n - (0 if excl is None else excl.size)
        budget = int(rng.integers(0, n_elig + 2))
        yield trial, rng, ind, dist, delta, s, excl, budget


@pytest.mark.parametrize("on", ["graph", "table"])
def test_filtered_margin_tiers_equal_reference(kernel, on):
    tiers = np.zeros(3, int)
    for trial, rng, ind, dist, delta, s, excl, budget in cases(40):
        near = prefix_near_sets(ind, dist, delta)
        want, sizes = tiered_reference(s, near, budget, excl)
        tiers += np.array(sizes) > 0
        src = (ind, dist) if on == "graph" else NearCopies.from_graph((ind, dist), delta=delta)
        got = filtered_margin(s, src, budget, delta=delta, exclude=excl)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
    assert (tiers >= 8).all(), tiers  # every tier was exercised


@pytest.mark.parametrize("on", ["graph", "table"])
def test_filtered_cluster_margin_tiers_equal_reference(kernel, on):
    for trial, rng, ind, dist, delta, s, excl, budget in cases(40):
        near = prefix_near_sets(ind, dist, delta)
        labels = rng.integers(0, max(1, s.size // int(rng.integers(1, 8))), s.size)
        km = float(rng.choice([1.0, 1.25, 3.0, 10.0]))
        order = ("smallest", "random", "largest")[trial % 3]
        aware = trial % 4 == 3
        want, _ = tiered_reference(s, near, budget, excl, km_ratio=km, labels=labels, seed=trial, order=order,
                                label_aware=aware)
        src = (ind, dist) if on == "graph" else NearCopies.from_graph((ind, dist), delta=delta)
        got = filtered_cluster_margin(s, labels, src, budget, km_ratio=km, delta=delta, exclude=excl, seed=trial,
                                      order=order, label_aware=aware)
        np.testing.assert_array_equal(got, want)


def test_second_tier_spreads_over_copy_groups():
    # every copy group has a labeled member: the old fill took the lowest margins, i.e. several
    # copies of the most uncertain group; the second tier takes one copy per group first
    g = np.repeat(np.arange(6), 4)  # 6 groups of 4
    n = g.size
    ind = np.array([[j for j in range(n) if g[j] == g[i] and j != i] for i in range(n)])
    dist = np.full(ind.shape, 0.001, np.float32)
    labeled = np.arange(0, n, 4)  # one per group
    s = np.linspace(0, 1, n).astype(np.float32)  # group 0 the most uncertain
    got = filtered_margin(s, (ind, dist), 8, delta=0.01, exclude=labeled)
    np.testing.assert_array_equal(got[:6], [1, 5, 9, 13, 17, 21])  # one per group, by margin
    np.testing.assert_array_equal(got[6:], [2, 3])  # then plain score order
    # a second labeled copy in groups 0 and 1: the groups with one labeled copy come first
    lab2 = np.concatenate([labeled, [1, 5]])
    got = filtered_margin(s, (ind, dist), 6, delta=0.01, exclude=lab2)
    np.testing.assert_array_equal(got, [9, 13, 17, 21, 2, 6])
    t = NearCopies.from_graph((ind, dist), delta=0.01)
    cm = filtered_cluster_margin(s, g, t, 6, km_ratio=1.0, exclude=labeled, seed=0)
    assert sorted(g[cm].tolist()) == list(range(6))


def test_second_tier_never_returns_labeled_points():
    # the second tier must never return a labeled point even though it does not block its copies
    rng = np.random.default_rng(5)
    ind, dist, delta = copy_pool(rng, 120, 4, 30)
    s = rng.random(120).astype(np.float32)
    excl = rng.choice(120, 60, replace=False)
    got = filtered_margin(s, (ind, dist), 60, delta=delta, exclude=excl)
    assert np.unique(got).size == 60 and not np.isin(got, excl).any()
    assert R._second_tier(s, (ind, dist), 10, np.zeros(0, np.int64), excl, delta)[0].size == 10
