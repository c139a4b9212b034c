"""The fusions kiln knows, by name: what each groups. Dependency-free, so the CLI lists them
without importing the IR; kiln.passes.fusion has their passes, kiln.codegen.targets says which
target takes which."""

#: fusion name -> what it groups (`kiln compile --help` lists these)
FUSIONS: dict[str, str] = {
    "projections": "linears reading one input (q/k/v, gate/up) -> one linear + Split",
    "norm_linear": "rms_norm as the prologue of the one bias-free linear reading it",
    "residual_add": "the residual Add as the epilogue of the linear it alone consumes",
    "qkv_rope": "q/k/v Split + rotary of q and k + KV append, one kernel before attention",
    "qkv_projection": "the q/k/v projection (and its norm) joins the qkv_rope kernel",
    "swiglu": "gate/up linear + Split + silu_mul: SwiGLU as the linear's epilogue",
}
