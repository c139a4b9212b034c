"""Seeded random feeds for a decoder graph: prefill on an empty past, or decode on a past."""

from __future__ import annotations

import re

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import BATCH, PAST, SEQ, Graph, Shape, dim, evaluate_dim, shape_str

_PAST_KV = re.compile(r"^past.*(key|value)")
#: elements of one feed at most (a declared dim of 10^12 is a corrupt export, not a test case)
MAX_FEED = 1 << 28


def make_feeds(graph: Graph, *, batch: int, seq: int, past: int, rng: np.random.Generator,
               vocab: int) -> dict[str, np.ndarray]:
    """One array per graph input, shaped by binding batch/seq/past.

    input_ids: random ids < vocab; attention_mask: ones over past+seq; position_ids and
    cache_position: past..past+seq-1; past key/values: standard normal; token_type_ids and
    other integer inputs: zeros; other float inputs: standard normal; bool inputs: True.
    """
    bindings = {BATCH: batch, SEQ: seq, PAST: past}
    feeds: dict[str, np.ndarray] = {}
    for name in graph.inputs:
        t = graph.types[name]
        shape = _concrete(name, t.shape, bindings)
        if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.float64)) > MAX_FEED:
            raise KilnError(f"input {name} {shape_str(t.shape)}: a feed of shape {list(shape)} "
                            "is impossible or too large to check")
        try:
            feeds[name] = _feed(name, shape, t.dtype.numpy, rng, vocab, past, seq).astype(
                t.dtype.numpy, copy=False)
        except ValueError as e:  # declared dims that contradict its layout (position_ids)
            raise KilnError(f"input {name} {shape_str(t.shape)}: cannot make a feed of shape "
                            f"{list(shape)} ({e})") from e
    return feeds


#: the layout of well-known inputs, for exports that give them dims of their own (torch names
#: an input's dims independently when the model ignores it, e.g. position_ids under ALiBi)
_LAYOUTS = {"input_ids": (BATCH, SEQ), "position_ids": (BATCH, SEQ),
            "token_type_ids": (BATCH, SEQ), "attention_mask": (BATCH, f"{PAST} + {SEQ}"),
            "cache_position": (SEQ,)}


def _concrete(name: str, shape: Shape | None, bindings: dict[str, int]) -> tuple[int, ...]:
    if shape is None:
        raise KilnError(f"input {name} has unknown rank; cannot make a feed for it")
    try:
        return tuple(evaluate_dim(d, bindings) for d in shape)
    except KeyError as e:
        layout = _LAYOUTS.get(name)
        if layout is not None and len(layout) == len(shape):
            return tuple(evaluate_dim(dim(d), bindings) for d in layout)
        raise KilnError(f"input {name} {shape_str(shape)}: dim symbol {e.args[0]} is not one "
                        "of batch, seq, past; cannot make a feed for it") from e


def _feed(name: str, shape: tuple[int, ...], dt: np.dtype, rng: np.random.Generator,
          vocab: int, past: int, seq: int) -> np.ndarray:
    if name == "input_ids":
        return rng.integers(0, vocab, size=shape)
    if "mask" in name:
        return np.ones(shape, dt)
    if name in ("position_ids", "cache_position"):
        return np.broadcast_to(np.arange(past, past + seq), shape).copy()
    if np.issubdtype(dt, np.bool_):
        return np.ones(shape, np.bool_)
    if np.issubdtype(dt, np.integer):
        return np.zeros(shape, dt)
    if _PAST_KV.search(name) or np.issubdtype(dt, np.floating) or dt.kind == "V":
        return rng.standard_normal(shape, np.float32)
    raise KilnError(f"input {name}: cannot make a feed of dtype {dt}")
