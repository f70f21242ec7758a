"""cm-engine: Cluster-Margin batch active learning at the scale of millions of points.

Pipeline (one module per stage): pool -> knn -> hac -> cluster (cached) -> margin -> sampler -> strategies;
baselines, redundancy (near-duplicate filter) and selector (training-loop state) sit beside them.
Public names are imported lazily so that `import cm_engine` stays cheap.
"""
from __future__ import annotations

import importlib
import os

# Large CPU tensors on transparent huge pages (torch's allocator madvises allocations >= 2 MB when
# this is set). The stages make many large temporaries, and each fresh one otherwise costs a page
# fault per 4 KB: a 1 GB gather took 0.5 s allocating against 0.1 s copying, and HAC on 1M points
# ran 63-71 s without it, 47 s with it (2-core machine). torch reads the variable once, at its
# first allocation: so it takes effect when cm_engine is imported before any tensor is made (the
# CLI, the benchmarks, a fresh script); set it in the environment to be sure. Opt out with
# THP_MEM_ALLOC_ENABLE=0. No effect where the kernel's THP setting is "never".
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

_EXPORTS = {
    "Pool": "pool", "open_array": "pool", "fingerprint": "pool", "save_npy": "pool",
    "margin_scores": "margin",
    "round_robin": "sampler",
    "cluster_margin": "strategies",
    "knn_graph": "knn", "KNNGraph": "knn",
    "graph_hac": "hac",
    "cluster": "cluster", "Clustering": "cluster",
    "hac_merges": "hac", "cut": "hac", "epsilon_for_mean_size": "hac", "Merges": "hac",
    "recall_at_k": "knn",
    "ClusterMarginSelector": "selector", "Selector": "selector",
    "random_select": "baselines", "uncertainty_select": "baselines", "coreset_select": "baselines",
    "badge_select": "baselines", "partitioned": "baselines",
    "near_duplicate_filter": "redundancy", "redundancy_report": "redundancy", "auto_delta": "redundancy",
    "filtered_margin": "redundancy", "filtered_cluster_margin": "redundancy", "NearCopies": "redundancy",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'cm_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
