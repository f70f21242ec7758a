"""Throughput of the Cluster-Margin pipeline against pool size, with peers and floors.

For each pool size N (synthetic pools with realistic structure, generated once to
memory-mapped files under bench-data/ and reused) it runs, each in a FRESH subprocess so
that peak RSS is per size and per method:

  ours      pool open (+ one streamed pass), k-NN graph, graph HAC (+ epsilon for a mean
            cluster size of 10, cut), margin scores of N x C logits, Cluster-Margin
            selection of N/10 points (k_m = 10 k_t); end to end = the sum of those stages.
  peers     cm_fastcluster   Cluster-Margin as the public ports do it: load X whole,
                             fastcluster average linkage (cosine), fcluster at epsilon,
                             numpy softmax margins, plain-Python round-robin;
            cm_sklearn       the same with sklearn AgglomerativeClustering(linkage="average",
                             distance_threshold=eps), no connectivity;
            sklearn_knn      sklearn kneighbors_graph + AgglomerativeClustering with that
                             connectivity (the k-NN + HAC stages only);
            faiss_flat, faiss_ivf   FAISS for the k-NN stage (exact inner product; IVF).
            Each peer runs up to the size where it would run out of memory (an N^2 estimate
            above --peer-mem-gb is skipped as "OOM predicted") or passes --peer-cap seconds
            (killed: "timeout"; or predicted from its last two sizes: "timeout predicted").
  floors    page-cache read bandwidth and a large matrix product's GFLOP/s on this machine;
            each stage's time is reported against the time its bytes (or flops) need at that rate.

Quality, computed after the timed stages (not timed): k-NN recall@k on a fixed sample of
queries against exact search; ARI of our clusters against exact average linkage cut at the
same epsilon where N <= --ari-max; the margin scores against a numpy reference on a slice;
the selection's size, uniqueness and candidate membership.

Usage:
  flock /tmp/cm-big.lock python benchmarks/throughput.py             # the full CPU run
  python benchmarks/throughput.py --quick                            # seconds, for CI smoke
  cm-engine bench [same options]                                     # the CLI wraps main()
Results: benchmarks/results/throughput_<tag>.json and .png (tag "cpu", "quick", "gpu", ...).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

STAGES = ("open", "knn", "hac", "margin", "sampling")
PEERS = ("cm_fastcluster", "cm_sklearn", "sklearn_knn", "faiss_flat", "faiss_ivf")
FULL_SIZES = (10_000, 30_000, 50_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000)
QUICK_SIZES = (2_000, 5_000)
MEAN_CLUSTER_SIZE = 10.0


# =========================================================================== data

def pool_spec(n, d, dtype, seed=0):
    from cm_engine.synthetic import PoolSpec

    return PoolSpec(n=int(n), d=int(d), dtype=str(dtype), seed=int(seed))


def data_paths(root, n, d, dtype, classes, seed=0):
    spec = pool_spec(n, d, dtype, seed)
    pool = Path(root) / f"{spec.name()}.npy"
    logits = Path(root) / f"{spec.name()}_logits{classes}_float16.npy"
    return spec, pool, logits


def ensure_data(root, n, d, dtype, classes, *, logits=True, generate_on="numpy", seed=0):
    """The pool (and logits) files for size n, generated once and reused."""
    spec, pool, lp = data_paths(root, n, d, dtype, classes, seed)
    if not pool.exists():
        t0 = time.perf_counter()
        if generate_on == "numpy":
            from cm_engine.synthetic import make_pool

            make_pool(pool, spec)
        else:
            torch_make_pool(pool, spec, device=generate_on)
        _common.log(f"generated {pool.name} in {time.perf_counter() - t0:.1f} s")
    if logits and not lp.exists():
        t0 = time.perf_counter()
        if generate_on == "numpy":
            from cm_engine.synthetic import make_logits

            make_logits(pool, classes, seed=seed, path=lp)
        else:
            torch_make_logits(pool, classes, device=generate_on, seed=seed, path=lp)
        _common.log(f"generated {lp.name} in {time.perf_counter() - t0:.1f} s")
    return pool, lp


def _torch_mixture(spec, device):
    import torch
    from cm_engine.synthetic import _centres

    centres, scales, q, weights = _centres(spec)
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return t(centres), t(scales), t(q), t(weights.astype(np.float64))


def torch_generate_block(spec, start, stop, mixture, device):
    """The same mixture as cm_engine.synthetic (anisotropic uneven clusters, near-duplicates,
    uniform noise) drawn with torch on `device`: pools that fill a GPU are made there, not carried."""
    import torch

    centres, scales, q, weights = mixture
    g = torch.Generator(device=device)
    g.manual_seed((spec.seed * 1_000_003 + start) % (2**63))
    m = stop - start
    comp = torch.multinomial(weights, m, replacement=True, generator=g)
    z = torch.randn((m, spec.d), generator=g, device=device)
    x = centres[comp] + (z * scales[comp]) @ q
    noise = torch.rand(m, generator=g, device=device) < spec.noise_frac
    nn_ = int(noise.sum())
    if nn_:
        x[noise] = torch.rand((nn_, spec.d), generator=g, device=device) * 6 - 3
    dup = torch.nonzero(torch.rand(m, generator=g, device=device) < spec.dup_frac).flatten()
    if dup.numel() and m > 1:
        src = torch.randint(0, m, (dup.numel(),), generator=g, device=device)
        x[dup] = x[src] + spec.dup_noise * (torch.randn((dup.numel(), spec.d), generator=g, device=device)
                                            * scales[comp[src]]) @ q
    return x


def torch_make_pool(path, spec, *, device, block_rows=1 << 20):
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(spec.dtype), shape=(spec.n, spec.d))
    mix = _torch_mixture(spec, device)
    tdtype = getattr(torch, spec.dtype)
    for s in range(0, spec.n, block_rows):
        e = min(s + block_rows, spec.n)
        out[s:e] = torch_generate_block(spec, s, e, mix, device).to(tdtype).cpu().numpy()
    out.flush()
    del out
    os.replace(tmp, path)
    return path


def _head(d, classes, seed, device):
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(seed * 7919 + 0x1061)
    return (torch.randn((d, classes), generator=g) * (4.0 / math.sqrt(d))).to(device)


def torch_logits(pool_path, classes, *, device, seed=0, block_rows=1 << 18):
    """N x C float16 logits of a random linear head plus noise, computed and kept on `device`
    (as a model's forward pass over the pool would leave them)."""
    import torch
    from cm_engine.pool import Pool

    pool = Pool(pool_path)
    w = _head(pool.shape[1], classes, seed, device)
    out = torch.empty((pool.n, classes), dtype=torch.float16, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(seed + 0x1062)
    for s, e, x in pool.iter_blocks(rows=block_rows, device=device, dtype=torch.float32):
        out[s:e] = (x @ w + torch.randn((e - s, classes), generator=g, device=device)).to(torch.float16)
    return out


def torch_make_logits(pool_path, classes, *, device, seed=0, path):
    path = Path(path)
    t = torch_logits(pool_path, classes, device=device, seed=seed)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    np.save(tmp, t.cpu().numpy())
    os.replace(str(tmp) + ("" if str(tmp).endswith(".npy") else ".npy"), path)
    return path


def warm_page_cache(paths) -> str:
    """Read files once (untimed) so that timed stages stream from the page cache, as the
    floors assume; says how many bytes it read and at what rate."""
    t0, total = time.perf_counter(), 0
    buf = bytearray(64 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(buf)
                if not k:
                    break
                total += k
    dt = time.perf_counter() - t0
    return f"warm: read {total / 1e9:.2f} GB once before the run ({total / max(dt, 1e-9) / 1e9:.2f} GB/s)"


def drop_page_cache(paths) -> str:
    """Evict these files from the page cache (for 'cold file' timings). Returns how, or why not.

    posix_fadvise(DONTNEED) on our own files only: never /proc/sys/vm/drop_caches, which would
    empty the cache of everyone else's jobs on a shared machine."""
    os.sync()  # dirty pages (a freshly generated pool) cannot be evicted
    try:
        for p in paths:
            if not Path(p).exists():
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "cold: fadvise DONTNEED on the pool and logits files"
    except (OSError, AttributeError) as e:
        return f"not dropped ({type(e).__name__}: {e})"


# =========================================================================== floors

def measure_floors(path=None, *, matmul_n=2048, device="cpu", read_bytes_max=2 << 30) -> dict:
    """This machine's ceilings: page-cache read bandwidth (reading `path`, once to warm the
    cache, then timed) and a large matrix product's GFLOP/s (float32, torch on `device`)."""
    import torch

    out = {}
    if path is not None and Path(path).exists():
        size = min(Path(path).stat().st_size, read_bytes_max)
        buf = bytearray(64 << 20)
        mv = memoryview(buf)

        def read_once():
            done = 0
            with open(path, "rb", buffering=0) as f:
                while done < size:
                    n = f.readinto(mv[: min(len(buf), size - done)])
                    if not n:
                        break
                    done += n
            return done

        read_once()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            done = read_once()
            best = min(best, time.perf_counter() - t0)
        out["read_bytes"] = done
        out["read_syscall_gb_s"] = done / best / 1e9
        # The stages read memory-mapped pages (no copy into a buffer): measure that too, touching
        # every 8-byte word, and take the faster of the two as the streaming floor.
        step = (64 << 20) // 8
        best = float("inf")
        for _ in range(3):
            # A fresh mapping each pass: a stage maps the pool once and pays each page fault once.
            t0 = time.perf_counter()
            mm = np.memmap(path, dtype=np.uint64, mode="r", offset=0, shape=(size // 8,))
            acc = 0
            for s_ in range(0, mm.shape[0], step):
                acc ^= int(np.bitwise_xor.reduce(mm[s_:s_ + step]))
            del mm
            best = min(best, time.perf_counter() - t0)
        out["read_mmap_gb_s"] = done / best / 1e9
        out["read_gb_s"] = max(out["read_syscall_gb_s"], out["read_mmap_gb_s"])
    dev = torch.device(device)
    a = torch.randn(matmul_n, matmul_n, device=dev)
    b = torch.randn(matmul_n, matmul_n, device=dev)
    (a @ b)
    _common.sync(dev)
    best = float("inf")  # best of 3: the machine is shared, the floor is what it can do
    for _ in range(3):
        t0 = time.perf_counter()
        (a @ b)
        _common.sync(dev)
        best = min(best, time.perf_counter() - t0)
    out["matmul_n"] = matmul_n
    out["matmul_gflop_s"] = 2 * matmul_n**3 / best / 1e9
    if dev.type == "cuda":
        x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        y = torch.empty_like(x)
        y.copy_(x)
        _common.sync(dev)
        t0 = time.perf_counter()
        for _ in range(5):
            y.copy_(x)
        _common.sync(dev)
        # A copy reads and writes every byte.
        out["device_copy_gb_s"] = 5 * 2 * x.numel() / (time.perf_counter() - t0) / 1e9
        h = torch.empty(1 << 28, dtype=torch.uint8).pin_memory()
        d = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
        d.copy_(h)
        _common.sync(dev)
        t0 = time.perf_counter()
        for _ in range(4):
            d.copy_(h, non_blocking=True)
        _common.sync(dev)
        out["h2d_gb_s"] = 4 * h.numel() / (time.perf_counter() - t0) / 1e9
    return out


# =========================================================================== adapters over our stages
# Each stage sits behind a small adapter so the harness runs while the stages are still
# landing: a missing module gives the stage the status "missing" instead of a crash.

def _import(name):
    import importlib

    try:
        return importlib.import_module(f"cm_engine.{name}")
    except ImportError:
        return None


def ours_knn(pool_path, *, k, metric, backend, device, seed):
    knn = _import("knn")
    if knn is None or not hasattr(knn, "knn_graph"):
        raise NotImplementedError("cm_engine.knn.knn_graph has not landed")
    return knn.knn_graph(str(pool_path), k=k, metric=metric, backend=backend, device=device, seed=seed)


def ours_hac(graph, *, n, mean_size, device, pool=None):
    """Graph HAC -> (labels int64 [N], epsilon). Uses hac_merges + epsilon_for_mean_size + cut,
    with cluster()'s rule for missing pairs: "exact" (the pool's row sums) for a cosine graph
    given the pool, else "constant"."""
    hac = _import("hac")
    if hac is None or not hasattr(hac, "hac_merges"):
        raise NotImplementedError("cm_engine.hac.hac_merges has not landed")
    exact = pool is not None and getattr(graph, "metric", "cosine") == "cosine"
    merges = _call(hac.hac_merges, graph, device=device, **({"embeddings": pool} if exact else {}))
    eps = float(_call(hac.epsilon_for_mean_size, merges, mean_size))
    labels = np.asarray(_call(hac.cut, merges, eps))
    return labels, eps


def ours_margin(logits, *, device):
    margin = _import("margin")
    if margin is None:
        raise NotImplementedError("cm_engine.margin has not landed")
    s = _call(margin.margin_scores, logits, from_logits=True, device=device)
    return s


def ours_select(scores, labels, budget, *, seed):
    strategies = _import("strategies")
    if strategies is None:
        raise NotImplementedError("cm_engine.strategies has not landed")
    return strategies.cluster_margin(scores, labels, budget, km_ratio=10.0, seed=seed)


def _call(fn, *args, **kwargs):
    """Call fn, dropping keyword knobs it does not take (the stages are landing in parallel)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    return fn(*args, **kwargs)


def _to_numpy(x):
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:
        pass
    return np.asarray(x)


# =========================================================================== quality helpers

def sample_queries(n, m=1000, seed=1234):
    return np.sort(np.random.default_rng(seed).choice(n, size=min(m, n), replace=False))


def exact_neighbours(pool_path, queries, k, metric="cosine", block=1 << 18):
    """Exact k nearest neighbours (self excluded) of the rows `queries`, by a blocked scan."""
    x = np.load(pool_path, mmap_mode="r")
    q = np.asarray(x[queries], dtype=np.float32)
    if metric == "cosine":
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    best_d = np.full((len(q), k), np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for s in range(0, x.shape[0], block):
        b = np.asarray(x[s:s + block], dtype=np.float32)
        if metric == "cosine":
            b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
            dist = 1.0 - q @ b.T
        else:
            dist = (q * q).sum(1)[:, None] - 2 * q @ b.T + (b * b).sum(1)[None, :]
        rows = np.arange(s, s + len(b))
        dist[queries[:, None] == rows[None, :]] = np.inf  # self excluded, as the contract says
        d2 = np.concatenate([best_d, dist], 1)
        i2 = np.concatenate([best_i, np.broadcast_to(rows, dist.shape)], 1)
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        best_d = np.take_along_axis(d2, part, 1)
        best_i = np.take_along_axis(i2, part, 1)
    return best_i


def recall(approx_rows, exact_rows) -> float:
    """Mean fraction of the exact k neighbours found (rows aligned)."""
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx_rows, exact_rows)]
    return float(np.sum(hits) / exact_rows.size)


def exact_labels(pool_path, eps, metric="cosine", *, n_clusters=None):
    """Exact average linkage (fastcluster, else scipy) cut at eps; with `n_clusters` also the
    cut into that many clusters (returns both)."""
    from scipy.cluster.hierarchy import fcluster

    x = np.asarray(np.load(pool_path, mmap_mode="r"), dtype=np.float64)
    try:
        import fastcluster

        z = fastcluster.linkage(x, method="average", metric=metric)
    except ImportError:
        from scipy.cluster.hierarchy import linkage

        z = linkage(x, method="average", metric=metric)
    at_eps = fcluster(z, eps, criterion="distance").astype(np.int64) - 1
    if n_clusters is None:
        return at_eps
    return at_eps, fcluster(z, n_clusters, criterion="maxclust").astype(np.int64) - 1


def reference_margin(logits_slice):
    z = np.asarray(logits_slice, dtype=np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p.sort(1)
    return p[:, -1] - p[:, -2]


# =========================================================================== workers (one per subprocess)

def _warm_up(cfg, device):
    """Run the pipeline once on the first rows of the real pool (same dtype, same code paths) so
    one-time costs (imports, JIT compilation, thread pools) are not charged to the timed stages."""
    import tempfile

    rng = np.random.default_rng(0)
    x = np.load(cfg["pool"], mmap_mode="r")
    n = int(min(x.shape[0], 2000))
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "warm.npy"
        np.save(p, np.asarray(x[:n]))
        logits = rng.normal(size=(n, cfg["classes"])).astype(np.float16)
        labels = rng.integers(0, max(1, n // 10), n)
        try:
            g = ours_knn(p, k=min(cfg["k"], n - 1), metric=cfg["metric"], backend=cfg["backend"], device=device, seed=0)
            labels = ours_hac(g, n=n, mean_size=MEAN_CLUSTER_SIZE, device=device, pool=str(p))[0]
        except Exception:
            pass
        try:
            scores = _to_numpy(ours_margin(logits, device=device))
        except Exception:
            scores = rng.random(n).astype(np.float32)
        try:
            ours_select(scores, labels, max(1, n // 10), seed=0)
            # The round-robin switches to its numba kernel from NUMBA_MIN_CANDIDATES candidates;
            # load that kernel too (else the first size above it pays ~1.5 s of loading, as 3e4 did).
            m = 25_000
            ours_select(rng.random(m).astype(np.float32), rng.integers(0, m // 10, m), m // 10, seed=0)
        except Exception:
            pass


def worker_ours(cfg) -> dict:
    import torch
    from cm_engine.pool import Pool

    device = cfg["device"]
    n, k = cfg["n"], cfg["k"]
    res = {"method": "ours", "n": n, "stages": {}, "status": {}, "quality": {},
           "cache_state": cfg.get("cache_state", "warm (page cache not dropped)")}
    t_import = time.perf_counter()
    if cfg.get("warmup", True):
        _warm_up(cfg, device)
    res["warmup_s"] = time.perf_counter() - t_import if cfg.get("warmup", True) else None
    rss0 = _common.current_rss_bytes()
    st, status = res["stages"], res["status"]
    graph = labels = scores = picked = None

    def run(stage, fn):
        if cfg.get("result_path"):
            # Checkpoint before each stage: a worker killed at its time cap keeps what it measured.
            _common.write_json(cfg["result_path"], dict(res, partial=True, running=stage,
                                                        peak_rss_bytes=_common.peak_rss_bytes()))
        t0 = time.perf_counter()
        try:
            out = fn()
            _common.sync(device)
            st[stage] = time.perf_counter() - t0
            status[stage] = "ok"
            return out
        except NotImplementedError as e:
            status[stage] = f"missing: {e}"
        except Exception as e:  # a failing stage must not lose the others' figures
            status[stage] = f"error: {type(e).__name__}: {e}"
            res.setdefault("tracebacks", {})[stage] = traceback.format_exc(limit=6)
        return None

    pool_path = cfg["pool"]

    def open_pass():
        pool = Pool(pool_path)
        fp = pool.fingerprint()
        total = 0.0
        for _s, _e, b in pool.iter_blocks(rows=1 << 16):
            total += float(b.sum())  # read every byte once, as a streaming stage must
        return fp

    fp = run("open", open_pass)
    res["fingerprint"] = fp
    if cfg.get("graph", True):
        graph = run("knn", lambda: ours_knn(pool_path, k=k, metric=cfg["metric"], backend=cfg["backend"],
                                            device=device, seed=cfg["seed"]))
        if graph is not None:
            gi = getattr(graph, "info", None) or {}
            res["knn_info"] = {key: gi[key] for key in ("backend", "nlist", "nprobe", "nprobe_ivf", "coarse_probes",
                                                         "candidates_per_row", "cell_size_max", "compute_dtype",
                                                         "tune_recall", "tune_recall_se", "sample_recall",
                                                         "tune_tried", "reach_tried", "phase_s") if key in gi}
            out = run("hac", lambda: ours_hac(graph, n=n, mean_size=MEAN_CLUSTER_SIZE, device=device,
                                                     pool=str(pool_path)))
            if out is not None:
                labels, res["epsilon"] = out
                res["labels_source"] = "ours (graph HAC)"
        else:
            status["hac"] = "skipped: no graph"
    else:
        status["knn"] = status["hac"] = "skipped: " + cfg.get("graph_skipped", "above --graph-max")
    if labels is not None and cfg.get("labels_out"):
        # Peers at this size compare their clusters with ours (ARI) from this file.
        np.save(cfg["labels_out"], labels)
        res["labels_path"] = cfg["labels_out"]
    if labels is None:
        # Streaming stages still run at every size: clusters of mean size 10 stand in for HAC's.
        labels = np.random.default_rng(cfg["seed"]).integers(0, max(1, n // 10), n).astype(np.int64)
        res["labels_source"] = "random, mean cluster size 10 (HAC not run at this size)"
    if cfg.get("logits_on") == "device":
        # Logits made on the device before timing (a model's forward pass leaves them there).
        logits = torch_logits(pool_path, cfg["classes"], device=device, seed=cfg["seed"])
        _common.sync(device)
    else:
        logits = cfg["logits"]
    scores = run("margin", lambda: _to_numpy(ours_margin(logits, device=device)))
    if scores is None:
        scores = np.random.default_rng(1).random(n).astype(np.float32)
        res["scores_source"] = "random (margin stage failed)"
    picked = run("sampling", lambda: _to_numpy(ours_select(scores, labels, cfg["budget"], seed=cfg["seed"])))
    if all(status.get(s) == "ok" for s in STAGES):
        st["end_to_end"] = sum(st[s] for s in STAGES)
    st["clustering"] = st["knn"] + st["hac"] if "knn" in st and "hac" in st else None
    if st["clustering"] is None:
        del st["clustering"]
    res["peak_rss_bytes"] = _common.peak_rss_bytes()
    res["rss_after_warmup_bytes"] = rss0
    if torch.cuda.is_available() and "cuda" in str(device):
        res["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())

    # ---- cached-cluster cycle (scores + selection with the clustering already made)
    if cfg.get("cycle") and status.get("margin") == "ok":
        t0 = time.perf_counter()
        s2 = _to_numpy(ours_margin(logits, device=device))
        ours_select(s2, labels, cfg["budget"], seed=cfg["seed"] + 1)
        _common.sync(device)
        st["cycle"] = time.perf_counter() - t0

    if cfg.get("result_path"):
        _common.write_json(cfg["result_path"], dict(res, partial=True, running="quality checks"))
    # ---- quality (after timing; not timed)
    q = res["quality"]
    try:
        if graph is not None:
            queries = sample_queries(n, cfg.get("recall_queries", 1000))
            ex = exact_neighbours(pool_path, queries, k, cfg["metric"])
            q["knn_recall_at_k"] = recall(_to_numpy(graph.indices)[queries], ex)
            q["recall_queries"] = len(queries)
        if status.get("hac") == "ok":
            q["n_clusters"] = int(len(np.unique(labels)))
            q["mean_cluster_size"] = n / q["n_clusters"]
            if n <= cfg.get("ari_max", 20_000):
                from sklearn.metrics import adjusted_rand_score

                ex_labels, ex_count = exact_labels(pool_path, res["epsilon"], cfg["metric"],
                                                   n_clusters=q["n_clusters"])
                # Same epsilon (what the contract promises on a complete graph) and same number of
                # clusters (what a user choosing target_mean_size gets).
                q["ari_vs_exact"] = float(adjusted_rand_score(ex_labels, labels))
                q["exact_n_clusters"] = int(len(np.unique(ex_labels)))
                q["ari_vs_exact_same_count"] = float(adjusted_rand_score(ex_count, labels))
        if status.get("margin") == "ok":
            m = min(n, 10_000)
            lg = np.load(logits, mmap_mode="r")[:m] if isinstance(logits, (str, Path)) else _to_numpy(logits[:m])
            ref = reference_margin(lg)
            q["margin_max_abs_err"] = float(np.max(np.abs(scores[:m].astype(np.float64) - ref)))
        if status.get("sampling") == "ok":
            km = int(round(10.0 * cfg["budget"]))
            cand = np.argsort(scores, kind="stable")[:km]
            q["picked"] = int(len(picked))
            q["picked_unique"] = bool(len(np.unique(picked)) == len(picked))
            q["picked_in_candidates_frac"] = float(np.isin(picked, cand).mean()) if len(picked) else None
            q["picked_distinct_clusters"] = int(len(np.unique(labels[picked])))
    except Exception as e:
        q["error"] = f"{type(e).__name__}: {e}"
    return res


def _load_whole(path):
    return np.asarray(np.load(path), dtype=np.float64)


def _port_margin_and_round_robin(logits_path, labels, budget, seed):
    """Margins and selection as the public ports write them: numpy softmax + sort, argsort of N,
    then a Python loop over clusters and picks."""
    import random

    st = {}
    t0 = time.perf_counter()
    z = np.load(logits_path).astype(np.float32)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ps = np.sort(p, axis=1)
    margins = ps[:, -1] - ps[:, -2]
    st["margin"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    km = min(len(margins), int(round(10.0 * budget)))
    cand = np.argsort(margins)[:km]
    rnd = random.Random(seed)
    clusters = {}
    for i in cand.tolist():
        clusters.setdefault(int(labels[i]), []).append(i)
    order = sorted(clusters, key=lambda c: len(clusters[c]))
    for c in order:
        rnd.shuffle(clusters[c])
    picked = []
    while len(picked) < budget and order:
        nxt = []
        for c in order:
            if len(picked) >= budget:
                break
            picked.append(clusters[c].pop())
            if clusters[c]:
                nxt.append(c)
        order = nxt
    st["sampling"] = time.perf_counter() - t0
    return st, picked


def _eps_for_mean_size(z, n, mean_size):
    """Height of the merge that leaves n / mean_size clusters (linkage heights are sorted)."""
    target = max(1, int(round(n / mean_size)))
    return float(z[n - target - 1, 2]) if n - target - 1 >= 0 else 0.0


def worker_peer(cfg) -> dict:
    name, n = cfg["method"], cfg["n"]
    res = {"method": name, "n": n, "stages": {}, "status": {}, "quality": {}}
    st = res["stages"]
    eps = cfg.get("epsilon")
    path = cfg["pool"]
    labels = None
    if name in ("cm_fastcluster", "cm_sklearn"):
        from scipy.cluster.hierarchy import fcluster

        t0 = time.perf_counter()
        x = _load_whole(path)
        st["open"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if name == "cm_fastcluster":
            import fastcluster

            z = fastcluster.linkage(x, method="average", metric=cfg["metric"])
            if eps is None:
                eps = _eps_for_mean_size(z, n, MEAN_CLUSTER_SIZE)
            labels = fcluster(z, eps, criterion="distance").astype(np.int64) - 1
        else:
            from sklearn.cluster import AgglomerativeClustering

            if eps is None:
                raise ValueError("cm_sklearn needs the epsilon of our run at this size")
            labels = AgglomerativeClustering(n_clusters=None, distance_threshold=eps, linkage="average",
                                             metric=cfg["metric"]).fit(x).labels_.astype(np.int64)
        st["hac"] = time.perf_counter() - t0
        del x
        s2, picked = _port_margin_and_round_robin(cfg["logits"], labels, cfg["budget"], cfg["seed"])
        st.update(s2)
        st["end_to_end"] = sum(st[s] for s in ("open", "hac", "margin", "sampling"))
        res["quality"]["picked"] = len(picked)
    elif name == "sklearn_knn":
        from sklearn.cluster import AgglomerativeClustering
        from sklearn.neighbors import kneighbors_graph

        x = np.asarray(np.load(path), dtype=np.float32)
        t0 = time.perf_counter()
        g = kneighbors_graph(x, cfg["k"], metric=cfg["metric"], include_self=False, n_jobs=-1)
        st["knn"] = time.perf_counter() - t0
        if eps is None:
            raise ValueError("sklearn_knn needs the epsilon of our run at this size")
        t0 = time.perf_counter()
        labels = AgglomerativeClustering(n_clusters=None, distance_threshold=eps, linkage="average",
                                         metric=cfg["metric"], connectivity=g).fit(x).labels_.astype(np.int64)
        st["hac"] = time.perf_counter() - t0
        st["clustering"] = st["knn"] + st["hac"]
        rows = g.tolil().rows
        queries = sample_queries(n, cfg.get("recall_queries", 1000))
        approx = np.full((len(queries), cfg["k"]), -1, np.int64)
        for j, qi in enumerate(queries):
            r = rows[qi][: cfg["k"]]
            approx[j, : len(r)] = r
        res["_approx"] = (queries, approx)
    elif name in ("faiss_flat", "faiss_ivf"):
        import faiss

        x = np.ascontiguousarray(np.load(path), dtype=np.float32)
        k = cfg["k"]
        t0 = time.perf_counter()
        if cfg["metric"] == "cosine":
            faiss.normalize_L2(x)
            mt = faiss.METRIC_INNER_PRODUCT
        else:
            mt = faiss.METRIC_L2
        if name == "faiss_flat":
            index = faiss.IndexFlat(x.shape[1], mt)
        else:
            nlist = max(1, int(4 * math.sqrt(n)))
            quant = faiss.IndexFlat(x.shape[1], mt)
            index = faiss.IndexIVFFlat(quant, x.shape[1], nlist, mt)
            train = x[np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)]
            index.train(train)
            index.nprobe = cfg.get("nprobe", 16)
            res["params"] = {"nlist": nlist, "nprobe": index.nprobe}
        index.add(x)
        _d, idx = index.search(x, k + 1)
        # Drop each point itself (or one copy of a tie) as the contract's graph does.
        self_hit = idx == np.arange(n)[:, None]
        keep = ~self_hit
        keep[~self_hit.any(1), k] = False
        idx = idx[keep].reshape(n, k)
        st["knn"] = time.perf_counter() - t0
        queries = sample_queries(n, cfg.get("recall_queries", 1000))
        res["_approx"] = (queries, idx[queries])
    else:
        raise ValueError(f"method: expected one of {PEERS}, got {name!r}")
    res["peak_rss_bytes"] = _common.peak_rss_bytes()
    for s in st:
        res["status"][s] = "ok"
    res["epsilon"] = eps
    # ---- quality (after timing)
    try:
        if "_approx" in res:
            queries, approx = res.pop("_approx")
            ex = exact_neighbours(path, queries, cfg["k"], cfg["metric"])
            res["quality"]["knn_recall_at_k"] = recall(approx, ex)
        if labels is not None:
            res["quality"]["n_clusters"] = int(len(np.unique(labels)))
            ours_labels = cfg.get("ours_labels")
            if ours_labels and Path(ours_labels).exists():
                from sklearn.metrics import adjusted_rand_score

                res["quality"]["ari_vs_ours"] = float(adjusted_rand_score(labels, np.load(ours_labels)))
    except Exception as e:
        res["quality"]["error"] = f"{type(e).__name__}: {e}"
    res.pop("_approx", None)
    return res


def worker_main(cfg_json: str) -> int:
    cfg = json.loads(cfg_json)
    if cfg.get("log_level"):
        import logging

        # To stderr, which _spawn keeps in <run_dir>/<method>_n<N>.log (a killed worker's log survives).
        logging.basicConfig(level=cfg["log_level"], stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg["threads"]))
    load0 = os.getloadavg()
    try:
        res = worker_ours(cfg) if cfg["method"] == "ours" else worker_peer(cfg)
        # Other people's jobs share this machine: the load average says how much they took.
        res["loadavg_1_5_15_start"], res["loadavg_1_5_15_end"] = load0, os.getloadavg()
    except Exception as e:
        res = {"method": cfg["method"], "n": cfg["n"], "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=8), "peak_rss_bytes": _common.peak_rss_bytes()}
    _common.write_json(cfg["result_path"], res)
    return 0


# =========================================================================== orchestration

def peer_memory_bytes(method, n, d, k):
    """Predicted peak memory of a peer at size n (the N^2 terms dominate)."""
    x64 = 8 * n * d
    if method == "cm_fastcluster":
        # pdist's condensed float64 matrix plus fastcluster's working copy (measured here:
        # 7.3 GB peak at N = 30,000, i.e. about 8 N^2 bytes).
        return 8 * n * n + 2 * x64
    if method == "cm_sklearn":
        return 8 * n * n + 2 * x64  # scipy copies the condensed matrix
    if method == "sklearn_knn":
        return 4 * n * d + 64 * n * k  # sparse graph + heaps
    if method == "faiss_flat":
        return 4 * n * d * 2 + 16 * n * (k + 1)
    if method == "faiss_ivf":
        return 4 * n * d * 2 + 16 * n * (k + 1)
    return 0


#: Growth exponent used to predict a peer's time at the next size from its last one.
PEER_EXPONENT = {"cm_fastcluster": 2.0, "cm_sklearn": 2.0, "sklearn_knn": 2.0, "faiss_flat": 2.0, "faiss_ivf": 1.5}


def _spawn(cfg, timeout, run_dir):
    """Run one (method, size) in a fresh Python process; returns its result dict."""
    rp = Path(run_dir) / f"{cfg['method']}_n{cfg['n']}.json"
    if rp.exists():
        rp.unlink()
    cfg = dict(cfg, result_path=str(rp))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    log_path = rp.with_suffix(".log")  # the worker's stdout + stderr, kept even when it is killed

    def log_tail():
        return log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""

    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as lf:
            proc = subprocess.run(cmd, timeout=timeout, stdout=lf, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        res = json.loads(rp.read_text()) if rp.exists() else {"method": cfg["method"], "n": cfg["n"]}
        res.update(wall=f"timeout (> {timeout:.0f} s)", process_s=time.perf_counter() - t0, log_tail=log_tail())
        if res.get("running"):
            res.setdefault("status", {})[res["running"]] = f"timeout (> {timeout:.0f} s for the whole run)"
        return res
    if rp.exists():
        res = json.loads(rp.read_text())
    else:
        res = {"method": cfg["method"], "n": cfg["n"], "error": f"worker exited {proc.returncode} without a result",
               "stderr_tail": log_tail()}
        if proc.returncode in (-9, 137):
            res["wall"] = "OOM (killed)"
    res["process_s"] = wall
    if proc.returncode != 0 and "stderr_tail" not in res:
        res["stderr_tail"] = log_tail()
    return res


def fit_exponent(ns, ts):
    """Least-squares slope of log t against log n (None with fewer than two points)."""
    pts = [(n, t) for n, t in zip(ns, ts) if t and t > 0]
    if len(pts) < 2:
        return None
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def run_benchmark(args) -> dict:
    root = Path(args.data_dir)
    run_dir = root / "runs" / args.tag
    run_dir.mkdir(parents=True, exist_ok=True)
    sizes = sorted(set(int(s) for s in args.sizes))
    peers = [p for p in args.peers if p]
    t_start = time.perf_counter()
    out = {
        "benchmark": "throughput", "tag": args.tag, "created": _common.utc_now(), "commit": _common.git_commit(),
        "machine": _common.machine_info(),
        "config": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "pool": ("synthetic (cm_engine.synthetic.PoolSpec defaults: n/200 anisotropic Gaussian clusters, "
                 f"Zipf 0.8 sizes, 10% near-duplicates, 2% uniform noise), d={args.d} {args.dtype}; logits: "
                 f"random linear head + noise, {args.classes} classes, float16"),
        "notes": [_common.SHARED_MACHINE_NOTE,
                  "each (method, size) ran in a fresh subprocess: peak RSS is that process's ru_maxrss "
                  "(includes the Python + torch import baseline, ~0.3-0.5 GB)",
                  "end_to_end = open + knn + hac + margin + sampling walls of one process; quality checks "
                  "ran after the timed stages",
                  "budget (k_t) = N/10 with k_m = 10 k_t, i.e. every point is a candidate",
                  "HAC uses cluster()'s default rule for missing pairs: 'exact' (cluster row sums from the "
                  "pool) for cosine graphs, 'constant' for l2",
                  "ru_maxrss counts the memory-mapped pool's pages that were read (page cache, reclaimable) "
                  "besides the process's own allocations",
                  "above --graph-max the sampling stage uses random cluster labels of mean size 10"],
        "results": [], "floors": {},
    }
    gen = dict(logits=args.logits_on != "device", generate_on=args.generate_on)
    # ---- floors: read bandwidth on the largest pool already on disk (else the first size's)
    have = [n for n in sizes if data_paths(root, n, args.d, args.dtype, args.classes)[1].exists()]
    if not have:
        ensure_data(root, sizes[0], args.d, args.dtype, args.classes, **gen)
        have = [sizes[0]]
    biggest = data_paths(root, have[-1], args.d, args.dtype, args.classes)[1]
    try:
        out["floors"] = measure_floors(biggest, device=args.device if args.device != "auto" else
                                       ("cuda" if _common.gpu_name() != "none" else "cpu"),
                                       matmul_n=args.matmul_n)
    except Exception as e:
        out["floors"] = {"error": f"{type(e).__name__}: {e}"}
    _common.log(f"floors: {out['floors']}")
    walled = {}  # peer -> reason it stopped
    last = {}  # peer -> (n, seconds)
    budget_left = lambda: args.total_cap - (time.perf_counter() - t_start)  # noqa: E731
    partial = Path(args.out_dir) / f"throughput_{args.tag}.json"

    def checkpoint():
        # Partial results after every run: a run cut short (time limit, OOM kill) keeps them.
        _common.write_json(partial, dict(out, partial=True, total_s=time.perf_counter() - t_start))

    # Phase 1: ours at every size (the targets), phase 2: the peers, so that a run budget
    # that runs out cuts the peers' largest sizes, never our curve.
    bases, ours_res = {}, {}
    for n in sizes:
        # Data per size, lazily: a run cut short still has the small sizes' results.
        pool, logits = ensure_data(root, n, args.d, args.dtype, args.classes, **gen)
        base = {"n": n, "d": args.d, "k": args.k, "metric": args.metric, "classes": args.classes,
                "budget": max(1, n // 10) if args.budget is None else min(args.budget, n),
                "seed": 0, "pool": str(pool), "logits": str(logits), "device": args.device,
                "backend": args.backend, "ari_max": args.ari_max, "recall_queries": args.recall_queries,
                "logits_on": args.logits_on, "cycle": args.cycle, "threads": args.threads,
                "warmup": not args.no_warmup, "log_level": args.log_level}
        bases[n] = base
        if args.drop_cache:
            base["cache_state"] = drop_page_cache([pool, logits])
        else:
            base["cache_state"] = warm_page_cache([pool] + ([logits] if Path(logits).exists() else []))
        if budget_left() <= 0:
            out["results"].append({"method": "ours", "n": n, "wall": "run budget exhausted"})
            continue
        graph = n <= args.graph_max
        prev = [m for m in ours_res if m < n]
        if graph and prev:
            p_ = ours_res[max(prev)]
            tc = _stage_time(p_, "clustering")
            if tc is None and (p_.get("wall") or p_.get("error")):
                graph = False
                base["graph_skipped"] = f"k-NN + HAC did not finish at n={max(prev)}"
            elif tc is not None and tc * (n / max(prev)) ** 1.2 > args.ours_cap:
                graph = False
                base["graph_skipped"] = (f"k-NN + HAC predicted {tc * (n / max(prev)) ** 1.2:.0f} s "
                                         f"> --ours-cap {args.ours_cap:.0f} s")
        _common.log(f"ours n={n}")
        r = _spawn(dict(base, method="ours", graph=graph,
                        labels_out=str(run_dir / f"ours_labels_n{n}.npy") if n <= 1_000_000 else None),
                   min(args.ours_cap, max(30, budget_left())), run_dir)
        out["results"].append(r)
        ours_res[n] = r
        checkpoint()
        _common.log(f"  -> {json.dumps({k: r.get(k) for k in ('stages', 'status', 'quality', 'peak_rss_bytes', 'wall', 'error')})[:900]}")
    for n in sizes:
        if n not in bases:
            continue
        base, r = bases[n], ours_res.get(n, {})
        eps = r.get("epsilon")
        for peer in peers:
            if peer in walled:
                out["results"].append({"method": peer, "n": n, "wall": walled[peer]})
                continue
            if n > args.graph_max:
                out["results"].append({"method": peer, "n": n, "wall": "skipped: above --graph-max (no graph of ours to compare)"})
                continue
            mem = peer_memory_bytes(peer, n, args.d, args.k)
            if mem > args.peer_mem_gb * 1e9:
                walled[peer] = f"OOM predicted ({mem / 1e9:.1f} GB > {args.peer_mem_gb} GB)"
                out["results"].append({"method": peer, "n": n, "wall": walled[peer]})
                continue
            if peer in last:
                n0, t0_ = last[peer]
                pred = t0_ * (n / n0) ** PEER_EXPONENT[peer]
                if pred > args.peer_cap:
                    walled[peer] = f"timeout predicted ({pred:.0f} s > cap {args.peer_cap:.0f} s)"
                    out["results"].append({"method": peer, "n": n, "wall": walled[peer]})
                    continue
            if peer in ("cm_sklearn", "sklearn_knn") and eps is None:
                out["results"].append({"method": peer, "n": n, "wall": "skipped: our HAC gave no epsilon at this size"})
                continue
            if budget_left() <= 0:
                out["results"].append({"method": peer, "n": n, "wall": "run budget exhausted"})
                continue
            _common.log(f"{peer} n={n}")
            pr = _spawn(dict(base, method=peer, epsilon=eps, ours_labels=r.get("labels_path")),
                        min(args.peer_cap, max(10, budget_left())), run_dir)
            if str(pr.get("wall", "")).startswith("timeout") and budget_left() <= 1 and min(args.peer_cap, max(10, budget_left() + pr.get("process_s", 0))) < args.peer_cap:
                pr["wall"] = f"run budget exhausted (killed after {pr.get('process_s', 0):.0f} s, under the {args.peer_cap:.0f} s cap)"
            out["results"].append(pr)
            if pr.get("wall") is not None or pr.get("error"):
                walled[peer] = pr.get("wall") or f"error: {pr.get('error')}"
            else:
                last[peer] = (n, pr.get("process_s", 0))
            checkpoint()
            _common.log(f"  -> {json.dumps({k: pr.get(k) for k in ('stages', 'quality', 'peak_rss_bytes', 'wall', 'error')})[:500]}")
    out["total_s"] = time.perf_counter() - t_start
    summarize(out)
    return out


def _stage_time(r, stage):
    v = (r.get("stages") or {}).get(stage)
    return v if isinstance(v, (int, float)) else None


def _completeness(r):
    return sum(1 for s_ in STAGES if _stage_time(r, s_) is not None)


def best_ours(res) -> dict:
    """n -> our result at that size: the most complete one; among equally complete ones (merged
    runs), the later run's."""
    ours = {}
    for r in res:
        if r["method"] != "ours":
            continue
        cur = ours.get(r["n"])
        if cur is None or (_completeness(r), r.get("run_created", "")) >= (_completeness(cur), cur.get("run_created", "")):
            ours[r["n"]] = r
    return ours


def merge_runs(paths) -> dict:
    """Combine results JSONs of the same benchmark configuration (e.g. a full curve and a later
    run at the target size). Every result keeps its run; ratios pair only results of one run."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    runs.sort(key=lambda o: o.get("created", ""))
    keys = ("d", "dtype", "k", "metric", "classes", "device")
    for o in runs[1:]:
        diff = {k: (runs[0]["config"].get(k), o["config"].get(k)) for k in keys if runs[0]["config"].get(k) != o["config"].get(k)}
        if diff:
            raise ValueError(f"merge: expected runs of one configuration, got differences {diff}")
    out = dict(runs[-1])
    out["merged_from"] = [{"tag": o.get("tag"), "created": o.get("created"), "commit": o.get("commit"),
                           "total_s": o.get("total_s"), "floors": o.get("floors"), "path": str(p)}
                          for o, p in zip(runs, sorted(paths, key=lambda p: json.loads(Path(p).read_text()).get("created", "")))]
    out["results"] = []
    for o in runs:
        cap = float(o["config"].get("peer_cap", float("inf")))
        for r in o["results"]:
            r = dict(r, run=o.get("tag"), run_created=o.get("created"))
            w = str(r.get("wall") or "")
            if r["method"] != "ours" and w.startswith("timeout (> "):
                # Killed before the peer cap: the run's time budget ran out, not the peer.
                try:
                    secs = float(w.split("> ", 1)[1].split(" s", 1)[0])
                except (IndexError, ValueError):
                    secs = cap
                if secs < cap:
                    r["wall"] = f"run budget exhausted (killed after {secs:.0f} s, under the {cap:.0f} s cap)"
            out["results"].append(r)
    out["notes"] = list(out.get("notes", [])) + [
        "merged file: where two runs measured ours at one size, the table and plot use the more complete "
        "result, and the later run's where both finished; each peer ratio pairs results of one run"]
    out["floors"] = runs[-1].get("floors", {})
    summarize(out)
    return out


def summarize(out) -> None:
    """Ratios ours/peer at every size both finished, fitted exponents, floor ratios, targets."""
    res = [r for r in out["results"] if r.get("stages")]
    ours = best_ours(res)
    ours_by_run = {(r["n"], r.get("run")): r for r in res if r["method"] == "ours"}
    ratios = []
    compare = {"cm_fastcluster": ("end_to_end", "end_to_end"), "cm_sklearn": ("end_to_end", "end_to_end"),
               "sklearn_knn": ("clustering", "clustering"), "faiss_flat": ("knn", "knn"), "faiss_ivf": ("knn", "knn")}
    for r in res:
        # A ratio pairs a peer with ours from the SAME run (merged files keep each run's pairs).
        o = ours_by_run.get((r["n"], r.get("run")))
        if r["method"] == "ours" or o is None:
            continue
        a, b = compare[r["method"]]
        to, tp = _stage_time(o, a), _stage_time(r, b)
        if to and tp:
            row = {"peer": r["method"], "n": r["n"], "stage": a, "ours_s": to, "peer_s": tp,
                   "ours_over_peer": to / tp, "speedup": tp / to, "run": r.get("run")}
            if r["method"].startswith("cm_"):
                # Also the clustering alone (ours: k-NN + HAC; theirs: exact linkage + cut).
                oc, pc = _stage_time(o, "clustering"), _stage_time(r, "hac")
                if oc and pc:
                    row.update(clustering_ours_s=oc, clustering_peer_s=pc, clustering_speedup=pc / oc)
            ratios.append(row)
    out["ratios"] = ratios
    ns = sorted(ours)
    exps = {}
    for stage in STAGES + ("end_to_end", "clustering"):
        pts = [(n, _stage_time(ours[n], stage)) for n in ns if _stage_time(ours[n], stage)]
        big = [(n, t) for n, t in pts if n >= 1e5]
        exps[stage] = {"exponent_n>=1e5": fit_exponent(*zip(*big)) if len(big) >= 2 else None,
                       "range_n>=1e5": [big[0][0], big[-1][0]] if big else None,
                       "exponent_all": fit_exponent(*zip(*pts)) if len(pts) >= 2 else None,
                       "range": [pts[0][0], pts[-1][0]] if pts else None}
    for peer in PEERS:
        pts = [(r["n"], _stage_time(r, compare[peer][1])) for r in res if r["method"] == peer]
        pts = [p for p in pts if p[1]]
        if len(pts) >= 2:
            exps[f"peer:{peer}"] = {"exponent_all": fit_exponent(*zip(*pts)), "range": [pts[0][0], pts[-1][0]]}
    out["exponents"] = exps
    fl = out.get("floors") or {}
    bw = fl.get("read_gb_s")
    gf = fl.get("matmul_gflop_s")
    cfg = out["config"]
    for n, r in ours.items():
        f = {}
        itemsize = 2 if cfg["dtype"] in ("float16", "bfloat16") else 4
        pool_b = n * cfg["d"] * itemsize
        if bw:
            for stage, nbytes in (("open", pool_b), ("knn", pool_b), ("margin", n * cfg["classes"] * 2),
                                  ("sampling", n * 12), ("hac", n * cfg["k"] * 8)):
                t = _stage_time(r, stage)
                if t:
                    fl_t = nbytes / (bw * 1e9)
                    f[stage] = {"floor_s": fl_t, "basis": f"read {nbytes / 1e9:.3g} GB at {bw:.1f} GB/s",
                                "time_over_floor": t / fl_t}
        if gf and _stage_time(r, "knn"):
            flops = 2.0 * n * n * cfg["d"]
            f["knn_exact_gemm"] = {"floor_s": flops / (gf * 1e9),
                                   "basis": f"exact all-pairs GEMM {flops:.3g} flop at {gf:.0f} GFLOP/s",
                                   "time_over_floor": _stage_time(r, "knn") / (flops / (gf * 1e9))}
        cb = fl.get("device_copy_gb_s")
        t = _stage_time(r, "margin")
        if cb and t:
            nbytes = n * cfg["classes"] * 2
            # A device copy reads and writes each byte; scoring reads each logit once.
            f["margin_vs_device_copy"] = {"floor_s": nbytes / (cb / 2 * 1e9), "effective_read_gb_s": nbytes / t / 1e9,
                                          "basis": f"read {nbytes / 1e9:.3g} GB at half the device copy rate "
                                                   f"({cb:.0f} GB/s read+write)",
                                          "time_over_floor": t / (nbytes / (cb / 2 * 1e9))}
        r["vs_floor"] = f
    out["targets"] = targets(out, ours, ratios)


def targets(out, ours, ratios) -> dict:
    t = {}
    r1m = ours.get(1_000_000)
    if r1m and out["config"]["d"] == 128 and out["machine"]["gpu"] == "none":
        e2e = _stage_time(r1m, "end_to_end")
        t["cpu_1M_e2e_le_600s"] = {"measured_s": e2e, "peak_rss_gb": r1m.get("peak_rss_bytes", 0) / 1e9,
                                   "time_ok": bool(e2e is not None and e2e <= 600),
                                   # Only a finished run's peak counts.
                                   "rss_ok": bool(r1m.get("peak_rss_bytes", 1e30) <= 6e9) if e2e is not None else None,
                                   "budget": r1m.get("quality", {}).get("picked")}
    fc = [r for r in ratios if r["peer"] == "cm_fastcluster"]
    if fc:
        top_n = max(r["n"] for r in fc)
        tops = [r for r in fc if r["n"] == top_n]  # one per run in a merged file: all reported
        worst = min(tops, key=lambda r: r["speedup"])
        tenx = [n for n, r in ours.items() if n >= 10 * top_n and _stage_time(r, "end_to_end")]
        t["vs_fastcluster_largest"] = {"n": top_n, "speedup_end_to_end": worst["speedup"],
                                       "speedup_ok_20x": worst["speedup"] >= 20,
                                       "clustering_speedup": worst.get("clustering_speedup"),
                                       "all_runs": [{"run": r.get("run"), "speedup": r["speedup"], "ours_s": r["ours_s"],
                                                     "peer_s": r["peer_s"]} for r in tops],
                                       "ours_finishes_at_10x": bool(tenx), "sizes_>=10x_finished": tenx}
    c = out["config"]
    if out["machine"]["gpu"] != "none" and (c["d"], c["dtype"], c["k"], c["classes"]) == (256, "float16", 32, 1000):
        r = ours.get(10_000_000)
        if r:
            e2e, cyc = _stage_time(r, "end_to_end"), _stage_time(r, "cycle")
            t["gpu_10M_e2e_le_120s"] = {"measured_s": e2e, "ok": bool(e2e is not None and e2e <= 120),
                                        "cache": r.get("cache_state"), "card": out["machine"]["gpu"],
                                        "picked": r.get("quality", {}).get("picked")}
            t["gpu_cycle_le_5s"] = {"measured_s": cyc, "ok": bool(cyc is not None and cyc <= 5)}
    e = out.get("exponents", {}).get("end_to_end", {})
    if e.get("exponent_n>=1e5") is not None:
        t["e2e_exponent_le_1.2"] = {"exponent": e["exponent_n>=1e5"], "range": e["range_n>=1e5"],
                                    "ok": e["exponent_n>=1e5"] <= 1.2}
    return t


# =========================================================================== plot

def plot(out, path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    res = out["results"]
    fig, ax = plt.subplots(figsize=(12, 6.5))
    colours = dict(zip(STAGES + ("end_to_end",), ("tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:purple", "black")))
    ex = out.get("exponents", {})
    ours_best = list(best_ours([r for r in res if r.get("stages")]).values())
    for stage in STAGES + ("end_to_end",):
        pts = sorted((r["n"], _stage_time(r, stage)) for r in ours_best if _stage_time(r, stage))
        if not pts:
            continue
        e = ex.get(stage, {}).get("exponent_n>=1e5") or ex.get(stage, {}).get("exponent_all")
        lbl = f"ours: {stage}" + (f"  (slope {e:.2f})" if e is not None else "")
        ax.plot(*zip(*pts), "-o", color=colours[stage], lw=2.4 if stage == "end_to_end" else 1.4, ms=4, label=lbl)
    pstyle = {"cm_fastcluster": ("end_to_end", "tab:red", "s"), "cm_sklearn": ("end_to_end", "tab:brown", "D"),
              "sklearn_knn": ("clustering", "tab:pink", "^"), "faiss_flat": ("knn", "tab:cyan", "v"),
              "faiss_ivf": ("knn", "tab:olive", "<")}
    best_run = {r["n"]: r.get("run") for r in ours_best}
    for peer, (stage, c, m) in pstyle.items():
        # One point per size; in a merged file the one from the run that gave our point there.
        by_n = {}
        for r in res:
            if r["method"] == peer and _stage_time(r, stage):
                if r["n"] not in by_n or r.get("run") == best_run.get(r["n"]):
                    by_n[r["n"]] = _stage_time(r, stage)
        pts = sorted(by_n.items())
        walls = sorted((r["n"], r["wall"]) for r in res if r["method"] == peer and r.get("wall")
                       and not r["wall"].startswith("skipped") and "budget" not in r["wall"])
        if not pts and not walls:
            continue
        e = ex.get(f"peer:{peer}", {}).get("exponent_all")
        lbl = f"peer {peer}: {stage}" + (f"  (slope {e:.2f})" if e is not None else "")
        if pts:
            ax.plot(*zip(*pts), "--" + m, color=c, ms=5, label=lbl)
        if walls:
            n_w, why = walls[0]
            y = pts[-1][1] if pts else 1.0
            ax.plot([n_w], [y], "x", color=c, ms=12, mew=2.5)
            short = "OOM" if "OOM" in why else ("time cap" if "time" in why else why.split(":")[0][:12])
            ax.annotate(f"{peer}\n{short}", (n_w, y), textcoords="offset points", xytext=(6, -4), fontsize=7, color=c)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pool size N (rows)")
    ax.set_ylabel("wall time (s)")
    m = out["machine"]
    ax.set_title(f"cm-engine throughput vs pool size (synthetic pools): d={out['config']['d']} {out['config']['dtype']}, "
                 f"k={out['config']['k']}, {out['config']['classes']} classes\n"
                 f"{m.get('cpu_count')} cores, {m.get('ram_gib')} GiB RAM, GPU: {m.get('gpu')} "
                 f"(device={out['config']['device']}); x = peer's wall", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# =========================================================================== markdown table

def _fmt_s(t):
    if t is None:
        return "-"
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def markdown_report(out) -> str:
    """The README 'Performance' tables from a results JSON (every figure labelled with its machine)."""
    m, c = out["machine"], out["config"]
    lines = [f"Machine: {m.get('cpu_count')} cores ({m.get('cpu_model')}), {m.get('ram_gib')} GiB RAM, "
             f"GPU: {m.get('gpu')}; device={c['device']}; torch {m.get('torch_version')}, "
             f"numpy {m.get('numpy_version')}. Run {out.get('created')} (commit {out.get('commit')}).",
             f"Pool: {out.get('pool')}. k={c['k']}, metric={c['metric']}, k_t=N/10 (k_m=10 k_t) unless stated."]
    if out.get("merged_from"):
        lines.append("Merged from runs: " + "; ".join(f"{m['tag']} ({m['created']}, commit {m['commit']})"
                                                      for m in out["merged_from"]) + ".")
    lines += ["",
             "| N | open | k-NN | HAC | margin | sampling | end to end | peak RSS | recall@k | ARI vs exact |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    best = best_ours([r for r in out["results"] if r.get("stages")])
    for r in sorted((r for r in out["results"] if r["method"] == "ours" and best.get(r["n"], r) is r),
                    key=lambda r: r["n"]):
        st, q = r.get("stages", {}), r.get("quality", {})
        rss = r.get("peak_rss_bytes")
        cell = lambda s_: _fmt_s(st.get(s_)) if s_ in st else ("skip" if "skip" in str(r.get("status", {}).get(s_, "")) else  # noqa: E731
                                                             ("t/o" if "timeout" in str(r.get("status", {}).get(s_, "")) else "-"))
        lines.append(f"| {r['n']:,} | {cell('open')} | {cell('knn')} | {cell('hac')} | {cell('margin')} | "
                     f"{cell('sampling')} | {cell('end_to_end')} | {rss / 1e9:.2f} GB | "
                     f"{q.get('knn_recall_at_k', float('nan')):.3f} | {q.get('ari_vs_exact', float('nan')):.3f} |"
                     .replace("nan", "-") if rss else f"| {r['n']:,} | {r.get('wall') or r.get('error')} |")
    lines += ["", "Peers (same pools, same run; seconds; x = ours faster by):", "",
              "| peer | N | peer stage | peer s | ours s | speedup | peer peak RSS |", "|---|---:|---|---:|---:|---:|---:|"]
    peers_by = {(r["method"], r["n"], r.get("run")): r for r in out["results"] if r["method"] != "ours"}
    for x in sorted(out.get("ratios", []), key=lambda x: (x["n"], x["peer"])):
        pr = peers_by.get((x["peer"], x["n"], x.get("run")), {})
        lines.append(f"| {x['peer']} | {x['n']:,} | {x['stage']} | {_fmt_s(x['peer_s'])} | {_fmt_s(x['ours_s'])} | "
                     f"{x['speedup']:.1f}x | {pr.get('peak_rss_bytes', 0) / 1e9:.2f} GB |"
                     + (f" {x['run']} |" if x.get("run") else ""))
    walls = {}
    for r in out["results"]:
        if (r["method"] != "ours" and r.get("wall") and r["method"] not in walls and not r["wall"].startswith("skipped")
                and "budget" not in r["wall"]):
            walls[r["method"]] = f"{r['method']}: stops at N={r['n']:,} ({r['wall']})"
    if walls:
        lines += ["", "Walls: " + "; ".join(walls.values()) + "."]
    ex = out.get("exponents", {})
    lines += ["", "Fitted scaling exponents (log t vs log N, N >= 1e5): " + ", ".join(
        f"{k} {v['exponent_n>=1e5']:.2f}" for k, v in ex.items() if not k.startswith("peer") and v.get("exponent_n>=1e5") is not None)]
    fl = out.get("floors", {})
    if fl.get("read_gb_s"):
        lines += [f"Floors on this machine: page-cache read {fl['read_gb_s']:.2f} GB/s, "
                  f"{fl.get('matmul_n')}^3 float32 matmul {fl.get('matmul_gflop_s', 0):.0f} GFLOP/s."]
    return "\n".join(lines)


# =========================================================================== CLI

def build_parser():
    p = argparse.ArgumentParser(prog="throughput.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (CI smoke); tag 'quick'")
    p.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")], default=None,
                   help="comma-separated pool sizes (default 1e4..1e7, quick: 2000,5000)")
    p.add_argument("--graph-max", type=float, default=1_000_000, help="largest N for the k-NN + HAC stages")
    p.add_argument("--peers", type=lambda s: [x for x in s.split(",") if x], default=list(PEERS),
                   help=f"comma-separated subset of {','.join(PEERS)} ('' for none)")
    p.add_argument("--peer-cap", type=float, default=300.0, help="seconds per peer run before it is walled")
    p.add_argument("--peer-mem-gb", type=float, default=12.0, help="skip a peer whose N^2 estimate passes this")
    p.add_argument("--ours-cap", type=float, default=1200.0, help="seconds per run of ours")
    p.add_argument("--total-cap", type=float, default=1500.0, help="seconds for the whole run; later runs skipped")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--budget", type=int, default=None, help="k_t (default N/10)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the workers")
    p.add_argument("--log-level", default=None, choices=("DEBUG", "INFO", "WARNING"),
                   help="the workers' cm_engine log level (their logs: <data-dir>/runs/<tag>/<method>_n<N>.log)")
    p.add_argument("--generate-on", default="numpy",
                   help="how pools are generated: numpy (cm_engine.synthetic), or with torch on a device (cpu, cuda)")
    p.add_argument("--logits-on", default="file", choices=["file", "device"],
                   help="logits read from a float16 .npy, or made on the device before timing")
    p.add_argument("--cycle", action="store_true", help="also time a cached-cluster cycle (scores + selection)")
    p.add_argument("--drop-cache", action="store_true", help="evict the pool from the page cache before each size")
    p.add_argument("--ari-max", type=int, default=20_000, help="largest N for ARI against exact linkage")
    p.add_argument("--recall-queries", type=int, default=1000)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--data-dir", default=str(_common.BENCH_DATA))
    p.add_argument("--tag", default=None, help="results name: benchmarks/results/throughput_<tag>.json")
    p.add_argument("--out-dir", default=str(_common.RESULTS))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the warm-up pass of ours (smoke runs only: first-call JIT then lands in the timings)")
    p.add_argument("--report", default=None, metavar="JSON", help="print the markdown tables of a results JSON and exit")
    p.add_argument("--merge", type=lambda s: s.split(","), default=None, metavar="A.json,B.json",
                   help="combine results JSONs of one configuration into throughput_<tag>.json/.png and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    """Entry point (also called by `cm-engine bench`). Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.report:
        print(markdown_report(json.loads(Path(args.report).read_text())))
        return 0
    if args.merge:
        out = merge_runs(args.merge)
        tag = args.tag or "merged"
        out["tag"] = tag
        od = Path(args.out_dir)
        jp = _common.write_json(od / f"throughput_{tag}.json", out)
        if not args.no_plot:
            out["plot"] = str(plot(out, od / f"throughput_{tag}.png"))
            _common.write_json(jp, out)
        print(json.dumps({"results": str(jp), "targets": out.get("targets")}, indent=1))
        return 0
    if args.quick:
        args.sizes = args.sizes or list(QUICK_SIZES)
        args.tag = args.tag or "quick"
        args.peer_cap = min(args.peer_cap, 60.0)
        args.recall_queries = min(args.recall_queries, 200)
        args.matmul_n = min(args.matmul_n, 512)
        args.total_cap = min(args.total_cap, 300.0)
        args.no_warmup = True
    args.sizes = args.sizes or list(FULL_SIZES)
    args.tag = args.tag or ("gpu" if "cuda" in args.device else "cpu")
    out = run_benchmark(args)
    od = Path(args.out_dir)
    jp = _common.write_json(od / f"throughput_{args.tag}.json", out)
    if not args.no_plot:
        pp = plot(out, od / f"throughput_{args.tag}.png")
        out["plot"] = str(pp) if pp else None
        _common.write_json(jp, out)
    _common.log(f"wrote {jp}")
    print(json.dumps({"results": str(jp), "targets": out.get("targets"), "total_s": out.get("total_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
