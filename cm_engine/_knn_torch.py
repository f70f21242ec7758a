"""torch kernels of `knn.knn_graph`: tiled exact search and the GEMM-shaped approximate self-join.

Private: arguments are validated by `knn_graph`. One code path for CPU and CUDA; only the
device of the tensors differs. Every result's distances are recomputed in float32 from the
rows themselves (so float16/bfloat16 matrix products only rank candidates).
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from ._device import log_memory_estimate, rows_per_block
from ._knn_kernels import merge_sorted, top_largest, top_update
from .knn import _prep, exact_distances, faiss_metric, finish_rows, finish_rows_np, gather_rows

log = logging.getLogger("cm_engine")

#: Extra candidates kept per row when ranking in reduced precision, re-ranked in float32.
_REDUCED_PAD = 8


def _compute_dtype(name, dev: torch.device, pool) -> torch.dtype:
    """float32 on the CPU (half matmuls are slow there); on CUDA the pool's own half dtype."""
    if name is not None:
        return getattr(torch, name)
    if dev.type == "cuda":
        if pool.dtype in (np.float16, torch.float16):
            return torch.float16
        if pool.dtype in ("bfloat16", torch.bfloat16):
            return torch.bfloat16
    return torch.float32


def _work_bytes(budget: int, dev: torch.device) -> int:
    """Working memory for tiles: the budget; on CUDA at least 30% of the free device memory
    (the host budget is about host RAM; a GPU is wasted on 256 MiB tiles)."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return max(budget, int(free * 0.3))
    return budget


def _key(S: torch.Tensor, metric: str, dn: torch.Tensor | None) -> torch.Tensor:
    """Ranking key from similarities (smaller is nearer): -cos, or |b|^2 - 2ab for l2."""
    S = S.float()
    return S.neg_() if metric == "cosine" else S.mul_(-2.0).add_(dn)


def exact_knn(pool, *, k, metric, dev, budget, out, progress, compute_dtype=None, query_rows=None):
    """Tiled brute force: database chunks resident on the device, query blocks x tiles,
    top-k per tile, merged into a running top-k per query; distances recomputed in float32.
    `query_rows` (sorted int64) restricts the queries to those rows (out has one row per query)."""
    n, d = pool.shape
    nq = n if query_rows is None else len(query_rows)

    def queries(qs, qe):
        if query_rows is None:
            return np.arange(qs, qe), _prep(pool.block(qs, qe, device=dev), metric)
        r = query_rows[qs:qe]
        return r, _prep(gather_rows(pool, r, device=dev), metric)
    cdt = _compute_dtype(compute_dtype, dev, pool)
    es = torch.empty((), dtype=cdt).element_size()
    kc = min(n, k + 1 + (0 if cdt == torch.float32 else _REDUCED_PAD))
    work = _work_bytes(budget, dev)
    chunk = min(n, max(kc, (work // 2) // (d * (es + 4))))
    tile = min(chunk, 65536 if dev.type == "cuda" else 16384)
    bq = rows_per_block(tile * 12 + d * 8, work // 4, maximum=nq)
    nchunks = math.ceil(n / chunk)
    log_memory_estimate("knn_graph torch exact", chunk * d * (es + 4) + bq * tile * 12)
    acc = None
    if nchunks > 1:
        acc = (torch.full((nq, kc), math.inf, device=dev), torch.full((nq, kc), -1, dtype=torch.int64, device=dev))
    for cs in range(0, n, chunk):
        ce = min(n, cs + chunk)
        dbf = _prep(pool.block(cs, ce, device=dev), metric)
        db = dbf.to(cdt)
        dn = dbf.pow(2).sum(1) if metric == "l2" else None
        if nchunks > 1:
            del dbf  # the float32 copy is only kept when it serves the final recomputation
        for qs in range(0, nq, bq):
            qe = min(nq, qs + bq)
            rows, qf = queries(qs, qe)
            q = qf.to(cdt)
            vals, idxs = [], []
            if acc is not None:
                vals.append(acc[0][qs:qe])
                idxs.append(acc[1][qs:qe])
            for ts in range(0, ce - cs, tile):
                te = min(ce - cs, ts + tile)
                key = _key(q @ db[ts:te].T, metric, None if dn is None else dn[ts:te])
                v, i = key.topk(min(kc, te - ts), dim=1, largest=False, sorted=False)
                vals.append(v)
                idxs.append(i + (cs + ts))
            v, i = torch.cat(vals, 1), torch.cat(idxs, 1)
            if v.shape[1] > kc:
                v, sel = v.topk(kc, dim=1, largest=False, sorted=False)
                i = i.gather(1, sel)
            if acc is not None:
                acc[0][qs:qe], acc[1][qs:qe] = v, i
            else:
                cand = dbf[i] if cdt == torch.float32 else _prep(gather_rows(pool, i.cpu().numpy(), device=dev), metric).reshape(*i.shape, d)
                _write(out, rows, i, exact_distances(qf, cand, metric), k, progress, pos=slice(qs, qe))
    if acc is not None:
        for qs in range(0, nq, bq):
            qe = min(nq, qs + bq)
            rows, qf = queries(qs, qe)
            i = acc[1][qs:qe]
            cand = _prep(gather_rows(pool, i.cpu().numpy(), device=dev), metric).reshape(*i.shape, d)
            _write(out, rows, i, exact_distances(qf, cand, metric), k, progress, pos=slice(qs, qe))
    return {"compute_dtype": str(cdt).replace("torch.", ""), "db_chunk_rows": chunk, "query_block_rows": bq}


def _merge_into(out, rows: np.ndarray, ii: np.ndarray, dd: np.ndarray, k: int) -> None:
    """Merge candidates ii/dd [m, c] (never the row itself, never already listed; -1 = none) into
    the finished rows `rows` of out, keeping each row's k nearest, ties by index (`merge_sorted`)."""
    oi, od = np.asarray(out[0]), np.asarray(out[1])  # plain views: numba takes no np.memmap
    if oi.shape[1] != k:
        raise ValueError(f"out: expected {k} columns, got {oi.shape[1]}")
    merge_sorted(oi, od, np.asarray(rows, np.int64), ii.astype(oi.dtype, copy=False),
                 dd.astype(np.float32, copy=False))


def _write(out, rows: np.ndarray, i: torch.Tensor, dist: torch.Tensor, k: int, progress, pos=None) -> None:
    """Finish query rows `rows` (pool indices) and store them at `pos` (default: at `rows`)."""
    ii, dd = finish_rows(rows, i, dist, k)
    if pos is not None:
        out[0][pos] = ii
        out[1][pos] = dd
    elif rows.size and rows[-1] - rows[0] + 1 == rows.size:
        out[0][rows[0]:rows[-1] + 1] = ii
        out[1][rows[0]:rows[-1] + 1] = dd
    else:
        out[0][rows] = ii
        out[1][rows] = dd
    if progress is not None:
        progress(int(rows.size))


# ----------------------------------------------------------------------------- approximate

def _nearest_centroid(x: torch.Tensor, C: torch.Tensor, metric: str, cn: torch.Tensor | None, work: int,
                      p: int = 1):
    """Index of the nearest centroid of each row ([m] int64), or of the p nearest ([m, p], nearest first)."""
    out = torch.empty((x.shape[0], p), dtype=torch.int64, device=x.device)
    rows = rows_per_block(C.shape[0] * 8, work // 4, maximum=max(1, x.shape[0]))
    for s in range(0, x.shape[0], rows):
        S = x[s:s + rows] @ C.T
        key = S.neg_() if metric == "cosine" else S.mul_(-2.0).add_(cn)
        out[s:s + rows] = key.argmin(1, keepdim=True) if p == 1 else key.topk(p, dim=1, largest=False).indices
    return out[:, 0] if p == 1 else out


def kmeans(X: torch.Tensor, nlist: int, *, niter: int, seed: int, metric: str, work: int) -> torch.Tensor:
    """Lloyd's k-means on the device (spherical for cosine). Centroid sums are float64 segment
    sums over the rows sorted by cell: deterministic, unlike atomic adds. (They were prefix-sum
    differences: a cumsum along dim 0 runs on a GPU as one sequential scan per column, and the
    coarse k-means of a 10M-row graph took 6.3 s on an H100.)"""
    n = X.shape[0]
    g = torch.Generator().manual_seed(seed)
    C = X[torch.randperm(n, generator=g)[:nlist].to(X.device)].clone()
    for _ in range(niter):
        cn = C.pow(2).sum(1) if metric == "l2" else None
        a = _nearest_centroid(X, C, metric, cn, work)
        order = torch.argsort(a, stable=True)
        counts = torch.bincount(a, minlength=nlist)
        sums = torch.segment_reduce(X[order].double(), "sum", lengths=counts, axis=0)
        newC = (sums / counts.clamp(min=1)[:, None]).float()
        empty = counts == 0
        if bool(empty.any()):  # re-seed empty cells with random sample rows
            pick = torch.randint(0, n, (int(empty.sum()),), generator=g).to(X.device)
            newC[empty] = X[pick]
        C = torch.nn.functional.normalize(newC, dim=1, eps=1e-30) if metric == "cosine" else newC
    return C


def _cell_probes(req: np.ndarray, c: int, counts: np.ndarray, cap: int) -> np.ndarray:
    """The cells searched for cell c: the non-empty cells its points ask for (each point's nprobe
    nearest centroids, req [m, nprobe]), most-asked first (ties: lower cell id), at most `cap`;
    cell c itself always first. counts [nlist]: cell sizes. The batched join's `probe_table`
    makes the same choice for every cell at once."""
    cnt = np.bincount(req.ravel(), minlength=counts.size)
    cnt[counts == 0] = 0  # an empty cell holds nothing to search: it takes no slot of the cap
    cnt[c] = np.iinfo(cnt.dtype).max
    asked = np.flatnonzero(cnt)
    order = np.lexsort((asked, -cnt[asked]))  # by count descending, then cell id
    return asked[order[:cap]]


def cell_cap(nlist: int, max_cell_probes: int | None, nprobe: int) -> int:
    """Cells a cell's queries search as one matrix: `max_cell_probes`, default 2 * nprobe, at
    most nlist. One rule for the join and for the reach model that tunes it."""
    return min(nlist, max_cell_probes or 2 * nprobe)


def _grouped_reach(req: np.ndarray, inv: np.ndarray, counts: np.ndarray, off: np.ndarray, rows: np.ndarray,
                   nbrs: np.ndarray, p: int, cap: int) -> np.ndarray:
    """Per-row share of the true neighbours that the grouped search at nprobe p reaches.

    req [N, P >= p] int32: every row's nearest cells, rows in cell order (cell c holds positions
    off[c]:off[c + 1]); inv [N] int64: pool index -> cell-order position; counts [nlist] cell
    sizes; rows [m] pool indices of sample rows; nbrs [m, k] their exact neighbours (-1 missing).
    Row r of cell c is searched against `_cell_probes` of c at (p, cap) and, through the pass
    over the cut requests, against its own p cells; a neighbour is found iff its cell is among
    those (the search within searched cells is exact), so this is the sample's recall in the
    finished graph up to distance ties. Returns float64 [m].
    """
    pos = inv[rows]
    own = req[pos, 0].astype(np.int64)
    valid = nbrs >= 0
    nbc = req[inv[np.where(valid, nbrs, 0)], 0]  # each neighbour's cell
    got = np.zeros(rows.size)
    for c in np.unique(own):
        probes = _cell_probes(req[off[c]:off[c + 1], :p], int(c), counts, cap)
        for i in np.flatnonzero(own == c):
            searched = np.union1d(probes, req[pos[i], :p])
            got[i] = (np.isin(nbc[i], searched) & valid[i]).sum() / max(1, valid[i].sum())
    return got


def held_out_rows(n: int, sample: np.ndarray, m: int, seed: int) -> np.ndarray:
    """m seeded pool rows (sorted int64) outside `sample` (sorted k-means training rows) where
    the pool leaves m such rows, else m of all rows. Why held out: the centroids were fit to the
    sample, so its rows likely sit nearer their cells' centres than the rest of the pool; at
    10^7 x 64, tuning rows taken from the sample reached recall 0.975 and 0.959 where 1000 other
    rows reached 0.970 and 0.948 in the same two graphs (1.4 and 2.5 standard errors lower)."""
    rng = np.random.default_rng([seed, 0x2A])
    rest = n - sample.size
    if rest < m:
        return np.sort(rng.choice(n, size=min(n, m), replace=False))
    j = np.sort(rng.choice(rest, size=m, replace=False))  # ranks among the rows outside the sample
    # sample[i] - i rows outside the sample precede sample[i]: the j-th outside row skips every
    # sample row with at most j outside rows before it
    return j + np.searchsorted(sample - np.arange(sample.size), j, side="right")


def _tune_grouped(req: np.ndarray, inv: np.ndarray, counts: np.ndarray, off: np.ndarray, rows: np.ndarray,
                  nbrs: np.ndarray, *, p_hi: int, max_cell_probes, target: float) -> tuple[int, dict]:
    """The smallest nprobe, at most p_hi, whose grouped-search reach on the sample
    (`_grouped_reach`, less two standard errors) is at least `target`, and its info.

    p_hi comes from the per-query IVF estimate (`_tune_nprobe`), a lower bound of the grouped
    search's reach: a cell searches the cells its rows ask for most, so each row also sees the
    cells its neighbours asked for. At 10^7 x 64 the IVF estimate asked for nprobe 24 where the
    graph then reached recall 0.975 (stop 14); the join's cost grows with nprobe. The ranking
    needs every row's cells, so this runs after the assignment, on its table (no search)."""
    from .knn import mean_se, nprobe_ladder

    nlist = counts.size
    memo = {}

    def passes(p):
        memo[p] = mean_se(_grouped_reach(req, inv, counts, off, rows, nbrs, p, cell_cap(nlist, max_cell_probes, p)))
        return memo[p][0] - 2 * memo[p][1] >= target

    # The ladder's steps first, then every nprobe between the last that fails and the first that
    # passes (no search is run here, so the ladder's coarse steps need not be kept: at 1M x 64,
    # reach 0.949 at 4 and 0.967 at 6).
    chosen, below = p_hi, 0
    for p in [q for q in nprobe_ladder(nlist) if q <= p_hi]:
        if passes(p):
            chosen = p
            break
        below = p
    for p in range(below + 1, chosen):
        if passes(p):
            chosen = p
            break
    r, se = memo[chosen]
    return chosen, {"tune_recall": r, "tune_recall_se": se,
                    "reach_tried": {str(q): round(v[0], 4) for q, v in sorted(memo.items())}}


#: Largest k-means (training rows x cells x d multiply-adds per iteration) run on one worker
#: thread rather than FAISS's OpenMP team: at 50K (2e8) the team's barriers cost more than
#: the arithmetic on a busy host; at 1M (8e10) the team is needed.
_SERIAL_KMEANS_MACS = 2**30


def _one_thread() -> None:
    import faiss

    faiss.omp_set_num_threads(1)  # per calling thread in OpenMP: this worker's FAISS/BLAS calls only
    torch.set_num_threads(1)  # this thread's OpenMP and MKL; the caller holds torch's global at 1 meanwhile


class _Workers(ThreadPoolExecutor):
    """CPU threads that each run FAISS and torch single-threaded, for the grouped search's many
    small calls (FAISS and torch release the GIL). Create it through `single_thread_workers()`,
    which holds torch's threads at 1 while they run.

    Why not the libraries' OpenMP teams: a cell's search takes milliseconds, and between such
    calls FAISS's team and torch's pool spin or are descheduled; at 50K on 2 busy cores (load 6.8)
    the graph took 17.7 s with 2 OpenMP threads and 2.4 s with one. Independent cells on
    single-threaded workers need no barrier.
    """

    def __init__(self, n: int):
        super().__init__(max(1, n), thread_name_prefix="cm-knn", initializer=_one_thread)
        self.n = max(1, n)

    def split_rows(self, fn, x: np.ndarray) -> list:
        """fn over contiguous row slices of x, one per worker; results in row order."""
        b = np.linspace(0, x.shape[0], min(self.n, max(1, x.shape[0])) + 1).astype(np.int64)
        return list(self.map(lambda se: fn(x[se[0]:se[1]]), zip(b[:-1], b[1:])))

    def knn(self, xq: np.ndarray, xb: np.ndarray, k: int, metric) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of few queries xq [m, d] against many rows xb [M, d] (float32), in
        faiss.knn's convention (D: inner products descending for METRIC_INNER_PRODUCT, else
        squared L2 ascending; I int64; each row sorted): the database split over the workers,
        each part by torch matmul in tiles and a running fused top-k, the parts merged. faiss.knn
        ran ~3x slower on this shape (1000 queries x 131K rows x 64, one thread each: 5.7 s against
        1.8 s, same run, before the running top-k): its BLAS tiling suits many queries against few
        rows (the quantizer), not the reverse."""
        import faiss

        from .knn import _merge

        ip = metric == faiss.METRIC_INNER_PRODUCT
        q = torch.from_numpy(xq)
        m = xq.shape[0]
        # Tiles of ~2 MiB of scores, so that the selection reads them from L2; one running top-k
        # list per query across the tiles (`top_update`). A full top-k per 32 MiB tile, merged after
        # each, ran 2.3x slower (1000 queries x 200K x 64, one thread: 1.17 s against 0.52 s).
        tile = max(64, (2 << 20) // (4 * max(1, m)))
        ident = np.arange(m, dtype=np.int64)

        def part(se):
            s, e = se
            kk = min(k, int(e - s))
            vals = np.full((m, kk), -np.inf, np.float32)
            pos = np.full((m, kk), -1, np.int64)
            S = torch.empty((m, tile), dtype=torch.float32)
            for ts in range(s, e, tile):
                te = min(e, ts + tile)
                xt = torch.from_numpy(xb[ts:te])
                St = torch.mm(q, xt.T, out=S) if te - ts == tile else q @ xt.T
                if not ip:  # 2ab - |b|^2: larger is nearer
                    St.mul_(2.0).sub_(xt.pow(2).sum(1))
                top_update(St.numpy(), ident, ts, vals, pos)
            return np.negative(vals), pos  # key: -cos, or |b|^2 - 2ab (smaller is nearer)

        b = np.linspace(0, xb.shape[0], min(self.n, max(1, xb.shape[0] // max(1, k))) + 1).astype(np.int64)
        parts = list(self.map(part, zip(b[:-1], b[1:])))
        D, I = parts[0]
        for Dp, Ip in parts[1:]:
            D, I = _merge(D, I, Dp, Ip, k)
        if len(parts) == 1:  # _merge sorts; one part's lists are not
            o = np.argsort(D, axis=1, kind="stable")
            D, I = np.take_along_axis(D, o, 1), np.take_along_axis(I, o, 1)
        if ip:
            return -D, I
        return D + np.square(xq).sum(1, keepdims=True), I


@contextmanager
def single_thread_workers():
    """As many `_Workers` as torch has threads, with torch's process-wide thread count held at 1
    while they run (each worker is one thread) and restored afterwards."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _Workers(n_threads) as w:
            yield w
    finally:
        torch.set_num_threads(n_threads)


def grouped_nlist(n: int) -> int:
    """Cells of the grouped search: ~256 points each at any N. A cell's queries form one matrix
    product and small cells waste it (at 50K: 195 cells took 18.5 s at recall 0.992 where 894
    took 46.7 s at 0.985, same run); larger cells make each row scan more candidates, so the
    join's cost per row grows with the cell size (at 10M x 64 with 4 sqrt(N) = 12.6K cells of
    790 points: 24K candidates per row against 5K at 1M). Past `_TWO_LEVEL_CELLS` cells the
    centroids are trained and searched in two levels (`_Quantizer`) so that N / 256 cells
    cost O(N sqrt(nlist) d), not O(N nlist d)."""
    return max(1, n // 256)


#: Cells from which on centroids are trained and searched in two levels: one k-means over all
#: cells and an exhaustive assignment cost O(N nlist d), quadratic in N at a fixed cell size
#: (10M x 64 with 12.6K cells: k-means 190 s, assignment 280 s).
_TWO_LEVEL_CELLS = 4096
#: On the CPU, cells from which on the centroids are TRAINED in two levels (`_train_two_level`);
#: below `_TWO_LEVEL_CELLS` they are still searched flat (one matrix product per block: at 1M x 64
#: with 3.9K cells it beats the two-level table). One flat k-means of 3.9K cells took 24 s of a
#: 74 s 1M-point graph on 2 cores (O(ntrain nlist d) per iteration); two levels took 1 s. A GPU
#: keeps the flat k-means up to `_TWO_LEVEL_CELLS`: it is fast there, and the two-level training
#: is a Python loop over groups (not measured on a card at these sizes).
_TWO_LEVEL_TRAIN_CELLS = 1024
#: Coarse groups (of about sqrt(nlist)) whose fine cells each row's nearest cells are taken from.
_COARSE_PROBES = 8


def next_coarse_probes(p: int, groups: int) -> int:
    """The next number of coarse groups the tuning tries after p (of `groups`): +25%, at least +1.
    The assignment's cost is proportional to it, so doubling overshot by up to 2x: on the 3M x 64
    synthetic pool 10 groups reached the target where doubling took 16, and the assignment went
    from 35 to 23 s (the join's nprobe 9 -> 10; graph 120 -> 97 s, same machine, one run each)."""
    return min(groups, p + max(1, p // 4))


class _Quantizer:
    """The cells' centroids C [nlist, d] float32 (prepped) and their search: the p nearest cells
    of prepped rows. Flat: exhaustive, a torch matmul (on the CPU workers path with the fused
    top-p: `_flat_top`). Two-level: coarse centroids C1 [nc, d] group the cells (group g holds cells
    goff[g]:goff[g + 1]); a row's candidates are the cells of its `coarse_probes` nearest groups
    (from `_COARSE_PROBES`; the tuning may raise it), ranked exactly. Both two-level searches loop
    over groups, one matrix product each for the rows that probe it: on the CPU workers path
    each product's scores go straight into running top-p lists (`_two_level_fused`), elsewhere
    into a score table with one top-p per row (`_two_level`)."""

    def __init__(self, C: torch.Tensor, metric: str, *, work: int, C1: torch.Tensor | None = None,
                 goff: np.ndarray | None = None, workers: "_Workers | None" = None):
        self.C, self.metric, self.work, self.C1, self.goff, self.workers = C, metric, work, C1, goff, workers
        self.coarse_probes = _COARSE_PROBES  # groups searched per row (two-level); the tuning may raise it
        self.cn = C.pow(2).sum(1) if metric == "l2" else None
        self.c1n = C1.pow(2).sum(1) if (C1 is not None and metric == "l2") else None

    @property
    def nlist(self) -> int:
        return int(self.C.shape[0])

    def search(self, x: torch.Tensor, p: int, *, pad: bool = True) -> np.ndarray:
        """int64 [m, p] cell ids of the p nearest cells of each row of x [m, d], nearest first.
        Two-level search can reach fewer than p cells (its probed groups hold fewer): the missing
        entries repeat the row's nearest cell (pad=True), else are -1."""
        p = min(p, self.nlist)
        if self.workers is not None:  # CPU: rows split over the single-threaded workers
            out = np.concatenate(self.workers.split_rows(lambda r: self._search(torch.from_numpy(r), p),
                                                         np.ascontiguousarray(x.numpy())))
        else:
            out = self._search(x, p)
        return np.where(out < 0, out[:, :1], out) if pad else out

    def _search(self, x: torch.Tensor, p: int) -> np.ndarray:
        if self.C1 is None and self.workers is not None:
            return _flat_top(x, self.C, self.cn, p)
        if self.C1 is None:
            return _nearest_centroid(x, self.C, self.metric, self.cn, self.work, p=p).reshape(-1, p).cpu().numpy()
        out = np.empty((x.shape[0], p), np.int64)
        p1 = min(self.coarse_probes, self.C1.shape[0])
        if self.workers is not None and p <= _FUSED_TOP_MAX:  # the tuning's wide rankings take the table
            for s in range(0, x.shape[0], _FUSED_ROWS):
                out[s:s + _FUSED_ROWS] = self._two_level_fused(x[s:s + _FUSED_ROWS], p, p1)
            return out
        # rows per block: the score table [b, W] (W: about p1 groups of twice the mean size; rows
        # probe the larger groups more often) and its temporaries
        sizes = np.diff(self.goff)
        w = int(min(sizes.max(), 2 * sizes.mean() + 1))
        rows = rows_per_block(p1 * w * 12 + p * 24, self.work // 2, maximum=max(1, x.shape[0]))
        for s in range(0, x.shape[0], rows):
            out[s:s + rows] = self._two_level(x[s:s + rows], p, p1)
        return out

    def _nearest(self, x: torch.Tensor, C: torch.Tensor, cn: torch.Tensor | None, kk: int):
        """(keys [m, kk] ascending-better float32, positions in C [m, kk] int64) of the kk nearest
        rows of C: matmul + topk on the device."""
        return _key(x @ C.T, self.metric, cn).topk(kk, dim=1, largest=False)

    def _two_level_fused(self, x: torch.Tensor, p: int, p1: int) -> np.ndarray:
        """`_two_level` for one CPU worker thread: each group's product [rows that probe it, its
        cells] is merged into the rows' running top-p lists (`top_update`) while it is in cache,
        rather than laid into a table. A row's nearest group is merged first, in a pass of its own:
        its best scores then turn most later ones away at one compare each (the eviction scan is
        what costs). 3M x 64 synthetic pool, 11.7K cells in 108 groups, 20K rows, 16 groups
        probed, p = 15, one thread: 0.37 s against 0.82 s for FAISS's IndexIVFFlat over the groups
        (the previous CPU path) and about 1.9 s for the table, same cells bar 4 of 300K (ties)."""
        b = x.shape[0]
        S1 = x @ self.C1.T
        if self.c1n is not None:  # l2: 2ab - |c|^2, larger is nearer
            S1.mul_(2.0).sub_(self.c1n)
        v1, L = top_largest(S1.numpy(), p1)
        L = np.take_along_axis(L, np.lexsort((L, -v1), axis=1), 1)  # nearest group first
        vals = np.full((b, p), -np.inf, np.float32)
        pos = np.full((b, p), -1, np.int64)
        for part in (L[:, :1], L[:, 1:]):
            k1 = part.shape[1]
            if k1 == 0:
                continue
            flat = part.reshape(-1)  # pair q = row * k1 + rank of the group
            order = np.argsort(flat, kind="stable")
            counts = np.bincount(flat, minlength=self.C1.shape[0])
            ends = np.cumsum(counts)
            for g in np.flatnonzero(counts):
                c0, c1 = int(self.goff[g]), int(self.goff[g + 1])
                if c1 == c0:
                    continue
                rows = order[ends[g] - counts[g]:ends[g]] // k1
                S = x.index_select(0, torch.from_numpy(rows)) @ self.C[c0:c1].T
                if self.cn is not None:
                    S.mul_(2.0).sub_(self.cn[c0:c1])
                top_update(S.numpy(), rows, c0, vals, pos)
        # by score descending, then by cell; unfilled entries (-inf, -1) last
        return np.take_along_axis(pos, np.lexsort((pos, -vals), axis=1), 1)

    def _two_level(self, x: torch.Tensor, p: int, p1: int) -> np.ndarray:
        """Each row's p nearest cells among the cells of its p1 nearest groups: a row's probed
        groups' scores laid end to end in one row of a [b, W] table (W: the largest such sum in
        the block; +inf beyond a row's own), one matrix product per group, then ONE top-p per row.
        (Per-group top-p with FAISS, then a merge, was ~1.8x slower on the CPU: 20K rows x 16
        groups of 198 cells, d = 64, one thread: 2.34 s against 1.32 s; small top-k calls are
        dominated by their per-row overhead.)"""
        b = x.shape[0]
        dev = x.device
        L = self._nearest(x, self.C1, self.c1n, p1)[1].to(dev)  # [b, p1] nearest groups
        goff = torch.from_numpy(self.goff).to(dev)
        sz = (goff[1:] - goff[:-1])[L]  # [b, p1] cells of each probed group
        start = torch.cumsum(sz, 1) - sz  # where each probed group's scores start in its row
        W = max(1, int(sz.sum(1).max()))
        table = torch.full((b, W), math.inf, dtype=torch.float32, device=dev)
        flat = L.reshape(-1)  # pair q = row * p1 + rank of the group
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.C1.shape[0]).cpu().numpy()
        ends = np.cumsum(counts)
        for g in np.flatnonzero(counts):
            c0, c1 = int(self.goff[g]), int(self.goff[g + 1])
            if c1 == c0:
                continue
            pairs = order[ends[g] - counts[g]:ends[g]]
            rows = pairs // p1
            key = _key(x.index_select(0, rows) @ self.C[c0:c1].T, self.metric,
                       None if self.cn is None else self.cn[c0:c1])
            at = (rows * W + start.view(-1)[pairs])[:, None] + torch.arange(c1 - c0, device=dev)[None, :]
            table.view(-1).index_copy_(0, at.reshape(-1), key.reshape(-1))
        kk = min(p, W)
        v, pos = table.topk(kk, dim=1, largest=False)  # sorted: nearest first
        j = torch.searchsorted(start, pos, right=True) - 1  # the probed group each position is in
        ids = goff[L.gather(1, j)] + pos - start.gather(1, j)
        ids = torch.where(torch.isinf(v), torch.full_like(ids, -1), ids)
        if kk < p:
            ids = torch.cat([ids, torch.full((b, p - kk), -1, dtype=ids.dtype, device=dev)], 1)
        return ids.cpu().numpy()


#: Rows per `_Quantizer._two_level_fused` call: the running lists [rows, p] stay small, and
#: each group's product still has ~rows * p1 / groups rows.
_FUSED_ROWS = 16384

#: Largest p for which `_flat_top` and `_Quantizer._two_level_fused` select with the fused
#: kernels, whose eviction scan costs O(p) per kept entry; the tuning's wide searches (p up to
#: 512) take torch.topk (flat) or the score table (two-level).
_FUSED_TOP_MAX = 64


def _flat_top(x: torch.Tensor, C: torch.Tensor, cn: torch.Tensor | None, p: int) -> np.ndarray:
    """int64 [m, p]: positions of the p nearest rows of C [nc, d] (prepped float32; cn: their
    squared norms for l2, else None: cosine) to each row of x [m, d] (prepped float32), nearest
    first (equal scores: lower position first; of those tied at the p-th score, the kernel keeps
    any, deterministically), p <= nc. One thread: a matrix product per block of rows and the
    fused top-p (`top_largest`). FAISS's IndexFlat took about twice as long (50K rows x 64, one
    thread, 2-core Xeon: 3909 cells, p = 6: 2.19 against 0.99 s; 1768 cells, p = 2: 0.71 against
    0.37 s; same run)."""
    m = x.shape[0]
    out = np.empty((m, p), np.int64)
    rows = max(1, (8 << 20) // (4 * C.shape[0]))  # ~8 MiB of scores per block: stays in L2/L3 for the selection
    for s in range(0, m, rows):
        S = x[s:s + rows] @ C.T
        if cn is not None:  # l2: 2ab - |c|^2, larger is nearer
            S.mul_(2.0).sub_(cn)
        if p <= _FUSED_TOP_MAX:
            v, i = top_largest(S.numpy(), p)
        else:
            v, i = (t.numpy() for t in S.topk(p, dim=1, sorted=False))
        o = np.lexsort((i, -v), axis=1)  # by score descending, then by position
        out[s:s + rows] = np.take_along_axis(i, o, 1)
    return out


def _kmeans_here(x: torch.Tensor, k: int, *, niter: int, seed: int, metric: str, work: int,
                 use_faiss: bool) -> torch.Tensor:
    """k-means centroids [k, d] float32 of prepped rows x, in the calling thread: FAISS's
    (spherical for cosine) when use_faiss, else ours (`kmeans`)."""
    if not use_faiss:
        return kmeans(x, k, niter=niter, seed=seed, metric=metric, work=work)
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=metric == "cosine",
                      max_points_per_centroid=max(256, -(-x.shape[0] // k)), verbose=False)
    km.train(np.ascontiguousarray(x.numpy()))
    return torch.from_numpy(km.centroids.copy())


def _train_two_level(xt: torch.Tensor, nlist: int, *, niter: int, seed: int, metric: str, work: int,
                     workers: "_Workers | None", flat_search: bool = False) -> _Quantizer:
    """About `nlist` cells in two levels: round(sqrt(nlist)) coarse centroids on the sample xt,
    then each coarse group's sample rows split into cells in proportion to their number (at
    least 39 rows per cell, FAISS's floor). k-means costs O(ntrain sqrt(nlist) d) per iteration
    instead of O(ntrain nlist d) (cf. FAISS's contrib two_level_clustering, which is CPU-only).
    flat_search: the quantizer ranks all cells (no groups), for cell counts where that is faster."""
    t0 = time.perf_counter()
    nc = max(1, int(round(math.sqrt(nlist))))
    C1 = _train_centroids(xt, nc, niter=niter, seed=seed, metric=metric, work=work, workers=workers)
    c1n = C1.pow(2).sum(1) if metric == "l2" else None
    a = _nearest_centroid(xt, C1, metric, c1n, work).cpu().numpy()
    order = np.argsort(a, kind="stable")
    counts = np.bincount(a, minlength=nc)
    ends = np.cumsum(counts)
    share = np.maximum(1, np.minimum(np.rint(nlist * counts / max(1, xt.shape[0])), counts // 39)).astype(np.int64)
    share[counts == 0] = 0
    order_t = torch.from_numpy(order).to(xt.device)

    def fine(g):
        rows = xt[order_t[ends[g] - counts[g]:ends[g]]]
        if share[g] >= rows.shape[0]:
            return rows.clone()
        return _kmeans_here(rows, int(share[g]), niter=niter, seed=seed + 1 + int(g), metric=metric, work=work,
                            use_faiss=workers is not None)

    groups = np.flatnonzero(share)
    t1 = time.perf_counter()
    parts = list(workers.map(fine, groups)) if workers is not None else [fine(g) for g in groups]
    log.info("knn_graph approximate: two-level training, %d coarse groups %.2f s, their cells %.2f s",
             nc, t1 - t0, time.perf_counter() - t1)
    goff = np.zeros(nc + 1, np.int64)
    goff[1:] = np.cumsum(share)
    C = torch.cat(parts).to(torch.float32)
    if flat_search:
        return _Quantizer(C, metric, work=work, workers=workers)
    return _Quantizer(C, metric, work=work, C1=C1, goff=goff, workers=workers)


def _train_centroids(xt: torch.Tensor, nlist: int, *, niter: int, seed: int, metric: str, work: int,
                     workers: _Workers | None) -> torch.Tensor:
    """k-means centroids [nlist, d] float32 of the prepped sample xt: FAISS's k-means on the CPU
    when the kernel is FAISS (`workers` given; several times faster than Lloyd's loop in torch
    there), else ours. Small runs go to one worker thread (see _SERIAL_KMEANS_MACS)."""
    if workers is None:
        return kmeans(xt, nlist, niter=niter, seed=seed, metric=metric, work=work)
    run = lambda: _kmeans_here(xt, nlist, niter=niter, seed=seed, metric=metric, work=work, use_faiss=True)  # noqa: E731
    if xt.shape[0] * nlist * xt.shape[1] <= _SERIAL_KMEANS_MACS:
        return workers.submit(run).result()
    return run()


def _sample_exact(pool, rows, q, *, k, metric, dev, budget, workers):
    """Exact k nearest other rows of sample `rows` (prepped q [m, d]): (indices [m, k] int64,
    float32 distances [m, k]). faiss.knn over pool blocks on the CPU workers (torch's CPU topk is
    slow), the tiled torch search otherwise (workers None)."""
    m = rows.size
    if workers is None:
        ex = (np.empty((m, k), np.int64), np.empty((m, k), np.float32))
        exact_knn(pool, k=k, metric=metric, dev=dev, budget=budget, out=ex, progress=None,
                  compute_dtype="float32", query_rows=rows)
        return ex
    import faiss

    from .knn import _TuneSet

    ts = _TuneSet(rows=rows, xq=np.ascontiguousarray(q.numpy()), kk=k + 1,
                  metric=faiss_metric(metric))
    for s, e in pool.block_ranges(budget // 2, bytes_per_row=pool.shape[1] * 8):
        ts.scan(_prep(pool.block(s, e), metric).numpy(), s, faiss, knn=workers.knn)
    return ts.exact(pool, metric, k)


def _tune_nprobe(pool, rows: np.ndarray, q: torch.Tensor, qz: "_Quantizer", *, k, metric, dev, budget, work,
                 target: float, workers: _Workers | None = None):
    """nprobe from the exact neighbours of sample `rows` (prepped q [m, d]): a true neighbour is
    reachable at nprobe p when its cell ranks among the p cells nearest to the query, so one
    ranking of the centroids per sample row gives recall(p) for every p at once (the recall of
    per-query IVF probing; the grouped search probes a superset unless max_cell_probes cuts it).
    Returns (smallest p of NPROBE_LADDER with recall - 2 SE >= target (else nlist), info, exact)."""
    from .knn import mean_se, nprobe_ladder, tuned

    nlist = qz.nlist
    m = rows.size
    ex = _sample_exact(pool, rows, q, k=k, metric=metric, dev=dev, budget=budget, workers=workers)
    valid = ex[0] >= 0
    nb = _prep(gather_rows(pool, ex[0], device=dev), metric)
    cell = qz.search(nb, 1).reshape(m, k)  # each neighbour's cell as assigned
    ladder = nprobe_ladder(nlist)

    def ranks():
        # Each query's cells in the order the assignment ranks them (two-level: as its search
        # does, not the exact order, which it only approximates), up to the largest ladder step
        # below nlist; a neighbour's cell not among them is reachable only when all are searched.
        top = qz.search(q, ladder[-2] if len(ladder) > 1 else nlist, pad=False)  # [m, P]
        hit = top[:, :, None] == cell[:, None, :]  # [m, P, k]
        return np.where(hit.any(1), hit.argmax(1), nlist - 1)  # [m, k]: rank of each true neighbour's cell

    r = ranks()
    if qz.C1 is not None:
        # Two-level search reaches only the cells of a row's nearest groups: a neighbour in a cell
        # of another group is out of reach at any nprobe (at 10M with 8 of 198 groups: 5.3% of
        # them, recall stuck at 0.947). Widen the groups searched (+25% a step) until the reachable share
        # passes the target with the same 2-SE margin.
        def reach_low(r):  # reachable share of the true neighbours, less two standard errors
            mean, se = mean_se(((r < nlist - 1) & valid).sum(1) / np.maximum(1, valid.sum(1)))
            return mean - 2 * se

        coarse_tried = {qz.coarse_probes: reach_low(r)}
        while qz.coarse_probes < qz.C1.shape[0] and coarse_tried[qz.coarse_probes] < target + 0.01:
            qz.coarse_probes = next_coarse_probes(qz.coarse_probes, qz.C1.shape[0])
            r = ranks()
            coarse_tried[qz.coarse_probes] = reach_low(r)
    memo = {}
    chosen = ladder[-1]
    for p in ladder:  # every p is free to measure here: the first that passes
        memo[p] = mean_se(((r < p) & valid).sum(1) / np.maximum(1, valid.sum(1)))
        if memo[p][0] - 2 * memo[p][1] >= target:
            chosen = p
            break
    chosen, info = tuned(chosen, memo, m, target)
    if qz.C1 is not None:
        info["coarse_probes"] = int(qz.coarse_probes)
        info["coarse_tried"] = {int(c): round(float(v), 4) for c, v in coarse_tried.items()}  # reach - 2 SE
    return chosen, info, ex


def _cell_search(q: np.ndarray, cand: np.ndarray, *, kc: int, metric: str, work: int, kernel: str,
                 cdt: torch.dtype):
    """Nearest candidates of queries q [m, d] among cand [M, d] (prepped float32), in query blocks:
    (positions in cand [m, min(kc, M)] int64, float32 distances). kernel "torch": matmul (cdt:
    its dtype) + `top_largest`, "faiss": faiss.knn. Distances: cosine from the float32 inner
    products of unit rows, else recomputed from the rows (l2: BLAS's |a|^2 + |b|^2 - 2ab
    cancels). For worker threads: every op here runs single-threaded in them."""
    mt = None
    if kernel == "faiss":
        import faiss

        mt = faiss_metric(metric)
    kb = min(kc, cand.shape[0])
    tc = torch.from_numpy(cand)
    tcc = tc.to(cdt)
    dn = tc.pow(2).sum(1) if metric == "l2" else None
    exact_ip = metric == "cosine" and (kernel == "faiss" or cdt == torch.float32)
    bq = rows_per_block(cand.shape[0] * 12 + q.shape[1] * 8, work // 4, maximum=max(1, q.shape[0]))
    sel = np.empty((q.shape[0], kb), np.int64)
    dist = np.empty((q.shape[0], kb), np.float32)
    for s in range(0, q.shape[0], bq):
        qb = q[s:s + bq]
        if kernel == "faiss":
            D, i = faiss.knn(qb, cand, kb, metric=mt)
        else:
            S = (torch.from_numpy(qb).to(cdt) @ tcc.T).float()
            if metric == "l2":  # 2ab - |b|^2: larger is nearer
                S.mul_(2.0).sub_(dn)
            # fused selection: torch.topk's copy of every (value, index) pair cost about what the product did
            D, i = top_largest(S.numpy(), kb)  # float32 similarities: the result when exact_ip
        sel[s:s + bq] = i
        if exact_ip:
            np.clip(1.0 - D, 0.0, 2.0, out=dist[s:s + bq])
        else:
            dist[s:s + bq] = exact_distances(torch.from_numpy(qb), tc[torch.from_numpy(i)], metric).numpy()
    return sel, dist


def _join_workers(xs: np.ndarray, req: np.ndarray, perm: np.ndarray, counts: np.ndarray, off: np.ndarray, *, cap,
                  k, kc, metric, out, progress, workers: _Workers, work, kernel, cdt, lap) -> tuple[int, int]:
    """Steps 3 and 4 of the grouped search on CPU worker threads, one cell per task.

    xs [N, d] float32: the prepped pool in cell order; req [N, nprobe] int32: each row's cells,
    in cell order; perm [N]: pool index of each cell-order row; counts [nlist], off [nlist + 1]:
    cell sizes and starts. Each cell's rows are finished and written by its worker (cells' rows
    are disjoint); the cut requests' results are merged into their rows on this thread, in cell
    order, so the graph does not depend on thread timing. Returns (pairs searched, cut requests).
    """
    wb = max(1, work // (2 * workers.n))  # each worker's share of the working memory
    opts = dict(kc=kc, metric=metric, work=wb, kernel=kernel, cdt=cdt)

    def cell(c):
        m = int(counts[c])
        creq = req[off[c]:off[c + 1]]
        cells = _cell_probes(creq, c, counts, cap)
        miss = ~np.isin(creq, cells) & (counts[creq] > 0)
        r, j = np.nonzero(miss)
        cand = np.concatenate([xs[off[p]:off[p + 1]] for p in cells])
        cand_ids = np.concatenate([perm[off[p]:off[p + 1]] for p in cells])
        sel, dist = _cell_search(xs[off[c]:off[c + 1]], cand, **opts)
        rows = perm[off[c]:off[c + 1]]
        ii, dd = finish_rows_np(rows, cand_ids[sel], dist, k)
        out[0][rows] = ii
        out[1][rows] = dd
        return m, m * cand.shape[0], off[c] + r, creq[r, j]

    searched = 0
    left_pos, left_cell = [], []  # (row position in cell order, requested cell) the cap left out
    for m, pairs, lp, lc in workers.map(cell, np.flatnonzero(counts)):
        searched += pairs
        left_pos.append(lp)
        left_cell.append(lc)
        if progress is not None:
            progress(m)
    lap("join")

    # Requests the cap cut: grouped the other way round, by requested cell (a contiguous slice of
    # xs, no copy), each row's results merged into its row. Every row has then been searched
    # against all of its own nprobe cells, as per-query IVF probing would.
    lp, lc = np.concatenate(left_pos), np.concatenate(left_cell).astype(np.int64)
    if lp.size == 0:
        return searched, 0
    order = np.argsort(lc, kind="stable")
    lp, lc = lp[order], lc[order]
    bounds = np.flatnonzero(np.diff(lc)) + 1

    def requested(job):
        pos, p = job
        sel, dist = _cell_search(xs[pos], xs[off[p]:off[p + 1]], **opts)
        rows = perm[pos]
        # Only candidates at or below a row's k-th distance can enter its list, so the merge (on
        # this one thread: it was the second pass's bottleneck, 18 of 19 s at 1M) gets only those.
        # Every row is finished by the join; merges only lower the k-th, so a k-th read while the
        # main thread merges another job is at worst too high: a few more kept, none lost.
        good = dist <= out[1][rows, k - 1][:, None]
        hit = good.any(1)
        ii = np.where(good[hit], perm[off[p] + sel[hit]], -1)
        return rows[hit], ii, np.where(good[hit], dist[hit], np.float32(np.inf)), pos.size * int(counts[p])

    for rows, ii, dd, pairs in workers.map(requested, zip(np.split(lp, bounds), lc[np.concatenate([[0], bounds])])):
        searched += pairs
        if rows.size:
            _merge_into(out, rows, ii, dd, k)
    return searched, int(lp.size)


def gemm_ivf_knn(pool, *, k, metric, dev, budget, out, progress, seed, nlist=None, nprobe=None,
                 max_cell_probes=None, train_per_cell=None, niter=None, compute_dtype=None, kernel="auto",
                 target_recall=None, tune_rows=None):
    """GEMM-shaped approximate self-join.

    Cells from k-means on a sample. Each point names its `nprobe` nearest centroids; a cell's
    queries are searched, as one matrix, against the points of the cells its points name most
    (itself first, at most `max_cell_probes`, default 2 * nprobe; the requests the cap cuts
    are searched afterwards grouped by requested cell and merged, so every point searches at
    least its own nprobe cells): no per-query probing, and
    each point's own nprobe cells are covered unless the cap cuts them. On the CPU with FAISS,
    k-means, the quantizer and the tuning sample's exact search are FAISS's, and the cells run
    on single-threaded worker threads (torch.get_num_threads() of them; torch's thread count
    is held at 1 meanwhile), each cell searched by `kernel`: "torch" (matmul + `top_largest`; "auto")
    or "faiss" (faiss.knn). On CUDA or without FAISS: one loop of torch matmul + topk.
    nprobe=None tunes it to `target_recall` on `tune_rows` sample rows (see `_tune_nprobe`); the
    recall those rows reach in the finished graph is reported as info["sample_recall"];
    info["phase_s"] holds the seconds of each phase (train, tune, assign, join, second_pass).
    """

    n, d = pool.shape
    nlist = min(nlist or grouped_nlist(n), n)
    train_per_cell = train_per_cell or 40
    niter = 10 if niter is None else niter
    cdt = _compute_dtype(compute_dtype, dev, pool)
    kc = k + 1 + (0 if cdt == torch.float32 else _REDUCED_PAD)
    work = _work_bytes(budget, dev)
    # On the CPU with FAISS: FAISS's k-means, quantizer and sample search, and the cells on
    # single-threaded worker threads (per-cell search: torch matmul + top_largest, or faiss.knn, which
    # ran ~1.5x slower per cell of ~256 queries here). Else (CUDA, no FAISS): one loop in torch.
    use_workers = dev.type == "cpu" and (kernel == "faiss" or _faiss_importable())
    if kernel == "faiss" and dev.type != "cpu":
        raise ValueError(f"kernel: 'faiss' runs on the CPU only, got kernel='faiss' with device {dev}")
    if kernel == "auto":
        kernel = "torch"
    if not use_workers:
        return _grouped_search(pool, k=k, metric=metric, dev=dev, budget=budget, out=out, progress=progress,
                               seed=seed, nlist=nlist, nprobe=nprobe, max_cell_probes=max_cell_probes,
                               train_per_cell=train_per_cell, niter=niter, cdt=cdt, kc=kc, work=work, kernel=kernel,
                               workers=None, target_recall=target_recall, tune_rows=tune_rows)
    with single_thread_workers() as w:
        return _grouped_search(pool, k=k, metric=metric, dev=dev, budget=budget, out=out, progress=progress,
                               seed=seed, nlist=nlist, nprobe=nprobe, max_cell_probes=max_cell_probes,
                               train_per_cell=train_per_cell, niter=niter, cdt=cdt, kc=kc, work=work,
                               kernel=kernel, workers=w, target_recall=target_recall, tune_rows=tune_rows)


def _faiss_importable() -> bool:
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


def _grouped_search(pool, *, k, metric, dev, budget, out, progress, seed, nlist, nprobe, max_cell_probes,
                    train_per_cell, niter, cdt, kc, work, kernel, workers, target_recall, tune_rows):
    """The body of `gemm_ivf_knn` once options are resolved; `workers` given: the CPU + FAISS path."""
    from .knn import DEFAULT_TARGET_RECALL, DEFAULT_TUNE_ROWS, _recall_rows, KNNGraph

    n, d = pool.shape
    use_faiss = workers is not None  # FAISS for k-means, quantizer and the sample's exact search
    phase = {}  # seconds per phase, reported as info["phase_s"]
    t_phase = time.perf_counter()

    def lap(name):
        nonlocal t_phase
        t = time.perf_counter()
        phase[name] = round(t - t_phase, 4)
        t_phase = t
        log.info("knn_graph approximate: %s %.2f s", name, phase[name])

    # 1. Coarse partition from a seeded sample.
    rng = np.random.default_rng([seed, 0x7E])
    ntrain = min(n, nlist * train_per_cell)
    sample = np.sort(rng.choice(n, size=ntrain, replace=False))
    xt = _prep(gather_rows(pool, sample, device=dev), metric)
    log.info("knn_graph approximate: training sample of %d rows read in %.2f s", ntrain, time.perf_counter() - t_phase)
    if nlist > (_TWO_LEVEL_TRAIN_CELLS if dev.type == "cpu" else _TWO_LEVEL_CELLS):
        qz = _train_two_level(xt, nlist, niter=niter, seed=seed, metric=metric, work=work, workers=workers,
                              flat_search=nlist <= _TWO_LEVEL_CELLS)
    else:
        qz = _Quantizer(_train_centroids(xt, nlist, niter=niter, seed=seed, metric=metric, work=work,
                                         workers=workers), metric, work=work, workers=workers)
    nlist = qz.nlist
    lap("train")
    info = {}
    tune = None
    if nprobe is None:
        target = DEFAULT_TARGET_RECALL if target_recall is None else target_recall
        rows = held_out_rows(n, sample, tune_rows or DEFAULT_TUNE_ROWS, seed)
        nprobe, info, ex = _tune_nprobe(pool, rows, _prep(gather_rows(pool, rows, device=dev), metric), qz, k=k,
                                        metric=metric, dev=dev, budget=budget, work=work, target=target,
                                        workers=workers)
        tune = (rows, ex)
        lap("tune")
    del xt
    nprobe = min(nprobe, nlist)
    cap = cell_cap(nlist, max_cell_probes, nprobe)

    # 2. Each point's nprobe nearest cells; sorted copy of the pool (float32, prepped) so that
    #    cells are slices.
    keep_on_dev = dev.type == "cpu" or n * d * 4 <= 0.5 * torch.cuda.mem_get_info(dev)[0]
    log_memory_estimate("knn_graph torch approximate (cell-sorted pool copy + probes)", n * d * 4 + n * nprobe * 4)
    req = np.empty((n, nprobe), np.int32)
    for s, e in pool.block_ranges(work // 4, bytes_per_row=d * 8):
        req[s:e] = qz.search(_prep(pool.block(s, e, device=dev), metric), nprobe)
    assign = req[:, 0].astype(np.int64)
    perm = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=nlist)
    off = np.concatenate([[0], np.cumsum(counts)])
    inv = np.empty(n, np.int64)
    inv[perm] = np.arange(n)
    xs = torch.empty((n, d), dtype=torch.float32, device=dev if keep_on_dev else "cpu",
                     pin_memory=(dev.type == "cuda" and not keep_on_dev))
    inv_t = torch.from_numpy(inv).to(xs.device)
    for s, e in pool.block_ranges(work // 4, bytes_per_row=d * 8):
        xs[inv_t[s:e]] = _prep(pool.block(s, e, device=xs.device), metric)
    req = req[perm]  # rows now in cell order too
    lap("assign")
    if tune is not None and nprobe > 1:
        # The IVF estimate's nprobe is an upper bound: lower it to what the grouped search needs.
        p_ivf = nprobe
        nprobe, reach = _tune_grouped(req, inv, counts, off, tune[0], tune[1][0], p_hi=nprobe,
                                      max_cell_probes=max_cell_probes, target=info["target_recall"])
        info.update({"nprobe_ivf": p_ivf, "tune_recall_ivf": info["tune_recall"],
                     "tune_recall_se_ivf": info["tune_recall_se"], **reach})
        if nprobe < p_ivf:
            req = np.ascontiguousarray(req[:, :nprobe])
            cap = cell_cap(nlist, max_cell_probes, nprobe)
        lap("tune_grouped")

    # 3. The self-join, cell by cell (4. then the requests the cap cut).
    if use_faiss:
        searched, n_left = _join_workers(xs.numpy(), req, perm, counts, off, cap=cap, k=k, kc=kc, metric=metric,
                                         out=out, progress=progress, workers=workers, work=work, kernel=kernel,
                                         cdt=cdt, lap=lap)
        lap("second_pass")
    else:  # CUDA, or a CPU without FAISS: batched tensor work, no loop over cells
        from ._knn_join import batched_self_join

        searched, n_left = batched_self_join(xs, req, counts, off, perm, cap=cap, k=k, kc=kc, metric=metric,
                                             cdt=cdt, dev=dev, work=work, out=out, progress=progress, lap=lap)
        lap("finish")
    info.update({"nlist": nlist, "nprobe": nprobe, "max_cell_probes": cap, "train_rows": ntrain, "niter": niter,
                 "kernel": kernel, "compute_dtype": str(cdt).replace("torch.", ""),
                 "cell_size_max": int(counts.max()), "cell_size_mean": float(n / max(1, int((counts > 0).sum()))),
                 "candidates_per_row": searched / n, "cap_cut_requests": n_left, "phase_s": phase})
    if tune is not None:
        rows, ex = tune
        got = KNNGraph(np.asarray(out[0][rows]), np.asarray(out[1][rows]), metric, k)
        per_row = _recall_rows(got, KNNGraph(ex[0], ex[1], metric, k))
        info["sample_recall"] = float(per_row.mean())
        if info["sample_recall"] < info["target_recall"]:
            log.warning("knn_graph: the finished graph's recall on the tuning sample is %.4f, below target_recall "
                        "%.3f", info["sample_recall"], info["target_recall"])
    return info
