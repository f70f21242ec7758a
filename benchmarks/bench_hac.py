"""Benchmark of graph average-linkage HAC (cm_engine.hac).

Modes:
  --ari          agreement (adjusted Rand index) of graph HAC on a k-NN graph with exact average
                 linkage (fastcluster == scipy) at the paper's setting (mean cluster size ~10), on
                 the CIFAR-10 features (20K subset) and the text embeddings, for k and `missing`;
                 writes benchmarks/results/hac_ari.json.
  --scale N      HAC time and peak RSS on the k-NN graph of the synthetic pool of N points
                 (graph built once with faiss IVF-Flat, cached under bench-data/);
                 writes benchmarks/results/hac_scale_<N>_k<k>.json.
  --quick        small sizes (a smoke run of both modes).

Checks the answer first (complete-graph exactness against scipy on a small sample), then
warms up, then times. Timings are on a shared machine (other engineers' jobs run beside them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCH_DATA = ROOT / "bench-data"
DATA = Path(os.environ.get("CM_ENGINE_DATA", ROOT.parent / "shared" / "data"))

from cm_engine.hac import HACParams, cut, epsilon_for_mean_size, hac_merges  # noqa: E402


def machine():
    import psutil

    return {"cpu_count": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write(name, obj):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------ graphs


def exact_knn(X, k, metric):
    """Brute-force k-NN (float64 torch, blocked): indices int64 [N, k], distances float32 [N, k]."""
    X = torch.from_numpy(np.asarray(X, dtype=np.float64))
    if metric == "cosine":
        X = X / X.norm(dim=1, keepdim=True)
    n = X.shape[0]
    I = np.empty((n, k), np.int64)
    D = np.empty((n, k), np.float32)
    sq = (X * X).sum(1)
    for s in range(0, n, 2048):
        e = min(n, s + 2048)
        if metric == "cosine":
            d = 1.0 - X[s:e] @ X.T
        else:
            d = (sq[s:e, None] + sq[None, :] - 2 * X[s:e] @ X.T).clamp_min(0).sqrt()
        d[torch.arange(e - s), torch.arange(s, e)] = float("inf")
        v, i = torch.topk(d, k, dim=1, largest=False)
        I[s:e] = i.numpy()
        D[s:e] = v.numpy()
    return I, D


def faiss_graph(n, k, *, d=128):
    """Cosine k-NN graph of the synthetic pool (n, d) with faiss IVF-Flat, cached as .npy."""
    from cm_engine.synthetic import PoolSpec, cached_pool

    BENCH_DATA.mkdir(exist_ok=True)
    spec = PoolSpec(n=n, d=d)
    gi = BENCH_DATA / f"{spec.name()}_knn{k}_cos_ivf_I.npy"
    gd = BENCH_DATA / f"{spec.name()}_knn{k}_cos_ivf_D.npy"
    if gi.exists() and gd.exists():
        return np.load(gi, mmap_mode="r"), np.load(gd, mmap_mode="r"), {"cached": True}
    import faiss

    pool = np.load(cached_pool(BENCH_DATA, spec), mmap_mode="r")
    t0 = time.time()
    nlist = int(4 * np.sqrt(n))
    q = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(q, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    train = np.array(pool[np.sort(rng.choice(n, min(n, 50 * nlist), replace=False))], dtype=np.float32)
    faiss.normalize_L2(train)
    index.train(train)
    blk = 200_000
    for s in range(0, n, blk):
        x = np.array(pool[s:s + blk], dtype=np.float32)
        faiss.normalize_L2(x)
        index.add(x)
    index.nprobe = 8
    I = np.lib.format.open_memmap(str(gi) + ".tmp.npy", mode="w+", dtype=np.int32, shape=(n, k))
    D = np.lib.format.open_memmap(str(gd) + ".tmp.npy", mode="w+", dtype=np.float32, shape=(n, k))
    for s in range(0, n, blk):
        x = np.array(pool[s:s + blk], dtype=np.float32)
        faiss.normalize_L2(x)
        sim, ii = index.search(x, k + 1)
        dist = 1.0 - sim
        rows = np.arange(s, s + x.shape[0])[:, None]
        # Drop the point itself (or the extra column when it is absent, e.g. an exact duplicate).
        is_self = ii == rows
        drop = np.where(is_self.any(1), is_self.argmax(1), k)
        keep = np.ones_like(ii, dtype=bool)
        keep[np.arange(len(ii)), drop] = False
        I[s:s + len(ii)] = ii[keep].reshape(-1, k)
        D[s:s + len(ii)] = np.maximum(dist[keep].reshape(-1, k), 0)
        print(f"  graph rows {s + len(ii)}/{n}  {time.time() - t0:.0f}s", flush=True)
    I.flush(), D.flush()
    del I, D
    os.replace(str(gi) + ".tmp.npy", gi)
    os.replace(str(gd) + ".tmp.npy", gd)
    return np.load(gi, mmap_mode="r"), np.load(gd, mmap_mode="r"), {"cached": False, "build_s": time.time() - t0,
                                                                     "nlist": nlist, "nprobe": 8}


# ------------------------------------------------------------------------------------ checks


def check_exact():
    """Complete graph on 300 random points: heights equal scipy's sorted heights."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    X = np.random.default_rng(1).normal(size=(300, 8))
    I, D = exact_knn(X, 299, "l2")
    m = hac_merges((I, D.astype(np.float64)), device="cpu")
    Z = linkage(pdist(X), "average")
    err = float(np.abs(np.sort(Z[:, 2]) - m.dist).max())
    # float32 distances in D: heights agree to float32 precision.
    assert err < 1e-5, err
    return err


# ------------------------------------------------------------------------------------ modes


def load_sets(args):
    """(name, X float64) of the real data sets present: CIFAR-10 20K subset, Banking77, CLINC150."""
    sets = []
    cif = DATA / "cifar10" / "cifar10_effnetlite0_128px_f16.npz"
    if cif.exists():
        X = np.load(cif)["X_train"]
        rng = np.random.default_rng(0)
        n = 2000 if args.quick else 20000
        sets.append(("cifar10_effnetlite0_20k" if not args.quick else "cifar10_2k",
                     X[np.sort(rng.choice(len(X), n, replace=False))].astype(np.float64)))
    for name in ["banking77_minilm_l6_f16", "clinc150_minilm_l6_f16"]:
        p = DATA / "text" / f"{name}.npz"
        if p.exists():
            X = np.load(p)["X_train"].astype(np.float64)
            sets.append((name, X[:2000] if args.quick else X))
    if args.datasets:
        sets = [(nm, X) for nm, X in sets if any(w in nm for w in args.datasets.split(","))]
    return sets


def exact_linkage(name, X, tag=""):
    """fastcluster average linkage (cosine) of X, cached in bench-data (deterministic)."""
    import fastcluster
    from scipy.spatial.distance import pdist

    zpath = BENCH_DATA / f"exact_average_cosine_{name}_{len(X)}{tag}.npz"
    if zpath.exists():
        z = np.load(zpath)
        return z["Z"], float(z["seconds"])
    t0 = time.time()
    Z = fastcluster.linkage(pdist(X, "cosine"), "average", preserve_input=False)
    t = time.time() - t0
    BENCH_DATA.mkdir(exist_ok=True)
    np.savez(zpath, Z=Z, seconds=t)
    return Z, t


def exact_cut(Z, n, mean_size=10):
    """Labels of the exact linkage Z cut after round(n - n / mean_size) merges, and that epsilon."""
    from scipy.cluster.hierarchy import fcluster

    eps = float(np.sort(Z[:, 2])[int(round(n - n / mean_size)) - 1])
    return fcluster(Z, eps, "distance"), eps


def perturb(X, kind, seed=0):
    """A tiny perturbation of X (rows L2-normalised first: cosine distances are scale-free).
    "noise1e-4": + N(0, 1e-4^2) per coordinate; "f16": the unit rows rounded to float16."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    if kind == "f16":
        return Xn.astype(np.float16).astype(np.float64)
    sigma = float(kind.removeprefix("noise"))
    return Xn + np.random.default_rng(seed).normal(scale=sigma, size=Xn.shape)


def nonsingleton_ari(ref, lab):
    """ARI restricted to the points whose exact (ref) cluster has more than one member."""
    from sklearn.metrics import adjusted_rand_score

    _, inv, cnt = np.unique(ref, return_inverse=True, return_counts=True)
    keep = cnt[inv] > 1
    return float(adjusted_rand_score(ref[keep], lab[keep])), float(keep.mean())


def ceiling_mode(args):
    """ARI of exact average linkage on tiny perturbations of the data against the unperturbed
    exact clustering, both cut at mean cluster size 10: the best any approximation can expect."""
    from sklearn.metrics import adjusted_rand_score

    out = {"machine": machine(), "metric": "cosine", "target_mean_size": 10, "results": [],
           "notes": "exact average linkage (fastcluster, cosine) of a perturbed copy of the data vs the unperturbed "
                    "exact clustering, both cut after round(n - n/10) merges (mean size 10). noise1e-4: unit rows "
                    "+ N(0, 1e-4^2) per coordinate (seed 0); f16: unit rows rounded to float16. 'ari_nonsingleton': "
                    "ARI on the points in non-singleton exact clusters (their share in 'frac_nonsingleton')."}
    for name, X in load_sets(args):
        n = len(X)
        Z, _ = exact_linkage(name, X)
        ref, eps = exact_cut(Z, n)
        for kind in args.perturb.split(","):
            Zp, t = exact_linkage(name, perturb(X, kind), tag="_" + kind)
            lab, eps_p = exact_cut(Zp, n)
            ns, frac = nonsingleton_ari(ref, lab)
            row = {"dataset": name, "n": n, "perturbation": kind, "exact_s": round(t, 1), "eps": eps,
                   "eps_perturbed": eps_p,
                   "ari": round(float(adjusted_rand_score(ref, lab)), 4), "ari_nonsingleton": round(ns, 4),
                   "frac_nonsingleton": round(frac, 4)}
            print("  ", row, flush=True)
            out["results"].append(row)
    write(f"hac_ari_ceiling{'_quick' if args.quick else ''}.json", out)


def stability_mode(args):
    """Graph HAC with and without relinking on the data and on `--seeds - 1` copies with
    N(0, 1e-4^2) noise on the unit rows (each with its own exact k-NN graph), each against the
    exact clustering of the unperturbed data (mean cluster size 10): how much of an ARI gap between
    the two is the approximation and how much the instability of the cut itself."""
    from sklearn.metrics import adjusted_rand_score

    from cm_engine.knn import knn_graph

    out = {"machine": machine(), "metric": "cosine", "target_mean_size": 10, "command": " ".join(sys.argv),
           "results": [], "summary": []}
    for name, X in load_sets(args):
        Z, _ = exact_linkage(name, X)
        ref, _ = exact_cut(Z, len(X))
        for k in [int(x) for x in args.ks.split(",")]:
            got = {0: [], None: []}
            for s in range(args.seeds):
                Xs = (X if s == 0 else perturb(X, "noise1e-4", seed=s)).astype(np.float32)
                g = knn_graph(Xs, k=k, metric="cosine", exact=True)
                for relink in got:
                    m = hac_merges(g, embeddings=Xs, relink=relink, device="cpu")
                    a = float(adjusted_rand_score(ref, cut(m, epsilon_for_mean_size(m, 10))))
                    got[relink].append(a)
                    out["results"].append({"dataset": name, "k": k, "noise_seed": s, "perturbed": s > 0,
                                           "relink": HACParams(relink=relink).relink, "ari": round(a, 4)})
                    print("  ", out["results"][-1], flush=True)
            for relink, v in got.items():
                out["summary"].append({"dataset": name, "k": k, "relink": HACParams(relink=relink).relink,
                                       "runs": len(v), "ari_mean": round(float(np.mean(v)), 4),
                                       "ari_min": round(min(v), 4), "ari_max": round(max(v), 4)})
                print(out["summary"][-1], flush=True)
    tag = ("_" + args.datasets.replace(",", "_")) if args.datasets else ""
    write(f"hac_ari_stability{tag}.json", out)


CONFIGS = {  # label -> (missing, missing_value: None | "pair_mean", relink: None = hac's default)
    "exact": ("exact", None, None), "exact(edges only)": ("exact", None, 0),
    "constant(max r)": ("constant", None, None), "constant(pair mean)": ("constant", "pair_mean", None),
    "bound": ("bound", None, None), "edges": ("edges", None, None)}


def ari_mode(args):
    from sklearn.metrics import adjusted_rand_score

    ks = [16] if args.quick else [int(x) for x in args.ks.split(",")]
    out = {"machine": machine(), "metric": "cosine", "target_mean_size": 10, "command": " ".join(sys.argv),
           "load_avg_1_5_15_at_start": os.getloadavg(), "results": [],
           "notes": "exact = fastcluster average linkage on the full condensed cosine distance matrix "
                    "(identical to scipy's); graphs are exact brute-force k-NN; 'ari_same_eps' cuts the graph "
                    "HAC at the exact clustering's epsilon, 'ari_own_eps' at the epsilon that gives the graph "
                    "HAC itself mean size 10 (what cluster(target_mean_size=10) does); 'ari_nonsingleton': "
                    "ari_own_eps on the points in non-singleton exact clusters. missing='exact' gets the rows as "
                    "float32 (what cluster() uses for float16/float32 pools). Shared 2-core machine: hac_s is "
                    "under other engineers' load."}
    for name, X in load_sets(args):
        Z, t_exact = exact_linkage(name, X)
        n = len(X)
        ref, eps_exact = exact_cut(Z, n)
        print(f"{name}: n={n}, exact in {t_exact:.1f}s, eps={eps_exact:.4f}, clusters={ref.max()}", flush=True)
        for k in ks:
            I, D = exact_knn(X, k, "cosine")
            rng = np.random.default_rng(1)
            i, j = rng.integers(0, n, (2, 100_000))
            i, j = i[i != j], j[i != j]
            Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
            pair_mean = float(np.mean(1.0 - np.sum(Xn[i] * Xn[j], axis=1)))
            for label in args.missing_rules.split(","):
                missing, mv, relink = CONFIGS[label]
                mv = pair_mean if mv == "pair_mean" else mv
                rounds = []
                t0 = time.time()
                m = hac_merges((I, D), embeddings=X.astype(np.float32) if missing == "exact" else None,
                               missing=missing, missing_value=mv, relink=relink, device="cpu",
                               progress=lambda d_, t_: rounds.append(d_))
                t = time.time() - t0
                lab_same = cut(m, eps_exact)
                eps_own = epsilon_for_mean_size(m, 10)
                lab_own = cut(m, eps_own)
                row = {"dataset": name, "n": n, "k": k, "missing": label, "missing_value": mv,
                       "relink": HACParams(missing=missing, relink=relink).relink,
                       "hac_s": round(t, 3), "rounds": len(rounds),
                       "exact_s": round(t_exact, 2), "eps_exact": eps_exact, "eps_own": eps_own,
                       "clusters_exact": int(ref.max()), "clusters_same_eps": int(lab_same.max() + 1),
                       "clusters_own_eps": int(lab_own.max() + 1), "merges": len(m),
                       "ari_same_eps": round(float(adjusted_rand_score(ref, lab_same)), 4),
                       "ari_own_eps": round(float(adjusted_rand_score(ref, lab_own)), 4),
                       "ari_nonsingleton": round(nonsingleton_ari(ref, lab_own)[0], 4)}
                print("  ", row, flush=True)
                out["results"].append(row)
    tag = "_quick" if args.quick else ""
    if args.datasets:  # partial runs go to their own file, merged by --merge-ari
        tag += "_" + args.datasets.replace(",", "_") + "_k" + args.ks.replace(",", "_")
    write(f"hac_ari{tag}.json", out)


def merge_ari():
    """Merge the per-dataset files hac_ari_<dataset>_k<k>.json into hac_ari.json."""
    parts = sorted(RESULTS.glob("hac_ari_*_k*.json"))
    rows, mach = [], None
    for p in parts:
        d = json.loads(p.read_text())
        rows += d["results"]
        mach = mach or d["machine"]
        notes = d["notes"]
    ceil_path = RESULTS / "hac_ari_ceiling.json"
    ceiling = json.loads(ceil_path.read_text())["results"] if ceil_path.exists() else []
    table = []  # the README's table: default rule vs the old default vs the perturbation ceiling
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        c = [r["ari"] for r in ceiling if r["dataset"] == ds and r["perturbation"] == "noise1e-4"]
        for k in sorted({r["k"] for r in rows if r["dataset"] == ds}):
            get = lambda lab: next((r["ari_own_eps"] for r in rows if r["dataset"] == ds and r["k"] == k
                                    and r["missing"] == lab), None)
            table.append({"dataset": ds, "k": k, "ari_exact_rule": get("exact"),
                          "ari_exact_rule_edges_only": get("exact(edges only)"), "ari_constant": get("constant(max r)"),
                          "ceiling_noise1e-4": c[0] if c else None})
    write("hac_ari.json", {"machine": mach, "metric": "cosine", "target_mean_size": 10, "table": table,
                           "results": rows, "ceiling": ceiling,
                           "notes": notes + " 'table': ari_own_eps of missing='exact' (cluster()'s default for cosine, "
                                    "relinked: hac's default), of the same rule with relink=0 (merges along graph "
                                    "edges only, the default before stop 17) "
                                    "and of 'constant(max r)' (the graph-only rule), beside the ARI of exact average "
                                    "linkage on the data + N(0, 1e-4^2) noise against the unperturbed one "
                                    "(hac_ari_ceiling.json). The rules 'bound' and 'edges' (ARI < 0.03 everywhere) "
                                    "were measured in the earlier per-dataset files (git history, commit 27d01ee) "
                                    "and are left out of these runs. Merged from "
                                    + ", ".join(p.name for p in parts) + "."})


def scale_mode(args):
    n, k = args.scale, args.k
    t0 = time.time()
    I, D, ginfo = faiss_graph(n, k)
    t_graph = time.time() - t0
    rounds = []
    prog = lambda done, total: rounds.append((time.time(), done))
    max_eps = args.max_epsilon
    missing = args.missing
    X = None
    if missing == "exact":  # cluster()'s default for cosine: the pool's rows make the linkage exact
        from cm_engine.synthetic import PoolSpec, cached_pool

        X = np.load(cached_pool(BENCH_DATA, PoolSpec(n=n, d=128)), mmap_mode="r")
    if not args.no_warmup:
        wi = np.array(I[:20000], dtype=np.int64)
        wi[wi >= 20000] = -1
        hac_merges((wi, D[:20000]), embeddings=None if X is None else X[:20000], missing=missing, device="cpu",
                   max_epsilon=max_eps)  # warm-up (small)
    rounds.clear()
    t0, c0 = time.time(), time.process_time()
    m = hac_merges((I, D), embeddings=X, missing=missing, device="cpu", max_epsilon=max_eps, progress=prog)
    t_hac, c_hac = time.time() - t0, time.process_time() - c0
    eps10 = epsilon_for_mean_size(m, 10)
    t1 = time.time()
    lab = cut(m, eps10)
    t_cut = time.time() - t1
    res = {"machine": machine(), "n": n, "k": k, "metric": "cosine", "graph": "faiss IVF-Flat (see graph_info)",
           "graph_info": ginfo, "graph_s": round(t_graph, 2), "missing": missing, "hac_s": round(t_hac, 2),
           "hac_cpu_s": round(c_hac, 2), "rounds": len(rounds),
           "merges": len(m), "max_epsilon": max_eps, "eps_mean10": eps10, "clusters_mean10": int(lab.max() + 1),
           "cut_s": round(t_cut, 3), "peak_rss_gb": round(peak_rss_gb(), 2),
           "round_times": [round(t - t0, 2) for t, _ in rounds[:: max(1, len(rounds) // 50)]],
           "load_avg_1_5_15": os.getloadavg(), "nice": os.nice(0),
           "command": " ".join(sys.argv),
           "notes": "HAC time excludes the graph (for missing='exact' it includes reading and normalising the pool); "
                    "one run after a small warm-up; hac_cpu_s: the process's CPU seconds (all threads) over the HAC "
                    "call, a load-robust figure when the wall time is inflated by other jobs; shared 2-core machine "
                    "(other engineers' jobs may run beside it); peak RSS is the whole process (graph arrays included)."}
    print(json.dumps({k_: v for k_, v in res.items() if k_ != "round_times"}, indent=1))
    write(f"hac_scale_{n}_k{k}{'' if missing == 'exact' else '_' + missing}{'_quick' if args.quick else ''}.json", res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ari", action="store_true")
    ap.add_argument("--scale", type=int, default=0)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--max-epsilon", type=float, default=None)
    ap.add_argument("--missing", default="exact", help="scale mode: HAC missing-pair rule (exact: cluster()'s default)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", default="", help="comma-separated substrings (cifar, banking, clinc)")
    ap.add_argument("--ks", default="16,32")
    ap.add_argument("--merge-ari", action="store_true")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--missing-rules", dest="missing_rules",
                    default="exact,exact(edges only),constant(max r),constant(pair mean)",
                    help="ari mode: comma-separated labels of CONFIGS")
    ap.add_argument("--ceiling", action="store_true", help="exact linkage on perturbed data vs unperturbed")
    ap.add_argument("--stability", action="store_true", help="graph HAC with / without relinking on the data and "
                    "on noisy copies, against the exact clustering (--seeds runs per k)")
    ap.add_argument("--seeds", type=int, default=5, help="--stability: runs per k (the first unperturbed)")
    ap.add_argument("--perturb", default="noise1e-4,f16")
    args = ap.parse_args()
    if args.merge_ari:
        return merge_ari()
    if args.ceiling:
        return ceiling_mode(args)
    if args.stability:
        return stability_mode(args)
    print("complete-graph check vs scipy: max height error", check_exact())
    if args.quick and not args.ari and not args.scale:
        args.ari = True
        args.scale = 100_000
    if args.ari:
        ari_mode(args)
    if args.scale:
        scale_mode(args)


if __name__ == "__main__":
    sys.exit(main())
