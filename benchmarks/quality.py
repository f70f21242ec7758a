"""Selection-quality benchmark (issues 5 and 7): active-learning curves on frozen features.

Protocol: frozen features (PCA-128 of each dataset's embeddings, fitted on the pool, unsupervised),
a multinomial logistic-regression head (_quality_head.py: standardized features, full-batch L-BFGS,
the same hyperparameters everywhere) retrained from scratch each round, test accuracy after each
round. Seed set: 1% of the pool at random (the same for every strategy of a seed); batches of
--batch-frac of the pool; --rounds rounds; --seeds seeds. Pools: a seeded subset of each training
set (cifar10/fashion_mnist 20K, clinc150 15K, banking77 10K: all of it) and a near-duplicate variant
of the same size (pool_size/4 originals x 4 noisy copies, _quality_data.py). Clustering is done ONCE
per pool (engine: cm_engine.cluster, k=16 cosine, target mean size 10, recut to 4; exact: average
linkage over all pairs (fastcluster/scipy, cosine) cut at the same mean size) and reused.

    python benchmarks/quality.py --quick                      # CI-size smoke run
    python benchmarks/quality.py --datasets banking77 --variants clean redundant --batch-frac 0.05 0.10
    python benchmarks/quality.py --datasets cifar10 --strategies cm_1.25 cm_10 --merge   # add/replace strategies
    python benchmarks/quality.py --summarize                  # tables -> docs/quality.md + summary JSON

Results: benchmarks/results/quality_<dataset>_<variant><suffix>.json and .png (accuracy vs labels); suffix
"" for 10% batches, "_b5" for 5% (in general "_b<percent>"), then --tag. Every batch fraction of a pool runs
in the same process on the same prepared pool (one clustering). --merge keeps the runs of the strategies
not re-run from the existing file when its pool and protocol match (same seed sets: the seed set depends on
the seed only, so strategies run in different processes are paired).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _quality_data as D  # noqa: E402
import _quality_head as H  # noqa: E402
from _common import SHARED_MACHINE_NOTE, git_commit, machine_info, peak_rss_bytes, utc_now, write_json  # noqa: E402

RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"

#: (name, description). "g4" = clusters recut to mean size 4; "filter" = issue 7's near-duplicate filter.
STRATEGIES = {
    "random": "uniform random",
    "margin": "lowest margin (no diversity)",
    "coreset": "CoreSet k-center greedy (cm_engine.baselines)",
    "badge": "BADGE k-means++ on gradient embeddings (cm_engine.baselines)",
    "cm_1.25": "Cluster-Margin, engine HAC, km_ratio 1.25, smallest-first (paper)",
    "cm_10": "Cluster-Margin, engine HAC, km_ratio 10, smallest-first (paper)",
    "exact_cm_1.25": "Cluster-Margin, exact HAC, km_ratio 1.25",
    "exact_cm_10": "Cluster-Margin, exact HAC, km_ratio 10",
    "cm_10_largest": "Cluster-Margin km 10, largest-first",
    "cm_10_random": "Cluster-Margin km 10, random cluster order",
    "cm_10_labelaware": "Cluster-Margin km 10, label-aware (unlabeled clusters first, random among equals)",
    "cm_10_largest_g4": "Cluster-Margin km 10, largest-first, clusters of mean size 4",
    "cm_10_labelaware_g4": "Cluster-Margin km 10, label-aware, clusters of mean size 4",
    "margin_filter": "margin + near-duplicate filter (auto delta)",
    "cm_1.25_filter": "Cluster-Margin km 1.25 + near-duplicate filter (auto delta)",
}
REDUNDANT_ONLY = {"cm_10_largest_g4", "cm_10_labelaware_g4"}
MEAN_SIZE, FINE_SIZE, K = 10, 4, 16
#: how the head's training rows are ordered (train_rows); files without it fitted on rows in pick order
TRAIN_ROWS = "sorted"

log = logging.getLogger("quality")


class _BigLock:
    """flock /tmp/cm-big.lock around steps that need > 1.5 GB (the exact all-pairs HAC)."""

    def __enter__(self):
        self.f = open("/tmp/cm-big.lock", "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def exact_linkage(X):
    """Average linkage over all pairs (cosine distances; O(N^2) memory: the pool sizes fit)."""
    try:
        import fastcluster

        Z = fastcluster.linkage(X.astype(np.float64), method="average", metric="cosine")
    except ImportError:  # pragma: no cover
        from scipy.cluster.hierarchy import linkage

        Z = linkage(X.astype(np.float64), "average", metric="cosine")
    return Z


def cut_linkage(Z, target_mean_size):
    """fcluster at the height whose cut leaves n / target_mean_size clusters (ties: all merges at it)."""
    from scipy.cluster.hierarchy import fcluster

    n = Z.shape[0] + 1
    p = int(round(n - n / target_mean_size))  # merges to apply for that mean size
    h = np.sort(Z[:, 2])
    eps = float(h[p - 1]) if p > 0 else 0.0
    lab = fcluster(Z, eps, "distance") if p > 0 else np.arange(1, n + 1)
    return np.unique(lab, return_inverse=True)[1].astype(np.int64), eps


def _sha(a) -> str:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:16]


def _source_sha() -> str:
    """Hash of cm_engine/hac.py + cluster.py as run (the working tree is shared: uncommitted edits count)."""
    import hashlib

    h = hashlib.sha1()
    for f in ("hac.py", "cluster.py"):
        h.update((HERE.parent / "cm_engine" / f).read_bytes())
    return h.hexdigest()[:16]


def _redundancy_source() -> dict:
    """Which near-duplicate filter the filter strategies ran with: the hash of cm_engine/redundancy.py +
    _redundancy_kernels.py as run, the last commit that touched them, and whether the (shared) working
    tree had them modified."""
    import hashlib
    import subprocess

    files = ("cm_engine/redundancy.py", "cm_engine/_redundancy_kernels.py")
    h = hashlib.sha1()
    for f in files:
        h.update((HERE.parent / f).read_bytes())

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:  # pragma: no cover (no git)
            return ""

    return {"redundancy_source_sha": h.hexdigest()[:16],
            "redundancy_commit": git("log", "-1", "--format=%h", "--", *files) or None,
            "redundancy_modified": bool(git("status", "--porcelain", "--", *files))}


def batch_suffix(batch_frac) -> str:
    """"" for the 10% batches (the historical file names), "_b5" for 5%, "_b<percent>" in general."""
    pct = round(100 * batch_frac, 6)
    return "" if pct == 10 else "_b" + (f"{pct:g}".replace(".", "p"))


def prepare_pool(name, variant, args):
    """Features, test set, clusterings (engine + exact), the k-NN graph and auto delta: once per pool."""
    from sklearn.metrics import adjusted_rand_score

    from cm_engine.cluster import cluster
    from cm_engine.knn import knn_graph
    from cm_engine.redundancy import auto_delta

    X, y, Xt, yt, g = D.dataset(name, variant, data=args.data, pool_size=args.pool_size)
    info = {"n_pool": int(X.shape[0]), "dim": int(X.shape[1]), "n_test": int(Xt.shape[0]),
            "n_classes": int(y.max()) + 1}
    t = time.perf_counter()
    cl = cluster(X, target_mean_size=MEAN_SIZE, k=K, metric="cosine")
    info["engine_cluster_s"] = time.perf_counter() - t
    fine = cl.recut(target_mean_size=FINE_SIZE)
    t = time.perf_counter()
    # The exact clustering depends on the pool only (not on cm_engine): cached next to the pool.
    key = D.CACHE / f"{name}_{variant}_{args.pool_size}_exact_mean{MEAN_SIZE}.npz"
    if key.exists():
        z = np.load(key)
        ex_labels, ex_eps = z["labels"], float(z["eps"])
        info["exact_cluster_cached"] = True
    else:
        n_pairs_bytes = X.shape[0] * (X.shape[0] - 1) // 2 * 8 * 2  # condensed distances + working copy
        if n_pairs_bytes > 1.5 * 2**30:
            with _BigLock():
                Z = exact_linkage(X)
        else:
            Z = exact_linkage(X)
        ex_labels, ex_eps = cut_linkage(Z, MEAN_SIZE)
        del Z
        np.savez(key, labels=ex_labels, eps=ex_eps)
    info["exact_cluster_s"] = time.perf_counter() - t
    t = time.perf_counter()
    graph = knn_graph(X, k=K, metric="cosine")
    delta = auto_delta(graph)
    info["graph_for_filter_s"] = time.perf_counter() - t
    info.update(engine_n_clusters=int(cl.n_clusters), engine_epsilon=float(cl.epsilon),
                engine_fine_n_clusters=int(fine.n_clusters), exact_n_clusters=int(ex_labels.max()) + 1,
                exact_epsilon=ex_eps, ari_engine_vs_exact=float(adjusted_rand_score(ex_labels, cl.labels)),
                delta=float(delta), engine_labels_sha=_sha(cl.labels), engine_fine_labels_sha=_sha(fine.labels),
                exact_labels_sha=_sha(ex_labels), hac_source_sha=_source_sha(), **_redundancy_source())
    if variant == "redundant":
        info["ari_engine_vs_copy_groups_g4"] = float(adjusted_rand_score(g, fine.labels))
        same = g[np.asarray(graph.indices)] == g[:, None]
        dd = np.asarray(graph.distances)
        info["delta_copy_edges_caught"] = float((dd[same] <= delta).mean())
        info["delta_noncopy_edges_caught"] = float((dd[~same] <= delta).mean())
    return dict(X=X, y=y, Xt=Xt, yt=yt, g=g, labels=cl.labels, labels_fine=fine.labels, labels_exact=ex_labels,
                graph=graph, delta=delta, info=info)


ENGINE_STRATEGIES = {s for s in STRATEGIES if s.startswith("cm_")}


def check_engine(args):
    """Recompute the engine clustering of every result file's pool with the code as it is now and compare
    label hashes with the ones its engine strategies ran with. Selection is deterministic given the
    clustering, so equal hashes mean the engine strategies' results stand; prints the files to re-run."""
    from cm_engine.cluster import cluster

    stale = []
    for path in sorted(RESULTS.glob("quality_*.json")):
        r = json.loads(path.read_text())
        if r.get("benchmark") != "quality" or r["quick"] != args.quick:
            continue
        X = D.dataset(r["dataset"], r["variant"], data=args.data, pool_size=args.pool_size)[0]
        if X.shape[0] != r["pool"]["n_pool"]:
            continue
        cl = cluster(X, target_mean_size=MEAN_SIZE, k=K, metric="cosine")
        now = {"engine_labels_sha": _sha(cl.labels), "engine_fine_labels_sha": _sha(cl.recut(
            target_mean_size=FINE_SIZE).labels)}
        bad = [s for s, p in r.get("strategy_pool", {}).items() if s in ENGINE_STRATEGIES
               and any(p.get(k) != v for k, v in now.items())]
        print(f"{path.name}: {'STALE ' + ' '.join(bad) if bad else 'engine strategies current'} "
              f"(now {now['engine_labels_sha']})", flush=True)
        if bad:
            stale.append(path.name)
    return stale


def select(strategy, P, model, Xs, labeled, budget, seed):
    """One selection: returns int64 pool indices."""
    from cm_engine.baselines import badge_select, coreset_select, random_select
    from cm_engine.margin import margin_scores
    from cm_engine.redundancy import filtered_cluster_margin, filtered_margin
    from cm_engine.strategies import cluster_margin

    n = Xs.shape[0]
    excl = np.asarray(labeled, dtype=np.int64)
    if strategy == "random":
        return random_select(n, budget, exclude=excl, seed=seed)
    logits = H.logits(model, Xs).numpy()
    if strategy == "badge":
        return badge_select(Xs.numpy(), logits, budget, exclude=excl, seed=seed, device="cpu")
    if strategy == "coreset":
        return coreset_select(Xs.numpy(), budget, exclude=excl, seed=seed, device="cpu")
    s = margin_scores(logits, device="cpu")
    if strategy == "margin":
        from cm_engine.strategies import lowest_k

        keep = np.ones(n, dtype=bool)
        keep[excl] = False
        elig = np.flatnonzero(keep)
        return elig[lowest_k(s[elig], budget)]
    if strategy == "margin_filter":
        return filtered_margin(s, P["graph"], budget, delta=P["delta"], exclude=excl)
    if strategy == "cm_1.25_filter":
        return filtered_cluster_margin(s, P["labels"], P["graph"], budget, km_ratio=1.25, delta=P["delta"],
                                       exclude=excl, seed=seed)
    parts = strategy.split("_")
    exact = parts[0] == "exact"
    if exact:
        parts = parts[1:]
    km = float(parts[1])
    opt = parts[2] if len(parts) > 2 else "smallest"
    labels = P["labels_exact"] if exact else (P["labels_fine"] if strategy.endswith("_g4") else P["labels"])
    order, aware = {"smallest": ("smallest", False), "largest": ("largest", False), "random": ("random", False),
                    "labelaware": ("random", True)}[opt]
    return cluster_margin(s, labels, budget, km_ratio=km, exclude=excl, seed=seed, order=order, label_aware=aware)


def train_rows(Xs, y, labeled):
    """The head's training rows for a labeled set: Xs [n, d] and y [n] at `labeled` in ascending index order.
    L-BFGS on the same rows in another order ends at slightly different weights (float summation order),
    and the loop amplifies that: margin and margin_filter (delta 0), which label the same set in different
    pick orders, drifted up to 0.8 points apart over 6 rounds. Sorting makes the fit a function of the set."""
    idx = np.sort(np.asarray(labeled))
    return Xs[idx], y[idx]


def run_pool(name, variant, args):
    P = prepare_pool(name, variant, args)
    log.info("%s/%s prepared: %s", name, variant, json.dumps(P["info"]))
    for bf in args.batch_frac:
        run_protocol(name, variant, args, P, bf)


def run_protocol(name, variant, args, P, batch_frac):
    from cm_engine.redundancy import redundancy_report

    info = P["info"]
    std = H.standardizer(P["X"])
    Xs, Xts = std(P["X"]), std(P["Xt"])
    y, yt, C = P["y"], P["yt"], info["n_classes"]
    n = Xs.shape[0]
    seed_n = max(C if args.quick else 1, int(round(args.seed_frac * n)))
    budget = int(round(batch_frac * n))
    strategies = [s for s in args.strategies if variant == "redundant" or s not in REDUNDANT_ONLY]
    runs = {s: [] for s in strategies}
    red_delta = P["delta"]
    kept = _kept_runs(name, variant, args, batch_frac, info, seed_n, budget, strategies)
    if args.resume:  # the seeds each strategy already has in the file are kept, the rest are run
        runs = {s: sorted((r for r in kept.pop(s, []) if r["seed"] < args.seeds), key=lambda r: r["seed"])
                for s in strategies}
    source = {k: info[k] for k in ("engine_labels_sha", "hac_source_sha", "redundancy_source_sha",
                                   "redundancy_commit", "redundancy_modified")}
    source.update(git_commit=git_commit(), time_utc=utc_now())
    fits = {}  # (seed, hash of the sorted labeled set) -> (model, acc): the head is fitted on the labeled rows
    # in index order (train_rows), so its fit is a function of the set alone; strategies often label the same
    # set (the filter on a clean pool with delta 0 is plain margin; km-10 orders agree in round 1), so an
    # identical set is trained once
    for seed in range(args.seeds):
        todo = [s for s in strategies if all(r["seed"] != seed for r in runs[s])]
        if not todo:
            continue
        rng = np.random.default_rng(1000 + seed)
        seed_set = rng.choice(n, seed_n, replace=False)
        t = time.perf_counter()
        m0 = H.train(*train_rows(Xs, y, seed_set), C)
        acc0 = H.accuracy(m0, Xts, yt)
        for s in todo:
            labeled = seed_set.copy()
            model = m0
            rec = {"seed": seed, "labels": [int(seed_n)], "acc": [acc0], "select_s": [], "train_s": [],
                   "near_labeled": [], "near_copicked": [], "source": source}
            for r in range(args.rounds):
                t0 = time.perf_counter()
                pick = select(s, P, model, Xs, labeled, budget, seed * 100 + r)
                rec["select_s"].append(time.perf_counter() - t0)
                pick = np.asarray(pick, dtype=np.int64)
                assert pick.size == budget and np.intersect1d(pick, labeled).size == 0, (s, pick.size)
                rep = redundancy_report(pick, P["graph"], delta=red_delta, labeled=labeled)
                rec["near_labeled"].append(rep["near_labeled"])
                rec["near_copicked"].append(rep["near_copicked"])
                if variant == "redundant":  # ground truth: picks whose copy group is already labeled/co-picked
                    gl = np.isin(P["g"][pick], P["g"][labeled])
                    _, inv, cnt = np.unique(P["g"][pick], return_inverse=True, return_counts=True)
                    rec.setdefault("true_copy_of_labeled", []).append(float(gl.mean()))
                    rec.setdefault("true_copy_in_batch", []).append(float((cnt[inv] > 1).mean()))
                labeled = np.concatenate([labeled, pick])
                t0 = time.perf_counter()
                fk = (seed, _sha(np.sort(labeled)))
                if fk not in fits:
                    m = H.train(*train_rows(Xs, y, labeled), C)
                    fits[fk] = (m, H.accuracy(m, Xts, yt))
                model, acc = fits[fk]
                rec["train_s"].append(time.perf_counter() - t0)
                rec["labels"].append(int(labeled.size))
                rec["acc"].append(acc)
            runs[s].append(rec)
            runs[s].sort(key=lambda r: r["seed"])
            log.info("%s/%s b%g seed %d %-20s acc %s sel %.2fs", name, variant, batch_frac, seed, s,
                     " ".join(f"{a:.3f}" for a in rec["acc"]), float(np.mean(rec["select_s"])))
        log.info("%s/%s b%g seed %d done in %.0fs", name, variant, batch_frac, seed, time.perf_counter() - t)
        merged = {**runs, **{k: v for k, v in kept.items() if k not in runs}}
        _write(name, variant, args, P, merged, list(merged), seed_n, budget, batch_frac, seeds_done=seed + 1)


def _result_path(name, variant, args, batch_frac):
    return RESULTS / (f"quality_{name}_{variant}" + batch_suffix(batch_frac) + args.tag
                      + ("_quick" if args.quick else "") + ".json")


def _kept_runs(name, variant, args, batch_frac, info, seed_n, budget, strategies):
    """With --merge: the existing file's runs of strategies not re-run now, if its pool/protocol match."""
    path = _result_path(name, variant, args, batch_frac)
    if not (args.merge or args.resume) or not path.exists():
        return {}
    old = json.loads(path.read_text())
    pr, p = old["protocol"], old["pool"]
    same = (pr["seed_set"] == seed_n and pr["budget"] == budget and pr["rounds"] == args.rounds
            and p["n_pool"] == info["n_pool"] and p["n_classes"] == info["n_classes"])
    if not same:
        raise SystemExit(f"--merge: {path} has another pool/protocol (seed set {pr['seed_set']}, budget "
                         f"{pr['budget']}, rounds {pr['rounds']}, pool {p['n_pool']}); expected {seed_n}, "
                         f"{budget}, {args.rounds}, {info['n_pool']}")
    if pr.get("train_rows") != TRAIN_ROWS:  # its fits differ from this code's for the same labeled sets
        raise SystemExit(f"--merge/--resume: {path} has train_rows {pr.get('train_rows')!r}, expected "
                         f"{TRAIN_ROWS!r}; rerun without --merge/--resume")
    if args.resume and any(old.get("strategy_pool", {}).get(s, old["pool"]).get(k) != info[k] for s in strategies
                           if s in old["runs"] for k in ("engine_labels_sha", "exact_labels_sha")):
        raise SystemExit(f"--resume: {path} ran with another clustering of the pool; rerun without --resume")
    kept = {s: r for s, r in old["runs"].items() if args.resume or s not in strategies}
    # which clustering each kept engine strategy ran with (so a later HAC change is visible)
    _KEPT_POOL_INFO[str(path)] = {s: old.get("strategy_pool", {}).get(s, old["pool"]) for s in kept}
    return kept


_KEPT_POOL_INFO: dict = {}


def _write(name, variant, args, P, runs, strategies, seed_n, budget, batch_frac, *, seeds_done):
    """Results so far (written after every seed, so a cut-short run still leaves its finished seeds)."""
    import torch

    info = P["info"]
    out = {"benchmark": "quality", "dataset": name, "variant": variant, "quick": args.quick,
           "protocol": {"seed_frac": args.seed_frac, "batch_frac": batch_frac, "rounds": args.rounds,
                        "seeds": min(len(v) for v in runs.values()), "seeds_planned": args.seeds, "seed_set": seed_n, "budget": budget, "features": "PCA-128 of the "
                        "dataset's embeddings (Fashion-MNIST: PCA-128 of pixels/255), fitted on unlabeled data",
                        "head": f"multinomial logistic regression, standardized features, L-BFGS max_iter "
                        f"{H.MAX_ITER}, L2 {H.LAMBDA}, subnormals flushed", "train_rows": TRAIN_ROWS, "k": K, "mean_size": MEAN_SIZE, "fine_mean_size": FINE_SIZE},
           "pool": info, "strategies": {s: STRATEGIES[s] for s in strategies}, "runs": runs,
           "summary": summarize_runs(runs), "machine": machine_info(), "git_commit": git_commit(),
           "peak_rss_bytes": peak_rss_bytes(), "time_utc": utc_now(),
           "notes": SHARED_MACHINE_NOTE + "; torch threads " + str(torch.get_num_threads())}
    path = _result_path(name, variant, args, batch_frac)
    kept_info = _KEPT_POOL_INFO.get(str(path), {})
    # per strategy: the pool record (clustering hashes, HAC source hash) of the process that ran it
    out["strategy_pool"] = {s: kept_info.get(s, info) for s in runs}
    out["commands"] = sorted(set(_old_commands(path) + [" ".join(["python"] + sys.argv)]))
    write_json(path, out)
    plot(out, path.with_suffix(".png"))
    return out


def _old_commands(path):
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text()).get("commands", [])
    except ValueError:
        return []


def _interp_labels(labels, acc, target):
    """Labels at which the curve first reaches `target` (linear interpolation), or None."""
    for i in range(len(acc)):
        if acc[i] >= target:
            if i == 0:
                return float(labels[0])
            a0, a1 = acc[i - 1], acc[i]
            return float(labels[i - 1] + (target - a0) / (a1 - a0) * (labels[i] - labels[i - 1]))
    return None


def summarize_runs(runs):
    """Per strategy: mean accuracy over rounds 1..R (mean ± SE over seeds), final accuracy, label
    savings vs random's final accuracy, mean selection time, redundancy fractions."""
    out = {}
    rnd = runs.get("random")
    target = float(np.mean([r["acc"][-1] for r in rnd])) if rnd else None
    for s, recs in runs.items():
        if not recs:
            continue
        per_seed = np.array([np.mean(r["acc"][1:]) for r in recs])
        curve = np.mean([r["acc"] for r in recs], axis=0)
        labels = recs[0]["labels"]
        d = {"mean_acc": float(per_seed.mean()),
             "se": float(per_seed.std(ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else 0.0,
             "final_acc": float(curve[-1]), "curve": curve.tolist(), "labels": labels,
             "select_s": float(np.mean([np.mean(r["select_s"]) for r in recs])),
             "near_labeled": float(np.mean([np.mean(r["near_labeled"]) for r in recs])),
             "near_copicked": float(np.mean([np.mean(r["near_copicked"]) for r in recs]))}
        if "true_copy_of_labeled" in recs[0]:
            d["true_copy_of_labeled"] = float(np.mean([np.mean(r["true_copy_of_labeled"]) for r in recs]))
            d["true_copy_in_batch"] = float(np.mean([np.mean(r["true_copy_in_batch"]) for r in recs]))
        if target is not None:
            need = _interp_labels(labels, curve, target)
            d["labels_to_random_final"] = need
            d["label_savings"] = None if need is None else float(1 - need / labels[-1])
        out[s] = d
    for s in list(out):
        if s.startswith("exact_") and s[6:] in runs:  # engine minus exact, paired by seed (same seed set)
            out[s[6:]]["paired_vs_exact"] = paired_diff(runs[s[6:]], runs[s])
    for base in ("margin", "random"):
        if base in runs:
            for s in out:
                if s != base:
                    out[s][f"paired_vs_{base}"] = paired_diff(runs[s], runs[base])
    return out


def paired_diff(a_recs, b_recs):
    """Mean over seeds of (mean acc over rounds of a - of b), with its SE, on the seeds both ran."""
    a = {r["seed"]: np.mean(r["acc"][1:]) for r in a_recs}
    b = {r["seed"]: np.mean(r["acc"][1:]) for r in b_recs}
    common = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in common])
    if d.size == 0:
        return None
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
    return {"diff": float(d.mean()), "se": se, "seeds": len(common)}


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, recs in res["runs"].items():
        a = np.array([r["acc"] for r in recs])
        m = a.mean(0)
        se = a.std(0, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else np.zeros_like(m)
        x = recs[0]["labels"]
        style = "-" if s in ("random", "margin", "cm_1.25", "cm_10", "margin_filter") else "--"
        ax.plot(x, m, style, marker=".", label=s, lw=1.6 if style == "-" else 1.0)
        ax.fill_between(x, m - se, m + se, alpha=0.15)
    p = res["pool"]
    ax.set_title(f"{res['dataset']} ({res['variant']}): pool {p['n_pool']}, {res['protocol']['seeds']} seeds, "
                 f"batch {res['protocol']['budget']}", fontsize=10)
    ax.set_xlabel("labels")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="shared data dir (default $CM_ENGINE_DATA or ../shared/data)")
    ap.add_argument("--datasets", nargs="+", default=list(D.DATASETS), choices=D.DATASETS)
    ap.add_argument("--variants", nargs="+", default=["clean", "redundant"], choices=["clean", "redundant"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch-frac", type=float, nargs="+", default=[0.10], help="one or more batch fractions")
    ap.add_argument("--seed-frac", type=float, default=0.01)
    ap.add_argument("--pool-size", type=int, default=None, help="override every pool size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="extra result-file suffix (e.g. _timing; tagged files are not reported)")
    ap.add_argument("--merge", action="store_true", help="keep the existing file's runs of other strategies")
    ap.add_argument("--resume", action="store_true", help="also keep the existing file's seeds of the strategies "
                    "run now and run only the seeds < --seeds they lack (adds seeds to a file)")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 2K pools, 2 seeds, 2 rounds")
    ap.add_argument("--check-engine", action="store_true", help="only compare the result files' engine "
                    "clusterings with the current code's (see check_engine)")
    ap.add_argument("--summarize", action="store_true", help="only write docs/quality.md and the summary JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("cm_engine").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    if args.check_engine:
        check_engine(args)
        return
    if args.summarize:
        from _quality_report import write_report

        write_report(RESULTS, DOCS / "quality.md")
        return
    if args.quick:
        args.pool_size = args.pool_size or 2000
        args.seeds, args.rounds = min(args.seeds, 2), min(args.rounds, 2)
    for name in args.datasets:
        for variant in args.variants:
            run_pool(name, variant, args)


if __name__ == "__main__":
    main()
