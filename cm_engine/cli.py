"""`cm-engine` command line: a thin shell over the stage functions.

    cm-engine cluster --embeddings X.npy (--epsilon E | --target-mean-size S) --out LABELS.npy
    cm-engine select (--scores S.npy | --logits L.npy | --probabilities P.npy) --labels LABELS.npy
                     --budget B --out PICKED.npy [--graph I.npy D.npy [--dedup] [--delta X] [--report]]
    cm-engine demo   [--n 1000000]      the whole pipeline on a built-in synthetic pool
    cm-engine bench  [...]              benchmarks/throughput.py (from a source checkout)

Every command takes --json (a machine-readable summary on stdout), shows progress
bars on stderr for long work (--quiet hides them), exits 2 with a one-line reason on
bad input, and writes outputs atomically (temporary file renamed into place).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from ._device import peak_rss_bytes

log = logging.getLogger("cm_engine")


class CLIError(Exception):
    """Bad usage detected by the shell itself (exit 2, one line)."""


# --------------------------------------------------------------------------- helpers

def _progress(args, total, desc):
    """A callable(n_done) that advances a tqdm bar on stderr, or None when quiet."""
    if args.quiet:
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="row", unit_scale=True, leave=False, file=sys.stderr,
               mininterval=0.5)
    _progress.bars.append(bar)
    return bar.update


_progress.bars = []


def _close_bars():
    for bar in _progress.bars:
        bar.close()
    _progress.bars.clear()


def _check_out(path: str, arg: str = "--out") -> Path:
    """Fail before any work when the output cannot be written (nothing is written here)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"{arg}: expected a path in an existing directory, got {path!r}")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{arg}: expected a writable directory, got {str(parent)!r}")
    if p.is_dir():
        raise CLIError(f"{arg}: expected a file path, got a directory {path!r}")
    return p


def _emit(args, summary: dict, lines: list[str]) -> None:
    _close_bars()
    if args.json:
        print(json.dumps(summary, indent=2, default=_jsonable))
    else:
        for line in lines:
            print(line)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _cluster_stats(labels: np.ndarray) -> dict:
    sizes = np.bincount(labels)
    return {
        "n_points": int(labels.size),
        "n_clusters": int(sizes.size),
        "mean_size": float(labels.size / max(1, sizes.size)),
        "median_size": float(np.median(sizes)) if sizes.size else 0.0,
        "largest": int(sizes.max()) if sizes.size else 0,
        "singletons": int((sizes == 1).sum()),
    }


# --------------------------------------------------------------------------- commands

RELINK_HELP = ("cosine HAC: at each halving of the cluster count, link each cluster to this many nearest clusters "
               "(by the direction of their row sums) beyond its k-NN edges; 0 = graph edges only (faster, further "
               "from exact average linkage); default 16")


def cmd_cluster(args) -> int:
    from .cluster import cluster
    from .pool import Pool, save_npy

    if (args.epsilon is None) == (args.target_mean_size is None):
        raise CLIError("--epsilon/--target-mean-size: expected exactly one of them, got "
                       + ("both" if args.epsilon is not None else "neither"))
    out = _check_out(args.out)
    pool = Pool(args.embeddings, name="--embeddings")
    t0 = time.perf_counter()
    res = cluster(args.embeddings, epsilon=args.epsilon, target_mean_size=args.target_mean_size, k=args.k,
                  metric=args.metric, backend=args.backend, device=args.device, cache_dir=args.cache_dir,
                  seed=args.seed, relink=args.relink, progress=_progress(args, pool.n, "k-NN graph"))
    wall = time.perf_counter() - t0
    save_npy(out, res.labels)
    stats = _cluster_stats(res.labels)
    summary = {"command": "cluster", "out": str(out), "epsilon": res.epsilon, "k": args.k, "metric": args.metric,
               **stats, "wall_s": wall, "timings_s": getattr(res, "timings", {}),
               "cache_hits": getattr(res, "cache_hits", {}), "peak_rss_bytes": peak_rss_bytes()}
    _emit(args, summary, [
        f"clustered {stats['n_points']:,} points into {stats['n_clusters']:,} clusters "
        f"(epsilon={res.epsilon:.6g}, mean size {stats['mean_size']:.2f}, largest {stats['largest']:,}, "
        f"singletons {stats['singletons']:,}) in {wall:.1f} s",
        f"labels written to {out}",
    ])
    return 0


def _scores_from_args(args, n_hint=None):
    from .margin import margin_scores
    from .pool import Pool

    given = [a for a in ("scores", "logits", "probabilities") if getattr(args, a) is not None]
    if len(given) != 1:
        raise CLIError("--scores/--logits/--probabilities: expected exactly one of them, got "
                       + (", ".join("--" + g for g in given) if given else "none"))
    if args.scores is not None:
        if args.multilabel:
            raise CLIError("--multilabel: applies to --logits or --probabilities, got --scores")
        pool = Pool(args.scores, name="--scores")
        return pool.read(0, pool.n)  # N floats: small next to the pool itself
    src = args.logits if args.logits is not None else args.probabilities
    name = "--logits" if args.logits is not None else "--probabilities"
    pool = Pool(src, name=name)
    try:
        return margin_scores(pool.array, from_logits=args.logits is not None, multilabel=args.multilabel,
                             reduce=args.reduce, device=args.device)
    except (ValueError, TypeError) as e:  # the library names its argument "outputs"; the user typed a flag
        msg = str(e)
        raise type(e)(name + msg[len("outputs"):] if msg.startswith("outputs") else msg) from None


def _dedup_args(args):
    """--graph/--dedup/--delta/--report checked before any work: delta (float, or None = auto)."""
    from ._validate import check_float

    if args.graph is None and (args.dedup or args.report):
        raise CLIError("--graph: expected INDICES.npy DISTANCES.npy with " + ("--dedup" if args.dedup else "--report")
                       + ", got none")
    if args.delta is None or args.delta == "auto":
        return None
    if not (args.dedup or args.report):
        raise CLIError(f"--delta: applies with --dedup or --report, got --delta {args.delta}")
    try:
        v = float(args.delta)
    except ValueError:
        raise CLIError(f"--delta: expected a number >= 0 or 'auto', got {args.delta!r}") from None
    return check_float("--delta", v, min=0.0)


def _load_graph(paths, n):
    """The k-NN graph from --graph INDICES.npy DISTANCES.npy (memory-mapped), checked against N."""
    from .pool import open_array
    from .redundancy import _graph_arrays

    ind = open_array(paths[0], name="--graph indices")
    dist = open_array(paths[1], name="--graph distances")
    ind, dist = _graph_arrays((ind, dist))
    if ind.shape[0] != n:
        raise CLIError(f"--graph: expected {n} rows (the pool's size), got {ind.shape[0]}")
    return ind, dist


def cmd_select(args) -> int:
    from .pool import save_npy
    from .strategies import cluster_margin
    from ._validate import as_labels

    out = _check_out(args.out)
    if args.budget < 0:
        raise CLIError(f"--budget: expected an integer >= 0, got {args.budget}")
    delta = _dedup_args(args)
    t0 = time.perf_counter()
    labels = as_labels("--labels", args.labels)
    scores = np.asarray(_scores_from_args(args))
    exclude = None
    if args.exclude is not None:
        from .pool import open_array

        exclude = np.asarray(open_array(args.exclude, name="--exclude"))
    graph = None
    if args.graph is not None:
        from .redundancy import auto_delta

        graph = _load_graph(args.graph, labels.size)
        if delta is None and (args.dedup or args.report):
            delta = auto_delta(graph)  # once: the filter and the report use the same threshold
    t1 = time.perf_counter()
    kw = {}
    if args.order != "smallest":
        kw["order"] = args.order
    if args.label_aware:
        kw["label_aware"] = True
    if args.dedup:
        kw.update(dedup_graph=graph, delta=delta)
    picked = cluster_margin(scores, labels, args.budget, km_ratio=args.km_ratio, exclude=exclude, seed=args.seed, **kw)
    t2 = time.perf_counter()
    report = None
    if args.report:
        from .redundancy import redundancy_report

        report = redundancy_report(picked, graph, delta=delta, labeled=exclude)
    save_npy(out, picked)
    n_cl = int(np.unique(labels[picked]).size) if picked.size else 0
    summary = {"command": "select", "out": str(out), "n_picked": int(picked.size), "budget": args.budget,
               "km_ratio": args.km_ratio, "n_pool": int(labels.size), "clusters_covered": n_cl,
               "dedup": bool(args.dedup), "delta": delta,
               "scoring_s": t1 - t0, "selection_s": t2 - t1, "peak_rss_bytes": peak_rss_bytes()}
    lines = [f"picked {picked.size:,} of {labels.size:,} points from {n_cl:,} clusters "
             f"(scoring {t1 - t0:.2f} s, selection {t2 - t1:.2f} s"
             + (f", near-duplicate filter at delta={delta:.4g})" if args.dedup else ")")]
    if report is not None:
        summary["redundancy"] = report
        lines.append(f"near-copies: {100 * report['redundant']:.1f}% of the batch ({100 * report['near_labeled']:.1f}% "
                     f"of excluded/labeled points, {100 * report['near_copicked']:.1f}% of other picks; "
                     f"delta={report['delta']:.4g})")
    lines.append(f"indices written to {out}")
    _emit(args, summary, lines)
    return 0


def cmd_demo(args) -> int:
    """pool -> graph -> HAC -> margins -> selection on a built-in synthetic pool."""
    from .cluster import cluster
    from .margin import margin_scores
    from .pool import Pool, save_npy
    from .strategies import cluster_margin
    from .synthetic import PoolSpec, cached_pool, make_logits

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if not os.access(work, os.W_OK):
        raise CLIError(f"--workdir: expected a writable directory, got {str(work)!r}")
    if args.budget > args.n:
        raise CLIError(f"--budget: expected at most --n ({args.n}), got {args.budget}")
    spec = PoolSpec(n=args.n, d=args.d, seed=args.seed)
    stages, t = {}, [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        stages[name] = {"seconds": now - t[0], "peak_rss_gb": peak_rss_bytes() / 2**30}
        t[0] = now
        if not args.json and not args.quiet:
            _close_bars()
            print(f"  {name:<22} {stages[name]['seconds']:8.2f} s   peak RSS {stages[name]['peak_rss_gb']:5.2f} GiB",
                  file=sys.stderr)

    path = cached_pool(work, spec, progress=_progress(args, spec.n, "pool"))
    lap("pool (generate/open)")
    res = cluster(path, target_mean_size=args.target_mean_size, k=args.k, metric=args.metric,
                  cache_dir=work / "cache", device=args.device, seed=args.seed, relink=args.relink,
                  progress=_progress(args, spec.n, "k-NN graph"))
    lap("graph + HAC (cached)")
    logits_path = work / f"logits_{spec.name()}_c{args.classes}.npy"
    if not logits_path.exists():
        make_logits(path, args.classes, seed=args.seed, path=logits_path)
    lap("model outputs (synth)")
    scores = margin_scores(logits_path, device=args.device)
    lap("margin scores")
    picked = cluster_margin(scores, res.labels, args.budget, km_ratio=args.km_ratio, seed=args.seed)
    lap("round-robin selection")
    out = work / "picked.npy"
    save_npy(out, picked)
    stats = _cluster_stats(res.labels)
    total = sum(s["seconds"] for s in stages.values())
    summary = {"command": "demo", "pool": str(path), "n": spec.n, "d": spec.d, "k": args.k, "metric": args.metric,
               "classes": args.classes, "budget": args.budget, "km_ratio": args.km_ratio,
               "epsilon": res.epsilon, "clusters": stats, "stages": stages,
               "cluster_timings_s": getattr(res, "timings", {}), "cache_hits": getattr(res, "cache_hits", {}),
               "n_picked": int(picked.size), "clusters_covered": int(np.unique(res.labels[picked]).size),
               "total_s": total, "peak_rss_bytes": peak_rss_bytes(), "out": str(out)}
    lines = [f"cm-engine demo: {spec.n:,} x {spec.d} synthetic pool ({path})"]
    for name, s in stages.items():
        lines.append(f"  {name:<22} {s['seconds']:8.2f} s   peak RSS {s['peak_rss_gb']:5.2f} GiB")
    lines += [
        f"  {'total':<22} {total:8.2f} s",
        f"clusters: {stats['n_clusters']:,} (epsilon={res.epsilon:.4g}, mean size {stats['mean_size']:.2f}, "
        f"median {stats['median_size']:.0f}, largest {stats['largest']:,}, singletons {stats['singletons']:,})",
        f"picked {picked.size:,} points (km_ratio {args.km_ratio}) from "
        f"{summary['clusters_covered']:,} clusters -> {out}",
    ]
    _emit(args, summary, lines)
    return 0


def cmd_bench(args, rest) -> int:
    """Run benchmarks/throughput.py from the source checkout this package lives in."""
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    if not script.exists():
        raise CLIError(f"bench: expected the benchmarks folder of a source checkout at {script.parent}, "
                       "got none (clone the repository to run benchmarks)")
    mod = runpy.run_path(str(script), run_name="cm_engine_bench")
    return int(mod["main"](rest) or 0)


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--verbose", action="store_true", help="log stage details to stderr")
    common.add_argument("--device", default="auto", help="auto (GPU if torch sees one), cpu, cuda, cuda:N")

    p = argparse.ArgumentParser(prog="cm-engine", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cluster", parents=[common], help="k-NN graph + average-linkage HAC, cached; writes labels")
    c.add_argument("--embeddings", required=True, help=".npy file or directory of .npy shards, [N, d]")
    c.add_argument("--epsilon", type=float, help="merge while average linkage distance <= epsilon")
    c.add_argument("--target-mean-size", type=float, help="pick the epsilon whose cut has this mean cluster size")
    c.add_argument("--k", type=int, default=16, help="neighbours per point in the graph (default 16)")
    c.add_argument("--metric", choices=["cosine", "l2"], default="cosine")
    c.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto")
    c.add_argument("--cache-dir", help="reuse graphs and merge lists across runs")
    c.add_argument("--relink", type=int, default=None, help=RELINK_HELP)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="labels .npy (int64 [N])")

    s = sub.add_parser("select", parents=[common], help="Cluster-Margin selection; writes picked pool indices")
    s.add_argument("--scores", help="margin scores .npy (float [N]; lower = more uncertain)")
    s.add_argument("--logits", help="model logits .npy [N, C]")
    s.add_argument("--probabilities", help="model probabilities .npy [N, C]")
    s.add_argument("--multilabel", action="store_true", help="per-class binary margins reduced over classes")
    s.add_argument("--reduce", choices=["min", "mean"], default="min", help="multi-label reduction")
    s.add_argument("--labels", required=True, help="cluster labels .npy (int [N]) from `cm-engine cluster`")
    s.add_argument("--budget", type=int, required=True, help="how many points to pick")
    s.add_argument("--km-ratio", type=float, default=10.0, help="candidates = round(km_ratio * budget) lowest margins")
    s.add_argument("--exclude", help=".npy of pool indices already labeled or picked")
    s.add_argument("--order", choices=["smallest", "largest", "random"], default="smallest",
                   help="cluster visiting order (the paper's: smallest)")
    s.add_argument("--label-aware", action="store_true", help="clusters holding no excluded point first")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="picked indices .npy (int64, in visiting order)")
    s.add_argument("--graph", nargs=2, metavar=("INDICES.npy", "DISTANCES.npy"),
                   help="the pool's k-NN graph (int [N, k] neighbours, -1 = none; float [N, k] distances, rows "
                        "ascending) for --dedup and --report")
    s.add_argument("--dedup", action="store_true",
                   help="near-duplicate filter: skip candidates within --delta of an --exclude'd (labeled) point "
                        "or of an earlier-kept candidate (needs --graph)")
    s.add_argument("--delta", help="near-copy distance (number >= 0) or 'auto' (default: from the graph's distances)")
    s.add_argument("--report", action="store_true",
                   help="report the fraction of picks that are near-copies of excluded points or of each other "
                        "(needs --graph)")

    d = sub.add_parser("demo", parents=[common], help="the whole pipeline on a built-in synthetic pool")
    d.add_argument("--n", type=int, default=1_000_000, help="pool size (default 1,000,000)")
    d.add_argument("--d", type=int, default=128, help="embedding dimension (default 128)")
    d.add_argument("--classes", type=int, default=100, help="classes of the simulated model (default 100)")
    d.add_argument("--budget", type=int, default=100_000, help="points to pick (default 100,000)")
    d.add_argument("--km-ratio", type=float, default=10.0)
    d.add_argument("--k", type=int, default=16)
    d.add_argument("--metric", choices=["cosine", "l2"], default="cosine")
    d.add_argument("--target-mean-size", type=float, default=10.0, help="the paper's setting: about 10")
    d.add_argument("--relink", type=int, default=None, help=RELINK_HELP)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workdir", default=os.environ.get("CM_ENGINE_WORKDIR", ".cm-engine-demo"),
                   help="where the pool, cache and outputs live (default ./.cm-engine-demo)")

    sub.add_parser("bench", help="throughput benchmark (benchmarks/throughput.py; --help there)", add_help=False)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        try:
            return cmd_bench(None, argv[1:])
        except CLIError as e:
            print(f"cm-engine: error: {e}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return {"cluster": cmd_cluster, "select": cmd_select, "demo": cmd_demo}[args.command](args)
    except (CLIError, ValueError, TypeError) as e:
        _close_bars()
        msg = " ".join(str(e).split())
        print(f"cm-engine: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_bars()
        print("cm-engine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
