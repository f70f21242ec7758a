"""Redundancy-aware selection through the k-NN graph: a near-duplicate filter and its diagnostic.

Web-scale pools hold many near-copies; uncertainty sampling then spends labels on copies of each
other and of points labeled in earlier rounds. The k-NN graph already lists every point's nearest
neighbours with distances, so near-copies are graph edges shorter than a threshold delta.

* `near_duplicate_filter(order, graph, delta=, labeled=)`: walk the candidates in the given order
  (lowest margin first) and keep a candidate unless it lies within delta of a labeled point or of a
  candidate kept before it. An edge counts in either direction (listed in the row of either
  endpoint). Exactly the sequential greedy, computed in rounds of whole-array operations (a
  parallel greedy independent set): each round accepts every undecided candidate none of whose
  earlier neighbours is undecided or accepted, then rejects every undecided candidate with an
  accepted earlier neighbour. The loop is over rounds (a handful on near-duplicate groups), never
  over picks. Work is O((|order| + |labeled|) k): only the rows of candidates and labeled points
  are read, never the whole graph.
* `NearCopies.from_graph(graph, delta=None)`: the pool's near-copy table (the graph's edges <=
  delta, symmetric CSR), built once per pool; accepted wherever a graph is, with the same answers.
  A selection cycle then walks only the near-copies of its candidates and labeled points
  (O(candidates + labeled + their near edges), no distance tests): the form for repeated cycles
  (the selectors build it on their first round).
* `auto_delta(graph)`: the documented threshold rule (below).
* `redundancy_report(picked, graph, delta=, labeled=)`: fractions of a batch that are near-copies
  of labeled points, of co-picked points, and that the filter would drop.
* `filtered_margin` / `filtered_cluster_margin`: margin selection and Cluster-Margin with the
  filter applied to the margin-ordered candidates (before the round-robin). When fewer than the
  budget survive (on redundant pools every copy group soon has a labeled member), the budget is
  filled in tiers: first the same greedy filter over the remaining points that drops only
  near-copies of this batch's picks (copies of labeled points allowed: one pick per copy group at
  most), taking the points with the fewest labeled near-copies first, then plain margin order.
  (Cluster-Margin sends the second tier through its round-robin.)

The auto-delta rule. Take the log of the graph's edge distances (a seeded sample of at most 65,536
rows, every listed neighbour). Near-duplicates make that distribution bimodal: a mode of copy edges
far below the mode of ordinary neighbour edges. Otsu's threshold on a 128-bin histogram splits it in
two; the split counts as bimodal when (a) Otsu's effectiveness (between-class over total variance)
is >= 0.75 and (b) the density at the valley (the minimum of the 5-bin-smoothed histogram between
the two class means) is <= 0.25 of the lower of the two peaks. Then delta = the valley's distance;
otherwise delta = 0 (no near-duplicate mode: only exact duplicates, distance 0, are filtered).
Measured on the benchmark's pools (k = 16, cosine, benchmarks/results/quality_delta.json):
redundant pools give effectiveness 0.85-0.98 and valley/peak <= 0.06, clean pools 0.60-0.65 and
>= 1.0. The rule never sees which points are copies.
"""
from __future__ import annotations

import importlib.util
import logging

import numpy as np

from ._validate import as_index_array, check_float, check_int

log = logging.getLogger("cm_engine")

#: auto_delta: bimodality thresholds (Otsu effectiveness, valley density over the lower peak).
MIN_EFFECTIVENESS = 0.75
MAX_VALLEY_RATIO = 0.25
SAMPLE_ROWS = 65_536
BINS = 128


# ---------------------------------------------------------------------------------------------
# input

def _graph_arrays(graph):
    """(indices int64 view-able [N, k], distances float [N, k]) from a KNNGraph or an (indices, distances) pair."""
    if hasattr(graph, "indices") and hasattr(graph, "distances"):
        ind, dist = graph.indices, graph.distances
    elif isinstance(graph, (tuple, list)) and len(graph) == 2:
        ind, dist = graph
    else:
        raise TypeError(f"graph: expected a KNNGraph (or an (indices, distances) pair), got {type(graph).__name__}")
    try:
        import torch

        if isinstance(ind, torch.Tensor):
            ind = ind.detach().cpu().numpy()
        if isinstance(dist, torch.Tensor):
            dist = dist.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(ind, np.ndarray):
        ind = np.asarray(ind)
    if not isinstance(dist, np.ndarray):
        dist = np.asarray(dist)
    if ind.ndim != 2:
        raise ValueError(f"graph.indices: expected a 2-D [N, k] array, got shape {ind.shape}")
    if dist.shape != ind.shape:
        raise ValueError(f"graph.distances: expected shape {ind.shape} (as graph.indices), got {dist.shape}")
    if not np.issubdtype(ind.dtype, np.integer):
        raise TypeError(f"graph.indices: expected integer indices, got dtype {ind.dtype}")
    if not np.issubdtype(dist.dtype, np.floating):
        raise TypeError(f"graph.distances: expected float distances, got dtype {dist.dtype}")
    if ind.shape[0] == 0:
        raise ValueError("graph: expected at least one row, got an empty graph")
    return ind, dist


def _check_delta(delta, graph):
    if delta is None:
        return auto_delta(graph)
    return check_float("delta", delta, min=0.0)


def _near_pairs(rows: np.ndarray, ind, dist, delta: float):
    """Edges (rows[i], j) with distance <= delta read from the given rows: (src, dst) int64 arrays.

    Column by column: rows are sorted ascending, so a row whose c-th distance exceeds delta has no
    further hit and leaves the active set; the loop (at most k columns) stops once none is left.
    Near-duplicates are few per row, so this reads a few columns instead of all k."""
    src_parts, dst_parts = [], []
    act = rows
    for c in range(ind.shape[1]):
        if act.size == 0:
            break
        dc = np.asarray(dist[act, c])
        hit = dc <= delta  # False for +inf (missing)
        act = act[hit]
        if act.size == 0:
            break
        jc = np.asarray(ind[act, c]).astype(np.int64, copy=False)
        ok = (jc >= 0) & (jc != act)
        src_parts.append(act[ok])
        dst_parts.append(jc[ok])
    if not src_parts:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy()
    return np.concatenate(src_parts), np.concatenate(dst_parts)


# ---------------------------------------------------------------------------------------------
# public API

def auto_delta(graph, *, seed: int = 0) -> float:
    """The near-duplicate threshold read off the graph's distances (rule in the module docstring).

    Returns the valley distance between the copy mode and the neighbour mode when the log edge
    distances are clearly bimodal, else 0.0 (only exact duplicates count as near-copies)."""
    ind, dist = _graph_arrays(graph)
    seed = check_int("seed", seed, min=0)
    n = ind.shape[0]
    rows = np.arange(n) if n <= SAMPLE_ROWS else np.sort(
        np.random.default_rng(seed).choice(n, SAMPLE_ROWS, replace=False))
    fast = HAVE_NUMBA and rows.size * ind.shape[1] >= NUMBA_MIN_WORK
    if fast:  # the same values in the same order, without the [rows, k] temporaries
        K = _numba_kernels()
        d = K["gather_distances"](rows.astype(np.int64, copy=False), np.asarray(ind), np.asarray(dist))
    else:
        d = np.asarray(dist[rows], dtype=np.float64).ravel()
        d = d[np.isfinite(d) & (np.asarray(ind[rows]).ravel() >= 0)]
        d = d[d > 0]  # exact duplicates (0) are filtered at any delta; log needs > 0
    if d.size < 16:
        return 0.0
    v = np.log(d)
    if float(v.max() - v.min()) <= 1e-9:
        return 0.0
    if fast:
        edges = np.linspace(v.min(), v.max(), BINS + 1)  # as np.histogram(v, bins=BINS)
        h = K["histogram_uniform"](v, edges)
    else:
        h, edges = np.histogram(v, bins=BINS)
    centers = (edges[:-1] + edges[1:]) / 2
    p = h / h.sum()
    w0 = np.cumsum(p)
    m = np.cumsum(p * centers)
    mt = m[-1]
    between = (mt * w0 - m) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    t = int(np.argmax(between[:-1]))
    eff = float(between[t] / max(v.var(), 1e-300))
    m0, m1 = m[t] / w0[t], (mt - m[t]) / (1 - w0[t])
    hs = np.convolve(h.astype(np.float64), np.ones(5) / 5, mode="same")
    lo, hi = int(np.searchsorted(centers, m0)), int(np.searchsorted(centers, m1))
    if hi <= lo:
        return 0.0
    j = lo + int(np.argmin(hs[lo:hi + 1]))
    peak = min(hs[: j + 1].max(), hs[j:].max())
    ratio = float(hs[j] / peak) if peak > 0 else 1.0
    bimodal = eff >= MIN_EFFECTIVENESS and ratio <= MAX_VALLEY_RATIO
    delta = float(np.exp(centers[j])) if bimodal else 0.0
    log.info("auto_delta: effectiveness %.3f, valley/peak %.3f -> %s, delta=%.4g", eff, ratio,
             "bimodal" if bimodal else "no near-duplicate mode", delta)
    return delta


class NearCopies:
    """The pool's near-copy table: the graph's edges of distance <= delta, symmetric, in CSR form.

    Build it once per pool (and delta) with `NearCopies.from_graph(graph, delta=None)` and pass it
    wherever a graph is accepted (`near_duplicate_filter`, `filtered_margin`,
    `filtered_cluster_margin`, `redundancy_report`, `cluster_margin(dedup_graph=)`): every call
    then walks only the near-copies, O(candidates + labeled + their near edges), instead of the k
    graph neighbours of every candidate and labeled point. Selections are identical to the graph's.

    offsets:    int64 [N + 1]; neighbours: int32 (int64 from 2**31 rows) [E]. Row i's near-copies
                are neighbours[offsets[i]:offsets[i + 1]], ascending, unique, never i: every j with
                an edge i -> j or j -> i in the graph, distance <= delta, inside the row's leading
                run of distances <= delta (graph rows are ascending, as `knn_graph` writes them;
                -1 entries skipped). Each near pair appears in both rows.
    delta:      the threshold it was built for (float >= 0); compared in the distances' dtype.
    """

    def __init__(self, offsets, neighbours, delta):
        offsets, neighbours = np.asarray(offsets), np.asarray(neighbours)
        if offsets.ndim != 1 or offsets.size < 2 or not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(f"offsets: expected an int [N + 1] array with N >= 1, got {offsets.dtype} {offsets.shape}")
        if neighbours.ndim != 1 or not np.issubdtype(neighbours.dtype, np.integer):
            raise ValueError(f"neighbours: expected an int [E] array, got {neighbours.dtype} {neighbours.shape}")
        if offsets[0] != 0 or offsets[-1] != neighbours.size or (np.diff(offsets) < 0).any():
            raise ValueError(f"offsets: expected non-decreasing offsets from 0 to {neighbours.size} (neighbours' "
                             f"size), got {int(offsets[0])} .. {int(offsets[-1])}")
        n = offsets.size - 1
        if neighbours.size and (int(neighbours.min()) < 0 or int(neighbours.max()) >= n):
            raise ValueError(f"neighbours: expected indices in [0, {n}), got {int(neighbours.min())} .. "
                             f"{int(neighbours.max())}")
        self.offsets = offsets.astype(np.int64, copy=False)
        self.neighbours = neighbours.astype(np.int32 if n < 2**31 else np.int64, copy=False)
        self.delta = check_float("delta", delta, min=0.0)
        self._cmp = None

    @classmethod
    def from_graph(cls, graph, delta=None, *, seed: int = 0) -> "NearCopies":
        """The table of a KNNGraph (or (indices [N, k], distances [N, k])); delta None: `auto_delta(graph, seed=)`.

        One pass over the graph (numba from NUMBA_MIN_WORK entries on; else numpy, same table)."""
        ind, dist = _graph_arrays(graph)
        n = ind.shape[0]
        delta = auto_delta((ind, dist), seed=seed) if delta is None else check_float("delta", delta, min=0.0)
        ind, dist = np.asarray(ind), np.asarray(dist)
        lo, hi = int(ind.min()), int(ind.max())
        if lo < -1 or hi >= n:
            raise ValueError(f"graph.indices: expected entries in [-1, {n}), got {lo} .. {hi}")
        dk = dist.dtype.type(delta)  # as the graph kernels compare
        if HAVE_NUMBA and ind.size >= NUMBA_MIN_WORK:
            off, nb = _numba_kernels()["build_table"](ind, dist, dk)
        else:
            off, nb = _table_numpy(ind, dist, dk)
        t = cls(off, nb, delta)
        t._compact()  # part of the one-time build: every cycle walks the compact form
        log.info("NearCopies: %d near pairs over %d points (delta=%.4g)", t.neighbours.size // 2, n, delta)
        return t

    @property
    def n(self) -> int:
        """Pool size (rows)."""
        return self.offsets.size - 1

    @property
    def n_pairs(self) -> int:
        """Near pairs (each listed in both of its rows)."""
        return self.neighbours.size // 2

    def degree(self) -> np.ndarray:
        """int64 [N]: near-copies of each point."""
        return np.diff(self.offsets)

    def pairs(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(src, dst) int64: every table entry of the given rows (src in rows, in the rows' order)."""
        rows = np.asarray(rows, dtype=np.int64)
        lo, hi = self.offsets[rows], self.offsets[rows + 1]
        cnt = hi - lo
        tot = int(cnt.sum())
        if tot == 0:
            z = np.zeros(0, dtype=np.int64)
            return z, z.copy()
        src = np.repeat(rows, cnt)
        # positions lo[r] .. hi[r] - 1 for each row, without a Python loop
        pos = np.arange(tot, dtype=np.int64) + np.repeat(lo - (np.cumsum(cnt) - cnt), cnt)
        return src, self.neighbours[pos].astype(np.int64)

    def _compact(self):
        """(cid int32/int64 [N], offsets int64 [M + 1], neighbours [E]): the table over its M points
        with near-copies, renumbered so that each connected group of near-copies takes consecutive
        ids (in pool index order inside a group; cid = -1 for points without near-copies). The
        filter kernel walks groups in id order: its reads stay inside a group's few cache lines
        wherever the copies lie in the pool. Built once, on first use."""
        if self._cmp is None:
            import scipy.sparse as sp
            from scipy.sparse.csgraph import connected_components

            n = self.n
            deg = np.diff(self.offsets)
            nodes = np.flatnonzero(deg > 0)
            it = self.neighbours.dtype
            if nodes.size:
                g = sp.csr_matrix((np.ones(self.neighbours.size, dtype=np.int8), self.neighbours, self.offsets),
                                  shape=(n, n))
                comp = connected_components(g, directed=False)[1]
                nodes = nodes[np.argsort(comp[nodes], kind="stable")]  # by group, pool order inside
            cid = np.full(n, -1, dtype=it)
            cid[nodes] = np.arange(nodes.size, dtype=it)
            off = np.zeros(nodes.size + 1, dtype=np.int64)
            np.cumsum(deg[nodes], out=off[1:])
            nb = cid[self.pairs(nodes)[1]]
            self._cmp = (cid, off, nb)
        return self._cmp

    def _check_delta(self, delta) -> float:
        if delta is None:
            return self.delta
        d = check_float("delta", delta, min=0.0)
        if d != self.delta:
            raise ValueError(f"delta: this NearCopies table was built for delta={self.delta!r}, got delta={d!r} "
                             "(build one for it with NearCopies.from_graph(graph, delta=...))")
        return d

    def __repr__(self):
        return f"NearCopies(n={self.n}, n_pairs={self.n_pairs}, delta={self.delta:.4g})"


def _table_numpy(ind, dist, dk):
    """The numpy build of `NearCopies` (the numba kernel `build_table` gives the same arrays)."""
    n = ind.shape[0]
    ok = np.logical_and.accumulate(dist <= dk, axis=1)  # the row's leading run <= delta
    r, c = np.nonzero(ok)
    j = ind[r, c].astype(np.int64)
    r = r.astype(np.int64)
    keep = (j >= 0) & (j != r)
    r, j = r[keep], j[keep]
    key = np.unique(np.concatenate([r * n + j, j * n + r]))  # both directions, sorted, once each
    src, dst = key // n, key % n
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=off[1:])
    return off, dst


def _source(graph, delta):
    """(src, n, delta) with delta resolved: src is a NearCopies, or the (indices, distances) of a graph."""
    if isinstance(graph, NearCopies):
        return graph, graph.n, graph._check_delta(delta)
    ind, dist = _graph_arrays(graph)
    return (ind, dist), ind.shape[0], _check_delta(delta, (ind, dist))


def _src_pairs(src, delta):
    """The near-edge function rows -> (src, dst) of a source (see `_filter_numpy`)."""
    if isinstance(src, NearCopies):
        return src.pairs
    ind, dist = src
    return lambda rows: _near_pairs(np.asarray(rows, dtype=np.int64), ind, dist, delta)


def _make_filter(src, delta, lab, *, work, key_full=None):
    """The incremental greedy filter (`extend(win, key)`) over a source; `key_full` (float [N], the
    candidates' keys at their pool indices) is needed only by the table's kernel: None = positions
    in the order of `extend` calls (one call only)."""
    if isinstance(src, NearCopies):
        return _TableFilter(src, lab, work=work, key_full=key_full)
    ind, dist = src
    return _Filter(ind, dist, delta, lab, work=work)


class _TableFilter:
    """`_Filter` over a NearCopies table: same interface and answers.

    numba: one byte of state and one key per point with near-copies, in the table's compact ids
    (`NearCopies._compact`; 0 undecided, 1 labeled, 3 kept, 4 dropped: near-copies of labeled
    points are found from the candidates' own lists, never by reading the labeled points' lists);
    `extend` decides the new chunk by `compact_chunk` with the candidates' keys (`key`, or
    `key_full`, read at the candidates by the kernel) and lists the survivors' window positions by
    `compact_kept`; a candidate without near-copies survives unless labeled.
    numpy: the rounds of `_filter_numpy` over the whole window, as `_Filter`."""

    def __init__(self, table, lab, *, work: int, key_full=None, kernel: str = "auto"):
        self.t = table
        nlab = 0 if lab is None else lab.size
        if kernel == "auto":
            kernel = "numba" if HAVE_NUMBA and work + nlab >= NUMBA_MIN_WORK else "numpy"
        self.kernel = kernel
        self.wins, self.keys = [], []
        self.key_full = key_full
        self.lab = None if lab is None or lab.size == 0 else np.unique(lab) if kernel == "numpy" else lab
        if kernel == "numpy":
            return
        self.K = _numba_kernels()
        self.cid, self.off, self.nb = table._compact()
        self.flag = np.zeros(self.off.size - 1, dtype=np.uint8)
        self.key = None
        if self.lab is not None:
            self.K["compact_mark_labeled"](np.ascontiguousarray(self.lab, dtype=np.int64), self.cid, self.flag)

    def sample_stats(self, rows, s) -> np.ndarray:
        """int64 per pool row (the window estimate of `_keep_rate`), before the first `extend`: -1
        for a labeled point or a near-copy of one, else its near-copies with a lower (s, index)
        key that are neither; numba kernel only."""
        t = self.t
        return self.K["sample_stats"](np.ascontiguousarray(rows, dtype=np.int64), s, t.offsets, t.neighbours,
                                      self.cid, self.off, self.nb, self.flag)

    def extend(self, win: np.ndarray, key: np.ndarray) -> np.ndarray:
        win = np.ascontiguousarray(win, dtype=np.int64)
        self.wins.append(win)
        allw = win if len(self.wins) == 1 else np.concatenate(self.wins)
        if self.kernel == "numpy":
            kw = self.key_full[win] if key is None else np.asarray(key)
            self.keys.append(kw)
            allk = np.concatenate(self.keys)
            srt = np.lexsort((allw, allk))
            kept, _ = _filter_numpy(allw[srt], self.t.pairs, self.t.n, self.lab)
            out = np.zeros(self.t.n, dtype=np.bool_)
            out[kept] = True
            return np.flatnonzero(out[allw])
        full = key is None  # the kernel reads the candidates' keys from key_full (no gathered copy)
        kw = self.key_full if full else np.asarray(key)
        if self.key is None:
            self.key = np.full(self.flag.size, np.inf, dtype=kw.dtype if kw.dtype.kind == "f" else np.float64)
        # scan every compact id when the chunk covers a good share of them (sequential reads)
        scan = win.size * SCAN_RATIO >= self.flag.size
        self.K["compact_chunk"](win, np.ascontiguousarray(kw, dtype=self.key.dtype), full, self.cid, self.off, self.nb,
                                self.flag, self.key, scan)
        out = self.K["compact_kept"](allw, self.cid, self.flag)
        if self.lab is not None and self.key_full is None:  # a labeled candidate without near-copies
            out = out[~np.isin(allw[out], self.lab)]
        return out


#: compact_chunk scans all points with near-copies when a chunk holds at least 1/SCAN_RATIO of them
SCAN_RATIO = 8


def near_duplicate_filter(order, graph, *, delta=None, labeled=None) -> np.ndarray:
    """Keep the candidates of `order` that are not near-copies of labeled or earlier-kept points.

    order:   int [m] unique pool indices, in priority order (e.g. ascending margin).
    graph:   KNNGraph (or (indices [N, k], distances [N, k])) over the whole pool, or its
             `NearCopies` table (the fast form for repeated calls; same answers).
    delta:   float >= 0: two points are near-copies when a graph edge between them (listed by either)
             has distance <= delta. None: `auto_delta(graph)` (a NearCopies: its own delta, the
             only one it accepts).
    labeled: optional int pool indices of labeled points (duplicates allowed). A candidate that is
             itself labeled is dropped.

    Returns int64 [<= m]: the kept candidates, in the given order. Equal to the sequential greedy:
    for c in order: keep c unless an edge <= delta joins c to a labeled point or a kept point.
    """
    src, n, delta = _source(graph, delta)
    order = as_index_array("order", order, n=n, unique=True)
    lab = None if labeled is None else as_index_array("labeled", labeled, n=n, unique=False)
    if order.size == 0:
        return order.copy()
    f = _make_filter(src, delta, lab, work=order.size)
    # the key of a candidate is its position in `order` (exact in float64 below 2**53)
    return order[f.extend(order, np.arange(order.size, dtype=np.float64))]


# ---------------------------------------------------------------------------------------------
# the filter's kernels

class _Filter:
    """The greedy filter against one labeled set, over a window of candidates that grows by chunks.

    `extend(win, key)` appends candidates whose keys (key, pool index) all exceed those already
    added (the next stretch of the order) and returns int64 [<= W], ascending: the window positions
    (over every candidate so far, in the order added) of those that survive the sequential greedy
    over the window in the order of (key, pool index) ascending.
    The greedy is prefix-consistent, so earlier candidates' answers never change; the numba kernel
    decides only the new chunk (graph rows of the chunk are read once). The labeled set's marks
    are made once, in __init__. Kernel: numba (`_numba_kernels`) from NUMBA_MIN_WORK candidates +
    labeled points on, else (or without numba) the numpy rounds of `_filter_numpy` over the whole
    window; both are exact, so the choice never changes a result."""

    def __init__(self, ind, dist, delta, lab, *, work: int, kernel: str = "auto"):
        self.ind, self.dist, self.delta = ind, dist, delta
        n = ind.shape[0]
        nlab = 0 if lab is None else lab.size
        if kernel == "auto":
            kernel = "numba" if HAVE_NUMBA and work + nlab >= NUMBA_MIN_WORK else "numpy"
        self.kernel = kernel
        self.wins, self.keys = [], []
        if kernel == "numpy":
            self.lab = None if lab is None or lab.size == 0 else np.unique(lab)
            return
        self.K = _numba_kernels()
        self.ind = np.asarray(ind)  # a memmap's ndarray view: one numba signature, no copy
        self.dist = np.asarray(dist)
        # compare in the distances' dtype, as numpy does for `dist <= delta` with a Python float
        self.dk = self.dist.dtype.type(delta)
        self.flag = np.zeros(n, dtype=np.uint8)  # 1 labeled, 2 listed <= delta in a labeled row
        if nlab:
            self.K["mark_labeled"](lab, self.ind, self.dist, self.dk, self.flag)
        self.cpos = np.full(n, -1, dtype=np.int32 if n < 2**31 else np.int64)  # window position of each candidate, -1 elsewhere
        self.state = np.zeros(0, dtype=np.uint8)  # 1 kept, 2 dropped
        self.off = np.zeros(1, dtype=np.int64)  # near lists of the window: nbj[off[p]:off[p + 1]]
        self.nbj = np.zeros(0, dtype=self.ind.dtype)

    def sample_stats(self, rows, s) -> np.ndarray:
        """As `_TableFilter.sample_stats` without the near-copy counts (0): -1 for a labeled point
        or one listed within delta in a labeled row, else 0; numba kernel only."""
        return np.where(self.flag[rows] == 0, 0, -1)

    def extend(self, win: np.ndarray, key: np.ndarray) -> np.ndarray:
        win = np.ascontiguousarray(win, dtype=np.int64)
        key = np.ascontiguousarray(key)
        self.wins.append(win)
        self.keys.append(key)
        if self.kernel == "numpy":
            allw = np.concatenate(self.wins)
            allk = np.concatenate(self.keys)
            srt = np.lexsort((allw, allk))
            kept, _ = _filter_numpy(allw[srt], lambda r: _near_pairs(r, self.ind, self.dist, self.delta),
                                   self.ind.shape[0], self.lab)
            out = np.zeros(self.ind.shape[0], dtype=np.bool_)
            out[kept] = True
            return np.flatnonzero(out[allw])
        base = self.state.size
        allw = win if base == 0 else np.concatenate(self.wins)
        allk = key if base == 0 else np.concatenate(self.keys)
        state = np.zeros(allw.size, dtype=np.uint8)
        state[:base] = self.state
        off, nbj = self.K["chunk"](allw, allk, base, self.ind, self.dist, self.dk, self.flag, self.cpos,
                                   state, self.off, self.nbj)
        self.state = state
        self.off = off if base == 0 else np.concatenate([self.off, off[1:] + self.nbj.size])
        self.nbj = nbj if base == 0 else np.concatenate([self.nbj, nbj])
        return np.flatnonzero(state == 1)


#: kernel="auto" uses numba from this many candidates + labeled points on (below it the numpy
#: rounds take well under a few ms and loading numba would cost more).
NUMBA_MIN_WORK = 20_000
HAVE_NUMBA = importlib.util.find_spec("numba") is not None
_KERNELS = None


def _numba_kernels() -> dict:
    """Compile the numba kernels on first use (cached on disk by numba)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build_numba_kernels()
    return _KERNELS


def _build_numba_kernels() -> dict:
    from . import _redundancy_kernels as K

    return {"mark_labeled": K.mark_labeled, "chunk": K.chunk, "select_range": K.select_range,
            "gather_distances": K.gather_distances, "histogram_uniform": K.histogram_uniform,
            "build_table": K.build_table, "compact_mark_labeled": K.compact_mark_labeled,
            "sample_stats": K.sample_stats, "compact_chunk": K.compact_chunk, "compact_kept": K.compact_kept}


def _filter_numpy(order, pairs, n, lab):
    """The numpy kernel: kept candidates of `order` (in order) and the number of rounds.

    Exactly the sequential greedy, computed in rounds of whole-array operations (a parallel greedy
    independent set): each round accepts every undecided candidate none of whose earlier
    neighbours is undecided or accepted, then rejects every undecided candidate with an accepted
    earlier neighbour. `pairs(rows)`: the near edges (src in rows, dst) of those rows
    (`_near_pairs` of a graph or `NearCopies.pairs`); `lab`: unique labeled indices or None."""
    m = order.size
    if m == 0:
        return order.copy(), 0
    pos = np.full(n, -1, dtype=np.int64)
    pos[order] = np.arange(m)
    alive = np.ones(m, dtype=np.bool_)
    s, t = pairs(order)  # edges listed in the candidates' rows
    if lab is not None and lab.size:
        is_lab = np.zeros(n, dtype=np.bool_)
        is_lab[lab] = True
        alive[is_lab[order]] = False
        alive[pos[s[is_lab[t]]]] = False  # candidate -> labeled
        _, t2 = pairs(lab)  # labeled -> candidate
        p2 = pos[t2]
        alive[p2[p2 >= 0]] = False
    # Candidate-candidate edges among the survivors; an edge listed by either endpoint counts
    # (both endpoints are candidates, so the candidates' rows hold every such edge).
    ps, pt = pos[s], pos[t]
    ok = (pt >= 0)
    ps, pt = ps[ok], pt[ok]
    ok = alive[ps] & alive[pt]
    # earlier (u) -> later (v) by position
    u = np.minimum(ps[ok], pt[ok])
    v = np.maximum(ps[ok], pt[ok])
    state = np.where(alive, 0, 2).astype(np.int8)  # 0 undecided, 1 accepted, 2 rejected
    rounds = 0
    while True:
        und = state == 0
        if not und.any():
            break
        rounds += 1
        # drop edges whose later end is decided or whose earlier end is rejected
        live = und[v] & (state[u] != 2)
        u, v = u[live], v[live]
        blocked = np.zeros(m, dtype=np.bool_)
        blocked[v] = True  # an earlier neighbour is undecided or accepted
        acc = und & ~blocked
        state[acc] = 1
        rej = np.zeros(m, dtype=np.bool_)
        rej[v[state[u] == 1]] = True
        state[rej & und] = 2
    log.debug("near_duplicate_filter: %d of %d candidates kept in %d rounds", int((state == 1).sum()), m, rounds)
    return order[state == 1], rounds


def redundancy_report(picked, graph, *, delta=None, labeled=None) -> dict:
    """How much of a batch is wasted on near-copies (edges of `graph` with distance <= delta;
    graph: a KNNGraph, (indices, distances) or a `NearCopies` table).

    picked: int [b] unique pool indices (a batch, in pick order); labeled: optional int indices.
    Returns a dict: n_picked, delta, near_labeled (fraction of picks within delta of a labeled point
    or labeled themselves), near_copicked (fraction within delta of another pick), redundant
    (fraction that is either), dropped_by_filter (fraction the greedy filter would drop, in pick
    order: a group of mutual copies counts all but one).
    """
    src, n, delta = _source(graph, delta)
    pairs = _src_pairs(src, delta)
    picked = as_index_array("picked", picked, n=n, unique=True)
    lab = None if labeled is None else np.unique(as_index_array("labeled", labeled, n=n, unique=False))
    b = picked.size
    out = {"n_picked": int(b), "delta": float(delta), "near_labeled": 0.0, "near_copicked": 0.0,
           "redundant": 0.0, "dropped_by_filter": 0.0}
    if b == 0:
        return out
    pos = np.full(n, -1, dtype=np.int64)
    pos[picked] = np.arange(b)
    near_lab = np.zeros(b, dtype=np.bool_)
    s, t = pairs(picked)
    if lab is not None and lab.size:
        is_lab = np.zeros(n, dtype=np.bool_)
        is_lab[lab] = True
        near_lab |= is_lab[picked]
        near_lab[pos[s[is_lab[t]]]] = True
        s2, t2 = pairs(lab)
        p2 = pos[t2]
        near_lab[p2[p2 >= 0]] = True
    pt = pos[t]
    ok = pt >= 0
    near_co = np.zeros(b, dtype=np.bool_)
    near_co[pos[s[ok]]] = True
    near_co[pt[ok]] = True
    keep = _make_filter(src, delta, lab, work=b).extend(picked, np.arange(b, dtype=np.float64))
    out.update(near_labeled=float(near_lab.mean()), near_copicked=float(near_co.mean()),
               redundant=float((near_lab | near_co).mean()), dropped_by_filter=float(1 - keep.size / b))
    return out


# ---------------------------------------------------------------------------------------------
# strategies with the filter (wrappers over strategies.py / sampler.py)

def _sorted_candidates(s: np.ndarray, eligible_mask, k: int) -> np.ndarray:
    """The k lowest-score eligible points, ascending by (score, index)."""
    from .strategies import lowest_k

    if eligible_mask is None:
        cand = lowest_k(s, k)
    else:
        elig = np.flatnonzero(eligible_mask)
        cand = elig[lowest_k(s[elig], k)]
    return cand[np.lexsort((cand, s[cand]))]


#: rows of the score sample that sizes a window extension (a strided sample: its quantiles only
#: size the next window, they never decide what is picked).
EXTEND_SAMPLE = 16_384
#: window sizing: the keep rate is estimated from at most this many sampled points of the window
RATE_SAMPLE = 2048
#: window sizing: this much above the survivors needed (estimated keep rate), so that one window,
#: or one extension, usually suffices; the surplus costs only filter work on the extra points.
WINDOW_MARGIN = 1.25


def _filtered_candidates(s, src, want, start=None, *, delta, excl, block=None, elig=None):
    """The `want` lowest eligible points in (score, index) order that survive the greedy filter
    walked in that order (all survivors when fewer), int64 pool indices ascending by index; and the
    number of candidates examined. Eligible: not in `excl` (unique indices or None; `elig`, when
    given, is its bool [N] complement, from `_check_exclude`). The filter's
    labeled set (near-copies of it are dropped): `block` when given (a subset of excl: the fill's
    second tier blocks only the batch's own picks), else excl.

    The filter is prefix-consistent (the greedy on a prefix of the order is a prefix of the
    greedy), so any prefix of the order with `want` survivors gives the answer, and the order
    itself is never sorted: the filter kernel compares (score, index) keys only along near edges.
    The first window: the `start` lowest points (`lowest_k`) when given; by default the points up to
    a score threshold read off a strided score sample (one pass over the scores, cheaper than
    `lowest_k`), sized to hold about WINDOW_MARGIN * want / (1 - b) points, b the sample's fraction
    of eligible points already near a labeled one. When too few survive, the window grows by the
    observed keep rate (times WINDOW_MARGIN) the same way; the surplus of the last window is trimmed
    by score. src: a NearCopies, or the (indices, distances) of a graph (`_source`)."""
    from .strategies import lowest_k

    n = s.size
    n_elig = n
    if excl is not None and excl.size:
        if elig is None:
            elig = np.ones(n, dtype=np.bool_)
            elig[excl] = False
        n_elig = n - excl.size  # excl is unique
    else:
        elig = None
    if n_elig == 0 or want == 0:
        return np.zeros(0, dtype=np.int64), 0
    lab = excl if block is None else block
    f = _make_filter(src, delta, lab, work=min(want, n_elig), key_full=s)
    samp = None

    step = max(1, n // EXTEND_SAMPLE)
    pick = np.arange(0, n, step)
    if elig is not None:
        pick = pick[elig[pick]]

    def sample():
        return np.sort(s[pick])

    if start is not None:
        chunk = lowest_k(s, min(max(start, want), n_elig), keep=elig)  # ascending index
    else:
        samp = sample()
        target = min(WINDOW_MARGIN * want, n_elig)
        # the numba kernels' marks estimate the keep rate (`_keep_rate`)
        stats = None if getattr(f, "flag", None) is None else f.sample_stats
        if stats is not None and pick.size and target < n_elig:
            sp = s[pick]
            st = np.full(pick.size, -2, dtype=np.int64)  # -2: not computed yet
            for _ in range(2):  # the keep rate depends on the window: refine it once
                inw = np.flatnonzero(sp <= samp[min(int(target / n_elig * samp.size), samp.size - 1)])
                if inw.size > RATE_SAMPLE:  # (each row's stats are a few cache misses)
                    inw = inw[np.linspace(0, inw.size - 1, RATE_SAMPLE).astype(np.int64)]
                need = inw[st[inw] == -2]
                st[need] = stats(pick[need], s)
                rate = _keep_rate(st[inw])
                target = WINDOW_MARGIN * want / max(rate, 0.02)
        if target >= n_elig:
            chunk = np.arange(n, dtype=np.int64) if elig is None else np.flatnonzero(elig)
        else:
            r = min(int(target / n_elig * samp.size), samp.size - 1)
            chunk = _select_range(s, elig, s.dtype.type(-np.inf), -1, s.dtype.type(samp[r]), f.kernel)
    n_win = 0  # candidates in the window before `chunk`
    while True:
        # keep: the window positions of the survivors so far, ascending
        keep = f.extend(chunk, None if isinstance(f, _TableFilter) else s[chunk])  # (table: keys from s)
        n_kept = keep.size
        w = n_win + chunk.size  # candidates in the window
        if n_kept >= want or w >= n_elig:
            break
        # grow: the eligible points with keys above the window's largest, up to a score t2 chosen
        # so that about 1.1 * want / keep-rate points are in the window
        t1 = s[chunk].max()
        i1 = int(chunk[s[chunk] == t1].max())
        target = max(int(np.ceil(WINDOW_MARGIN * want * w / max(n_kept, 1))), w + 1)
        if samp is None:
            samp = sample()
        r = int(target / n_elig * samp.size)
        r = max(r, int(np.searchsorted(samp, t1, side="right")))  # at least the sample's first value above t1
        t2 = samp[r] if r < samp.size else np.inf
        ext = _select_range(s, elig, t1, i1, s.dtype.type(t2), f.kernel)
        if ext.size == 0:  # (the sample holds only eligible points: only when t2 = inf, all examined)
            break
        n_win = w
        chunk = ext
    win = f.wins[0] if len(f.wins) == 1 else np.concatenate(f.wins)
    if n_kept > want:
        # the earlier windows hold fewer than `want` survivors, all with lower keys than the last
        # chunk's: take them all, and the lowest keys of the last chunk's (ascending index, so
        # ties go to the lower index)
        h = int(np.searchsorted(keep, n_win))
        head = win[keep[:h]]
        last = win[keep[h:]]
        last = _lowest_ascending(last, s, want - head.size)
        surv = last if head.size == 0 else np.concatenate([head, last])
    else:
        surv = win[keep]
    if len(f.wins) > 1:  # one chunk and its survivors are ascending already
        if surv.size * 64 > n:  # a mask pass over N beats sorting many survivors
            mask = np.zeros(n, dtype=np.bool_)
            mask[surv] = True
            surv = np.flatnonzero(mask)
        else:
            surv = np.sort(surv)
    return surv, win.size


def _lowest_ascending(idx, s, k):
    """The k entries of `idx` (ascending pool indices) with the lowest (s, index) keys, ascending:
    `idx[_lowest_positions(s[idx], k)]` without its final sort (a partition finds the k-th value)."""
    if k >= idx.size:
        return idx
    if k <= 0:
        return idx[:0]
    v = s[idx]
    t = np.partition(v, k - 1)[k - 1]
    take = v < t
    eq = np.flatnonzero(v == t)[: k - int(np.count_nonzero(take))]  # ties: the lowest indices
    take[eq] = True
    return idx[take]


def _keep_rate(st):
    """Estimated fraction of a window's eligible points that survive the filter, from its sampled
    points' `sample_stats` st (int64: -1 labeled or near a labeled point, else c = its near-copies
    with lower keys that are not near a labeled point): the free fraction, times the chance q of
    having no kept earlier near-copy in the window: q = mean((1 - q) ** c) over the free points
    (each such near-copy taken as kept with chance q). Only sizes windows: never decides what is
    picked."""
    if st.size == 0:
        return 1.0
    c = st[st >= 0]
    rate = c.size / st.size
    if c.size == 0:
        return rate
    h = np.bincount(c) / c.size  # the fixed point needs only the distribution of c
    if h.size == 1:
        return rate
    pw = np.arange(h.size)
    q = 1.0
    for _ in range(30):
        q = 0.5 * q + 0.5 * float(h @ (1.0 - q) ** pw)  # damped fixed point
    return rate * q


def _select_range(s, elig, t1, i1, t2, kernel):
    """Eligible indices i with (s[i], i) > (t1, i1) and s[i] <= t2, ascending."""
    if kernel == "numba":
        return _numba_kernels()["select_range"](s, np.zeros(0, np.bool_) if elig is None else elig,
                                                s.dtype.type(t1), np.int64(i1), t2)
    i = np.arange(s.size)
    ok = (s <= t2) & ((s > t1) | ((s == t1) & (i > i1)))
    if elig is not None:
        ok &= elig
    return np.flatnonzero(ok)


def _check_exclude(exclude, n):
    """exclude -> (unique int64 indices or None, the bool [N] eligibility mask: False at excluded
    points, None without exclusions). The mask is built once, reused by the filter, and its count
    is the uniqueness check."""
    from .sampler import check_unique

    if exclude is None:
        return None, None
    excl = as_index_array("exclude", exclude, n=n, unique=False)
    if excl.size == 0:
        return excl, None
    elig = np.ones(n, dtype=np.bool_)
    elig[excl] = False
    if int(np.count_nonzero(elig)) != n - excl.size:
        check_unique("exclude", excl, n)  # raises, naming a duplicate
    return excl, elig


def filtered_margin(scores, graph, budget, *, delta=None, exclude=None) -> np.ndarray:
    """Margin selection without near-copies: the `budget` lowest-score points of the greedy filter
    (lowest margin first; a point within delta of an excluded/labeled point or of an earlier pick
    is skipped). Returns int64 [min(budget, eligible)] pool indices: the survivors in ascending
    score order; if fewer than `budget` survive, the fill (`_second_tier`: survivors of the filter
    against this batch's picks only, fewest labeled near-copies first, then by score; then plain
    score order)."""
    from .strategies import as_scores

    s = as_scores("scores", scores)
    src, n, delta = _source(graph, delta)
    if n != s.size:
        raise ValueError(f"graph: expected {s.size} rows (as scores), got {n}")
    budget = check_int("budget", budget, min=0)
    excl, elig = _check_exclude(exclude, s.size)
    if budget == 0:
        return np.zeros(0, dtype=np.int64)
    kept, _ = _filtered_candidates(s, src, budget, delta=delta, excl=excl, elig=elig)
    kept = kept[np.argsort(s[kept], kind="stable")]  # ascending index -> by (score, index)
    if kept.size < budget:
        kept = np.concatenate([kept, _second_tier(s, src, budget - kept.size, kept, excl, delta)[0]])
    return _fill(kept, s, budget, excl)


def _second_tier(s, src, want, picked, excl, delta):
    """The fill's second tier, when fewer than the budget survive the filter (typically every copy
    group already has a labeled member): the greedy filter again over the eligible points not yet
    picked, now dropping only near-copies of this batch's picks `picked` (and of its own earlier
    survivors); near-copies of labeled points are allowed. The order: fewest labeled near-copies
    first, then (score, index). So a batch never spends two labels on one copy group while a group
    without a pick is left, and it tops up the least-labeled groups first rather than giving the
    most uncertain group its third and fourth copy (which over-weights it in training). Returns
    (survivors in that order, examined); `want` survivors at most."""
    n = s.size
    excl2 = picked if excl is None or excl.size == 0 else np.concatenate([excl, picked])
    cover = _labeled_cover(src, delta, excl, n)
    key = s
    if cover.any():  # (cover, score, index) as one exact float64 key: cover * N + rank
        key = np.empty(n, dtype=np.float64)
        key[np.argsort(s, kind="stable")] = np.arange(n, dtype=np.float64)
        key += cover * float(n)
    kept, m = _filtered_candidates(key, src, want, delta=delta, excl=excl2, block=picked)
    log.info("near-duplicate filter: %d picks survive against labeled points; second tier (against this batch "
             "only): %d more of %d wanted", picked.size, kept.size, want)
    return kept[np.argsort(key[kept], kind="stable")], m


def _labeled_cover(src, delta, excl, n) -> np.ndarray:
    """int64 [N]: each point's labeled near-copies (`excl`), a near pair counted once whichever
    row lists it."""
    if excl is None or excl.size == 0:
        return np.zeros(n, dtype=np.int64)
    pairs = _src_pairs(src, delta)
    if isinstance(src, NearCopies):  # symmetric rows: the labeled rows list every pair once
        return np.bincount(pairs(excl)[1], minlength=n)
    is_lab = np.zeros(n, dtype=np.bool_)
    is_lab[excl] = True
    a, b = pairs(excl)  # labeled a lists b
    c, d = pairs(np.flatnonzero(~is_lab))  # b lists labeled d
    ok = is_lab[d]
    key = np.unique(np.concatenate([b * n + a, c[ok] * n + d[ok]]))  # (point, labeled near-copy) once
    return np.bincount(key // n, minlength=n)


def _fill(picked, s, budget, excl):
    """The last tier, when fewer than `budget` points survive both filter tiers (every remaining
    point is a near-copy of this batch's picks): the budget is still spent on the lowest-score
    eligible points not yet picked, appended."""
    if picked.size >= budget:
        return picked
    mask = np.ones(s.size, dtype=np.bool_)
    if excl is not None and excl.size:
        mask[excl] = False
    mask[picked] = False
    rest = _sorted_candidates(s, mask, budget - picked.size)
    log.info("near-duplicate filter: %d picks after both tiers for a budget of %d; %d near-copies appended in "
             "score order", picked.size, budget, rest.size)
    return np.concatenate([picked, rest])


def filtered_cluster_margin(scores, labels, graph, budget, *, km_ratio=10.0, delta=None, exclude=None, seed=0,
                            order="smallest", label_aware=False) -> np.ndarray:
    """Cluster-Margin over filtered candidates: the k_m = round(km_ratio * budget) lowest-margin
    eligible points that survive `near_duplicate_filter` (in margin order, against `exclude` as the
    labeled set), then the round-robin over their clusters (`order`, `label_aware` as in
    `cluster_margin`). Returns int64 [min(budget, eligible)] pool indices in visiting order.

    If fewer than `budget` survive (all are then picked), the shortfall b' is filled in tiers: the
    second tier (`_second_tier`: the filter against this batch's picks only, copies of labeled
    points allowed, fewest labeled near-copies first) yields round(km_ratio * b') candidates, and the same round-robin (same `order`;
    `label_aware` counts this batch's picks as labeled) visits them, so the fill keeps Cluster-
    Margin's spread over clusters; then, if still short, the lowest-score remaining points."""
    from .sampler import ORDERS, _round_robin, as_generator
    from .strategies import as_scores
    from ._validate import as_labels

    s = as_scores("scores", scores)
    n = s.size
    labels = as_labels("labels", labels, n=n, other="scores")
    src, ng, delta = _source(graph, delta)
    if ng != n:
        raise ValueError(f"graph: expected {n} rows (as scores), got {ng}")
    budget = check_int("budget", budget, min=0)
    km_ratio = check_float("km_ratio", km_ratio, min=1.0)
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    excl, elig = _check_exclude(exclude, n)
    rng = as_generator(seed)
    km = int(round(km_ratio * budget))
    if budget == 0:
        return np.zeros(0, dtype=np.int64)
    kept, _ = _filtered_candidates(s, src, km, delta=delta, excl=excl, elig=elig)
    lab = excl if (label_aware and excl is not None) else None
    picked = _round_robin(kept, labels, budget, rng, order=order, labeled=lab)
    short = budget - picked.size
    if short > 0:  # every survivor is picked: the second tier, the same Cluster-Margin step over it
        more = np.sort(_second_tier(s, src, int(round(km_ratio * short)), picked, excl, delta)[0])
        if label_aware:  # this batch's picks count as labeled too
            lab = picked if excl is None else np.concatenate([excl, picked])
        picked = np.concatenate([picked, _round_robin(more, labels, short, rng, order=order, labeled=lab)])
    return _fill(picked, s, budget, excl)
