"""Argument checks. Every error names the argument, what was expected and what was given."""
from __future__ import annotations

import numbers

import numpy as np
import torch


def _describe(value) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def check_int(name: str, value, *, min=None, max=None) -> int:
    """An integer (not bool) in [min, max]."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {_describe(value)}")
    value = int(value)
    if min is not None and value < min:
        raise ValueError(f"{name}: expected an integer >= {min}, got {value}")
    if max is not None and value > max:
        raise ValueError(f"{name}: expected an integer <= {max}, got {value}")
    return value


def check_float(name: str, value, *, min=None, max=None, min_inclusive=True) -> float:
    """A finite real number in [min, max] (or (min, max] with min_inclusive=False)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a number, got {_describe(value)}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if min is not None and (value < min or (not min_inclusive and value == min)):
        op = ">=" if min_inclusive else ">"
        raise ValueError(f"{name}: expected a number {op} {min}, got {value}")
    if max is not None and value > max:
        raise ValueError(f"{name}: expected a number <= {max}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_ndim(name: str, shape, ndim: int) -> None:
    if len(shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(shape)}")


def check_length(name: str, n: int, expected: int, other: str) -> None:
    if n != expected:
        raise ValueError(f"{name}: expected length {expected} (the length of {other}), got {n}")


def check_nonempty(name: str, n: int) -> None:
    if n == 0:
        raise ValueError(f"{name}: expected at least one row, got an empty array")


def as_index_array(name: str, value, *, n: int, unique: bool = True) -> np.ndarray:
    """int64 pool indices in [0, n); duplicates rejected when `unique`."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of indices, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: expected indices in [0, {n}), got {bad}")
    if unique:
        s = np.sort(arr)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise ValueError(f"{name}: expected unique indices, got {dup.size} duplicate(s), e.g. {int(dup[0])}")
    return arr


def as_labels(name: str, value, *, n: int | None = None, other: str = "the pool") -> np.ndarray:
    """Cluster labels: a 1-D integer array (int64 returned), non-negative."""
    from .pool import open_array

    arr = open_array(value, name=name)
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of cluster labels, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected integer cluster labels, got dtype {arr.dtype}")
    if n is not None:
        check_length(name, arr.shape[0], n, other)
    arr = arr.astype(np.int64, copy=False)
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"{name}: expected non-negative cluster labels, got {int(arr.min())}")
    return arr
