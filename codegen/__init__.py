"""Code generation: kiln IR -> TVM (Relax graph, TIR kernels) per target. Imports tvm."""
