"""Numpy reference of kiln's canonical transformer ops: the specification of their semantics.

Layouts (b: batch, s: new tokens, P: past tokens, H/KV: query/key-value heads, D: head_dim):
    linear      x[..., K], w[N, K], b?[N]                              -> [..., N]
    embedding   table[V, E], ids[...]                                   -> [..., E]
    rms_norm    x[..., E], w[E]            eps                          -> like x
                group_size? G: x[..., E] with E = n*G, w[G]: each run of G consecutive
                features (a head) normalized on its own: x.reshape(..., n, G) normed over G
    layer_norm  x[..., E], w[E], b?[E]     eps                          -> like x
    gelu        x                          approximate: "none" | "tanh" -> like x
    silu        x                                                       -> like x
    silu_mul    gate, up (same shape)                                   -> silu(gate) * up
    gelu_mul    gate, up (same shape)      approximate: "none" | "tanh" -> gelu(gate) * up
    rotary      x[b, s, H*D], cos[b|1, s, R], sin[b|1, s, R]
                num_heads, head_dim, interleaved                         -> like x
                (the first R dims of each head rotate; the rest pass through)
    attention   q[b, s, H*D], k[b, s, KV*D], v[b, s, KV*D],
                past_k?[b, KV, P, D], past_v?[b, KV, P, D],
                mask?[b, P+s] (nonzero: may attend), bias?[.., s, P+s] (added to scores)
                num_heads, num_kv_heads, head_dim, scale, causal, window?
                -> out[b, s, H*D], present_k[b, KV, P+s, D], present_v[b, KV, P+s, D]
                (causal: query i sees keys j <= P+i; window W > 0, only with causal: and
                j > P+i-W, i.e. the W most recent keys including its own: a sliding window)
    quant_linear    x[..., K], qweight, scales, zero_points?, bias?[N]
                    bits, group_size, in_features K, out_features N, layout  -> [..., N]
                    y = x @ dequantize(qweight, scales, zero_points)^T (+ bias), in float32
    quant_embedding qtable, scales, zero_points?, ids[...]                    -> [..., K]
                    rows `ids` of the dequantized table (a tied LM head's weight)
                    (the quantized format and its dequantization: kiln.runtime.quant_format;
                    `dequantize` below reads either layout)
    sparse_linear   x[..., K], values, meta, scales?[N], bias?[N]
                    layout ("nm" | "bitmap"), in_features K, out_features N
                    y = x @ W^T (+ bias), W[N, K] = sparse_format.decode(values, meta) (times
                    scales[n] per row when the values are int8 codes; computed in float32
                    then), layouts: kiln.runtime.sparse_format
Norms and softmax accumulate in float32 whatever the storage dtype. A query row that may attend
to no key at all (a padded position) outputs zeros.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.compiler.interpreter import kernel
from kiln.runtime import quant_format, sparse_format


@kernel("linear")
def linear(inputs, attrs):
    x, w, b = (*inputs, None)[:3]
    y = np.matmul(x, w.T.astype(x.dtype, copy=False))
    if b is not None:
        y = y + b
    return [y.astype(x.dtype, copy=False)]


@kernel("embedding")
def embedding(inputs, attrs):
    table, ids = inputs
    return [table[ids.astype(np.int64)]]


@kernel("rms_norm")
def rms_norm(inputs, attrs):
    x, w = inputs
    group = attrs.get("group_size")
    x32 = x.astype(np.float32)
    if group is not None:  # per-head norm (q_norm/k_norm) on the flat projection
        x32 = x32.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    inv = 1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + np.float32(attrs["eps"]))
    return [(x32 * inv * w.astype(np.float32)).reshape(x.shape).astype(x.dtype)]


@kernel("layer_norm")
def layer_norm(inputs, attrs):
    x, w, b = (*inputs, None)[:3]
    x32 = x.astype(np.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x32 - mean) / np.sqrt(var + np.float32(attrs["eps"])) * w.astype(np.float32)
    if b is not None:
        y = y + b.astype(np.float32)
    return [y.astype(x.dtype)]


def _gelu32(x: np.ndarray, approximate: str) -> np.ndarray:
    x32 = x.astype(np.float32)
    if approximate == "tanh":
        c = np.float32(math.sqrt(2.0 / math.pi))
        return 0.5 * x32 * (1.0 + np.tanh(c * (x32 + np.float32(0.044715) * x32 ** 3)))
    from kiln.compiler.interpreter.onnx_ops import erf

    return 0.5 * x32 * (1.0 + erf(x32 / np.float32(math.sqrt(2.0))))


@kernel("gelu")
def gelu(inputs, attrs):
    (x,) = inputs
    return [_gelu32(x, attrs.get("approximate", "none")).astype(x.dtype)]


@kernel("gelu_mul")
def gelu_mul(inputs, attrs):
    gate, up = inputs
    y = _gelu32(gate, attrs.get("approximate", "none")) * up.astype(np.float32)
    return [y.astype(gate.dtype)]


@kernel("silu")
def silu(inputs, attrs):
    (x,) = inputs
    x32 = x.astype(np.float32)
    return [(x32 / (1.0 + np.exp(-x32))).astype(x.dtype)]


@kernel("silu_mul")
def silu_mul(inputs, attrs):
    gate, up = inputs
    g32 = gate.astype(np.float32)
    return [(g32 / (1.0 + np.exp(-g32)) * up.astype(np.float32)).astype(gate.dtype)]


@kernel("rotary")
def rotary(inputs, attrs):
    x, cos, sin = inputs
    h, d = attrs["num_heads"], attrs["head_dim"]
    b, s = x.shape[0], x.shape[1]
    xh = x.reshape(b, s, h, d)
    r = cos.shape[-1]
    c, sn = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    rot, rest = xh[..., :r], xh[..., r:]
    if attrs.get("interleaved", False):
        pairs = rot.reshape(*rot.shape[:-1], r // 2, 2)
        swapped = np.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(rot.shape)
    else:
        half = r // 2
        swapped = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = np.concatenate([rot * c + swapped * sn, rest], axis=-1)
    return [out.astype(x.dtype).reshape(x.shape)]


def kv8_roundtrip(x: np.ndarray) -> np.ndarray:
    """What an int8 KV cache hands back for rows x[..., D]: each row stored as int8 with one
    float32 scale, scale = absmax / 127, q = round-half-even(x * 127 / absmax), value q * scale."""
    x32 = x.astype(np.float32)
    amax = np.abs(x32).max(axis=-1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(x32 * inv).astype(np.int8)
    return (q.astype(np.float32) * (amax / np.float32(127))).astype(x.dtype)


@kernel("attention")
def attention(inputs, attrs):
    q, k, v, past_k, past_v, mask, bias = (*inputs, *[None] * 7)[:7]
    h, kvh, d = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
    b, s = q.shape[0], q.shape[1]
    qh = q.reshape(b, s, h, d).transpose(0, 2, 1, 3)
    kh = k.reshape(b, s, kvh, d).transpose(0, 2, 1, 3)
    vh = v.reshape(b, s, kvh, d).transpose(0, 2, 1, 3)
    if attrs.get("kv_bits", 0) == 8:  # the cache keeps int8 rows: new rows round-trip
        kh, vh = kv8_roundtrip(kh), kv8_roundtrip(vh)
    if past_k is not None:
        kh = np.concatenate([past_k, kh], axis=2)
        vh = np.concatenate([past_v, vh], axis=2)
    present_k, present_v = kh, vh
    total = kh.shape[2]
    group = h // kvh
    kf = np.repeat(kh, group, axis=1).astype(np.float32)
    vf = np.repeat(vh, group, axis=1).astype(np.float32)
    scores = np.matmul(qh.astype(np.float32), kf.transpose(0, 1, 3, 2)) * np.float32(
        attrs["scale"])  # (b, h, s, total)
    if bias is not None:
        scores = scores + bias.astype(np.float32)
    allowed = np.ones((b, 1, s, total), dtype=bool)
    if attrs.get("causal", False):
        past = total - s
        j, i = np.arange(total)[None, :], past + np.arange(s)[:, None]
        allowed &= (j <= i)[None, None]
        if attrs.get("window"):
            allowed &= (j > i - attrs["window"])[None, None]
    if mask is not None:
        allowed &= (mask != 0)[:, None, None, :]
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0))
    total_p = p.sum(axis=-1, keepdims=True)
    p = np.divide(p, total_p, out=np.zeros_like(p), where=total_p > 0)  # no key: output 0
    out = np.matmul(p, vf).transpose(0, 2, 1, 3).reshape(b, s, h * d)
    return [out.astype(q.dtype), present_k, present_v]


def dequantize(qweight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
               attrs) -> np.ndarray:
    """The float32 weight W[N, K] of a quantized linear, in the `nk` or `blocked` layout:
    W[n, k] = (q[n, k] - zp[n, k // g]) * scales[n, k // g] (kiln.runtime.quant_format)."""
    n, k = int(attrs["out_features"]), int(attrs["in_features"])
    if attrs.get("layout", "nk") == "blocked":
        qweight, scales, zero_points = (None if a is None else quant_format.unblocked(a, n)
                                        for a in (qweight, scales, zero_points))
    return quant_format.dequantize(qweight[:n], scales[:n],
                                   None if zero_points is None else zero_points[:n],
                                   bits=int(attrs["bits"]), k=k)


@kernel("quant_linear")
def quant_linear(inputs, attrs):
    """act_bits 8: the activations quantized to int8 per row and 32 columns first
    (quant_format.quantize_rows)."""
    x, qweight, scales, zero_points, b = (*inputs, None, None)[:5]
    w = dequantize(qweight, scales, zero_points, attrs)
    x = x.astype(np.float32)
    if attrs.get("act_bits", 0) == 8:
        x = quant_format.fake_quantize_rows(x)
    return linear([x, w, b], attrs)


@kernel("quant_embedding")
def quant_embedding(inputs, attrs):
    qtable, scales, zero_points, ids = inputs
    return [dequantize(qtable, scales, zero_points, attrs)[ids.astype(np.int64)]]


@kernel("sparse_linear")
def sparse_linear(inputs, attrs):
    x, values, meta, scales, b = (*inputs, None, None)[:5]
    w = sparse_format.decode(values, meta, attrs["layout"], int(attrs["in_features"]), scales)
    if scales is not None:  # int8 codes: the float32 weight, as quant_linear
        x = x.astype(np.float32)
    return linear([x, w, b], attrs)
