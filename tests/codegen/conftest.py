"""Fixtures shared by the codegen tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A llama-tiny ONNX file without weights (compiled --no-weights)."""
    from kiln.models.synthetic import write_synthetic

    return write_synthetic("llama-tiny", tmp_path_factory.mktemp("tiny"), weights=False)
