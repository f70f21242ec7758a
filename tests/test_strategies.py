"""cluster_margin: candidates = the k_m lowest eligible scores (reference: a stable full sort),
then exactly the round-robin of test_sampler.py over them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cm_engine
from cm_engine.pool import save_npy
from cm_engine.sampler import round_robin
from cm_engine.strategies import cluster_margin, lowest_k


def ref_candidates(scores, km, exclude=()):
    """The km lowest eligible scores by a stable full sort: ties go to the lowest pool index."""
    scores = np.asarray(scores, dtype=np.float64)
    eligible = np.setdiff1d(np.arange(scores.size), np.asarray(exclude, dtype=np.int64))
    order = eligible[np.argsort(scores[eligible], kind="stable")]
    return np.sort(order[:km])


@settings(max_examples=100, deadline=None)
@given(vals=st.lists(st.integers(0, 6), min_size=1, max_size=200), k=st.integers(0, 210),
       block=st.none() | st.integers(1, 80), drop=st.none() | st.lists(st.integers(0, 199), max_size=100))
def test_lowest_k_matches_stable_sort_with_ties(vals, k, block, drop):
    """Blocked (running best k merged per block) and masked variants equal a stable full sort."""
    s = np.array(vals, dtype=np.float32) / 4  # few distinct values: many ties at the boundary
    exclude = np.unique([i for i in (drop or []) if i < s.size]).astype(np.int64)
    keep = None
    if drop is not None:
        keep = np.ones(s.size, dtype=bool)
        keep[exclude] = False
    assert np.array_equal(lowest_k(s, k, keep=keep, block_rows=block), ref_candidates(s, k, exclude))


@pytest.mark.parametrize("order", ["smallest", "largest", "random"])
@pytest.mark.parametrize("label_aware", [False, True])
def test_equals_round_robin_over_reference_candidates(order, label_aware):
    rng = np.random.default_rng(1)
    for trial in range(10):
        n = int(rng.integers(5, 500))
        scores = np.round(rng.random(n), 2)  # ties
        labels = rng.integers(0, max(1, n // 8), n)
        exclude = rng.choice(n, size=int(rng.integers(0, n // 2)), replace=False)
        budget = int(rng.integers(0, n // 3 + 2))
        km_ratio = float(rng.choice([1.0, 1.25, 3.0, 10.0]))
        got = cluster_margin(scores, labels, budget, km_ratio=km_ratio, exclude=exclude, seed=trial,
                             order=order, label_aware=label_aware)
        cand = ref_candidates(scores, int(round(km_ratio * budget)), exclude)
        want = round_robin(cand, labels, budget, seed=trial, order=order,
                           labeled=exclude if label_aware else None)
        assert np.array_equal(got, want)
        assert not np.isin(got, exclude).any(), "returned an excluded index"
        assert np.isin(got, cand).all(), "returned a point outside the k_m lowest eligible"
        assert got.size == min(budget, n - exclude.size)


def test_km_ratio_one_takes_exactly_the_lowest():
    rng = np.random.default_rng(0)
    scores = rng.random(1000).astype(np.float32)
    labels = rng.integers(0, 30, 1000)
    got = cluster_margin(scores, labels, 100, km_ratio=1.0)
    assert np.array_equal(np.sort(got), np.sort(np.argsort(scores, kind="stable")[:100]))


def test_budget_larger_than_eligible_returns_all_eligible():
    scores = np.linspace(0, 1, 20)
    labels = np.arange(20) % 4
    got = cluster_margin(scores, labels, 50, exclude=[0, 5, 19])
    assert sorted(got.tolist()) == sorted(set(range(20)) - {0, 5, 19})
    assert cluster_margin(scores, labels, 0).shape == (0,)
    assert cluster_margin(scores, labels, 5, exclude=np.arange(20)).shape == (0,)


def test_diversity_one_per_cluster_first():
    # 4 clusters; the lowest scores all sit in cluster 0, yet the first pass covers every cluster
    labels = np.repeat(np.arange(4), 25)
    scores = np.where(labels == 0, 0.0, 1.0) + np.arange(100) * 1e-4
    got = cluster_margin(scores, labels, 4, km_ratio=25.0)
    assert sorted(labels[got].tolist()) == [0, 1, 2, 3]


def test_input_forms(tmp_path):
    rng = np.random.default_rng(3)
    scores = rng.random(300).astype(np.float32)
    labels = rng.integers(0, 20, 300)
    want = cluster_margin(scores, labels, 30, seed=4)
    assert want.dtype == np.int64 and want.shape == (30,)
    assert np.array_equal(cm_engine.cluster_margin(torch.from_numpy(scores), torch.from_numpy(labels), 30, seed=4), want)
    save_npy(tmp_path / "s.npy", scores)
    save_npy(tmp_path / "l.npy", labels)
    assert np.array_equal(cluster_margin(tmp_path / "s.npy", str(tmp_path / "l.npy"), 30, seed=4), want)
    assert np.array_equal(cluster_margin(scores, labels, 30, seed=np.random.default_rng(4)), want)
    # float16 and bfloat16 scores are widened; same ranking as their float32 values
    s16 = scores.astype(np.float16)
    assert np.array_equal(cluster_margin(s16, labels, 30, seed=4), cluster_margin(s16.astype(np.float32), labels, 30, seed=4))
    bf = torch.from_numpy(scores).to(torch.bfloat16)
    assert np.array_equal(cluster_margin(bf, labels, 30, seed=4), cluster_margin(bf.float().numpy(), labels, 30, seed=4))


def test_label_aware_visits_unlabeled_clusters_first():
    # copies: cluster k = {4k..4k+3}; clusters 0-4 hold an already-labeled point (excluded)
    labels = np.repeat(np.arange(10), 4)
    scores = np.random.default_rng(0).random(40)
    exclude = np.arange(0, 20, 4)
    got = cluster_margin(scores, labels, 5, km_ratio=10.0, exclude=exclude, label_aware=True, order="random")
    assert set(labels[got].tolist()) == {5, 6, 7, 8, 9}
    plain = cluster_margin(scores, labels, 5, km_ratio=10.0, exclude=exclude)  # smallest: labeled (3 left) first
    assert set(labels[plain].tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    "args, kwargs, exc, name",
    [
        ((np.zeros(4), np.zeros(4, int), 2), dict(km_ratio=0.5), ValueError, "km_ratio"),
        ((np.zeros(4), np.zeros(4, int), 2), dict(km_ratio=float("nan")), ValueError, "km_ratio"),
        ((np.zeros(4), np.zeros(4, int), -1), {}, ValueError, "budget"),
        ((np.zeros(4), np.zeros(4, int), 2.0), {}, TypeError, "budget"),
        ((np.zeros(4), np.zeros(5, int), 2), {}, ValueError, "labels"),
        ((np.array([0.1, np.nan, 0.2, 0.3]), np.zeros(4, int), 2), {}, ValueError, "scores"),
        ((np.array([0.1, np.inf, 0.2, 0.3]), np.zeros(4, int), 2), {}, ValueError, "scores"),
        ((np.zeros((4, 2)), np.zeros(4, int), 2), {}, ValueError, "scores"),
        ((np.zeros(4, bool), np.zeros(4, int), 2), {}, TypeError, "scores"),
        ((np.zeros(0), np.zeros(0, int), 2), {}, ValueError, "scores"),
        ((np.zeros(4), np.zeros(4), 2), {}, TypeError, "labels"),
        ((np.zeros(4), np.zeros(4, int), 2), dict(exclude=[4]), ValueError, "exclude"),
        ((np.zeros(4), np.zeros(4, int), 2), dict(exclude=[-1]), ValueError, "exclude"),
        ((np.zeros(4), np.zeros(4, int), 2), dict(exclude=[1, 1]), ValueError, "exclude"),
        ((np.zeros(4), np.zeros(4, int), 2), dict(exclude=[0.5]), TypeError, "exclude"),
        ((np.zeros(4), np.zeros(4, int), 2), dict(order="big"), ValueError, "order"),
        ((np.zeros(4), np.zeros(4, int), 2), dict(label_aware="yes"), TypeError, "label_aware"),
        ((np.zeros(4), np.zeros(4, int), 2), dict(seed="x"), TypeError, "seed"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}: expected"):
        cluster_margin(*args, **kwargs)


def test_cluster_margin_dedup_option_is_the_filtered_selection():
    from cm_engine.redundancy import filtered_cluster_margin

    rng = np.random.default_rng(5)
    n, k = 400, 6
    x = rng.normal(size=(n // 2, 4))
    x = np.concatenate([x, x + 1e-4 * rng.normal(size=x.shape)])  # every point has a near-copy
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    ind = np.argsort(d, axis=1)[:, :k]
    graph = (ind, np.take_along_axis(d, ind, 1).astype(np.float32))
    scores = rng.random(n)
    labels = rng.integers(0, 30, size=n)
    kw = dict(km_ratio=3, exclude=np.arange(0, 40), seed=2, delta=0.01)
    got = cluster_margin(scores, labels, 50, dedup_graph=graph, **kw)
    np.testing.assert_array_equal(got, filtered_cluster_margin(scores, labels, graph, 50, **kw))
    # no two picks are near-copies of each other, unlike the unfiltered selection on this pool
    pairs = d[np.ix_(got, got)] <= 0.01
    assert not pairs.any()
    with pytest.raises(ValueError, match="delta"):
        cluster_margin(scores, labels, 50, delta=0.01)
