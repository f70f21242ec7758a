"""Tables for docs/quality.md from benchmarks/results/quality_<dataset>_<variant>[_b5].json (non-quick runs).

Everything here is read from the result files: per pool and batch fraction a strategy table, then the
issue 5 and issue 7 targets, a cross-pool summary (the README table) and benchmarks/results/
quality_summary.json / quality_summary.png. Differences between strategies are paired by seed (every
strategy of a seed starts from the same seed set), so their SE is that of the per-seed differences.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATASET_ORDER = ("cifar10", "fashion_mnist", "banking77", "clinc150")
#: Columns of the README summary table (strategy keys).
SUMMARY_STRATEGIES = ("margin", "coreset", "badge", "cm_1.25", "exact_cm_1.25", "cm_10", "exact_cm_10",
                      "cm_10_largest_g4", "margin_filter", "cm_1.25_filter")


#: The uniform matrix the README reports (every dataset x clean/redundant x 5% and 10% batches): result files
#: with another protocol, another strategy set or fewer seeds (more is fine) are still tabled, but marked and
#: left out of the target counts.
MATRIX = {"n_pool": 3000, "rounds": 6, "seeds": 6, "train_rows": "sorted",
          "strategies": ("random", "margin", "coreset", "badge", "cm_1.25", "exact_cm_1.25", "cm_10", "exact_cm_10",
                         "margin_filter", "cm_1.25_filter", "cm_10_largest_g4")}
MATRIX_REDUNDANT_ONLY = ("cm_10_largest_g4",)


def matrix_gap(r) -> str | None:
    """None if result file `r` is a complete cell of MATRIX, else what it lacks (e.g. "3 of 5 seeds")."""
    want = [s for s in MATRIX["strategies"] if r["variant"] == "redundant" or s not in MATRIX_REDUNDANT_ONLY]
    gaps = []
    if r["pool"]["n_pool"] != MATRIX["n_pool"] or r["protocol"]["rounds"] != MATRIX["rounds"]:
        gaps.append(f"pool {r['pool']['n_pool']}, {r['protocol']['rounds']} rounds")
    if r["protocol"].get("train_rows") != MATRIX["train_rows"]:
        gaps.append("head fitted on rows in pick order")
    seeds = min((len(r["runs"][s]) for s in want if s in r["runs"]), default=0)
    if seeds < MATRIX["seeds"]:
        gaps.append(f"{seeds} of {MATRIX['seeds']} seeds")
    missing = [s for s in want if s not in r["runs"]]
    if missing:
        gaps.append("no " + " ".join(missing))
    return "; ".join(gaps) or None


#: Table order of the strategies (the order of quality.STRATEGIES; merged runs may list them in any order).
ORDER = ("random", "margin", "coreset", "badge", "cm_1.25", "exact_cm_1.25", "cm_10", "exact_cm_10", "cm_10_largest",
         "cm_10_random", "cm_10_labelaware", "cm_10_largest_g4", "cm_10_labelaware_g4", "margin_filter",
         "cm_1.25_filter")


def _ordered(S):
    return sorted(S.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER))


def _load(results: Path):
    out = {}
    for p in sorted(results.glob("quality_*_*.json")):
        if p.stem.endswith("_quick") or p.stem in ("quality_filter_cost", "quality_summary", "quality_delta"):
            continue
        r = json.loads(p.read_text())
        if r.get("benchmark") != "quality" or r.get("quick"):
            continue
        if p.stem != f"quality_{r['dataset']}_{r['variant']}" + _suffix(r["protocol"]["batch_frac"]):
            continue  # tagged (timing / experiment) files are not reported
        r = _first_seeds(r, MATRIX["seeds"])
        out[(r["dataset"], r["variant"], float(r["protocol"]["batch_frac"]))] = r
    order = {d: i for i, d in enumerate(DATASET_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (-kv[0][2], order.get(kv[0][0], 9), kv[0][1])))


def _first_seeds(r, k):
    """Result `r` restricted to seeds 0..k-1 of every strategy (a uniform matrix: files with more seeds,
    e.g. from a --resume pass that did not reach every pool, are reported on the same seeds as the rest)."""
    if all(x["seed"] < k for v in r["runs"].values() for x in v):
        return r
    from quality import summarize_runs

    runs = {s: [x for x in v if x["seed"] < k] for s, v in r["runs"].items()}
    return {**r, "runs": runs, "summary": summarize_runs(runs),
            "protocol": {**r["protocol"], "seeds": min(len(v) for v in runs.values()),
                         "seeds_in_file": r["protocol"]["seeds"]}}


def _suffix(bf):
    pct = round(100 * bf, 6)
    return "" if pct == 10 else "_b" + f"{pct:g}".replace(".", "p")


def _pd(r, a, b):
    """Paired (by seed) difference of mean accuracy over rounds, a - b: (diff, se, seeds) or None."""
    A = {x["seed"]: np.mean(x["acc"][1:]) for x in r["runs"].get(a, [])}
    B = {x["seed"]: np.mean(x["acc"][1:]) for x in r["runs"].get(b, [])}
    common = sorted(set(A) & set(B))
    if not common:
        return None
    d = np.array([A[k] - B[k] for k in common])
    return float(d.mean()), (float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")), d.size


def _f(x, nd=2):
    return "-" if x is None else f"{100 * x:+.{nd}f}"


def _pdf(p):
    return "-" if p is None else f"{100 * p[0]:+.2f} ± {100 * p[1]:.2f}"


def _name(ds, var, bf):
    return f"{ds}/{var}/{round(100 * bf):g}%"


def _mark(r):
    """Pool-name suffix for a file outside the uniform matrix."""
    gap = matrix_gap(r)
    return "" if gap is None else f" (outside the matrix: {gap})"


def _vs_margin_table(runs):
    """Paired difference to margin ± its SE, per strategy, per pool (margin is the baseline to beat)."""
    cols = [s for s in ORDER if s != "margin" and any(s in r["summary"] for r in runs.values())]
    lines = ["### Gain over margin (points of mean accuracy over rounds, paired by seed, ± SE)", "",
             "| pool | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for key, r in runs.items():
        S = r["summary"]
        cells = [_pdf(_pd(r, s, "margin")) if s in S and "margin" in S else "-" for s in cols]
        lines.append(f"| {_name(*key)}{_mark(r)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _filter_source(r):
    """The near-duplicate filter source(s) the filter strategies of result `r` ran with: a list of distinct
    {redundancy_commit, redundancy_source_sha, redundancy_modified} (per run where recorded, else per
    file); None if not recorded."""
    keys = ("redundancy_commit", "redundancy_source_sha", "redundancy_modified")
    recs = [x.get("source") or r.get("strategy_pool", {}).get(s, r["pool"])
            for s in ("margin_filter", "cm_1.25_filter") for x in r["runs"].get(s, [])]
    out = []
    for sp in recs:
        if "redundancy_source_sha" in sp and {k: sp[k] for k in keys} not in out:
            out.append({k: sp[k] for k in keys})
    return out or None


def _filter_source_text(r):
    src = _filter_source(r)
    if src is None:
        return ""
    return (" Filter strategies ran with cm_engine/redundancy.py + _redundancy_kernels.py of " + "; ".join(
        f"commit {x['redundancy_commit']}" + (" + uncommitted edits" if x["redundancy_modified"] else "")
        + f" (source hash {x['redundancy_source_sha']})" for x in src) + ".")


def _mean_table(runs):
    """Mean accuracy over rounds ± SE over seeds, per strategy, per pool (the absolute numbers)."""
    cols = [s for s in ORDER if any(s in r["summary"] for r in runs.values())]
    lines = ["### Mean accuracy over rounds ± SE over seeds (%)", "",
             "| pool | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for key, r in runs.items():
        S = r["summary"]
        cells = ["-" if s not in S else f"{100 * S[s]['mean_acc']:.2f} ± {100 * S[s]['se']:.2f}" for s in cols]
        lines.append(f"| {_name(*key)}{_mark(r)} | {r['protocol']['seeds']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _pool_table(key, r):
    ds, var, bf = key
    S, p, pr = r["summary"], r["pool"], r["protocol"]
    red = var == "redundant"
    lines = [f"### {ds} ({var}), batches of {100 * bf:g}%", "",
             f"Pool {p['n_pool']} x {p['dim']} (PCA), test {p['n_test']}, {p['n_classes']} classes; seed set "
             f"{pr['seed_set']}, batch {pr['budget']}, {pr['rounds']} rounds, {pr['seeds']} seeds"
             + (f" (the first {pr['seeds']} of the file's {pr['seeds_in_file']})" if "seeds_in_file" in pr else "")
             + ". "
             f"ARI(engine HAC, exact HAC) at mean size 10: {p['ari_engine_vs_exact']:.3f}; auto delta "
             f"{p['delta']:.4g}. Plot: `benchmarks/results/quality_{ds}_{var}{_suffix(bf)}.png`."
             + _filter_source_text(r),
             "",
             "| strategy | mean acc over rounds ± SE | vs random (paired) | vs margin (paired) | final acc | "
             "labels to random's final | label savings | select s/round | picks near labeled | picks near "
             "co-picked |" + (" true copies of labeled | true copies in batch |" if red else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if red else "")]
    for s, d in _ordered(S):
        need, sav = d.get("labels_to_random_final"), d.get("label_savings")
        row = (f"| {s} | {100 * d['mean_acc']:.2f} ± {100 * d['se']:.2f} | "
               f"{'-' if s == 'random' else _pdf(_pd(r, s, 'random'))} | "
               f"{'-' if s == 'margin' else _pdf(_pd(r, s, 'margin'))} | {100 * d['final_acc']:.2f} | "
               f"{'not reached' if need is None else f'{need:.0f}'} | {'-' if sav is None else f'{100 * sav:.0f}%'} | "
               f"{d['select_s']:.3f} | {100 * d['near_labeled']:.0f}% | {100 * d['near_copicked']:.0f}% |")
        if red:
            row += f" {100 * d.get('true_copy_of_labeled', 0):.0f}% | {100 * d.get('true_copy_in_batch', 0):.0f}% |"
        lines.append(row)
    return lines + [""]


def _targets_5(runs):
    rows, n_ok, n_ok_pair, n_not_worse, n, n_out = [], 0, 0, 0, 0, 0
    counts = {}  # (a) / (b) / one-sided outcomes of the in-matrix comparisons, by direction
    for (ds, var, bf), r in runs.items():
        S = r["summary"]
        inside = matrix_gap(r) is None
        for km in ("1.25", "10"):
            a, b = S.get(f"cm_{km}"), S.get(f"exact_cm_{km}")
            if not (a and b):
                continue
            diff = a["mean_acc"] - b["mean_acc"]
            pdiff = _pd(r, f"cm_{km}", f"exact_cm_{km}")
            within = abs(diff) <= b["se"]
            pair_within = pdiff is not None and abs(pdiff[0]) <= pdiff[1]
            if not inside:
                n_out += 1
            else:
                n, n_ok, n_ok_pair = n + 1, n_ok + within, n_ok_pair + pair_within
                n_not_worse += bool(pdiff[0] >= -pdiff[1])
                for miss, k in ((not within, "a_better" if diff > 0 else "a_worse"),
                                (not pair_within, "b_better" if pdiff[0] > 0 else "b_worse")):
                    counts[k] = counts.get(k, 0) + miss
            if pdiff[2] < 2:
                verdict = "1 seed: no SE"
            else:
                verdict = "tie" if pair_within else ("engine better" if pdiff[0] > 0 else "engine worse")
            sp = r.get("strategy_pool", {}).get(f"cm_{km}", r["pool"])  # the clustering cm_{km} ran with
            hac = f"{sp.get('ari_engine_vs_exact', float('nan')):.2f} ({sp.get('hac_source_sha', 'before hashes')})"
            rows.append(f"| {_name(ds, var, bf)}{'' if inside else ' (outside the matrix)'} | {km} | "
                        f"{100 * a['mean_acc']:.2f} ± {100 * a['se']:.2f} | "
                        f"{100 * b['mean_acc']:.2f} ± {100 * b['se']:.2f} | {100 * diff:+.2f} | "
                        f"{'yes' if within else 'no'} | {_pdf(pdiff)} | {'yes' if pair_within else 'no'} | "
                        f"{verdict} | {pdiff[2]} | {hac} |")
    head = ["### Issue 5: Cluster-Margin with the engine's HAC vs exact HAC", "",
            "Two readings of \"within one SE\": (a) |engine − exact| ≤ the SE of exact's mean (SE over seeds of "
            "the mean accuracy over rounds, the issue's literal wording); (b) the paired difference (same seeds, "
            "same seed sets) within one SE of that difference — the test that removes the seed-set variance "
            "both share. Verdict from (b): tie when |paired diff| ≤ its SE, otherwise the sign.", "",
            "| pool | km_ratio | engine ± SE | exact ± SE | diff | (a) within exact's SE | paired diff ± SE | "
            "(b) within | verdict | seeds | ARI engine vs exact HAC (source hash) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    tail = ["", f"In the matrix: (a) holds in {n_ok} of {n} comparisons (misses: {counts.get('a_better', 0)} with the "
                f"engine above exact, {counts.get('a_worse', 0)} below); (b) in {n_ok_pair} of {n} (misses: "
                f"{counts.get('b_better', 0)} above, {counts.get('b_worse', 0)} below); the engine is not worse than "
                f"exact by more than one paired SE (one-sided: \"loses nothing\") in {n_not_worse} of {n}."
                + (f" {n_out} comparisons from files outside the matrix are listed but not counted." if n_out else ""),
            ""]
    return head + rows + tail


def _targets_7(runs):
    rows, gains = [], {}
    clean_worst = {}
    for (ds, var, bf), r in runs.items():
        S = r["summary"]
        f = S.get("margin_filter")
        if not f or "margin" not in S or "random" not in S:
            continue
        pm, pr_ = _pd(r, "margin_filter", "margin"), _pd(r, "margin_filter", "random")
        opts = [s for s in S if s.startswith("cm_10_")]
        best = max(opts, key=lambda s: S[s]["mean_acc"], default=None)
        cmf = S.get("cm_1.25_filter")
        pc = _pd(r, "cm_1.25_filter", "margin") if cmf else None
        pcr = _pd(r, "cm_1.25_filter", "random") if cmf else None
        inside = matrix_gap(r) is None
        if not inside:
            pass  # listed, not counted
        elif var == "redundant":
            gains.setdefault(bf, []).append((ds, pm[0], pr_[0], pc and pc[0], pcr and pcr[0]))
        else:
            clean_worst.setdefault(bf, []).append((ds, pm[0], pc and pc[0]))
        rows.append(f"| {_name(ds, var, bf)}{'' if inside else ' (outside the matrix)'} | {100 * f['mean_acc']:.2f} | "
                    f"{_pdf(pm)} | {_pdf(pr_)} | "
                    f"{_pdf(_pd(r, 'margin_filter', 'cm_1.25'))} | "
                    f"{'-' if best is None else best + ' ' + _pdf(_pd(r, 'margin_filter', best))} | "
                    f"{'-' if not cmf else format(100 * cmf['mean_acc'], '.2f')} | "
                    f"{_pdf(pc)} | {_pdf(pcr)} |")
    lines = ["### Issue 7: the near-duplicate filter", "",
             "Points of mean accuracy over rounds, paired differences ± SE.", "",
             "| pool | margin_filter | vs margin | vs random | vs cm_1.25 (paper) | vs best order option | "
             "cm_1.25_filter | cm_1.25_filter vs margin | cm_1.25_filter vs random |",
             "|---|---|---|---|---|---|---|---|---|"] + rows + [""]
    verdicts = {}
    for bf, g in gains.items():
        for j, nm in ((1, "margin_filter"), (3, "cm_1.25_filter")):
            vm = [x[j] for x in g if x[j] is not None]
            vr = [x[j + 1] for x in g if x[j + 1] is not None]
            if not vm:
                continue
            ok = np.mean(vm) >= 0.015 and np.mean(vr) >= 0.015 and min(vm) >= 0 and min(vr) >= 0
            verdicts[(bf, nm, "redundant")] = ok
            wm = min((x for x in g if x[j] is not None), key=lambda x: x[j])[0]
            wr = min((x for x in g if x[j + 1] is not None), key=lambda x: x[j + 1])[0]
            lines.append(f"- Redundant pools, {100 * bf:g}% batches, {nm}: {100 * np.mean(vm):+.2f} points over "
                         f"margin and {100 * np.mean(vr):+.2f} over random averaged over {len(vm)} datasets; "
                         f"lowest dataset {100 * min(vm):+.2f} ({wm}) / {100 * min(vr):+.2f} ({wr}) (target >= +1.5 "
                         f"over both on average, none below either): **{'met' if ok else 'missed'}**.")
    for bf, g in clean_worst.items():
        for j, nm in ((1, "margin_filter"), (2, "cm_1.25_filter")):
            v = [(x[0], x[j]) for x in g if x[j] is not None]
            if not v:
                continue
            worst = min(v, key=lambda t: t[1])
            ok = worst[1] >= -0.003
            verdicts[(bf, nm, "clean")] = ok
            lines.append(f"- Clean pools, {100 * bf:g}% batches, {nm}: worst dataset {worst[0]} at "
                         f"{100 * worst[1]:+.2f} points vs margin (target >= -0.3 on every dataset): "
                         f"**{'met' if ok else 'missed'}**.")
    return lines + [""], verdicts


def _summary_table(runs):
    """README table: mean acc over rounds, as paired difference vs random, per pool."""
    cols = [s for s in SUMMARY_STRATEGIES if any(s in r["summary"] for r in runs.values())]
    lines = ["### Summary: gain over random (points of mean accuracy over rounds, paired by seed)", "",
             "| pool | N | seeds | random | " + " | ".join(cols) + " |", "|---|---|---|---|" + "---|" * len(cols)]
    for key, r in runs.items():
        S = r["summary"]
        if "random" not in S:
            continue
        cells = []
        for s in cols:
            p = _pd(r, s, "random") if s in S else None
            cells.append("-" if p is None else f"{100 * p[0]:+.1f}")
        lines.append(f"| {_name(*key)}{_mark(r)} | {r['pool']['n_pool']} | {r['protocol']['seeds']} | "
                     f"{100 * S['random']['mean_acc']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Label savings (fraction fewer labels than random needs to reach random's final accuracy; "
              "'-' = never reached within the rounds):", "", "| pool | " + " | ".join(cols) + " |",
              "|---|" + "---|" * len(cols)]
    for key, r in runs.items():
        S = r["summary"]
        cells = []
        for s in cols:
            sav = S.get(s, {}).get("label_savings")
            cells.append("-" if sav is None else f"{100 * sav:.0f}%")
        lines.append(f"| {_name(*key)} | " + " | ".join(cells) + " |")
    tcols = ["random", "margin", "coreset", "badge", "cm_1.25", "cm_10", "exact_cm_10", "margin_filter",
             "cm_1.25_filter"]
    lines += ["", "Selection time per round (s, mean; CPU, 1 torch thread, shared machine; the clustering and "
              "k-NN graph are built once per pool and listed separately):", "",
              "| pool | N | batch | engine HAC (once) | exact HAC (once) | k-NN graph (once) | " + " | ".join(tcols)
              + " |", "|---|---|---|---|---|---|" + "---|" * len(tcols)]
    for key, r in runs.items():
        S, p = r["summary"], r["pool"]
        ex = "cached" if p.get("exact_cluster_cached") else f"{p['exact_cluster_s']:.1f}"
        lines.append(f"| {_name(*key)} | {p['n_pool']} | {r['protocol']['budget']} | {p['engine_cluster_s']:.2f} | "
                     f"{ex} | {p['graph_for_filter_s']:.2f} | "
                     + " | ".join("-" if s not in S else f"{S[s]['select_s']:.3f}" for s in tcols) + " |")
    return lines + [""]


def _summary_plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(runs)
    strategies = [s for s in SUMMARY_STRATEGIES if any(s in r["summary"] for r in runs.values())]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(keys) * 1.0 + 4), 4.8))
    w = 0.8 / max(1, len(strategies))
    for j, s in enumerate(strategies):
        xs, ys, es = [], [], []
        for i, k in enumerate(keys):
            p = _pd(runs[k], s, "random") if s in runs[k]["summary"] else None
            if p is not None:
                xs.append(i + (j - len(strategies) / 2 + 0.5) * w)
                ys.append(100 * p[0])
                es.append(100 * p[1])
        ax.bar(xs, ys, width=w, yerr=es, label=s, capsize=1.5)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([_name(*k) for k in keys], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("mean acc over rounds − random's (points)")
    ax.set_title("Gain over random, paired by seed (± SE)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=5, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cost_lines(results: Path) -> list:
    """The issue-7 cost paragraph: one line per quality_filter_cost*.json (_quality_filter_cost.py), the tagged
    (100-class) runs first; medians of the wall and process-CPU time per cycle, with the load average it ran under."""
    files = sorted(results.glob("quality_filter_cost*.json"), key=lambda p: (p.stem == "quality_filter_cost", p.stem))
    if not files:
        return []
    out = ["Filter cost (`benchmarks/_quality_filter_cost.py`; a cycle = margin scores of the logits + the "
           "selection, graph and clusters given; the `NearCopies` table is built once per pool, as the selectors "
           "do; target: filter overhead <= +10% of a cycle):", ""]
    for p in files:
        c = json.loads(p.read_text())
        cases = []
        for k, v in c["cases"].items():
            txt = (f"{k.replace('km_ratio_', 'km ')}: {v['cycle_s']:.3f} s -> graph-read filter "
                   f"{v['cycle_filtered_s']:.3f} s ({100 * v['overhead']:+.0f}%, CPU {100 * v['overhead_cpu']:+.0f}%)")
            if "cycle_table_s" in v:
                txt += (f", table filter {v['cycle_table_s']:.3f} s ({100 * v['overhead_table']:+.0f}%, "
                        f"CPU {100 * v['overhead_table_cpu']:+.0f}%)")
            cases.append(txt)
        build = (f"; table build {c['table_build_s']:.2f} s once" if "table_build_s" in c else "")
        load = "/".join(f"{x:.2f}" for x in c.get("loadavg_before", [])[:1] + c.get("loadavg_after", [])[:1])
        out.append(f"- `{p.name}` ({c['n']:,} points, {c.get('classes', 10)} classes, budget {c['budget']:,}, "
                   f"labeled {c['labeled']:,}, k={c['k']}, copy groups {c.get('layout', 'consecutive')}; "
                   f"{c.get('time_utc', '?')}, commit {c.get('git_commit', '?')}, load {load} before/after): "
                   + "; ".join(cases) + build + ".")
    return out + [""]


def write_report(results: Path, md_path: Path) -> None:
    runs = _load(results)
    lines = ["## Measured tables", ""]
    gaps = {_name(*k): matrix_gap(r) for k, r in runs.items()}
    lines += [f"Matrix: pools of {MATRIX['n_pool']:,}, {MATRIX['rounds']} rounds, {MATRIX['seeds']} seeds, strategies "
              + ", ".join(MATRIX["strategies"]) + f" ({', '.join(MATRIX_REDUNDANT_ONLY)} on redundant pools only). "
              + (f"Cells outside it: " + "; ".join(f"{k}: {v}" for k, v in gaps.items() if v) + "."
                 if any(gaps.values()) else f"All {len(gaps)} cells are complete."), ""]
    lines += _summary_table(runs)
    lines += _mean_table(runs)
    lines += _vs_margin_table(runs)
    t5 = _targets_5(runs)
    t7, _ = _targets_7(runs)
    lines += t5 + t7
    lines += _cost_lines(results)
    lines += ["## Per-pool tables", ""]
    for key, r in runs.items():
        lines += _pool_table(key, r)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    marker = "<!-- generated tables below: python benchmarks/quality.py --summarize -->"
    head = ""
    if md_path.exists() and marker in md_path.read_text():  # keep the hand-written text above the marker
        head = md_path.read_text().split(marker)[0]
    md_path.write_text(head + marker + "\n\n" + "\n".join(lines) + "\n")
    summary = {}
    for key, r in runs.items():
        S = r["summary"]
        summary[_name(*key)] = {
            "pool": r["pool"]["n_pool"], "budget": r["protocol"]["budget"], "seeds": r["protocol"]["seeds"],
            "rounds": r["protocol"]["rounds"], "seeds_in_file": r["protocol"].get("seeds_in_file", r["protocol"]["seeds"]),
            "in_matrix": matrix_gap(r) is None,
            **({"outside_matrix": matrix_gap(r)} if matrix_gap(r) else {}),
            "git_commit": r.get("git_commit"), "time_utc": r.get("time_utc"), "filter_source": _filter_source(r),
            "strategies": {s: {"mean_acc": d["mean_acc"], "se": d["se"], "final_acc": d["final_acc"],
                               "select_s": d["select_s"], "label_savings": d.get("label_savings"),
                               "paired_vs_random": _pd(r, s, "random") if s != "random" else None,
                               "paired_vs_margin": _pd(r, s, "margin") if s != "margin" else None,
                               **({"paired_vs_exact": _pd(r, s, "exact_" + s)}
                                  if "exact_" + s in S else {})} for s, d in S.items()}}
    (results / "quality_summary.json").write_text(json.dumps(summary, indent=1))
    if runs:
        _summary_plot(runs, results / "quality_summary.png")
