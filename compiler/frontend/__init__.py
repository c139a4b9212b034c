"""Frontends: model formats -> kiln IR. Only this package imports onnx."""
