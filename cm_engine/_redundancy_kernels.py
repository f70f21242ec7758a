"""numba kernels of the near-duplicate filter (redundancy.py); imported on first use.

Module-level functions, so that numba's on-disk cache holds them across processes. Every kernel
is checked against the numpy rounds and a plain-Python loop in tests/test_redundancy.py.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: software prefetch distance (rows ahead) of the kernels' random graph-row reads
D = 16


@intrinsic
def prefetch_row(typingctx, arr, i):
    # a read prefetch of arr[i, 0] (llvm.prefetch: a hint that never faults). The filter reads
    # graph rows in candidate order, i.e. at random: without it each row is a full miss.
    if not isinstance(arr, types.Array) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = [context.cast(builder, args[1], signature.args[1], types.intp)]
        idx += [context.get_constant(types.intp, 0)] * (aryty.ndim - 1)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, i), codegen


@njit(cache=True, nogil=True)
def mark_labeled(lab, ind, dist, delta, flag):
    # flag[l] = 1 for labeled l; flag[j] = 2 for j listed <= delta in a labeled row (the
    # labeled -> candidate direction)
    k = ind.shape[1]
    m = lab.size
    for i in range(m):
        flag[lab[i]] = 1
    for i in range(m):
        if i + D < m:
            prefetch_row(dist, lab[i + D])
            prefetch_row(ind, lab[i + D])
        a = lab[i]
        for c in range(k):
            if not dist[a, c] <= delta:  # rows ascending: nothing further (and +inf = missing)
                break
            j = ind[a, c]
            if j >= 0 and j != a and flag[j] == 0:
                flag[j] = 2


@njit(inline="always")
def earlier(key, win, a, b):
    return key[a] < key[b] or (key[a] == key[b] and win[a] < win[b])


@njit(cache=True, nogil=True)
def chunk(win, key, base, ind, dist, delta, flag, cpos, state, off_old, nbj_old):
    # Decide window positions base..W-1 (keys above every earlier position's); earlier ones
    # are decided (state 1 kept / 2 dropped) with near lists nbj_old[off_old[p]:off_old[p+1]].
    # Returns the new positions' near lists (offsets from 0, pool indices).
    w = win.size
    m = w - base
    k = ind.shape[1]
    for p in range(base, w):
        cpos[win[p]] = p
    # 1. graph rows of the new candidates: rejected (labeled, or an edge <= delta to a labeled
    #    point in either direction), else its near list (every j != c, j >= 0 within delta)
    off = np.zeros(m + 1, dtype=np.int64)
    cap = 4 * m + 16
    nbj = np.empty(cap, dtype=ind.dtype)
    e = 0
    for t in range(m):
        p = base + t
        if t + D < m:
            prefetch_row(dist, win[p + D])
            prefetch_row(ind, win[p + D])
        c = win[p]
        rej = flag[c] != 0
        e0 = e
        if not rej:
            for col in range(k):
                if not dist[c, col] <= delta:
                    break
                j = ind[c, col]
                if j < 0 or j == c:
                    continue
                if flag[j] == 1:
                    rej = True
                    break
                if e == cap:
                    cap *= 2
                    grown = np.empty(cap, dtype=nbj.dtype)
                    grown[:e] = nbj[:e]
                    nbj = grown
                nbj[e] = j
                e += 1
        if rej:
            e = e0
            state[p] = 2  # never kept, so it blocks nothing: its list is not needed
        off[t + 1] = e
    # 2. an edge to a kept earlier-window candidate drops a new one (own row, or the earlier
    #    candidate's row: every earlier key is below every new key)
    if base > 0:
        for t in range(m):
            p = base + t
            if state[p] == 2:
                continue
            for x in range(off[t], off[t + 1]):
                q = cpos[nbj[x]]
                if 0 <= q < base and state[q] == 1:
                    state[p] = 2
                    break
        for o in range(base):
            if state[o] != 1:
                continue
            for x in range(off_old[o], off_old[o + 1]):
                q = cpos[nbj_old[x]]
                if q >= base:
                    state[q] = 2
    # 3. among the new ones: kept(y) = not dropped and no earlier near neighbour kept. The own
    #    list gives y's earlier neighbours listed by y; the reverse adjacency (rnb, chunk-local)
    #    those that list y without y listing them (near-copy edges are mostly mutual: those
    #    are in y's own list already). Edges point to strictly earlier keys (no cycle): a
    #    memoized depth-first walk decides every candidate in O(m + E), without sorting.
    rev = np.zeros(e, dtype=np.bool_)  # edge x (p lists q) is q's only route to p
    roff = np.zeros(m + 1, dtype=np.int64)
    for t in range(m):
        p = base + t
        if state[p] == 2:
            continue
        c = win[p]
        for x in range(off[t], off[t + 1]):
            q = cpos[nbj[x]]
            if q >= base and state[q] != 2 and earlier(key, win, p, q):
                tq = q - base
                mutual = False
                for y in range(off[tq], off[tq + 1]):
                    if nbj[y] == c:
                        mutual = True
                        break
                if not mutual:
                    rev[x] = True
                    roff[tq + 1] += 1
    for t in range(m):
        roff[t + 1] += roff[t]
    rnb = np.empty(roff[m], dtype=np.int64)
    nxt = roff[:m].copy()
    if roff[m]:
        for t in range(m):
            for x in range(off[t], off[t + 1]):
                if rev[x]:
                    tq = cpos[nbj[x]] - base
                    rnb[nxt[tq]] = base + t
                    nxt[tq] += 1
    it = nxt  # reused: per candidate, how many of its neighbours were checked
    it[:] = 0
    stack = np.empty(m, dtype=np.int64)
    for t0 in range(m):
        if state[base + t0] != 0:
            continue
        stack[0] = base + t0
        sp = 1
        while sp > 0:
            y = stack[sp - 1]
            ty = y - base
            n_own = off[ty + 1] - off[ty]
            tot = n_own + roff[ty + 1] - roff[ty]
            pushed = False
            while it[ty] < tot:
                i = it[ty]
                if i < n_own:
                    u = cpos[nbj[off[ty] + i]]
                    if u < base or state[u] == 2 or not earlier(key, win, u, y):
                        it[ty] += 1
                        continue
                else:
                    u = rnb[roff[ty] + i - n_own]
                    if state[u] == 2:
                        it[ty] += 1
                        continue
                if state[u] == 1:
                    state[y] = 2
                    break
                stack[sp] = u  # an undecided earlier neighbour: decide it first
                sp += 1
                pushed = True
                break
            if pushed:
                continue
            if state[y] == 0:
                state[y] = 1
            sp -= 1
    return off, nbj[:e].copy()


@njit(cache=True, nogil=True)
def select_range(s, elig, t1, i1, t2):
    # eligible i with (s[i], i) > (t1, i1) and s[i] <= t2, ascending. Branch-free (the condition
    # is unpredictable): every index is stored, its slot kept only where the condition holds. The
    # buffer is sized for all N but only the pages of the kept slots are ever touched. The key
    # test splits at i1 (i <= i1: s[i] > t1; i > i1: s[i] >= t1) so that each loop is one plain
    # comparison chain; a first window (t1 = -inf, i1 < 0) needs s[i] <= t2 alone (every value,
    # -inf included, is >= -inf; NaN fails s[i] <= t2 either way).
    n = s.size
    out = np.empty(n + 1, dtype=np.int64)
    lo = min(max(i1 + 1, 0), n)
    m = 0
    if elig.size > 0:
        e = elig.view(np.uint8)
        if lo == 0 and t1 == -np.inf:
            for i in range(n):
                out[m] = i
                m += np.uint8(s[i] <= t2) & e[i]
        else:
            for i in range(lo):
                v = s[i]
                out[m] = i
                m += np.uint8((v > t1) & (v <= t2)) & e[i]
            for i in range(lo, n):
                v = s[i]
                out[m] = i
                m += np.uint8((v >= t1) & (v <= t2)) & e[i]
    else:
        if lo == 0 and t1 == -np.inf:
            for i in range(n):
                out[m] = i
                m += s[i] <= t2
        else:
            for i in range(lo):
                v = s[i]
                out[m] = i
                m += (v > t1) & (v <= t2)
            for i in range(lo, n):
                v = s[i]
                out[m] = i
                m += (v >= t1) & (v <= t2)
    return out[:m].copy()


@njit(cache=True, nogil=True)
def gather_distances(rows, ind, dist):
    # auto_delta's sample: float64 distances of rows (ascending), row-major, keeping the finite,
    # positive ones of listed neighbours: np.asarray(dist[rows], float64).ravel() filtered alike
    k = ind.shape[1]
    out = np.empty(rows.size * k, dtype=np.float64)
    m = 0
    for i in range(rows.size):
        if i + D < rows.size:
            prefetch_row(dist, rows[i + D])
            prefetch_row(ind, rows[i + D])
        r = rows[i]
        for c in range(k):
            d = np.float64(dist[r, c])
            if np.isfinite(d) and ind[r, c] >= 0 and d > 0:
                out[m] = d
                m += 1
    return out[:m]


@njit(cache=True, nogil=True)
def histogram_uniform(v, edges):
    # np.histogram(v, bins=edges.size - 1) for edges = np.linspace(v.min(), v.max(), bins + 1):
    # numpy's uniform-bin arithmetic step for step (index from the scaled offset, then the same
    # one-ulp corrections against the edges), so the counts are identical
    nb = edges.size - 1
    first = edges[0]
    denom = edges[nb] - first
    h = np.zeros(nb, dtype=np.int64)
    for x in v:
        i = np.intp(((x - first) / denom) * nb)
        if i == nb:
            i -= 1
        if x < edges[i]:
            i -= 1
        if x >= edges[i + 1] and i != nb - 1:
            i += 1
        h[i] += 1
    return h


# ---------------------------------------------------------------------------------------------
# the near-copy table (redundancy.NearCopies): built once per pool, walked by every cycle

@njit(cache=True, nogil=True)
def build_table(ind, dist, delta):
    # symmetric CSR of the edges a -> ind[a, c] within the row's prefix of distances <= delta
    # (rows ascending: the same edges the graph kernels read), j >= 0, j != a; each row's
    # neighbours ascending and unique. Returns (offsets int64 [N + 1], neighbours int32/int64 [E]).
    n, k = ind.shape
    deg = np.zeros(n + 1, dtype=np.int64)
    for a in range(n):
        for c in range(k):
            if not dist[a, c] <= delta:
                break
            j = ind[a, c]
            if j < 0 or j == a:
                continue
            deg[a + 1] += 1
            deg[j + 1] += 1
    for a in range(n):
        deg[a + 1] += deg[a]
    nb = np.empty(deg[n], dtype=ind.dtype)
    fill = deg[:n].copy()
    for a in range(n):
        for c in range(k):
            if not dist[a, c] <= delta:
                break
            j = ind[a, c]
            if j < 0 or j == a:
                continue
            nb[fill[a]] = j
            fill[a] += 1
            nb[fill[j]] = a
            fill[j] += 1
    # sort each row (insertion sort: rows hold a few near-copies) and drop repeats (a mutual
    # edge is listed by both ends), compacting in place
    off = np.empty(n + 1, dtype=np.int64)
    off[0] = 0
    e = 0
    for a in range(n):
        lo, hi = deg[a], deg[a + 1]
        for x in range(lo + 1, hi):
            v = nb[x]
            y = x - 1
            while y >= lo and nb[y] > v:
                nb[y + 1] = nb[y]
                y -= 1
            nb[y + 1] = v
        for x in range(lo, hi):
            if x == lo or nb[x] != nb[x - 1]:
                nb[e] = nb[x]
                e += 1
        off[a + 1] = e
    return off, nb[:e].copy()


@njit(cache=True, nogil=True)
def compact_mark_labeled(lab, cid, flag):
    # In the table's compact ids (cid[pool index], -1 without near-copies): flag 1 for labeled
    # points. Their near-copies are not marked here: a candidate's own list (symmetric table)
    # shows a labeled near-copy when the walk reads it (`compact_chunk`), so the labeled points'
    # lists are never read. Labeled points are random rows: compact ids prefetched ahead.
    m = lab.size
    for i in range(m):
        if i + D < m:
            prefetch_row(cid, lab[i + D])
        c = cid[lab[i]]
        if c >= 0:
            flag[c] = 1


@njit(inline="always")
def near_labeled(y, off, nb, flag):
    for x in range(off[y], off[y + 1]):
        if flag[nb[x]] == 1:
            return True
    return False


@njit(cache=True, nogil=True)
def sample_stats(rows, s, offsets, neighbours, cid, off, nb, flag):
    # per pool row, before any chunk (flag: 0 or 1 = labeled): -1 if labeled or a near-copy of a
    # labeled point, else how many of its near-copies (pool table offsets/neighbours) have a lower
    # (s, index) key and are neither
    # (rows are spread over the pool: each one's reads are misses, prefetched in two stages: its
    # table offsets, compact id and score 2D rows ahead, then its list and compact offsets D ahead)
    out = np.zeros(rows.size, dtype=np.int64)
    m = rows.size
    for p in range(m):
        if p + 2 * D < m:
            a2 = rows[p + 2 * D]
            prefetch_row(offsets, a2)
            prefetch_row(cid, a2)
            prefetch_row(s, a2)
        if p + D < m:
            a1 = rows[p + D]
            prefetch_row(neighbours, offsets[a1])
            c1 = cid[a1]
            if c1 >= 0:
                prefetch_row(off, c1)
        a = rows[p]
        c = cid[a]
        if c < 0:
            continue
        if flag[c] != 0 or near_labeled(c, off, nb, flag):
            out[p] = -1
            continue
        cnt = 0
        for x in range(offsets[a], offsets[a + 1]):
            u = neighbours[x]
            if s[u] < s[a] or (s[u] == s[a] and u < a):
                cu = cid[u]
                if flag[cu] == 0 and not near_labeled(cu, off, nb, flag):
                    cnt += 1
        out[p] = cnt
    return out


@njit(cache=True, nogil=True)
def compact_chunk(win, kw, full, cid, off, nb, flag, key, scan):
    # Decide the candidates `win` (pool indices; keys kw[p], or kw[win[p]] when `full`: kw is then
    # the keys of the whole pool) by the sequential greedy in key order, ties by compact id (= pool
    # index order inside a component, and near-copies share one).
    # flag (compact): 0 undecided, 1 labeled (the filter's blockers), 3 kept, 4 dropped;
    # key (compact): the keys of every candidate so far, +inf elsewhere. Every eligible point with
    # a key below a candidate's must be a candidate of this or an earlier call (decided then).
    # kept(y) = flag 0, no labeled near-copy and no kept near-copy with an earlier key; the table
    # is symmetric, so y's own list holds every such neighbour: a depth-first walk decides
    # earlier neighbours first (edges point to strictly earlier keys: no cycle), O(candidates +
    # near edges). One pass over y's list finds both a labeled near-copy (flag 1: dropped) and the
    # earlier ones (an undecided one is decided first, the pass resuming at it afterwards: every
    # decision depends only on earlier keys, so deciding it before y's labeled check changes
    # nothing).
    # Walk starts: every undecided candidate's compact id in order (scan: large chunks; sequential
    # memory, and the near-copies of a component lie next to each other), else the chunk's own ids.
    for p in range(win.size):
        c = cid[win[p]]
        if c >= 0:
            key[c] = kw[win[p]] if full else kw[p]
    if scan:
        # the undecided candidates' ids, ascending, by a branch-free pass (a branch per id would
        # mispredict on most of them: candidates and the rest interleave at random)
        starts = np.empty(flag.size + 1, dtype=np.int64)  # (only the pages written are touched)
        n_start = 0
        for t in range(flag.size):
            starts[n_start] = t
            n_start += (key[t] < np.inf) & (flag[t] == 0)
    else:
        starts = win
        n_start = win.size
    stack = np.empty(win.size + 1, dtype=np.int64)
    at = np.empty(win.size + 1, dtype=np.int64)  # the next list entry to check, per level
    for t in range(n_start):
        if scan:
            y0 = starts[t]
        else:
            y0 = cid[win[t]]
            if y0 < 0:
                continue
        if flag[y0] != 0 or not key[y0] < np.inf:
            continue
        stack[0] = y0
        at[0] = off[y0]
        sp = 1
        while sp > 0:
            y = stack[sp - 1]
            x = at[sp - 1]
            end = off[y + 1]
            ky = key[y]
            pushed = False
            while x < end:
                u = nb[x]
                fu = flag[u]
                if fu == 1:  # a labeled near-copy
                    break
                if fu == 3 or fu == 0:
                    ku = key[u]
                    if ku < ky or (ku == ky and u < y):
                        if fu == 3:  # a kept earlier near-copy
                            break
                        at[sp - 1] = x  # come back to u once it is decided
                        stack[sp] = u
                        at[sp] = off[u]
                        sp += 1
                        pushed = True
                        break
                x += 1
            if pushed:
                continue
            flag[y] = 4 if x < end else 3
            sp -= 1


@njit(cache=True, nogil=True)
def compact_kept(win, cid, flag):
    # positions p (ascending) of the candidates win[p] that survive: no near-copy at all, or kept;
    # branch-free (kept and dropped interleave at random)
    if flag.size == 0:  # a table without near pairs: every candidate survives
        return np.arange(win.size)
    out = np.empty(win.size + 1, dtype=np.int64)
    m = 0
    for p in range(win.size):
        if p + D < win.size:
            c = cid[win[p + D]]
            if c >= 0:
                prefetch_row(flag, c)
        c = cid[win[p]]
        out[m] = p
        m += (c < 0) | (flag[max(c, 0)] == 3)
    return out[:m].copy()
