"""Pools: memory-mapped .npy, shard directories, bfloat16 sidecar, blocks, fingerprints, bad files."""
import numpy as np
import pytest
import torch

from cm_engine._device import rows_per_block
from cm_engine.pool import Pool, ShardedArray, fingerprint, open_array, save_npy
from cm_engine.synthetic import PoolSpec, generate_block, make_pool


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(size=(1003, 7)).astype(np.float32)


def _shard(tmp_path, x, cuts):
    d = tmp_path / "shards"
    d.mkdir()
    for i, (a, b) in enumerate(zip([0] + cuts, cuts + [len(x)])):
        np.save(d / f"part-{i:03d}.npy", x[a:b])
    return d


def test_npy_is_memory_mapped_and_blocks_cover_it(tmp_path, x):
    np.save(tmp_path / "x.npy", x)
    pool = Pool(tmp_path / "x.npy")
    assert isinstance(pool.array, np.memmap)
    assert pool.shape == x.shape and pool.n == len(x)
    blocks = list(pool.iter_blocks(rows=100))
    assert [b[0] for b in blocks] == list(range(0, len(x), 100))
    np.testing.assert_array_equal(torch.cat([b for _, _, b in blocks]).numpy(), x)


def test_block_size_comes_from_byte_budget(x):
    pool = Pool(x)
    ranges = pool.block_ranges(budget=7 * 4 * 50)
    assert all(e - s == 50 for s, e in ranges[:-1])
    assert rows_per_block(28, 7 * 4 * 50) == 50


def test_shard_directory_reads_as_one_pool(tmp_path, x):
    d = _shard(tmp_path, x, [10, 500, 501])
    pool = Pool(d)
    assert isinstance(pool.array, ShardedArray) and pool.shape == x.shape
    for s, e in [(0, 1003), (5, 15), (499, 502), (500, 501), (1000, 1003)]:
        np.testing.assert_array_equal(pool.read(s, e), x[s:e])
    idx = np.array([1002, 0, 500, 10, 9])
    np.testing.assert_array_equal(pool.array[idx], x[idx])
    assert pool.fingerprint() == Pool(x).fingerprint()


def test_shards_must_agree(tmp_path, x):
    d = tmp_path / "bad"
    d.mkdir()
    np.save(d / "a.npy", x)
    np.save(d / "b.npy", x[:, :3])
    with pytest.raises(ValueError, match="trailing shape"):
        Pool(d)


def test_bfloat16_sidecar_round_trip(tmp_path):
    t = torch.randn(50, 4).bfloat16()
    save_npy(tmp_path / "b.npy", t)
    pool = Pool(tmp_path / "b.npy")
    assert pool.dtype == "bfloat16" and pool.itemsize == 2
    got = pool.block(0, 50)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, t)
    assert torch.equal(pool.block(3, 9, dtype=torch.float32), t[3:9].float())


def test_fingerprint_sees_content_shape_and_dtype(x):
    fp = fingerprint(x)
    assert fp == fingerprint(x.copy())
    y = x.copy()
    y[0, 0] += 1
    assert fingerprint(y) != fp
    assert fingerprint(x[:-1]) != fp
    assert fingerprint(x.astype(np.float16)) != fingerprint(x.astype(np.float16).view(np.int16))
    z = x.copy()
    z[500, 3] += 1  # between sampled runs of the default fingerprint: only the full hash sees it
    assert Pool(z).fingerprint(full=True) != Pool(x).fingerprint(full=True)


@pytest.mark.parametrize("content", [b"", b"not a numpy file at all", None])
def test_bad_files_are_named(tmp_path, x, content):
    p = tmp_path / "bad.npy"
    if content is None:  # truncated: a valid header, half the data
        np.save(p, x)
        raw = p.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
    else:
        p.write_bytes(content)
    with pytest.raises(ValueError, match="embeddings: expected a readable .npy"):
        Pool(p)


def test_missing_path_and_wrong_type():
    with pytest.raises(ValueError, match="logits: expected an existing"):
        open_array("/nonexistent/x.npy", name="logits")
    with pytest.raises(TypeError, match="scores: expected a numpy array"):
        open_array(3.5, name="scores")


def test_save_npy_is_atomic_and_leaves_no_temp(tmp_path, x):
    save_npy(tmp_path / "o.npy", x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), x)


def test_synthetic_pool_is_deterministic_and_blockwise(tmp_path):
    spec = PoolSpec(n=3000, d=16, seed=3)
    p1 = make_pool(tmp_path / "a.npy", spec, block_rows=1000)
    p2 = make_pool(tmp_path / "b.npy", spec, block_rows=1000)
    a, b = np.load(p1), np.load(p2)
    np.testing.assert_array_equal(a, b)
    blk, comp = generate_block(spec, 1000, 2000)
    np.testing.assert_array_equal(a[1000:2000], blk)
    assert np.isfinite(a).all() and (comp >= -1).all()
    assert not np.array_equal(a, np.load(make_pool(tmp_path / "c.npy", PoolSpec(n=3000, d=16, seed=4))))


def _rss_file_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return None


@pytest.mark.skipif(_rss_file_kb() is None, reason="needs /proc/self/status (Linux)")
def test_release_drops_mapped_pages_and_keeps_the_data(tmp_path):
    # 48 MB pool: a streaming pass with release=True must leave (almost) none of it resident,
    # and the rows must read back unchanged afterwards (pages come back from the page cache).
    x = np.random.default_rng(0).random((96_000, 125), dtype=np.float32)
    np.save(tmp_path / "p.npy", x)
    pool = Pool(tmp_path / "p.npy")
    before = _rss_file_kb()
    total = sum(float(b.sum()) for _s, _e, b in pool.iter_blocks(rows=7_001))
    kept = _rss_file_kb() - before
    assert kept > 30_000  # the pass without release leaves the pool resident
    assert pool.release(0, pool.n)
    assert _rss_file_kb() - before < 8_000
    pool2 = Pool(tmp_path / "p.npy")
    base2 = _rss_file_kb()
    total2 = sum(float(b.sum()) for _s, _e, b in pool2.iter_blocks(rows=7_001, release=True))
    assert _rss_file_kb() - base2 < 8_000
    assert total2 == total
    np.testing.assert_array_equal(np.asarray(pool2.array), x)
    # Sources that are not whole-file memmaps: nothing to release.
    assert not Pool(x).release(0, 10)
    assert not pool2.release(5, 5)
