"""Pools on disk: memory-mapped `.npy` files and shard directories, row blocks, fingerprints.

A pool is an [N, ...] array that is never read whole: every stage walks it in row
blocks whose size comes from a byte budget. Sources accepted everywhere:

* a numpy array or memmap, a torch tensor (any device);
* a path to a `.npy` file, opened read-only with `mmap_mode="r"`;
* a path to a directory of `.npy` shards (sorted by file name), read as one pool
  stacked along rows; every shard has the same trailing shape and dtype.

bfloat16 has no numpy dtype: store it as uint16 in the `.npy` and put a sidecar
`<file>.npy.json` beside it holding ``{"dtype": "bfloat16"}`` (`save_npy` writes
both). A shard directory may hold one `pool.json` with the same key instead.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Iterator

import warnings

import numpy as np
import torch

from ._device import rows_per_block
from ._validate import check_nonempty

_TORCH_DTYPES = {
    np.dtype("float16"): torch.float16,
    np.dtype("float32"): torch.float32,
    np.dtype("float64"): torch.float64,
}


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """torch.from_numpy without the warning about read-only memmaps (we never write to them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _read_sidecar(path: Path) -> dict:
    side = path.with_name(path.name + ".json") if path.is_file() else path / "pool.json"
    if side.exists():
        with open(side) as f:
            return json.load(f)
    return {}


def _open_npy(path: Path, name: str) -> np.memmap:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{name}: expected a readable .npy file, got {str(path)!r} ({e})") from None


class ShardedArray:
    """Read-only rows of several memory-mapped `.npy` shards seen as one array."""

    def __init__(self, shards: list, name: str = "array"):
        if not shards:
            raise ValueError(f"{name}: expected a directory holding .npy shards, got none")
        tail, dtype = shards[0].shape[1:], shards[0].dtype
        for i, s in enumerate(shards):
            if s.shape[1:] != tail or s.dtype != dtype:
                raise ValueError(
                    f"{name}: expected every shard to have trailing shape {tail} and dtype {dtype}, "
                    f"got shard {i} with shape {s.shape} and dtype {s.dtype}")
        self.shards = shards
        self.offsets = np.cumsum([0] + [s.shape[0] for s in shards])
        self.shape = (int(self.offsets[-1]),) + tuple(tail)
        self.dtype = dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("ShardedArray supports contiguous slices only")
            return self.read(start, stop)
        if isinstance(key, (int, np.integer)):
            return self.read(int(key), int(key) + 1)[0]
        idx = np.asarray(key)
        order = np.argsort(idx, kind="stable")
        out = np.empty((idx.size,) + self.shape[1:], self.dtype)
        which = np.searchsorted(self.offsets, idx[order], side="right") - 1
        for s in np.unique(which):
            m = which == s
            out[order[m]] = self.shards[s][idx[order[m]] - self.offsets[s]]
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as one contiguous array (a view when inside one shard)."""
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        parts = []
        s = first
        while start < stop and s < len(self.shards):
            lo = start - self.offsets[s]
            hi = min(stop, self.offsets[s + 1]) - self.offsets[s]
            parts.append(self.shards[s][lo:hi])
            start = int(self.offsets[s] + hi)
            s += 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty((0,) + self.shape[1:], self.dtype)


def open_array(src, *, name: str = "array"):
    """Open a source (array, tensor, `.npy` path or shard directory) without reading it.

    Returns the numpy array / memmap / ShardedArray / torch tensor. bfloat16 files
    (uint16 + sidecar) come back as a torch bfloat16 view of the memmap.
    """
    if isinstance(src, (np.ndarray, torch.Tensor, ShardedArray)):
        return src
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise ValueError(f"{name}: expected an existing .npy file or shard directory, got {str(path)!r}")
        meta = _read_sidecar(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".npy")
            arr = ShardedArray([_open_npy(p, name) for p in files], name=name)
        else:
            arr = _open_npy(path, name)
        if meta.get("dtype") == "bfloat16":
            if arr.dtype != np.uint16:
                raise ValueError(f"{name}: a bfloat16 sidecar expects uint16 storage, got {arr.dtype}")
            return _BF16(arr)
        return arr
    if isinstance(src, (list, tuple)):
        return np.asarray(src)
    raise TypeError(f"{name}: expected a numpy array, torch tensor or path to a .npy file, got {type(src).__name__}")


class _BF16:
    """uint16 storage read back as torch.bfloat16 blocks."""

    def __init__(self, raw):
        self.raw, self.shape, self.ndim, self.dtype = raw, raw.shape, raw.ndim, "bfloat16"

    def __len__(self):
        return self.shape[0]

    def read(self, start, stop):
        rows = self.raw.read(start, stop) if isinstance(self.raw, ShardedArray) else self.raw[start:stop]
        return _from_numpy(np.ascontiguousarray(rows)).view(torch.bfloat16)

    def __getitem__(self, key):
        return _from_numpy(np.ascontiguousarray(self.raw[key])).view(torch.bfloat16)


def save_npy(path, array, *, bfloat16: bool = False) -> None:
    """Write an array atomically (temporary file renamed into place).

    A torch bfloat16 tensor (or `bfloat16=True`) is stored as uint16 with the sidecar.
    """
    path = Path(path)
    if isinstance(array, torch.Tensor):
        if array.dtype == torch.bfloat16:
            bfloat16 = True
            array = array.detach().cpu().view(torch.uint16 if hasattr(torch, "uint16") else torch.int16).numpy().view(np.uint16)
        else:
            array = array.detach().cpu().numpy()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(array))
    os.replace(tmp, path)
    side = path.with_name(path.name + ".json")
    if bfloat16:
        with open(side, "w") as f:
            json.dump({"dtype": "bfloat16"}, f)
    elif side.exists():
        side.unlink()


class Pool:
    """A 2-D (or 1-D) array source read in row blocks.

    Attributes: `shape`, `n` (rows), `dtype` (numpy dtype, or "bfloat16"), `array` (the opened source).
    """

    def __init__(self, src, *, name: str = "embeddings"):
        self.name = name
        self.array = open_array(src, name=name)
        self.shape = tuple(self.array.shape)
        self.n = self.shape[0] if self.shape else 0
        if isinstance(self.array, torch.Tensor):
            self.dtype = self.array.dtype
        else:
            self.dtype = self.array.dtype

    @property
    def row_bytes(self) -> int:
        per = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        return per * self.itemsize

    @property
    def itemsize(self) -> int:
        if self.dtype == "bfloat16" or self.dtype == torch.bfloat16:
            return 2
        if isinstance(self.dtype, torch.dtype):
            return torch.empty((), dtype=self.dtype).element_size()
        return np.dtype(self.dtype).itemsize

    def check_nonempty(self) -> None:
        check_nonempty(self.name, self.n)

    def read(self, start: int, stop: int):
        """Rows [start, stop) in the stored dtype: numpy for file/numpy sources, torch for tensors/bf16."""
        a = self.array
        if isinstance(a, (ShardedArray, _BF16)):
            return a.read(start, stop)
        return a[start:stop]

    def block(self, start: int, stop: int, *, device="cpu", dtype=None) -> torch.Tensor:
        """Rows [start, stop) as a torch tensor on `device`, cast to `dtype` if given."""
        rows = self.read(start, stop)
        if not isinstance(rows, torch.Tensor):
            rows = np.ascontiguousarray(rows)
            if rows.dtype not in _TORCH_DTYPES and np.issubdtype(rows.dtype, np.floating):
                rows = rows.astype(np.float32)
            rows = _from_numpy(rows)
        if dtype is not None and rows.dtype != dtype and rows.device.type == "cpu" and torch.device(device).type != "cpu":
            # Move in the (usually narrower) stored dtype, cast on the device.
            return rows.to(device, non_blocking=True).to(dtype)
        return rows.to(device=device, dtype=dtype if dtype is not None else rows.dtype)

    def release(self, start: int, stop: int) -> bool:
        """Drop rows [start, stop) of a memory-mapped .npy pool from this process's resident pages.

        A streaming pass over a mapped file otherwise leaves every page it read mapped and
        counted in the process's RSS until the mapping closes (the whole pool at the end of
        the pass). The pages stay in the page cache (a later read faults them back in without
        disk I/O) and the mapping is read-only, so the data is unchanged. Returns whether
        anything was released (False for sources that are not a whole-file read-only memmap).
        """
        a = self.array
        mm = getattr(a, "base", None)
        if not (isinstance(a, np.memmap) and isinstance(mm, mmap.mmap) and a.flags.c_contiguous and stop > start):
            return False
        # numpy maps from the allocation-granularity boundary below the data's file offset.
        head = int(a.offset) % mmap.ALLOCATIONGRANULARITY
        lo = head + int(start) * self.row_bytes
        hi = min(len(mm), head + int(stop) * self.row_bytes)
        lo -= lo % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (AttributeError, OSError, ValueError):  # no madvise on this platform: harmless
            return False
        return True

    def block_ranges(self, budget=None, *, bytes_per_row: int | None = None, rows: int | None = None):
        """(start, stop) pairs covering the pool; rows per block from the byte budget."""
        if rows is None:
            rows = rows_per_block(bytes_per_row or self.row_bytes, budget)
        rows = max(1, int(rows))
        return [(s, min(s + rows, self.n)) for s in range(0, self.n, rows)]

    def iter_blocks(self, budget=None, *, device="cpu", dtype=None, rows: int | None = None,
                    bytes_per_row: int | None = None, release: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield (start, stop, block tensor) over the pool. release: after the consumer is done
        with a block, drop its pages from the resident set (`release`): a single pass then holds
        one block of the mapped file resident instead of all of it."""
        for s, e in self.block_ranges(budget, bytes_per_row=bytes_per_row, rows=rows):
            yield s, e, self.block(s, e, device=device, dtype=dtype)
            if release:
                self.release(s, e)

    def fingerprint(self, *, full: bool = False, samples: int = 64, sample_rows: int = 64) -> str:
        """A hex digest of shape, dtype and content.

        By default hashes `samples` evenly spaced runs of `sample_rows` rows (first and
        last included): cheap on any size, and it catches regenerated or re-ordered pools.
        `full=True` hashes every byte (one streamed pass).
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.shape, str(self.dtype))).encode())
        if self.n == 0:
            return h.hexdigest()
        if full:
            ranges = self.block_ranges(64 * 2**20)
        else:
            starts = np.unique(np.linspace(0, max(0, self.n - sample_rows), samples).astype(np.int64))
            ranges = [(int(s), int(min(s + sample_rows, self.n))) for s in starts]
        for s, e in ranges:
            rows = self.read(s, e)
            if isinstance(rows, torch.Tensor):
                rows = rows.detach().cpu()
                if rows.dtype == torch.bfloat16:
                    rows = rows.view(torch.int16)
                rows = rows.numpy()
            h.update(np.ascontiguousarray(rows).tobytes())
        return h.hexdigest()


def fingerprint(src, *, full: bool = False) -> str:
    """Fingerprint of any pool source (see `Pool.fingerprint`)."""
    return Pool(src).fingerprint(full=full)
