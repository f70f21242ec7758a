"""Pool -> k-NN graph -> merge list -> flat clusters, through the on-disk cache.

`cluster` validates everything (and checks that `cache_dir` is writable) before any expensive
work, then:

1. fingerprints the pool (`Pool.fingerprint`: sampled rows, cheap on any size) when caching;
2. loads the merge list from the cache if present and valid: the graph is then not needed and
   not even opened, which is what makes a cached re-run on a 1M pool take well under 2 s;
3. otherwise loads the k-NN graph from the cache (or builds it with `knn_graph`, written in place
   into the cache's staging directory, then committed), runs `hac_merges` to completion
   (``max_epsilon=None``: the whole dendrogram, so any epsilon is a cheap cut) and caches it;
4. cuts the merge list at `epsilon`, or at the epsilon whose cut has the mean cluster size
   closest to `target_mean_size` (`hac.epsilon_for_mean_size`).

Cache keys: the graph entry is keyed by (pool fingerprint, "knn_graph", `GraphParams`), the merge
list by (pool fingerprint, "hac_merges", `ClusterParams`), which holds the graph's parameters
too, so a change of k, metric, backend, exactness, seed, backend options or HAC rule is a new
entry. The device is not part of the key: a graph built on a GPU is reused on the CPU.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from ._device import peak_rss_bytes
from ._validate import check_float
from .knn import check_graph_args
from .pool import Pool

log = logging.getLogger("cm_engine")



@dataclass(frozen=True)
class GraphParams:
    """What the k-NN graph depends on besides the pool (the graph's cache key)."""

    k: int = 16
    metric: str = "cosine"
    backend: str = "auto"
    exact: bool | None = None
    seed: int = 0
    options: tuple = ()  # sorted (name, value) pairs of knn_graph backend options


@dataclass(frozen=True)
class ClusterParams:
    """Everything the merge list depends on besides the pool (the merge list's cache key):
    the graph's parameters and `hac.HACParams` (missing-pair rule, algorithm version, ...), with
    HAC's defaults filled in, so a change of a default or of the algorithm is a new entry."""

    graph: GraphParams = field(default_factory=GraphParams)
    hac: object = None  # a hac.HACParams (frozen)


@dataclass
class Clustering:
    """Flat clusters of a pool and the merge list they were cut from.

    labels: int64 [N], contiguous from 0. n_clusters: number of distinct labels. epsilon: the
    linkage threshold of the cut (every merge at height <= epsilon applied). target_mean_size:
    the requested mean size, or None when epsilon was given. merges: the full `hac.Merges`.
    timings: seconds per stage ("fingerprint", "graph", "hac", "cut", "total").
    cache_hits: per stage (graph, merges): True (loaded), False (built), None (not needed).
    graph: the pool's k-NN graph (`knn.KNNGraph`) behind the clusters, e.g. for the near-duplicate
      filter (`redundancy`); see the property.
    """

    labels: np.ndarray
    n_clusters: int
    epsilon: float
    target_mean_size: float | None
    merges: object
    k: int
    metric: str
    params: ClusterParams | None = None
    timings: dict = field(default_factory=dict)
    cache_hits: dict = field(default_factory=dict)
    #: the graph itself, or a callable that returns it (read on first use of `graph`), or None
    graph_source: object = field(default=None, repr=False, compare=False)

    @property
    def graph(self):
        """The k-NN graph (`knn.KNNGraph`) the clusters were built from. Built without a cache, it is
        the graph `cluster` built (kept); with a cache it is read from the cache entry on first
        access (memory-mapped; rebuilt into the cache if the entry is gone), so a cached re-run
        that never needed the graph does not pay for it unless asked."""
        src = self.graph_source
        if src is None:
            raise ValueError("graph: this Clustering holds no graph (it was not made by `cluster`)")
        if callable(src):
            src = self.graph_source = src()
        return src

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def mean_size(self) -> float:
        return self.n / max(1, self.n_clusters)

    def recut(self, epsilon=None, target_mean_size=None) -> "Clustering":
        """The same merge list cut at another `epsilon` or `target_mean_size` (exactly one).
        No graph or HAC work: one pass over the merge list. Equals a fresh `cluster` call."""
        t0 = time.perf_counter()
        eps, target = _check_cut_args(epsilon, target_mean_size)
        labels, eps = _cut(self.merges, eps, target)
        return replace(self, labels=labels, n_clusters=_n_clusters(labels), epsilon=eps,
                       target_mean_size=target, timings={"cut": time.perf_counter() - t0},
                       cache_hits={})


def _check_cut_args(epsilon, target_mean_size):
    if (epsilon is None) == (target_mean_size is None):
        raise ValueError("epsilon/target_mean_size: expected exactly one of them, got "
                         + ("both" if epsilon is not None else "neither"))
    if epsilon is not None:
        return check_float("epsilon", epsilon, min=0.0), None
    return None, check_float("target_mean_size", target_mean_size, min=1.0)


def _cut(merges, eps, target):
    from .hac import cut, epsilon_for_mean_size

    if eps is None:
        eps = epsilon_for_mean_size(merges, target)
    return cut(merges, eps), float(eps)


def _n_clusters(labels: np.ndarray) -> int:
    return int(labels.max()) + 1 if labels.size else 0


def _stage_done(timings: dict, stage: str, t0: float) -> float:
    t = time.perf_counter()
    timings[stage] = t - t0
    log.info("cluster: %s took %.3f s (peak RSS %.0f MiB)", stage, timings[stage], peak_rss_bytes() / 2**20)
    return t


def cluster(embeddings, *, epsilon=None, target_mean_size=None, k: int = 16, metric: str = "cosine",
            backend: str = "auto", device="auto", cache_dir=None, seed: int = 0, budget_bytes=None,
            progress: Callable | None = None, exact: bool | None = None, missing: str | None = None,
            missing_value: float | None = None, relink: int | None = None, verify: str = "full",
            full_fingerprint: bool = False,
            **options) -> Clustering:
    """Average-linkage HAC clusters of `embeddings` [N, d] over its k-NN graph, cached.

    embeddings: array, memmap, torch tensor or path to a `.npy` (never read whole).
    epsilon (>= 0) | target_mean_size (>= 1): exactly one; the cut's linkage threshold, or the
      mean cluster size whose epsilon is chosen from the merge list.
    k, metric ("cosine" | "l2"), backend, device, exact, seed, budget_bytes, **options: passed to
      `knn_graph` (options are its backend options: nlist, nprobe, ...). missing, missing_value:
      how pairs that are not graph edges count in the linkage (see `hac`). None: "exact" for
      cosine (exact average linkage from the embeddings, the graph only restricting which
      clusters may merge), "constant" for l2. relink: with "exact", every time the clusters have
      halved in number each one is also linked to its `relink` nearest clusters by the direction of
      their row sums, so merges are not limited to k-NN edges (see `hac`); None: 16 for "exact", 0
      (off) otherwise.
    cache_dir: directory of the on-disk cache (created if needed; must be writable), or None.
    verify: "full" (checksum cached arrays on load) or "size". full_fingerprint: hash every byte
      of the pool for the key instead of the default sample of rows.
    progress: optional callable(n_rows_done) for the graph build.
    Returns a `Clustering` (labels int64 [N], n_clusters, epsilon, merges, timings, cache_hits).
    """
    t_start = time.perf_counter()
    eps, target = _check_cut_args(epsilon, target_mean_size)
    pool = Pool(embeddings, name="embeddings")
    k, seed = check_graph_args(pool, k=k, metric=metric, backend=backend, exact=exact, seed=seed)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress: expected a callable or None, got {type(progress).__name__}")
    from .hac import HACParams, Merges, hac_merges

    if missing is None:
        missing = "exact" if metric == "cosine" else "constant"
    hac_kw = {key: v for key, v in (("missing", missing), ("missing_value", missing_value), ("relink", relink))
              if v is not None}
    hparams = HACParams(**hac_kw)  # validates missing / missing_value (ValueError naming them)
    if hparams.missing == "exact" and metric != "cosine":
        raise ValueError(f'missing: "exact" is for metric "cosine", got metric {metric!r} (use "constant")')
    gparams = GraphParams(k=k, metric=metric, backend=backend, exact=None if exact is None else bool(exact),
                          seed=seed, options=tuple(sorted(options.items())))
    params = ClusterParams(graph=gparams, hac=hparams)
    cache = None
    if cache_dir is not None:
        from .cache import ArrayCache

        cache = ArrayCache(cache_dir, verify=verify)  # raises ValueError before any work
    timings: dict = {}
    hits: dict = {"graph": None, "merges": None}

    merges = None
    built = None
    t = t_start
    if cache is not None:
        from .cache import cache_key

        fp = pool.fingerprint(full=full_fingerprint)
        t = _stage_done(timings, "fingerprint", t)
        mkey = cache_key(fp, "hac_merges", params)
        got = cache.get("hac_merges", mkey)
        if got is not None:
            arr, man = got
            merges = Merges(int(man["extra"]["n"]), arr["a"], arr["b"], arr["dist"], arr["size"])
            hits["merges"] = True
            t = _stage_done(timings, "hac", t)
    if merges is None:
        graph = _graph(pool, gparams, cache, fp if cache is not None else None, hits,
                       device=device, budget_bytes=budget_bytes, progress=progress)
        t = _stage_done(timings, "graph", t)
        built = graph if cache is None else None  # kept for Clustering.graph (no cache to reload from)
        merges = hac_merges(graph, embeddings=pool if hparams.missing == "exact" else None, max_epsilon=None,
                            device=device, budget_bytes=budget_bytes, **hac_kw)
        del graph
        if cache is not None:
            hits["merges"] = False
            cache.put("hac_merges", mkey, {"a": merges.a, "b": merges.b, "dist": merges.dist, "size": merges.size},
                      params=params, extra={"n": merges.n, "fingerprint": fp})
        t = _stage_done(timings, "hac", t)
    labels, eps = _cut(merges, eps, target)
    t = _stage_done(timings, "cut", t)
    timings["total"] = t - t_start
    out = Clustering(labels=labels, n_clusters=_n_clusters(labels), epsilon=eps, target_mean_size=target,
                     merges=merges, k=k, metric=metric, params=params, timings=timings, cache_hits=hits,
                     graph_source=built if cache is None else _graph_loader(pool, gparams, cache, fp, device,
                                                                            budget_bytes))
    log.info("cluster: N=%d k=%d metric=%s epsilon=%.6g -> %d clusters (mean size %.2f) in %.2f s, cache %s",
             pool.n, k, metric, eps, out.n_clusters, out.mean_size, timings["total"], hits)
    return out


def _graph_loader(pool: Pool, gp: GraphParams, cache, fp, device, budget_bytes):
    """Clustering.graph's source with a cache: the cached graph entry (built there if missing)."""
    return lambda: _graph(pool, gp, cache, fp, {}, device=device, budget_bytes=budget_bytes, progress=None)


def _graph(pool: Pool, gp: GraphParams, cache, fp, hits, *, device, budget_bytes, progress):
    """The k-NN graph of the pool: from the cache if valid, else built (in place in the cache)."""
    from .knn import KNNGraph, knn_graph

    kw = dict(k=gp.k, metric=gp.metric, backend=gp.backend, device=device, exact=gp.exact, seed=gp.seed,
              budget_bytes=budget_bytes, progress=progress, **dict(gp.options))
    if cache is None:
        return knn_graph(pool.array, **kw)
    from .cache import cache_key

    gkey = cache_key(fp, "knn_graph", gp)
    got = cache.get("knn_graph", gkey)
    if got is not None:
        arr, man = got
        hits["graph"] = True
        return KNNGraph(indices=arr["indices"], distances=arr["distances"], metric=gp.metric, k=gp.k,
                        info=dict(man["extra"].get("info", {}), cached=True))
    hits["graph"] = False
    staging = cache.staging_dir()
    try:
        g = knn_graph(pool.array, out_dir=staging, **kw)
    except BaseException:
        cache.discard_staging(staging)
        raise
    info = {key: v for key, v in g.info.items() if isinstance(v, (str, int, float, bool, type(None)))}
    cache.put("knn_graph", gkey, {"indices": g.indices, "distances": g.distances}, params=gp,
              extra={"n": pool.n, "fingerprint": fp, "info": info}, staging=staging)
    return g
