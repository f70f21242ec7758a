"""Margin scores: fused numba kernel and eager torch path against a float64 numpy reference."""
import numpy as np
import pytest
import torch

from cm_engine.margin import default_sum_tol, margin_scores
from cm_engine.pool import save_npy

KERNELS = ["fused", "torch"]


# ---------------------------------------------------------------- slow, obviously-correct reference

def ref_margin(z, *, from_logits=True, multilabel=False, reduce="min"):
    """float64 numpy: softmax (or the given probabilities), sort, top-1 minus top-2; multi-label
    |tanh(z/2)| = |2 sigmoid(z) - 1| (or |2p - 1|) reduced over classes."""
    z = np.asarray(z, dtype=np.float64)
    if multilabel:
        t = np.abs(np.tanh(z / 2)) if from_logits else np.abs(2 * z - 1)
        return t.min(axis=1) if reduce == "min" else t.mean(axis=1)
    if from_logits:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    else:
        p = z
    ps = np.sort(p, axis=1)
    return ps[:, -1] - ps[:, -2]


def extreme_logits(n=600, c=23, seed=0):
    """Rows of every scale from 1e-3 to 1e4, shifted far negative, with ties and huge gaps."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 4, size=(n, 1))
    z = rng.normal(size=(n, c)) * scale
    z[: n // 6] -= 2e4  # large negative offsets (still inside float16's range)
    z[n // 6: n // 5] = np.round(z[n // 6: n // 5])  # many exact ties
    z[n // 5: n // 4, :2] = z[n // 5: n // 4, :2].max(axis=1, keepdims=True) + 1  # tied top-2
    z[n // 4: n // 4 + 10] = 3.0  # all equal
    z[n // 4 + 10: n // 4 + 20, 5] += 3e4  # one logit far above the rest
    return z


def as_dtype(z, dtype):
    """(input in that dtype, the exact float64 values it holds)."""
    if dtype == "bfloat16":
        t = torch.from_numpy(z).to(torch.bfloat16)
        return t, t.double().numpy()
    a = z.astype(dtype)
    return a, a.astype(np.float64)


DTYPES = ["float16", "bfloat16", "float32", "float64"]
# Everything but float64 is scored in float32: ~1e-7 per term; float64 only loses the final cast.
TOL = {"float16": 2e-6, "bfloat16": 2e-6, "float32": 2e-6, "float64": 2e-7}


def _np(s):
    return s.cpu().numpy() if isinstance(s, torch.Tensor) else s


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multiclass_logits_match_float64_reference(dtype, kernel):
    x, exact = as_dtype(extreme_logits(), dtype)
    got = margin_scores(x, kernel=kernel)
    assert _np(got).dtype == np.float32 and got.shape == (len(exact),)
    want = ref_margin(exact)
    np.testing.assert_allclose(_np(got), want, rtol=0, atol=TOL[dtype])
    assert np.all(_np(got)[want == 0] == 0)  # exact ties give exactly 0
    n = len(exact)
    assert np.all(_np(got)[n // 4 + 10: n // 4 + 20] == 1)  # a logit 3e4 above the rest


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["min", "mean"])
def test_multilabel_logits_match_reference(dtype, kernel, reduce):
    z = extreme_logits(n=300, c=9, seed=1)
    z[:40] *= 1e-3  # |z| around 1e-6..1e1 exercises the small-|z| series of tanh
    x, exact = as_dtype(z, dtype)
    got = _np(margin_scores(x, multilabel=True, reduce=reduce, kernel=kernel))
    np.testing.assert_allclose(got, ref_margin(exact, multilabel=True, reduce=reduce), rtol=1e-6,
                               atol=TOL[dtype])


def _probs(n, c, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-2, 2, size=(n, 1))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    p[:10, :2] = 0.5  # exact ties, margin 0
    p[:10, 2:] = 0
    return p


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multiclass_probabilities(dtype, kernel):
    x, exact = as_dtype(_probs(400, 17, 2), dtype)
    got = _np(margin_scores(x, from_logits=False, kernel=kernel))
    np.testing.assert_allclose(got, ref_margin(exact, from_logits=False), rtol=0, atol=TOL[dtype])
    assert np.all(got[:10] == 0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("reduce", ["min", "mean"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_multilabel_probabilities(dtype, kernel, reduce):
    rng = np.random.default_rng(3)
    p = rng.uniform(size=(300, 6))
    p[:5, 0] = 0.5
    p[5:10] = np.where(rng.uniform(size=(5, 6)) < 0.5, 0.0, 1.0)
    x, exact = as_dtype(p, dtype)
    got = _np(margin_scores(x, from_logits=False, multilabel=True, reduce=reduce, kernel=kernel))
    want = ref_margin(exact, from_logits=False, multilabel=True, reduce=reduce)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype])
    if reduce == "min":
        assert np.all(got[:5] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_equals_torch(dtype):
    rng = np.random.default_rng(4)
    z = rng.normal(size=(5000, 40)) * 4  # > 2048 rows: several parallel chunks
    x, _ = as_dtype(z, dtype)
    for kw in ({}, {"multilabel": True}, {"multilabel": True, "reduce": "mean"}):
        a = _np(margin_scores(x, kernel="fused", **kw))
        b = _np(margin_scores(x, kernel="torch", **kw))
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("kernel", KERNELS)
def test_chunked_equals_unchunked(kernel):
    x = (np.random.default_rng(5).normal(size=(3001, 30)) * 5).astype(np.float16)
    whole = margin_scores(x, kernel=kernel, budget_bytes=2**30)
    for budget in (70 * 60, 1000 * 60 + 1):  # 70 rows, 1000 rows per block
        np.testing.assert_array_equal(margin_scores(x, kernel=kernel, budget_bytes=budget), whole)
    np.testing.assert_array_equal(margin_scores(x[:50], kernel=kernel, budget_bytes=1), whole[:50])


def test_auto_is_fused_on_cpu():
    x = np.random.default_rng(6).normal(size=(100, 5)).astype(np.float32)
    np.testing.assert_array_equal(margin_scores(x), margin_scores(x, kernel="fused"))
    np.testing.assert_array_equal(margin_scores(x, device="cpu"), margin_scores(x, kernel="fused"))


# ---------------------------------------------------------------- sources

def test_npy_memmap_and_path(tmp_path):
    x = (np.random.default_rng(7).normal(size=(2500, 12)) * 3).astype(np.float16)
    np.save(tmp_path / "l.npy", x)
    want = margin_scores(x)
    for src in (tmp_path / "l.npy", str(tmp_path / "l.npy"), np.load(tmp_path / "l.npy", mmap_mode="r")):
        for kernel in KERNELS:
            np.testing.assert_array_equal(margin_scores(src, kernel=kernel, budget_bytes=24 * 300),
                                          margin_scores(x, kernel=kernel))
    # Pages of the mapping are released after each block: the file and the mapping are intact.
    m = np.load(tmp_path / "l.npy", mmap_mode="r")
    np.testing.assert_array_equal(margin_scores(m, budget_bytes=24 * 100), want)
    np.testing.assert_array_equal(np.asarray(m), x)
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), x)


def test_in_memory_arrays_are_left_untouched():
    # The page release must never touch anonymous memory (MADV_DONTNEED would zero it).
    x = np.random.default_rng(8).normal(size=(8000, 25)).astype(np.float32)
    y = x.copy()
    margin_scores(x, budget_bytes=4096 * 8)
    margin_scores(x, budget_bytes=4096 * 8, kernel="torch")
    np.testing.assert_array_equal(x, y)


def test_shard_directory(tmp_path):
    x = (np.random.default_rng(9).normal(size=(1000, 8)) * 2).astype(np.float32)
    d = tmp_path / "shards"
    d.mkdir()
    for i, (a, b) in enumerate([(0, 1), (1, 400), (400, 401), (401, 1000)]):
        np.save(d / f"part-{i:03d}.npy", x[a:b])
    for kernel in KERNELS:
        want = margin_scores(x, kernel=kernel)
        for budget in (None, 8 * 4 * 64):
            np.testing.assert_array_equal(margin_scores(d, kernel=kernel, budget_bytes=budget), want)


def test_bfloat16_sidecar_file_and_shards(tmp_path):
    t = (torch.randn(700, 10) * 8).bfloat16()
    save_npy(tmp_path / "b.npy", t)
    want = ref_margin(t.double().numpy())
    for kernel in KERNELS:
        np.testing.assert_allclose(margin_scores(tmp_path / "b.npy", kernel=kernel, budget_bytes=20 * 64),
                                   want, rtol=0, atol=2e-6)
    d = tmp_path / "bs"
    d.mkdir()
    save_npy(d / "a.npy", t[:300])
    save_npy(d / "b.npy", t[300:])
    (d / "pool.json").write_text('{"dtype": "bfloat16"}')
    for p in d.glob("*.npy.json"):
        p.unlink()
    np.testing.assert_allclose(margin_scores(d, budget_bytes=20 * 64), want, rtol=0, atol=2e-6)


def test_torch_tensor_in_torch_tensor_out():
    t = torch.randn(300, 7, dtype=torch.float64, requires_grad=True)
    for kernel in KERNELS:
        s = margin_scores(t, kernel=kernel)
        assert isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.device == t.device
        np.testing.assert_allclose(s.numpy(), ref_margin(t.detach().numpy()), rtol=0, atol=2e-7)
    # Non-contiguous tensors and arrays are fine.
    tt = torch.randn(10, 300).t()
    np.testing.assert_allclose(margin_scores(tt).numpy(), ref_margin(tt.numpy()), atol=2e-6)
    a = np.asfortranarray(np.random.default_rng(0).normal(size=(300, 7)))
    np.testing.assert_allclose(margin_scores(a), ref_margin(a), atol=2e-7)


def test_list_input_and_single_row():
    np.testing.assert_allclose(margin_scores([[0.0, np.log(3.0)]]), [0.5], atol=1e-6)
    assert margin_scores([[1.0]], multilabel=True)[0] == pytest.approx(np.tanh(0.5), abs=1e-6)


@pytest.mark.gpu
def test_cuda_tensor_matches_cpu():
    x = torch.randn(5000, 100, device="cuda").half() * 8
    s = margin_scores(x)
    assert s.device.type == "cuda"
    np.testing.assert_allclose(s.cpu().numpy(), margin_scores(x.cpu(), kernel="fused").numpy(), atol=2e-6)
    np.testing.assert_allclose(margin_scores(x.cpu().numpy(), device="cuda"), s.cpu().numpy(), atol=2e-6)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_names_argument_and_first_row(dtype, kernel, bad):
    z = np.random.default_rng(10).normal(size=(5000, 6))
    z[3100, 2] = bad
    z[4000, 0] = np.nan
    x, _ = as_dtype(z, dtype)
    for budget in (None, 6 * 8 * 1000):  # the bad row inside a later block reports its global row
        with pytest.raises(ValueError, match=r"^outputs: expected finite logits.*row 3100$"):
            margin_scores(x, kernel=kernel, budget_bytes=budget)
    p = np.random.default_rng(11).uniform(size=(5000, 6))
    p /= p.sum(axis=1, keepdims=True)
    p[3100, 2] = bad
    p[4000, 0] = np.nan
    x, _ = as_dtype(p, dtype)
    for multilabel in (True, False):
        with pytest.raises(ValueError, match=r"^outputs: expected finite probabilities.*row 3100$"):
            margin_scores(x, kernel=kernel, from_logits=False, multilabel=multilabel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bad_probabilities(kernel):
    p = _probs(50, 5, 11)
    q = p.copy()
    q[7, 0] = -0.25
    with pytest.raises(ValueError, match=r"outputs: expected probabilities in \[0, 1\].*row 7"):
        margin_scores(q, from_logits=False, kernel=kernel)
    q = p.copy()
    q[9, 0] = 1.5
    with pytest.raises(ValueError, match=r"outputs: expected probabilities in \[0, 1\].*row 9"):
        margin_scores(q, from_logits=False, multilabel=True, kernel=kernel)
    q = p.copy()
    q[12] *= 0.9
    with pytest.raises(ValueError, match=r"outputs: expected every row of probabilities to sum to 1.*row 12"):
        margin_scores(q, from_logits=False, kernel=kernel)
    # Multi-label probabilities need not sum to 1; a looser sum_tol accepts the row.
    margin_scores(q, from_logits=False, multilabel=True, kernel=kernel)
    margin_scores(q, from_logits=False, kernel=kernel, sum_tol=0.2)
    # float16 rounding of a valid softmax is within the default tolerance.
    margin_scores(p.astype(np.float16), from_logits=False, kernel=kernel)
    assert default_sum_tol(np.float16) > 2e-3 > default_sum_tol(np.float32)


@pytest.mark.parametrize("kernel", KERNELS)
def test_shape_errors(kernel):
    with pytest.raises(ValueError, match=r"outputs: expected a 2-D array, got shape \(5,\)"):
        margin_scores(np.zeros(5, np.float32), kernel=kernel)
    with pytest.raises(ValueError, match=r"outputs: expected a 2-D array"):
        margin_scores(np.zeros((2, 3, 4), np.float32), kernel=kernel)
    with pytest.raises(ValueError, match=r"outputs: expected at least one row"):
        margin_scores(np.zeros((0, 4), np.float32), kernel=kernel)
    with pytest.raises(ValueError, match=r"outputs: expected at least 2 class.*got shape \(3, 1\)"):
        margin_scores(np.zeros((3, 1), np.float32), kernel=kernel)
    with pytest.raises(ValueError, match=r"outputs: expected at least 1 class"):
        margin_scores(np.zeros((3, 0), np.float32), multilabel=True, kernel=kernel)


def test_argument_errors(tmp_path):
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"reduce: expected one of 'min', 'mean', got 'max'"):
        margin_scores(x, multilabel=True, reduce="max")
    with pytest.raises(ValueError, match=r"kernel: expected one of"):
        margin_scores(x, kernel="triton")
    with pytest.raises(TypeError, match=r"from_logits: expected True or False, got 'yes'"):
        margin_scores(x, from_logits="yes")
    with pytest.raises(TypeError, match=r"multilabel: expected True or False"):
        margin_scores(x, multilabel=1)
    with pytest.raises(TypeError, match=r"outputs: expected floating-point .* got dtype int64"):
        margin_scores(np.zeros((4, 3), np.int64))
    with pytest.raises(TypeError, match=r"outputs: expected floating-point"):
        margin_scores(torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"outputs: expected a numpy array"):
        margin_scores({"a": 1})
    with pytest.raises(ValueError, match=r"outputs: expected an existing \.npy"):
        margin_scores(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match=r"outputs: expected a readable \.npy"):
        margin_scores(tmp_path / "junk.npy")
    with pytest.raises(ValueError, match=r"budget_bytes: expected a positive number"):
        margin_scores(x, budget_bytes=-1)
    with pytest.raises(ValueError, match=r"sum_tol: expected a number in \[0, 1\)"):
        margin_scores(x, from_logits=False, sum_tol=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: 'cuda' requested"):
            margin_scores(x, device="cuda")
    else:
        with pytest.raises(ValueError, match=r"kernel: 'fused' runs on the CPU only"):
            margin_scores(x, device="cuda", kernel="fused")


def test_mapped_pages_are_released_after_each_block(tmp_path):
    # Streaming a memory-mapped pool must not leave the whole file resident in this process.
    psutil = pytest.importorskip("psutil")
    x = np.random.default_rng(12).standard_normal((96_000, 200), dtype=np.float32).astype(np.float16)
    np.save(tmp_path / "big.npy", x)  # 38 MB
    del x
    proc = psutil.Process()
    for kernel in KERNELS:
        m = np.load(tmp_path / "big.npy", mmap_mode="r")
        margin_scores(m[:5000], kernel=kernel, budget_bytes=8 * 2**20)  # JIT/torch warm-up
        before = proc.memory_info().rss
        margin_scores(m, kernel=kernel, budget_bytes=8 * 2**20)
        grown = proc.memory_info().rss - before
        assert grown < 12 * 2**20, f"{kernel}: RSS grew by {grown / 2**20:.1f} MiB"
