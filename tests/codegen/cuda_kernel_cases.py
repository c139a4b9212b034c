"""Every CUDA kernel of kiln.codegen.cuda.kernels as a test case: how to build it (on a machine
with TVM's compiler), seeded inputs, and its expected outputs computed from those inputs by the
numpy specification (kiln.compiler.interpreter.transformer_ops, kiln.runtime.quant_format).

Building needs tvm's compiler and nvcc; the inputs and references need numpy alone, so the GPU
host (runtime-only TVM) runs kernels built elsewhere: `build(dir)` writes kernels.so and
cases.json there, and tests/codegen/test_cuda_kernels.py loads them.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.compiler.interpreter import transformer_ops as spec
from kiln.runtime import quant_format as qf

#: kernels/attention.MAX_SPLITS (that module needs TVM's compiler, which the GPU host lacks):
#: the decode attention scratch's split axis; tests/codegen/test_cuda_kernels.py checks it
MAX_SPLITS = 16

F16, F32, BF16 = "float16", "float32", "bfloat16"
EPS = 1e-5
#: max |got - want| / max |want| allowed, per storage dtype (fp16 outputs are rounded once,
#: accumulations run in float32 in the kernels and in float64 or float32 in the reference); on
#: the H200 the largest fp16 error was 9.4e-4 (benchmarks/gpu/logs/h3_kernels_run2_errors.log)
TOL = {F16: 2e-3, F32: 2e-5, BF16: 8e-3}  # bf16: 8 significant bits (one rounding: 2^-8)


@dataclass(frozen=True)
class Case:
    """One kernel: `make()` its PrimFunc (or TE function to schedule with dlight: `te=True`),
    `inputs(rng)` its arguments in order (outputs preallocated; ints pass as scalars) and
    `expect(args)` the outputs (arg index -> array) the specification gives for those args."""

    name: str
    make: Callable[[], object]
    inputs: Callable[[np.random.Generator], list]
    expect: Callable[[list], dict[int, np.ndarray]]
    te: bool = False
    tol: float | None = None  # for every output (else TOL of its dtype); 0: bit-exact


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def _np_dtype(dtype: str):
    if dtype == BF16:  # numpy has none: ml_dtypes' (TVM takes it; it is on the GPU host)
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _normal(rng, shape, dtype, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(_np_dtype(dtype))


def _empty(shape, dtype) -> np.ndarray:
    """An output buffer, filled with a value no kernel writes (so unwritten elements show);
    bf16's made by a cast (arithmetic on an ml_dtypes array promotes it to float32)."""
    fill = 1234.0 if dtype == BF16 or np.dtype(dtype).kind == "f" else -7
    return np.full(shape, fill, "float32" if dtype == BF16 else dtype).astype(_np_dtype(dtype))


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32)


def _rms(x, gamma):
    return spec.rms_norm([_f32(x), _f32(gamma)], {"eps": EPS})[0]


def _dot(x, w) -> np.ndarray:
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T


# -- GEMVs (kernels/gemv.py) -------------------------------------------------------------------

def _cuda_cores(make):
    """make() with the batched GEMVs on the CUDA cores (gemv_mma.TENSOR_CORES off: the
    `nomma` variant); the caller passes arguments no other case passes (the kernels are cached
    per call signature)."""
    from kiln.codegen.cuda.kernels import gemv_mma

    gemv_mma.TENSOR_CORES = False
    try:
        return make()
    finally:
        gemv_mma.TENSOR_CORES = True


def _gemv_cases() -> list[Case]:
    def gemv(name, n, k, dtype, *, residual=False, norm=False, m=3, cores=False):
        def make():
            from kiln.codegen.cuda.kernels.gemv import WARPS, gemv_kernel
            if cores:
                return _cuda_cores(lambda: gemv_kernel(
                    n, k, dtype, dtype, residual=residual, norm_eps=EPS if norm else None,
                    warps=WARPS))
            return gemv_kernel(n, k, dtype, dtype, residual=residual,
                               norm_eps=EPS if norm else None)

        def inputs(rng):
            args = [_normal(rng, (m, k), dtype)]
            if norm:
                args.append(_normal(rng, (k,), dtype, 0.2) + np.asarray(1, dtype))
            args.append(_normal(rng, (n, k), dtype, k ** -0.5))
            if residual:
                args.append(_normal(rng, (m, n), dtype))
            return [*args, _empty((m, n), dtype)]

        def expect(a):
            x = _rms(a[0], a[1]) if norm else a[0]
            y = _dot(x, a[2 if norm else 1])
            return {len(a) - 1: y + (_f32(a[2]) if residual else 0)}

        return Case(name, make, inputs, expect)

    def swiglu(rng_f=64, k=256, m=3, name="swiglu_gemv_f16", cores=False):
        f = rng_f

        def make():
            from kiln.codegen.cuda.kernels.gemv import WARPS, swiglu_gemv_kernel
            if cores:
                return _cuda_cores(lambda: swiglu_gemv_kernel(f, k, F16, EPS, warps=WARPS))
            return swiglu_gemv_kernel(f, k, F16, EPS)

        def inputs(rng):
            return [_normal(rng, (m, k), F16), _normal(rng, (k,), F16, 0.2) + np.float16(1),
                    _normal(rng, (2 * f, k), F16, k ** -0.5), _empty((m, f), F16)]

        def expect(a):
            gu = _dot(_rms(a[0], a[1]), a[2])
            return {3: spec.silu_mul([gu[:, :f], gu[:, f:]], {})[0]}

        return Case(name, make, inputs, expect)

    def argmax(v=1000, m=3):
        def make():
            from kiln.codegen.cuda.kernels.gemv import argmax_kernel
            return argmax_kernel(v, F16)

        return Case("argmax_f16", make,
                    lambda rng: [_normal(rng, (m, v), F16), _empty((m,), "int64")],
                    lambda a: {1: np.argmax(a[0], axis=1)}, tol=0.0)

    return [gemv("gemv_f16", 96, 200, F16), gemv("gemv_residual_f32", 64, 96, F32, residual=True),
            gemv("gemv_norm_f16", 80, 256, F16, norm=True),
            gemv("gemv_splitk_f16", 64, 4096, F16), swiglu(), argmax(), _qkv_rope_gemv_case(),
            # batched decode: one row (the one-row kernels), and the row buckets 8 and 16
            gemv("gemv_m1_f16", 96, 200, F16, m=1), gemv("gemv_m8_f16", 96, 2048, F16, m=8),
            gemv("gemv_residual_m16_f16", 64, 200, F16, residual=True, m=16),
            gemv("gemv_norm_m6_f16", 80, 256, F16, norm=True, m=6),
            gemv("gemv_norm_m1_f16", 80, 256, F16, norm=True, m=1),
            gemv("gemv_splitk_residual_m11_f16", 64, 4096, F16, residual=True, m=11),
            gemv("gemv_splitk_m20_f16", 32, 4096, F16, m=20),  # beyond a bucket: two groups
            swiglu(m=16, name="swiglu_gemv_m16_f16"), swiglu(m=1, name="swiglu_gemv_m1_f16"),
            _qkv_rope_gemv_case(m=1, name="qkv_rope_gemv_m1_f16"),
            _qkv_rope_gemv_case(m=7, past=(3, 9, 0, 5, 11, 2, 7), name="qkv_rope_gemv_ragged_f16"),
            # the tensor-core batched kernels at the 1B model's shapes (8 warps split k),
            # an n that is no multiple of 8, and a bf16 one
            gemv("gemv_mma_m16_f16", 2048, 2048, F16, m=16),
            gemv("gemv_mma_residual_m5_f16", 100, 8192, F16, residual=True, m=5),
            gemv("gemv_mma_norm_m9_f16", 200, 2048, F16, norm=True, m=9),
            swiglu(rng_f=512, k=2048, m=12, name="swiglu_gemv_mma_m12_f16"),
            _qkv_rope_gemv_case(h=8, kv=2, d=64, k=2048, m=16, cap=40,
                                past=tuple(range(0, 32, 2)), name="qkv_rope_gemv_mma_m16_f16"),
            # the CUDA-core batched kernels (the `nomma` variant)
            gemv("gemv_cores_m8_f16", 96, 2048, F16, m=8, cores=True),
            gemv("gemv_cores_norm_m6_f16", 80, 256, F16, norm=True, m=6, cores=True),
            gemv("gemv_cores_splitk_residual_m11_f16", 64, 4096, F16, residual=True, m=11,
                 cores=True),
            swiglu(m=16, name="swiglu_gemv_cores_m16_f16", cores=True),
            _qkv_rope_gemv_case(m=7, past=(3, 9, 0, 5, 11, 2, 7), cores=True,
                                name="qkv_rope_gemv_cores_ragged_f16")]


def _qkv_rope_gemv_case(h=4, kv=2, d=32, k=128, m=2, cap=12, past=5,
                        name="qkv_rope_gemv_f16", cores=False) -> Case:
    """`past`: one cached length for all rows, or one per row (a ragged batch)."""
    hd, kvd, n = h * d, kv * d, (h + 2 * kv) * d
    lens = np.broadcast_to(np.asarray(past, np.int32), (m,))

    def make():
        from kiln.codegen.cuda.kernels.gemv import WARPS, qkv_rope_gemv_kernel
        if cores:
            return _cuda_cores(lambda: qkv_rope_gemv_kernel(h, kv, d, k, F16, EPS, warps=WARPS))
        return qkv_rope_gemv_kernel(h, kv, d, k, F16, EPS)

    def inputs(rng):
        ang = rng.uniform(0, 6.3, (m, 1, d))
        return [_normal(rng, (m, k), F16), _normal(rng, (k,), F16, 0.2) + np.float16(1),
                _normal(rng, (n, k), F16, k ** -0.5), np.cos(ang).astype(F16),
                np.sin(ang).astype(F16), _normal(rng, (m, kv, cap, d), F16),
                _normal(rng, (m, kv, cap, d), F16), np.atleast_1d(np.asarray(past, np.int32)),
                _empty((m, hd), F16)]

    def expect(a):
        qkv = _dot(_rms(a[0], a[1]), a[2]).astype(F16)[:, None, :]  # [m, 1, n], stored dtype
        rot = {"head_dim": d, "interleaved": False}
        q = spec.rotary([_f32(qkv[..., :hd]), _f32(a[3]), _f32(a[4])], {**rot, "num_heads": h})
        kk = spec.rotary([_f32(qkv[..., hd:hd + kvd]), _f32(a[3]), _f32(a[4])],
                         {**rot, "num_heads": kv})
        kc, vc = _f32(a[5]).copy(), _f32(a[6]).copy()
        for i in range(m):
            kc[i, :, lens[i]] = kk[0][i].reshape(kv, d)
            vc[i, :, lens[i]] = _f32(qkv[i, 0, hd + kvd:]).reshape(kv, d)
        return {5: kc, 6: vc, 8: q[0][:, 0]}

    return Case(name, make, inputs, expect)


# -- quantized decode GEMV (kernels/quant_gemv.py) ---------------------------------------------

def _quant_case(name, n, k, bits, group, *, symmetric=True, residual=False, norm=False, m=3,
                math=None, outliers=False):
    """`outliers`: a few activation channels at +-2000 (a model's outlier features: codes times
    such activations overflow fp16, weights times them do not)."""
    def make():
        from kiln.codegen.cuda.kernels.quant_gemv import quant_gemv_kernel
        return quant_gemv_kernel(n, k, bits, group, F16, F16, zero_points=not symmetric,
                                 residual=residual, norm_eps=EPS if norm else None, math=math)

    def inputs(rng):
        args = _quant_inputs(rng, n, k, bits, group, symmetric, norm, m)
        if outliers:
            cols = rng.choice(k, 4, replace=False)
            args[0][:, cols] = np.float16(2000) * rng.choice([-1, 1], (m, 4)).astype(F16)
        if residual:
            args.append(_normal(rng, (m, n), F16))
        return [*args, _empty((m, n), F16)]

    def expect(a):
        return {len(a) - 1: _quant_dot(a, k, bits, symmetric, norm)
                + (_f32(a[-2]) if residual else 0)}

    return Case(name, make, inputs, expect)


def _quant_inputs(rng, n, k, bits, group, symmetric, norm, m) -> list:
    """x[m, k], (gamma[k],) and W[n, k] quantized: qweight, scales, (zero points)."""
    q, s, z = qf.quantize_rtn(rng.standard_normal((n, k)).astype(np.float32) * k ** -0.5,
                              bits=bits, group=group, symmetric=symmetric)
    args = [_normal(rng, (m, k), F16)]
    if norm:
        args.append(_normal(rng, (k,), F16, 0.2) + np.float16(1))
    return args + [q, s.astype(F16)] + ([] if z is None else [z.astype(F16)])


def _quant_dot(a, k, bits, symmetric, norm) -> np.ndarray:
    """x (rms-normed with `norm`) . W.T of _quant_inputs' arguments `a`."""
    x, i = (_rms(a[0], a[1]), 2) if norm else (a[0], 1)
    zp = None if symmetric else a[i + 2]
    return _dot(x, qf.dequantize(a[i], a[i + 1], zp, bits=bits, k=k))  # the format's spec


def _quant_swiglu_case(name, f, k, bits, group, *, symmetric=True, norm=False, m=3, math=None,
                       rows=None):
    """quant_gemv_kernel(swiglu=True): W[2f, k] quantized, y[m, f] = silu(x . W[r]) *
    (x . W[f + r]) (x rms-normed first with `norm`), against Split + silu_mul's spec."""
    def make():
        from kiln.codegen.cuda.kernels.quant_gemv import quant_gemv_kernel
        return quant_gemv_kernel(2 * f, k, bits, group, F16, F16, zero_points=not symmetric,
                                 norm_eps=EPS if norm else None, swiglu=True, math=math,
                                 rows=rows)

    def inputs(rng):
        return [*_quant_inputs(rng, 2 * f, k, bits, group, symmetric, norm, m),
                _empty((m, f), F16)]

    def expect(a):
        gu = _quant_dot(a, k, bits, symmetric, norm)
        return {len(a) - 1: spec.silu_mul([gu[:, :f], gu[:, f:]], {})[0]}

    return Case(name, make, inputs, expect)


def _quant_gemv_cases() -> list[Case]:
    return [_quant_case("quant_gemv_int4_sym_g32", 128, 256, 4, 32),
            _quant_case("quant_gemv_int4_zp_g64_residual", 96, 512, 4, 64, symmetric=False,
                        residual=True),
            _quant_case("quant_gemv_int8_channel_norm", 64, 256, 8, 256, norm=True),
            _quant_case("quant_gemv_int8_zp_g32", 64, 128, 8, 32, symmetric=False),
            # the float32 unpacking (the default is f16x2 on fp16: the four above)
            _quant_case("quant_gemv_int4_zp_g32_norm_f32", 128, 256, 4, 32, symmetric=False,
                        norm=True, math="f32"),
            _quant_case("quant_gemv_int8_channel_residual_f32", 64, 256, 8, 256,
                        residual=True, math="f32"),
            # f16x2 with the fused norm and zero points, and a partial last step of 32 lanes
            _quant_case("quant_gemv_int4_zp_g32_norm", 256, 1344, 4, 32, symmetric=False,
                        norm=True),
            _quant_case("quant_gemv_int4_sym_g128_residual", 64, 2048, 4, 128, residual=True),
            # outlier activations (+-2000): the f16x2 products stay finite
            _quant_case("quant_gemv_int8_channel_outliers", 64, 256, 8, 256, outliers=True),
            _quant_case("quant_gemv_int4_zp_g32_outliers", 64, 256, 4, 32, symmetric=False,
                        outliers=True),
            # gate/up GEMV + SwiGLU (y[m, f] of W[2f, k]): f16x2 with zero points and the norm,
            # float32 unpacking, int8 with the norm and two outputs (four rows) per warp
            _quant_swiglu_case("quant_swiglu_gemv_int4_zp_g32_norm", 96, 512, 4, 32,
                               symmetric=False, norm=True),
            _quant_swiglu_case("quant_swiglu_gemv_int4_sym_g64_f32", 64, 256, 4, 64,
                               math="f32"),
            _quant_swiglu_case("quant_swiglu_gemv_int8_channel_norm_rows4", 64, 256, 8, 256,
                               norm=True, rows=4)]



# -- 2:4 sparse decode GEMVs (kernels/sparse_gemv.py) -----------------------------------------

def _two_four(rng, n, k, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, meta) of a seeded 2:4 sparse W[n, k] (kiln.runtime.sparse_format's nm layout)."""
    from kiln.runtime import sparse_format

    g = rng.standard_normal((n, k // 4, 4)) * k ** -0.5
    np.put_along_axis(g, np.argsort(np.abs(g), axis=-1)[..., :2], 0, axis=-1)
    return sparse_format.nm_encode(g.reshape(n, k).astype(dtype))


def _sparse_dense(values, meta, k) -> np.ndarray:
    from kiln.runtime import sparse_format

    return sparse_format.nm_decode(values, meta, k)  # the layout's numpy specification


def _sparse_cases() -> list[Case]:
    def gemv(name, n, k, *, residual=False, norm=False, m=3):
        def make():
            from kiln.codegen.cuda.kernels.sparse_gemv import sparse_gemv_kernel
            return sparse_gemv_kernel(n, k, F16, F16, residual=residual,
                                      norm_eps=EPS if norm else None)

        def inputs(rng):
            args = [_normal(rng, (m, k), F16)]
            if norm:
                args.append(_normal(rng, (k,), F16, 0.2) + np.float16(1))
            args += list(_two_four(rng, n, k, F16))
            if residual:
                args.append(_normal(rng, (m, n), F16))
            return [*args, _empty((m, n), F16)]

        def expect(a):
            x, i = (_rms(a[0], a[1]), 2) if norm else (a[0], 1)
            y = _dot(x, _sparse_dense(a[i], a[i + 1], k))
            return {len(a) - 1: y + (_f32(a[-2]) if residual else 0)}

        return Case(name, make, inputs, expect)

    def swiglu(f=64, k=256):
        def make():
            from kiln.codegen.cuda.kernels.sparse_gemv import sparse_swiglu_gemv_kernel
            return sparse_swiglu_gemv_kernel(f, k, F16, EPS)

        def inputs(rng):
            return [_normal(rng, (3, k), F16), _normal(rng, (k,), F16, 0.2) + np.float16(1),
                    *_two_four(rng, 2 * f, k, F16), _empty((3, f), F16)]

        def expect(a):
            gu = _dot(_rms(a[0], a[1]), _sparse_dense(a[2], a[3], k))
            return {4: spec.silu_mul([gu[:, :f], gu[:, f:]], {})[0]}

        return Case("sparse_swiglu_gemv_f16", make, inputs, expect)

    return [gemv("sparse_gemv_f16", 96, 512), gemv("sparse_gemv_residual_f16", 64, 256,
                                                   residual=True),
            gemv("sparse_gemv_norm_f16", 64, 1024, norm=True), swiglu()]


# -- prefill GEMM tiles (kernels/gemm.py; its default, dlight's schedule, is te_ops' case) -------

def _gemm_cases() -> list[Case]:
    def gemm(name, tile, *, m=100, n=256, k=512, out=F16, bias=True, residual=True, dt=F16):
        def make():
            from kiln.codegen.cuda.kernels.gemm import gemm_kernel
            return gemm_kernel(n, k, dt, out, bias=bias, residual=residual, **tile)

        def inputs(rng):  # m not a multiple of any tile: the padded rows are never written
            args = [_normal(rng, (m, k), dt), _normal(rng, (n, k), dt, k ** -0.5)]
            args += [_normal(rng, (n,), dt)] if bias else []
            args += [_normal(rng, (m, n), out)] if residual else []
            return [*args, _empty((m, n), out)]

        def expect(a):
            y = _dot(a[0], a[1]) + (_f32(a[2]) if bias else 0)
            return {len(a) - 1: y + (_f32(a[-2]) if residual else 0)}

        return Case(name, make, inputs, expect)

    return [
        gemm("gemm_128x128x32_2x4_s3", dict(bm=128, bn=128, bk=32, wm=2, wn=4, stages=3)),
        gemm("gemm_64x128x32_2x2_s2", dict(bm=64, bn=128, bk=32, wm=2, wn=2, stages=2)),
        gemm("gemm_256x64x32_2x4_s3", dict(bm=256, bn=64, bk=32, wm=2, wn=4, stages=3)),
        gemm("gemm_logits_64x64x32_1x4_s2", dict(bm=64, bn=64, bk=32, wm=1, wn=4, stages=2),
             m=37, out=F32, bias=False, residual=False),
        # bf16 (kiln's WMMA intrinsics for it): the default tile, and dlight's tile on it
        gemm("gemm_bf16_128x128x64_2x4_s3", dict(bm=128, bn=128, bk=64, wm=2, wn=4, stages=3),
             dt=BF16, out=BF16),
        gemm("gemm_bf16_logits_dlight_tile", dict(bm=128, bn=128, bk=64, wm=4, wn=4, stages=1),
             m=37, dt=BF16, out=F32, bias=False, residual=False),
    ]


# -- row kernels (kernels/rowwise.py) ----------------------------------------------------------

def _rowwise_cases() -> list[Case]:
    def swiglu():
        from_ = 256

        def make():
            from kiln.codegen.cuda.kernels.rowwise import swiglu_kernel
            return swiglu_kernel(from_, F16)

        return Case("swiglu_f16", make,
                    lambda rng: [_normal(rng, (5, 2 * from_), F16), _empty((5, from_), F16)],
                    lambda a: {1: spec.silu_mul([a[0][:, :from_], a[0][:, from_:]], {})[0]})

    def rms():
        def make():
            from kiln.codegen.cuda.kernels.rowwise import rms_norm_kernel
            return rms_norm_kernel(256, F16, EPS)

        return Case("rms_norm_f16", make,
                    lambda rng: [_normal(rng, (5, 256), F16, 3.0),
                                 _normal(rng, (256,), F16, 0.2) + np.float16(1),
                                 _empty((5, 256), F16)],
                    lambda a: {2: _rms(a[0], a[1])})

    return [swiglu(), rms()]


# -- attention and the KV cache (kernels/attention.py, kernels/flash_attention.py) --------------

def _attention_ref(q, kc, vc, past, h, kv, d):
    """spec.attention over the cache: rows < past are the past, rows past..past+s the new keys."""
    b, s = q.shape[:2]
    new_k = kc[:, :, past:past + s].transpose(0, 2, 1, 3).reshape(b, s, kv * d)
    new_v = vc[:, :, past:past + s].transpose(0, 2, 1, 3).reshape(b, s, kv * d)
    attrs = {"num_heads": h, "num_kv_heads": kv, "head_dim": d, "scale": d ** -0.5,
             "causal": True}
    return spec.attention([_f32(q), _f32(new_k), _f32(new_v), _f32(kc[:, :, :past]),
                           _f32(vc[:, :, :past])], attrs)[0]


def _attention_case(name, kernel, h, kv, d, s, past, *, b=2, cap=None, **kw) -> Case:
    cap = cap or past + s + 3  # rows beyond past + s hold garbage the kernel must not read

    def make():
        from kiln.codegen.cuda.kernels import attention, flash_attention
        fn = {"decode": attention.decode_attention_kernel,
              "prefill": attention.prefill_attention_kernel,
              "flash": flash_attention.flash_prefill_kernel}[kernel]
        return fn(h, kv, d, d ** -0.5, F16, **kw)

    # the warp decode kernel takes a scratch of its splits' states before the output
    scratch = kernel == "decode" and d % 32 == 0 and kw.get("warps", True)

    def inputs(rng):
        part = [_empty((b, s, h, MAX_SPLITS, d + 2), "float32")] if scratch else []
        return [_normal(rng, (b, s, h * d), F16), _normal(rng, (b, kv, cap, d), F16),
                _normal(rng, (b, kv, cap, d), F16), np.array([past], np.int32), *part,
                _empty((b, s, h * d), F16)]

    out = 5 if scratch else 4
    return Case(name, make, inputs,
                lambda a: {out: _attention_ref(a[0], a[1], a[2], past, h, kv, d)})


def _attention_cases() -> list[Case]:
    def past():
        def make():
            from kiln.codegen.cuda.kernels.attention import past_kernel
            return past_kernel()

        return Case("kv_past", make, lambda rng: [int(rng.integers(1, 1000)),
                                                  _empty((1,), "int32")],
                    lambda a: {1: np.array([a[0]], np.int32)}, tol=0.0)

    def append(kv=2, d=32, b=2, s=5, cap=16, p=3):
        def make():
            from kiln.codegen.cuda.kernels.attention import kv_append_kernel
            return kv_append_kernel(kv, d, F16)

        def inputs(rng):
            return [_normal(rng, (b, kv, cap, d), F16), _normal(rng, (b, kv, cap, d), F16),
                    _normal(rng, (b, s, kv * d), F16), _normal(rng, (b, s, kv * d), F16),
                    np.array([p], np.int32)]

        def expect(a):
            kc, vc = a[0].copy(), a[1].copy()
            kc[:, :, p:p + s] = a[2].reshape(b, s, kv, d).transpose(0, 2, 1, 3)
            vc[:, :, p:p + s] = a[3].reshape(b, s, kv, d).transpose(0, 2, 1, 3)
            return {0: kc, 1: vc}

        return Case("kv_append_f16", make, inputs, expect, tol=0.0)

    return [past(), append(),
            _attention_case("decode_attention_warps_f16", "decode", 4, 2, 64, 1, 40),
            _attention_case("decode_attention_warps_s3_f16", "decode", 4, 1, 64, 3, 17),
            # split-KV: one split used (17 keys), several with a ragged last share, all 16
            _attention_case("decode_attention_split4_short_f16", "decode", 4, 2, 64, 1, 16,
                            splits=4),
            _attention_case("decode_attention_split4_f16", "decode", 4, 2, 64, 3, 700,
                            splits=4, dw=4, du=8),
            _attention_case("decode_attention_split16_f16", "decode", 8, 2, 128, 1, 2100,
                            splits=16, dw=8, du=4),
            _attention_case("decode_attention_threads_f16", "decode", 6, 2, 48, 1, 23),
            _attention_case("prefill_attention_f16", "prefill", 4, 2, 64, 37, 5),
            _attention_case("flash_prefill_f16", "flash", 4, 2, 64, 70, 9),
            _attention_case("flash_prefill_ldsm_f16", "flash", 8, 2, 128, 33, 0, ldsm=True),
            *(_qkv_rotary_append_case(rot, inter) for rot, inter in ((32, False), (16, True))),
            *_kv8_cases()]


def _qkv_rotary_append_case(rot, interleaved, h=4, kv=2, d=32, b=2, s=4, cap=10, p=2) -> Case:
    hd, kvd = h * d, kv * d

    def make():
        from kiln.codegen.cuda.kernels.attention import qkv_rotary_append_kernel
        return qkv_rotary_append_kernel(h, kv, d, rot, interleaved, F16)

    def inputs(rng):
        ang = rng.uniform(0, 6.3, (1, s, rot))
        return [_normal(rng, (b, s, hd + 2 * kvd), F16), np.cos(ang).astype(F16),
                np.sin(ang).astype(F16), _normal(rng, (b, kv, cap, d), F16),
                _normal(rng, (b, kv, cap, d), F16), np.array([p], np.int32),
                _empty((b, s, hd), F16)]

    def expect(a):
        attrs = {"head_dim": d, "interleaved": interleaved}
        q = spec.rotary([a[0][..., :hd], a[1], a[2]], {**attrs, "num_heads": h})[0]
        k = spec.rotary([a[0][..., hd:hd + kvd], a[1], a[2]], {**attrs, "num_heads": kv})[0]
        kc, vc = a[3].copy(), a[4].copy()
        kc[:, :, p:p + s] = k.reshape(b, s, kv, d).transpose(0, 2, 1, 3)
        vc[:, :, p:p + s] = a[0][..., hd + kvd:].reshape(b, s, kv, d).transpose(0, 2, 1, 3)
        return {3: kc, 4: vc, 6: q}

    return Case(f"qkv_rotary_append_r{rot}{'_interleaved' if interleaved else ''}_f16", make,
                inputs, expect)


# -- the int8 KV cache (kv8: kernels/attention.py's kv_append_q8_kernel and kv8=True) ----------

def _kv8_quantize(x) -> tuple[np.ndarray, np.ndarray]:
    """Rows x[..., D] as an int8 cache keeps them: (codes int8, scales (..., 1) float32), scale
    absmax / 127 and codes * scale the specification's values (spec.kv8_roundtrip, codes read
    back from them)."""
    x32 = _f32(x)
    scale = np.abs(x32).max(-1, keepdims=True) / np.float32(127)
    value = spec.kv8_roundtrip(x32)
    codes = np.rint(np.divide(value, scale, out=np.zeros_like(value), where=scale > 0))
    return codes.astype(np.int8), scale


def _kv8_append_case(name, kv, d, *, b=2, s=5, cap=16, past=(3, 7)) -> Case:
    """The new rows quantized into caches of garbage at each batch row's own past; bit-exact
    (IEEE divisions and round-half-even in the kernel). One K row has absmax 127 and halves
    (ties: rounded to even), one V row is zero (scale 0, codes 0)."""
    def make():
        from kiln.codegen.cuda.kernels.attention import kv_append_q8_kernel
        return kv_append_q8_kernel(kv, d, F16)

    def inputs(rng):
        k, v = (_normal(rng, (b, s, kv * d), F16) for _ in "kv")
        k[0, 0, :d] = np.r_[127, np.arange(d - 1) % 8 - 3.5]
        v[-1, -1, -d:] = 0
        return [*(rng.integers(-127, 128, (b, kv, cap, d), dtype=np.int8) for _ in "kv"),
                *(_normal(rng, (b, kv, cap, 1), F32) for _ in "kv"), k, v,
                np.array(past, np.int32)]

    def expect(a):
        out = {i: a[i].copy() for i in range(4)}
        for new, codes_at, scales_at in ((a[4], 0, 2), (a[5], 1, 3)):
            codes, scales = _kv8_quantize(new.reshape(b, s, kv, d).transpose(0, 2, 1, 3))
            for r in range(b):
                p = past[min(r, len(past) - 1)]
                out[codes_at][r, :, p:p + s] = codes[r]
                out[scales_at][r, :, p:p + s] = scales[r]
        return out

    return Case(name, make, inputs, expect, tol=0.0)


def _kv8_attention_ref(a, past, h, kv, d, window=0) -> np.ndarray:
    """spec.attention over the int8 caches' values (codes * scales), batch row r over its own
    past[r] (past[0] for every row where past has one element)."""
    q, kc, vc, ks, vs = a[:5]
    s = q.shape[1]
    kf, vf = kc.astype(np.float32) * ks, vc.astype(np.float32) * vs
    attrs = {"num_heads": h, "num_kv_heads": kv, "head_dim": d, "scale": d ** -0.5,
             "causal": True, **({"window": window} if window else {})}
    rows = []
    for r in range(q.shape[0]):
        p = past[min(r, len(past) - 1)]
        new_k, new_v = (c[r:r + 1, :, p:p + s].transpose(0, 2, 1, 3).reshape(1, s, kv * d)
                        for c in (kf, vf))
        rows.append(spec.attention([_f32(q[r:r + 1]), new_k, new_v, kf[r:r + 1, :, :p],
                                    vf[r:r + 1, :, :p]], attrs)[0])
    return np.concatenate(rows)


def _kv8_attention_case(name, kernel, h, kv, d, s, past, *, b=2, **kw) -> Case:
    """kernel: decode (the warp kernel where d % 32 == 0, else the thread kernel), window or
    prefill, over int8 caches holding quantized normal rows; `past` per batch row (decode,
    window) or one for all (prefill)."""
    cap = max(past) + s + 3  # rows beyond past + s hold rows the kernel must not read

    def make():
        from kiln.codegen.cuda.kernels import attention
        if kernel == "window":
            return attention.window_attention_kernel(h, kv, d, d ** -0.5, F16, kw["window"],
                                                     kv8=True)
        fn = {"decode": attention.decode_attention_kernel,
              "prefill": attention.prefill_attention_kernel}[kernel]
        return fn(h, kv, d, d ** -0.5, F16, kv8=True, **kw)

    scratch = kernel == "decode" and d % 32 == 0  # the warp kernel's splits' states

    def inputs(rng):
        (kc, ks), (vc, vs) = (_kv8_quantize(rng.standard_normal((b, kv, cap, d)))
                              for _ in "kv")
        part = [_empty((b, s, h, MAX_SPLITS, d + 2), "float32")] if scratch else []
        return [_normal(rng, (b, s, h * d), F16), kc, vc, ks, vs, np.array(past, np.int32),
                *part, _empty((b, s, h * d), F16)]

    out = 7 if scratch else 6
    return Case(name, make, inputs,
                lambda a: {out: _kv8_attention_ref(a, past, h, kv, d, kw.get("window", 0))})


def _kv8_cases() -> list[Case]:
    return [_kv8_append_case("kv_append_q8_f16", 2, 64),
            _kv8_append_case("kv_append_q8_d48_decode_f16", 3, 48, s=1, past=(9,)),
            _kv8_attention_case("decode_attention_kv8_f16", "decode", 4, 2, 64, 1, (40, 29)),
            _kv8_attention_case("decode_attention_kv8_split4_f16", "decode", 4, 2, 64, 3,
                                (700, 650), splits=4, dw=4, du=8),
            _kv8_attention_case("decode_attention_kv8_split16_f16", "decode", 8, 2, 128, 1,
                                (2100, 1500), splits=16, dw=8, du=4),
            _kv8_attention_case("decode_attention_kv8_threads_f16", "decode", 6, 2, 48, 1,
                                (23, 11)),
            _kv8_attention_case("window_attention_kv8_f16", "window", 4, 2, 48, 3, (20, 13),
                                window=8),
            _kv8_attention_case("prefill_attention_kv8_f16", "prefill", 4, 2, 64, 37, (5,)),
            _kv8_attention_case("prefill_attention_kv8_d48_f16", "prefill", 4, 1, 48, 20, (0,))]


# -- tensor-expression ops (kernels/te_ops.py), scheduled by dlight as the CUDA pipeline does ---

def _te_cases() -> list[Case]:
    def te_case(name, build, inputs, expect, **kw):
        return Case(name, build, inputs, expect, te=True, **kw)

    def placeholders(*specs):
        from tvm import te
        return [te.placeholder(shape, dtype, name=f"a{i}") for i, (shape, dtype) in
                enumerate(specs)]

    def nt_matmul():
        def make():
            from kiln.codegen.cuda.kernels import te_ops
            x, w = placeholders(((33, 128), F16), ((96, 128), F16))
            return [x, w, te_ops.nt_matmul(x, w, F32)]

        return te_case("te_nt_matmul_f16", make,
                       lambda rng: [_normal(rng, (33, 128), F16), _normal(rng, (96, 128), F16),
                                    _empty((33, 96), F32)],
                       lambda a: {2: _dot(a[0], a[1])}, tol=1e-4)

    def rms_norm():
        def make():
            from kiln.codegen.cuda.kernels import te_ops
            x, w = placeholders(((7, 320), F16), ((320,), F16))
            return [x, w, te_ops.rms_norm(x, w, EPS)]

        return te_case("te_rms_norm_f16", make,
                       lambda rng: [_normal(rng, (7, 320), F16, 2.0),
                                    _normal(rng, (320,), F16, 0.2) + np.float16(1),
                                    _empty((7, 320), F16)],
                       lambda a: {2: _rms(a[0], a[1])})

    def silu_mul():
        def make():
            from kiln.codegen.cuda.kernels import te_ops
            g, u = placeholders(((6, 160), F16), ((6, 160), F16))
            return [g, u, te_ops.silu_mul(g, u)]

        return te_case("te_silu_mul_f16", make,
                       lambda rng: [_normal(rng, (6, 160), F16), _normal(rng, (6, 160), F16),
                                    _empty((6, 160), F16)],
                       lambda a: {2: spec.silu_mul([a[0], a[1]], {})[0]})

    def rotary(interleaved, rot):
        h, d, b, s = 3, 32, 2, 5

        def make():
            from kiln.codegen.cuda.kernels import te_ops
            x, c, sn = placeholders(((b, s, h * d), F16), ((1, s, rot), F16), ((1, s, rot), F16))
            return [x, c, sn, te_ops.rotary(x, c, sn, h, d, interleaved)]

        def inputs(rng):
            ang = rng.uniform(0, 6.3, (1, s, rot))
            return [_normal(rng, (b, s, h * d), F16), np.cos(ang).astype(F16),
                    np.sin(ang).astype(F16), _empty((b, s, h * d), F16)]

        attrs = {"num_heads": h, "head_dim": d, "interleaved": interleaved}
        return te_case(f"te_rotary_r{rot}{'_interleaved' if interleaved else ''}_f16", make,
                       inputs, lambda a: {3: spec.rotary([_f32(x) for x in a[:3]], attrs)[0]})

    def layer_norm():  # (kernels/te_fallback.py: the generic lowerings' TE computes)
        def make():
            from kiln.codegen.cuda.kernels import te_fallback
            x, w, b = placeholders(((7, 320), F16), ((320,), F16), ((320,), F16))
            return [x, w, b, te_fallback.layer_norm(x, w, b, EPS)]

        return te_case("te_layer_norm_f16", make,
                       lambda rng: [_normal(rng, (7, 320), F16, 2.0) + np.float16(0.5),
                                    _normal(rng, (320,), F16, 0.2) + np.float16(1),
                                    _normal(rng, (320,), F16, 0.1), _empty((7, 320), F16)],
                       lambda a: {3: spec.layer_norm([_f32(x) for x in a[:3]], {"eps": EPS})[0]})

    def gelu_mul():
        def make():
            from kiln.codegen.cuda.kernels import te_fallback
            g, u = placeholders(((6, 160), F16), ((6, 160), F16))
            return [g, u, te_fallback.gelu_mul(g, u, tanh=True)]

        return te_case("te_gelu_tanh_mul_f16", make,
                       lambda rng: [_normal(rng, (6, 160), F16, 2.0), _normal(rng, (6, 160), F16),
                                    _empty((6, 160), F16)],
                       lambda a: {2: spec.gelu_mul([_f32(a[0]), _f32(a[1])],
                                                   {"approximate": "tanh"})[0]})

    def last_position():
        def make():
            from kiln.codegen.cuda.kernels import te_ops
            (x,) = placeholders(((2, 9, 64), F16))
            return [x, te_ops.last_position(x)]

        return te_case("te_last_position_f16", make,
                       lambda rng: [_normal(rng, (2, 9, 64), F16), _empty((2, 1, 64), F16)],
                       lambda a: {1: a[0][:, -1:]}, tol=0.0)

    def quant_matmul(bits, group, symmetric, m=40, n=64, k=160):
        kp = qf.padded_k(k, group)

        def make():
            from kiln.codegen.cuda.kernels import te_ops
            specs = [((m, k), F16), ((n, qf.packed_columns(kp, bits)), qf.qweight_dtype(bits)),
                     ((n, kp // group), F16)] + ([] if symmetric else [((n, kp // group), F16)])
            ph = placeholders(*specs)
            zp = None if symmetric else ph[3]
            return [*ph, te_ops.quant_nt_matmul(ph[0], ph[1], ph[2], zp, bits=bits, group=group,
                                                k=k, out_dtype=F32)]

        def inputs(rng):
            q, s, z = qf.quantize_rtn(rng.standard_normal((n, k)).astype(np.float32) * 0.1,
                                      bits=bits, group=group, symmetric=symmetric)
            return [_normal(rng, (m, k), F16), q, s.astype(F16),
                    *([] if z is None else [z.astype(F16)]), _empty((m, n), F32)]

        def expect(a):
            w = qf.dequantize(a[1], a[2], None if symmetric else a[3], bits=bits, k=k)
            # the kernel rounds the dequantized weight to fp16 before the tensor-core product
            return {len(a) - 1: _dot(a[0], w.astype(F16))}

        return te_case(f"te_quant_nt_matmul_int{bits}_g{group}{'' if symmetric else '_zp'}",
                       make, inputs, expect, tol=1e-4)

    def quant_rows(bits=8, m=6, n=50, k=96):
        def make():
            from kiln.codegen.cuda.kernels import te_ops
            q, s, ids = placeholders(((n, qf.packed_columns(k, bits)), qf.qweight_dtype(bits)),
                                     ((n, 1), F16), ((m,), "int64"))
            return [q, s, ids, te_ops.quant_rows(q, s, None, ids, bits=bits, group=k, k=k,
                                                 dtype=F16)]

        def inputs(rng):
            q, s, _ = qf.quantize_rtn(rng.standard_normal((n, k)).astype(np.float32),
                                      bits=bits, group=0)
            return [q, s.astype(F16), rng.integers(0, n, m), _empty((m, k), F16)]

        return te_case(f"te_quant_rows_int{bits}", make, inputs,
                       lambda a: {3: qf.dequantize(a[0], a[1], None, bits=bits)[a[2]]})

    def sparse_matmul(m=24, n=64, k=128):
        def make():
            from kiln.codegen.cuda.kernels import te_ops
            x, v, meta = placeholders(((m, k), F16), ((n, k // 2), F16), ((n, k // 8), "uint8"))
            return [x, v, meta, te_ops.sparse_nt_matmul(x, v, meta, k=k, out_dtype=F32)]

        return te_case("te_sparse_nt_matmul_f16", make,
                       lambda rng: [_normal(rng, (m, k), F16), *_two_four(rng, n, k, F16),
                                    _empty((m, n), F32)],
                       lambda a: {3: _dot(a[0], _sparse_dense(a[1], a[2], k))}, tol=1e-4)

    return [nt_matmul(), rms_norm(), silu_mul(), rotary(False, 32), rotary(True, 16),
            last_position(), layer_norm(), gelu_mul(), quant_matmul(4, 32, False),
            quant_matmul(8, 32, True),
            quant_rows(), sparse_matmul()]


def cases() -> list[Case]:
    return [*_gemv_cases(), *_quant_gemv_cases(), *_sparse_cases(), *_gemm_cases(),
            *_rowwise_cases(), *_attention_cases(), *_te_cases()]


# -- building (needs TVM's compiler and nvcc) ----------------------------------------------------

def build(out: Path, arch: str = "sm_90") -> Path:
    """Compile every case into out/kernels.so (one function per case, named after it) and list
    them in out/cases.json; no inputs or outputs are written: they are made where the test runs."""
    import tvm
    from tvm import te

    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import pdl

    ct.ensure_cuda_codegen()
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    funcs = {}
    for c in cases():
        made = c.make()
        func = te.create_prim_func(made) if c.te else made
        funcs[c.name] = func.with_attr("global_symbol", c.name)
    mod = tvm.IRModule(funcs)
    with ct.cuda_compile_env(target), ct.async_copies():  # cp.async, as kiln compile has it
        mod = _schedule_te(mod, [c.name for c in cases() if c.te])
        lib = tvm.tirx.build(mod, target, pipeline=pdl.PIPELINE)
    out.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(out / "kernels.so"))
    ct.require_fatbin(out / "kernels.so", arch)
    (out / "cases.json").write_text(json.dumps({"arch": arch, "cases": sorted(funcs)}, indent=1))
    return out


def _schedule_te(mod, names: list[str]):
    """The TE functions scheduled by dlight's GPU rules, in the CUDA pipeline's order."""
    import tvm
    from tvm.s_tir import dlight as dl

    te_mod = tvm.IRModule({n: mod[n] for n in names})
    te_mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                     dl.gpu.GeneralReduction(), dl.gpu.Fallback())(te_mod)
    return tvm.IRModule({n: te_mod[n] if n in names else mod[n] for n in
                         [gv.name_hint for gv in mod.get_global_vars()]})


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1])))
