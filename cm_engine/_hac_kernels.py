"""Private kernels of graph HAC (see hac.py for the algorithm and its guarantee).

Everything here assumes validated input and works on torch tensors of one device:
whole-array passes (gather, scatter_reduce, unique, index_add) inside a Python loop over
merge ROUNDS only, never over clusters or edges. The same code runs on the CPU and on CUDA,
except three pieces that the CPU swaps for numba kernels over the same arrays (`nearest`,
`cosine_linkage`, `sort_groups`' stable sort), each tested against the torch ops it replaces.

State of the round loop
-----------------------
Clusters live in "slots" 0..n-1: a merged cluster keeps the smaller slot of its two parts,
the other slot dies. Per slot: size, R (sum over members of r, the k-th neighbour distance),
the scipy node id it currently stands for, and its merge height.
Edges are undirected cluster pairs (u < v), unique, with float64 S (sum of the point-pair
distances between the two clusters that are graph edges), c (their number) and M (sum over those
same pairs of the imputed value (r_a + r_b) / 2), plus their cached linkage L. An edge's L only
changes when one of its endpoints merges, so each round recomputes L for the re-coalesced edges
only.
"""
from __future__ import annotations

import logging
import math
import time

import numba
import numpy as np
import torch
from numba import njit, prange

log = logging.getLogger("cm_engine")

F64 = torch.float64


#: On the CPU the rounds' two heaviest steps run as fused numba kernels (`nearest`'s scan and
#: `cosine_linkage`'s dots) in place of torch's whole-array ops: the same nearest neighbours, and
#: linkages more precise (float64 dots). False runs torch's ops on the CPU too, as on a GPU; the
#: tests compare the two.
CPU_KERNELS = True


def _fused(t: torch.Tensor) -> bool:
    return CPU_KERNELS and t.device.type == "cpu"


def edge_block(budget: int, bytes_per_edge: int = 64) -> int:
    """Edges per scan block so that a block's temporaries stay within `budget` bytes."""
    return max(1 << 12, int(budget) // bytes_per_edge)


def sort_groups(key: torch.Tensor):
    """Group equal keys: key int64 [e] (>= 0) -> (uniq int64 [m] sorted, perm int64 [e], inv int64 [e]),
    where key[perm] is sorted (stable: equal keys keep their order) and inv[i] is the group of
    key[perm[i]]. Sums over each group in that order are deterministic. Used instead of
    torch.unique(return_inverse=True), whose sort copies cost several more [e] int64 arrays at
    peak (the largest allocations of a 10M-point HAC)."""
    e = key.numel()
    bits = max(1, (e - 1).bit_length())
    # Key bits beyond what packs with a position into one int64 (CPU only; None: torch.sort).
    hb = int(key.max()).bit_length() + bits - 63 if key.device.type == "cpu" and e else None
    if hb is not None and hb <= MAX_BUCKET_BITS:
        skey, perm = _stable_sort_cpu(key.numpy(), bits, max(0, hb))
        skey, perm = torch.from_numpy(skey), torch.from_numpy(perm)
    else:
        skey, perm = torch.sort(key, stable=True)
    first = _run_starts(skey)
    inv = torch.cumsum(first, 0)
    inv -= 1
    uniq = skey.masked_select(first)
    return uniq, perm, inv


#: `sort_groups` on the CPU sorts in at most 2**MAX_BUCKET_BITS buckets (one numpy sort each),
#: else with torch.sort.
MAX_BUCKET_BITS = 16


def _stable_sort_cpu(key: np.ndarray, bits: int, hb: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable argsort of key int64 [e] (>= 0) on the CPU -> (key sorted, perm int64 [e]); bits:
    the bits of a position (e <= 2**bits); hb: the key bits beyond 63 - bits.

    Each key's low 63 - bits bits and its position, packed in one int64, sort as plain values in the
    same order as a stable sort: numpy's SIMD sort, no index array. A key too wide for that is
    first scattered (stably, one pass) into 2**hb buckets by its top hb bits, and each bucket is
    sorted so. 8M keys of a 1M-point graph (hb = 0): 0.17-0.20 s against 0.55-0.77 s for
    torch.sort with indices on two threads; 30M keys of 47 bits (a 10M-point graph, hb = 11):
    1.0-1.8 s against 2.6 s. Peak: the key, the packed array and the positions."""
    low = 63 - bits
    packed, start = _bucket_pack(key, low, bits, 1 << hb)
    for b in range(1 << hb):
        if start[b + 1] - start[b] > 1:
            packed[start[b]:start[b + 1]].sort()
    perm = np.empty_like(packed)
    _bucket_unpack(packed, start, low, bits, perm)
    return packed, perm


@njit(cache=True, nogil=True, boundscheck=False)
def _bucket_pack(key, low, pb, nb):
    """((key & (2**low - 1)) << pb) | position, scattered stably into nb buckets by key >> low ->
    (packed int64 [e], bucket starts int64 [nb + 1])."""
    e = key.shape[0]
    start = np.zeros(nb + 1, np.int64)
    for i in range(e):
        start[(key[i] >> low) + 1] += 1
    for b in range(nb):
        start[b + 1] += start[b]
    at = start[:nb].copy()
    out = np.empty(e, np.int64)
    lm = (np.int64(1) << low) - 1
    for i in range(e):
        b = key[i] >> low
        out[at[b]] = ((key[i] & lm) << pb) | i
        at[b] += 1
    return out, start


@njit(cache=True, nogil=True, boundscheck=False)
def _bucket_unpack(packed, start, low, pb, perm):
    """Sorted packed values -> positions into perm, and the keys back in place."""
    pm = (np.int64(1) << pb) - 1
    for b in range(start.shape[0] - 1):
        top = np.int64(b) << low
        for j in range(start[b], start[b + 1]):
            x = packed[j]
            perm[j] = x & pm
            packed[j] = top | (x >> pb)


def _run_starts(s: torch.Tensor) -> torch.Tensor:
    """bool [e]: True where a sorted s [e] starts a run of equal values."""
    first = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
    if s.numel() > 1:
        torch.ne(s[1:], s[:-1], out=first[1:])
    return first


def sort_values(x: torch.Tensor) -> torch.Tensor:
    """x int64 [e] sorted ascending (values only). On the CPU numpy's sort (its SIMD quicksort
    sorted 8M int64 keys in 0.11 s where torch.sort took 0.61 s, two threads); torch's elsewhere."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy()))
    return torch.sort(x).values


def sorted_unique(x: torch.Tensor) -> torch.Tensor:
    """The distinct values of x int64 [e], ascending (torch.unique's result, 4-5x faster on the CPU)."""
    x = sort_values(x)
    return x.masked_select(_run_starts(x))


def symmetrize(edges: list, n: int):
    """Directed edges -> unique undirected pairs with the mean of their distances.

    edges: [key int64 [e], dist float [e]] with key = min(i, j) * n + max(i, j) (no self-loops,
    all valid); the list is emptied so that the caller's references go and each input array is
    freed as soon as it is consumed. Returns (key int64 [m] sorted and unique, d float64 [m]).
    A pair found in both directions (or twice in one row) is one edge; its distance is the mean
    of the copies (they only differ by rounding, or by approximation in the search).
    """
    key, dist = edges
    edges.clear()
    uniq, perm, inv = sort_groups(key)
    del key
    dist = dist.index_select(0, perm).to(F64)
    del perm
    m = uniq.numel()
    d = torch.zeros(m, dtype=F64, device=dist.device).index_add_(0, inv, dist)
    del dist
    cnt = torch.zeros(m, dtype=F64, device=d.device).index_add_(0, inv, torch.ones_like(d[:1]).expand(inv.numel()))
    del inv
    d /= cnt
    return uniq, d


def linkage(S, c, M, su, sv, Ru, Rv, alpha: float, const: float):
    """Average linkage of cluster pairs from their sums (float64 tensors, same shape).

    Average over all |A||B| point pairs, a missing pair (a, b) counted as
    alpha * (r_a + r_b) / 2 + const; exactly S / c when every pair is an edge (no cancellation
    then). M is None when alpha == 0. (The "edges" rule, S / c, does not come here.)
    """
    prod = su * sv
    num = S + const * (prod - c)
    if alpha:
        num = num + alpha * (0.5 * (sv * Ru + su * Rv) - M)
    return torch.where(c == prod, S / c, num / prod)


def cosine_linkage(F, size, nu, nv, block: int):
    """Exact average cosine distance between the clusters in slots nu and nv (int64 [q]) from
    their sums of unit rows F [slots, d] and sizes `size` (float64 [slots]): the mean over a in A,
    b in B of (1 - x_a . x_b) = 1 - (sum_A x) . (sum_B x) / (|A||B|). Returns float64 [q].
    On the CPU one fused parallel pass (`_cosine_dots`, numba; dots accumulated in float64):
    4M pairs of a 1M x 64 float32 F in 0.32 s against 0.74 s for torch's gathers and einsum
    (two threads). Elsewhere blocked gathers (`block` bounds the edges per block's q x d
    temporaries), the dots in F's dtype."""
    if _fused(F):
        out = np.empty(nu.numel())
        # As many threads as torch is allowed (a job that set torch to one thread gets one here).
        prev = numba.get_num_threads()
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        try:
            _cosine_dots(F.numpy(), size.numpy(), nu.numpy(), nv.numpy(), out)
        finally:
            numba.set_num_threads(prev)
        return torch.from_numpy(out)
    rows = max(256, block * 8 // (3 * F.shape[1]))  # ~ the bytes of `block` edges (64 B each)
    out = torch.empty(nu.numel(), dtype=F64, device=F.device)
    for s in range(0, nu.numel(), rows):
        u, v = nu[s:s + rows], nv[s:s + rows]
        # einsum runs as a batched matmul: several times faster than (a * b).sum(1) on the CPU.
        dot = torch.einsum("ij,ij->i", F.index_select(0, u), F.index_select(0, v))
        out[s:s + rows] = 1.0 - dot.to(F64) / (size.index_select(0, u) * size.index_select(0, v))
    return out


def nearest(A: dict, E: int, dirty: torch.Tensor, flag: torch.Tensor, best: torch.Tensor, nn: torch.Tensor,
            n: int, live_clusters: int, edges_of) -> None:
    """Round step 1, in place: each dirty slot's nearest neighbour among the live edges, best[x]
    (float64, its smallest linkage L) and nn[x] (int64, the smallest slot at that linkage); n for
    none. dirty: int64 slots; flag: bool [n + 1], all False (left so). A clean slot's edges are
    unchanged and its best is already their minimum, so an edge scattered into its clean end
    changes nothing: only edges with a dirty end are read.

    On the CPU one fused pass over the edge array (`_nearest_scan`, numba): 0.85 s against torch's
    1.6-2.0 s for 27M edges (two threads). Elsewhere torch's scatter_reduce: the minimum, then the
    smallest slot among the edges that reach it (the same answer as the sequential rule)."""
    best.index_fill_(0, dirty, math.inf)
    nn.index_fill_(0, dirty, n)
    if _fused(best):
        flag.index_fill_(0, dirty, True)
        _nearest_scan(A["u"][:E].numpy(), A["v"][:E].numpy(), A["L"][:E].numpy(), flag.numpy(), best.numpy(),
                      nn.numpy(), n)
        flag.index_fill_(0, dirty, False)
        return
    # When many clusters are dirty, scanning every edge is cheaper than gathering the dirty ones.
    if dirty.numel() * 3 >= live_clusters:
        eu, ev, eL = A["u"][:E], A["v"][:E], A["L"][:E]
    else:
        flag.index_fill_(0, dirty, True)
        de = edges_of(flag)
        flag.index_fill_(0, dirty, False)
        eu, ev, eL = A["u"].index_select(0, de), A["v"].index_select(0, de), A["L"].index_select(0, de)
        del de
    best.scatter_reduce_(0, eu, eL, "amin")
    best.scatter_reduce_(0, ev, eL, "amin")
    best[n] = math.inf  # dead edges scatter into the sentinel
    nn.scatter_reduce_(0, eu, torch.where(eL == best.index_select(0, eu), ev, n), "amin")
    nn.scatter_reduce_(0, ev, torch.where(eL == best.index_select(0, ev), eu, n), "amin")
    nn[n] = n


@njit(cache=True, nogil=True, boundscheck=False)
def _nearest_scan(u, v, L, flag, best, nn, n):
    """`nearest` on the CPU: edges i with a flagged end update both ends' (best, nn) by the rule
    L < best, or L == best and the other end < nn. Dead edges (both ends n) are skipped."""
    for i in range(u.shape[0]):
        a = u[i]
        b = v[i]
        if a == n or not (flag[a] or flag[b]):
            continue
        x = L[i]
        y = best[a]
        if x < y or (x == y and b < nn[a]):
            best[a] = x
            nn[a] = b
        y = best[b]
        if x < y or (x == y and a < nn[b]):
            best[b] = x
            nn[b] = a


@njit(parallel=True, cache=True, nogil=True, boundscheck=False, fastmath={"reassoc", "contract"})
def _cosine_dots(F, size, u, v, out):
    """`cosine_linkage` on the CPU: out[i] = 1 - F[u[i]] . F[v[i]] / (size[u[i]] size[v[i]]), the
    dot in float64 (reassoc lets its sum vectorise)."""
    d = F.shape[1]
    for i in prange(u.shape[0]):
        a = u[i]
        b = v[i]
        s = 0.0
        for j in range(d):
            s += np.float64(F[a, j]) * np.float64(F[b, j])
        out[i] = 1.0 - s / (size[a] * size[b])


def _scan(E, block, fn):
    """Concatenate fn(start, stop) over [0, E) in blocks (bounded temporaries)."""
    parts = [fn(s, min(E, s + block)) for s in range(0, E, block)] or [fn(0, 0)]
    return torch.cat(parts) if len(parts) != 1 else parts[0]


def rac(edges: list, r, n: int, *, impute, max_epsilon: float, block: int, progress=None, feats=None,
        relink=None):
    """Reciprocal-nearest-neighbour rounds until no mutual pair at linkage <= max_epsilon is left.

    edges: [key int64 [E], d float64 [E]] as `symmetrize` returns them (key = u * n + v, u < v,
    unique; the list is emptied and the arrays freed once copied), r float64 [n] (k-th neighbour
    distance).
    impute: None for the "edges" rule (mean over edges), else (alpha, const) of `linkage`.
    feats: None, or unit rows float [n, d] (the "exact" cosine rule): the linkage of merged
    clusters is then exact, from the Lance-Williams sums or `cosine_linkage` of the clusters'
    row sums (feats is overwritten with the sums); singleton pairs keep their edge distance d.
    impute is ignored then.
    relink: None, or (with feats) a callable(sums float [C, d]) -> integer tensor [C, k'] (rows of
    `sums`, -1 for none; any device, widened to int64 block by block), or None for no links:
    the clusters whose sums point nearest each cluster's. Called each time the
    number of clusters has halved (n/2, n/4, ...) and once more whenever the rounds stall; each
    cluster then also shares an edge (exact linkage from the sums) with those k' clusters, so
    clusters whose k-NN edges run out still reach their nearest neighbours (see hac.py).
    Returns (a, b, height, size, rounds): merges in creation order, node ids in scipy's
    convention (leaf i is i, the j-th merge makes node n + j), heights made monotone along the
    tree (max with the children's heights, a no-op for a reducible linkage).

    Only the active part is touched each round: a cluster's nearest neighbour is recomputed
    only when it is "dirty" (it merged, or one of its edges was re-coalesced), from the edges
    of dirty clusters. Edges of merged clusters are marked dead in place (both ends set to the
    sentinel slot n) and their coalesced replacements appended to spare capacity; the arrays
    are compacted when the spare runs out. Each round costs two boolean passes over the edge
    array plus work proportional to the dirty edges.
    """
    dev = r.device
    t_log = time.perf_counter()
    bound = feats is None and impute is not None and impute[0] != 0
    I64 = torch.int64
    size = torch.ones(n + 1, dtype=F64, device=dev)
    R = torch.cat([r.to(F64), torch.zeros(1, dtype=F64, device=dev)])
    node = torch.arange(n + 1, dtype=I64, device=dev)
    height = torch.zeros(n + 1, dtype=F64, device=dev)
    rep = torch.arange(n + 1, dtype=I64, device=dev)
    flag = torch.zeros(n + 1, dtype=torch.bool, device=dev)  # scratch mask over slots (slot n never set)
    best = torch.full((n + 1,), math.inf, dtype=F64, device=dev)
    nn = torch.full((n + 1,), n, dtype=I64, device=dev)
    # Edge arrays: (dtype, fill of the spare capacity). A dead or spare edge joins sentinel slots.
    spec = {"u": (I64, n), "v": (I64, n), "S": (F64, 0.0), "c": (F64, 1.0), "L": (F64, math.inf)}
    if bound:
        spec["M"] = (F64, 0.0)

    def capacity(E):  # spare for the appended edges: more spare, fewer compactions (one pass each)
        return E + max(E // 4, 1024)

    key, d = edges
    edges.clear()
    E = key.numel()
    cap = capacity(E)
    A = {name: torch.full((cap,), fill, dtype=dt, device=dev) for name, (dt, fill) in spec.items()}
    u, v = A["u"][:E], A["v"][:E]
    torch.div(key, n, rounding_mode="floor", out=u)
    torch.remainder(key, n, out=v)
    del key
    A["S"][:E] = d
    if bound:
        A["M"][:E] = 0.5 * (r.index_select(0, u) + r.index_select(0, v))
    if impute is None or feats is not None:
        A["L"][:E] = d
    else:
        A["L"][:E] = linkage(d, A["c"][:E], A["M"][:E] if bound else None, 1.0, 1.0,
                             r.index_select(0, u), r.index_select(0, v), *impute)
    del u, v, d
    live = E  # edges not dead

    def edges_of(mask):
        """Indices of the edges (in [0, E)) with an endpoint where mask is set."""
        return _scan(E, block, lambda s, e: torch.nonzero(
            mask.index_select(0, A["u"][s:e]) | mask.index_select(0, A["v"][s:e])).squeeze(1) + s)

    def append(nu, nv, nS, nc, nM, nL):
        """Append q new live edges (slot pairs nu < nv, unique and not already live)."""
        nonlocal E, live
        q = nu.numel()
        live += q
        # Compact the live edges when out of spare capacity, or when most of [0, E) is dead
        # (late rounds merge few clusters each: scans over dead edges would dominate them).
        # One array at a time, so the peak is the old arrays plus one new one (not two full sets).
        if E + q > A["u"].numel() or live < E // 2:
            keepi = _scan(E, block, lambda s, e: torch.nonzero(A["u"][s:e] != n).squeeze(1) + s)
            E = keepi.numel()
            cap = capacity(E + q)
            for name, (dt, fill) in spec.items():
                t = torch.full((cap,), fill, dtype=dt, device=dev)
                torch.index_select(A[name], 0, keepi, out=t[:E])
                A[name] = t
                del t
            del keepi
        A["u"][E:E + q] = nu
        A["v"][E:E + q] = nv
        A["S"][E:E + q] = nS
        A["c"][E:E + q] = nc
        if bound:
            A["M"][E:E + q] = nM
        A["L"][E:E + q] = nL
        E += q

    def add_links():
        """Edges from every live cluster to the clusters `relink` names (those not yet adjacent),
        with their exact linkage; returns the slots they touch (int64)."""
        nonlocal links
        t_link = time.perf_counter()
        act = torch.nonzero(size[:n] > 0).squeeze(1)
        nb = relink(feats.index_select(0, act)) if act.numel() > 1 else None
        if nb is None or nb.numel() == 0:
            return act[:0]
        # The links not yet live, deduplicated, in row blocks: at 10M points the first call has
        # ~75M candidate pairs, and whole-array temporaries of that size cost GBs.
        lk = sort_values(_scan(E, block, lambda s, e: (A["u"][s:e] * n + A["v"][s:e]).masked_select(
            A["u"][s:e] != n)))  # the live edges' keys, sorted for searchsorted
        kq = nb.shape[1]
        rb = max(1, block // kq)
        parts = []
        for s in range(0, act.numel(), rb):
            b = nb[s:s + rb].to(device=dev, dtype=I64)
            su = act[s:s + b.shape[0]].repeat_interleave(kq)
            b = b.reshape(-1)
            ok = b >= 0
            su, sv = su.masked_select(ok), act.index_select(0, b.masked_select(ok))
            # Sorted before the lookup: sorted queries walk `lk` in order (1M points, first relink:
            # 7.2M queries into 8M keys, 3.1 s unsorted, 1.1 s sorted first).
            key = sorted_unique((torch.minimum(su, sv) * n + torch.maximum(su, sv)).masked_select(su != sv))
            if lk.numel():
                pos = torch.searchsorted(lk, key).clamp_(max=lk.numel() - 1)
                key = key.masked_select(lk.index_select(0, pos) != key)
            parts.append(key)
        del lk, nb
        key = sorted_unique(torch.cat(parts)) if len(parts) != 1 else parts[0]
        del parts
        nu, nv = key // n, key % n
        del key
        nL = cosine_linkage(feats, size, nu, nv, block)
        prod = size.index_select(0, nu) * size.index_select(0, nv)
        append(nu, nv, nL * prod, prod, None, nL)  # relink implies feats, so never the "bound" rule
        links += nu.numel()
        log.info("hac: relinked %d clusters, %d new edges, %.2f s", act.numel(), nu.numel(),
                 time.perf_counter() - t_link)
        return torch.cat([nu, nv])

    # relink schedule: next when the clusters number <= next_relink; on a stall, once per count.
    next_relink = n // 2 if relink is not None and feats is not None else -1
    stalled_at = n + 1
    links = 0
    dirty = torch.arange(n, dtype=I64, device=dev)  # slots whose nearest neighbour is recomputed
    out_a, out_b, out_h, out_s = [], [], [], []
    done = 0
    rounds = 0
    while True:
        # 1) nearest neighbours of dirty clusters (ties: smallest slot), from their edges only.
        nearest(A, E, dirty, flag, best, nn, n, n - done, edges_of)
        # 2) reciprocal pairs at linkage <= max_epsilon (only pairs with a dirty end can be new).
        y = nn.index_select(0, dirty)
        ok = (y < n) & (nn.index_select(0, y.clamp(max=n)) == dirty) & (best.index_select(0, dirty) <= max_epsilon)
        x, y = dirty.masked_select(ok), y.masked_select(ok)
        # A pair with both ends dirty shows up twice: keep it from its smaller end.
        flag.index_fill_(0, dirty, True)
        once = (x < y) | ~flag.index_select(0, y)
        flag.index_fill_(0, dirty, False)
        x, y = x.masked_select(once), y.masked_select(once)
        x, y = torch.minimum(x, y), torch.maximum(x, y)
        if x.numel() == 0:
            # Stalled: no reciprocal pair along the edges. Relink once at this count (it may
            # join clusters whose edges ran out, or other components); stop if nothing new.
            if next_relink < 0 or n - done >= stalled_at or n - done < 2:
                break
            stalled_at = n - done
            next_relink = min(next_relink, (n - done) // 2)
            dirty = add_links()
            if dirty.numel() == 0:
                break
            dirty = torch.unique(dirty)
            continue
        p = x.numel()
        rounds += 1
        h = torch.maximum(best.index_select(0, x), torch.maximum(height.index_select(0, x), height.index_select(0, y)))
        nx, ny = node.index_select(0, x), node.index_select(0, y)
        out_a.append(torch.minimum(nx, ny))
        out_b.append(torch.maximum(nx, ny))
        out_h.append(h)
        out_s.append(size.index_select(0, x) + size.index_select(0, y))
        node.index_copy_(0, x, n + done + torch.arange(p, dtype=I64, device=dev))
        height.index_copy_(0, x, h)
        size.index_copy_(0, x, out_s[-1])
        R.index_copy_(0, x, R.index_select(0, x) + R.index_select(0, y))
        if feats is not None:  # x and y are disjoint slot sets (index_copy_ beats index_add_ here)
            feats.index_copy_(0, x, feats.index_select(0, x) + feats.index_select(0, y))
        size.index_fill_(0, y, 0.0)
        best.index_fill_(0, y, math.inf)
        nn.index_fill_(0, y, n)
        done += p
        # 3) edges touching a merged cluster: killed in place, re-coalesced, appended.
        flag.index_fill_(0, x, True)
        flag.index_fill_(0, y, True)
        touch = edges_of(flag)
        flag.index_fill_(0, x, False)
        flag.index_fill_(0, y, False)
        # (Temporaries are freed as soon as they are used: in the first rounds `touch` is most
        # of the edge array, and these [T] arrays are the peak memory of the whole run.)
        rep.index_copy_(0, y, x)
        tu = rep.index_select(0, A["u"].index_select(0, touch))
        tv = rep.index_select(0, A["v"].index_select(0, touch))
        rep.index_copy_(0, y, y)
        # Kill the touched edges now (S and c, still read below, are left as they are).
        A["u"].index_fill_(0, touch, n)
        A["v"].index_fill_(0, touch, n)
        A["L"].index_fill_(0, touch, math.inf)
        n_touch = touch.numel()
        keep = tu != tv  # the merged pair's own edge becomes a self-loop: dropped
        tsel = touch.masked_select(keep)
        del touch
        tkey = torch.minimum(tu, tv)
        torch.maximum(tu, tv, out=tu)
        del tv
        tkey.mul_(n).add_(tu)
        del tu
        tkey = tkey.masked_select(keep)
        del keep
        uniq, perm, inv = sort_groups(tkey)
        del tkey
        tsel = tsel.index_select(0, perm)
        del perm
        q = uniq.numel()
        nS = torch.zeros(q, dtype=F64, device=dev).index_add_(0, inv, A["S"].index_select(0, tsel))
        nc = torch.zeros(q, dtype=F64, device=dev).index_add_(0, inv, A["c"].index_select(0, tsel))
        nM = torch.zeros(q, dtype=F64, device=dev).index_add_(0, inv, A["M"].index_select(0, tsel)) if bound else None
        del inv, tsel
        nu, nv = uniq // n, uniq % n
        del uniq
        if feats is not None:
            # S, c: sum of the distances and count of the member pairs already known (c = 1 for a graph
            # edge; c = |A||B| once a linkage was computed in full). When the coalesced parts cover
            # every pair, S / c is the exact linkage (average linkage's Lance-Williams update) and
            # needs no gather; else it comes from the row sums, and the edge becomes fully known.
            prod = size.index_select(0, nu) * size.index_select(0, nv)
            nL = nS / nc
            part = torch.nonzero(nc != prod).squeeze(1)
            pp = prod.index_select(0, part)
            Lp = cosine_linkage(feats, size, nu.index_select(0, part), nv.index_select(0, part), block)
            nL.index_copy_(0, part, Lp)
            nS.index_copy_(0, part, Lp * pp)
            nc.index_copy_(0, part, pp)
            del prod, part, pp, Lp
        elif impute is None:
            nL = nS / nc
        else:
            nL = linkage(nS, nc, nM, size.index_select(0, nu), size.index_select(0, nv),
                         R.index_select(0, nu), R.index_select(0, nv), *impute)
        live -= n_touch
        append(nu, nv, nS, nc, nM, nL)
        # Next round's dirty clusters: the merged ones and every endpoint of a re-coalesced edge.
        flag.index_fill_(0, x, True)
        flag.index_fill_(0, nu, True)
        flag.index_fill_(0, nv, True)
        del nu, nv, nS, nc, nM, nL
        if relink is not None and n - done <= next_relink:
            next_relink = (n - done) // 2
            linked = add_links()
            flag.index_fill_(0, linked, True)
            del linked
        dirty = torch.nonzero(flag).squeeze(1)
        flag.index_fill_(0, dirty, False)
        log.debug("hac round %d: %d merges (%d total), %d live edges", rounds, p, done, live)
        if time.perf_counter() - t_log >= 10.0:  # long runs say where they are (INFO, every ~10 s)
            t_log = time.perf_counter()
            log.info("hac: round %d, %d of %d merges, %d live edges", rounds, done, n - 1, live)
        if progress is not None:
            progress(done, n - 1)
    if links:
        log.info("hac: relinking added %d edges", links)
    if out_a:
        a, b, h, sz = (torch.cat(t) for t in (out_a, out_b, out_h, out_s))
    else:
        a = b = torch.zeros(0, dtype=I64, device=dev)
        h = sz = torch.zeros(0, dtype=F64, device=dev)
    return a, b, h, sz.to(I64), rounds
