"""Selection strategies over a pool's scores: Cluster-Margin (Citovsky et al. 2021).

`cluster_margin` = the k_m lowest margins among the eligible points (np.argpartition, never a full
sort of N), then the round-robin over their clusters (sampler.py).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ._device import rows_per_block
from ._validate import as_index_array, as_labels, check_float, check_int, check_length, check_nonempty
from .sampler import ORDERS, _round_robin, as_generator, check_unique

log = logging.getLogger("cm_engine")


def as_scores(name: str, value) -> np.ndarray:
    """1-D finite real scores -> numpy float32/float64 (float16/bfloat16/int widened to float32/64)."""
    from .pool import open_array

    arr = open_array(value, name=name)
    if isinstance(arr, torch.Tensor):
        t = arr.detach()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        arr = t.cpu().numpy()
    elif not isinstance(arr, np.ndarray) and hasattr(arr, "read"):  # shards / bfloat16 memmap
        blk = arr.read(0, len(arr))
        arr = blk.float().numpy() if isinstance(blk, torch.Tensor) else np.asarray(blk)
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of scores, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name}: expected real-valued scores, got dtype {arr.dtype}")
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)  # argpartition on float16 is slow; float32 is exact for it
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}: expected finite scores, got {int(bad.sum())} NaN/inf value(s), "
                         f"e.g. {arr[i]} at index {i}")
    return arr


def lowest_k(scores: np.ndarray, k: int, *, keep: np.ndarray | None = None, block_rows: int | None = None) -> np.ndarray:
    """Pool indices of the k lowest scores (among `keep`, a bool [N] mask, when given), ascending by index.

    Ties at the k-th value go to the lowest indices, i.e. the result equals the first k of a stable
    argsort. O(N) time (argpartition per block plus one pass for the boundary ties), never a full
    sort of N. Memory: blocks of `block_rows` rows (default: from the byte budget, see
    _device.budget_bytes) merged with the running best k, so the int64 temporaries stay
    O(block + k) rather than O(N).
    """
    n = scores.size
    if k >= (n if keep is None else int(np.count_nonzero(keep))):
        # every (eligible) point: no selection (a partition and sort of ~N would cost 30+ ms at 1M)
        return np.arange(n, dtype=np.int64) if keep is None else np.flatnonzero(keep).astype(np.int64, copy=False)
    if block_rows is None:
        block_rows = rows_per_block(24, maximum=n) if n else 1  # value copy + int64 index + argpartition
    block_rows = max(block_rows, 1)
    best = np.zeros(0, dtype=np.int64)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        v = scores[start:stop]
        kk = k
        if keep is not None:
            kb = keep[start:stop]
            ne = int(np.count_nonzero(kb))
            if ne < v.size:
                # excluded -> +inf: with kk <= eligible count and finite eligible scores, an
                # excluded point can never be among the kk lowest, not even through a tie
                v = np.where(kb, v, np.inf)
            kk = min(k, ne)
        sel = _lowest_positions(v, kk)
        if start:
            sel += start
        if best.size:
            # best < start and both ascending: position order is index order, so the
            # lowest-position tie rule stays the lowest-index rule across blocks
            cat = np.concatenate([best, sel])
            sel = cat[_lowest_positions(scores[cat], k)]
        best = sel
    return best


def _lowest_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k lowest values, ascending; ties at the k-th value to the lowest positions."""
    n = scores.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(scores, k - 1)
    t = scores[part[k - 1]]
    head = part[:k]
    # argpartition puts every value < t before position k-1, but which of the values == t land
    # there is up to its internals: take all < t, then the lowest positions among == t.
    less = head[scores[head] < t]
    ties = np.flatnonzero(scores == t)[: k - less.size]
    out = np.concatenate([less, ties]).astype(np.int64, copy=False)
    out.sort()
    return out


def cluster_margin(scores, labels, budget, *, km_ratio=10.0, exclude=None, seed=0, order="smallest",
                   label_aware=False, dedup_graph=None, delta=None) -> np.ndarray:
    """Cluster-Margin selection: round-robin over the clusters of the k_m lowest-margin eligible points.

    scores:   float [N] margins (lower = more uncertain), numpy/torch/memmap/.npy path; finite.
    labels:   int [N] cluster labels of the pool (from `cluster`).
    budget:   int >= 0, points to pick (k_t). When it exceeds the eligible points, all eligible
              points come back in round-robin order (not an error).
    km_ratio: float >= 1; k_m = round(km_ratio * budget) (Python round: halves to even),
              capped at the number of eligible points.
    exclude:  optional unique int pool indices never returned (already labeled or already picked).
    seed:     int >= 0 or numpy.random.Generator.
    order:    cluster visiting order, see `round_robin`: "smallest" (the paper's, default),
              "largest" or "random".
    label_aware: visit first the clusters that hold no excluded point (`exclude` is the labeled set);
              see `round_robin(labeled=...)`.
    dedup_graph: optional k-NN graph of the pool (KNNGraph or (indices, distances)); when given,
              the candidates first pass the near-duplicate filter (`redundancy.filtered_cluster_margin`:
              drop candidates within `delta` of a labeled or earlier-kept point; delta=None picks
              it from the graph with `redundancy.auto_delta`, tens of ms at 1M: in a loop over
              rounds, compute it once and pass it, as the selectors do).

    Candidates: the k_m lowest scores among the points not in `exclude`; ties at the k_m-th value
    go to the lowest pool indices. The candidates enter the round-robin sorted by pool index, so the
    result depends only on (scores, labels, budget, options, exclude set, seed).

    Returns int64 [min(budget, eligible)] pool indices in visiting order.
    """
    s = as_scores("scores", scores)
    n = s.shape[0]
    check_nonempty("scores", n)
    labels = as_labels("labels", labels, n=n, other="scores")
    budget = check_int("budget", budget, min=0)
    km_ratio = check_float("km_ratio", km_ratio, min=1.0)
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    if not isinstance(label_aware, (bool, np.bool_)):
        raise TypeError(f"label_aware: expected a bool, got {type(label_aware).__name__}")
    if dedup_graph is not None:
        from .redundancy import filtered_cluster_margin  # redundancy imports this module

        return filtered_cluster_margin(s, labels, dedup_graph, budget, km_ratio=km_ratio, delta=delta,
                                       exclude=exclude, seed=seed, order=order, label_aware=label_aware)
    if delta is not None:
        raise ValueError(f"delta: applies only with dedup_graph, got delta={delta!r} and dedup_graph=None")
    rng = as_generator(seed)
    excl = None
    if exclude is not None:
        excl = as_index_array("exclude", exclude, n=n, unique=False)
        check_unique("exclude", excl, n)
    km = int(round(km_ratio * budget))
    if budget == 0:
        return np.zeros(0, dtype=np.int64)
    keep = None
    if excl is not None and excl.size:
        keep = np.ones(n, dtype=np.bool_)
        keep[excl] = False
    cand = lowest_k(s, km, keep=keep)
    log.debug("cluster_margin: %d eligible, k_m=%d candidates, budget %d", n - (0 if excl is None else excl.size),
              cand.size, budget)
    labeled = excl if (label_aware and excl is not None) else None
    return _round_robin(cand, labels, budget, rng, order=order, labeled=labeled)
