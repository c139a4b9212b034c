"""Shared fixtures and markers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None
