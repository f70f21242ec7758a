"""Vectorized round-robin sampler over clusters (Cluster-Margin's diversity step).

The paper's procedure (Citovsky et al. 2021, Alg. 1): group the candidates by cluster, order the
clusters by their number of candidates (smallest first), then repeatedly walk the clusters in that
order taking one uniformly random remaining candidate from each cluster that still has one, until
`budget` points are taken.

No Python loop over clusters or picks. Each candidate gets the key (its random rank inside its
cluster, its cluster's position in the order); the lexicographic order of that key, cut at the
budget, *is* the round-robin: pass r takes the rank-r candidate of every cluster with more than r
candidates, in cluster order. Two kernels compute it:

* numba (the default from NUMBA_MIN_CANDIDATES candidates on): a stable counting pass groups the
  candidates by cluster position (O(m + K)); each cluster's segment gets a partial Fisher-Yates
  shuffle of only the ranks that the budget reaches; each picked candidate is written straight to
  its output slot, whose pass offsets come from the cluster counts. O(m + K), no sort at all.
* numpy (below NUMBA_MIN_CANDIDATES, and the fallback when numba is missing): a random
  permutation of the candidates, a stable argsort by cluster position (random order inside each
  cluster), the (rank, position) key, and an argpartition + sort of only the first `budget` keys.

The randomness is tied to the clusters, not to their label values: the tie-break among clusters
equal under the order's key is a hash of (seed, the cluster's smallest candidate index), and so is
each cluster's own random stream in the numba kernel (the numpy kernel's one permutation of the
candidates is already label-free). So the picks are a function of the partition of the candidates:
two clusterings that find the same partition under different numbering (the engine's HAC and
scipy's exact linkage, say) pick the same points for the same seed, and a cluster both find is
treated alike even where the rest differs. Label values never act as a tie-break.

Both kernels give every admissible outcome the paper's probabilities, but they draw differently,
so the exact picks for one seed differ between them. Which one runs depends only on the number of
candidates and on numba being installed, so one input and seed always give the same picks on one
installation. numba is a hard dependency of the package; the numpy kernel is the small-input path,
the fallback, and a second implementation for the tests.
"""
from __future__ import annotations

import importlib.util
import logging
import numbers

import numpy as np

from ._validate import as_index_array, as_labels, check_choice, check_int, check_nonempty

log = logging.getLogger("cm_engine")

ORDERS = ("smallest", "largest", "random")

#: numba is a declared dependency; the numpy kernel keeps the sampler usable without it. Imported
#: lazily: loading numba and the cached kernel costs about a second, more than the whole numpy
#: kernel on small inputs.
HAVE_NUMBA = importlib.util.find_spec("numba") is not None
#: Below this many candidates kernel="auto" uses the numpy kernel (about 2 ms at 10K here).
NUMBA_MIN_CANDIDATES = 20_000


def as_generator(seed, *, name: str = "seed") -> np.random.Generator:
    """An int >= 0 (or None: fresh OS entropy) -> a new Generator; a Generator is used as is."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, bool) or not isinstance(seed, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an int or a numpy.random.Generator, got {type(seed).__name__}")
    return np.random.default_rng(check_int(name, seed, min=0))


def check_unique(name: str, idx: np.ndarray, n: int) -> None:
    """Reject duplicate indices in O(len + n) with a bitmap (a sort only when idx is much shorter than n)."""
    m = idx.size
    if m < 2:
        return
    if m * 16 >= n:
        seen = np.zeros(n, dtype=np.bool_)
        seen[idx] = True
        if int(np.count_nonzero(seen)) == m:
            return
    s = np.sort(idx)
    dup = s[1:][s[1:] == s[:-1]]
    if dup.size:
        raise ValueError(f"{name}: expected unique indices, got {dup.size} duplicate(s), e.g. {int(dup[0])}")


def round_robin(candidates, labels, budget, *, seed=0, order="smallest", labeled=None) -> np.ndarray:
    """Pick `budget` candidates by visiting their clusters round-robin.

    candidates: int [m] unique pool indices in [0, N) (numpy, torch or list).
    labels:     int [N] cluster labels of the WHOLE pool (non-negative; any values, not only 0..L-1).
    budget:     int >= 0. When budget >= m all candidates come back (in visiting order), not an error.
    seed:       int >= 0 or numpy.random.Generator (used as given, so its stream advances).
    order:      cluster visiting order, fixed across passes:
                "smallest" (the paper's, default): fewest candidates first;
                "largest": most candidates first;
                "random": a seeded random permutation of the clusters.
                Clusters equal under the order's key are ordered at random (seeded), never by
                label; the picks depend on the partition only, not on the label values (see the
                module docstring).
    labeled:    optional int pool indices of already-labeled points (duplicates allowed). When
                given, the order is label-aware: clusters whose pool members include no labeled
                point come first, then the others; inside each of these two groups the `order` key
                applies, then the random tie-break. (With order="random" this is "unlabeled clusters
                first, random among equals".) A cluster counts as labeled if any labeled index has
                its label, whether or not that index is a candidate.

    Each pass takes one uniformly random remaining candidate from every cluster that has one left,
    in the cluster order; passes repeat until `budget` are taken.

    Returns int64 [min(budget, m)] pool indices in visiting order.
    """
    labels = as_labels("labels", labels)
    n = labels.shape[0]
    check_nonempty("labels", n)
    cand = as_index_array("candidates", candidates, n=n, unique=False)
    check_unique("candidates", cand, n)
    budget = check_int("budget", budget, min=0)
    check_choice("order", order, ORDERS)
    rng = as_generator(seed)
    lab_idx = None if labeled is None else as_index_array("labeled", labeled, n=n, unique=False)
    return _round_robin(cand, labels, budget, rng, order=order, labeled=lab_idx)


# ----------------------------------------------------------------------------------------------
# kernel: assumes valid input (int64 unique candidates in range, int64 non-negative labels)


def _round_robin(cand, labels, budget, rng, *, order="smallest", labeled=None, kernel="auto") -> np.ndarray:
    m = cand.size
    if m == 0 or budget == 0:
        return np.zeros(0, dtype=np.int64)
    if kernel == "auto":
        kernel = "numba" if HAVE_NUMBA and m >= NUMBA_MIN_CANDIDATES else "numpy"
    lab = labels[cand]
    key, counts, has_lab, ident = _dense_clusters(lab, labels, labeled, cand, numba=kernel == "numba")
    salt_order, salt_pick = (np.uint64(x) for x in rng.integers(0, 2**63 - 1, size=2, dtype=np.int64))
    pos_of = _cluster_positions(counts, has_lab, order, mix64(ident ^ salt_order))  # cluster id -> position
    cnt_pos = np.empty_like(counts)
    cnt_pos[pos_of] = counts  # counts in visiting order
    seg_start = np.zeros(cnt_pos.size, dtype=np.int64)
    np.cumsum(cnt_pos[:-1], out=seg_start[1:])
    pass_start, rstar, rem, n_out = _cut(counts, budget)
    if kernel == "numba":
        stream = np.empty(counts.size, dtype=np.uint64)
        stream[pos_of] = mix64(ident ^ salt_pick)  # each cluster's own random stream, in visiting order
        return _rr_numba(cand, key, pos_of, cnt_pos, seg_start, pass_start, rstar, rem, n_out, stream)
    return _rr_numpy(cand, key, pos_of, cnt_pos, seg_start, n_out, rng)


def _dense_clusters(lab, labels, labeled, cand, *, numba=False):
    """Map candidate labels to cluster ids.

    Returns (key [m], counts [K], has_lab [K] or None, ident uint64 [K]): cluster id of candidate i
    is key[i] through the caller's lookup (key is the label itself when labels are dense enough for a
    bincount, else the np.unique inverse, so ids are 0..K-1 and counts are indexed by them). ident is
    each cluster's smallest candidate pool index: its identity, independent of its label. The random
    tie-break and the random picks inside a cluster are drawn from hashes of it, so the picks are a
    function of the partition of the candidates, not of how the clustering numbered its clusters.
    """
    m = lab.size
    top = int(lab.max()) + 1
    has_lab = None
    if top <= 4 * m + 1024:
        # Labels are usually 0..L-1: one bincount, no sort. Empty labels are dropped below by
        # making `key` index a compacted id table.
        counts_all = np.bincount(lab, minlength=top)
        present = np.flatnonzero(counts_all)
        counts = counts_all[present]
        ids = np.empty(top, dtype=np.int64)
        ids[present] = np.arange(present.size, dtype=np.int64)
        if labeled is not None:
            marks = np.zeros(top, dtype=np.bool_)
            ll = labels[labeled]
            marks[ll[ll < top]] = True
            has_lab = marks[present]
        return _Composed(lab, ids), counts, has_lab, _group_min(lab, cand, top, numba)[present]
    uniq, inv = np.unique(lab, return_inverse=True)
    counts = np.bincount(inv, minlength=uniq.size)
    if labeled is not None:
        ll = labels[labeled]
        j = np.searchsorted(uniq, ll)
        ok = j < uniq.size
        ok[ok] = uniq[j[ok]] == ll[ok]
        has_lab = np.zeros(uniq.size, dtype=np.bool_)
        has_lab[j[ok]] = True
    inv = inv.reshape(-1).astype(np.int64, copy=False)
    return _Composed(inv, None), counts, has_lab, _group_min(inv, cand, uniq.size, numba)


class _Composed:
    """key[i] = table[raw[i]] (or raw[i]), kept unevaluated so the numba kernel fuses the lookup."""

    __slots__ = ("raw", "table")

    def __init__(self, raw, table):
        self.raw, self.table = raw, table


def _group_min(group, val, size, numba) -> np.ndarray:
    """out[g] = min(val[group == g]) (uint64 [size]; the int64 maximum where a group is empty)."""
    if numba:
        return _numba_kernels()["group_min"](group, val, size).view(np.uint64)
    out = np.full(size, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(out, group, val)
    return out.view(np.uint64)


def mix64(x) -> np.ndarray:
    """splitmix64's finalizer on uint64 values: a bijection whose outputs look independent and uniform."""
    z = np.asarray(x, dtype=np.uint64).copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _cluster_positions(counts, has_lab, order, tie) -> np.ndarray:
    """Position of each cluster in the visiting order (int64 [K]); tie: uint64 [K] random tie-break keys."""
    K = counts.size
    keys = [tie]  # uniform random tie-break: never the label
    if order == "smallest":
        keys.append(counts)
    elif order == "largest":
        keys.append(-counts)
    if has_lab is not None:
        keys.append(has_lab.astype(np.int8))  # 0 (no labeled point) first
    seq = np.lexsort(keys)  # lexsort: last key is primary
    pos = np.empty(K, dtype=np.int64)
    pos[seq] = np.arange(K, dtype=np.int64)
    return pos


def _cut(counts, budget):
    """Where the budget ends: pass offsets, the last (partial) pass and how many it takes.

    alive[r] = clusters with more than r candidates = picks in pass r; pass r starts at
    P[r] = sum(alive[:r]). Returns (P[:rstar+1], rstar, rem, n_out): passes < rstar are complete,
    pass rstar takes its first `rem` clusters (in order).
    """
    m = int(counts.sum())
    maxc = int(counts.max())
    hist = np.bincount(counts, minlength=maxc + 1)
    alive = counts.size - np.cumsum(hist)[:-1]  # r = 0..maxc-1
    P = np.zeros(maxc + 1, dtype=np.int64)
    np.cumsum(alive, out=P[1:])
    if budget >= m:
        return P, maxc, 0, m
    rstar = int(np.searchsorted(P, budget, side="right")) - 1
    return P[: rstar + 1].copy(), rstar, budget - int(P[rstar]), budget


def _rr_numpy(cand, key, pos_of, cnt_pos, seg_start, n_out, rng):
    m, K = cand.size, cnt_pos.size
    perm = rng.permutation(m)
    raw = key.raw[perm]
    cpos = pos_of[raw if key.table is None else key.table[raw]]
    grouped = perm[_stable_argsort_uint(cpos, K - 1)]  # by cluster position, random inside
    cl = np.repeat(np.arange(K, dtype=np.int64), cnt_pos)
    rank = np.arange(m, dtype=np.int64) - np.repeat(seg_start, cnt_pos)
    k = rank * K + cl
    if n_out < m:
        sel = np.argpartition(k, n_out - 1)[:n_out]
        sel = sel[np.argsort(k[sel])]
    else:
        sel = np.argsort(k)
    return cand[grouped[sel]]


def _stable_argsort_uint(x, maxval: int) -> np.ndarray:
    """Stable argsort of non-negative ints <= maxval: LSD radix over 16-bit digits.

    numpy's stable sort is a radix sort only for 16-bit types; one pass per digit is about twice
    as fast as its timsort on int64 for 10M keys (measured here).
    """
    order = np.argsort((x & 0xFFFF).astype(np.uint16), kind="stable")
    shift = 16
    while maxval >> shift:
        digit = ((x[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
        shift += 16
    return order


_NUMBA_KERNEL: dict | None = None


def _numba_kernels() -> dict:
    """Compile the numba kernels on first use (cached on disk by numba)."""
    global _NUMBA_KERNEL
    if _NUMBA_KERNEL is None:
        _NUMBA_KERNEL = _build_numba_kernels()
    return _NUMBA_KERNEL


def _rr_numba(cand, key, pos_of, cnt_pos, seg_start, pass_start, rstar, rem, n_out, stream):
    table = key.table if key.table is not None else np.arange(0, dtype=np.int64)
    return _numba_kernels()["rr"](cand, key.raw, table, key.table is not None, pos_of, cnt_pos, seg_start,
                                  pass_start, rstar, rem, n_out, stream)


def _build_numba_kernels():
    from numba import njit

    @njit(cache=True, nogil=True)
    def group_min(group, val, size):
        out = np.full(size, np.iinfo(np.int64).max, dtype=np.int64)
        for i in range(group.size):
            g, v = group[i], val[i]
            if v < out[g]:
                out[g] = v
        return out

    @njit(cache=True, nogil=True)
    def kernel(cand, raw, table, use_table, pos_of, cnt_pos, seg_start, pass_start, rstar, rem, n_out, stream):
        m = cand.size
        K = cnt_pos.size
        # 1. stable counting pass: candidates grouped by cluster position
        grouped = np.empty(m, dtype=np.int64)
        fill = seg_start.copy()
        for i in range(m):
            c = raw[i]
            if use_table:
                c = table[c]
            p = pos_of[c]
            grouped[fill[p]] = cand[i]
            fill[p] += 1
        # 2. per cluster: partial Fisher-Yates of the ranks the budget reaches, each pick written
        #    to its slot (pass r's next free slot; clusters are visited in order, so the slots of
        #    one pass fill in cluster order)
        out = np.empty(n_out, dtype=np.int64)
        nxt = pass_start.copy()
        last_end = pass_start[rstar] + rem  # pass rstar only takes its first `rem` clusters
        inv53 = 1.0 / 9007199254740992.0
        for p in range(K):
            c = cnt_pos[p]
            s = seg_start[p]
            state = stream[p]  # the cluster's own stream: its picks do not depend on other clusters
            full = min(c, rstar)
            take = full
            if c > rstar and nxt[rstar] < last_end:
                take = full + 1
            for j in range(take):
                span = c - j
                if span > 1:
                    # splitmix64 step; 53 random bits -> uniform index in [0, span)
                    state += np.uint64(0x9E3779B97F4A7C15)
                    z = state
                    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                    z = z ^ (z >> np.uint64(31))
                    r = np.int64(np.float64(z >> np.uint64(11)) * inv53 * span)
                    if r >= span:
                        r = span - 1
                    t = grouped[s + j]
                    grouped[s + j] = grouped[s + j + r]
                    grouped[s + j + r] = t
                out[nxt[j]] = grouped[s + j]
                nxt[j] += 1
        return out

    return {"rr": kernel, "group_min": group_min}
