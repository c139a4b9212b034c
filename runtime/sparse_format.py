"""Sparse weight layouts of `sparse_linear`, numpy only: encode, decode, pattern detection.

A weight W[N, K] (y = x @ W^T) with many exact zeros is stored in one of two layouts:

"nm" (2:4 semi-structured, what sparse tensor cores take; K % 4 == 0):
    values [N, K / 2]  weight dtype: the two kept entries of each group of 4 columns, in
                       increasing column order (a group with fewer than 2 non-zeros still
                       stores 2 entries, zeros allowed, indices distinct)
    meta   [N, ceil(K / 8)] uint8: group g (columns 4g..4g+3) of row n uses the nibble
                       (meta[n, g // 2] >> (4 * (g % 2))) & 0xF; bits 0-1 are the column
                       index (0-3) of its first kept value, bits 2-3 of the second
    dense:  W[n, 4g + i_j] = values[n, 2g + j]

"bitmap" (the CPU kernels' layout; N % BLOCK == 0; B = BLOCK = 16 rows, one fp32 SIMD vector):
    meta   [N / B, K] uint16: bit l of meta[nb, k] says W[nb * B + l, k] != 0
    values [N / B, C] weight dtype: block nb's non-zeros in (k, lane) order, i.e. for k = 0..K-1
                       the set bits of meta[nb, k] from lane 0 up, then zero padding to C
                       (C, the capacity: the largest non-zero count of any block plus B, so that
                       a full B-value load at any offset of a block stays inside its row)
    dense:  W[nb * B + l, k] = values[nb, popcount of the set bits before (k, l) in block nb]
    A B-value load at a running offset, expanded under the mask meta[nb, k] (AVX-512 vexpand),
    gives the B weights of column k: 1 bit per weight plus the non-zeros, read in streaming order.

Integer values (int8 codes) carry float32 per-row scales: W[n, k] = codes[n, k] * scales[n].
"""

from __future__ import annotations

import numpy as np

from kiln.compiler.errors import KilnError

BLOCK = 16
LAYOUTS = ("nm", "bitmap")


class SparseFormatError(KilnError):
    """A weight that does not fit the requested layout (names what is wrong)."""


# ---------------------------------------------------------------------------------------------
# 2:4 ("nm")


def nm_encode(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w[N, K] with at most 2 non-zeros in every group of 4 columns -> (values, meta)."""
    n, k = w.shape
    if k % 4:
        raise SparseFormatError(f"2:4 layout needs K % 4 == 0, got K={k}")
    groups = w.reshape(n, k // 4, 4)
    nonzero = groups != 0
    if (nonzero.sum(-1) > 2).any():
        raise SparseFormatError("weight is not 2:4 sparse (a group of 4 holds > 2 non-zeros)")
    # the non-zeros first, then zero slots, each in column order; keep two, in column order
    order = np.argsort(~nonzero, axis=-1, kind="stable")[..., :2]
    idx = np.sort(order, axis=-1)
    values = np.take_along_axis(groups, idx, axis=-1).reshape(n, k // 2)
    nib = (idx[..., 0] | (idx[..., 1] << 2)).astype(np.uint8)  # [N, G]
    if nib.shape[1] % 2:
        nib = np.concatenate([nib, np.zeros((n, 1), np.uint8)], axis=1)
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(values), np.ascontiguousarray(meta)


def nm_decode(values: np.ndarray, meta: np.ndarray, k: int) -> np.ndarray:
    """(values [N, K/2], meta [N, ceil(K/8)] uint8) -> the dense W[N, K] (values' dtype)."""
    n, g = values.shape[0], k // 4
    nib = np.stack([meta & 0xF, meta >> 4], axis=-1).reshape(n, -1)[:, :g].astype(np.int64)
    idx = np.stack([nib & 3, nib >> 2], axis=-1)  # [N, G, 2]
    w = np.zeros((n, g, 4), values.dtype)
    np.put_along_axis(w, idx, values.reshape(n, g, 2), axis=-1)
    return w.reshape(n, k)


# ---------------------------------------------------------------------------------------------
# bitmap


def _blocks(w: np.ndarray) -> np.ndarray:
    n, k = w.shape
    if n % BLOCK:
        raise SparseFormatError(f"bitmap layout needs N % {BLOCK} == 0, got N={n}")
    return w.reshape(n // BLOCK, BLOCK, k).transpose(0, 2, 1)  # [NB, K, B]


def bitmap_capacity(w: np.ndarray) -> int:
    """C: the largest number of non-zeros in any block of BLOCK rows, plus BLOCK of slack."""
    return int((_blocks(w) != 0).sum(axis=(1, 2)).max(initial=0)) + BLOCK


def bitmap_bound(n: int, k: int, row_nonzeros: int) -> int:
    """C for a weight of at most `row_nonzeros` non-zeros in every row (a pruning pattern's
    bound, known without the weights)."""
    return BLOCK * min(k, row_nonzeros) + BLOCK


def bitmap_encode(w: np.ndarray, capacity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """w[N, K] -> (values [N/B, C], meta [N/B, K] uint16); C = `capacity` (default: the
    smallest that holds every block)."""
    wb = _blocks(w)
    nonzero = wb != 0
    meta = (nonzero.astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)).sum(-1)
    counts = nonzero.sum(axis=(1, 2))
    cap = bitmap_capacity(w) if capacity is None else int(capacity)
    if counts.max(initial=0) + BLOCK > cap:
        raise SparseFormatError(f"a block of {BLOCK} rows holds {int(counts.max())} non-zeros, "
                                f"more than the layout's capacity {cap} less {BLOCK} of slack")
    flat = nonzero.reshape(nonzero.shape[0], -1)
    slot = np.cumsum(flat, axis=1) - 1  # position of each non-zero within its block
    rows = np.broadcast_to(np.arange(flat.shape[0])[:, None], flat.shape)
    values = np.zeros((flat.shape[0], cap), w.dtype)
    values[rows[flat], slot[flat]] = wb.reshape(flat.shape)[flat]
    return values, meta.astype(np.uint16)


def bitmap_decode(values: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """(values [N/B, C], meta [N/B, K] uint16) -> the dense W[N, K] (values' dtype)."""
    nb, k = meta.shape
    bits = ((meta[..., None].astype(np.uint32) >> np.arange(BLOCK, dtype=np.uint32)) & 1) != 0
    flat = bits.reshape(nb, -1)
    slot = np.cumsum(flat, axis=1) - 1
    wb = np.zeros(flat.shape, values.dtype)
    rows = np.broadcast_to(np.arange(nb)[:, None], flat.shape)
    wb[flat] = values[rows[flat], slot[flat]]
    return np.ascontiguousarray(wb.reshape(nb, k, BLOCK).transpose(0, 2, 1).reshape(nb * BLOCK,
                                                                                     k))


# ---------------------------------------------------------------------------------------------
# one entry point per direction (the interpreter and the parameter derivations use these)


def encode(w: np.ndarray, layout: str, capacity: int | None = None,
           ) -> tuple[np.ndarray, np.ndarray]:
    """W[N, K] -> (values, meta) in `layout`."""
    if layout == "nm":
        return nm_encode(w)
    if layout == "bitmap":
        return bitmap_encode(w, capacity)
    raise SparseFormatError(f"unknown sparse layout {layout!r}; known: {', '.join(LAYOUTS)}")


def decode(values: np.ndarray, meta: np.ndarray, layout: str, k: int,
           scales: np.ndarray | None = None) -> np.ndarray:
    """The weight W[N, K]: float32 when `scales` (per row) are given, else values' dtype."""
    if layout == "nm":
        w = nm_decode(values, meta, k)
    elif layout == "bitmap":
        w = bitmap_decode(values, meta)
    else:
        raise SparseFormatError(f"unknown sparse layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if scales is not None:
        w = w.astype(np.float32) * np.asarray(scales, np.float32).reshape(-1, 1)
    return w


def encode_part(w: np.ndarray, *, layout: str, part: str, capacity: int | None = None,
                ) -> np.ndarray:
    """One of (values, meta) of `encode` (the parameter transform "sparse_encode")."""
    values, meta = encode(np.asarray(w), layout, capacity)
    return {"values": values, "meta": meta}[part]


# ---------------------------------------------------------------------------------------------
# what a weight's zeros look like (the sparsify pass's cost model and `kiln inspect`)


def zero_fraction(w: np.ndarray) -> float:
    """The fraction of exact zeros in w."""
    return float((np.asarray(w) == 0).mean()) if np.asarray(w).size else 0.0


def nm_pattern(w: np.ndarray, candidates: tuple[tuple[int, int], ...] = ((1, 4), (2, 4), (4, 8),
                                                                          (2, 8))
               ) -> tuple[int, int] | None:
    """The tightest (n, m) of `candidates` such that every group of m consecutive input columns
    of every row of w[N, K] holds at most n non-zeros (None: no such pattern, or a dense w)."""
    w = np.asarray(w)
    if w.ndim != 2 or zero_fraction(w) == 0:
        return None
    best = None
    for n, m in candidates:
        if w.shape[1] % m:
            continue
        if (w.reshape(w.shape[0], -1, m) != 0).sum(-1).max() <= n and (
                best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best
