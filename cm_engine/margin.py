"""Margin scores of model outputs, streamed in row blocks: one fused pass per block.

`margin_scores` turns outputs [N, C] (logits or probabilities) into float32 [N]; lower is
more uncertain:

* multi-class: p1 - p2 of the softmax, computed as (1 - exp(z2 - z1)) / sum_j exp(z_j - z1)
  (z1 >= z2 the two largest logits), which neither overflows nor underflows for logits of any
  magnitude; from probabilities, p1 - p2 directly;
* multi-label: per class |2 sigmoid(z) - 1| = |tanh(z / 2)| (or |2p - 1|), reduced over the
  classes by "min" (default) or "mean".

Two kernels compute the same thing (`kernel=`):

* "fused" (CPU): a numba kernel that reads the stored bytes (float16, bfloat16, float32,
  float64) and, per row, makes a few passes over the row while it sits in L1: decode to
  float32 plus an integer sort key and the row maximum, then the second largest, then the
  exponential sum. numba cannot vectorise float max-reductions, so top-2 runs on integer keys
  (the IEEE bits with the negative range flipped, which order like the floats), and exp is a
  vectorisable polynomial (about 1 ulp). The finite check rides along in the first pass on the
  exponent bits, so validation costs no extra pass. float64 input takes a plain scalar float64
  kernel (correct, not tuned).
* "torch": eager torch ops on the chosen device, block by block. It is the reference for the
  fused kernel, the fallback, and the path on CUDA (the same code runs on the CPU in the tests).

"auto" picks "fused" on the CPU and "torch" on CUDA.
"""
from __future__ import annotations

import ctypes
import logging
import math
import mmap

import numpy as np
import torch

from ._device import budget_bytes as _budget_bytes, log_memory_estimate, resolve_device
from ._validate import check_choice, check_ndim
from .pool import Pool, ShardedArray, _BF16

log = logging.getLogger("cm_engine")

__all__ = ["margin_scores"]

_REDUCES = ("min", "mean")
_KERNELS = ("auto", "fused", "torch")

# Row modes shared by both kernels.
_MC_LOGITS, _MC_PROBS, _ML_LOGITS_MIN, _ML_LOGITS_MEAN, _ML_PROBS_MIN, _ML_PROBS_MEAN = range(6)
# Per-row status codes reported by the kernels (0 = fine).
_OK, _NONFINITE, _OUT_OF_RANGE, _BAD_SUM = 0, 1, 2, 3


def _mode(from_logits: bool, multilabel: bool, reduce: str) -> int:
    if not multilabel:
        return _MC_LOGITS if from_logits else _MC_PROBS
    if from_logits:
        return _ML_LOGITS_MIN if reduce == "min" else _ML_LOGITS_MEAN
    return _ML_PROBS_MIN if reduce == "min" else _ML_PROBS_MEAN


def default_sum_tol(dtype) -> float:
    """Tolerance on |row sum - 1| for probabilities: storage rounding moves a row sum by at most
    half an ulp of the dtype (the rounding errors scale with p and the p sum to 1), so the
    default is 4 ulps of the stored dtype, and never below 1e-4 (a float32 softmax over many
    classes)."""
    if dtype == "bfloat16" or dtype == torch.bfloat16:
        eps = 2.0 ** -7
    elif isinstance(dtype, torch.dtype):
        eps = torch.finfo(dtype).eps
    else:
        eps = float(np.finfo(np.dtype(dtype)).eps)
    return max(1e-4, 4.0 * eps)


# ----------------------------------------------------------------------------------------------
# The fused CPU kernels (numba). Compiled lazily on first use and cached on disk.
# ----------------------------------------------------------------------------------------------

try:  # numba is a dependency; the torch kernel keeps working without it
    import numba
    from numba import prange, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover
    numba = None


def _numba_kernels():
    """The fused kernels by format, or None when numba is unavailable."""
    if numba is None:
        return None
    return {"u16": kernel_u16, "f32": kernel_f32, "f64": kernel_f64, "threads": numba.get_num_threads}


if numba is not None:
    # Bit casts between same-width ints and floats (numba has no scalar view).
    def _bitcast(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(signature.return_type))

    @intrinsic
    def _f2i(typingctx, x):
        if x == types.float32:
            sig = types.int32(x)
        elif x == types.float64:
            sig = types.int64(x)
        else:
            return None

        return sig, _bitcast

    @intrinsic
    def _i2f(typingctx, x):
        if x == types.int32:
            sig = types.float32(x)
        elif x == types.int64:
            sig = types.float64(x)
        else:
            return None

        return sig, _bitcast

    # No nnan/ninf: the finite checks must survive the optimiser. reassoc lets the sums
    # vectorise; contract gives FMAs in the polynomials.
    fm = {"nsz", "arcp", "contract", "afn", "reassoc"}
    njit = numba.njit
    i32 = np.int32
    f32 = np.float32
    I32MIN = i32(-2 ** 31)
    I32MAX = i32(2 ** 31 - 1)
    M31 = i32(0x7FFFFFFF)
    M15 = i32(0x7FFF)
    S15 = i32(0x8000)
    SH16 = i32(16)
    SH23 = i32(23)
    SH31 = i32(31)
    EXP32 = i32(0x7F800000)
    ZERO = i32(0)
    ONE = i32(1)
    LOG2E = f32(1.4426950408889634)
    LN2HI = f32(0.693359375)
    LN2LO = f32(-2.12194440e-4)
    EXPLO = f32(-87.0)
    C2, C3, C4, C5, C6 = f32(0.5), f32(1 / 6), f32(1 / 24), f32(1 / 120), f32(1 / 720)
    T3, T5, T7, T9 = f32(-1 / 3), f32(2 / 15), f32(-17 / 315), f32(62 / 2835)
    F0, F1, F2, FHALF = f32(0.0), f32(1.0), f32(2.0), f32(0.5)

    @njit(inline="always", fastmath=fm)
    def exp_le0(t):
        """exp(t) for t <= 0 in float32: Cody-Waite reduction, degree-6 Taylor (|r| <= ln2/2:
        relative error < 2e-7), 2^k from the exponent bits. Clamped at -87 (exp ~ 1.6e-38)."""
        t = max(t, EXPLO)
        k = i32(t * LOG2E - FHALF)  # t <= 0: truncation of (x - 1/2) rounds to nearest
        kf = f32(k)
        r = (t - kf * LN2HI) - kf * LN2LO
        p = F1 + r * (F1 + r * (C2 + r * (C3 + r * (C4 + r * (C5 + r * C6)))))
        return p * _i2f(i32((k + i32(127)) << SH23))

    @njit(inline="always", fastmath=fm)
    def key_to_f32(k):
        return _i2f(i32(k ^ ((k >> SH31) & M31)))

    @njit(inline="always", fastmath=fm)
    def load_u16(x, i, fb, kb, shift, scale, mask):
        """Decode one float16/bfloat16 row into fb (float32), its order keys into kb; return the
        largest key and whether any value is non-finite (all-ones exponent in the raw bits)."""
        m1k = I32MIN
        bad = ZERO
        for j in range(x.shape[1]):
            w = i32(x[i, j])
            bad |= i32((w & mask) == mask)
            # Magnitude bits moved into float32 position; for float16 the multiply by 2^112
            # rebiases the exponent (and turns float16 subnormals into exact float32 values).
            f = _i2f(i32(((w & M15) << shift) | ((w & S15) << SH16))) * scale
            fb[j] = f
            b = _f2i(f)
            k = i32(b ^ ((b >> SH31) & M31))
            kb[j] = k
            m1k = max(m1k, k)
        return m1k, bad

    @njit(inline="always", fastmath=fm)
    def load_f32(x, i, fb, kb):
        m1k = I32MIN
        bad = ZERO
        for j in range(x.shape[1]):
            f = x[i, j]
            b = _f2i(f)
            bad |= i32((b & EXP32) == EXP32)
            fb[j] = f
            k = i32(b ^ ((b >> SH31) & M31))
            kb[j] = k
            m1k = max(m1k, k)
        return m1k, bad

    @njit(inline="always", fastmath=fm)
    def second_key(kb, m1k):
        """Key of the second largest value (ties with the largest count: the max repeated)."""
        m2k = I32MIN
        cnt = ZERO
        for j in range(kb.shape[0]):
            k = kb[j]
            cnt += i32(k == m1k)
            m2k = max(m2k, k if k < m1k else I32MIN)
        return m1k if cnt > ONE else m2k

    @njit(inline="always", fastmath=fm)
    def tanh_half(a):
        """tanh(a / 2) for a >= 0 in float32: a series below 0.5, (1 - e^-a) / (1 + e^-a) above."""
        e = exp_le0(-a)
        big = (F1 - e) / (F1 + e)
        y = a * FHALF
        y2 = y * y
        small = y * (F1 + y2 * (T3 + y2 * (T5 + y2 * (T7 + y2 * T9))))
        return small if a < FHALF else big

    @njit(inline="always", fastmath=fm)
    def score_row(fb, kb, m1k, mode, tol):
        """(score, status) of one decoded row."""
        c = fb.shape[0]
        if mode == 0:  # multi-class logits
            m2k = second_key(kb, m1k)
            m1 = key_to_f32(m1k)
            m2 = key_to_f32(m2k)
            s = F0
            for j in range(c):
                s += exp_le0(fb[j] - m1)
            return f32(-math.expm1(f32(m2 - m1)) / s), ZERO
        if mode == 1:  # multi-class probabilities
            m2k = second_key(kb, m1k)
            mnk = I32MAX
            s = F0
            for j in range(c):
                mnk = min(mnk, kb[j])
                s += fb[j]
            p1 = key_to_f32(m1k)
            if key_to_f32(mnk) < F0 or p1 > F1:
                return f32(np.nan), i32(2)
            if abs(f32(s) - F1) > tol:
                return f32(np.nan), i32(3)
            return f32(p1 - key_to_f32(m2k)), ZERO
        if mode == 2:  # multi-label logits, min: |tanh(z/2)| is increasing in |z|
            mn = I32MAX
            for j in range(c):
                mn = min(mn, i32(_f2i(fb[j]) & M31))
            return f32(math.tanh(0.5 * np.float64(_i2f(mn)))), ZERO
        if mode == 3:  # multi-label logits, mean
            s = F0
            for j in range(c):
                s += tanh_half(abs(fb[j]))
            return f32(s / f32(c)), ZERO
        # multi-label probabilities: range check on the keys, then |2p - 1|
        mnk = I32MAX
        for j in range(c):
            mnk = min(mnk, kb[j])
        if key_to_f32(mnk) < F0 or key_to_f32(m1k) > F1:
            return f32(np.nan), i32(2)
        if mode == 4:
            mn = I32MAX
            for j in range(c):
                mn = min(mn, _f2i(abs(F2 * fb[j] - F1)))
            return _i2f(mn), ZERO
        s = F0
        for j in range(c):
            s += abs(F2 * fb[j] - F1)
        return f32(s / f32(c)), ZERO

    @njit(parallel=True, fastmath=fm, cache=True)
    def kernel_u16(x, shift, scale, mask, mode, tol, out, bad_row, bad_code):
        """float16 (shift 13, scale 2^112, mask 0x7C00) or bfloat16 (16, 1, 0x7F80) stored as
        uint16 [n, c] -> out[n]. bad_row/bad_code [n_chunks]: first bad row of each chunk."""
        n, c = x.shape
        nch = bad_row.shape[0]
        per = (n + nch - 1) // nch
        for ch in prange(nch):
            fb = np.empty(c, np.float32)
            kb = np.empty(c, np.int32)
            bad_row[ch] = -1
            bad_code[ch] = 0
            for i in range(ch * per, min(n, (ch + 1) * per)):
                m1k, bad = load_u16(x, i, fb, kb, shift, scale, mask)
                if bad:
                    out[i] = np.nan
                    bad_row[ch] = i
                    bad_code[ch] = 1
                    break
                sc, code = score_row(fb, kb, m1k, mode, tol)
                out[i] = sc
                if code:
                    bad_row[ch] = i
                    bad_code[ch] = code
                    break

    @njit(parallel=True, fastmath=fm, cache=True)
    def kernel_f32(x, mode, tol, out, bad_row, bad_code):
        """float32 [n, c] -> out[n]; see kernel_u16."""
        n, c = x.shape
        nch = bad_row.shape[0]
        per = (n + nch - 1) // nch
        for ch in prange(nch):
            fb = np.empty(c, np.float32)
            kb = np.empty(c, np.int32)
            bad_row[ch] = -1
            bad_code[ch] = 0
            for i in range(ch * per, min(n, (ch + 1) * per)):
                m1k, bad = load_f32(x, i, fb, kb)
                if bad:
                    out[i] = np.nan
                    bad_row[ch] = i
                    bad_code[ch] = 1
                    break
                sc, code = score_row(fb, kb, m1k, mode, tol)
                out[i] = sc
                if code:
                    bad_row[ch] = i
                    bad_code[ch] = code
                    break

    @njit(parallel=True, cache=True)
    def kernel_f64(x, mode, tol, out, bad_row, bad_code):
        """float64 [n, c] -> out[n] in float64 arithmetic (plain scalar loops; not tuned)."""
        n, c = x.shape
        nch = bad_row.shape[0]
        per = (n + nch - 1) // nch
        for ch in prange(nch):
            bad_row[ch] = -1
            bad_code[ch] = 0
            for i in range(ch * per, min(n, (ch + 1) * per)):
                code = 0
                m1 = -np.inf
                m2 = -np.inf
                mn = np.inf
                s = 0.0
                for j in range(c):
                    v = x[i, j]
                    if not math.isfinite(v):
                        code = 1
                        break
                    if v > m1:
                        m2 = m1
                        m1 = v
                    elif v > m2:
                        m2 = v
                    mn = min(mn, v)
                    s += v
                sc = np.nan
                if code == 0:
                    if mode == 0:
                        e = 0.0
                        for j in range(c):
                            e += math.exp(x[i, j] - m1)
                        sc = -math.expm1(m2 - m1) / e
                    elif mode == 1:
                        if mn < 0.0 or m1 > 1.0:
                            code = 2
                        elif abs(s - 1.0) > tol:
                            code = 3
                        else:
                            sc = m1 - m2
                    elif mode == 2 or mode == 3:
                        a = np.inf if mode == 2 else 0.0
                        for j in range(c):
                            t = abs(math.tanh(0.5 * x[i, j]))
                            a = min(a, t) if mode == 2 else a + t
                        sc = a if mode == 2 else a / c
                    else:
                        if mn < 0.0 or m1 > 1.0:
                            code = 2
                        else:
                            a = np.inf if mode == 4 else 0.0
                            for j in range(c):
                                t = abs(2.0 * x[i, j] - 1.0)
                                a = min(a, t) if mode == 4 else a + t
                            sc = a if mode == 4 else a / c
                out[i] = sc
                if code:
                    bad_row[ch] = i
                    bad_code[ch] = code
                    break



# ----------------------------------------------------------------------------------------------
# Reading blocks
# ----------------------------------------------------------------------------------------------

_LIBC = None


def _madvise_dontneed(arr: np.ndarray) -> None:
    """Drop this process's page-table entries for the rows `arr` of a shared file mapping.

    Pages of a memory-mapped file count in RSS once touched; streaming a pool through one
    mapping would otherwise grow RSS by the file's size. For a MAP_SHARED file mapping
    MADV_DONTNEED only unmaps (the page cache keeps the data; a later read refaults it), so it
    is safe; it is never called on anonymous or copy-on-write memory. The range is widened down
    to a 2 MiB boundary (and up to a page), clipped to the mapping: page-cache folios can be
    mapped whole, and a zap that covers only part of one leaves it resident.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC or arr.size == 0:
        return
    page = mmap.PAGESIZE
    start = arr.ctypes.data
    end = start + arr.nbytes
    bounds = _mapping_bounds(arr)
    if bounds is None:  # mapping unknown: whole pages inside the rows only
        lo, hi = -(-start // page) * page, end // page * page
    else:
        lo = max(bounds[0], start // (2 << 20) * (2 << 20))
        hi = min(-(-bounds[1] // page) * page, -(-end // page) * page)
    if hi > lo:
        _LIBC.madvise(lo, hi - lo, getattr(mmap, "MADV_DONTNEED", 4))


def _mapping_bounds(arr):
    """(first, last) address of the mmap object behind a memmap view, or None."""
    b = arr
    while b is not None and not isinstance(b, mmap.mmap):
        b = getattr(b, "base", None)
    if b is None or b.closed:
        return None
    root = np.frombuffer(b, dtype=np.uint8)
    return root.ctypes.data, root.ctypes.data + root.size


def _shared_mapping(a) -> bool:
    return isinstance(a, np.memmap) and getattr(a, "mode", "c") in ("r", "r+", "readonly", "readwrite")


def _release(src, start: int, stop: int) -> None:
    """Unmap the rows [start, stop) of memory-mapped sources after they were scored."""
    if isinstance(src, _BF16):
        src = src.raw
    if isinstance(src, ShardedArray):
        for s in range(len(src.shards)):
            lo, hi = max(start, int(src.offsets[s])), min(stop, int(src.offsets[s + 1]))
            if lo < hi and _shared_mapping(src.shards[s]):
                _madvise_dontneed(src.shards[s][lo - src.offsets[s]:hi - src.offsets[s]])
    elif _shared_mapping(src):
        _madvise_dontneed(src[start:stop])


def _block_ranges(pool: Pool, rows: int):
    """Row ranges of at most `rows` rows that never straddle two shards (no concatenation)."""
    src = pool.array.raw if isinstance(pool.array, _BF16) else pool.array
    cuts = [int(o) for o in src.offsets] if isinstance(src, ShardedArray) else [0, pool.n]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out.extend((s, min(s + rows, b)) for s in range(a, b, rows))
    return out


def _raw_block(pool: Pool, start: int, stop: int):
    """Rows [start, stop) as (numpy array, format) for the fused kernel, without copying when the
    rows are contiguous: format "f16"/"bf16" (uint16 bits), "f32" or "f64"."""
    a = pool.array
    if isinstance(a, _BF16):
        raw = a.raw.read(start, stop) if isinstance(a.raw, ShardedArray) else a.raw[start:stop]
        return _readonly(np.ascontiguousarray(raw).view(np.uint16)), "bf16"
    if isinstance(a, torch.Tensor):
        t = a[start:stop].detach().contiguous()
        if t.dtype in (torch.bfloat16, torch.float16):
            return _readonly(t.view(torch.int16).numpy().view(np.uint16)), "bf16" if t.dtype == torch.bfloat16 else "f16"
        if t.dtype == torch.float64:
            return _readonly(t.numpy()), "f64"
        return _readonly(t.to(torch.float32).numpy()), "f32"
    rows = a.read(start, stop) if isinstance(a, ShardedArray) else a[start:stop]
    rows = np.ascontiguousarray(rows)
    if rows.dtype == np.float16:
        return _readonly(rows.view(np.uint16)), "f16"
    if rows.dtype in (np.float32, np.float64):
        return _readonly(rows), "f32" if rows.dtype == np.float32 else "f64"
    # Other floating types (longdouble, ...): score in float64.
    return _readonly(rows.astype(np.float64)), "f64"


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: numba compiles one signature per writeability, so all blocks share one
    (memmaps opened with mode "r" are read-only already)."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


# ----------------------------------------------------------------------------------------------
# The torch kernel (reference, fallback, CUDA)
# ----------------------------------------------------------------------------------------------

def _torch_block(x: torch.Tensor, mode: int, tol: float):
    """Scores of one block x [n, c] (float32/float64 on any device) and the status of each row."""
    status = torch.where(torch.isfinite(x).all(dim=1), 0, _NONFINITE)
    if mode in (_MC_LOGITS, _MC_PROBS):
        top2 = torch.topk(x, 2, dim=1).values
        m1, m2 = top2[:, 0], top2[:, 1]
        if mode == _MC_LOGITS:
            scores = -torch.expm1(m2 - m1) / torch.exp(x - m1[:, None]).sum(dim=1)
        else:
            scores = m1 - m2
    elif mode in (_ML_LOGITS_MIN, _ML_LOGITS_MEAN):
        t = torch.tanh(0.5 * x.abs())
        scores = t.amin(dim=1) if mode == _ML_LOGITS_MIN else t.mean(dim=1)
    else:
        d = (2.0 * x - 1.0).abs()
        scores = d.amin(dim=1) if mode == _ML_PROBS_MIN else d.mean(dim=1)
    if mode in (_MC_PROBS, _ML_PROBS_MIN, _ML_PROBS_MEAN):
        out_of_range = (x.amin(dim=1) < 0) | (x.amax(dim=1) > 1)
        status = torch.where((status == 0) & out_of_range, _OUT_OF_RANGE, status)
        if mode == _MC_PROBS:
            bad_sum = (x.sum(dim=1) - 1).abs() > tol
            status = torch.where((status == 0) & bad_sum, _BAD_SUM, status)
    return scores.to(torch.float32), status


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def _raise_bad(pool: Pool, row: int, code: int, tol: float, from_logits: bool) -> None:
    what = "logits" if from_logits else "probabilities"
    if code == _NONFINITE:
        raise ValueError(f"outputs: expected finite {what}, got a NaN or infinite value in row {row}")
    vals = pool.block(row, row + 1, dtype=torch.float64)[0].cpu()
    if code == _OUT_OF_RANGE:
        raise ValueError(
            f"outputs: expected probabilities in [0, 1] (from_logits=False), got row {row} with values "
            f"in [{float(vals.min()):.6g}, {float(vals.max()):.6g}]")
    raise ValueError(
        f"outputs: expected every row of probabilities to sum to 1 within {tol:g} (from_logits=False), "
        f"got row {row} summing to {float(vals.sum()):.8g}")


def margin_scores(outputs, *, from_logits: bool = True, multilabel: bool = False, reduce: str = "min",
                  device="auto", budget_bytes=None, kernel: str = "auto", sum_tol: float | None = None):
    """Margin score of every row of model outputs; lower is more uncertain.

    outputs: [N, C] logits (default) or probabilities: numpy array or memmap, a `.npy` path, a
      directory of `.npy` shards, or a torch tensor (any device); float16, bfloat16 (torch, or
      uint16 `.npy` with the pool sidecar), float32 or float64. Read in row blocks, never whole.
    from_logits: False when `outputs` are probabilities (rows must lie in [0, 1] and, for
      multi-class, sum to 1 within `sum_tol`).
    multilabel: per-class binary margins |2 sigmoid(z) - 1| (or |2p - 1|) reduced over the
      classes by `reduce` ("min" or "mean"); otherwise multi-class p1 - p2 (C >= 2).
    device: "auto" (a tensor's own device; else CUDA when present; else the CPU), "cpu", "cuda".
    budget_bytes: bytes of input rows per block (default from `_device.budget_bytes`).
    kernel: "auto" ("fused" on the CPU, "torch" on CUDA), "fused" (numba, CPU only) or
      "torch" (eager torch ops: the reference and the fallback).
    sum_tol: tolerance on |row sum - 1| for multi-class probabilities (default from the dtype,
      see `default_sum_tol`).

    Returns float32 [N]: a numpy array, or a torch tensor on the input's device when `outputs`
    is a torch tensor. Computed in float32 (float64 for float64 input): about 1e-6 from the
    exact value of the stored numbers.

    Raises TypeError/ValueError naming the argument: wrong rank, no rows, fewer than 2 classes
    (multi-class), NaN/inf (with the first bad row), probabilities outside [0, 1] or not summing
    to 1, unknown reduce/kernel/device.
    """
    for name, value in (("from_logits", from_logits), ("multilabel", multilabel)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    check_choice("reduce", reduce, _REDUCES)
    check_choice("kernel", kernel, _KERNELS)
    budget = _budget_bytes(budget_bytes)
    if sum_tol is not None:
        if isinstance(sum_tol, bool) or not isinstance(sum_tol, (int, float)) or not (0 <= sum_tol < 1):
            raise ValueError(f"sum_tol: expected a number in [0, 1), got {sum_tol!r}")

    pool = Pool(outputs, name="outputs")
    dtype = pool.dtype
    is_tensor = isinstance(pool.array, torch.Tensor)
    if not (dtype == "bfloat16" or (is_tensor and dtype.is_floating_point)
            or (not is_tensor and np.issubdtype(np.dtype(dtype), np.floating))):
        raise TypeError(f"outputs: expected floating-point logits or probabilities, got dtype {dtype}")
    check_ndim("outputs", pool.shape, 2)
    pool.check_nonempty()
    n, c = pool.shape
    if c == 0 or (not multilabel and c < 2):
        need = 1 if multilabel else 2
        raise ValueError(f"outputs: expected at least {need} class column(s)"
                         f"{'' if multilabel else ' for multi-class margins'}, got shape {pool.shape}")
    tol = float(sum_tol) if sum_tol is not None else default_sum_tol(dtype)
    mode = _mode(bool(from_logits), bool(multilabel), reduce)

    if device == "auto" and is_tensor:
        dev = pool.array.device
    else:
        dev = resolve_device(device)
    if kernel == "fused" and dev.type != "cpu":
        raise ValueError(f"kernel: 'fused' runs on the CPU only, got device {str(dev)!r}")
    kernels = _numba_kernels() if dev.type == "cpu" and kernel != "torch" else None
    if kernel == "fused" and kernels is None:
        raise ValueError("kernel: 'fused' needs numba (pip install numba), which failed to import")
    use_fused = kernels is not None

    if use_fused:
        rows = max(1, budget // pool.row_bytes)
    else:
        # input rows + a float32/64 copy + exp temporaries on the device
        rows = max(1, budget // (pool.row_bytes + 3 * c * 8))
    ranges = _block_ranges(pool, rows)
    log_memory_estimate(f"margin_scores ({'fused' if use_fused else 'torch'} on {dev})",
                        min(rows, n) * (pool.row_bytes if use_fused else pool.row_bytes + 3 * c * 8) + 4 * n)

    out_dev = pool.array.device if is_tensor else torch.device("cpu")
    if use_fused:
        out = np.empty(n, dtype=np.float32)
        nthreads = kernels["threads"]()
        for s, e in ranges:
            x, fmt = _raw_block(pool, s, e)
            # Chunks of ~2K rows: enough for load balance, few enough for cheap bookkeeping.
            nch = max(1, min(-(-(e - s) // 2048), 64 * nthreads)) if e - s > 2048 else 1
            bad_row = np.empty(nch, np.int64)
            bad_code = np.empty(nch, np.int32)
            o = out[s:e]
            if fmt == "f16":
                kernels["u16"](x, np.int32(13), np.float32(2.0 ** 112), np.int32(0x7C00), mode,
                               np.float32(tol), o, bad_row, bad_code)
            elif fmt == "bf16":
                kernels["u16"](x, np.int32(16), np.float32(1.0), np.int32(0x7F80), mode,
                               np.float32(tol), o, bad_row, bad_code)
            elif fmt == "f32":
                kernels["f32"](x, mode, np.float32(tol), o, bad_row, bad_code)
            else:
                kernels["f64"](x, mode, float(tol), o, bad_row, bad_code)
            hit = np.flatnonzero(bad_row >= 0)
            if hit.size:
                _raise_bad(pool, s + int(bad_row[hit[0]]), int(bad_code[hit[0]]), tol, bool(from_logits))
            del x
            _release(pool.array, s, e)
        return torch.from_numpy(out).to(out_dev) if is_tensor else out

    with torch.no_grad():
        return _torch_scores(pool, ranges, mode, tol, dev, bool(from_logits), is_tensor, out_dev)


def _torch_scores(pool, ranges, mode, tol, dev, from_logits, is_tensor, out_dev):
    """The eager torch path over the blocks (see `margin_scores`)."""
    dtype = pool.dtype
    out_t = torch.empty(pool.n, dtype=torch.float32, device=dev)
    work = torch.float64 if (not isinstance(dtype, str) and dtype in (np.float64, torch.float64)) else torch.float32
    for s, e in ranges:
        x = pool.block(s, e, device=dev, dtype=work)
        scores, status = _torch_block(x, mode, tol)
        bad = torch.nonzero(status).flatten()
        if bad.numel():
            r = int(bad[0])
            _raise_bad(pool, s + r, int(status[r]), tol, from_logits)
        out_t[s:e] = scores
        del x
        _release(pool.array, s, e)
    if is_tensor:
        return out_t.to(out_dev)
    return out_t.cpu().numpy()
