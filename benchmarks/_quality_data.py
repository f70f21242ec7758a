"""Datasets of the selection-quality benchmark: frozen features, clean and near-duplicate variants.

Every loader returns float32 pool features, int64 pool labels, float32 test features and int64 test
labels. Pools are subsampled (seeded, stratification-free) to at most `pool_size` rows. The
"redundant" variant takes pool_size // 4 originals and writes each 4 times with small Gaussian
noise (the copy keeps the original's label), so both variants have the same pool size (and exact
scipy HAC still fits in memory); the test set is the same clean test set.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("cifar10", "banking77", "clinc150", "fashion_mnist")
#: Pool sizes (clean and redundant alike): the reference study used 20K pools.
POOL_SIZE = {"cifar10": 20_000, "banking77": 10_000, "clinc150": 15_000, "fashion_mnist": 20_000}
COPIES = 4
#: Copy noise: per-dimension Gaussian with std NOISE * (that dimension's std over the pool).
NOISE = 0.05
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def data_dir(arg=None) -> Path:
    if arg:
        return Path(arg)
    return Path(os.environ.get("CM_ENGINE_DATA", REPO.parent / "shared" / "data"))


def _npz(path):
    z = np.load(path, allow_pickle=False)
    return (z["X_train"].astype(np.float32), z["y_train"].astype(np.int64),
            z["X_test"].astype(np.float32), z["y_test"].astype(np.int64))


def _fashion(pca_dim=128):
    def imgs(name):
        with gzip.open(FASHION_DIR / name) as f:
            return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784).astype(np.float32) / 255.0

    def labs(name):
        with gzip.open(FASHION_DIR / name) as f:
            return np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)

    Xtr, ytr = imgs("train-images-idx3-ubyte.gz"), labs("train-labels-idx1-ubyte.gz")
    Xte, yte = imgs("t10k-images-idx3-ubyte.gz"), labs("t10k-labels-idx1-ubyte.gz")
    # PCA to 128 dims fitted on the 60K training images (unsupervised; labels unused).
    mu = Xtr.mean(0)
    xc = Xtr - mu
    _, vecs = np.linalg.eigh((xc.T @ xc).astype(np.float64))  # 784 x 784: cheaper than an SVD of 60K rows
    w = vecs[:, ::-1][:, :pca_dim].astype(np.float32)
    return (Xtr - mu) @ w, ytr, (Xte - mu) @ w, yte


def load(name: str, *, data=None, pool_size=None, seed: int = 1234):
    """(X_pool, y_pool, X_test, y_test) for a clean dataset, pool subsampled to pool_size rows."""
    d = data_dir(data)
    if name == "cifar10":
        Xtr, ytr, Xte, yte = _npz(d / "cifar10" / "cifar10_effnetlite0_128px_f16.npz")
    elif name in ("banking77", "clinc150"):
        Xtr, ytr, Xte, yte = _npz(d / "text" / f"{name}_minilm_l6_f16.npz")
    elif name == "fashion_mnist":
        Xtr, ytr, Xte, yte = _fashion()
    else:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
    n = POOL_SIZE[name] if pool_size is None else int(pool_size)
    if n < Xtr.shape[0]:
        idx = np.sort(np.random.default_rng(seed).choice(Xtr.shape[0], n, replace=False))
        Xtr, ytr = Xtr[idx], ytr[idx]
    return np.ascontiguousarray(Xtr, np.float32), ytr, np.ascontiguousarray(Xte, np.float32), yte


def make_redundant(X, y, *, copies=COPIES, noise=NOISE, seed: int = 4321):
    """pool_size // copies originals, each written `copies` times with noise; returns (X, y, group)."""
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    base = np.sort(rng.choice(n, n // copies, replace=False))
    group = np.repeat(np.arange(base.size), copies)
    Xr = X[base][group]
    scale = X.std(0, keepdims=True) * noise
    Xr = Xr + rng.standard_normal(Xr.shape).astype(np.float32) * scale
    perm = rng.permutation(Xr.shape[0])  # copies must not sit at consecutive indices
    return np.ascontiguousarray(Xr[perm], np.float32), y[base][group][perm], group[perm]


def pca(X_pool, X_test, dim=128):
    """PCA fitted on the pool (unsupervised), applied to pool and test; centered features."""
    if X_pool.shape[1] <= dim:
        mu = X_pool.mean(0)
        return X_pool - mu, X_test - mu
    mu = X_pool.mean(0)
    xc = X_pool - mu
    _, vecs = np.linalg.eigh((xc.T @ xc).astype(np.float64))
    w = np.ascontiguousarray(vecs[:, ::-1][:, :dim]).astype(np.float32)
    return np.ascontiguousarray(xc @ w), np.ascontiguousarray((X_test - mu) @ w)


CACHE = Path(os.environ.get("CM_QUALITY_CACHE", "/tmp/cm_quality_cache"))


def dataset(name, variant, *, data=None, pool_size=None, dim=128):
    """(X_pool, y_pool, X_test, y_test, group) with PCA-`dim` features; group = copy group (or arange)."""
    key = CACHE / f"{name}_{variant}_{pool_size}_{dim}.npz"
    if key.exists():
        z = np.load(key)
        return z["X"], z["y"], z["Xt"], z["yt"], z["g"]
    X, y, Xt, yt = load(name, data=data, pool_size=pool_size)
    if name == "fashion_mnist":
        X, Xt = X - X.mean(0), Xt - X.mean(0)  # already PCA-128 of the pixels
    else:
        X, Xt = pca(X, Xt, dim)
    if variant == "redundant":
        X, y, g = make_redundant(X, y)
    else:
        g = np.arange(X.shape[0])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(key, X=X, y=y, Xt=Xt, yt=yt, g=g)
    return X, y, Xt, yt, g
