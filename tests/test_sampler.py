"""round_robin against a plain Python loop of the paper's procedure.

Statistical tests: chi-square goodness of fit against the exact uniform probabilities, each at a
false-alarm rate alpha = 1e-4 (ALPHA). The seeds are fixed (0..S-1), so every test is
deterministic: a correct sampler fails one of them with probability about 1e-4 per test, i.e.
these seeds were checked once and will keep passing; a biased sampler (e.g. ties broken by label,
or a non-uniform pick inside a cluster) fails them by a wide margin.
"""
from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import cm_engine
from cm_engine import sampler
from cm_engine.sampler import _round_robin, as_generator, round_robin

ALPHA = 1e-4
KERNELS = ["numba", "numpy"] if sampler.HAVE_NUMBA else ["numpy"]


def rr(cands, labels, budget, seed, *, kernel, order="smallest", labeled=None):
    """round_robin through a chosen kernel (the public function picks numba when present)."""
    labels = np.asarray(labels, dtype=np.int64)
    cands = np.asarray(cands, dtype=np.int64)
    lab = None if labeled is None else np.asarray(labeled, dtype=np.int64)
    return _round_robin(cands, labels, budget, as_generator(seed), order=order, labeled=lab, kernel=kernel)


# ---------------------------------------------------------------------------------------------
# the slow, obviously-correct reference: the paper's loop


def loop_cluster_sequence(cands, labels, rng, order="smallest", labeled=None):
    """Clusters in visiting order: sort by (holds a labeled point, count key, random tie-break)."""
    count = Counter(int(labels[c]) for c in cands)
    labset = set() if labeled is None else {int(labels[i]) for i in labeled}
    tie = {k: rng.random() for k in count}

    def key(k):
        primary = 1 if k in labset else 0
        size = {"smallest": count[k], "largest": -count[k], "random": 0}[order]
        return (primary, size, tie[k])

    return sorted(count, key=key)


def loop_round_robin(cands, labels, budget, rng, cluster_seq):
    """Walk the clusters in `cluster_seq`, one uniformly random remaining candidate each, until budget."""
    members = defaultdict(list)
    for c in cands:
        members[int(labels[c])].append(int(c))
    out = []
    while len(out) < budget and any(members[k] for k in cluster_seq):
        for k in cluster_seq:
            if len(out) == budget:
                break
            if members[k]:
                out.append(members[k].pop(int(rng.integers(len(members[k])))))
    return out


def order_key(k, count, order, labset):
    return (1 if k in labset else 0, {"smallest": count[k], "largest": -count[k], "random": 0}[order])


def check_structure(out, cands, labels, budget, order="smallest", labeled=None):
    """Everything about a round-robin output that does not depend on the random draws."""
    cands = [int(c) for c in cands]
    out = [int(i) for i in out]
    assert len(out) == min(budget, len(cands))
    assert len(set(out)) == len(out), "duplicate picks"
    assert set(out) <= set(cands), "picked a non-candidate"
    count = Counter(int(labels[c]) for c in cands)
    labset = set() if labeled is None else {int(labels[i]) for i in labeled}
    seq = [int(labels[i]) for i in out]
    # pass 0 = the first K picks (each cluster once); its order must be sorted by the order's key
    K = len(count)
    pass0 = seq[:K]
    assert len(set(pass0)) == len(pass0), "a cluster visited twice in the first pass"
    keys = [order_key(k, count, order, labset) for k in pass0]
    assert keys == sorted(keys), f"first pass not in {order} order: {keys}"
    if len(pass0) < K:
        return
    # every later pass visits each cluster with candidates left exactly once, in the same order:
    # that is exactly the loop run with the pass-0 order, cut at the budget
    expect = []
    for r in itertools.count():
        alive = [k for k in pass0 if count[k] > r]
        if not alive:
            break
        expect += alive
    assert seq == expect[: len(seq)]
    ref = loop_round_robin(cands, labels, budget, np.random.default_rng(0), pass0)
    assert Counter(seq) == Counter(int(labels[i]) for i in ref), "per-cluster counts differ from the loop's"


def random_pool(rng, n, n_clusters, *, huge_labels=False):
    w = rng.dirichlet(np.full(n_clusters, 0.5))
    labels = rng.choice(n_clusters, size=n, p=w).astype(np.int64)
    if huge_labels:  # sparse, large label values: exercises the np.unique path
        labels = labels * 1_000_003 + 7
    return labels


# ---------------------------------------------------------------------------------------------
# structure: passes, order, counts (against the loop)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("order", ["smallest", "largest", "random"])
@pytest.mark.parametrize("aware", [False, True])
@pytest.mark.parametrize("huge", [False, True])
def test_structure_matches_loop(kernel, order, aware, huge):
    rng = np.random.default_rng(123)
    for trial in range(8):
        n = int(rng.integers(1, 400))
        labels = random_pool(rng, n, int(rng.integers(1, 30)), huge_labels=huge)
        m = int(rng.integers(1, n + 1))
        cands = rng.choice(n, size=m, replace=False)
        labeled = rng.choice(n, size=int(rng.integers(0, n // 3 + 1)), replace=False) if aware else None
        for budget in (0, 1, m // 3, m // 2 + 1, m - 1, m, m + 5):
            budget = max(budget, 0)
            out = rr(cands, labels, budget, trial, kernel=kernel, order=order, labeled=labeled)
            assert out.dtype == np.int64
            check_structure(out, cands, labels, budget, order, labeled)


@pytest.mark.parametrize("order", ["smallest", "largest"])
def test_distinct_counts_equal_the_loop_exactly(order):
    """With all cluster counts distinct the order is deterministic: the cluster sequence equals the loop's."""
    sizes = [5, 1, 7, 3, 2, 9]
    labels = np.repeat(np.array([40, 3, 17, 0, 8, 22]), sizes)  # labels unrelated to sizes
    cands = np.random.default_rng(0).permutation(labels.size)
    for budget in range(0, labels.size + 3):
        out = round_robin(cands, labels, budget, seed=budget, order=order)
        ref_seq = loop_cluster_sequence(cands, labels, np.random.default_rng(1), order)
        ref = loop_round_robin(cands, labels, budget, np.random.default_rng(2), ref_seq)
        assert labels[out].tolist() == [int(labels[i]) for i in ref]


def test_public_function_and_lazy_export():
    labels = np.array([0, 0, 1, 2, 2, 2])
    out = cm_engine.round_robin(np.arange(6), labels, 4, seed=0)
    assert out.dtype == np.int64 and out.shape == (4,)
    # smallest first: the singleton cluster 1 leads, then 0 (2 candidates), then 2 (3)
    assert labels[out].tolist() == [1, 0, 2, 0]


def test_torch_and_list_inputs_and_seed_forms():
    labels = np.array([3, 3, 1, 1, 1, 0, 7, 7])
    cands = [0, 2, 3, 5, 6, 7]
    a = round_robin(cands, labels, 5, seed=11)
    b = round_robin(torch.tensor(cands), torch.tensor(labels), 5, seed=np.random.default_rng(11))
    assert np.array_equal(a, b)
    assert np.array_equal(a, round_robin(np.array(cands), labels, 5, seed=np.int64(11)))
    # a Generator is used as given: its stream advances, so two calls differ in general
    g = np.random.default_rng(5)
    draws = {tuple(round_robin(np.arange(8), labels, 8, seed=g)) for _ in range(20)}
    assert len(draws) > 1


def test_budget_larger_than_candidates_returns_all():
    labels = np.arange(10) % 3
    out = round_robin([1, 4, 7, 2], labels, 100)
    assert sorted(out.tolist()) == [1, 2, 4, 7]
    assert round_robin([], labels, 5).shape == (0,)
    assert round_robin([1, 2], labels, 0).shape == (0,)


# ---------------------------------------------------------------------------------------------
# uniformity (chi-square, alpha = ALPHA per test, seeds 0..S-1 fixed)


def chi2_uniform(observed: Counter, outcomes):
    obs = np.array([observed.get(o, 0) for o in outcomes], dtype=float)
    assert obs.sum() == sum(observed.values()), f"outcome outside the admissible set: {set(observed) - set(outcomes)}"
    p = chisquare(obs).pvalue
    assert p > ALPHA, f"chi-square p = {p:.2e} <= {ALPHA}: {dict(zip(outcomes, obs))}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_uniform_inside_a_partly_taken_cluster(kernel):
    # clusters (label: members): 9: {0}, 5: {1,2,3}, 2: {4..8}. Order 9, 5, 2 (distinct counts).
    # budget 6: pass 0 takes 3, pass 1 takes 2 (5, 2), pass 2 takes 1 (5): cluster 2 gives 2 of 5.
    labels = np.array([9, 5, 5, 5, 2, 2, 2, 2, 2])
    big, mid = Counter(), Counter()
    S = 2000
    for seed in range(S):
        out = rr(np.arange(9), labels, 6, seed, kernel=kernel)
        big[tuple(i for i in out if labels[i] == 2)] += 1  # ordered pair: 20 outcomes
        mid[tuple(i for i in out if labels[i] == 5)] += 1  # full permutation of 3: 6 outcomes
    chi2_uniform(big, list(itertools.permutations(range(4, 9), 2)))
    chi2_uniform(mid, list(itertools.permutations(range(1, 4), 3)))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("order", ["smallest", "largest"])
def test_equal_count_clusters_uniform_in_a_partial_pass(kernel, order):
    # six clusters of 2 candidates each, labels sorted along the pool (a label tie-break would
    # always take clusters 0, 1, 2 in the partial pass). budget 9: pass 1 takes 3 of the 6.
    labels = np.repeat(np.arange(6), 2)
    first_partial, first_two, in_partial = Counter(), Counter(), Counter()
    S = 2000
    for seed in range(S):
        out = rr(np.arange(12), labels, 9, seed, kernel=kernel, order=order)
        seq = labels[out].tolist()
        first_two[tuple(seq[:2])] += 1
        first_partial[seq[6]] += 1
        for k in seq[6:]:
            in_partial[k] += 1
    chi2_uniform(first_two, list(itertools.permutations(range(6), 2)))
    chi2_uniform(first_partial, list(range(6)))
    chi2_uniform(in_partial, list(range(6)))  # each cluster is in the partial pass w.p. 1/2


@pytest.mark.parametrize("kernel", KERNELS)
def test_random_order_is_uniform_over_clusters(kernel):
    # counts 1, 2, 3, 4: "random" ignores them; the first visited cluster is uniform
    labels = np.repeat(np.array([10, 20, 30, 40]), [1, 2, 3, 4])
    first, order2 = Counter(), Counter()
    for seed in range(2000):
        seq = labels[rr(np.arange(10), labels, 10, seed, kernel=kernel, order="random")].tolist()
        first[seq[0]] += 1
        order2[tuple(dict.fromkeys(seq))] += 1  # the whole cluster order: 24 outcomes
    chi2_uniform(first, [10, 20, 30, 40])
    chi2_uniform(order2, list(itertools.permutations([10, 20, 30, 40])))


@pytest.mark.parametrize("kernel", KERNELS)
def test_label_aware_uniform_among_equals(kernel):
    # four clusters of 3; clusters 1 and 3 hold a labeled point (index 3 is labeled and a
    # candidate, index 10 is labeled and not a candidate): 0 and 2 come first, in random order
    labels = np.repeat(np.arange(4), 3)
    cands = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11])
    firsts = Counter()
    for seed in range(2000):
        seq = labels[rr(cands, labels, 4, seed, kernel=kernel, order="random", labeled=[3, 10])].tolist()
        assert set(seq[:2]) == {0, 2} and set(seq[2:]) == {1, 3}
        firsts[tuple(seq)] += 1
    chi2_uniform(firsts, [(a, b, c, d) for a, b in itertools.permutations([0, 2]) for c, d in itertools.permutations([1, 3])])
    # with "smallest", cluster 3 (2 candidates) leads the labeled group
    for seed in range(50):
        seq = labels[rr(cands, labels, 4, seed, kernel=kernel, labeled=[3, 10])].tolist()
        assert set(seq[:2]) == {0, 2} and seq[2:] == [3, 1]


def test_kernels_agree_in_distribution():
    """numba and numpy kernels: same frequency of each cluster sequence (two-sample chi-square)."""
    if len(KERNELS) < 2:
        pytest.skip("numba missing")
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    counts = {k: Counter() for k in KERNELS}
    for k in KERNELS:
        for seed in range(1500):
            counts[k][tuple(rr(np.arange(8), labels, 5, seed, kernel=k).tolist())] += 1
    keys = sorted(set(counts["numba"]) | set(counts["numpy"]))
    from scipy.stats import chi2_contingency

    table = np.array([[counts[k].get(x, 0) for x in keys] for k in KERNELS])
    assert chi2_contingency(table).pvalue > ALPHA


# ---------------------------------------------------------------------------------------------
# properties (hypothesis)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_properties(data):
    n = data.draw(st.integers(1, 300), label="n")
    nl = data.draw(st.integers(1, 40), label="n_labels")
    labels = np.array(data.draw(st.lists(st.integers(0, nl - 1), min_size=n, max_size=n)), dtype=np.int64)
    if data.draw(st.booleans(), label="huge"):
        labels = labels * 10**12 + 3
    cands = np.array(data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n)), dtype=np.int64)
    budget = data.draw(st.integers(0, n + 3), label="budget")
    order = data.draw(st.sampled_from(["smallest", "largest", "random"]), label="order")
    labeled = data.draw(st.none() | st.lists(st.integers(0, n - 1), max_size=n), label="labeled")
    seed = data.draw(st.integers(0, 2**32), label="seed")
    for kernel in KERNELS:
        out = rr(cands, labels, budget, seed, kernel=kernel, order=order, labeled=labeled)
        assert out.dtype == np.int64
        assert out.size == min(budget, cands.size)
        assert np.unique(out).size == out.size
        assert np.isin(out, cands).all()
        check_structure(out, cands, labels, budget, order, labeled)
        again = rr(cands, labels, budget, seed, kernel=kernel, order=order, labeled=labeled)
        assert np.array_equal(out, again), "same seed, different picks"


def test_larger_pool_against_loop_counts():
    """10K candidates, 300 uneven clusters: both kernels vs the loop's per-cluster counts."""
    rng = np.random.default_rng(7)
    labels = random_pool(rng, 20_000, 300)
    cands = rng.choice(20_000, size=10_000, replace=False)
    for kernel in KERNELS:
        for budget in (150, 1_000, 6_000):
            check_structure(rr(cands, labels, budget, 3, kernel=kernel), cands, labels, budget)


# ---------------------------------------------------------------------------------------------
# bad input: error type and the argument's name


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(candidates=[0, 1], labels=np.array([0.0, 1.0]), budget=1), TypeError, "labels"),
        (dict(candidates=[0, 1], labels=np.zeros((2, 2), int), budget=1), ValueError, "labels"),
        (dict(candidates=[0, 1], labels=np.array([0, -1]), budget=1), ValueError, "labels"),
        (dict(candidates=[], labels=np.zeros(0, int), budget=1), ValueError, "labels"),
        (dict(candidates=[0, 5], labels=np.zeros(3, int), budget=1), ValueError, "candidates"),
        (dict(candidates=[-1], labels=np.zeros(3, int), budget=1), ValueError, "candidates"),
        (dict(candidates=[0, 0], labels=np.zeros(3, int), budget=1), ValueError, "candidates"),
        (dict(candidates=np.array([0.0, 1.0]), labels=np.zeros(3, int), budget=1), TypeError, "candidates"),
        (dict(candidates=[[0, 1]], labels=np.zeros(3, int), budget=1), ValueError, "candidates"),
        (dict(candidates=[0, 1], labels=np.zeros(3, int), budget=-1), ValueError, "budget"),
        (dict(candidates=[0, 1], labels=np.zeros(3, int), budget=1.5), TypeError, "budget"),
        (dict(candidates=[0, 1], labels=np.zeros(3, int), budget=1, order="biggest"), ValueError, "order"),
        (dict(candidates=[0, 1], labels=np.zeros(3, int), budget=1, seed=-3), ValueError, "seed"),
        (dict(candidates=[0, 1], labels=np.zeros(3, int), budget=1, seed=1.5), TypeError, "seed"),
        (dict(candidates=[0, 1], labels=np.zeros(3, int), budget=1, labeled=[3]), ValueError, "labeled"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}: expected"):
        round_robin(**kwargs)


def test_duplicate_detection_both_paths():
    # dense (bitmap) and sparse (sort) uniqueness checks
    with pytest.raises(ValueError, match="candidates: expected unique.*e.g. 7"):
        round_robin([7, 1, 7], np.zeros(10, int), 1)
    with pytest.raises(ValueError, match="candidates: expected unique.*e.g. 7"):
        round_robin([7, 1, 7], np.zeros(10_000, int), 1)


def test_auto_kernel_choice_is_a_function_of_the_input_size():
    rng = np.random.default_rng(9)
    labels = random_pool(rng, 40_000, 500)
    for m in (1_000, sampler.NUMBA_MIN_CANDIDATES + 10):
        cands = rng.choice(labels.size, size=m, replace=False)
        want = "numba" if sampler.HAVE_NUMBA and m >= sampler.NUMBA_MIN_CANDIDATES else "numpy"
        got = round_robin(cands, labels, m // 4, seed=2)
        assert np.array_equal(got, rr(cands, labels, m // 4, 2, kernel=want))
        check_structure(got, cands, labels, m // 4)


@pytest.mark.parametrize("maxval", [1, 300, 2**16 - 1, 2**16, 2**20 + 5, 2**40])
def test_radix_argsort_is_stable_argsort(maxval):
    x = np.random.default_rng(maxval % 97).integers(0, maxval + 1, 5_000)
    assert np.array_equal(sampler._stable_argsort_uint(x, maxval), np.argsort(x, kind="stable"))


# ---------------------------------------------------------------------------------------------
# the picks depend on the partition, not on the label values


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("order", ["smallest", "largest", "random"])
@pytest.mark.parametrize("aware", [False, True])
def test_picks_are_a_function_of_the_partition(kernel, order, aware):
    """Renumbering the clusters (a permutation of the label values, or sparse huge values that take the
    np.unique path) changes no pick: the engine's HAC and an exact linkage that find the same partition
    must select the same points for one seed."""
    rng = np.random.default_rng(7)
    for trial in range(6):
        n = int(rng.integers(50, 600))
        labels = random_pool(rng, n, int(rng.integers(2, 60)))
        cands = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
        labeled = rng.choice(n, size=n // 5, replace=False) if aware else None
        renumber = rng.permutation(int(labels.max()) + 1)
        for other in (renumber[labels], renumber[labels] * 1_000_003 + 11):
            for budget in (1, cands.size // 3, cands.size):
                a = rr(cands, labels, budget, trial, kernel=kernel, order=order, labeled=labeled)
                b = rr(cands, other, budget, trial, kernel=kernel, order=order, labeled=labeled)
                assert np.array_equal(a, b)


def test_a_cluster_both_partitions_share_is_picked_alike():
    """numba kernel: a cluster's picks come from its own stream, so where two partitions differ only in
    other clusters (one split in two), the shared clusters' picks are the same points, in the same order."""
    if not sampler.HAVE_NUMBA:
        pytest.skip("numba kernel")
    sizes = [40, 30, 20, 60]
    a = np.repeat(np.arange(4), sizes)
    b = a.copy()
    b[a == 3] = 4 + (np.arange(60) % 2)  # cluster 3 split in two (30 + 30) in the other partition
    cands = np.random.default_rng(0).permutation(a.size)
    for seed in range(5):
        pa = rr(cands, a, 100, seed, kernel="numba", order="smallest")
        pb = rr(cands, b, 100, seed, kernel="numba", order="smallest")
        for c in range(3):  # clusters 0..2 are in both partitions, with the same members
            assert pa[a[pa] == c].tolist()[:20] == pb[b[pb] == c].tolist()[:20]


@pytest.mark.parametrize("kernel", KERNELS)
def test_cluster_ident_is_the_smallest_candidate(kernel):
    rng = np.random.default_rng(3)
    for huge in (False, True):
        labels = random_pool(rng, 500, 40, huge_labels=huge)
        cands = rng.choice(500, size=300, replace=False)
        key, counts, _, ident = sampler._dense_clusters(labels[cands], labels, None, cands, numba=kernel == "numba")
        ids = key.raw if key.table is None else key.table[key.raw]
        ref = [min(int(c) for c, i in zip(cands, ids) if i == k) for k in range(counts.size)]
        assert ident.dtype == np.uint64 and ident.tolist() == ref
