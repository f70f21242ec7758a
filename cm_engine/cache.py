"""A content-addressed on-disk cache of named numpy arrays (k-NN graphs, merge lists).

An entry is one directory ``<cache_dir>/<stage>-<key>/`` holding each array as ``<name>.npy``
(loaded memory-mapped, read-only) and ``manifest.json`` (shapes, dtypes, file sizes, per-array
checksums, the stage's parameters and the versions that wrote it).

* **Key** (`cache_key`): blake2b of the canonical JSON of (pool fingerprint, stage name, the
  stage's frozen parameter dataclass, ``cm_engine.__version__``, `FORMAT_VERSION`). Any change of
  pool, parameters or version is a different key, so stale entries are never found, only missed.
* **Atomic writes**: arrays and manifest are written into a fresh temporary directory inside
  ``cache_dir`` (same file system), fsynced, then renamed into place in one ``rename``. A reader
  sees a complete entry or none. Two processes writing the same key: the first rename wins and
  the second discards its (equally complete) copy.
* **Verified loads**: a missing/unreadable manifest, an entry written by another format or package
  version, a missing or truncated file, a shape/dtype mismatch or a checksum mismatch is logged as
  a warning, the entry is removed and the caller rebuilds it. Never a crash, never a wrong result.
* **Checksums**: blake2b (16-byte digests) of each ``.npy`` file's bytes, in 64 MiB pieces hashed
  in parallel threads (hashlib releases the GIL) and combined by hashing the pieces' digests, so
  a 128 MiB graph verifies in a fraction of a second; ``verify="size"`` checks headers and sizes only.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger("cm_engine")

#: Bumped whenever the layout of an entry changes; part of every key and checked on load.
FORMAT_VERSION = 1
#: Bytes per independently hashed piece of a file (pieces are hashed in parallel threads).
HASH_PIECE_BYTES = 64 * 2**20
VERIFY = ("full", "size")
_MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"


def _package_version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------- keys

def _jsonable(o):
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return {"__type__": type(o).__name__, **{f.name: getattr(o, f.name) for f in dataclasses.fields(o)}}
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, set, frozenset)):
        return sorted(o, key=repr) if isinstance(o, (set, frozenset)) else list(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if type(o).__module__.startswith("torch"):  # torch.device / torch.dtype
        return str(o)
    raise TypeError(f"params: expected JSON-representable values (numbers, strings, None, tuples, "
                    f"dataclasses), got {type(o).__name__} {o!r}")


def canonical_json(obj) -> str:
    """Deterministic JSON of `obj` (sorted keys, no spaces; dataclasses as dicts with their type
    name). Floats keep their shortest round-trip repr, so equal parameters give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable, allow_nan=True)


def cache_key(fingerprint: str, stage: str, params) -> str:
    """Hex key of one cache entry: hash of the pool fingerprint, the stage name, the stage's
    parameters (a frozen dataclass, or anything `canonical_json` takes) and the versions."""
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError(f"fingerprint: expected a non-empty string, got {fingerprint!r}")
    _check_stage(stage)
    text = canonical_json({"fingerprint": fingerprint, "stage": stage, "params": params,
                           "cm_engine": _package_version(), "format": FORMAT_VERSION})
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _check_stage(stage) -> str:
    if not isinstance(stage, str) or not stage or not all(c.isalnum() or c in "_." for c in stage):
        raise ValueError(f"stage: expected a non-empty name of letters, digits, '_' or '.', got {stage!r}")
    return stage


# ----------------------------------------------------------------------------- checksums

def file_checksum(path, *, piece_bytes: int = HASH_PIECE_BYTES, threads: int | None = None) -> str:
    """blake2b checksum of a file's bytes, streamed.

    Files up to one piece: the plain blake2b-128 of the bytes. Larger ones: the blake2b-128 of the
    concatenated blake2b-128 digests of consecutive `piece_bytes` pieces (a two-level hash tree),
    so pieces hash in parallel threads; either way every byte counts.
    """
    path = Path(path)
    size = path.stat().st_size
    if size <= piece_bytes:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        pieces = [(s, min(s + piece_bytes, size)) for s in range(0, size, piece_bytes)]

        def one(se):
            return hashlib.blake2b(memoryview(mm[se[0]:se[1]]), digest_size=16).digest()

        n_threads = threads or min(len(pieces), max(1, len(os.sched_getaffinity(0))
                                                    if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
        with ThreadPoolExecutor(n_threads) as ex:
            digests = list(ex.map(one, pieces))
    finally:
        del mm
    return "tree:" + hashlib.blake2b(b"".join(digests), digest_size=16).hexdigest()


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the cache

class StaleEntry(Exception):
    """Internal: an entry failed verification (message says why)."""


class ArrayCache:
    """Named-array entries under `cache_dir`, keyed by `cache_key` (see the module docstring).

    The constructor creates `cache_dir` if needed and checks that it is writable, raising a
    ValueError naming it otherwise, so callers can fail before any expensive work.
    verify: "full" (checksum every byte on load) or "size" (headers, shapes and sizes only).
    """

    def __init__(self, cache_dir, *, verify: str = "full"):
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir: expected a path (str or os.PathLike), got {type(cache_dir).__name__}")
        if verify not in VERIFY:
            raise ValueError(f"verify: expected one of {', '.join(map(repr, VERIFY))}, got {verify!r}")
        self.root = Path(cache_dir)
        self.verify = verify
        self._check_writable()
        self._clean_orphans()

    def __repr__(self) -> str:
        return f"ArrayCache({str(self.root)!r}, verify={self.verify!r})"

    def _check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not self.root.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
            # A real write, not os.access: it is what the cache will do, and it is also right
            # for root (who passes os.access checks) on read-only file systems.
            fd, probe = tempfile.mkstemp(prefix=_TMP_PREFIX + "probe-", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"cache_dir: expected a writable directory, got {str(self.root)!r} "
                             f"({e.strerror or e})") from None

    def _clean_orphans(self) -> None:
        """Remove temporary directories left by crashed writers of this host (their pid is gone)."""
        host = socket.gethostname()
        for p in self.root.glob(_TMP_PREFIX + "*"):
            parts = p.name[len(_TMP_PREFIX):].split("@")
            if len(parts) != 3 or parts[0] != host:
                continue
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                shutil.rmtree(p, ignore_errors=True)
            except (ValueError, PermissionError):
                pass

    # ------------------------------------------------------------------ paths

    def path(self, stage: str, key: str) -> Path:
        """The directory of entry (stage, key), whether or not it exists."""
        return self.root / f"{_check_stage(stage)}-{key}"

    def staging_dir(self) -> Path:
        """A fresh empty temporary directory inside the cache (pass it to `put(..., staging=)` to
        write large arrays in place, e.g. as `knn_graph(out_dir=...)`). Removed by `put` or
        `discard_staging`; if the process dies, the next `ArrayCache` on this host removes it."""
        name = f"{_TMP_PREFIX}{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:12]}"
        p = self.root / name
        p.mkdir()
        return p

    @staticmethod
    def discard_staging(staging) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def get(self, stage: str, key: str, *, names=None, verify: str | None = None):
        """The arrays of entry (stage, key) as read-only memmaps, with its manifest:
        ``(arrays: dict[name, np.ndarray], manifest: dict)``, or None when absent or invalid
        (invalid entries are logged as a warning and removed). `names` limits the arrays loaded
        and verified."""
        path = self.path(stage, key)
        if not path.is_dir():
            return None
        verify = verify or self.verify
        try:
            return self._load(path, stage, key, names, verify)
        except StaleEntry as e:
            log.warning("cache: discarding entry %s (%s); it will be rebuilt", path, e)
            self.remove(stage, key)
            return None

    def _load(self, path, stage, key, names, verify):
        try:
            with open(path / _MANIFEST) as f:
                man = json.load(f)
            fmt, ver = man["format_version"], man["cm_engine_version"]
            entries = man["arrays"]
        except FileNotFoundError:
            raise StaleEntry("manifest.json is missing") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StaleEntry(f"manifest.json is unreadable: {e}") from None
        if fmt != FORMAT_VERSION or ver != _package_version():
            raise StaleEntry(f"written by cache format {fmt} / cm_engine {ver}, this is format "
                             f"{FORMAT_VERSION} / cm_engine {_package_version()}")
        if man.get("stage") != stage or man.get("key") != key:
            raise StaleEntry("manifest names another stage or key")
        want = list(entries) if names is None else list(names)
        out = {}
        for name in want:
            if name not in entries:
                raise StaleEntry(f"array {name!r} is not in the entry")
            meta = entries[name]
            f = path / meta["file"]
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                raise StaleEntry(f"{meta['file']} is missing") from None
            if size != meta["file_bytes"]:
                raise StaleEntry(f"{meta['file']} has {size} bytes, expected {meta['file_bytes']}")
            if verify == "full":
                got = file_checksum(f)
                if got != meta["blake2b"]:
                    raise StaleEntry(f"{meta['file']} checksum {got} != recorded {meta['blake2b']}")
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise StaleEntry(f"{meta['file']} is not a readable .npy ({e})") from None
            if list(arr.shape) != list(meta["shape"]) or str(arr.dtype) != meta["dtype"]:
                raise StaleEntry(f"{meta['file']} holds {arr.dtype}{list(arr.shape)}, expected "
                                 f"{meta['dtype']}{meta['shape']}")
            out[name] = arr
        return out, man

    def remove(self, stage: str, key: str) -> None:
        """Delete an entry (atomically hidden first by a rename, so readers never see half of it)."""
        path = self.path(stage, key)
        trash = self.root / f"{_TMP_PREFIX}{socket.gethostname()}@{os.getpid()}@trash-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("cache: could not remove %s (%s)", path, e)
            return
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ store

    def put(self, stage: str, key: str, arrays: dict, *, params=None, extra: dict | None = None,
            staging=None) -> Path:
        """Write `arrays` (name -> array) as entry (stage, key), atomically; returns its directory.

        Arrays already saved as ``<staging>/<name>.npy`` (memmaps opened there) are kept in place,
        the others are written there. params / extra: recorded in the manifest (JSON-able).
        If a complete entry for the key appears meanwhile (another process), it is kept.
        """
        _check_stage(stage)
        staging = Path(staging) if staging is not None else self.staging_dir()
        try:
            man_arrays = {}
            for name, arr in arrays.items():
                if not isinstance(name, str) or not name.isidentifier():
                    raise ValueError(f"arrays: expected identifier names, got {name!r}")
                f = staging / f"{name}.npy"
                if isinstance(arr, np.memmap) and arr.filename and Path(arr.filename).resolve() == f.resolve():
                    arr.flush()
                else:
                    with open(f, "wb") as fh:
                        np.save(fh, np.asarray(arr), allow_pickle=False)
                _fsync_path(f)
                a = np.load(f, mmap_mode="r", allow_pickle=False)
                man_arrays[name] = {"file": f.name, "shape": list(a.shape), "dtype": str(a.dtype),
                                    "file_bytes": f.stat().st_size, "blake2b": file_checksum(f)}
                del a
            manifest = {"format_version": FORMAT_VERSION, "cm_engine_version": _package_version(),
                        "stage": stage, "key": key, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "params": json.loads(canonical_json(params)), "extra": extra or {},
                        "arrays": man_arrays}
            with open(staging / _MANIFEST, "w") as fh:
                fh.write(json.dumps(manifest, indent=1, sort_keys=True))
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_path(staging, directory=True)
            target = self.path(stage, key)
            if target.exists() and self.get(stage, key, verify="size") is not None:
                self.discard_staging(staging)  # a complete entry is already there: first wins
                return target
            try:
                os.rename(staging, target)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # Another writer renamed its entry in first (or a broken one is in the way).
                if self.get(stage, key, verify="size") is None:
                    self.remove(stage, key)
                    try:
                        os.rename(staging, target)
                    except OSError as e2:
                        if e2.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                            raise
                        self.discard_staging(staging)
                else:
                    self.discard_staging(staging)
            _fsync_path(self.root, directory=True)
            log.info("cache: stored %s", target)
            return target
        except BaseException:
            self.discard_staging(staging)
            raise
