"""Average-linkage agglomerative clustering (HAC) over a sparse k-NN graph, as merge rounds.

Algorithm: RAC, reciprocal-nearest-neighbour agglomerative clustering (Sumengen et al.,
"Scaling Hierarchical Agglomerative Clustering to Billion-sized Datasets", 2021). In each
round every cluster finds its nearest neighbour among the clusters it shares a graph edge
with (ties broken by the smaller slot index, so runs are deterministic); every reciprocal
pair (A's nearest is B and B's nearest is A) merges in that same round; the edges of merged
clusters are relabelled and coalesced (sort + segment sums). Each round is a handful of
whole-array torch operations on one device (CPU or CUDA); only the loop over rounds is Python.
On the CPU the two heaviest steps (each cluster's nearest neighbour, the linkages of re-coalesced
edges; `_hac_kernels.CPU_KERNELS`) and the coalescing's stable sort run as numba kernels instead:
the 3M-point synthetic HAC took 155 s against 190 s with torch's ops (2-core VM).

How missing pairs count (``missing=``). Every rule averages over point pairs and is exactly
S_AB / c_AB (S_AB: sum of the edge distances between A and B, c_AB: their number) when every
pair is an edge (c_AB = |A||B|), so all four are exact average linkage on a complete graph.

* ``"exact"`` (cluster()'s default for cosine; needs ``embeddings=`` and a cosine graph): no pair
  is missing. The mean cosine distance over all |A||B| point pairs is
  ``1 - (sum_A x) . (sum_B x) / (|A||B|)`` over unit rows x, so each cluster keeps the sum of its
  unit rows ([N, d] float32, float64 for float64 input) and the linkage is exact average linkage;
  the graph only decides which clusters may merge (those sharing an edge). A coalesced edge whose
  parts already cover every member pair takes the Lance-Williams update S / c (no gather); the
  others are computed from the sums. It costs more rounds and gathers of d floats per
  re-coalesced edge: about 2x the CPU time of "constant". With relinking (below, the default)
  it agrees with exact all-pairs average linkage far better than along graph edges alone
  (benchmarks/results/hac_ari.json, mean cluster size 10, k = 16).
* ``"constant"`` (the default without embeddings, i.e. for graph_hac on a bare graph, and for l2):
  the mean over ALL |A||B| point pairs, a pair that is not a graph edge counted at a constant C:
  ``L = (S_AB + C (|A||B| - c_AB)) / (|A||B|)``. C is ``missing_value`` if given (a good one is
  the mean distance of random pairs), else the largest k-th-neighbour distance in the graph (the
  farthest distance the graph vouches for). Average linkage over one fixed completed
  dissimilarity matrix: reducible, few rounds (~50). Far from exact on real data: ARI 0.4-0.5 on
  the text sets and 0.1 on CIFAR-10 at k = 16-32, since the far pairs of two clusters that share a
  few edges are all counted at C, whatever their true distances.
* ``"bound"``: a missing pair counts at (r_a + r_b) / 2, r_x being x's k-th neighbour distance:
  a lower bound of the true distance (if b is not among a's k nearest then d(a, b) >= r_a), kept
  from additive sums as ``(S_AB + (|B| R_A + |A| R_B) / 2 - M_AB) / (|A||B|)`` (R_A: sum of r
  over A; M_AB: the same imputed value summed over the edges). It underestimates far pairs, so
  one cluster grows by accretion: ARI near 0 and thousands of rounds.
* ``"edges"``: the mean over the pairs that are edges only, S_AB / c_AB (not reducible; chains
  like single linkage: ARI near 0).

Only clusters that share at least one edge are merge candidates, so a graph with several
components leaves several trees (fewer than n - 1 merges), unless relinking joins them.

Relinking (``relink=``, "exact" rule only; default 16). A k-NN graph says which points are near,
not which clusters are: once clusters hold more points than a point has edges, a cluster's
nearest neighbour under average linkage (the one whose mean unit row has the largest dot product
with its own) is often not among the clusters its members' edges reach, and merging along edges
alone then picks a worse partner. So each time the number of clusters has halved (n/2, n/4, ...),
and whenever the rounds stall, every cluster is also linked to the ``relink`` clusters whose row
sums point nearest its own (`knn.knn_graph` over the C cluster sums, cosine; approximate above
its exact threshold, at recall target 0.7: the links are candidates, each one's linkage is
computed exactly from the sums). The searches cover about n rows in all. ARI against exact
average linkage (k = 16, mean size 10): 0.918-0.981 → 1.000 on the quality benchmark's 3K
CIFAR-10 / Fashion-MNIST pools, 0.995 / 0.997 → 1.000 on Banking77 / CLINC150; on raw 1280-d
CIFAR-10 features (20K), where the cut itself is unstable (0.81 against itself under 1e-4
noise), no difference beyond that noise (mean 0.638 against 0.634 over five noisy copies at
k = 16; README, Exactness).
``relink=0`` merges along graph edges only (the engine before version 2 of the algorithm): the
1M-point synthetic HAC then takes about half the time.

Guarantee: on a complete graph (k = N - 1) every rule is exact average linkage; average
linkage is reducible, so RAC's merges are exactly those of sequential (scipy) average linkage
and ``cut(merges, eps)`` equals ``fcluster(linkage(X, "average"), eps, "distance")`` up to
relabelling (barring exact ties and float rounding of the heights); relinking adds nothing
there. On a k-NN graph each merge joins a reciprocal nearest-neighbour pair of adjacent clusters
under the rule above (RAC's exact rule: no approximation factor as in ParHAC/TeraHAC); without
relinking the result equals sequential graph HAC wherever that linkage is reducible over the
graph (restricting candidates to adjacent clusters can break reducibility in rare cases). With
or without it, the result approximates the complete-graph clustering, and the agreement is
measured (adjusted Rand index, benchmarks/results/hac_ari.json). Recorded heights are made
monotone along the tree (each merge's height is at least its children's), which changes
nothing when the linkage is reducible and keeps every cut consistent otherwise.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from . import _hac_kernels as K
from ._device import budget_bytes as _budget, log_memory_estimate, resolve_device
from ._validate import check_choice, check_float

log = logging.getLogger("cm_engine")

MISSING = ("exact", "constant", "bound", "edges")
#: Bumped whenever the merges produced for the same input change (part of the cache key).
#: 2: relinking (on by default with the "exact" rule). 3: approximate relink searches at recall
#: target 0.7 (was 0.8), and ranked in float16 on a GPU. 4: on the CPU, linkages from float64 dots
#: of the row sums (`_hac_kernels.cosine_linkage`; were float32 for float32 pools).
ALGORITHM_VERSION = 4
#: Default relink k': at each halving of the cluster count every cluster is linked to the k'
#: clusters whose row sums point nearest its own (see the module docstring).
RELINK_K = 16
#: target_recall of the search for those clusters when it is approximate (many clusters). The
#: sums of sub-clusters of one blob point in nearly the same direction, so recall rises slowly with
#: the cells probed (48K sums of the 1M synthetic pool: 0.69 / 0.75 / 0.84 at 2 / 5 / 14 cells,
#: 0.85 / 1.46 / 3.26 s); 0.7 against 0.8 left the agreement with exact average linkage as it was
#: (ARI, searches forced approximate: Banking77 10K 1.000 / 0.9988 at 0.8 / 0.7, CLINC150 15K
#: 1.000 / 1.000, CIFAR-10 PCA-128 20K 0.8946 / 0.8971; exact searches 1.000 / 1.000 / 0.8998).
RELINK_RECALL = 0.7
#: Matmul dtype of the relink search on a GPU with the torch backend (see `_relink_dtype`).
RELINK_HALF = "float16"


@dataclass(frozen=True)
class HACParams:
    """Parameters of `hac_merges` (also the cache key of a merge list). missing defaults to
    "exact", cluster()'s rule for cosine pools (hac_merges on a bare graph, and l2, use "constant")."""

    missing: str = "exact"
    missing_value: float | None = None
    max_epsilon: float | None = None
    relink: int | None = None  # None: RELINK_K for "exact", else 0 (filled in, so the key is explicit)
    linkage: str = "average"
    algorithm: str = "rac"
    version: int = ALGORITHM_VERSION

    def __post_init__(self):
        check_choice("missing", self.missing, MISSING)
        if self.relink is None:
            object.__setattr__(self, "relink", RELINK_K if self.missing == "exact" else 0)
        if isinstance(self.relink, bool) or not isinstance(self.relink, (int, np.integer)) or self.relink < 0:
            raise ValueError(f"relink: expected an int >= 0 (0 = off) or None, got {self.relink!r}")
        object.__setattr__(self, "relink", int(self.relink))
        if self.relink and self.missing != "exact":
            raise ValueError(f'relink: needs missing="exact" (it links clusters by their row sums), '
                             f"got relink={self.relink} with missing={self.missing!r}")
        if self.missing_value is not None:
            check_float("missing_value", self.missing_value, min=0.0)
        if self.max_epsilon is not None:
            check_float("max_epsilon", self.max_epsilon, min=0.0)
        check_choice("linkage", self.linkage, ("average",))
        check_choice("algorithm", self.algorithm, ("rac",))


@dataclass(frozen=True)
class Merges:
    """A merge list in scipy's linkage convention, sorted by height.

    Leaves are 0..n-1; the i-th merge joins nodes a[i] < b[i] into node n + i at linkage
    distance dist[i], giving a cluster of size[i] points. m = len(a) <= n - 1 (a graph with
    several components, or a run stopped at max_epsilon, leaves several trees).
    a, b, size: int64 [m]; dist: float64 [m], non-decreasing.
    """

    n: int
    a: np.ndarray
    b: np.ndarray
    dist: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def to_linkage(self) -> np.ndarray:
        """float64 [m, 4] rows (a, b, dist, size); a full scipy linkage matrix when m == n - 1."""
        return np.stack([self.a.astype(np.float64), self.b.astype(np.float64),
                         self.dist.astype(np.float64), self.size.astype(np.float64)], axis=1)


# ---------------------------------------------------------------------------------------------
# Input: a k-NN graph object, an (indices, distances) pair, or a scipy.sparse distance matrix.


def _to_numpy(x, name):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, (np.ndarray, np.memmap)):
        return x
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from e


def _graph_edges(graph, device, budget):
    """Validate `graph` and return (n, key, dist, r) as tensors on `device`: the directed edges
    without self-loops or missing entries as undirected pair keys min(i, j) * n + max(i, j)
    (int64 [e]) with their distances (float [e], the graph's float dtype), and r (float64 [n])
    each row's largest distance. Keys, not (src, dst) pairs: a third of the memory at 10M x 16."""
    import scipy.sparse as sp

    if sp.issparse(graph):
        g = sp.csr_matrix(graph)
        if g.ndim != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"graph: expected a square sparse distance matrix, got shape {g.shape}")
        n = g.shape[0]
        g.sort_indices()
        data = np.asarray(g.data)
        if data.size and not np.all(np.isfinite(data)):
            raise ValueError("graph: expected finite distances, got non-finite entries")
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(g.indptr))
        cols = g.indices.astype(np.int64)
        if np.any(rows == cols):
            raise ValueError(f"graph: expected no self-loops, got {int(np.sum(rows == cols))} diagonal entries")
        r = np.zeros(n)
        nz = np.diff(g.indptr) > 0
        if data.size:
            r[nz] = np.maximum.reduceat(data.astype(np.float64), g.indptr[:-1][nz])
        t = lambda a: torch.as_tensor(a).to(device)
        return n, t(np.minimum(rows, cols) * n + np.maximum(rows, cols)), t(data.astype(np.float64)), t(r)

    if isinstance(graph, tuple) and len(graph) == 2:
        indices, distances = graph
    elif hasattr(graph, "indices") and hasattr(graph, "distances"):
        indices, distances = graph.indices, graph.distances
    else:
        raise TypeError("graph: expected an object with .indices and .distances, an (indices, distances) "
                        f"pair or a scipy.sparse distance matrix, got {type(graph).__name__}")
    indices = _to_numpy(indices, "graph.indices")
    distances = _to_numpy(distances, "graph.distances")
    if indices.ndim != 2:
        raise ValueError(f"graph.indices: expected a 2-D array [N, k], got shape {indices.shape}")
    if distances.shape != indices.shape:
        raise ValueError(f"graph.distances: expected shape {indices.shape} (the shape of graph.indices), "
                         f"got {distances.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"graph.indices: expected integer indices, got dtype {indices.dtype}")
    if not np.issubdtype(distances.dtype, np.floating):
        raise TypeError(f"graph.distances: expected floating distances, got dtype {distances.dtype}")
    n, k = indices.shape
    gn = getattr(graph, "n", None)
    if gn is not None and not isinstance(graph, tuple) and int(gn) != n:
        raise ValueError(f"graph.n: expected {n} (the rows of graph.indices), got {gn}")
    rows_blk = max(1, _budget(budget) // max(1, 48 * k))
    keys, dist, rr = [], [], []
    for s in range(0, n, rows_blk):
        e = min(n, s + rows_blk)
        idx = torch.from_numpy(np.array(indices[s:e], dtype=np.int64)).to(device)
        dd = torch.from_numpy(np.array(distances[s:e], dtype=np.float64 if distances.dtype == np.float64
                                       else np.float32)).to(device)
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= n):
            bad = int(idx.min()) if int(idx.min()) < -1 else int(idx.max())
            raise ValueError(f"graph.indices: expected indices in [0, {n}) or -1 for missing, got {bad}")
        valid = idx >= 0
        row = torch.arange(s, e, device=device).unsqueeze(1).expand_as(idx)
        if bool((valid & (idx == row)).any()):
            i = int(row[valid & (idx == row)][0])
            raise ValueError(f"graph.indices: expected no self-loops (a point listed as its own neighbour), "
                             f"got one in row {i}")
        if not bool(torch.isfinite(dd[valid]).all()):
            raise ValueError("graph.distances: expected finite distances for valid neighbours, got non-finite values")
        rr.append(torch.where(valid, dd, torch.zeros_like(dd)).amax(dim=1).to(torch.float64) if k else
                  torch.zeros(e - s, dtype=torch.float64, device=device))
        i, j = row[valid], idx[valid]
        keys.append(torch.minimum(i, j) * n + torch.maximum(i, j))
        dist.append(dd[valid])
        del idx, dd, valid, row, i, j
    if n == 0:
        z = torch.zeros(0, dtype=torch.int64, device=device)
        return 0, z, z.to(torch.float64), z.to(torch.float64)
    key = torch.cat(keys)
    del keys
    return n, key, torch.cat(dist), torch.cat(rr)


# ---------------------------------------------------------------------------------------------


def _unit_rows(embeddings, n, device, budget):
    """embeddings [n, d] (anything `Pool` reads: array, memmap, tensor, .npy path, or a Pool) ->
    L2-normalised rows on `device`, float64 if stored as float64 else float32, read in row blocks."""
    from .pool import Pool

    pool = embeddings if isinstance(embeddings, Pool) else Pool(embeddings, name="embeddings")
    if len(pool.shape) != 2 or pool.n != n:
        raise ValueError(f"embeddings: expected shape [{n}, d] (one row per graph node), got {pool.shape}")
    wide = pool.dtype in (np.float64, torch.float64)
    F = torch.empty((n, pool.shape[1]), dtype=torch.float64 if wide else torch.float32, device=device)
    # release: F holds the rows once a block is copied, so the mapped pages need not stay resident.
    for s, e, x in pool.iter_blocks(budget, device=device, dtype=torch.float64, bytes_per_row=16 * pool.shape[1],
                                    release=True):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("embeddings: expected finite values, got non-finite entries")
        # A zero row stays zero: at cosine distance 1 from everything (cos taken as 0).
        F[s:e] = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(F.dtype)
    return F


def _relink_dtype(device: torch.device, c: int, d: int) -> str | None:
    """The relink search's matmul dtype for C sums of d columns: RELINK_HALF where knn_graph would
    take the torch backend on a GPU, else None (its default). The sums are float32, which the torch
    search ranks in float32: on a GPU the slow matmul path (a half pool is ranked in half). Unit
    rows ranked in float16, the kept candidates re-ranked in float32 (knn's reduced-precision
    rule), serve as well for candidates. Not yet measured on a GPU."""
    from .knn import resolve_backend

    if device.type != "cuda":
        return None
    return RELINK_HALF if resolve_backend(c, d, device)[0] == "torch" else None


def _relinker(k: int, device, budget: int, compute_dtype: str | None = None):
    """rac's `relink`: sums [C, d] -> int tensor [C, min(k, C - 1)] (knn_graph's int32 below 2**31
    rows), each cluster's nearest clusters by the cosine of their row sums (`knn_graph`: exact or
    approximate by C as for a pool, approximate at target_recall RELINK_RECALL). rac calls it
    with C >= 2 only. compute_dtype: the torch backend's matmul dtype for the ranking (None:
    `_relink_dtype`'s rule)."""
    from .knn import knn_graph

    def fn(sums):
        c = int(sums.shape[0])
        kk = min(k, c - 1)  # >= 1: rac asks only with two clusters or more, and k >= 1
        log.info("hac: relinking %d clusters to their %d nearest", c, kk)
        # Candidates, not answers (the linkage of every link is computed exactly), so a lower
        # recall target than the pool's: 0.95 cost 5x the search time of 0.8 on the 1M synthetic
        # pool for no better agreement with exact HAC (one-off, CIFAR-10 PCA 20K: ARI 0.975 / 0.99
        # at 0.95 / 0.8), and 0.7 agrees as well as 0.8 (RELINK_RECALL's note).
        cdt = compute_dtype or _relink_dtype(device, c, int(sums.shape[1]))
        g = knn_graph(sums, k=kk, metric="cosine", device=device, budget_bytes=budget,
                      target_recall=RELINK_RECALL, **({"compute_dtype": cdt} if cdt else {}))
        return torch.from_numpy(np.ascontiguousarray(g.indices))  # int32 below 2**31 rows: rac widens per block

    return fn


def hac_merges(graph, *, embeddings=None, max_epsilon=None, missing=None, missing_value=None, relink=None,
               device="auto", budget_bytes=None, progress=None) -> Merges:
    """Average-linkage HAC over `graph`, recorded as a merge list (see the module docstring).

    graph: an object with `.indices` [N, k] int (-1 = missing) and `.distances` [N, k] float
    (a KNNGraph), an (indices, distances) pair, or a scipy.sparse [N, N] matrix whose explicit
    entries are the edges' distances. Directions are merged: an edge listed by either endpoint
    is an edge. embeddings: the points [N, d] of a cosine graph (its distances 1 - cos), for the
    "exact" rule. missing: "exact" | "constant" | "bound" | "edges" (see the module docstring);
    None: "exact" when embeddings are given, else "constant". max_epsilon: stop once no pair at
    linkage <= max_epsilon remains (None: merge until no edge is left). relink (int >= 0, "exact" rule
    only): each time the clusters have halved in number, and when the rounds stall, link every
    cluster to the `relink` clusters whose row sums point nearest its own (see the module
    docstring); None: RELINK_K (16) for "exact", 0 (off: merges along graph edges only) otherwise.
    progress: optional callable(merges_done, n - 1) after each round.
    """
    if missing is None:
        missing = "exact" if embeddings is not None else "constant"
    params = HACParams(missing=missing, missing_value=None if missing_value is None else float(missing_value),
                       max_epsilon=None if max_epsilon is None else float(max_epsilon), relink=relink)
    if params.missing == "exact":
        if embeddings is None:
            raise ValueError('missing: "exact" needs the embeddings (embeddings=...), got embeddings=None')
        gm = getattr(graph, "metric", "cosine")
        if gm != "cosine":
            raise ValueError(f'missing: "exact" is for cosine graphs (graph.metric "cosine"), got graph.metric {gm!r}')
    elif embeddings is not None:
        raise ValueError(f'embeddings: only used by missing="exact", got missing={params.missing!r} with embeddings')
    dev = resolve_device(device)
    budget = _budget(budget_bytes)
    t0 = time.perf_counter()

    def lap(phase):  # phase times at INFO: where a stage's seconds go on a lent GPU's log
        nonlocal t0
        t, t0 = t0, time.perf_counter()
        log.info("hac: %s %.2f s", phase, t0 - t)

    n, key, dist, r = _graph_edges(graph, dev, budget)
    lap("graph edges")
    feats = _unit_rows(embeddings, n, dev, budget) if params.missing == "exact" else None
    if feats is not None:
        lap("unit rows")
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return Merges(0, z, z.copy(), np.zeros(0), z.copy())
    log_memory_estimate("hac", int(key.numel()) * 64 + (0 if feats is None else feats.numel() * feats.element_size()))
    # A list handed over and emptied by its consumers, so that no frame here keeps the edge
    # arrays alive once they are copied (at 10M x 16 each array is ~1 GB).
    edges = [key, dist]
    del key, dist
    edges = list(K.symmetrize(edges, n))
    lap("symmetrize")
    if params.missing in ("edges", "exact"):
        impute = None
    elif params.missing == "bound":
        impute = (1.0, 0.0)
    else:
        c = params.missing_value if params.missing_value is not None else float(r.max())
        impute = (0.0, c)
    maxe = float("inf") if params.max_epsilon is None else params.max_epsilon
    a, b, h, sz, rounds = K.rac(edges, r, n, impute=impute, max_epsilon=maxe,
                                block=K.edge_block(budget), progress=progress, feats=feats,
                                relink=_relinker(params.relink, dev, budget) if params.relink else None)
    log.info("hac: %d merges in %d rounds over %d points", a.numel(), rounds, n)
    lap("rounds")
    out = _sorted_merges(n, a, b, h, sz)
    lap("merge list")
    return out


def _sorted_merges(n: int, a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, sz: torch.Tensor) -> Merges:
    """Sort merges by height (stable: a child made in an earlier round keeps preceding its
    parent at equal height) and renumber the internal nodes accordingly.

    a, b: int64 [m] node ids, h: float64 [m], sz: int64 [m], on rac's device (the sort runs there:
    at 10M merges numpy's stable argsort and fancy indexing took 3.3 s on a GPU machine's host)."""
    m = a.numel()
    order = torch.sort(h, stable=True).indices
    inv = torch.empty(m, dtype=torch.int64, device=a.device)
    inv[order] = torch.arange(m, dtype=torch.int64, device=a.device)

    def renum(x):
        x = x.index_select(0, order)
        return torch.where(x >= n, n + inv.index_select(0, (x - n).clamp_min(0)), x)

    a2, b2 = renum(a), renum(b)
    host = lambda t: t.cpu().numpy()  # noqa: E731
    return Merges(int(n), host(torch.minimum(a2, b2)), host(torch.maximum(a2, b2)),
                  host(h.index_select(0, order).to(torch.float64)), host(sz.index_select(0, order).to(torch.int64)))


def _check_merges(merges):
    if not isinstance(merges, Merges):
        raise TypeError(f"merges: expected a Merges, got {type(merges).__name__}")


def cut(merges: Merges, epsilon) -> np.ndarray:
    """Flat clusters: apply every merge at height <= epsilon. int64 labels [n], numbered from 0
    in the order of each cluster's smallest member."""
    _check_merges(merges)
    eps = check_float("epsilon", epsilon, min=0.0)
    n = merges.n
    p = int(np.searchsorted(merges.dist, eps, side="right"))
    labels, bad = _cut_labels(n, np.ascontiguousarray(merges.a, dtype=np.int64),
                              np.ascontiguousarray(merges.b, dtype=np.int64), p)
    if bad >= 0:
        raise ValueError(f"merges: expected merge {bad} to join nodes made before it (ids < {n + bad}), got "
                         f"a={int(merges.a[bad])}, b={int(merges.b[bad])}")
    return labels


@njit(cache=True, nogil=True)
def _cut_labels(n, a, b, p):
    """Labels of the cut after the first p merges -> (int64 [n], -1 or the first bad merge).

    A merge's node n + j is made from nodes made before it (ids < n + j), so one pass from the
    highest id down gives every node its root; a second pass numbers the roots in order of
    their smallest leaf. O(n + p), where the pointer jumping it replaces took log(depth) passes
    over the whole array plus a sort (4.6 s with epsilon_for_mean_size at 10M on a GPU host)."""
    parent = np.full(n + p, -1, dtype=np.int64)
    for j in range(p):
        if a[j] < 0 or b[j] < 0 or a[j] >= n + j or b[j] >= n + j:
            return np.zeros(0, dtype=np.int64), j
        parent[a[j]] = n + j
        parent[b[j]] = n + j
    root = np.empty(n + p, dtype=np.int64)
    for x in range(n + p - 1, -1, -1):
        q = parent[x]
        root[x] = x if q < 0 else root[q]
    rank = np.full(n + p, -1, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    c = 0
    for i in range(n):
        r = root[i]
        if rank[r] < 0:
            rank[r] = c
            c += 1
        out[i] = rank[r]
    return out, -1


def epsilon_for_mean_size(merges: Merges, target_mean_size) -> float:
    """The epsilon whose cut has the mean cluster size (n / clusters) closest to the target.

    After p merges there are n - p clusters; only p at a change of height (or p = m) is
    reachable by a cut. Returns that merge's height (0.0 when no merge is the closest)."""
    _check_merges(merges)
    t = check_float("target_mean_size", target_mean_size, min=1.0)
    n, m = merges.n, len(merges)
    if m == 0:
        return 0.0
    p = np.arange(m + 1)
    ok = np.ones(m + 1, dtype=bool)
    ok[1:m] = merges.dist[1:] > merges.dist[:-1]  # cut after merge p-1 only if the next is higher
    ok[0] = merges.dist[0] > 0
    mean = n / (n - p)
    err = np.where(ok, np.abs(mean - t), np.inf)
    best = int(np.argmin(err))
    return 0.0 if best == 0 else float(merges.dist[best - 1])


def graph_hac(graph, *, epsilon, embeddings=None, missing=None, missing_value=None, relink=None, device="auto",
              budget_bytes=None, progress=None) -> np.ndarray:
    """Average-linkage HAC over `graph`, merging while the linkage is <= epsilon (arguments as
    in `hac_merges`; with the embeddings of a cosine graph the linkage is exact, see "exact").

    Returns int64 labels [N], contiguous from 0 (numbered by smallest member)."""
    eps = check_float("epsilon", epsilon, min=0.0)
    merges = hac_merges(graph, embeddings=embeddings, max_epsilon=eps, missing=missing, missing_value=missing_value,
                        relink=relink, device=device, budget_bytes=budget_bytes, progress=progress)
    return cut(merges, eps)
