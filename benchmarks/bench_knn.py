"""k-NN graph benchmark: approximate graph on a 1M x 128 synthetic pool (time, recall on a sample,
peak RSS), exact graph on 200K x 128 (auto vs faiss.knn vs torch exact), optionally 10M x 64 float16.

    python benchmarks/bench_knn.py --quick              # 100K / 50K pools, minutes
    flock /tmp/cm-big.lock python benchmarks/bench_knn.py [--big]   # targets of issue 3

Checks the answer (recall against exact brute force on a row sample) before reporting a time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (BENCH_DATA, RESULTS, SHARED_MACHINE_NOTE, current_rss_bytes, git_commit, log,  # noqa: E402
                     machine_info, peak_rss_bytes, utc_now, write_json)

from cm_engine.knn import exact_neighbors, knn_graph, recall_at_k  # noqa: E402
from cm_engine.synthetic import PoolSpec, cached_pool  # noqa: E402


def approx_case(n, d, k, sample, dtype="float32", out_dir=None, **opts):
    spec = PoolSpec(n=n, d=d, dtype=dtype)
    path = cached_pool(BENCH_DATA, spec)
    X = np.load(path, mmap_mode="r")
    base = current_rss_bytes()
    t0 = time.perf_counter()
    g = knn_graph(X, k=k, exact=False, out_dir=out_dir, **opts)
    secs = time.perf_counter() - t0
    peak = peak_rss_bytes()
    rows = np.sort(np.random.default_rng(123).choice(n, size=min(sample, n), replace=False))
    t1 = time.perf_counter()
    ex = exact_neighbors(X, rows, k=k)
    rec = recall_at_k(g, ex, rows=rows)
    return {"pool": spec.name(), "n": n, "d": d, "k": k, "dtype": dtype, "seconds": secs, "recall_at_k": rec,
            "recall_sample_rows": int(rows.size), "recall_check_seconds": time.perf_counter() - t1,
            "rss_baseline_bytes": base, "peak_rss_bytes": peak, "peak_rss_above_baseline_gib": (peak - base) / 2**30,
            "info": g.info}


def exact_case(n, d, k):
    import faiss

    spec = PoolSpec(n=n, d=d)
    X = np.load(cached_pool(BENCH_DATA, spec), mmap_mode="r")
    small = np.ascontiguousarray(X[:2000])
    knn_graph(small, k=k, exact=True)  # warm-up
    rec = {"pool": spec.name(), "n": n, "d": d, "k": k, "metric": "cosine"}
    t = time.perf_counter()
    g = knn_graph(X, k=k, exact=True)
    rec["auto_seconds"] = time.perf_counter() - t
    rec["auto_backend"] = g.info["backend"]
    # FAISS's own flat search on the same (normalized, in-memory) data, k+1 to include self.
    t = time.perf_counter()
    xn = np.array(X, dtype=np.float32)  # a copy: normalize_L2 writes in place (a read-only memmap would crash it)
    faiss.normalize_L2(xn)
    D, I = faiss.knn(xn, xn, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    rec["faiss_knn_seconds"] = time.perf_counter() - t
    rec["auto_over_faiss"] = rec["auto_seconds"] / rec["faiss_knn_seconds"]
    # Same neighbour sets (faiss result with self removed) on a sample, as a check.
    rows = np.arange(0, n, max(1, n // 2000))
    same = np.mean([len(set(I[r][I[r] != r][:k]) & set(g.indices[r])) / k for r in rows])
    rec["auto_vs_faiss_overlap"] = float(same)
    del xn, D, I
    t = time.perf_counter()
    gt = knn_graph(X, k=k, exact=True, backend="torch")
    rec["torch_exact_seconds"] = time.perf_counter() - t
    rec["torch_vs_auto_overlap"] = float(np.mean([len(set(gt.indices[r]) & set(g.indices[r])) / k for r in rows]))
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--big", action="store_true", help="also the 10M x 64 float16 graph (heavy)")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--skip-approx", action="store_true")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = {"benchmark": "knn", "when": utc_now(), "commit": git_commit(), "machine": machine_info(),
           "notes": SHARED_MACHINE_NOTE, "load_average_start": os.getloadavg(), "cases": {}}
    if not a.skip_approx:
        n = 100_000 if a.quick else 1_000_000
        log(f"approximate graph, {n} x 128, k=16")
        res["cases"]["approx_1M_128"] = approx_case(n, 128, 16, 500 if a.quick else 2000, backend=a.backend)
        res["cases"]["approx_1M_128"]["targets"] = {"seconds": 300, "recall_at_k": 0.95, "peak_rss_above_baseline_gib": 3}
        log(str(res["cases"]["approx_1M_128"]))
    if not a.skip_exact:
        n = 50_000 if a.quick else 200_000
        log(f"exact graph, {n} x 128, k=16")
        res["cases"]["exact_200K_128"] = exact_case(n, 128, 16)
        res["cases"]["exact_200K_128"]["targets"] = {"auto_over_faiss": 1.3}
        log(str(res["cases"]["exact_200K_128"]))
    if a.big:
        log("approximate graph, 10M x 64 float16, k=16, out_dir on disk")
        out_dir = BENCH_DATA / "knn_10M_64_f16_graph"
        res["cases"]["approx_10M_64_f16"] = approx_case(10_000_000, 64, 16, 500, dtype="float16", out_dir=out_dir,
                                                        backend=a.backend)
        res["cases"]["approx_10M_64_f16"]["targets"] = {"peak_rss_bytes": 20 * 2**30}
    res["load_average_end"] = os.getloadavg()
    name = a.out or f"knn_{'quick' if a.quick else 'full'}{'_big' if a.big else ''}.json"
    print(write_json(RESULTS / name, res))


if __name__ == "__main__":
    main()
