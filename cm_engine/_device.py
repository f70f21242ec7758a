"""Device choice and memory budgets shared by every stage.

One code path for CPU and GPU: a stage asks `resolve_device` once and moves its
blocks there; nothing else in the package branches on the device except where a
kernel is swapped (fused CPU kernel vs. torch on CUDA).
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("cm_engine")

#: Default working-memory budget of one stage, in bytes (blocks are sized from it).
DEFAULT_BUDGET_BYTES = 256 * 2**20


def resolve_device(device="auto") -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" | torch.device to a torch.device.

    "auto" picks CUDA when torch sees a GPU, the CPU otherwise.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device is None or device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    else:
        raise TypeError(f"device: expected a str or torch.device, got {type(device).__name__}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(dev)!r} requested but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected a cpu or cuda device, got {str(dev)!r}")
    return dev


def budget_bytes(budget=None) -> int:
    """The working-memory budget in bytes: the argument, else $CM_ENGINE_BUDGET_MB, else 256 MiB."""
    if budget is None:
        env = os.environ.get("CM_ENGINE_BUDGET_MB")
        return int(float(env) * 2**20) if env else DEFAULT_BUDGET_BYTES
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"budget_bytes: expected a positive number of bytes, got {budget!r}")
    return int(budget)


def rows_per_block(bytes_per_row: int, budget=None, *, minimum: int = 1, maximum: int | None = None) -> int:
    """How many rows of `bytes_per_row` bytes fit in the budget (at least `minimum`)."""
    rows = max(minimum, budget_bytes(budget) // max(1, int(bytes_per_row)))
    if maximum is not None:
        rows = min(rows, maximum)
    return int(rows)


def log_memory_estimate(stage: str, nbytes: int) -> None:
    """Log the working memory a stage is about to allocate (design: log before large work)."""
    log.info("%s: about %.1f MiB of working memory", stage, nbytes / 2**20)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Reads VmHWM from /proc (Linux): ru_maxrss is inherited across fork+exec, so a child
    would report its parent's peak. Falls back to ru_maxrss elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
