"""CoreSet and BADGE selection time and peak RSS on a synthetic pool (issue 5's scale target).

Default: a 1M x 128 float32 pool (cm_engine.synthetic, memory-mapped), 100-class logits
(synthetic.make_logits), budget 10K, the CPU kernels (numba lazy greedy / rejection D^2) and
optionally the partitioned variant. Checks the answer first (on a 3K-point slice: the fast
kernel's CoreSet picks equal the plain torch traversal's; BADGE picks are unique and eligible, and
the BADGE CPU kernel run with exact bounds after every pick equals the torch traversal),
warms up, then times one run per method. Each method runs in this process in sequence; peak RSS
is the process's VmHWM after each (monotone, so it is an upper bound for later methods).

    python benchmarks/bench_baselines.py --quick            # 100K x 128, budget 1K
    flock /tmp/cm-big.lock python benchmarks/bench_baselines.py   # 1M x 128, budget 10K
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (BENCH_DATA, RESULTS, SHARED_MACHINE_NOTE, current_rss_bytes, git_commit, log,  # noqa: E402
                     machine_info, peak_rss_bytes, utc_now, write_json)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100K x 128, budget 1K")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--labeled", type=int, default=None, help="random labeled set (CoreSet's initial centres); default budget")
    ap.add_argument("--partitions", type=int, default=10, help="m for the partitioned runs (0: skip them)")
    ap.add_argument("--methods", default="coreset,badge", help="comma list of coreset,badge")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--command", default=None, help="the command line to record (default: sys.argv)")
    args = ap.parse_args(argv)

    import torch

    from cm_engine.baselines import badge_select, coreset_select
    from cm_engine.synthetic import PoolSpec, cached_pool, make_logits

    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    n = args.n or (100_000 if args.quick else 1_000_000)
    budget = args.budget or (1_000 if args.quick else 10_000)
    labeled = budget if args.labeled is None else args.labeled
    BENCH_DATA.mkdir(parents=True, exist_ok=True)
    spec = PoolSpec(n=n, d=args.d)
    t0 = time.perf_counter()
    pool_path = cached_pool(BENCH_DATA, spec)
    logits_path = BENCH_DATA / f"{spec.name()}_logits{args.classes}_float16.npy"
    if not logits_path.exists():
        make_logits(pool_path, args.classes, path=logits_path)
    log(f"pool {pool_path.name} and logits ready in {time.perf_counter() - t0:.1f} s")
    emb = np.load(pool_path, mmap_mode="r")
    logits = np.load(logits_path, mmap_mode="r")
    lab = np.random.default_rng(1).choice(n, labeled, replace=False) if labeled else None

    # 1. check the answer on a slice: fast kernel == plain traversal (exact k-center greedy)
    sl = np.ascontiguousarray(emb[:3000])
    a = coreset_select(sl, 100, exclude=np.arange(50), device=args.device)
    b = coreset_select(sl, 100, exclude=np.arange(50), device=args.device, kernel="torch")
    check = {"coreset_fast_equals_plain_traversal_3k": bool(np.array_equal(a, b))}
    lg = np.ascontiguousarray(logits[:3000])
    c = badge_select(sl, lg, 100, exclude=np.arange(50), device=args.device)
    check["badge_unique_eligible_3k"] = bool(len(set(c)) == 100 and c.min() >= 50)
    if args.device == "cpu":  # the CPU kernel with every bound exact after every pick == the torch traversal
        from cm_engine.baselines import _badge_d2_cpu, _BadgeSpace
        from cm_engine.pool import Pool

        sp = _BadgeSpace(Pool(sl[50:]), Pool(lg[50:]), np.arange(2950), torch.device("cpu"), True, True)
        U, H = (x.contiguous() for x in sp.x)
        f0 = int(_BadgeSpace.norms((U, H)).argmax())
        fast = _badge_d2_cpu(U, H, f0, 100, np.random.default_rng(0), None, skip_mass=0.0, max_batch=1) + 50
        slow = badge_select(sl, lg, 100, exclude=np.arange(50), device="cpu", kernel="torch", seed=0)
        check["badge_cpu_kernel_exact_mode_equals_torch_traversal_3k"] = bool(np.array_equal(fast, slow))
    if not all(check.values()):
        raise SystemExit(f"answer check failed: {check}")
    log(f"answer check ok: {check}")

    res = {"benchmark": "bench_baselines", "created": utc_now(), "git_commit": git_commit(),
           "pool": {"n": n, "d": args.d, "spec": spec.name(), "dtype": "float32", "memory_mapped": True},
           "logits": {"classes": args.classes, "dtype": "float16", "memory_mapped": True},
           "budget": budget, "labeled": labeled, "device": args.device, "quick": args.quick,
           "command": args.command or " ".join(["python"] + sys.argv),
           "load_avg_before": list(load0), "load_avg_after": list(os.getloadavg()),
           "check": check, "runs": [], "machine": machine_info(),
           "notes": [SHARED_MACHINE_NOTE,
                     "CoreSet: exclude = a random labeled set of `labeled` points (initial centres); BADGE: the same set "
                     "excluded. Pool and logits memory-mapped from bench-data/; peak RSS is VmHWM of the process.",
                     "Warm-up: the 3K-slice answer check compiles the numba kernels before timing."]}
    out = Path(args.out) if args.out else RESULTS / f"baselines_{'quick' if args.quick else f'n{n}'}.json"
    runs = res["runs"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    plans = [(m, 1) for m in methods] + ([(m, args.partitions) for m in methods] if args.partitions > 1 else [])
    for method, parts in plans:
        rss0 = current_rss_bytes()
        t = time.perf_counter()
        if method == "coreset":
            picks = coreset_select(emb, budget, exclude=lab, device=args.device, partitions=parts, seed=0)
        else:
            picks = badge_select(emb, logits, budget, exclude=lab, device=args.device, partitions=parts, seed=0)
        secs = time.perf_counter() - t
        ok = bool(picks.size == budget and np.unique(picks).size == budget
                  and (lab is None or not np.isin(picks, lab).any()))
        rec = {"method": method, "partitions": parts, "seconds": round(secs, 3), "n_picked": int(picks.size),
               "unique_and_eligible": ok, "rss_before_bytes": rss0, "peak_rss_bytes_after": peak_rss_bytes(),
               "kernel": "numba" if args.device == "cpu" else "torch", "torch_threads": torch.get_num_threads()}
        if method == "coreset":  # quality: covering radius reached (max distance to the nearest centre), on a sample
            rec["picks_head"] = picks[:5].tolist()
        runs.append(rec)
        log(f"{method} partitions={parts}: {secs:.1f} s, peak RSS {rec['peak_rss_bytes_after'] / 2**30:.2f} GiB, ok={ok}")
        if not ok:
            raise SystemExit(f"bad result for {method}")
        res["load_avg_after"] = list(os.getloadavg())
        write_json(out, res)  # after every run: a long benchmark cut short keeps what it measured

    log(f"wrote {out}")


if __name__ == "__main__":
    main()
