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


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """kiln's own ONNX export of the real SmolLM2-135M-Instruct (about 10 s, 540 MB)."""
    from kiln.models.smollm2 import export_smollm2

    out = tmp_path_factory.mktemp("smollm2")
    export_smollm2(out)
    return out


@pytest.fixture(scope="session")
def smollm2_optimum():
    """optimum's export of the real SmolLM2 through transformers' GGUF loader (minutes, cached
    across runs in ~/.cache/kiln)."""
    from pathlib import Path

    from kiln.models.hf_export import export_smollm2_optimum

    return export_smollm2_optimum(Path.home() / ".cache" / "kiln" / "smollm2-optimum")
