"""kiln's CUDA kernels: hand-scheduled TIR (attention, KV cache), TE ops for dlight."""
