"""kiln's compiler: the IR, its verifier and interpreter, the ONNX frontend and the driver."""
