"""k-NN graph of a pool: for every row, its k nearest *other* rows, streamed from a memmap.

`knn_graph` validates, picks a backend and calls one private kernel:

* **faiss** (lazy import; ``pip install faiss-cpu`` or faiss-gpu): exact flat search
  (``faiss.knn``, or ``faiss.knn_gpu`` on a GPU) and approximate IVF-Flat, or IVF with a
  scalar quantizer (fp16 / 8 bit) when the float32 pool does not fit in memory.
* **torch exact**: tiled brute force on a torch device (query blocks x database blocks,
  one matrix product per tile, per-tile top-k merged into a running top-k).
* **torch approximate, GEMM-shaped**: a k-NN graph is a self-join, so queries are grouped:
  coarse k-means on a sample (on the device), then for each cell, the matrix of its points
  against the points of the cells its points request most, top-k per row; the requests that
  cap cuts are searched afterwards grouped by requested cell. No per-query probing, and every
  point searches at least its own ``nprobe`` nearest cells. Cells hold ~256 points at any N
  (N / 256 of them), so a row's candidates do not grow with the pool; past 4096 cells the
  centroids are trained and searched in two levels (sqrt(nlist) coarse groups, each row's
  cells ranked within its 8 nearest groups), so training and assignment cost
  O(N sqrt(nlist) d) rather than O(N nlist d), which is quadratic in N at a fixed cell size.

Approximate search tunes ``nprobe`` unless it is given: the exact neighbours of a seeded
sample of rows (1000) are found first, and the smallest nprobe whose recall@k on the sample,
less two standard errors, reaches ``target_recall`` (0.95) is used; ``info`` reports the
estimate, and for the torch search the recall the finished graph reaches on the sample.

Both torch kernels live in `_knn_torch.py`; FAISS is imported lazily, here and in its CPU block kernel.

Why ``backend="auto"`` picks what it picks: on the CPU FAISS's BLAS search with its
fused heap top-k was several times faster than torch, whose CPU ``topk`` over wide score
matrices dominates the time; so exact search on the CPU goes through the FAISS backend. Since
stop 21 that backend's CPU flat search runs torch matmul tiles with a running fused numba top-k
on worker threads instead of ``faiss.knn`` (2.2-2.9x faster on the 2-core Intel VM: 0.40 against
0.92 s for 13.4K x 13.4K x 64), the same kernel as the tuning sample's search (few queries
against many rows, where ``faiss.knn`` ran ~3x slower). Approximate search
on the CPU uses the GEMM-shaped self-join (FAISS's k-means; a row's cells ranked by torch
matmuls and fused numba top-p selection: flat up to 4096 cells, past that one product per coarse
group merged into running top-p lists; the cells on
single-threaded worker threads, each one torch matrix product + top-k over ~2000 candidates, where
torch's topk is cheap and ~1.5x faster than ``faiss.knn`` per cell): a cell's queries against its
candidates is one matrix product, where IVF's per-query list scans run at a fraction of the
matrix-product rate (1M x 128, k=16, both tuned to 0.95: 103 s at recall 0.974 against 137 s at
0.957 for IVF-Flat, on 2 cores, before the worker threads); FAISS IVF is used when the float32
copy of the pool would not fit in memory.
On CUDA, FAISS is used when the installed build has GPU support (``faiss.get_num_gpus() > 0``),
else torch, whose tiled kernels run at matrix-product speed on the card.
``exact=None`` chooses exact search for small pools (N <= 20,000 on the CPU, N <= 200,000 on
a GPU) and approximate search above.

Metrics: ``"cosine"`` is 1 - cos(a, b); ``"l2"`` is the Euclidean distance (not squared).
A zero vector has cosine similarity 0 with every vector (itself and other zero vectors
included), so its cosine distance to everything is exactly 1: it is kept, not rejected.

The point itself is excluded: k + 1 (or more) candidates are searched, the row's own index
dropped when present, else the last candidate (this happens with more than k exact duplicates).
Approximate search may find fewer than k neighbours for a point whose probed cells hold too
few points: the missing entries are index -1 with distance +inf, at the end of the row.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ._device import budget_bytes as _budget_bytes
from ._device import log_memory_estimate, resolve_device, rows_per_block
from ._validate import check_choice, check_int, check_ndim, check_nonempty
from .pool import Pool

log = logging.getLogger("cm_engine")

METRICS = ("cosine", "l2")
BACKENDS = ("auto", "faiss", "torch")
#: Largest pool searched exactly when ``exact=None`` (CPU, GPU). Above it the approximate
#: search is faster at recall >= 0.95. GPU: the exact search grows as N^2 (H200, d=128 float16,
#: k=16: 1.3 s at 1e5, 27.6 s at 1e6) while the approximate one built 10M x 256 in 47.5 s;
#: 200K is where exact is still ~1-2 s (the approximate search at 1e5-1e6 on a GPU is not
#: measured yet: benchmarks/results/gpu_check_h200.json).
EXACT_MAX_N = {"cpu": 20_000, "cuda": 200_000}


@dataclass
class KNNGraph:
    """A k-NN graph.

    indices: [N, k] int32 when N < 2**31, else int64 (may be a np.memmap); -1 = missing.
    distances: [N, k] float32, each row ascending; +inf where the index is -1.
    metric: "cosine" or "l2". k: neighbours per row.
    info: how it was built (backend, exact, index parameters); not part of equality.
    """

    indices: np.ndarray
    distances: np.ndarray
    metric: str
    k: int
    info: dict = field(default_factory=dict, compare=False)

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])


# ----------------------------------------------------------------------------- faiss import

def _import_faiss():
    """FAISS, imported on first use; a clear error names the package when it is missing."""
    try:
        import faiss  # noqa: PLC0415 (lazy on purpose: optional dependency)
    except ImportError as e:
        raise ImportError(
            "backend='faiss' needs FAISS: install it with `pip install faiss-cpu` "
            "(or faiss-gpu for GPU support), or use backend='torch'") from e
    return faiss


def faiss_metric(metric: str) -> int:
    """FAISS's metric constant for ours: inner product for "cosine" (rows are unit length), else L2."""
    faiss = _import_faiss()
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def _faiss_available() -> bool:
    try:
        _import_faiss()
        return True
    except ImportError:
        return False


def _faiss_gpus(faiss) -> int:
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


# ----------------------------------------------------------------------------- public API

def check_graph_args(pool: Pool, *, k, metric, backend, exact, seed) -> tuple[int, int]:
    """Validate the graph arguments against an opened pool; returns (k, seed) as ints.

    Shared with `cluster`, which checks them before it touches the cache.
    """
    check_ndim("embeddings", pool.shape, 2)
    check_nonempty("embeddings", pool.n)
    n, d = pool.shape
    if d < 1:
        raise ValueError(f"embeddings: expected at least one column, got shape {pool.shape}")
    k = check_int("k", k)
    if not 1 <= k < n:
        raise ValueError(f"k: expected 1 <= k < N = {n} (the number of rows of embeddings), got {k}")
    check_choice("metric", metric, METRICS)
    check_choice("backend", backend, BACKENDS)
    if exact is not None and not isinstance(exact, (bool, np.bool_)):
        raise TypeError(f"exact: expected True, False or None, got {exact!r}")
    return k, check_int("seed", seed, min=0)


def knn_graph(embeddings, *, k: int, metric: str = "cosine", backend: str = "auto", device="auto",
              exact: bool | None = None, seed: int = 0, budget_bytes: int | None = None,
              out_dir=None, progress: Callable[[int], None] | None = None,
              **backend_options) -> KNNGraph:
    """The k nearest other rows of every row of `embeddings` [N, d] (float16/32/64 or bfloat16).

    embeddings: array, memmap, torch tensor or path to a `.npy` (read in blocks, never whole).
    k: neighbours per row, 1 <= k < N. metric: "cosine" (1 - cos) or "l2" (Euclidean).
    backend: "auto" | "faiss" | "torch" (see the module docstring for what "auto" picks and why).
    device: "auto" | "cpu" | "cuda[:N]" | torch.device. exact: True, False or None (auto by N).
    seed: seeds the sample and k-means of approximate search (results are deterministic).
    budget_bytes: working-memory budget for blocks (default: $CM_ENGINE_BUDGET_MB or 256 MiB).
    out_dir: if given, `indices.npy` and `distances.npy` are written there as memmaps.
    progress: optional callable(n_rows_done) called as rows are finished.
    backend_options (approximate): nlist (cells), nprobe (cells probed), train_per_cell
      (sample rows per cell for k-means), niter (k-means iterations), index ("auto" | "flat" |
      "sq16" | "sq8": how FAISS stores the pool), memory_limit_bytes (when the float32 pool is
      larger, FAISS stores it compressed); (both approximate searches) when nprobe is not given
      it is tuned: the smallest nprobe whose recall@k on `tune_rows` sample rows (default 1000)
      is at least `target_recall` (default 0.95) with two standard errors to spare (torch
      approximate: then lowered to the smallest whose reach in the grouped join passes); (torch
      approximate) max_cell_probes (cells a cell's queries search as one matrix, default
      2 * nprobe; cut requests are searched in a second pass), kernel (per-cell search on the CPU
      with FAISS: "auto" = "torch" (matmul + fused top-k) | "faiss" (faiss.knn)); (torch)
      compute_dtype ("float32" | "float16" | "bfloat16"; final distances are always recomputed
      in float32).
    Returns a KNNGraph with indices [N, k] (int32 if N < 2**31) and distances [N, k] float32.
    """
    pool = Pool(embeddings, name="embeddings")
    _check_float_dtype(pool)
    k, seed = check_graph_args(pool, k=k, metric=metric, backend=backend, exact=exact, seed=seed)
    n, d = pool.shape
    dev = resolve_device(device)
    budget = _budget_bytes(budget_bytes)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress: expected a callable(n_rows_done) or None, got {type(progress).__name__}")
    opts = _check_options(backend_options)
    _check_finite(pool, budget)

    backend, exact = resolve_backend(n, d, dev, backend=backend, exact=exact)
    if backend == "faiss":
        _import_faiss()  # fail early, naming the package
    if backend == "torch" and opts.get("index") not in (None, "auto"):
        raise ValueError(f"index: only the faiss backend takes it, got index={opts['index']!r} with backend='torch'")

    indices, distances = _alloc_out(n, k, out_dir)
    info = {"backend": backend, "exact": exact, "device": str(dev), "metric": metric, "k": k, "seed": seed}
    log.info("knn_graph: N=%d d=%d k=%d metric=%s backend=%s exact=%s device=%s", n, d, k, metric, backend,
             exact, dev)
    kw = dict(k=k, metric=metric, dev=dev, budget=budget, out=(indices, distances), progress=progress)
    if backend == "faiss":
        if exact:
            _faiss_exact(pool, **kw)
        else:
            info.update(_faiss_ivf(pool, seed=seed, **kw, **opts))
    else:
        from . import _knn_torch

        topts = {key: v for key, v in opts.items() if key != "index" and key != "memory_limit_bytes"}
        if exact:
            info.update(_knn_torch.exact_knn(pool, **kw, compute_dtype=topts.get("compute_dtype")))
        else:
            info.update(_knn_torch.gemm_ivf_knn(pool, seed=seed, **kw, **topts))
    for a in (indices, distances):
        if isinstance(a, np.memmap):
            a.flush()
    return KNNGraph(indices=indices, distances=distances, metric=metric, k=k, info=info)


def exact_neighbors(embeddings, rows, *, k: int, metric: str = "cosine", device="auto",
                    budget_bytes: int | None = None) -> KNNGraph:
    """Exact k nearest other rows of the given `rows` only (torch tiled brute force, float32):
    ground truth for recall on a sample of a large pool. Returns a KNNGraph with len(rows) rows,
    in the order of `rows` (which must be unique)."""
    pool = Pool(embeddings, name="embeddings")
    check_ndim("embeddings", pool.shape, 2)
    _check_float_dtype(pool)
    n = pool.n
    k = check_int("k", k)
    if not 1 <= k < n:
        raise ValueError(f"k: expected 1 <= k < N = {n} (the number of rows of embeddings), got {k}")
    check_choice("metric", metric, METRICS)
    from ._validate import as_index_array
    from . import _knn_torch

    rows = as_index_array("rows", rows, n=n)
    order = np.argsort(rows, kind="stable")
    idt = index_dtype(n)
    out = (np.empty((rows.size, k), idt), np.empty((rows.size, k), np.float32))
    _knn_torch.exact_knn(pool, k=k, metric=metric, dev=resolve_device(device), budget=_budget_bytes(budget_bytes),
                         out=out, progress=None, compute_dtype="float32", query_rows=rows[order])
    ii, dd = np.empty_like(out[0]), np.empty_like(out[1])
    ii[order], dd[order] = out
    return KNNGraph(indices=ii, distances=dd, metric=metric, k=k, info={"backend": "torch", "exact": True})


def recall_at_k(approx: KNNGraph, exact: KNNGraph, *, rows=None, tol: float = 1e-6) -> float:
    """Share of true neighbours found, tie-aware: mean over rows of |found ∩ true| / k.

    A found neighbour counts when its distance is within `tol` (relative) of the exact k-th
    distance or below, so that swapping points at exactly the same distance is not a miss.
    `exact` may hold only some rows (e.g. a sample): then `rows` [m] are those rows' indices in
    `approx`. Missing neighbours (-1) never count. The approximate distances are trusted (every
    backend here returns float32-recomputed or exact-index distances).
    """
    if not isinstance(approx, KNNGraph) or not isinstance(exact, KNNGraph):
        raise TypeError("recall_at_k: expected two KNNGraph objects")
    if approx.metric != exact.metric:
        raise ValueError(f"exact: expected metric {approx.metric!r} (that of approx), got {exact.metric!r}")
    return float(_recall_rows(approx, exact, rows=rows, tol=tol).mean())


def _recall_rows(approx: KNNGraph, exact: KNNGraph, *, rows=None, tol: float = 1e-6) -> np.ndarray:
    """Per-row recall [m] float64 (see `recall_at_k`), in row blocks: memory O(block * k * k)."""
    k = min(approx.k, exact.k)
    rows = None if rows is None else np.asarray(rows)
    m = approx.n if rows is None else rows.size
    if m != exact.n:
        raise ValueError(f"rows: expected {exact.n} rows (those of exact), got {m}")
    out = np.empty(m, np.float64)
    step = max(1, 2**22 // (k * k))
    for s in range(0, m, step):
        e = min(m, s + step)
        sel = slice(s, e) if rows is None else rows[s:e]
        ai = np.asarray(approx.indices[sel][:, :k])
        ad = np.asarray(approx.distances[sel][:, :k], dtype=np.float64)
        kth = np.asarray(exact.distances[s:e, k - 1], dtype=np.float64)[:, None]
        ok = (ai >= 0) & (ad <= kth + tol * np.maximum(1.0, np.abs(kth)))
        # Neighbours found that are in the exact list count even if their distance disagrees slightly.
        ok |= (ai[:, :, None] == np.asarray(exact.indices[s:e, :k])[:, None, :]).any(-1) & (ai >= 0)
        out[s:e] = np.minimum(ok.sum(1), k) / k
    return out


# ----------------------------------------------------------------------------- validation

def _check_float_dtype(pool: Pool) -> None:
    dt = pool.dtype
    if dt == "bfloat16" or dt in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
        return
    if isinstance(dt, torch.dtype) or not np.issubdtype(np.dtype(dt), np.floating):
        raise TypeError(f"embeddings: expected a floating dtype (float16, bfloat16, float32, float64), got {dt}")


_OPTION_CHECKS = {
    "nlist": lambda v: check_int("nlist", v, min=1),
    "nprobe": lambda v: check_int("nprobe", v, min=1),
    "max_cell_probes": lambda v: check_int("max_cell_probes", v, min=1),
    "kernel": lambda v: check_choice("kernel", v, ("auto", "torch", "faiss")),
    "train_per_cell": lambda v: check_int("train_per_cell", v, min=1),
    "niter": lambda v: check_int("niter", v, min=0),
    "index": lambda v: check_choice("index", v, ("auto", "flat", "sq16", "sq8")),
    "memory_limit_bytes": lambda v: check_int("memory_limit_bytes", v, min=1),
    "compute_dtype": lambda v: check_choice("compute_dtype", v, (None, "float32", "float16", "bfloat16")),
    "target_recall": lambda v: _check_fraction("target_recall", v),
    "tune_rows": lambda v: check_int("tune_rows", v, min=2),
}


def _check_fraction(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0 < float(v) <= 1:
        raise ValueError(f"{name}: expected a number in (0, 1], got {v!r}")
    return float(v)


def _check_options(opts: dict) -> dict:
    bad = sorted(set(opts) - set(_OPTION_CHECKS))
    if bad:
        raise TypeError(f"knn_graph: unexpected option(s) {', '.join(bad)}; expected some of "
                        f"{', '.join(sorted(_OPTION_CHECKS))}")
    return {key: _OPTION_CHECKS[key](v) for key, v in opts.items()}


def _check_finite(pool: Pool, budget: int) -> None:
    """One streamed pass: NaN/inf in any row is an error naming the first bad row."""
    for s, e in pool.block_ranges(budget // 2):
        rows = pool.read(s, e)
        if isinstance(rows, torch.Tensor):
            bad = ~torch.isfinite(rows).all(dim=1)
            first = int(bad.nonzero()[0, 0]) if bool(bad.any()) else -1
        else:
            bad = ~np.isfinite(rows).all(axis=1)
            first = int(np.argmax(bad)) if bad.any() else -1
        if first >= 0:
            raise ValueError(f"embeddings: expected finite values, got NaN or inf in row {s + first}")


def resolve_backend(n: int, d: int, dev: torch.device, *, backend: str = "auto", exact: bool | None = None):
    """(backend, exact) that knn_graph runs for an [n, d] pool on `dev`: exact None is chosen by
    n (EXACT_MAX_N), backend "auto" by `_auto_backend`."""
    exact = n <= EXACT_MAX_N[dev.type] if exact is None else bool(exact)
    if backend == "auto":
        backend = _auto_backend(dev, exact=exact, pool_bytes=n * d * 4)
    return backend, exact


def _auto_backend(dev: torch.device, *, exact: bool, pool_bytes: int) -> str:
    """See the module docstring. On the CPU, approximate search is the GEMM-shaped torch search
    (with faiss.knn as its block kernel when FAISS is there) while its float32 cell-sorted copy of
    the pool fits in memory, else FAISS IVF with a compressed index."""
    if not _faiss_available():
        return "torch"
    if dev.type == "cuda":
        return "faiss" if _faiss_gpus(_import_faiss()) > 0 else "torch"
    if not exact and pool_bytes <= _memory_limit():
        return "torch"
    return "faiss"


# ----------------------------------------------------------------------------- shared pieces

def index_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def _alloc_out(n: int, k: int, out_dir):
    idt = index_dtype(n)
    if out_dir is None:
        return np.empty((n, k), idt), np.empty((n, k), np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return (np.lib.format.open_memmap(out_dir / "indices.npy", mode="w+", dtype=idt, shape=(n, k)),
            np.lib.format.open_memmap(out_dir / "distances.npy", mode="w+", dtype=np.float32, shape=(n, k)))


def _prep(x: torch.Tensor, metric: str) -> torch.Tensor:
    """float32 rows, unit length for cosine (zero rows stay zero: similarity 0 to all)."""
    x = x.to(torch.float32)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1, eps=1e-30)
    return x


def gather_rows(pool: Pool, idx: np.ndarray, *, device="cpu") -> torch.Tensor:
    """Rows `idx` (any order, -1 allowed -> row 0) of the pool as float32 on `device`."""
    flat = np.asarray(idx, dtype=np.int64).reshape(-1)
    flat = np.where(flat < 0, 0, flat)
    order = np.argsort(flat, kind="stable")  # sorted reads are kinder to a memmap
    a = pool.array
    if isinstance(a, torch.Tensor):
        rows = a[torch.as_tensor(flat, device=a.device)]
        return rows.to(device=device, dtype=torch.float32)
    got = a[flat[order]]
    got = got if isinstance(got, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(got))
    rows = torch.empty_like(got)
    rows[torch.from_numpy(order)] = got
    return rows.to(device=device, dtype=torch.float32)


def exact_distances(q: torch.Tensor, cand: torch.Tensor, metric: str) -> torch.Tensor:
    """float32 distances of query rows q [m, d] (prepped) to their candidates cand [m, c, d]."""
    if metric == "cosine":
        return (1.0 - torch.einsum("md,mcd->mc", q, cand)).clamp_(0.0, 2.0)
    return (cand - q[:, None, :]).pow_(2).sum(-1).sqrt_()


def finish_rows(rows: np.ndarray, cand_i: torch.Tensor, cand_d: torch.Tensor, k: int):
    """`finish_torch`, returned as numpy: rows [m] int64 pool indices of the queries; cand_i
    [m, c] int64 (-1 missing), cand_d [m, c] float32. Returns (indices [m, k] int64, distances
    [m, k] float32)."""
    ii, dd = finish_torch(torch.as_tensor(np.asarray(rows, np.int64), device=cand_i.device), cand_i, cand_d, k)
    return ii.cpu().numpy(), dd.cpu().numpy()


def finish_torch(rows: torch.Tensor, cand_i: torch.Tensor, cand_d: torch.Tensor, k: int):
    """Sort candidates by (distance, index), drop the row itself (else the last), keep k, on the
    candidates' device. rows [m] int64 tensor, cand_i [m, c] int64 (-1 missing), cand_d [m, c]
    float32. Returns tensors (indices [m, k] int64, distances [m, k] float32; -1 / inf where missing)."""
    cand_d = torch.where(cand_i < 0, torch.full_like(cand_d, math.inf), cand_d)
    o = torch.argsort(cand_i, dim=1, stable=True)
    cand_i, cand_d = cand_i.gather(1, o), cand_d.gather(1, o)
    o = torch.argsort(cand_d, dim=1, stable=True)
    cand_i, cand_d = cand_i.gather(1, o), cand_d.gather(1, o)
    m, c = cand_i.shape
    is_self = cand_i == rows[:, None]
    has = is_self.any(1)
    drop = torch.where(has, is_self.int().argmax(1), torch.full_like(rows, c - 1))
    keep = torch.arange(c, device=cand_i.device)[None, :] != drop[:, None]
    ii = cand_i[keep].reshape(m, c - 1)[:, :k]
    dd = cand_d[keep].reshape(m, c - 1)[:, :k]
    if ii.shape[1] < k:
        pad = k - ii.shape[1]
        ii = torch.cat([ii, torch.full((m, pad), -1, dtype=ii.dtype, device=ii.device)], 1)
        dd = torch.cat([dd, torch.full((m, pad), math.inf, dtype=dd.dtype, device=dd.device)], 1)
    dd = torch.where(ii < 0, torch.full_like(dd, math.inf), dd)
    return ii, dd


def finish_rows_np(rows: np.ndarray, cand_i: np.ndarray, cand_d: np.ndarray, k: int):
    """`finish_torch` in numpy (same result): for worker threads, where torch ops would wake
    torch's thread pool. cand_i [m, c] int64 (-1 missing), cand_d [m, c] float32."""
    cand_d = np.where(cand_i < 0, np.float32(np.inf), cand_d)
    order = np.lexsort((cand_i, cand_d), axis=1)  # by distance, ties by index
    ii, dd = np.take_along_axis(cand_i, order, 1), np.take_along_axis(cand_d, order, 1)
    return drop_self(np.asarray(rows, np.int64), ii, dd, k)


def drop_self(rows: np.ndarray, ii: np.ndarray, dd: np.ndarray, k: int):
    """Remove the row's own index from each sorted candidate row (else the last), keep k."""
    m, c = ii.shape
    mask = ii == rows[:, None]
    first = np.argmax(mask, axis=1)
    has = mask[np.arange(m), first]
    drop = np.where(has, first, c - 1)
    keep = np.ones((m, c), bool)
    keep[np.arange(m), drop] = False
    ii = ii[keep].reshape(m, c - 1)[:, :k]
    dd = dd[keep].reshape(m, c - 1)[:, :k]
    if ii.shape[1] < k:  # fewer candidates than k: pad as missing
        pad = k - ii.shape[1]
        ii = np.concatenate([ii, np.full((m, pad), -1, ii.dtype)], 1)
        dd = np.concatenate([dd, np.full((m, pad), np.inf, dd.dtype)], 1)
    dd = np.where(ii < 0, np.float32(np.inf), dd).astype(np.float32)
    return ii, dd


def _refine(pool: Pool, rows: np.ndarray, ii: np.ndarray, metric: str, q: torch.Tensor | None = None):
    """Exact float32 distances of rows to candidates ii (for l2: avoids |a|^2+|b|^2-2ab cancellation)."""
    if q is None:
        q = _prep(pool.block(int(rows[0]), int(rows[-1]) + 1), metric)
    cand = _prep(gather_rows(pool, ii), metric).reshape(ii.shape[0], ii.shape[1], -1)
    return exact_distances(q, cand, metric)


# ----------------------------------------------------------------------------- faiss kernels

def _faiss_exact(pool: Pool, *, k, metric, dev, budget, out, progress):
    """Flat search over query blocks against the whole pool (database blocks merged when the
    float32 pool exceeds the memory limit). l2 distances are recomputed in float32. On the CPU
    each block is searched by torch matmul tiles and a running fused top-k on single-threaded
    workers (`_knn_torch._Workers.knn`), in faiss.knn's convention: 13.4K x 13.4K x 64 (HAC's
    first relink of a 30K pool) took 0.40 s against faiss.knn's 0.92 s on stop 21's 2-core
    VM, same neighbours bar ties; faiss.knn_gpu on a FAISS GPU."""
    faiss = _import_faiss()
    if dev.type != "cuda":
        from ._knn_torch import single_thread_workers

        with single_thread_workers() as w:
            return _exact_blocks(pool, faiss, w.knn, k=k, metric=metric, budget=budget, out=out,
                                 progress=progress, gpu=False)
    return _exact_blocks(pool, faiss, None, k=k, metric=metric, budget=budget, out=out, progress=progress,
                         gpu=_faiss_gpus(faiss) > 0)


def _exact_blocks(pool: Pool, faiss, search, *, k, metric, budget, out, progress, gpu: bool):
    """`_faiss_exact`'s loop; search(xq, xb, k, metric) -> (D, I) in faiss.knn's convention,
    None for faiss.knn (faiss.knn_gpu when gpu)."""
    n, d = pool.shape
    kk = k + 1
    mt = faiss_metric(metric)
    limit = max(budget, _memory_limit())
    db_rows = min(n, max(kk, limit // (4 * d)))
    q_rows = rows_per_block(4 * d + 12 * kk, budget // 4, maximum=n)
    if search is not None:  # the workers' score tiles are [q_rows, ~2 MiB / q_rows]: keep them wide enough
        q_rows = min(q_rows, 4096)
    log_memory_estimate("knn_graph faiss exact", min(n, db_rows) * 4 * d + q_rows * (4 * d + 12 * kk))
    res = faiss.StandardGpuResources() if gpu else None  # untested here: no FAISS-GPU on our GPU hosts
    single = db_rows >= n
    db = _prep(pool.block(0, n), metric).numpy() if single else None
    acc = None if single else (np.full((n, kk), np.inf, np.float32), np.full((n, kk), -1, np.int64))
    for cs in range(0, n, db_rows):
        ce = min(n, cs + db_rows)
        xb = db if single else _prep(pool.block(cs, ce), metric).numpy()
        for qs in range(0, n, q_rows):
            qe = min(n, qs + q_rows)
            xq = db[qs:qe] if single else _prep(pool.block(qs, qe), metric).numpy()
            kb = min(kk, ce - cs)
            if gpu:
                D, I = faiss.knn_gpu(res, xq, xb, kb, metric=mt)
            elif search is not None:
                D, I = search(xq, xb, kb, mt)
            else:
                D, I = faiss.knn(xq, xb, kb, metric=mt)
            D = 1.0 - D if metric == "cosine" else D  # ascending in both cases now
            I = np.where(I >= 0, I + cs, -1)
            if single:
                _faiss_finish(pool, np.arange(qs, qe), I, D, k, metric, out, xq)
                if progress is not None:
                    progress(qe - qs)
            else:
                acc[0][qs:qe], acc[1][qs:qe] = _merge(acc[0][qs:qe], acc[1][qs:qe], D, I, kk)
    if not single:
        for qs in range(0, n, q_rows):
            qe = min(n, qs + q_rows)
            _faiss_finish(pool, np.arange(qs, qe), acc[1][qs:qe], acc[0][qs:qe], k, metric, out, None)
            if progress is not None:
                progress(qe - qs)


def _merge(D1, I1, D2, I2, kk):
    D = np.concatenate([D1, D2], 1)
    I = np.concatenate([I1, I2], 1)
    part = np.argpartition(D, kk - 1, axis=1)[:, :kk] if D.shape[1] > kk else np.argsort(D, 1)
    D, I = np.take_along_axis(D, part, 1), np.take_along_axis(I, part, 1)
    o = np.argsort(D, axis=1, kind="stable")
    return np.take_along_axis(D, o, 1), np.take_along_axis(I, o, 1)


def _faiss_finish(pool, rows, I, D, k, metric, out, xq):
    """FAISS results -> output rows. Cosine distances from unit vectors are float32-accurate;
    l2 ones (|a|^2 + |b|^2 - 2ab in BLAS) are recomputed from the rows, then square-rooted."""
    I = np.asarray(I, np.int64)
    D = np.where(I < 0, np.inf, D).astype(np.float32)
    if metric == "l2":
        q = torch.from_numpy(np.ascontiguousarray(xq)) if xq is not None else None
        D = _refine(pool, rows, I, metric, q).numpy()
        D = np.where(I < 0, np.float32(np.inf), D)
    else:
        np.clip(D, 0.0, 2.0, out=D)
    ii, dd = finish_rows(rows, torch.from_numpy(I), torch.from_numpy(D), k)
    out[0][rows[0]:rows[-1] + 1] = ii
    out[1][rows[0]:rows[-1] + 1] = dd


def _memory_limit() -> int:
    """Half of the memory available now: how much of the pool FAISS may hold in float32."""
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.5)
    except Exception:  # psutil is a dependency, but a broken one must not stop a search
        return 4 * 2**30


def default_nlist(n: int) -> int:
    """Cells of the coarse partition: about 4 sqrt(N), so each holds ~sqrt(N)/4 points."""
    return int(max(1, min(n // 39 if n >= 39 else 1, round(4 * math.sqrt(n)))))


def _faiss_ivf(pool: Pool, *, k, metric, dev, budget, out, progress, seed, nlist=None, nprobe=None,
               train_per_cell=None, niter=None, index="auto", memory_limit_bytes=None, compute_dtype=None,
               target_recall=None, tune_rows=None):
    """IVF search of every row against an IVF index of the pool (self-join through FAISS).

    nprobe=None tunes it: the smallest of NPROBE_LADDER whose recall@k on `tune_rows` sample rows,
    less two standard errors, reaches `target_recall` (see `tune_nprobe`).
    """
    faiss = _import_faiss()
    n, d = pool.shape
    kk = k + 1
    nlist = min(nlist or default_nlist(n), n)
    train_per_cell = train_per_cell or 40
    niter = 10 if niter is None else niter
    target_recall = DEFAULT_TARGET_RECALL if target_recall is None else target_recall
    mt = faiss_metric(metric)
    limit = memory_limit_bytes or _memory_limit()
    if index == "auto":
        index = "flat" if n * d * 4 <= limit else ("sq16" if n * d * 2 <= limit else "sq8")
    quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    if index == "flat":
        ix = faiss.IndexIVFFlat(quantizer, d, nlist, mt)
    else:
        qt = faiss.ScalarQuantizer.QT_fp16 if index == "sq16" else faiss.ScalarQuantizer.QT_8bit
        ix = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, qt, mt)
    ix.cp.seed = seed
    ix.cp.niter = niter
    ix.cp.spherical = metric == "cosine"
    ntrain = min(n, nlist * train_per_cell)
    ix.cp.max_points_per_centroid = max(train_per_cell, ix.cp.max_points_per_centroid)
    rng = np.random.default_rng([seed, 0x1F])
    sample = np.sort(rng.choice(n, size=ntrain, replace=False))
    log_memory_estimate("knn_graph faiss IVF (index)", n * d * {"flat": 4, "sq16": 2, "sq8": 1}[index])
    xt = _prep(gather_rows(pool, sample), metric).numpy()
    ix.train(xt)
    # Rows whose exact neighbours are found alongside the add pass (one read of the pool) to tune
    # nprobe: a seeded subset of the training sample.
    tune = None
    if nprobe is None:
        m = min(n, tune_rows or DEFAULT_TUNE_ROWS)
        pick = np.sort(np.random.default_rng([seed, 0x2A]).choice(ntrain, size=min(m, ntrain), replace=False))
        tune = _TuneSet(rows=sample[pick], xq=np.ascontiguousarray(xt[pick]), kk=kk, metric=mt)
    del xt
    if dev.type == "cuda" and _faiss_gpus(faiss) > 0:  # untested here: no FAISS-GPU on our GPU hosts
        ix = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), dev.index or 0, ix)
    rows = rows_per_block(4 * d, budget // 2, maximum=n)
    for s, e in pool.block_ranges(rows=rows):
        xb = _prep(pool.block(s, e), metric).numpy()
        ix.add(xb)
        if tune is not None:
            tune.scan(xb, s, faiss)
    info = {"nlist": nlist, "index": index, "train_rows": ntrain, "niter": niter}
    if tune is None:
        nprobe = min(nprobe, nlist)
    else:
        nprobe, est = tune_nprobe(ix, tune, pool, k, metric, nlist, target_recall)
        info.update(est)
    ix.nprobe = nprobe
    info["nprobe"] = nprobe
    log.info("knn_graph faiss IVF: nlist=%d nprobe=%d%s", nlist, nprobe,
             "" if tune is None else f" (tuned: sample recall {info['tune_recall']:.4f} +- {info['tune_recall_se']:.4f}"
             f" for target {target_recall})")
    q_rows = rows_per_block(4 * d + 12 * kk, budget // 4, maximum=n)
    for s, e in pool.block_ranges(rows=q_rows):
        xq = _prep(pool.block(s, e), metric).numpy()
        D, I = ix.search(xq, kk)
        D = 1.0 - D if metric == "cosine" else D
        # Compressed indexes return approximate distances: recompute them exactly in float32.
        if index != "flat" and metric == "cosine":
            D = _refine(pool, np.arange(s, e), np.asarray(I, np.int64), metric, torch.from_numpy(xq)).numpy()
        _faiss_finish(pool, np.arange(s, e), I, D, k, metric, out, xq)
        if progress is not None:
            progress(e - s)
    return info


#: nprobe values tried, in order, when nprobe is tuned (capped at nlist).
NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
#: Recall@k that tuned approximate search aims for (its lower 2-SE bound on the sample).
DEFAULT_TARGET_RECALL = 0.95
#: Sample rows whose exact neighbours tune nprobe (~ 1 s per 1M x 128 rows of pool on 2 cores).
DEFAULT_TUNE_ROWS = 1000


@dataclass
class _TuneSet:
    """Sample rows and their exact top-kk so far, merged block by block during the add pass."""
    rows: np.ndarray      # [m] int64 pool indices, ascending
    xq: np.ndarray        # [m, d] float32 prepped rows
    kk: int
    metric: int           # faiss metric constant
    D: np.ndarray | None = None  # [m, kk] faiss scores turned ascending (1 - ip, or squared l2)
    I: np.ndarray | None = None

    def scan(self, xb: np.ndarray, start: int, faiss, knn=None) -> None:
        """Merge the block xb (rows start.. of the pool) in; knn(xq, xb, k, metric) -> (D, I)
        replaces faiss.knn (e.g. split over worker threads)."""
        kb = min(self.kk, xb.shape[0])
        D, I = (knn or faiss.knn)(self.xq, xb, kb, metric=self.metric)
        D = 1.0 - D if self.metric == faiss.METRIC_INNER_PRODUCT else D
        I = np.asarray(I, np.int64) + start
        if self.D is None:
            self.D, self.I = D, I
        else:
            self.D, self.I = _merge(self.D, self.I, D, I, self.kk)

    def exact(self, pool: Pool, metric: str, k: int):
        """The sample's exact k nearest other rows once every block was scanned: (indices [m, k]
        int64, distances [m, k] float32 recomputed from the rows, self dropped)."""
        d = _refine(pool, self.rows, self.I, metric, torch.from_numpy(self.xq))
        return finish_rows(self.rows, torch.from_numpy(self.I), d, k)


def nprobe_ladder(nlist: int) -> list[int]:
    """The nprobe values tuning may choose for `nlist` cells, ascending, ending at nlist."""
    return [p for p in NPROBE_LADDER if p < nlist] + [nlist]


def mean_se(per_row: np.ndarray) -> tuple[float, float]:
    """Mean of per-row recalls and its standard error."""
    m = len(per_row)
    return float(per_row.mean()), float(per_row.std(ddof=1) / math.sqrt(m)) if m > 1 else 0.0


def tuned(p: int, memo: dict, m: int, target: float) -> tuple[int, dict]:
    """(p, info) for the chosen nprobe p, from the (mean, se) measured per tried nprobe in `memo`;
    warns when even p misses the target (only when p is the last of the ladder)."""
    r, se = memo[p]
    if r - 2 * se < target:
        log.warning("knn_graph: nprobe=%d (every cell) gives sample recall %.4f, below target_recall %.3f", p, r,
                    target)
    return p, {"tune_recall": r, "tune_recall_se": se, "tune_rows": int(m), "target_recall": target,
               "tune_tried": {str(key): round(v[0], 4) for key, v in sorted(memo.items())}}


def tune_nprobe(ix, tune: _TuneSet, pool: Pool, k: int, metric: str, nlist: int, target: float):
    """Smallest nprobe of NPROBE_LADDER (<= nlist) whose sample recall@k minus two standard errors
    reaches `target`; nlist (exhaustive over cells) if none does. Recall is tie-aware and uses
    exact float32 distances of the found candidates, as `recall_at_k` does."""
    rows = tune.rows
    q = torch.from_numpy(tune.xq)
    exact = KNNGraph(*tune.exact(pool, metric, k), metric, k)
    ladder = nprobe_ladder(nlist)
    lo, hi = 0, len(ladder) - 1
    memo = {}

    def measure(p):
        if p not in memo:
            ix.nprobe = p
            _, I = ix.search(tune.xq, tune.kk)
            I = np.asarray(I, np.int64)
            D = _refine(pool, rows, I, metric, q).numpy()
            ii, dd = finish_rows(rows, torch.from_numpy(I), torch.from_numpy(np.where(I < 0, np.inf, D)), k)
            memo[p] = mean_se(_recall_rows(KNNGraph(ii, dd, metric, k), exact))
        r, se = memo[p]
        return r - 2 * se >= target

    # Recall grows with nprobe: binary search the ladder for the first one that passes (each
    # measurement is a search of the sample).
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(ladder[mid]):
            hi = mid
        else:
            lo = mid + 1
    measure(ladder[lo])
    return tuned(ladder[lo], memo, rows.size, target)
