"""Issue 7 cost target: a selection cycle on a synthetic 1M-point pool with and without the filter.

Cycle = margin_scores(logits [N, C]) + cluster_margin (or filtered_cluster_margin), and margin selection
(uncertainty_select, against margin_scores + filtered_margin: case "margin"), the k-NN graph
and the cluster labels given (built once per pool, not part of a cycle). Synthetic graph: every
point has 3 near-copies (distance ~U(0, 0.005)) and 13 other neighbours (~U(0.05, 0.5)), so the
filter has real work; labeled set 10% of the pool, budget 10% (100K), km_ratio 1.25 and 10.
The filter reads either the graph itself (`filtered`) or the pool's `NearCopies` table built once
beforehand (`table`, as the selectors do; its one-time build is timed separately, `table_build_s`).
--layout shuffled scatters each copy group over the pool (random row order) instead of consecutive
rows: the same work, but every near-copy lookup is a cache miss.
Wall and process CPU time per cycle (the machine is shared: CPU time is the steadier of the two),
with the load average before and after.
    python benchmarks/_quality_filter_cost.py [--n 1000000] [--reps 5] [--classes 100 --tag _c100]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_MACHINE_NOTE, git_commit, machine_info, peak_rss_bytes, utc_now, write_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--classes", type=int, default=10,
                    help="classes of the logits scored in each cycle (the pipeline benchmarks use 100)")
    ap.add_argument("--tag", default="", help="results file quality_filter_cost<tag>.json")
    ap.add_argument("--layout", choices=("consecutive", "shuffled"), default="consecutive",
                    help="copy groups on consecutive rows, or scattered by a random row permutation")
    a = ap.parse_args()
    import torch

    from cm_engine.baselines import uncertainty_select
    from cm_engine.margin import margin_scores
    from cm_engine.redundancy import NearCopies, filtered_cluster_margin, filtered_margin
    from cm_engine.strategies import cluster_margin

    n, k, C = a.n, 16, a.classes
    rng = np.random.default_rng(0)
    g = np.arange(n) // 4  # copy groups of 4 consecutive rows
    base = g * 4
    copies = base[:, None] + np.array([[0, 1, 2, 3]])
    copies = copies[copies != np.arange(n)[:, None]].reshape(n, 3)
    others = rng.integers(0, n, size=(n, k - 3))
    ind = np.concatenate([copies, others], axis=1).astype(np.int32)
    dist = np.concatenate([np.sort(rng.uniform(0, 0.005, (n, 3)), 1), np.sort(rng.uniform(0.05, 0.5, (n, k - 3)), 1)],
                          axis=1).astype(np.float32)
    if a.layout == "shuffled":  # row p of the new pool is row perm[p] of the old one
        perm = rng.permutation(n)
        inv = np.empty(n, dtype=np.int64)
        inv[perm] = np.arange(n)
        ind, dist, g = inv[ind[perm]].astype(np.int32), dist[perm], g[perm]
    graph = (ind, dist)
    labels = rng.integers(0, n // 10, n)
    logits = rng.standard_normal((n, C)).astype(np.float32) * 3
    labeled = rng.choice(n, n // 10, replace=False)
    budget, delta = n // 10, 0.01
    res = {"benchmark": "quality_filter_cost", "n": n, "k": k, "classes": C, "budget": budget, "labeled": labeled.size,
           "delta": delta, "layout": a.layout, "command": "python3 " + " ".join(sys.argv),
           "loadavg_before": os.getloadavg(), "cases": {}}
    NearCopies.from_graph(graph, delta=delta)  # warm-up (numba compile or cache load)
    tb, cb = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        table = NearCopies.from_graph(graph, delta=delta)
        tb.append(time.perf_counter() - t0)
        cb.append(time.process_time() - c0)
    res.update(table_build_s=float(np.median(tb)), table_build_cpu_s=float(np.median(cb)), table_pairs=table.n_pairs,
               table_bytes=int(table.offsets.nbytes + table.neighbours.nbytes))
    print("table build", res["table_build_s"], res["table_build_cpu_s"], table, flush=True)
    # check the answer first: the filtered picks contain no near-copy pairs and no copy of a labeled point
    pick = filtered_cluster_margin(margin_scores(logits, device="cpu"), labels, graph, budget, km_ratio=1.25,
                                   delta=delta, exclude=labeled, seed=0)
    gl = np.zeros(n // 4 + 1, bool)
    gl[g[labeled]] = True
    assert pick.size == budget and not gl[g[pick]].any() and np.unique(g[pick]).size == pick.size
    assert np.array_equal(pick, filtered_cluster_margin(margin_scores(logits, device="cpu"), labels, table, budget,
                                                        km_ratio=1.25, exclude=labeled, seed=0))
    # km None: plain margin selection (`uncertainty_select`, scoring included) against `filtered_margin`
    # (the strategy that meets the quality targets); else Cluster-Margin with and without the filter
    for km in (1.25, 10.0, None):
        t = {"plain": [], "filtered": [], "table": []}
        c = {"plain": [], "filtered": [], "table": []}
        for r in range(a.reps + 1):  # first rep = warm-up, dropped; the three variants interleaved
            for name in t:
                t0, c0 = time.perf_counter(), time.process_time()
                if km is None and name == "plain":
                    uncertainty_select(logits, budget, measure="margin", exclude=labeled, device="cpu")
                elif km is None:
                    filtered_margin(margin_scores(logits, device="cpu"), graph if name == "filtered" else table,
                                    budget, delta=delta, exclude=labeled)
                elif name == "plain":
                    cluster_margin(margin_scores(logits, device="cpu"), labels, budget, km_ratio=km, exclude=labeled,
                                   seed=r)
                else:
                    filtered_cluster_margin(margin_scores(logits, device="cpu"), labels,
                                            graph if name == "filtered" else table, budget, km_ratio=km,
                                            delta=delta, exclude=labeled, seed=r)
                if r:
                    t[name].append(time.perf_counter() - t0)
                    c[name].append(time.process_time() - c0)
        med = {name: float(np.median(v)) for name, v in t.items()}
        cmed = {name: float(np.median(v)) for name, v in c.items()}
        case = "margin" if km is None else f"km_ratio_{km}"
        res["cases"][case] = {
            "cycle_s": med["plain"], "cycle_filtered_s": med["filtered"], "cycle_table_s": med["table"],
            "overhead": med["filtered"] / med["plain"] - 1, "overhead_table": med["table"] / med["plain"] - 1,
            "cycle_cpu_s": cmed["plain"], "cycle_filtered_cpu_s": cmed["filtered"], "cycle_table_cpu_s": cmed["table"],
            "overhead_cpu": cmed["filtered"] / cmed["plain"] - 1, "overhead_table_cpu": cmed["table"] / cmed["plain"] - 1,
            "all_cycle_s": t["plain"], "all_filtered_s": t["filtered"], "all_table_s": t["table"],
            "all_cycle_cpu_s": c["plain"], "all_filtered_cpu_s": c["filtered"], "all_table_cpu_s": c["table"]}
        print(case, {k: v for k, v in res["cases"][case].items() if not k.startswith("all")}, flush=True)
    res.update(loadavg_after=os.getloadavg(), machine=machine_info(), git_commit=git_commit(), peak_rss_bytes=peak_rss_bytes(),
               time_utc=utc_now(),
               notes=SHARED_MACHINE_NOTE + f"; torch threads {torch.get_num_threads()}; median of {a.reps} after a warm-up;"
               " CPU time is the process's (all threads); 'filtered' reads the graph, 'table' a NearCopies built once"
               " per pool (table_build_s, not part of a cycle)")
    write_json(Path(__file__).resolve().parent / "results" / f"quality_filter_cost{a.tag}.json", res)


if __name__ == "__main__":
    main()
