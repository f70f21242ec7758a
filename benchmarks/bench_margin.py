"""Margin scorer benchmark: fused kernel vs. the read floor (and vs. eager torch) on page-cached logits.

Target (issue 2): scoring a page-cached 10M x 100 float16 logits `.npy` takes at most 10x the
time needed to read the file's bytes once (summing it as uint64 words in blocks), same run,
with peak RSS at most 1.5 GB above the interpreter's baseline.

    python benchmarks/bench_margin.py --quick          # 500K x 100, seconds
    flock /tmp/cm-big.lock python benchmarks/bench_margin.py   # 10M x 100 (2 GB file)

Steps: write the logits once (bench-data/, gitignored); read it once to page-cache it; check
the fused scores on sample rows against a float64 numpy reference; then, in one worker process,
alternate floor and fused runs (min of the repeats); time eager torch on a subset and extrapolate
(labelled); measure peak RSS in a fresh worker that only scores. Writes
benchmarks/results/margin_cpu.json (or margin_cpu_quick.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (BENCH_DATA, RESULTS, SHARED_MACHINE_NOTE, git_commit, log, machine_info,  # noqa: E402
                     utc_now, write_json)


def data_path(n: int, c: int) -> Path:
    return BENCH_DATA / f"margin_logits_n{n}_c{c}_float16_s0.npy"


def make_logits(path: Path, n: int, c: int, *, block: int = 250_000) -> None:
    """float16 logits: standard normal per class times a per-row scale in 10^[-0.5, 1.2] plus a
    per-class bias (some rows confident, some not), written block by block then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, c))
    bias = np.random.default_rng(12345).normal(size=c).astype(np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        rng = np.random.default_rng([0, s])
        z = rng.standard_normal((e - s, c), dtype=np.float32)
        z *= (10.0 ** rng.uniform(-0.5, 1.2, size=(e - s, 1))).astype(np.float32)
        z += bias
        out[s:e] = z
    out.flush()
    del out
    os.replace(tmp, path)


def ref_margin(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    ps = np.sort(p, axis=1)
    return ps[:, -1] - ps[:, -2]


# --------------------------------------------------------------------------- worker side

def floor_mmap(path: Path, block_bytes: int = 64 * 2**20) -> tuple[float, int]:
    """Read every byte once through a memory map, summing uint64 words block by block."""
    from cm_engine.margin import _madvise_dontneed

    m = np.load(path, mmap_mode="r")
    flat = np.memmap(path, dtype=np.uint8, mode="r", offset=0)
    words = flat[: flat.size // 8 * 8].view(np.uint64)
    step = block_bytes // 8
    t0 = time.perf_counter()
    total = 0
    for s in range(0, words.size, step):
        blk = words[s:s + step]
        total += int(blk.sum())
        _madvise_dontneed(blk)  # keep RSS flat, as the scorer does
    dt = time.perf_counter() - t0
    del m
    return dt, total & 0xFFFFFFFF


def floor_read(path: Path, block_bytes: int = 64 * 2**20) -> tuple[float, int]:
    """Read every byte once with read() into one reused buffer, summing uint64 words."""
    buf = np.empty(block_bytes, np.uint8)
    t0 = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            total += int(buf[: k // 8 * 8].view(np.uint64).sum())
    return time.perf_counter() - t0, total & 0xFFFFFFFF


def worker_time(args: dict) -> dict:
    import torch

    from cm_engine.margin import margin_scores

    path = Path(args["path"])
    x = np.load(path, mmap_mode="r")
    n = x.shape[0]
    margin_scores(x[:4096])  # JIT load / compile outside the timings
    res = {"floor_mmap_s": [], "floor_read_s": [], "fused_s": []}
    scores = None
    for _ in range(args["repeats"]):
        res["floor_mmap_s"].append(floor_mmap(path)[0])
        res["floor_read_s"].append(floor_read(path)[0])
        t0 = time.perf_counter()
        scores = margin_scores(x, kernel="fused")
        res["fused_s"].append(time.perf_counter() - t0)
    # The timed run's answer on sample rows against the float64 reference.
    errs = []
    for a in np.linspace(0, n - 2000, 8).astype(np.int64):
        errs.append(float(np.abs(scores[a:a + 2000] - ref_margin(x[a:a + 2000])).max()))
    res["timed_output_max_abs_err_vs_float64"] = max(errs)
    # Eager torch on a subset (too slow for the whole pool here): same rows, extrapolated.
    sub = min(n, args["torch_rows"])
    margin_scores(x[:4096], kernel="torch")
    ts = []
    for _ in range(2):
        t0 = time.perf_counter()
        st = margin_scores(x[:sub], kernel="torch")
        ts.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    margin_scores(x[:sub], kernel="fused")
    res["fused_subset_s"] = time.perf_counter() - t0
    res["torch_subset_rows"] = sub
    res["torch_subset_s"] = min(ts)
    res["torch_extrapolated_s"] = min(ts) * n / sub
    res["torch_vs_fused_max_abs_diff_subset"] = float(np.abs(st - scores[:sub]).max())
    res["torch_threads"] = torch.get_num_threads()
    import numba

    res["numba_threads"] = numba.get_num_threads()
    return res


def worker_rss(args: dict) -> dict:
    """Peak RSS of scoring the whole file once, over the RSS just before (imports, JIT loaded)."""
    import psutil

    from cm_engine._device import peak_rss_bytes

    proc = psutil.Process()
    bare = args["bare_rss"]
    from cm_engine.margin import margin_scores

    x = np.load(args["path"], mmap_mode="r")
    margin_scores(x[:4096])
    before = proc.memory_info().rss
    peak_before = peak_rss_bytes()
    t0 = time.perf_counter()
    s = margin_scores(args["path"])
    dt = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"rss_before_call_bytes": before, "peak_rss_before_call_bytes": peak_before,
            "peak_rss_bytes": peak, "bare_interpreter_rss_bytes": bare,
            "peak_over_before_call_bytes": peak - before,
            "peak_over_bare_interpreter_bytes": peak - bare,
            "wall_s": dt, "n_scores": int(s.size)}


def run_worker(kind: str, payload: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(payload)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bare_rss() -> int:
    code = "import psutil; print(psutil.Process().memory_info().rss)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="500K x 100 instead of 10M x 100")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--c", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-rows", type=int, default=500_000, help="rows for the eager torch timing")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        kind, payload = a.worker[0], json.loads(a.worker[1])
        res = worker_time(payload) if kind == "time" else worker_rss(payload)
        print(json.dumps(res))
        return 0

    n = a.n or (500_000 if a.quick else 10_000_000)
    path = data_path(n, a.c)
    if not path.exists():
        log(f"writing {path} ({n * a.c * 2 / 1e9:.2f} GB)")
        t0 = time.perf_counter()
        make_logits(path, n, a.c)
        log(f"written in {time.perf_counter() - t0:.1f} s")
    log("page-caching (one full read)")
    floor_read(path)

    # Check the answer before timing: sample rows, fused kernel vs float64 reference.
    from cm_engine.margin import margin_scores

    x = np.load(path, mmap_mode="r")
    check = {}
    for name, sl in (("head", slice(0, 20000)), ("tail", slice(n - 20000, n))):
        got = margin_scores(x[sl], kernel="fused")
        check[name] = float(np.abs(got - ref_margin(x[sl])).max())
    log(f"check vs float64 reference: {check}")
    assert max(check.values()) < 2e-6, check
    del x

    log("timing (floor, fused, eager torch subset) in a worker")
    t = run_worker("time", {"path": str(path), "repeats": a.repeats, "torch_rows": a.torch_rows})
    log("peak RSS in a fresh worker")
    r = run_worker("rss", {"path": str(path), "bare_rss": bare_rss()})

    floor = min(min(t["floor_mmap_s"]), min(t["floor_read_s"]))
    fused = min(t["fused_s"])
    result = {
        "benchmark": "margin_cpu" + ("_quick" if a.quick else ""),
        "date": utc_now(), "commit": git_commit(),
        "pool": {"path": str(path), "n": n, "c": a.c, "dtype": "float16", "bytes": path.stat().st_size,
                 "content": "standard normal logits x per-row scale 10^U(-0.5,1.2) + per-class bias"},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "check_max_abs_err_vs_float64": check,
        "timed_output_max_abs_err_vs_float64": t["timed_output_max_abs_err_vs_float64"],
        "floor_mmap_s": t["floor_mmap_s"], "floor_read_s": t["floor_read_s"],
        "floor_s": floor, "fused_s_all": t["fused_s"], "fused_s": fused,
        "ratio_fused_over_floor": fused / floor,
        "target_ratio": 10.0,
        "fused_rows_per_s": n / fused,
        "fused_gb_per_s": path.stat().st_size / fused / 1e9,
        "eager_torch": {"rows_timed": t["torch_subset_rows"], "seconds_on_subset": t["torch_subset_s"],
                        "fused_seconds_on_subset": t["fused_subset_s"],
                        "extrapolated_full_s": t["torch_extrapolated_s"], "extrapolated": t["torch_subset_rows"] < n,
                        "ratio_over_floor_extrapolated": t["torch_extrapolated_s"] / floor,
                        "max_abs_diff_vs_fused": t["torch_vs_fused_max_abs_diff_subset"]},
        "rss": r,
        "peak_rss_over_baseline_gb": r["peak_over_before_call_bytes"] / 1e9,
        "target_peak_rss_over_baseline_gb": 1.5,
        "threads": {"numba": t["numba_threads"], "torch": t["torch_threads"]},
        "machine": machine_info(),
        "notes": [SHARED_MACHINE_NOTE,
                  "floor = min over repeats of the faster of (memory-mapped uint64 block sum, read() into "
                  "a reused buffer + uint64 sum); fused = min over repeats, alternated with the floor "
                  "runs in the same worker process",
                  "eager torch timed on the first rows_timed rows and extrapolated linearly to n",
                  "peak RSS measured in a fresh process: ru_maxrss after scoring minus RSS just "
                  "before the call (imports and the cached JIT already loaded); over the bare "
                  "interpreter also given"],
    }
    out = Path(a.out) if a.out else RESULTS / f"margin_cpu{'_quick' if a.quick else ''}.json"
    write_json(out, result)
    log(f"floor {floor:.3f} s, fused {fused:.3f} s (ratio {fused / floor:.2f}, target <= 10), "
        f"eager torch {t['torch_extrapolated_s']:.1f} s extrapolated (ratio {t['torch_extrapolated_s'] / floor:.0f}), "
        f"peak RSS +{r['peak_over_before_call_bytes'] / 1e9:.3f} GB (target <= 1.5); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
