"""kiln's own TIR kernels, one module per kernel family; each factory returns a tirx.PrimFunc."""
