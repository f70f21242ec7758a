"""Helpers shared by the benchmark scripts: machine description, peak RSS, timing, JSON output.

Benchmarks are scripts, not timed tests: check the answer, warm up, then time, and record the
machine with every figure. Any benchmark author may import these (`from _common import ...`
when run as a script from benchmarks/, or `benchmarks._common` from the repo root).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: Where generated pools live (gitignored; reused across runs). $CM_ENGINE_BENCH_DATA overrides.
BENCH_DATA = Path(os.environ.get("CM_ENGINE_BENCH_DATA", REPO / "bench-data"))

SHARED_MACHINE_NOTE = ("timings taken on a development machine shared with other engineers' jobs "
                       "(heavy runs serialized with flock /tmp/cm-big.lock, light ones may overlap)")


def gpu_name() -> str:
    """The CUDA device's name as torch sees it, or "none"."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # a broken torch install must not stop a CPU benchmark
        pass
    return "none"


def machine_info() -> dict:
    """Cores, RAM, CPU model, GPU name (or "none") and library versions, for every result JSON."""
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "ram_bytes": _ram_bytes(),
        "gpu": gpu_name(),
    }
    info["ram_gib"] = round(info["ram_bytes"] / 2**30, 1) if info["ram_bytes"] else None
    # Versions from the installed metadata: importing faiss, sklearn or numba just to read a
    # version costs seconds per process.
    from importlib import metadata

    for mod, dist in (("numpy", "numpy"), ("torch", "torch"), ("scipy", "scipy"), ("faiss", "faiss-cpu"),
                      ("sklearn", "scikit-learn"), ("fastcluster", "fastcluster"), ("numba", "numba")):
        try:
            info[f"{mod}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            try:
                info[f"{mod}_version"] = metadata.version(f"{dist}-gpu") if mod == "faiss" else None
            except metadata.PackageNotFoundError:
                info[f"{mod}_version"] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu_memory_bytes"] = int(p.total_memory)
            info["cuda_version"] = torch.version.cuda
    except Exception:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Reads VmHWM from /proc/self/status: unlike getrusage's ru_maxrss, which Linux carries
    over fork + exec (a child started by a big parent reports at least the parent's RSS at
    the fork), VmHWM belongs to this process image alone. Falls back to ru_maxrss.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0


def git_commit() -> str | None:
    """HEAD's short hash, with "-dirty" when tracked files differ from it (a copied working tree,
    as on a lent GPU machine, can carry a stale HEAD: the suffix says so)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


class Timer:
    """Wall-clock stopwatch: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = None
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


@contextmanager
def timed(record: dict, key: str):
    """Store the wall time of the block in record[key] (seconds), even when it raises."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        record[key] = time.perf_counter() - t0


def sync(device=None) -> None:
    """Wait for queued GPU work so that a wall time covers it (no-op on the CPU)."""
    try:
        import torch

        if torch.cuda.is_available() and (device is None or "cuda" in str(device)):
            torch.cuda.synchronize()
    except Exception:
        pass


def write_json(path, obj) -> Path:
    """Write JSON atomically (temp file + rename), numpy scalars converted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _jsonable(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except Exception:
        pass
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def log(msg: str) -> None:
    """Progress line on stderr (benchmarks are scripts; stdout may carry JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
