"""Type rules for the ONNX-level (generic) ops."""
