"""Fused CPU kernels of the k-NN stage (numba, released GIL: they run on the grouped search's
worker threads)."""
from __future__ import annotations

import numpy as np
from numba import njit


def top_largest(S: np.ndarray, kc: int) -> tuple[np.ndarray, np.ndarray]:
    """The kc largest entries of each row of S [m, M] (float32, C-contiguous), kc <= M, in no
    particular order: (values [m, kc] float32, column positions [m, kc] int64). Of equal values
    at the boundary, which are kept depends on the data only (deterministic).

    One pass per row keeping the kc best seen and their minimum; only a value above that minimum
    costs more than a compare. torch.topk on the CPU copies every (value, index) pair for its
    partial sort: [256, 9400] (a cell's queries against its candidates), k = 25, one thread:
    5.7 ms there, 2.6 ms here on random scores (fewer replacements on a cell's scores, whose own
    and most asked-for cells come first).
    """
    S = np.ascontiguousarray(S, dtype=np.float32)
    m, M = S.shape
    if not 1 <= kc <= M:
        raise ValueError(f"kc: expected 1 <= kc <= {M} (columns of S), got {kc}")
    vals = np.empty((m, kc), np.float32)
    pos = np.empty((m, kc), np.int64)
    _top_largest(S, kc, vals, pos)
    return vals, pos


@njit(cache=True, nogil=True, boundscheck=False)
def _top_largest(S, kc, vals, pos):
    m, M = S.shape
    for r in range(m):
        v, p = vals[r], pos[r]
        for j in range(kc):
            v[j] = S[r, j]
            p[j] = j
        at = _weakest(v, kc)
        low = v[at]
        for j in range(kc, M):
            x = S[r, j]
            if x > low:
                v[at] = x
                p[at] = j
                at = _weakest(v, kc)
                low = v[at]


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _weakest(v, kc):
    """The kept slot to evict next: the smallest value (the first such slot). A plain scan: a
    min-heap, or breaking ties by column, ran 30-40% slower at kc = 25."""
    at = 0
    for t in range(1, kc):
        if v[t] < v[at]:
            at = t
    return at


def top_update(S: np.ndarray, rows: np.ndarray, c0: int, vals: np.ndarray, pos: np.ndarray) -> None:
    """Merge a block of scores into running top-kc lists, in place: row i of S [m, M] (float32,
    C-contiguous; larger is nearer) updates list rows[i] (int64 [m], rows may repeat across calls,
    not within one) of vals [b, kc] float32 / pos [b, kc] int64, column j entering as id c0 + j.
    Start the lists at -inf / -1; an entry still at -inf afterwards was never filled. Lists are
    unordered; of equal values at the boundary, the earlier kept stays (deterministic).

    For blocks that each row meets in pieces: the tuning's exact scan of the pool in L2-sized
    tiles (one list per query across all tiles), and the two-level cell search (a row's score
    pieces come from the groups it probes, one matrix product per group). `top_largest`'s
    eviction scan, but the state outlives the block."""
    if S.dtype != np.float32 or not S.flags.c_contiguous:
        raise ValueError(f"S: expected a C-contiguous float32 array, got {S.dtype} (contiguous: {S.flags.c_contiguous})")
    if S.shape[0] != rows.shape[0] or vals.shape != pos.shape or vals.shape[1] < 1:
        raise ValueError(f"top_update: expected S [m, M], rows [m], vals and pos [b, kc >= 1]; got S {S.shape}, "
                         f"rows {rows.shape}, vals {vals.shape}, pos {pos.shape}")
    _top_update(S, rows, c0, vals, pos)


@njit(cache=True, nogil=True, boundscheck=False)
def _top_update(S, rows, c0, vals, pos):
    m, M = S.shape
    kc = vals.shape[1]
    for i in range(m):
        v, p = vals[rows[i]], pos[rows[i]]
        at = _weakest(v, kc)
        low = v[at]
        for j in range(M):
            x = S[i, j]
            if x > low:
                v[at] = x
                p[at] = c0 + j
                at = _weakest(v, kc)
                low = v[at]


def merge_sorted(out_i: np.ndarray, out_d: np.ndarray, rows: np.ndarray, ii: np.ndarray, dd: np.ndarray) -> None:
    """Merge candidates into finished k-NN rows, in place: out_i [N, k] int (-1 = missing, last) /
    out_d [N, k] float32, each row sorted by (distance, index); row rows[t] (int64 [m], distinct)
    takes the candidates ii[t] (int [m, c], -1 = none; never the row itself nor already listed)
    at distances dd[t] (float32 [m, c]) and keeps its k nearest, ties by the lower index: the
    k first of the row and its candidates sorted together, as a lexsort would give them.

    Each candidate that beats the row's k-th is inserted where it belongs (O(k)), so a merge
    costs about the candidates it looks at; the lexsort of [row + candidates] per call was most of
    the grouped search's second pass (3.0 of 4.5 s at 1M x 64, on the one merging thread)."""
    if out_i.shape != out_d.shape or ii.shape != dd.shape or rows.shape[0] != ii.shape[0]:
        raise ValueError(f"merge_sorted: expected out_i, out_d [N, k], rows [m], ii and dd [m, c]; got "
                         f"{out_i.shape}, {out_d.shape}, {rows.shape}, {ii.shape}, {dd.shape}")
    _merge_sorted(out_i, out_d, rows, ii, dd)


@njit(cache=True, nogil=True, boundscheck=False)
def _merge_sorted(out_i, out_d, rows, ii, dd):
    m, c = ii.shape
    k = out_i.shape[1]
    big = np.iinfo(np.int64).max
    for t in range(m):
        r = rows[t]
        li, ld = out_i[r], out_d[r]
        for j in range(c):
            x = ii[t, j]
            if x < 0:
                continue
            d = dd[t, j]
            # beats the k-th? (missing entries sort last: distance inf, index +max)
            lx = big if li[k - 1] < 0 else li[k - 1]
            dk = np.inf if li[k - 1] < 0 else ld[k - 1]
            if not (d < dk or (d == dk and x < lx)):
                continue
            at = k - 1
            while at > 0:
                px = big if li[at - 1] < 0 else li[at - 1]
                pd = np.inf if li[at - 1] < 0 else ld[at - 1]
                if d < pd or (d == pd and x < px):
                    li[at] = li[at - 1]
                    ld[at] = ld[at - 1]
                    at -= 1
                else:
                    break
            li[at] = x
            ld[at] = d
