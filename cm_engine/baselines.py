"""The baselines Cluster-Margin is compared with: random, uncertainty, CoreSet, BADGE.

* `random_select`: uniform without replacement among the eligible points.
* `uncertainty_select`: the `budget` most uncertain points by margin (p1 - p2), entropy or
  least confidence (1 - p1), no diversity. Scores are computed block-wise on the device.
* `coreset_select`: k-center greedy (Sener & Savarese, ICLR 2018).
* `badge_select`: k-means++ seeding (D^2 sampling) on BADGE's gradient embeddings
  g_i = (p_i - onehot(argmax p_i)) (x) h_i (Ash et al., ICLR 2020), never materialized.
* `partitioned`: the Cluster-Margin paper's appendix trick for CoreSet/BADGE at scale: split the
  pool at random into m parts and select budget/m in each.

CoreSet and BADGE share one greedy traversal kernel (`_traverse`). It keeps, per candidate, the
distance to its nearest chosen centre and which centre that is (O(N) memory; never an N x N or
N x budget matrix). After each pick only the points that can get closer to the new centre are
re-measured: by the triangle inequality a point x assigned to centre a, at distance r(x) <= R_a
(R_a: the largest such distance in a's group), can only get closer to the new centre c if
d(a, c) < 2 r(x) <= 2 R_a, so whole groups with d(a, c) >= 2 R_a are skipped (the classic
accelerated Gonzalez traversal). The result is exactly the plain O(N * budget * d) traversal's
(same picks up to floating-point ties), at a cost that falls as the groups shrink: on clustered
pools most picks touch a small fraction of the pool. In the worst case (every group touched
every pick) it does the plain traversal's arithmetic plus O(N) bookkeeping per pick.

When even that is too slow (the first picks of a traversal touch the whole pool, so the cost is
at least O(N * d) per pick until the groups get small, and D^2 sampling is O(N) per pick), use
`partitions=m` (or `partitioned`): m times less arithmetic, at the price of diversity only inside
each part. The paper uses it at Open Images scale (~10M points, 100K-1M per round).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ._device import budget_bytes as _budget_bytes, log_memory_estimate, resolve_device, rows_per_block
from ._validate import as_index_array, check_choice, check_int, check_ndim, check_nonempty, check_length
from .pool import Pool
from .sampler import as_generator, check_unique

log = logging.getLogger("cm_engine")

MEASURES = ("margin", "entropy", "least_confidence")
METRICS = ("l2", "cosine")

# Relative slack on the pruning test d(a, c) < 2 R_a: distances are float32, so a group is
# skipped only when it is clearly out of reach; a few extra groups visited cost nothing.
_PRUNE_SLACK = 1e-4


# ----------------------------------------------------------------------------- helpers

def _eligible(n: int, exclude) -> tuple[np.ndarray, np.ndarray]:
    """(excluded indices, eligible indices ascending) for a pool of n points."""
    if exclude is None:
        return np.zeros(0, np.int64), np.arange(n, dtype=np.int64)
    excl = as_index_array("exclude", exclude, n=n, unique=False)
    check_unique("exclude", excl, n)
    keep = np.ones(n, dtype=np.bool_)
    keep[excl] = False
    return excl, np.flatnonzero(keep)


def _check_run_options(partitions, kernel, progress, seed, device):
    """Checks shared by CoreSet and BADGE; returns (partitions, Generator, torch.device)."""
    partitions = check_int("partitions", partitions, min=1)
    check_choice("kernel", kernel, ("auto", "numba", "torch"))
    _check_progress(progress)
    rng = as_generator(seed)
    dev = resolve_device(device)
    if kernel == "numba" and dev.type != "cpu":
        raise ValueError(f"kernel: 'numba' runs on the CPU, got device {str(dev)!r}")
    return partitions, rng, dev


def _check_progress(progress):
    if progress is not None and not callable(progress):
        raise TypeError(f"progress: expected a callable or None, got {type(progress).__name__}")


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def _gather(pool: Pool, idx: np.ndarray, device, dtype=torch.float32) -> torch.Tensor:
    """Rows `idx` (ascending int64) of the pool as a `dtype` tensor on `device`."""
    a = pool.array
    if isinstance(a, torch.Tensor):
        return a[torch.as_tensor(idx, device=a.device)].to(device=device, dtype=dtype)
    if hasattr(a, "read") and not isinstance(a, np.ndarray):  # shards / bfloat16 storage
        rows = a[idx]
        if not isinstance(rows, torch.Tensor):
            rows = torch.from_numpy(np.ascontiguousarray(rows))
        return rows.to(device=device, dtype=dtype)
    rows = np.ascontiguousarray(a[idx])
    if rows.dtype not in (np.float16, np.float32, np.float64):
        rows = rows.astype(np.float32)
    return torch.from_numpy(rows).to(device=device, dtype=dtype)


def _init_tiles(k0: int, rows: int, budget=None) -> tuple[int, int]:
    """(centre chunk, row block) for the distances to k0 initial centres: the [rows, chunk] float32
    tile and its two temporaries stay inside the byte budget, and the row block never exceeds the
    feature block's `rows`."""
    step = max(1, min(k0, 4096))
    trows = max(1, min(rows, _budget_bytes(budget) // (step * 4 * 3)))
    return step, trows


def _split(n: int, rows: int):
    return [(s, min(s + rows, n)) for s in range(0, n, max(1, rows))]


# ----------------------------------------------------------------------------- random

def random_select(n, budget, *, exclude=None, seed=0) -> np.ndarray:
    """`budget` pool indices drawn uniformly without replacement from [0, n) minus `exclude`.

    n: int >= 1 pool size. budget: int >= 0 (all eligible points, shuffled, if it is larger).
    exclude: optional unique int indices never returned. seed: int >= 0 or numpy Generator.
    Returns int64 [min(budget, eligible)] in draw order.
    """
    n = check_int("n", n, min=1)
    budget = check_int("budget", budget, min=0)
    rng = as_generator(seed)
    _, elig = _eligible(n, exclude)
    k = min(budget, elig.size)
    return elig[rng.choice(elig.size, size=k, replace=False)].astype(np.int64, copy=False)


# ----------------------------------------------------------------------------- uncertainty

def _uncertainty_local(outputs: Pool, measure: str, from_logits: bool, device, budget) -> np.ndarray:
    """float32 [N] scores, lower = more uncertain, block-wise on the device."""
    n, c = outputs.shape
    out = np.empty(n, np.float32)
    # a block of float32 probabilities plus a few temporaries of the same shape
    rows = rows_per_block(4 * c * 4, budget)
    for s, e, z in outputs.iter_blocks(rows=rows, device=device, dtype=torch.float32):
        if measure == "margin":
            if from_logits:
                z = torch.softmax(z, dim=1)
            if c == 1:
                top = torch.cat([z, torch.zeros_like(z)], 1)
            else:
                top = torch.topk(z, 2, dim=1).values
            sc = top[:, 0] - top[:, 1]
        elif measure == "least_confidence":
            p = torch.softmax(z, dim=1) if from_logits else z
            sc = p.max(dim=1).values
        else:  # entropy; negative so that lower = more uncertain
            if from_logits:
                logp = torch.log_softmax(z, dim=1)
                p = logp.exp()
            else:
                p = z
                logp = torch.log(p.clamp_min(1e-30))
            sc = (p * logp).sum(dim=1)
        out[s:e] = sc.float().cpu().numpy()
    return out


def uncertainty_scores(outputs, *, measure="margin", from_logits=True, device="auto", budget_bytes=None) -> np.ndarray:
    """float32 [N] uncertainty scores, lower = more uncertain.

    margin: p1 - p2 (via `cm_engine.margin.margin_scores` when that module is present);
    least_confidence: p1 (ranking equals 1 - p1 descending); entropy: sum p log p (= -H).
    outputs: [N, C] logits (from_logits=True) or probabilities; array, memmap, tensor or .npy path.
    """
    check_choice("measure", measure, MEASURES)
    from_logits = _check_bool("from_logits", from_logits)
    pool = Pool(outputs, name="outputs")
    check_ndim("outputs", pool.shape, 2)
    check_nonempty("outputs", pool.n)
    if measure == "margin":
        try:
            from .margin import margin_scores
        except ImportError:
            margin_scores = None
        if margin_scores is not None:
            return np.asarray(margin_scores(outputs, from_logits=from_logits, device=device,
                                            budget_bytes=budget_bytes), dtype=np.float32)
    dev = resolve_device(device)
    sc = _uncertainty_local(pool, measure, from_logits, dev, budget_bytes)
    if not np.isfinite(sc).all():
        raise ValueError("outputs: expected finite values, got NaN/inf (non-finite uncertainty scores)")
    return sc


def uncertainty_select(outputs, budget, *, measure="margin", from_logits=True, exclude=None, device="auto",
                       budget_bytes=None) -> np.ndarray:
    """The `budget` most uncertain eligible points (no diversity): the margin/entropy/least-confidence
    baselines of the paper.

    outputs: [N, C] logits or probabilities. measure: "margin" (default) | "entropy" | "least_confidence".
    exclude: optional unique int indices never returned.
    Returns int64 [min(budget, eligible)] pool indices, most uncertain first (ties: lower index first).
    """
    budget = check_int("budget", budget, min=0)
    sc = uncertainty_scores(outputs, measure=measure, from_logits=from_logits, device=device,
                            budget_bytes=budget_bytes)
    _, elig = _eligible(sc.shape[0], exclude)
    from .strategies import lowest_k

    pick = elig[lowest_k(sc[elig], budget)]
    order = np.lexsort((pick, sc[pick]))  # by score, then index
    return pick[order].astype(np.int64, copy=False)


# ----------------------------------------------------------------------------- the traversal kernel

class _L2Space:
    """Candidates' embeddings with the Euclidean distance (cosine: on unit-normalized rows)."""

    def __init__(self, pool: Pool, cand: np.ndarray, device, normalize: bool, resident: bool):
        self.pool, self.cand, self.device, self.normalize = pool, cand, device, normalize
        self.d = pool.shape[1]
        self.row_bytes = 4 * self.d
        self.x = self._load(cand) if resident else None  # the whole candidate set on the device

    def _load(self, idx):
        x = _gather(self.pool, idx, self.device)
        if self.normalize:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return x

    def feats(self, pos: torch.Tensor):
        """Features of candidate positions `pos` (ascending LongTensor on the device)."""
        if self.x is not None:
            return self.x[pos]
        return self._load(self.cand[pos.cpu().numpy()])

    def feats_of(self, idx: np.ndarray):
        """Features of arbitrary pool rows (initial centres)."""
        return self._load(np.sort(idx))

    def alloc(self, k):
        return torch.empty((k, self.d), dtype=torch.float32, device=self.device)

    @staticmethod
    def put(store, sl, f):
        store[sl] = f

    @staticmethod
    def head(store, k):
        return store[:k]

    @staticmethod
    def dist(f, c):
        """Distances [m] of rows f [m, d] to one centre c [1, d] (direct differences: accurate)."""
        return (f - c).norm(dim=1)

    @staticmethod
    def cross_min(f, cs):
        """(min distance, argmin) of rows f to centres cs, via one GEMM (init with many centres)."""
        d2 = (f * f).sum(1, keepdim=True) - 2 * f @ cs.T + (cs * cs).sum(1)[None, :]
        m, a = d2.min(dim=1)
        return m, a


class _BadgeSpace:
    """Candidates' BADGE gradient embeddings g = u (x) h, kept factored as (u [C], h [d]).

    ||u_i (x) h_i - u_c (x) h_c||^2 is computed as
    ||du||^2 ||h_i||^2 + ||u_c||^2 ||dh||^2 + 2 (du . u_c)(h_i . dh), du = u_i - u_c, dh = h_i - h_c,
    an exact rewriting of ||g_i||^2 + ||g_c||^2 - 2 (u_i . u_c)(h_i . h_c) whose terms all vanish as
    the points meet (no cancellation of two large numbers when they are close).
    """

    def __init__(self, emb: Pool, out: Pool, cand, device, from_logits, resident):
        self.emb, self.out, self.cand, self.device, self.from_logits = emb, out, cand, device, from_logits
        self.d, self.c = emb.shape[1], out.shape[1]
        self.row_bytes = 4 * (self.d + self.c) * 3
        self.x = self._load(cand) if resident else None

    def _load(self, idx):
        h = _gather(self.emb, idx, self.device)
        z = _gather(self.out, idx, self.device)
        p = torch.softmax(z, dim=1) if self.from_logits else z
        # u = p - onehot(argmax p); the argmax entry as minus the sum of the others, which keeps
        # its precision when p_max is close to 1 (p_max - 1 in float32 would not)
        u = p.clone()
        rows = torch.arange(u.shape[0], device=u.device)
        top = p.argmax(dim=1)
        u[rows, top] = 0.0
        u[rows, top] = -u.sum(dim=1)
        return (u, h)

    def feats(self, pos):
        if self.x is not None:
            return (self.x[0][pos], self.x[1][pos])
        return self._load(self.cand[pos.cpu().numpy()])

    def feats_of(self, idx):
        return self._load(np.sort(idx))

    def alloc(self, k):
        return (torch.empty((k, self.c), dtype=torch.float32, device=self.device),
                torch.empty((k, self.d), dtype=torch.float32, device=self.device))

    @staticmethod
    def put(store, sl, f):
        store[0][sl] = f[0]
        store[1][sl] = f[1]

    @staticmethod
    def head(store, k):
        return (store[0][:k], store[1][:k])

    @staticmethod
    def dist(f, c):
        u, h = f
        uc, hc = c
        du, dh = u - uc, h - hc
        d2 = ((du * du).sum(1) * (h * h).sum(1) + (uc * uc).sum() * (dh * dh).sum(1)
              + 2 * (du @ uc[0]) * ((h * dh).sum(1)))
        return d2.clamp_min(0).sqrt()

    @staticmethod
    def norms(f):
        u, h = f
        return ((u * u).sum(1) * (h * h).sum(1)).sqrt()


def _traverse(space, m: int, budget: int, *, mode: str, rng: np.random.Generator, device, rows: int,
              init=None, first=None, progress=None) -> np.ndarray:
    """Greedy traversal over m candidates (positions 0..m-1 of `space`); returns `budget` positions.

    mode "farthest": each pick is the unpicked candidate farthest from the chosen centres
      (k-center greedy; ties: lowest position).
    mode "d2": each pick is drawn with probability proportional to that distance squared
      (k-means++ seeding); the draw is u = rng.random(), inverted through the float64 cumulative
      sum of the weights in candidate order (so a reference given the same rng picks the same).
    init: optional [k0, d] features of initial centres that are not candidates (L2 space only).
    first: position of the first pick when there is no init (default: a seeded random position).
    When no unpicked candidate has a positive distance left (duplicates of centres), "d2" picks
    uniformly among the unpicked ones and "farthest" the lowest unpicked position.
    """
    k0 = 0 if init is None else int(init.shape[0])
    kmax = budget + k0
    mind = torch.full((m,), float("inf"), dtype=torch.float32, device=device)
    assign = torch.zeros(m, dtype=torch.int64, device=device)
    radius = torch.zeros(kmax, dtype=torch.float32, device=device)  # R_a: farthest member of group a
    store = space.alloc(kmax)  # centre features, preallocated (no per-pick concatenation)
    picked = torch.zeros(m, dtype=torch.bool, device=device)
    picks = np.empty(budget, np.int64)
    all_pos = torch.arange(m, device=device)
    neg = torch.tensor(-1.0, device=device)
    zero = torch.zeros((), device=device)

    if k0:
        space.put(store, slice(0, k0), init)
        step, trows = _init_tiles(k0, rows)
        log_memory_estimate("traverse: distances to the initial centres", trows * step * 4 * 3)
        for s, e in _split(m, trows):
            f = space.feats(all_pos[s:e])
            best = torch.full((e - s,), float("inf"), device=device)
            arg = torch.zeros(e - s, dtype=torch.int64, device=device)
            for a in range(0, k0, step):
                b = min(k0, a + step)
                dm, da = space.cross_min(f, init[a:b])
                better = dm < best
                best = torch.where(better, dm, best)
                arg = torch.where(better, da + a, arg)
            # the GEMM form only ranks; store the exact (direct-difference) distance
            mind[s:e] = (f - init[arg]).norm(dim=1)
            assign[s:e] = arg
        radius.scatter_reduce_(0, assign, mind, reduce="amax", include_self=True)
    n_centres = k0

    for t in range(budget):
        if n_centres == 0:
            c = int(first) if first is not None else int(rng.integers(m))
        elif mode == "farthest":
            c = int(torch.argmax(torch.where(picked, neg, mind)))
        else:
            w = torch.where(picked, zero, mind).double() ** 2
            cum = torch.cumsum(w, 0)
            total = float(cum[-1])
            if total > 0 and math.isfinite(total):
                u = rng.random()
                key = torch.tensor([u * total], dtype=torch.float64, device=device)
                c = min(int(torch.searchsorted(cum, key, right=True)[0]), m - 1)
                if bool(picked[c]) or float(w[c]) == 0:  # float edge: the next positive weight
                    nz = torch.nonzero(w[c:] > 0).flatten()
                    c = c + int(nz[0]) if nz.numel() else int(torch.nonzero(w > 0).flatten()[-1])
            else:
                free = torch.nonzero(~picked).flatten()
                c = int(free[int(rng.integers(free.numel()))])
        picks[t] = c
        fc = space.feats(all_pos[c:c + 1])
        j = n_centres
        if n_centres == 0:
            touched = None  # the first centre: every candidate is measured
            chunks = [all_pos[s:e] for s, e in _split(m, rows)]
        else:
            # groups the new centre can reach: d(a, c) < 2 R_a (triangle inequality)
            dcc = space.dist(space.head(store, n_centres), fc)
            reach = dcc < 2 * radius[:n_centres] * (1 + _PRUNE_SLACK) + 1e-6
            touched = torch.nonzero(reach[assign]).flatten()
            chunks = [touched[s:e] for s, e in _split(touched.numel(), rows)]
        space.put(store, slice(j, j + 1), fc)
        n_centres += 1
        for pos in chunks:
            if pos.numel() == 0:
                continue
            d = space.dist(space.feats(pos), fc)
            cur = mind[pos]
            better = d < cur
            mind[pos] = torch.where(better, d, cur)
            assign[pos] = torch.where(better, torch.full_like(pos, j), assign[pos])
        mind[c] = 0.0
        assign[c] = j
        picked[c] = True
        # every member of a reached group was visited: recompute those groups' radii exactly
        if touched is None:
            radius.scatter_reduce_(0, assign, mind, reduce="amax", include_self=True)
        else:
            radius[:j] = torch.where(reach, zero, radius[:j])
            radius[j] = 0
            if touched.numel():
                radius.scatter_reduce_(0, assign[touched], mind[touched], reduce="amax", include_self=True)
        if progress is not None:
            progress(1)
    return picks


def _resident(nbytes: int, budget) -> bool:
    """Hold the candidates' features on the device when they fit the byte budget."""
    return nbytes <= _budget_bytes(budget)



# ----------------------------------------------------------------------------- CPU kernel: lazy greedy

try:
    import numba as _numba
except ImportError:  # pragma: no cover
    _numba = None


def _lazy_kcenter_py(X, cand, mind, budget, first, picks):
    """Lazy k-center greedy (exact): a max-heap of per-point distance bounds.

    mind[p] is an upper bound of candidate p's distance to the chosen centres, exact as of
    last[p] picks. Pop the largest bound; if stale, measure it against the picks made since and
    push it back; if fresh, it is the true farthest point (every other key is an upper bound).
    Points whose bound stays below the current maximum are never touched again, so the cost is
    a small fraction of the O(N * budget * d) plain traversal on most pools. Ties: lowest position.
    """
    m, d = cand.shape[0], X.shape[1]
    last = np.zeros(m, np.int64)
    heap = np.empty(m, np.int64)
    t = 0
    if first >= 0:
        picks[0] = first
        t = 1
        xf = X[cand[first]]
        for p in range(m):
            s = 0.0
            xp = X[cand[p]]
            for k in range(d):
                diff = xp[k] - xf[k]
                s += diff * diff
            v = np.sqrt(s)
            if v < mind[p]:
                mind[p] = v
        last[:] = 1
    picked = np.zeros(m, np.bool_)
    if first >= 0:
        picked[first] = True
    size = 0
    for p in range(m):
        if not picked[p]:
            heap[size] = p
            size += 1
    # heapify: parent "greater" = larger bound, then lower position
    for start in range(size // 2 - 1, -1, -1):
        i = start
        while True:
            l = 2 * i + 1
            if l >= size:
                break
            b = l
            r = l + 1
            if r < size and (mind[heap[r]] > mind[heap[l]] or (mind[heap[r]] == mind[heap[l]] and heap[r] < heap[l])):
                b = r
            if mind[heap[b]] > mind[heap[i]] or (mind[heap[b]] == mind[heap[i]] and heap[b] < heap[i]):
                heap[i], heap[b] = heap[b], heap[i]
                i = b
            else:
                break
    while t < budget and size > 0:
        p = heap[0]
        if last[p] < t:
            xp = X[cand[p]]
            best = mind[p]
            for j in range(last[p], t):
                xc = X[cand[picks[j]]]
                s = 0.0
                for k in range(d):
                    diff = xp[k] - xc[k]
                    s += diff * diff
                v = np.sqrt(s)
                if v < best:
                    best = v
            mind[p] = best
            last[p] = t
        else:
            picks[t] = p
            t += 1
            mind[p] = 0.0
            size -= 1
            heap[0] = heap[size]
        # sift the root down (its key only decreased, or it was replaced)
        i = 0
        while True:
            l = 2 * i + 1
            if l >= size:
                break
            b = l
            r = l + 1
            if r < size and (mind[heap[r]] > mind[heap[l]] or (mind[heap[r]] == mind[heap[l]] and heap[r] < heap[l])):
                b = r
            if mind[heap[b]] > mind[heap[i]] or (mind[heap[b]] == mind[heap[i]] and heap[b] < heap[i]):
                heap[i], heap[b] = heap[b], heap[i]
                i = b
            else:
                break
    return t


_lazy_kcenter = _numba.njit(cache=True, nogil=True)(_lazy_kcenter_py) if _numba is not None else _lazy_kcenter_py



def _lazy_badge_py(U, H, first, budget, seed, picks):
    """D^2 sampling on gradient embeddings by rejection from stale bounds (exact k-means++ seeding).

    w[p] = squared distance of p to its nearest pick as of last[p] picks: an upper bound of the
    true one. A proposal p is drawn with probability w[p] / sum(w) from a sum-tree; if stale, it is
    re-measured against the picks made since and accepted with probability w_true / w_stale
    (the tree updated either way); a fresh proposal is accepted. Every trial accepts p with
    probability w_true[p] / sum(w), so the accepted pick follows D^2 exactly, while points far
    below the top of the distribution are rarely re-measured. Random numbers: numba's generator
    seeded with `seed`. When every remaining weight is 0, picks are uniform among the unpicked.
    """
    m, C = U.shape
    d = H.shape[1]
    np.random.seed(seed)
    S = 1
    while S < m:
        S *= 2
    tree = np.zeros(2 * S, np.float64)
    last = np.zeros(m, np.int64)
    picked = np.zeros(m, np.bool_)
    hn = np.empty(m, np.float64)
    un = np.empty(m, np.float64)
    for p in range(m):
        s = 0.0
        for k in range(d):
            s += H[p, k] * H[p, k]
        hn[p] = s
        s = 0.0
        for k in range(C):
            s += U[p, k] * U[p, k]
        un[p] = s
    picks[0] = first
    picked[first] = True
    t = 1
    c = first
    for p in range(m):
        if p == first:
            continue
        a = 0.0
        b = 0.0
        x = 0.0
        y = 0.0
        for k in range(C):
            du = U[p, k] - U[c, k]
            a += du * du
            x += du * U[c, k]
        for k in range(d):
            dh = H[p, k] - H[c, k]
            b += dh * dh
            y += H[p, k] * dh
        v = a * hn[p] + un[c] * b + 2.0 * x * y
        tree[S + p] = v if v > 0.0 else 0.0
        last[p] = 1
    for i in range(S - 1, 0, -1):
        tree[i] = tree[2 * i] + tree[2 * i + 1]
    while t < budget:
        total = tree[1]
        if not (total > 0.0):
            # only duplicates of picks left: uniform among the unpicked
            r = np.random.randint(m - t)
            p = -1
            for q in range(m):
                if not picked[q]:
                    if r == 0:
                        p = q
                        break
                    r -= 1
        else:
            x = np.random.random() * total
            i = 1
            while i < S:
                if x < tree[2 * i]:
                    i = 2 * i
                else:
                    x -= tree[2 * i]
                    i = 2 * i + 1
            p = i - S
            if p >= m or picked[p] or tree[S + p] <= 0.0:
                continue  # a float edge of the descent: draw again
            if last[p] < t:
                old = tree[S + p]
                best = old
                for j in range(last[p], t):
                    c = picks[j]
                    a = 0.0
                    b = 0.0
                    xx = 0.0
                    y = 0.0
                    for k in range(C):
                        du = U[p, k] - U[c, k]
                        a += du * du
                        xx += du * U[c, k]
                    for k in range(d):
                        dh = H[p, k] - H[c, k]
                        b += dh * dh
                        y += H[p, k] * dh
                    v = a * hn[p] + un[c] * b + 2.0 * xx * y
                    if v < 0.0:
                        v = 0.0
                    if v < best:
                        best = v
                last[p] = t
                i = S + p
                tree[i] = best
                i //= 2
                while i >= 1:
                    tree[i] = tree[2 * i] + tree[2 * i + 1]
                    i //= 2
                if np.random.random() * old >= best:
                    continue  # rejected (its bound is now exact)
        picks[t] = p
        t += 1
        picked[p] = True
        i = S + p
        tree[i] = 0.0
        i //= 2
        while i >= 1:
            tree[i] = tree[2 * i] + tree[2 * i + 1]
            i //= 2
    return t


_lazy_badge = _numba.njit(cache=True, nogil=True)(_lazy_badge_py) if _numba is not None else _lazy_badge_py

# ----------------------------------------------------------------------------- CoreSet

def coreset_select(embeddings, budget, *, exclude=None, metric="l2", device="auto", budget_bytes=None,
                   seed=0, partitions=1, kernel="auto", progress=None) -> np.ndarray:
    """CoreSet (k-center greedy, Sener & Savarese 2018): repeatedly pick the eligible point farthest
    from its nearest centre.

    embeddings: float [N, d] (array, memmap, tensor or .npy path; never read whole unless it fits
      `budget_bytes`, then it is held as float32 on the device).
    budget: int >= 0. exclude: unique int indices of the labeled set: they are the initial centres
      and are never returned. With no exclude the first centre is a seeded random point.
    metric: "l2" (Euclidean) or "cosine" (Euclidean on unit-normalized rows: the same ranking as 1 - cos).
    budget_bytes: working-memory budget (blocks; the candidate set is kept on the device when it fits).
    partitions: m >= 1; m > 1 runs `partitioned` (split at random into m parts, budget/m each,
      each part's labeled points as its initial centres). Needed when O(N * budget * d) work is
      too slow (CPU, N * budget >~ 1e10), see the module docstring.
    kernel: "auto" (numba on the CPU, torch on a GPU), "numba" (CPU lazy greedy: a max-heap of
      distance bounds, each point re-measured only when its stale bound reaches the top; exact,
      and on most pools a small fraction of the plain traversal's arithmetic) or "torch" (the
      block-wise traversal on `device` with triangle-inequality pruning).
    progress: optional callable(n_picks_done_increment).
    Returns int64 [min(budget, eligible)] pool indices in pick order.
    Memory: O(N) running minimum, assignment and flags plus one block; never N x N or N x budget.
    """
    pool = Pool(embeddings, name="embeddings")
    check_ndim("embeddings", pool.shape, 2)
    check_nonempty("embeddings", pool.n)
    budget = check_int("budget", budget, min=0)
    check_choice("metric", metric, METRICS)
    partitions, rng, dev = _check_run_options(partitions, kernel, progress, seed, device)
    excl, elig = _eligible(pool.n, exclude)
    if partitions > 1:
        def one(idx, b, *, seed, exclude):
            return _coreset(pool, idx, exclude, b, metric, dev, budget_bytes, seed, progress, kernel)
        return partitioned(one, pool.n, budget, partitions, seed=rng, exclude=excl)
    return _coreset(pool, elig, excl, budget, metric, dev, budget_bytes, rng, progress, kernel)


def _coreset(pool, cand, centres_idx, budget, metric, dev, budget_b, rng, progress, kernel="auto"):
    budget = min(budget, cand.size)
    if budget == 0:
        return np.zeros(0, np.int64)
    space_bytes = cand.size * 4 * pool.shape[1]
    rows = rows_per_block(4 * pool.shape[1] * 3, budget_b)
    if kernel == "auto":
        kernel = "numba" if dev.type == "cpu" and _numba is not None else "torch"
    if kernel == "numba":
        return _coreset_lazy(pool, cand, centres_idx, budget, metric, budget_b, rng, rows, progress)
    space = _L2Space(pool, cand, dev, metric == "cosine", _resident(space_bytes, budget_b))
    log_memory_estimate("coreset_select", cand.size * 17 + (space_bytes if space.x is not None else 0)
                        + rows * 12 * pool.shape[1])
    init = space.feats_of(centres_idx) if centres_idx.size else None
    pos = _traverse(space, cand.size, budget, mode="farthest", rng=rng, device=dev, rows=rows,
                    init=init, progress=progress)
    return cand[pos]


def _coreset_lazy(pool, cand, centres_idx, budget, metric, budget_b, rng, rows, progress):
    """CPU: distances to the initial centres block-wise with torch GEMMs, then the numba lazy greedy
    over the rows in place (a float32 C-contiguous array or memmap is used as is, never copied;
    other dtypes and cosine are converted once to a float32 array of the pool)."""
    a = pool.array
    if (metric == "l2" and isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous):
        X, rows_of = a, cand
    else:
        log_memory_estimate("coreset_select: float32 copy of the candidates", cand.size * 4 * pool.shape[1])
        X = np.empty((cand.size, pool.shape[1]), np.float32)
        for s, e in _split(cand.size, rows):
            X[s:e] = _gather(pool, cand[s:e], torch.device("cpu")).numpy()
        if metric == "cosine":
            X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        rows_of = np.arange(cand.size, dtype=np.int64)
    mind = np.full(cand.size, np.inf, np.float32)
    first = -1
    if centres_idx.size:
        cs = _gather(pool, np.sort(centres_idx), torch.device("cpu"))
        if metric == "cosine":
            cs = cs / cs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        step, trows = _init_tiles(cs.shape[0], rows, budget_b)
        log_memory_estimate("coreset_select: distances to the initial centres", trows * step * 4 * 3)
        for s, e in _split(cand.size, trows):
            f = torch.from_numpy(np.ascontiguousarray(X[rows_of[s:e]]))
            best = torch.full((e - s,), float("inf"))
            arg = torch.zeros(e - s, dtype=torch.int64)
            for lo in range(0, cs.shape[0], step):
                dm, da = _L2Space.cross_min(f, cs[lo:lo + step])
                better = dm < best
                best = torch.where(better, dm, best)
                arg = torch.where(better, da + lo, arg)
            mind[s:e] = (f - cs[arg]).norm(dim=1).numpy()
    else:
        first = int(rng.integers(cand.size))
    picks = np.empty(budget, np.int64)
    got = _lazy_kcenter(X, rows_of, mind, budget, first, picks)
    assert got == budget
    if progress is not None:
        progress(budget)
    return cand[picks]


# ----------------------------------------------------------------------------- BADGE

def badge_select(embeddings, outputs, budget, *, exclude=None, from_logits=True, device="auto", seed=0,
                 budget_bytes=None, partitions=1, kernel="auto", progress=None) -> np.ndarray:
    """BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings g_i = (p_i - e_i) (x) h_i.

    embeddings: float [N, d] penultimate-layer features h. outputs: [N, C] logits (from_logits=True)
      or probabilities p; e_i = onehot(argmax p_i). g (N x C*d) is never materialized: distances
      use <g_i, g_j> = <u_i, u_j><h_i, h_j>, u = p - e, in a cancellation-free form.
    budget: int >= 0. exclude: unique int indices (the labeled set) never returned; as in BADGE the
      seeding runs over the unlabeled points only (labeled points are not centres).
    First pick: the point with the largest ||g|| (BADGE's choice); then each pick is drawn with
      probability proportional to its squared distance to the nearest pick (D^2 sampling, seeded:
      u = rng.random() inverted through the cumulative weights in pool order).
    kernel: "auto" (numba on the CPU, torch on a GPU); "torch": the block-wise traversal, D^2 draw
      u = rng.random() inverted through the cumulative weights in pool order (reproducible against
      a reference given the same generator); "numba": exact D^2 sampling by rejection from stale
      distance bounds kept in a sum-tree (same distribution, different random stream), which
      re-measures only the points it draws: holds u [N, C] and h [N, d] as float32 in memory.
    partitions: m > 1 runs `partitioned` (budget/m in each of m random parts); each pick costs O(N)
      (the D^2 draw) plus the distance updates, so at N = 1M and budget 1e4-1e5 on a CPU use it.
    Returns int64 [min(budget, eligible)] pool indices in pick order.
    """
    emb = Pool(embeddings, name="embeddings")
    out = Pool(outputs, name="outputs")
    check_ndim("embeddings", emb.shape, 2)
    check_ndim("outputs", out.shape, 2)
    check_nonempty("embeddings", emb.n)
    check_length("outputs", out.n, emb.n, "embeddings")
    budget = check_int("budget", budget, min=0)
    from_logits = _check_bool("from_logits", from_logits)
    partitions, rng, dev = _check_run_options(partitions, kernel, progress, seed, device)
    excl, elig = _eligible(emb.n, exclude)
    if partitions > 1:
        def one(idx, b, *, seed, exclude):
            return _badge(emb, out, idx, b, from_logits, dev, budget_bytes, seed, progress, kernel)
        return partitioned(one, emb.n, budget, partitions, seed=rng, exclude=excl)
    return _badge(emb, out, elig, budget, from_logits, dev, budget_bytes, rng, progress, kernel)


def _badge(emb, out, cand, budget, from_logits, dev, budget_b, rng, progress, kernel="auto"):
    budget = min(budget, cand.size)
    if budget == 0:
        return np.zeros(0, np.int64)
    fbytes = 4 * (emb.shape[1] + out.shape[1])
    if kernel == "auto":
        kernel = "numba" if dev.type == "cpu" and _numba is not None else "torch"
    # the numba kernel works on the factors (u, h) of the candidates held in memory as float32
    resident = kernel == "numba" or _resident(cand.size * fbytes, budget_b)
    space = _BadgeSpace(emb, out, cand, dev, from_logits, resident)
    rows = rows_per_block(fbytes * 4, budget_b)
    log_memory_estimate("badge_select", cand.size * 25 + (cand.size * fbytes if space.x is not None else 0)
                        + rows * fbytes * 4)
    # first centre: the largest gradient-embedding norm (ties: lowest pool index)
    best, first = -1.0, 0
    for s, e in _split(cand.size, rows):
        nrm = _BadgeSpace.norms(space.feats(torch.arange(s, e, device=dev)))
        i = int(torch.argmax(nrm))
        if float(nrm[i]) > best:
            best, first = float(nrm[i]), s + i
    if kernel == "numba":
        picks = np.empty(budget, np.int64)
        U, H = (t.numpy() for t in space.x)
        got = _lazy_badge(np.ascontiguousarray(U), np.ascontiguousarray(H), first, budget,
                          int(rng.integers(2**31 - 1)), picks)
        assert got == budget
        if progress is not None:
            progress(budget)
        return cand[picks]
    pos = _traverse(space, cand.size, budget, mode="d2", rng=rng, device=dev, rows=rows, first=first,
                    progress=progress)
    return cand[pos]


# ----------------------------------------------------------------------------- partitioning

def partitioned(select_fn, n, budget, m, *, seed=0, exclude=None, **kw) -> np.ndarray:
    """Split [0, n) at random into m near-equal parts and select budget/m in each (the paper's
    appendix recipe for CoreSet and BADGE at Open Images scale).

    select_fn(part_indices, part_budget, *, seed, exclude, **kw) -> pool indices (a subset of
      part_indices): part_indices are the part's eligible pool indices (ascending int64),
      exclude the part's excluded pool indices, seed a numpy Generator derived from `seed`.
    Budget shares are proportional to the parts' eligible counts (largest remainder), never more
    than a part holds. Needed when one traversal over the whole pool, O(N * budget * d), is too
    slow: m parts cost O(N * budget * d / m). Diversity is then enforced only inside each part.
    Returns int64 pool indices, part after part.
    """
    n = check_int("n", n, min=1)
    budget = check_int("budget", budget, min=0)
    m = check_int("m", m, min=1)
    if not callable(select_fn):
        raise TypeError(f"select_fn: expected a callable, got {type(select_fn).__name__}")
    rng = as_generator(seed)
    excl, elig = _eligible(n, exclude)
    is_excl = np.zeros(n, np.bool_)
    is_excl[excl] = True
    part_of = np.empty(n, np.int64)
    part_of[rng.permutation(n)] = np.arange(n) % m
    parts = [np.flatnonzero(part_of == j) for j in range(m)]
    counts = np.array([int((~is_excl[p]).sum()) for p in parts])
    total = min(budget, int(counts.sum()))
    share = np.zeros(m, np.int64)
    if counts.sum():
        exact = total * counts / counts.sum()
        share = np.floor(exact).astype(np.int64)
        rem = total - int(share.sum())
        if rem:
            share[np.argsort(-(exact - share), kind="stable")[:rem]] += 1
        share = np.minimum(share, counts)
    seeds = rng.integers(0, 2**63 - 1, size=m)
    out = []
    for j, p in enumerate(parts):
        if share[j] == 0:
            continue
        got = select_fn(p[~is_excl[p]], int(share[j]), seed=np.random.default_rng(int(seeds[j])),
                        exclude=p[is_excl[p]], **kw)
        out.append(np.asarray(got, dtype=np.int64))
    res = np.concatenate(out) if out else np.zeros(0, np.int64)
    log.info("partitioned: %d parts, %d picked", m, res.size)
    return res
