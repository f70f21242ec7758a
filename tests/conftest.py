"""Shared test fixtures: the real-data folder (skipped when absent) and GPU auto-skip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """$CM_ENGINE_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("CM_ENGINE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def data_dir() -> Path:
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set CM_ENGINE_DATA)")
    return root


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
