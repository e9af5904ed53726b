"""Shared test helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path | None:
    """Real data sets: ``$FEDCTX_DATA`` or ``../shared/data`` beside the repository."""
    root = Path(os.environ.get("FEDCTX_DATA", REPO.parent / "shared" / "data"))
    return root if root.is_dir() else None


@pytest.fixture
def real_data() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("real data not found: set FEDCTX_DATA to a folder like ../shared/data")
    return root


@pytest.fixture
def python() -> str:
    return sys.executable
