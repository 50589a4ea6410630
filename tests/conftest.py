"""Shared test fixtures: QEMU availability and a running qmpgraph daemon.

Differential tests need QEMU's ``qemu-storage-daemon``. Without it they skip
loudly; with ``CI=true`` a missing QEMU fails the run instead, so CI can never
pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest

QSD = "qemu-storage-daemon"


def qemu_available() -> bool:
    """Whether QEMU's storage daemon is on PATH."""
    return shutil.which(QSD) is not None


def require_qemu() -> str:
    """The path of qemu-storage-daemon; skip (or fail under CI=true) without it."""
    path = shutil.which(QSD)
    if path is not None:
        return path
    msg = f"{QSD} not found: differential tests against QEMU are SKIPPED"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{QSD} is required when CI=true", pytrace=False)
    warnings.warn(msg, stacklevel=2)
    pytest.skip(msg)


@pytest.fixture
def qsd_path() -> str:
    """The qemu-storage-daemon binary (skips, or fails in CI, when missing)."""
    return require_qemu()
