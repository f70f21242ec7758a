"""The on-disk array cache: keys, round trip, verification (corruption -> warning + miss),
atomic writes, unwritable directories, concurrent writers, reuse across processes."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import cm_engine
from cm_engine import cache as C
from cm_engine.cache import ArrayCache, cache_key, file_checksum


@dataclasses.dataclass(frozen=True)
class P:
    k: int = 16
    metric: str = "cosine"
    eps: float | None = None


def _arrays(seed=0, n=1000):
    rng = np.random.default_rng(seed)
    return {"idx": rng.integers(-1, n, size=(n, 7)).astype(np.int32),
            "dist": rng.random((n, 7), dtype=np.float32),
            "h": np.sort(rng.random(n)).astype(np.float64)}


def _tmp_dirs(root: Path):
    return [p for p in root.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture
def cache(tmp_path):
    return ArrayCache(tmp_path / "cache")


# ----------------------------------------------------------------------------- keys

def test_key_deterministic_and_sensitive(monkeypatch):
    k = cache_key("fp", "knn_graph", P())
    assert k == cache_key("fp", "knn_graph", P(k=16, metric="cosine"))
    others = {cache_key("fp2", "knn_graph", P()), cache_key("fp", "hac_merges", P()),
              cache_key("fp", "knn_graph", P(k=17)), cache_key("fp", "knn_graph", P(eps=0.5)),
              cache_key("fp", "knn_graph", P(metric="l2"))}
    assert k not in others and len(others) == 5
    monkeypatch.setattr(cm_engine, "__version__", "999.0")
    assert cache_key("fp", "knn_graph", P()) != k
    monkeypatch.undo()
    monkeypatch.setattr(C, "FORMAT_VERSION", C.FORMAT_VERSION + 1)
    assert cache_key("fp", "knn_graph", P()) != k


def test_canonical_json_is_order_free_and_rejects_objects():
    assert C.canonical_json({"b": 1, "a": (1.5, None)}) == '{"a":[1.5,null],"b":1}'
    assert C.canonical_json(P(eps=np.float64(0.1))) == C.canonical_json(P(eps=0.1))
    with pytest.raises(TypeError, match="params"):
        cache_key("fp", "s", {"x": object()})
    with pytest.raises(ValueError, match="stage"):
        cache_key("fp", "../evil", P())
    with pytest.raises(ValueError, match="fingerprint"):
        cache_key("", "s", P())


# ----------------------------------------------------------------------------- round trip

def test_round_trip(cache):
    arrs = _arrays()
    key = cache_key("fp", "st", P())
    assert cache.get("st", key) is None
    path = cache.put("st", key, arrs, params=P(), extra={"n": 1000})
    assert path == cache.path("st", key) and path.is_dir()
    got, man = cache.get("st", key)
    assert set(got) == set(arrs)
    for name, a in arrs.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape
        np.testing.assert_array_equal(got[name], a)
        assert isinstance(got[name], np.memmap) and not got[name].flags.writeable
    assert man["params"] == {"__type__": "P", "k": 16, "metric": "cosine", "eps": None}
    assert man["extra"] == {"n": 1000} and man["format_version"] == C.FORMAT_VERSION
    assert man["cm_engine_version"] == cm_engine.__version__
    only, _ = cache.get("st", key, names=["h"])
    assert list(only) == ["h"]
    assert not _tmp_dirs(cache.root)


def test_staged_memmaps_are_kept_in_place(cache):
    staging = cache.staging_dir()
    mm = np.lib.format.open_memmap(staging / "x.npy", mode="w+", dtype=np.float32, shape=(100, 3))
    mm[:] = np.arange(300, dtype=np.float32).reshape(100, 3)
    key = cache_key("fp", "st", P())
    cache.put("st", key, {"x": mm, "y": np.arange(5)}, staging=staging)
    assert not staging.exists()
    got, _ = cache.get("st", key)
    np.testing.assert_array_equal(got["x"], np.arange(300, dtype=np.float32).reshape(100, 3))
    np.testing.assert_array_equal(mm, got["x"])  # the staged memmap still reads (same inode)


def test_cross_process_reuse(tmp_path):
    root = tmp_path / "c"
    code = ("import numpy as np, sys; from cm_engine.cache import ArrayCache, cache_key;"
            "c = ArrayCache(sys.argv[1]); k = cache_key('fp', 'st', {'a': 1});"
            "c.put('st', k, {'x': np.arange(10.0)}); print(k)")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True)
    key = out.stdout.strip().splitlines()[-1]
    assert key == cache_key("fp", "st", {"a": 1})
    got, _ = ArrayCache(root).get("st", key)
    np.testing.assert_array_equal(got["x"], np.arange(10.0))


# ----------------------------------------------------------------------------- checksums

def test_file_checksum_tree_matches_reference(tmp_path):
    f = tmp_path / "blob"
    data = np.random.default_rng(1).bytes(10_000)
    f.write_bytes(data)
    assert file_checksum(f) == hashlib.blake2b(data, digest_size=16).hexdigest()
    piece = 1024
    ref = hashlib.blake2b(b"".join(hashlib.blake2b(data[s:s + piece], digest_size=16).digest()
                                   for s in range(0, len(data), piece)), digest_size=16).hexdigest()
    assert file_checksum(f, piece_bytes=piece) == "tree:" + ref
    assert file_checksum(f, piece_bytes=piece, threads=1) == "tree:" + ref
    flipped = bytearray(data)
    flipped[7777] ^= 1
    f.write_bytes(bytes(flipped))
    assert file_checksum(f, piece_bytes=piece) != "tree:" + ref


# ----------------------------------------------------------------------------- corruption

def _corrupt_flip(path: Path):
    f = path / "dist.npy"
    b = bytearray(f.read_bytes())
    b[-100] ^= 0xFF  # in the data, after the header: size and header stay valid
    f.write_bytes(bytes(b))


def _corrupt_truncate(path: Path):
    f = path / "idx.npy"
    f.write_bytes(f.read_bytes()[:-64])


def _corrupt_delete(path: Path):
    (path / "h.npy").unlink()


def _corrupt_manifest(path: Path):
    (path / "manifest.json").write_text("{not json")


def _corrupt_no_manifest(path: Path):
    (path / "manifest.json").unlink()


def _change(field, value):
    def f(path: Path):
        man = json.loads((path / "manifest.json").read_text())
        man[field] = value
        (path / "manifest.json").write_text(json.dumps(man))
    return f


def _corrupt_shape(path: Path):
    man = json.loads((path / "manifest.json").read_text())
    man["arrays"]["h"]["shape"] = [999]
    (path / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("damage, why", [
    (_corrupt_flip, "checksum"), (_corrupt_truncate, "bytes"), (_corrupt_delete, "missing"),
    (_corrupt_manifest, "unreadable"), (_corrupt_no_manifest, "missing"),
    (_change("format_version", C.FORMAT_VERSION + 1), "format"),
    (_change("cm_engine_version", "0.0.0-other"), "cm_engine 0.0.0-other"),
    (_change("key", "deadbeef"), "another stage or key"), (_corrupt_shape, "expected"),
])
def test_damaged_entry_warns_and_misses(cache, caplog, damage, why):
    arrs = _arrays()
    key = cache_key("fp", "st", P())
    path = cache.put("st", key, arrs)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="cm_engine"):
        assert cache.get("st", key) is None
    assert any(why in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records), caplog.text
    assert not path.exists()  # removed, so the rebuild can take its place
    cache.put("st", key, arrs)  # rebuild
    got, _ = cache.get("st", key)
    for name, a in arrs.items():
        np.testing.assert_array_equal(got[name], a)
    assert not _tmp_dirs(cache.root)


def test_size_verification_skips_checksum_but_catches_truncation(tmp_path):
    key = cache_key("fp", "st", P())
    c = ArrayCache(tmp_path, verify="size")
    path = c.put("st", key, _arrays())
    _corrupt_flip(path)
    assert c.get("st", key) is not None  # documented: "size" does not read the data
    assert c.get("st", key, verify="full") is None
    path = c.put("st", key, _arrays())
    _corrupt_truncate(path)
    assert c.get("st", key) is None


# ----------------------------------------------------------------------------- writability

def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, so nothing can be created below it (even by root)")
    for bad in (blocker / "sub", blocker):
        with pytest.raises(ValueError, match="cache_dir.*writable.*file.txt"):
            ArrayCache(bad)
    with pytest.raises(TypeError, match="cache_dir"):
        ArrayCache(3)
    with pytest.raises(ValueError, match="verify"):
        ArrayCache(tmp_path, verify="sometimes")


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses directory permissions")
def test_read_only_dir_for_non_root(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="cache_dir"):
            ArrayCache(d)
    finally:
        d.chmod(0o700)


# ----------------------------------------------------------------------------- atomicity

def test_failed_write_leaves_nothing(cache, monkeypatch):
    key = cache_key("fp", "st", P())
    calls = {"n": 0}
    real = C.file_checksum

    def failing(path, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(path, **kw)

    monkeypatch.setattr(C, "file_checksum", failing)
    with pytest.raises(OSError, match="simulated"):
        cache.put("st", key, _arrays())
    assert not cache.path("st", key).exists()
    assert cache.get("st", key) is None
    assert not _tmp_dirs(cache.root)


def test_orphaned_staging_dirs_of_dead_writers_are_cleaned(tmp_path):
    c = ArrayCache(tmp_path)
    orphan = c.staging_dir()
    (orphan / "half.npy").write_bytes(b"partial")
    dead_pid = 2**22 + 12345  # above the default pid_max
    dead = orphan.with_name(orphan.name.replace(f"@{os.getpid()}@", f"@{dead_pid}@"))
    orphan.rename(dead)
    live = c.staging_dir()  # ours: the process is alive, so it must survive
    ArrayCache(tmp_path)
    assert not dead.exists() and live.exists()
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")]  # no entry visible


def test_concurrent_writers_and_readers(tmp_path):
    c = ArrayCache(tmp_path)
    key = cache_key("fp", "st", P())
    arrs = _arrays(n=20_000)
    errors, seen = [], []

    def writer():
        try:
            for _ in range(5):
                ArrayCache(tmp_path).put("st", key, arrs)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader():
        try:
            for _ in range(40):
                got = c.get("st", key)
                if got is not None:
                    np.testing.assert_array_equal(got[0]["dist"], arrs["dist"])
                    seen.append(1)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got, _ = c.get("st", key)
    np.testing.assert_array_equal(got["idx"], arrs["idx"])
    assert not _tmp_dirs(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"st-{key}"]
