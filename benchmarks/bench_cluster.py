"""Benchmark of the cached clustering stage, `cm_engine.cluster` (graph + HAC + cut, through the cache).

Parts (all by default; pick with --parts):
  speedup  N = 50K, d = 128 synthetic pool: `cluster` (k-NN graph + HAC, no cache) against
           fastcluster.linkage(X, "average", metric) + fcluster at the same epsilon, the epsilon
           whose exact cut has mean cluster size ~10. Speedup (target >= 20x) and ARI to fastcluster;
           the graph's recall@k on 2000 sample rows, its build info (phase seconds, nprobe) and the
           load average around each side. Each side runs in its own subprocess so that each one's
           peak RSS is its own.
  cached   N = 1M synthetic pool, k = 16: cold build into an empty cache, then a re-run of `cluster`
           in a fresh process on the unchanged pool (target < 2 s), checked to hit the cache and
           to give identical labels.
  ari      ARI of `cluster` (k in 16, 32) against exact scipy average linkage cut at mean cluster
           size ~10, on CIFAR-10 features (20K subset) and Banking77 / CLINC150 (cosine). Skipped
           per dataset when the data is absent ($CM_ENGINE_DATA, default ../shared/data).

  --quick  small sizes (N = 5K, a 50K pool, 3K subsets, k = 16): a smoke run, written to *_quick.json.

Full runs need > 3 GB (fastcluster at 50K holds N^2/2 doubles = 10 GB) and minutes: run them as
    flock /tmp/cm-big.lock python benchmarks/bench_cluster.py
Results: benchmarks/results/cluster_{speedup,cached,ari}[_quick].json, with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (BENCH_DATA, RESULTS, SHARED_MACHINE_NOTE, git_commit, log, machine_info,  # noqa: E402
                     peak_rss_bytes, utc_now, write_json)

DATA = Path(os.environ.get("CM_ENGINE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TARGET = 10.0  # the paper's mean cluster size


def _load_avg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _ari(a, b) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(a), np.asarray(b)))


def _merges_from_linkage(Z, n):
    from cm_engine.hac import Merges

    a, b = Z[:, 0].astype(np.int64), Z[:, 1].astype(np.int64)
    return Merges(n, np.minimum(a, b), np.maximum(a, b), Z[:, 2].astype(np.float64), Z[:, 3].astype(np.int64))


def _exact_epsilon(Z, n) -> float:
    """The epsilon whose cut of the exact dendrogram has mean cluster size closest to TARGET."""
    from cm_engine.hac import epsilon_for_mean_size

    return float(epsilon_for_mean_size(_merges_from_linkage(Z, n), TARGET))


def _worker(args, job: dict) -> dict:
    """Run one side in a fresh interpreter; returns its JSON result (last stdout line)."""
    cmd = [sys.executable, __file__, "--_worker", json.dumps(job)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress, logs) passes through
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"worker {job['kind']} failed with exit code {p.returncode} (its log is above)")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    return out


# --------------------------------------------------------------------------- workers (subprocesses)

def _run_worker(job: dict) -> dict:
    kind = job["kind"]
    t_import = time.perf_counter()
    import cm_engine.cluster as cc  # noqa: F401  (import time is part of a fresh process's cost)

    res = {"import_s": time.perf_counter() - t_import}
    if kind == "fastcluster":
        import fastcluster
        from scipy.cluster.hierarchy import fcluster

        X = np.load(job["pool"], mmap_mode="r")
        X = np.asarray(X, dtype=np.float64)
        load0 = _load_avg()
        t0 = time.perf_counter()
        Z = fastcluster.linkage(X, method="average", metric=job["metric"])
        t1 = time.perf_counter()
        res.update(load_avg_before=load0, load_avg_after=_load_avg())
        eps = _exact_epsilon(Z, len(X)) if job.get("epsilon") is None else job["epsilon"]
        t2 = time.perf_counter()
        labels = fcluster(Z, eps, "distance")
        t3 = time.perf_counter()
        np.save(job["labels_out"], labels.astype(np.int64))
        res.update(linkage_s=t1 - t0, fcluster_s=t3 - t2, total_s=(t1 - t0) + (t3 - t2), epsilon=eps,
                   n_clusters=int(len(np.unique(labels))), peak_rss_bytes=peak_rss_bytes())
    elif kind == "ours":
        from cm_engine.cluster import cluster

        X = np.load(job["pool"], mmap_mode="r")
        # Warm-up on a small slice: numba JIT / faiss / torch first-call costs are not the method's.
        cluster(np.ascontiguousarray(X[:2000]), k=job["k"], target_mean_size=TARGET, metric=job["metric"])
        load0 = _load_avg()
        t0, c0 = time.perf_counter(), time.process_time()
        c = cluster(X, k=job["k"], epsilon=job["epsilon"], metric=job["metric"], **job.get("options", {}))
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        load1 = _load_avg()
        own = c.recut(target_mean_size=TARGET)
        # The graph's recall@k on a seeded sample of rows (exact neighbours found after the timing).
        from cm_engine.knn import exact_neighbors, recall_at_k

        g = c.graph
        rows = np.sort(np.random.default_rng(0).choice(len(X), min(len(X), 2000), replace=False))
        rec = recall_at_k(g, exact_neighbors(X, rows, k=job["k"], metric=job["metric"]), rows=rows)
        np.save(job["labels_out"], c.labels)
        np.save(job["labels_out"].replace(".npy", "_own.npy"), own.labels)
        res.update(total_s=total, cpu_s=cpu, load_avg_before=load0, load_avg_after=load1, timings=c.timings,
                   hac_params=repr(c.params.hac), epsilon=c.epsilon, n_clusters=c.n_clusters,
                   graph_info=g.info, graph_recall_at_k_sample=rec, graph_recall_rows=int(rows.size),
                   own_epsilon=own.epsilon, own_n_clusters=own.n_clusters, peak_rss_bytes=peak_rss_bytes())
    elif kind == "cached":
        from cm_engine.cluster import cluster

        t0 = time.perf_counter()
        c = cluster(job["pool"], k=job["k"], target_mean_size=TARGET, metric=job["metric"],
                    cache_dir=job["cache_dir"])
        total = time.perf_counter() - t0
        res.update(cluster_call_s=total, timings=c.timings, cache_hits=c.cache_hits, epsilon=c.epsilon,
                   n_clusters=c.n_clusters, n=int(c.labels.size), merges=len(c.merges),
                   labels_blake2b=__import__("hashlib").blake2b(c.labels.tobytes(), digest_size=16).hexdigest(),
                   peak_rss_bytes=peak_rss_bytes())
    else:
        raise ValueError(f"unknown worker kind {kind!r}")
    return res


# --------------------------------------------------------------------------- parts

def _synthetic(n, d=128):
    from cm_engine.synthetic import PoolSpec, cached_pool

    spec = PoolSpec(n=n, d=d)
    t0 = time.perf_counter()
    path = cached_pool(BENCH_DATA, spec)
    return path, spec, time.perf_counter() - t0


def part_speedup(args) -> dict:
    n = 5000 if args.quick else args.n_speedup
    path, spec, _ = _synthetic(n)
    tmp = BENCH_DATA / f"bench_cluster_tmp_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        log(f"speedup: fastcluster average linkage on N={n} (metric={args.metric})")
        fc = _worker(args, {"kind": "fastcluster", "pool": str(path), "metric": args.metric,
                            "labels_out": str(tmp / "fc.npy")})
        log(f"speedup: fastcluster {fc['total_s']:.1f} s, epsilon {fc['epsilon']:.5g}; now cluster()")
        ours = _worker(args, {"kind": "ours", "pool": str(path), "metric": args.metric, "k": args.k,
                              "epsilon": fc["epsilon"], "labels_out": str(tmp / "ours.npy")})
        lf, lo, lown = (np.load(tmp / f) for f in ("fc.npy", "ours.npy", "ours_own.npy"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"pool": {"synthetic": spec.name(), "n": n, "d": spec.d}, "metric": args.metric, "k": args.k,
           "epsilon": fc["epsilon"], "exact_mean_cluster_size": n / fc["n_clusters"],
           "fastcluster": fc, "cluster": ours,
           "speedup": fc["total_s"] / ours["total_s"], "target_speedup": 20.0,
           "ari_same_epsilon": _ari(lf, lo),
           "ari_own_target_mean_size": _ari(lf, lown),
           "cluster_mean_size_same_epsilon": n / ours["n_clusters"]}
    log(f"speedup: {out['speedup']:.1f}x, ARI {out['ari_same_epsilon']:.4f}; cluster() {ours['total_s']:.2f} s "
        f"(graph {ours['timings']['graph']:.2f} s, recall@{args.k} {ours['graph_recall_at_k_sample']:.4f}, "
        f"hac {ours['timings']['hac']:.2f} s)")
    return out


def part_cached(args) -> dict:
    n = 50_000 if args.quick else args.n_cached
    path, spec, gen_s = _synthetic(n)
    cache_dir = BENCH_DATA / f"cluster_cache_bench_n{n}"
    shutil.rmtree(cache_dir, ignore_errors=True)  # cold: an empty cache (this benchmark's own dir)
    job = {"kind": "cached", "pool": str(path), "k": 16, "metric": args.metric, "cache_dir": str(cache_dir)}
    log(f"cached: cold build N={n} k=16 into {cache_dir}")
    cold = _worker(args, job)
    log(f"cached: cold {cold['cluster_call_s']:.1f} s; warm re-runs in fresh processes")
    warm = [_worker(args, job) for _ in range(3)]
    ok = all(w["cache_hits"].get("merges") is True and w["labels_blake2b"] == cold["labels_blake2b"] for w in warm)
    size = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    best = min(w["cluster_call_s"] for w in warm)
    out = {"pool": {"synthetic": spec.name(), "n": n, "d": spec.d, "generate_s": gen_s}, "k": 16,
           "metric": args.metric, "cold": cold, "warm": warm, "warm_hits_and_identical_labels": ok,
           "warm_cluster_call_s_best": best, "warm_cluster_call_s_median": float(np.median([w["cluster_call_s"] for w in warm])),
           "warm_process_wall_s_best": min(w["process_wall_s"] for w in warm),
           "target_s": 2.0, "cache_bytes": size}
    log(f"cached: warm cluster() {best:.2f} s (hits and identical: {ok})")
    return out


def _datasets(args):
    n_cifar = 3000 if args.quick else 20_000
    sets = [("cifar10", DATA / "cifar10" / "cifar10_effnetlite0_128px_f16.npz", n_cifar),
            ("banking77", DATA / "text" / "banking77_minilm_l6_f16.npz", 3000 if args.quick else None),
            ("clinc150", DATA / "text" / "clinc150_minilm_l6_f16.npz", 3000 if args.quick else None)]
    for name, f, sub in sets:
        if not f.exists():
            yield name, None, f"data not found at {f}"
            continue
        X = np.load(f)["X_train"]
        if sub is not None and sub < len(X):
            idx = np.sort(np.random.default_rng(0).choice(len(X), sub, replace=False))
            X = X[idx]
        yield name, np.ascontiguousarray(X, dtype=np.float32), None


def _exact_cosine_linkage(X):
    """scipy average linkage on exact float64 cosine distances (computed with one BLAS product)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    x = X.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.where(norms > 0, norms, 1)
    D = x @ x.T
    np.subtract(1.0, D, out=D)
    np.fill_diagonal(D, 0.0)
    np.maximum(D, 0.0, out=D)
    cond = squareform(D, checks=False)
    del D
    return linkage(cond, "average")


def part_ari(args) -> dict:
    from scipy.cluster.hierarchy import fcluster

    from cm_engine.cluster import cluster

    ks = (16,) if args.quick else (16, 32)
    rows = []
    for name, X, skip in _datasets(args):
        if X is None:
            log(f"ari: skip {name}: {skip}")
            rows.append({"dataset": name, "skipped": skip})
            continue
        n = len(X)
        t0 = time.perf_counter()
        Z = _exact_cosine_linkage(X)
        exact_s = time.perf_counter() - t0
        eps = _exact_epsilon(Z, n)
        exact = fcluster(Z, eps, "distance")
        row = {"dataset": name, "n": n, "d": int(X.shape[1]), "metric": "cosine", "exact_epsilon": eps,
               "exact_n_clusters": int(len(np.unique(exact))), "exact_mean_size": n / len(np.unique(exact)),
               "exact_linkage_s": exact_s, "by_k": {}}
        for k, missing in [(k, m) for k in ks for m in args.missing]:
            t0 = time.perf_counter()
            c = cluster(X, k=k, epsilon=eps, metric="cosine", **({} if missing is None else {"missing": missing}))
            t = time.perf_counter() - t0
            own = c.recut(target_mean_size=TARGET)
            key = str(k) if missing is None else f"{k}/{missing}"
            row["by_k"][key] = {"hac_params": repr(c.params.hac),"ari_same_epsilon": _ari(exact, c.labels), "n_clusters": c.n_clusters,
                                   "ari_own_target_mean_size": _ari(exact, own.labels),
                                   "own_epsilon": own.epsilon, "own_n_clusters": own.n_clusters,
                                   "cluster_s": t, "timings": c.timings}
            log(f"ari: {name} k={key}: ARI {row['by_k'][key]['ari_same_epsilon']:.4f} "
                f"(own target cut {row['by_k'][key]['ari_own_target_mean_size']:.4f})")
        rows.append(row)
    return {"target_mean_size": TARGET, "exact": "scipy.cluster.hierarchy.linkage(average) on float64 cosine "
            "distances of the same float16 features", "datasets": rows, "peak_rss_bytes": peak_rss_bytes()}


PARTS = {"speedup": part_speedup, "cached": part_cached, "ari": part_ari}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=["speedup", "cached", "ari"])
    ap.add_argument("--n-speedup", type=int, default=50_000)
    ap.add_argument("--n-cached", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=16, help="k of the speedup part")
    ap.add_argument("--metric", default="cosine", choices=("cosine", "l2"))
    ap.add_argument("--missing", nargs="+", default=[None],
                    help="ari part: HAC missing-pair rules to compare (default: cluster()'s default)")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        import logging

        logging.basicConfig(level=logging.INFO, format="[%(asctime)s worker] %(message)s", stream=sys.stderr)
        print(json.dumps(_run_worker(json.loads(args._worker)), default=float))
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    for part in args.parts:
        start = {"started_utc": utc_now(), "load_avg_start": _load_avg()}
        t0 = time.perf_counter()
        res = PARTS[part](args)
        doc = {"benchmark": f"cluster_{part}", "quick": args.quick, **start, "wall_s": time.perf_counter() - t0,
               "load_avg_end": _load_avg(), "commit": git_commit(), "machine": machine_info(),
               "notes": SHARED_MACHINE_NOTE + ("; quick mode: small sizes, not the targets" if args.quick else ""),
               "result": res}
        path = write_json(RESULTS / f"cluster_{part}{'_quick' if args.quick else ''}.json", doc)
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
