"""Synthetic pools with realistic structure, written block by block to memory-mapped `.npy`.

Real pools at the scale this engine targets cannot ship with it, so benchmarks and the
demo use generated ones: a mixture of many anisotropic Gaussian clusters of uneven
(Zipf-like) sizes, a share of near-duplicates (copies of another row of the same
block plus small noise, as web-scale pools have) and a share of uniform noise. Rows
are generated in blocks from per-block seeds, so any size is made in bounded memory
and the same (n, d, seed) always gives the same bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._validate import check_float, check_int


@dataclass(frozen=True)
class PoolSpec:
    """Parameters of a synthetic pool (also its identity: the file name is derived from it)."""

    n: int
    d: int = 128
    n_clusters: int | None = None  # default: n // 200, at least 10
    zipf: float = 0.8  # cluster size weights ~ 1 / rank**zipf
    dup_frac: float = 0.10  # rows that are near-copies of another row
    dup_noise: float = 0.02  # their noise, relative to a cluster's scale
    noise_frac: float = 0.02  # rows drawn uniformly from the bounding box
    dtype: str = "float32"
    seed: int = 0

    def name(self) -> str:
        return (f"synth_n{self.n}_d{self.d}_c{self.clusters}_z{self.zipf}_dup{self.dup_frac}"
                f"_noise{self.noise_frac}_{self.dtype}_s{self.seed}")

    @property
    def clusters(self) -> int:
        return self.n_clusters if self.n_clusters is not None else max(10, self.n // 200)


def _centres(spec: PoolSpec):
    rng = np.random.default_rng([spec.seed, 0xC3])
    k, d = spec.clusters, spec.d
    centres = rng.normal(size=(k, d)).astype(np.float32)
    # Anisotropy: per-cluster per-axis scales (log-normal), in one shared random basis.
    scales = np.exp(rng.normal(-1.2, 0.6, size=(k, d))).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    weights = 1.0 / np.arange(1, k + 1) ** spec.zipf
    weights = rng.permutation(weights / weights.sum())
    return centres, scales, q.astype(np.float32), weights


def generate_block(spec: PoolSpec, start: int, stop: int, *, _cache=None) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of the pool as float32 [stop-start, d], and their mixture component
    (int64; -1 for uniform noise). Deterministic in (spec, start) for block-aligned calls."""
    centres, scales, q, weights = _cache if _cache is not None else _centres(spec)
    rng = np.random.default_rng([spec.seed, 0xB10C, start])
    m = stop - start
    comp = rng.choice(len(weights), size=m, p=weights)
    z = rng.standard_normal((m, spec.d), dtype=np.float32)
    x = centres[comp] + (z * scales[comp]) @ q
    noise = rng.random(m) < spec.noise_frac
    if noise.any():
        x[noise] = rng.uniform(-3, 3, size=(int(noise.sum()), spec.d)).astype(np.float32)
        comp[noise] = -1
    dup = np.flatnonzero(rng.random(m) < spec.dup_frac)
    if dup.size and m > 1:
        src = rng.integers(0, m, size=dup.size)
        x[dup] = x[src] + spec.dup_noise * (rng.standard_normal((dup.size, spec.d), dtype=np.float32)
                                            * scales[np.maximum(comp[src], 0)]) @ q
        comp[dup] = comp[src]
    return x, comp


def make_pool(path, spec: PoolSpec, *, block_rows: int = 65536, progress=None, return_components=False):
    """Write the pool to `path` (.npy, memory-mapped; atomic rename) and return the path.

    With `return_components=True` also returns the int64 [n] mixture components (-1 = noise).
    `progress` is an optional callable(rows_done) for progress bars.
    """
    check_int("n", spec.n, min=1)
    check_int("d", spec.d, min=1)
    check_float("dup_frac", spec.dup_frac, min=0, max=1)
    check_float("noise_frac", spec.noise_frac, min=0, max=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(spec.dtype), shape=(spec.n, spec.d))
    comps = np.empty(spec.n, np.int64) if return_components else None
    cache = _centres(spec)
    for s in range(0, spec.n, block_rows):
        e = min(s + block_rows, spec.n)
        x, c = generate_block(spec, s, e, _cache=cache)
        out[s:e] = x
        if comps is not None:
            comps[s:e] = c
        if progress is not None:
            progress(e - s)
    out.flush()
    del out
    os.replace(tmp, path)
    return (path, comps) if return_components else path


def cached_pool(root, spec: PoolSpec, **kw) -> Path:
    """The pool's file under `root`, generated once and reused (keyed by the spec)."""
    path = Path(root) / f"{spec.name()}.npy"
    if not path.exists():
        make_pool(path, spec, **kw)
    return path


def make_logits(embeddings, n_classes: int, *, seed: int = 0, temperature: float = 1.0,
                dtype=np.float16, path=None, block_rows: int = 65536):
    """Model outputs for a pool: a random linear head on the embeddings plus noise.

    Returns float [N, n_classes] (a memmap at `path` if given). Gives margins with the
    spread of a real classifier's: most points confident, a tail of uncertain ones.
    """
    from .pool import Pool

    pool = Pool(embeddings)
    rng = np.random.default_rng([seed, 0x1061])
    w = rng.normal(size=(pool.shape[1], n_classes)).astype(np.float32) / np.sqrt(pool.shape[1])
    w *= 4.0 / temperature
    if path is not None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(pool.n, n_classes))
    else:
        out = np.empty((pool.n, n_classes), dtype)
    for s in range(0, pool.n, block_rows):
        e = min(s + block_rows, pool.n)
        x = np.asarray(pool.read(s, e), dtype=np.float32)
        brng = np.random.default_rng([seed, 0x1062, s])
        out[s:e] = x @ w + brng.standard_normal((e - s, n_classes), dtype=np.float32)
    if path is not None:
        out.flush()
        del out
        os.replace(tmp, path)
        return path
    return out
