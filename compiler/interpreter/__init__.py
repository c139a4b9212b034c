"""The reference interpreter: numpy semantics for every IR op, run node by node.

Kernels are registered per op name in KERNELS. A kernel takes the input arrays (None for an
omitted optional input) and the node's attributes, and returns a list of output arrays. The
interpreter is the specification the compiled kernels are checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import sympy

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Attrs, Graph, Node, evaluate_dim, shape_str

Kernel = Callable[[Sequence[np.ndarray | None], Attrs], Sequence[np.ndarray]]
KERNELS: dict[str, Kernel] = {}


def kernel(*ops: str) -> Callable[[Kernel], Kernel]:
    """Register a numpy kernel for one or more op names."""

    def register(fn: Kernel) -> Kernel:
        for op in ops:
            KERNELS[op] = fn
        return fn

    return register


def run_node(node: Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    fn = KERNELS.get(node.op)
    if fn is None:
        raise KilnError(f"interpreter: no kernel for op {node.op} (node {node.name})")
    try:
        outs = list(fn(inputs, node.attrs))
    except KilnError:
        raise
    except Exception as e:  # a kernel failing is an input error: name the node and shapes
        shapes = ", ".join("None" if x is None else f"{x.dtype}{list(x.shape)}" for x in inputs)
        raise KilnError(f"node {node.name} ({node.op}) failed on inputs ({shapes}): "
                        f"{type(e).__name__}: {e}") from e
    if len(outs) < len(node.outputs):
        raise KilnError(f"node {node.name} ({node.op}): kernel returned {len(outs)} outputs, "
                        f"node declares {len(node.outputs)}")
    return outs


def run(graph: Graph, feeds: Mapping[str, np.ndarray], *,
        outputs: Sequence[str] | None = None,
        params: Mapping[str, np.ndarray] | None = None,
        bindings: Mapping[str, int] | None = None,
        before: Callable[[Node, Mapping[str, np.ndarray]], None] | None = None,
        skip: Callable[[Node], bool] | None = None) -> dict[str, np.ndarray]:
    """Evaluate `graph` on `feeds`; returns the requested outputs (default: the graph's).

    `params` may hold already-loaded parameter arrays (to avoid reloading across calls; it is
    read as the nodes run, so `before` may add to it); `bindings` gives symbolic dims that the
    input shapes do not determine; `before(node, values)` is called ahead of each node with the
    values computed so far, and nodes for which `skip(node)` holds are not run.
    """
    wanted = list(outputs if outputs is not None else graph.outputs)
    missing = [v for v in graph.inputs if v not in feeds]
    if missing:
        raise KilnError(f"interpreter: missing graph inputs {missing}")
    env: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in feeds.items()}
    bindings = {**(bindings or {}), **bind_symbols(graph, env)}
    last_use = _last_uses(graph, wanted)
    loaded = params if params is not None else {}
    for i, node in enumerate(graph.nodes):
        if before is not None:
            before(node, env)
        if skip is not None and skip(node):
            continue
        args = []
        for v in node.inputs:
            if not v:
                args.append(None)
            elif v in env:
                args.append(env[v])
            elif v in graph.params:
                arr = loaded[v] if v in loaded else graph.params[v].load()
                args.append(arr)
            else:
                raise KilnError(f"node {node.name} ({node.op}): input {v} is not defined")
        if node.attrs.free_symbols:
            node = replace(node, attrs=concretize(node.attrs, bindings))
        for name, value in zip(node.outputs, run_node(node, args), strict=False):
            if name:
                env[name] = value
        for v in last_use.get(i, ()):
            env.pop(v, None)
    return {v: env[v] if v in env else graph.params[v].load() for v in wanted}


def bind_symbols(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Values of the symbolic dims of the graph inputs, checked for consistency across inputs."""
    bindings: dict[str, int] = {}
    deferred: list[tuple[str, int, sympy.Expr, int]] = []
    for v in graph.inputs:
        shape = graph.types[v].shape
        actual = feeds[v].shape
        if shape is None:
            continue
        if len(shape) != len(actual):
            raise KilnError(f"input {v}: rank {len(actual)} given, expected {shape_str(shape)}")
        for axis, (d, n) in enumerate(zip(shape, actual, strict=True)):
            if isinstance(d, sympy.Symbol) and d.name not in bindings:
                bindings[d.name] = int(n)
            else:
                deferred.append((v, axis, d, int(n)))
    for v, axis, d, n in deferred:
        try:
            want = evaluate_dim(d, bindings)
        except KeyError:
            continue  # a dim defined only by an expression: nothing to check it against
        if want != n:
            raise KilnError(f"input {v}: dim {axis} is {n}, expected {d} = {want} "
                            f"(shape {list(feeds[v].shape)}, declared {shape_str(shape)})")
    return bindings


def concretize(attrs: Attrs, bindings: Mapping[str, int]) -> Attrs:
    """Attributes with every symbolic dim replaced by its value under `bindings`."""

    def conc(v):
        if isinstance(v, tuple):
            return tuple(conc(x) for x in v)
        if isinstance(v, sympy.Basic):
            return evaluate_dim(v, bindings)
        return v

    return Attrs({k: conc(v) for k, v in attrs.items()})


def _last_uses(graph: Graph, keep: Sequence[str]) -> dict[int, list[str]]:
    """Node index -> values whose last reader it is (freed after it runs)."""
    last: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            if v:
                last[v] = i
    keep_set = set(keep)
    out: dict[int, list[str]] = {}
    for v, i in last.items():
        if v not in keep_set:
            out.setdefault(i, []).append(v)
    return out


def _load_kernels() -> None:
    from kiln.compiler.interpreter import collectives, onnx_ops, transformer_ops  # noqa: F401


_load_kernels()
