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

BADGE's CPU kernel (`_badge_d2_cpu`) keeps the same running minima but refreshes them in batches
of picks with GEMMs, drawing the picks in between by exact rejection from the stale minima.

When even that is too slow (the first picks of a traversal touch the whole pool, so the cost is
at least O(N * d) per pick until the groups get small; BADGE does O(N * (C + d)) arithmetic per
pick), use `partitions=m` (or `partitioned`): m times less arithmetic, at the price of diversity only inside
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



# ----------------------------------------------------------------------------- CPU kernel: BADGE D^2 sampling
#
# Plain k-means++ seeding costs O(N (C + d)) memory traffic per pick (all of U [N, C] and H [N, d]
# read to update the running minimum): at N = 1M, C = 100, d = 128 that is ~0.9 GB per pick, hours
# for 10K picks on a CPU. The kernel below keeps the same running minima but updates them in
# batches: between two refreshes it draws picks by exact rejection sampling from the (stale, upper
# bound) minima, and a refresh brings the minima up to date against all picks made since, as two
# GEMMs (U @ Uc.T, H @ Hc.T) over the rows that hold most of the D^2 mass. The arithmetic is that of
# the plain traversal (at most), done at GEMM speed and reading the pool once per batch of picks.

# Share of the D^2 mass a refresh may leave stale (the smallest bounds, skipped by powers of two):
# stale bounds cost only rejections, each re-measuring one point.
_D2_SKIP_MASS = 0.1
# The most picks drawn between two refreshes (the batch grows while trials are mostly accepted).
_D2_MAX_BATCH = 512


def _d2_pair_py(U, H, un, hn, p, c):
    """Squared distance of gradient embeddings p and c, cancellation-free (see _BadgeSpace)."""
    a = 0.0
    b = 0.0
    x = 0.0
    y = 0.0
    for k in range(U.shape[1]):
        du = U[p, k] - U[c, k]
        a += du * du
        x += du * U[c, k]
    for k in range(H.shape[1]):
        dh = H[p, k] - H[c, k]
        b += dh * dh
        y += H[p, k] * dh
    v = a * hn[p] + un[c] * b + 2.0 * x * y
    return v if v > 0.0 else 0.0


def _tree_set_py(tree, S, p, v):
    i = S + p
    tree[i] = v
    i //= 2
    while i >= 1:
        tree[i] = tree[2 * i] + tree[2 * i + 1]
        i //= 2


def _tree_build_py(tree, S):
    for i in range(S - 1, 0, -1):
        tree[i] = tree[2 * i] + tree[2 * i + 1]


def _d2_draws_py(U, H, un, hn, tree, S, last, picked, picks, t, t_stop, max_rej, us, ui):
    """Picks t, t+1, ... (< t_stop) by exact D^2 sampling from stale bounds in a sum-tree.

    tree[S + p] = w[p], p's squared distance to its nearest pick among picks[:last[p]]: an upper
    bound of the true D^2 weight, exact when last[p] == t. A trial descends the tree with
    us[ui] * sum(w) (so it draws p with probability w[p] / sum(w)); a stale p is re-measured
    against picks[last[p]:t] and accepted with probability w_true / w_old (the next uniform), the
    tree updated either way; a fresh p is accepted. Every trial accepts p with probability
    w_true[p] / sum(w), so the accepted pick follows the exact D^2 law; with every bound fresh
    this is inversion of u through the cumulative weights in position order, one uniform a pick.
    When every weight is 0 (only duplicates of picks left) the pick is uniform among the unpicked:
    the floor(u * (m - t))-th in position order.
    Stops at t_stop, after max_rej rejections, or when fewer than 2 uniforms are left.
    Returns (t, ui, trials, rejections).
    """
    m = U.shape[0]
    trials = 0
    rej = 0
    nu = us.shape[0]
    while t < t_stop and rej < max_rej and ui + 2 <= nu:
        total = tree[1]
        if not (total > 0.0):
            r = int(us[ui] * (m - t))
            ui += 1
            if r >= m - t:
                r = m - t - 1
            p = -1
            for q in range(m):
                if not picked[q]:
                    if r == 0:
                        p = q
                        break
                    r -= 1
        else:
            trials += 1
            x = us[ui] * total
            ui += 1
            i = 1
            while i < S:
                left = tree[2 * i]
                if x < left:
                    i = 2 * i
                else:
                    x -= left
                    i = 2 * i + 1
            p = i - S
            if p >= m or picked[p] or tree[i] <= 0.0:
                continue  # a float edge of the descent: draw again
            if last[p] < t:
                old = tree[i]
                best = old
                for j in range(last[p], t):
                    v = _d2_pair(U, H, un, hn, p, picks[j])
                    if v < best:
                        best = v
                last[p] = t
                _tree_set(tree, S, p, best)
                acc = us[ui] * old < best
                ui += 1
                if not acc:
                    rej += 1
                    continue
        picks[t] = p
        t += 1
        picked[p] = True
        _tree_set(tree, S, p, 0.0)
    return t, ui, trials, rej


def _mass_floor_py(tree, S, m, skip):
    """The largest power of two tau such that the positive leaves below tau hold at most `skip`
    of the total mass (0.0 when skip is 0 or nothing is positive)."""
    hist = np.zeros(2200, np.float64)
    total = 0.0
    for p in range(m):
        w = tree[S + p]
        if w > 0.0:
            hist[math.frexp(w)[1] + 1100] += w  # w in [2^(e-1), 2^e)
            total += w
    if not (total > 0.0) or skip <= 0.0:
        return 0.0
    acc = 0.0
    for b in range(2200):
        if acc + hist[b] > skip * total:
            return math.ldexp(1.0, b - 1101)
        acc += hist[b]
    return 0.0


def _refresh_rows_py(tree, S, m, last, since, tau):
    """Positions p with a bound w[p] > 0 and >= tau: (A: exact as of >= `since` picks,
    B: older), each ascending."""
    na = 0
    for p in range(m):
        w = tree[S + p]
        if w > 0.0 and w >= tau and last[p] >= since:
            na += 1
    nb = 0
    for p in range(m):
        w = tree[S + p]
        if w > 0.0 and w >= tau and last[p] < since:
            nb += 1
    A = np.empty(na, np.int64)
    B = np.empty(nb, np.int64)
    na = 0
    nb = 0
    for p in range(m):
        w = tree[S + p]
        if w > 0.0 and w >= tau:
            if last[p] >= since:
                A[na] = p
                na += 1
            else:
                B[nb] = p
                nb += 1
    return A, B


if _numba is not None:
    _jit = _numba.njit(cache=True, nogil=True)
    # fastmath lets the four dot-product reductions vectorize (re-association only)
    _d2_pair = _numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "arcp", "contract"})(_d2_pair_py)
    _tree_set = _jit(_tree_set_py)
    _tree_build = _jit(_tree_build_py)
    _d2_draws = _jit(_d2_draws_py)
    _mass_floor = _jit(_mass_floor_py)
    _refresh_rows = _jit(_refresh_rows_py)
else:  # pragma: no cover
    _d2_pair, _tree_set, _tree_build = _d2_pair_py, _tree_set_py, _tree_build_py
    _d2_draws, _mass_floor, _refresh_rows = _d2_draws_py, _mass_floor_py, _refresh_rows_py


def _gather_rows_py(X, idx, out):
    """out[r] = X[idx[r]] (torch's index_select is several times slower on the CPU)."""
    for r in range(idx.shape[0]):
        out[r, :] = X[idx[r], :]


def _d2_merge_py(A, B, ridx, gn, hn, Ub, Hb, cpos, U, H, un, w):
    """Fold one tile of GEMM products into the bounds: for row r (position p = ridx[r]),
    v = min_j ||g_p||^2 + ||g_j||^2 - 2 A[r, j] B[r, j] ranks the centres cpos (A = <u_p, u_j>,
    B = <h_p, h_j>); when v may improve on w[p] (within the float32 cancellation of that form) the
    winner's distance is recomputed cancellation-free from the rows Ub[r], Hb[r] and
    w[p] = min(w[p], it). Returns the number of improved rows."""
    k = cpos.shape[0]
    C = Ub.shape[1]
    d = Hb.shape[1]
    gc = np.empty(k, np.float32)
    for j in range(k):
        gc[j] = gn[cpos[j]]
    gcmax = gc.max()
    buf = np.empty(k, np.float32)
    hits = 0
    for r in range(ridx.shape[0]):
        p = ridx[r]
        # values in a buffer, then min over it (both loops vectorize), then the first index of it
        for j in range(k):
            buf[j] = gc[j] - np.float32(2.0) * A[r, j] * B[r, j]
        best = buf.min()
        g = gn[p]
        # the GEMM form only ranks: its float32 error is ~1e-6 of ||g_p||^2 + ||g_c||^2
        if best + g > w[p] + 1e-5 * (g + gcmax):
            continue
        jb = 0
        for j in range(k):
            if buf[j] == best:
                jb = j
                break
        c = cpos[jb]
        a = 0.0
        b = 0.0
        x = 0.0
        y = 0.0
        for q in range(C):
            du = Ub[r, q] - U[c, q]
            a += du * du
            x += du * U[c, q]
        for q in range(d):
            dh = Hb[r, q] - H[c, q]
            b += dh * dh
            y += Hb[r, q] * dh
        v2 = a * hn[p] + un[c] * b + 2.0 * x * y
        if v2 < 0.0:
            v2 = 0.0
        if v2 < w[p]:
            w[p] = v2
            hits += 1
    return hits


if _numba is not None:
    _gather_rows = _jit(_gather_rows_py)
    _d2_merge = _jit(_d2_merge_py)
else:  # pragma: no cover
    _gather_rows, _d2_merge = _gather_rows_py, _d2_merge_py


def _d2_refresh(U, H, un, hn, gn, rows_idx, cpos, w, budget_b):
    """w[p] = min(w[p], min_c ||g_p - g_c||^2) for positions rows_idx against centres cpos.

    Two GEMMs per tile of rows (<g_p, g_c> = <u_p, u_c><h_p, h_c>, g never materialized) rank the
    centres; _d2_merge keeps the winner's exact distance. U [m, C], H [m, d]: float32 CPU tensors;
    un, hn, gn: float32 numpy [m] (||u||^2, ||h||^2, ||g||^2); w: float64 numpy [m], updated.
    Tiles: [rows, k] float32 products sized for the cache (a few MiB), within the byte budget.
    """
    k = int(cpos.size)
    C, d = U.shape[1], H.shape[1]
    rows = int(min(max(64, (4 << 20) // (8 * k)), rows_per_block(4 * (2 * k + C + d), budget_b), 1 << 16))
    rows = max(1, min(rows, rows_idx.size))
    ci = torch.from_numpy(np.ascontiguousarray(cpos, dtype=np.int64))
    UcT, HcT = U[ci].T.contiguous(), H[ci].T.contiguous()
    Ub, Hb = torch.empty((rows, C)), torch.empty((rows, d))
    Ab, Bb = torch.empty((rows, k)), torch.empty((rows, k))
    Un, Hn = U.numpy(), H.numpy()
    cpos = np.ascontiguousarray(cpos, dtype=np.int64)
    hits = 0
    for s, e in _split(rows_idx.size, rows):
        r = e - s
        ridx = rows_idx[s:e]
        _gather_rows(Un, ridx, Ub.numpy())
        _gather_rows(Hn, ridx, Hb.numpy())
        torch.mm(Ub[:r], UcT, out=Ab[:r])
        torch.mm(Hb[:r], HcT, out=Bb[:r])
        hits += _d2_merge(Ab.numpy(), Bb.numpy(), ridx, gn, hn, Ub.numpy(), Hb.numpy(), cpos, Un, Hn, un, w)
    return hits


def _badge_d2_cpu(U, H, first, budget, rng, budget_b, progress=None, *, skip_mass=_D2_SKIP_MASS,
                  max_batch=_D2_MAX_BATCH, stats=None):
    """BADGE's k-means++ seeding on the CPU: `budget` positions of the rows of (U, H), first = `first`.

    U [m, C], H [m, d]: float32 CPU tensors (the factors of g = u (x) h). rng: numpy Generator,
    one uniform per fresh trial, two per stale one (see _d2_draws). Batches of picks are drawn by
    rejection from the running minima, which are then refreshed by GEMMs (_d2_refresh) on the
    rows holding all but `skip_mass` of the D^2 mass; the batch doubles while >= 80% of trials are
    accepted and halves below 50%, up to `max_batch`. With skip_mass=0 and max_batch=1 every pick
    is drawn from exact minima: the plain algorithm, with the torch traversal's random stream.
    stats: optional dict, filled with refreshes, trials, rejections and refreshed rows.
    """
    m, C = U.shape
    d = H.shape[1]
    un, hn = (U * U).sum(1), (H * H).sum(1)
    gn = (un * hn).numpy()
    un, hn = un.numpy(), hn.numpy()
    un64, hn64 = un.astype(np.float64), hn.astype(np.float64)
    Un, Hn = U.numpy(), H.numpy()
    S = 1
    while S < m:
        S *= 2
    tree = np.zeros(2 * S, np.float64)
    w = tree[S:S + m]
    w[:] = np.inf
    last = np.zeros(m, np.int64)
    picked = np.zeros(m, np.bool_)
    picks = np.empty(budget, np.int64)
    picks[0], picked[first], w[first] = first, True, 0.0
    t, since, batch = 1, 0, 1
    us, ui = np.zeros(0), 0
    st = {"refreshes": 0, "trials": 0, "rejections": 0, "refreshed_rows": 0, "stale_rows": 0,
          "pair_products": 0, "stale_pairs": 0, "hits": 0}
    while True:
        if t > since:  # bring the bounds up to date against picks[since:t]
            tau = _mass_floor(tree, S, m, skip_mass) if since else 0.0
            A, B = _refresh_rows(tree, S, m, last, since, tau)
            if A.size:
                st["hits"] += _d2_refresh(U, H, un, hn, gn, A, picks[since:t], w, budget_b)
                st["pair_products"] += A.size * (t - since)
            if B.size:  # rows skipped by earlier refreshes: grouped by staleness
                B = B[np.argsort(last[B], kind="stable")]
                lb = last[B]
                # groups of equal staleness (mostly the picks of one refresh), small ones merged
                cuts = [0] + [int(i) for i in np.flatnonzero(np.diff(lb)) + 1] + [B.size]
                s = 0
                for e in cuts[1:]:
                    if e - s >= 256 or e == B.size:
                        _d2_refresh(U, H, un, hn, gn, B[s:e], picks[lb[s]:t], w, budget_b)
                        st["pair_products"] += (e - s) * (t - lb[s])
                        st["stale_pairs"] += (e - s) * (t - lb[s])
                        s = e
                st["stale_rows"] += B.size
            last[A] = t
            last[B] = t
            _tree_build(tree, S)
            since = t
            st["refreshes"] += 1
            st["refreshed_rows"] += A.size + B.size
        if t >= budget:
            break
        need = 4 * batch + 16  # a trial takes at most 2; at most batch picks + max(4, batch) rejections
        if us.size - ui < need:
            us, ui = np.concatenate([us[ui:], rng.random(max(need, 1024))]), 0
        t0 = t
        t, ui, trials, rej = _d2_draws(Un, Hn, un64, hn64, tree, S, last, picked, picks, t,
                                       min(budget, t + batch), max(4, batch), us, ui)
        st["trials"] += trials
        st["rejections"] += rej
        if progress is not None and t > t0:
            progress(t - t0)
        if trials and (t - t0) >= 0.8 * trials:
            batch = min(max_batch, 2 * batch)
        elif trials and (t - t0) < 0.5 * trials:
            batch = max(1, batch // 2)
    if stats is not None:
        stats.update(st)
    return picks


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
      too slow (CPU, N * budget >~ 1e10): measured on a shared 2-core CPU at N = 1M, d = 128,
      budget 10K, 210 s whole and 20 s with m = 10 (benchmarks/results/baselines_n1000000.json).
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
      a reference given the same generator); "numba" (CPU, `_badge_d2_cpu`): the same running
      minima, refreshed in batches of picks by GEMMs (<g_i, g_c> = <u_i, u_c><h_i, h_c>) instead of
      one O(N (C + d)) pass per pick, the picks between refreshes drawn by exact rejection from the
      stale minima (upper bounds) in a sum-tree: the same D^2 law, a different random stream. Holds
      u [N, C] and h [N, d] as float32 in memory.
    partitions: m > 1 runs `partitioned` (budget/m in each of m random parts). The arithmetic is
      O(N * budget * (C + d)) (at most; 0.6-0.7 of it measured on the synthetic pools) and m parts
      divide it by m. Measured on a shared 2-core CPU, one torch thread, N = 1M, d = 128,
      C = 100, budget 10K: 76 s whole, 20 s with m = 10 (CoreSet: 210 s and 20 s;
      benchmarks/results/baselines_n1000000.json). Not needed up to N * budget ~ 1e10; beyond, time grows with
      N * budget (extrapolated: ~13 min at 1e11 on that CPU), so use m ~ N * budget / 1e10.
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
        U, H = (x.contiguous() for x in space.x)
        picks = _badge_d2_cpu(U, H, first, budget, rng, budget_b, progress)
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
