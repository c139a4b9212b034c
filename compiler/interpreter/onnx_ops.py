"""Numpy kernels for the ONNX-level (generic) ops."""

import numpy as np


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise erf (numpy has none); placeholder replaced by the ops module owner."""
    import math

    return np.vectorize(math.erf, otypes=[x.dtype])(x)
