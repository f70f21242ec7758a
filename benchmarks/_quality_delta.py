"""auto_delta on every benchmark pool (20K/15K/10K, clean and redundant): the delta it picks and, on the
redundant pools, which edges it catches (copy edges vs other neighbours; copy labels used only here,
to measure the rule, never in it). Writes benchmarks/results/quality_delta.json."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _quality_data as D  # noqa: E402
from _common import SHARED_MACHINE_NOTE, machine_info, utc_now, write_json  # noqa: E402


def main():
    from cm_engine.knn import knn_graph
    from cm_engine.redundancy import auto_delta

    out = {"benchmark": "quality_delta", "k": 16, "metric": "cosine", "pools": {}}
    for name in D.DATASETS:
        for var in ("clean", "redundant"):
            X, y, Xt, yt, g = D.dataset(name, var)
            G = knn_graph(X, k=16, metric="cosine")
            t = time.perf_counter()
            delta = auto_delta(G)
            rec = {"n": int(X.shape[0]), "delta": delta, "auto_delta_s": time.perf_counter() - t,
                   "edges_caught": float((G.distances <= delta).mean())}
            if var == "redundant":
                same = g[G.indices] == g[:, None]
                rec["copy_edges_caught"] = float((G.distances[same] <= delta).mean())
                rec["noncopy_edges_caught"] = float((G.distances[~same] <= delta).mean())
            out["pools"][f"{name}/{var}"] = rec
            print(name, var, rec, flush=True)
    out.update(machine=machine_info(), time_utc=utc_now(), notes=SHARED_MACHINE_NOTE)
    write_json(HERE / "results" / "quality_delta.json", out)


if __name__ == "__main__":
    main()
