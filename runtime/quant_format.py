"""kiln's quantized weight format, in one place: code offsets, groups, nibble packing, layouts,
the round-to-nearest quantizer and `dequantize`, the numpy specification every kernel matches.

Numpy only: the compiler's passes, the interpreter, the kernels' generators (they read the
constants below; their arithmetic stays in codegen), the runtime and the GPU host's converter
all use it, so the format is written down once.

A weight W[N, K] quantized with `bits` b (8 or 4) in groups of g consecutive k (g = K: one group
per output channel) is stored in the `nk` layout as

    qweight      int8[N, Kp]       b = 8: one code per weight
                 uint8[N, Kp / 2]  b = 4: byte j holds k = 2j in its low nibble, 2j + 1 in its high
    scales       float[N, G]       G = Kp / g; Kp = G * g (K padded with zero weights)
    zero_points  float[N, G]       integers held in float; absent for symmetric schemes

    W[n, k] = (qweight code at (n, k) - zp[n, k // g]) * scales[n, k // g]

and the codes are stored shifted so that they fit their storage type (STORAGE_SHIFT):
symmetric int8: codes -128..127 as they are, no zero points (zp = 0);
symmetric int4: codes -8..7 stored +8 as nibbles 0..15, no zero points (zp = INT4_OFFSET = 8);
asymmetric int8: codes 0..255 and their zero points stored -128 (INT8_SHIFT) as int8;
asymmetric int4: codes 0..15 as nibbles, zero points as they are.
The shift cancels in (code - zp), so dequantize needs only `bits` and whether zp is present.

The CPU kernels' `blocked` layout of any of these per-row arrays a[N, C] (qweight bytes, scales,
zero points): [Np / B, C, B] with B = LANES, rows zero-padded to Np; blocked[nb, c, l] =
a[nb * B + l, c], so one group's B scales are one vector load.
"""

from __future__ import annotations

import numpy as np

#: symmetric int4 codes -8..7 are stored as unsigned nibbles code + 8 (the implied zero point)
INT4_OFFSET = 8
#: asymmetric int8 codes 0..255 and their zero points are stored as int8, shifted by -128
INT8_SHIFT = 128
#: the mask of one int4 code in its byte (low nibble: even k; high nibble, >> 4: odd k)
NIBBLE_MASK = 0xF
#: rows per block of the CPU kernels' `blocked` layout (16 float32 lanes of AVX-512)
LANES = 16

#: scale shrink factors tried per group: clipping the largest weights a little can lower the
#: rounding error of all the others (round-to-nearest with a searched clip, no calibration data)
CLIP_SEARCH = tuple(float(f) for f in np.linspace(1.0, 0.7, 13))


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The codes' arithmetic range: [-2^(b-1), 2^(b-1) - 1] symmetric, [0, 2^b - 1] else."""
    return ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1))


def storage_shift(bits: int, symmetric: bool) -> int:
    """What is added to a code (and a zero point) to store it: +8 symmetric int4, -128
    asymmetric int8, 0 otherwise."""
    if bits == 4:
        return INT4_OFFSET if symmetric else 0
    return 0 if symmetric else -INT8_SHIFT


def default_zero_point(bits: int) -> int:
    """The zero point of stored codes that come without zero points (symmetric schemes)."""
    return storage_shift(bits, True)


def qweight_dtype(bits: int) -> str:
    """uint8 (two int4 codes a byte) or int8."""
    return "uint8" if bits == 4 else "int8"


def groups_of(k: int, group: int) -> tuple[int, int]:
    """(group size, number of groups) for K; a group size of 0 means per output channel."""
    g = group or k
    return g, -(-k // g)


def padded_k(k: int, group: int) -> int:
    """Kp: K rounded up to whole groups."""
    g, ng = groups_of(k, group)
    return g * ng


def packed_columns(kp: int, bits: int) -> int:
    """qweight's columns for Kp codes a row: Kp / 2 bytes for int4, Kp for int8."""
    return kp // 2 if bits == 4 else kp


def unpacked_columns(columns: int, bits: int) -> int:
    """Kp, the codes a row of `columns` qweight bytes holds (packed_columns' inverse)."""
    return columns * 2 if bits == 4 else columns


def store(codes: np.ndarray, zero_points: np.ndarray | None, *, bits: int, symmetric: bool,
          ) -> tuple[np.ndarray, np.ndarray | None]:
    """Arithmetic codes[N, Kp] (and zero points[N, G]) -> their stored form, unpacked:
    (codes + storage_shift as qweight_dtype, zero points + storage_shift as float32)."""
    shift = storage_shift(bits, symmetric)
    q = (codes + shift).astype(qweight_dtype(bits))
    return q, None if zero_points is None else (zero_points + shift).astype(np.float32)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """codes[..., 2j] in the low nibble, codes[..., 2j+1] in the high one: [..., Kp / 2]."""
    q = q.astype(np.uint8)
    return (q[..., 0::2] & NIBBLE_MASK) | ((q[..., 1::2] & NIBBLE_MASK) << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """pack_nibbles' inverse: [..., C] bytes -> [..., 2C] uint8 codes."""
    p = np.asarray(packed, np.uint8)
    return np.stack([p & NIBBLE_MASK, p >> 4], axis=-1).reshape(*p.shape[:-1], -1)


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Stored codes[N, Kp] -> qweight: nibbles packed for int4, as they are for int8."""
    return pack_nibbles(q) if bits == 4 else q


def blocked(a: np.ndarray, block: int = LANES) -> np.ndarray:
    """a[N, C] -> [Np / block, C, block], zero-padded rows (the CPU kernels' layout)."""
    n, c = a.shape
    rows = -(-n // block) * block
    pad = np.zeros((rows, c), a.dtype)
    pad[:n] = a
    return np.ascontiguousarray(pad.reshape(rows // block, block, c).transpose(0, 2, 1))


def unblocked(a: np.ndarray, rows: int) -> np.ndarray:
    """blocked's inverse: [Np / B, C, B] -> the first `rows` rows of [Np, C]."""
    return a.transpose(0, 2, 1).reshape(-1, a.shape[1])[:rows]


def dequantize(qweight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *,
               bits: int, k: int | None = None) -> np.ndarray:
    """The float32 weight [N, Kp] (its first `k` columns when given) an `nk` triple stands for:
    W[n, k] = (code[n, k] - zp[n, k // g]) * scales[n, k // g], zp = default_zero_point(bits)
    without zero points; half-precision scales (bfloat16 as ml_dtypes or its uint16 bits) are
    widened to float32 first."""
    q = (unpack_nibbles(qweight) if bits == 4 else np.asarray(qweight)).astype(np.float32)
    n, kp = q.shape
    groups = scales.shape[1]
    from kiln.runtime.params import to_float32  # params re-exports this module's names

    zp = (np.float32(default_zero_point(bits)) if zero_points is None
          else to_float32(zero_points)[..., None])
    w = (q.reshape(n, groups, kp // groups) - zp) * to_float32(scales)[..., None]
    w = w.reshape(n, kp).astype(np.float32)
    return w if k is None else np.ascontiguousarray(w[:, :k])


# -- the round-to-nearest quantizer ------------------------------------------------------------

def quantize_codes(w: np.ndarray, *, bits: int, group: int, symmetric: bool = True,
                   clip: tuple[float, ...] = (1.0,),
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """w[N, K] -> (stored codes[N, Kp] unpacked, scales float32[N, G], stored zero points
    float32[N, G] | None), rounded to nearest; K zero-padded to whole groups.

    Symmetric: the group's largest weight by magnitude sets the scale's sign so that it lands on
    the end of code_range with the extra level (-8 for int4). Asymmetric: [min, max] (widened to
    hold 0) mapped onto code_range with a zero point. Then, per group, the scale shrunk by the
    factor of `clip` that reconstructs the group best is kept. kiln.passes.quantize quantizes
    with this (clip=CLIP_SEARCH), so the GPU host's conversion gives the compiler's bytes."""
    n, k = w.shape
    g = group or k
    wp = np.zeros((n, padded_k(k, g)), np.float32)
    wp[:, :k] = w
    wg = wp.reshape(n, -1, g)
    lo, hi = code_range(bits, symmetric)
    if symmetric:
        peak = np.take_along_axis(wg, np.abs(wg).argmax(axis=2)[..., None], axis=2)[..., 0]
        base = (peak / np.float32(lo)).astype(np.float32)  # peak -> the lowest code
        base = np.where(base != 0, base, np.float32(1)).astype(np.float32)

        def codes(s: np.ndarray) -> tuple[np.ndarray, None]:
            return np.clip(np.rint(wg / s[..., None]), lo, hi), None
    else:
        lo_v, hi_v = np.minimum(wg.min(axis=2), 0), np.maximum(wg.max(axis=2), 0)
        base = ((hi_v - lo_v) / np.float32(hi)).astype(np.float32)
        base = np.where(base > 0, base, np.float32(1)).astype(np.float32)

        def codes(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            zp = np.clip(np.rint(-lo_v / s), 0, hi)
            return np.clip(np.rint(wg / s[..., None]) + zp[..., None], 0, hi), zp

    c, zp, s = _clip_searched(wg, base, codes, clip)
    q, zp = store(c.reshape(n, -1), zp, bits=bits, symmetric=symmetric)
    return q, s, zp


def quantize_rtn(w: np.ndarray, *, bits: int, group: int, symmetric: bool = True,
                 clip: tuple[float, ...] = (1.0,),
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """w[N, K] -> (qweight, scales, zero_points | None) as stored (`nk`): quantize_codes'
    codes, int4 packed two per byte."""
    q, s, zp = quantize_codes(w, bits=bits, group=group, symmetric=symmetric, clip=clip)
    return pack_codes(q, bits), s, zp


def _clip_searched(wg: np.ndarray, base: np.ndarray, codes, clip: tuple[float, ...]):
    """(codes, zero points, scales) of the factor f in `clip` whose scale base * f
    reconstructs each group of wg best (the first one on ties); `codes(scales)` gives the codes
    and zero points (None without) of a candidate."""
    best_q = best_zp = best_s = best_err = None
    for f in clip:
        s = (base * np.float32(f)).astype(np.float32)
        q, zp = codes(s)
        deq = (q - (zp[..., None] if zp is not None else 0)) * s[..., None]
        err = ((deq - wg) ** 2).sum(axis=2)
        if best_err is None:
            best_q, best_zp, best_s, best_err = q, zp, s, err
            continue
        better = err < best_err
        best_q = np.where(better[..., None], q, best_q)
        best_s = np.where(better, s, best_s)
        best_err = np.where(better, err, best_err)
        if zp is not None:
            best_zp = np.where(better, zp, best_zp)
    return best_q, best_zp, best_s


# -- int8 activations (the `-a8` presets) -----------------------------------------------------

#: an int8 activation's largest code: symmetric, so that -x quantizes to -q
ACT_MAX = 127
#: columns sharing one activation scale (as llama.cpp's Q8_0 blocks): per-token scales alone
#: let one outlier channel flatten a whole row (SmolLM2-135M w8-a8 per token: top-1 0.88 on
#: the shipped text, benchmarks/RESULTS.md)
ACT_GROUP = 32


def quantize_rows(x: np.ndarray, group: int = ACT_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic symmetric int8 activations per row (token) and group of `group` columns (the
    last group may be shorter): x[..., K] -> (codes int8 [..., K], scales float32 [..., G]),
    scale = max|x| / 127 over the group (1 for a group of zeros) and code = rint(x * (1 /
    scale)) clipped to +-127, every step in float32 (the kernels' arithmetic)."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    pad = -k % group
    xg = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, group)
    amax = np.abs(xg).max(axis=-1)
    scale = np.where(amax > 0, amax / np.float32(ACT_MAX), np.float32(1)).astype(np.float32)
    inv = (np.float32(1) / scale).astype(np.float32)
    codes = np.clip(np.rint(xg * inv[..., None]), -ACT_MAX, ACT_MAX).astype(np.int8)
    return codes.reshape(*x.shape[:-1], -1)[..., :k], scale


def fake_quantize_rows(x: np.ndarray, group: int = ACT_GROUP) -> np.ndarray:
    """x as the int8 kernels see it: quantize_rows' codes times their group's scale (float32)."""
    codes, scale = quantize_rows(x, group)
    return codes.astype(np.float32) * np.repeat(scale, group, axis=-1)[..., :x.shape[-1]]
