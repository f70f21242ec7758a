"""Tables for docs/quality.md from benchmarks/results/quality_<dataset>_<variant>.json (non-quick runs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _load(results: Path):
    out = {}
    for p in sorted(results.glob("quality_*_*.json")):
        if p.stem.endswith("_quick") or p.stem in ("quality_filter_cost", "quality_summary"):
            continue
        r = json.loads(p.read_text())
        if r.get("benchmark") == "quality":
            out[(r["dataset"], r["variant"])] = r
    return out


def write_report(results: Path, md_path: Path) -> None:
    runs = _load(results)
    lines = ["## Measured tables", ""]
    summary = {}
    for (ds, var), r in runs.items():
        S = r["summary"]
        p, pr = r["pool"], r["protocol"]
        lines += [f"### {ds} ({var})", "",
                  f"Pool {p['n_pool']} x {p['dim']} (PCA), test {p['n_test']}, {p['n_classes']} classes; seed set "
                  f"{pr['seed_set']}, batch {pr['budget']}, {pr['rounds']} rounds, {pr['seeds']} seeds. "
                  f"ARI(engine HAC, exact HAC) at mean size 10: {p['ari_engine_vs_exact']:.3f}; "
                  f"auto delta {p['delta']:.4g}. Plot: `benchmarks/results/quality_{ds}_{var}.png`.", "",
                  "| strategy | mean acc over rounds ± SE | final acc | labels to reach random's final | "
                  "label savings | select s/round | picks near labeled | picks near co-picked |",
                  "|---|---|---|---|---|---|---|---|"]
        for s, d in S.items():
            need = d.get("labels_to_random_final")
            sav = d.get("label_savings")
            lines.append(f"| {s} | {100 * d['mean_acc']:.2f} ± {100 * d['se']:.2f} | {100 * d['final_acc']:.2f} | "
                         f"{'not reached' if need is None else f'{need:.0f}'} | "
                         f"{'-' if sav is None else f'{100 * sav:.0f}%'} | {d['select_s']:.3f} | "
                         f"{100 * d['near_labeled']:.0f}% | {100 * d['near_copicked']:.0f}% |")
        lines.append("")
        summary[f"{ds}/{var}"] = {s: {k: d[k] for k in ("mean_acc", "se", "final_acc", "select_s")}
                                  for s, d in S.items()}
    # targets
    lines += ["### Targets", ""]
    t5 = []
    for (ds, var), r in runs.items():
        S = r["summary"]
        for km in ("1.25", "10"):
            a, b = S.get(f"cm_{km}"), S.get(f"exact_cm_{km}")
            if a and b:
                diff = a["mean_acc"] - b["mean_acc"]
                ok = diff >= -b["se"]
                two = abs(diff) <= b["se"]
                t5.append(f"| {ds}/{var} | km {km} | {100 * a['mean_acc']:.2f} | {100 * b['mean_acc']:.2f} ± "
                          f"{100 * b['se']:.2f} | {100 * diff:+.2f} | {'met' if ok else 'MISSED'} | "
                          f"{'yes' if two else 'no'} | {len(r['runs'][f'cm_{km}'])} |")
    lines += ["Issue 5: Cluster-Margin (engine) within one SE of Cluster-Margin (exact HAC) (met = engine not "
              "below exact by more than exact's SE).", "",
              "| pool | setting | engine | exact ± SE | diff | not below (one-sided) | within (two-sided) | seeds |", "|---|---|---|---|---|---|---|---|"] + t5 + [""]
    rows, gains = [], {"margin": [], "random": []}
    for (ds, var), r in runs.items():
        S = r["summary"]
        f = S.get("margin_filter")
        if not f:
            continue
        dm = f["mean_acc"] - S["margin"]["mean_acc"]
        dr = f["mean_acc"] - S["random"]["mean_acc"]
        best = max((s for s in S if s.startswith("cm_10_")), key=lambda s: S[s]["mean_acc"], default=None)
        cmf = S.get("cm_1.25_filter")
        best_s = "-" if best is None else f"{best} {100 * (f['mean_acc'] - S[best]['mean_acc']):+.2f}"
        cmf_s = "-" if not cmf else f"{100 * cmf['mean_acc']:.2f}"
        if var == "redundant":
            gains["margin"].append(dm)
            gains["random"].append(dr)
        rows.append(f"| {ds}/{var} | {100 * f['mean_acc']:.2f} | {100 * dm:+.2f} | {100 * dr:+.2f} | "
                    f"{100 * (f['mean_acc'] - S['cm_1.25']['mean_acc']):+.2f} | "
                    f"{best_s} | "
                    f"{cmf_s} |")
    lines += ["Issue 7: margin + near-duplicate filter (points of mean accuracy over rounds).", "",
              "| pool | margin_filter | vs margin | vs random | vs cm_1.25 (paper) | vs best order option | "
              "cm_1.25_filter |", "|---|---|---|---|---|---|---|"] + rows + [""]
    if gains["margin"]:
        lines.append(f"Redundant pools, averaged over datasets: {100 * np.mean(gains['margin']):+.2f} points over "
                     f"margin, {100 * np.mean(gains['random']):+.2f} over random (target: >= +1.5 over both, no "
                     f"dataset below either).")
    cost = results / "quality_filter_cost.json"
    if cost.exists():
        c = json.loads(cost.read_text())
        lines += ["", f"Filter cost on a synthetic {c['n']:,}-point pool (budget {c['budget']:,}, labeled "
                  f"{c['labeled']:,}, k={c['k']}): " + "; ".join(
                      f"{k}: cycle {v['cycle_s']:.3f} s -> {v['cycle_filtered_s']:.3f} s with the filter "
                      f"({100 * v['overhead']:+.0f}%)" for k, v in c["cases"].items()) + " (target <= +10%)."]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    marker = "<!-- generated tables below: python benchmarks/quality.py --summarize -->"
    head = ""
    if md_path.exists() and marker in md_path.read_text():  # keep the hand-written text above the marker
        head = md_path.read_text().split(marker)[0]
    md_path.write_text(head + marker + "\n\n" + "\n".join(lines) + "\n")
    (results / "quality_summary.json").write_text(json.dumps(summary, indent=1))
