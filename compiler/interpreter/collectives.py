"""Collective ops of tensor-parallel graphs (kiln.passes.shard_tensor_parallel) in the
interpreter: `run_shards` runs one shard's graph per thread, and each `all_reduce` (sum) or
`all_gather` (concatenation along an axis) waits for every shard's operand, as NCCL's do.
The sum is taken in shard order on every shard, so all shards hold the same array."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.compiler.interpreter import kernel, run
from kiln.compiler.ir import Graph

_here = threading.local()


class _Group:
    def __init__(self, n: int):
        self.barrier, self.slots = threading.Barrier(n), [None] * n

    def exchange(self, rank: int, x: np.ndarray) -> list[np.ndarray]:
        self.slots[rank] = x
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # every shard has read before the next exchange writes
        return parts


def _parts(x: np.ndarray, attrs) -> list[np.ndarray]:
    group = getattr(_here, "group", None)
    if group is None or len(group.slots) != int(attrs["shards"]):
        raise KilnError(f"a collective of {attrs['shards']} shards outside run_shards")
    return group.exchange(_here.rank, x)


@kernel("all_reduce")
def all_reduce(inputs, attrs):
    parts = _parts(inputs[0], attrs)
    total = parts[0].astype(np.float64 if parts[0].dtype == np.float64 else np.float32)
    for p in parts[1:]:
        total = total + p
    return [total.astype(inputs[0].dtype)]


@kernel("all_gather")
def all_gather(inputs, attrs):
    return [np.concatenate(_parts(inputs[0], attrs), axis=int(attrs.get("axis", -1)))]


def run_shards(graphs: Sequence[Graph], feeds: Sequence[Mapping[str, np.ndarray]],
               **kw) -> list[dict[str, np.ndarray]]:
    """`run` of every shard's graph on its feeds, one thread each; their outputs in order."""
    n = len(graphs)
    group, results, errors = _Group(n), [None] * n, []

    def work(rank: int) -> None:
        _here.group, _here.rank = group, rank
        try:
            results[rank] = run(graphs[rank], feeds[rank], **kw)
        except BaseException as e:  # (re-raised below, once every thread has ended)
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                     errors[0])
        raise first
    return results
