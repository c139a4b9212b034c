"""Tensor parallelism: the canonical graph split into one graph per shard (issue 17, CPU side).

Megatron-LM's split of a transformer layer over `n` devices, on kiln's canonical IR:

- attention: q/k/v projections column-parallel by heads (shard r computes query heads
  r*h/n .. and KV heads r*kvh/n ..; a fused q/k/v linear keeps its Split, each segment cut
  alike), the rotaries and the attention node on h/n and kvh/n heads, each shard's KV cache
  holding its own KV heads; the output projection row-parallel (its input features are the
  shard's heads), then `all_reduce` (sum) of the partial outputs;
- MLP, gated (`silu_mul`, `gelu_mul`: gate and up) or plain (a linear, an activation): the
  first linear(s) column-parallel, the last row-parallel, then `all_reduce`;
- LM head (a linear producing a graph output): vocabulary-parallel, then `all_gather` of the
  logits along the last axis;
- everything else (embeddings, norms, residual adds, positions) replicated.

A row-parallel linear's bias is added by shard 0 alone (the sum then holds it once). Sliced
weights are derived from the unsharded ones (`slice`/`concat` transforms: nothing is copied
until loaded). `kiln.compiler.interpreter.collectives.run_shards` runs the shards, one thread
each, meeting at the collectives: the interpreter's proof that the sharded graphs compute the
unsharded one. Not yet: codegen of the collectives (disco/NCCL), quantized or sparse weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Attrs, Derived, Graph, Node, Param, TensorType, inline_param

GATED = ("silu_mul", "gelu_mul")
PLAIN = ("gelu", "silu", "relu")  # fc -> activation -> proj MLPs (GPT-2, Phi, OPT)


@dataclass
class _Plan:
    """How each weight is cut (name -> segments of rows or columns) and where collectives go."""

    n: int
    #: weight or bias name -> (axis, [(start, length), ...]): shard r takes the r-th n-th of each
    cuts: dict[str, tuple[int, list[tuple[int, int]]]] = field(default_factory=dict)
    attrs: dict[str, dict] = field(default_factory=dict)  # node -> attrs divided by n
    splits: dict[str, list[int]] = field(default_factory=dict)  # Split sizes param -> sizes
    reduce_after: list[str] = field(default_factory=list)  # row-parallel linears (node names)
    bias_once: set[str] = field(default_factory=set)  # their biases: shard 0 adds them
    gather_after: list[str] = field(default_factory=list)  # vocabulary-parallel linears
    caches: set[str] = field(default_factory=set)  # KV cache inputs and outputs (axis 1: heads)


def shard(graph: Graph, n: int) -> tuple[Graph, ...]:
    """The graphs of `n` shards (n = 1: the graph itself). A KilnError of one line names the
    node or shape that cannot be split n ways."""
    if n < 1:
        raise KilnError(f"tensor parallelism: {n} shards")
    if n == 1:
        return (graph,)
    plan = _plan(graph, n)
    return tuple(_shard(graph, plan, r) for r in range(n))


def shard_feeds(graphs: tuple[Graph, ...], feeds: dict[str, np.ndarray]) -> list[dict]:
    """Each shard's inputs: its KV heads of every cache input (axis 1), the rest as given."""
    n, out = len(graphs), []
    for r, g in enumerate(graphs):
        caches = g.meta["tensor_parallel"]["caches"]
        out.append({k: _chunk(np.asarray(v), 1, r, n) if k in caches else v
                    for k, v in feeds.items()})
    return out


def _chunk(a: np.ndarray, axis: int, r: int, n: int) -> np.ndarray:
    size = a.shape[axis] // n
    return np.take(a, range(r * size, (r + 1) * size), axis=axis)


def _plan(graph: Graph, n: int) -> _Plan:
    plan, prod, cons = _Plan(n), graph.producers(), graph.consumers()
    for node in graph.nodes:
        if node.op == "attention":
            _plan_attention(graph, node, plan, prod, cons)
        elif node.op in GATED:  # gate, up
            _plan_mlp(graph, node, node.inputs[:2], plan, prod, cons)
        elif node.op in PLAIN and _plain_mlp(node, prod, cons):
            _plan_mlp(graph, node, node.inputs[:1], plan, prod, cons)
    for out in graph.outputs:
        node = prod.get(out)
        if node is not None and node.op == "linear" and node.inputs[1] not in plan.cuts:
            vocab = _weight(graph, node).type.shape[0]
            cut = (0, [(0, _divide(vocab, n, node, "rows"))])
            plan.cuts[node.inputs[1]] = cut
            if _bias(node):
                plan.cuts[node.inputs[2]] = cut
            plan.gather_after.append(node.name)
    return plan


def _divide(size: int, n: int, node: Node, what: str) -> int:
    if size % n:
        raise KilnError(f"tensor parallelism: node {node.name} ({node.op}): {what} {size} do "
                        f"not split {n} ways")
    return size


def _weight(graph: Graph, node: Node) -> Param:
    w = graph.params.get(node.inputs[1])
    if node.op != "linear" or w is None or w.type.shape is None or len(w.type.shape) != 2:
        raise KilnError(f"tensor parallelism: node {node.name} ({node.op}): only float "
                        "linears with a [N, K] weight parameter split (not quantized, sparse "
                        "or packed weights)")
    return w


def _bias(node: Node) -> bool:
    return len(node.inputs) > 2 and bool(node.inputs[2])


def _column_parallel(graph: Graph, values: list[str], plan: _Plan, prod: dict[str, Node],
                     skip: tuple[str, ...] = ("rotary",)) -> None:
    """The linear(s) producing `values` (through rotaries and a fused projection's Split) cut
    along their output rows, every value's rows alike: shard r takes the r-th n-th of each (a
    whole n-th of the heads where the caller has checked that the heads divide)."""
    parts: dict[str, list[int]] = {}  # linear node name -> rows of each segment, in order
    for v in values:
        node = prod[v]
        while node.op in skip:
            node = prod[node.inputs[0]]
        if node.op == "Split":
            linear = prod[node.inputs[0]]
            sizes = _split_sizes(graph, node)
            parts[linear.name] = sizes
            if "split" in node.attrs:  # (sizes as an attribute: opset < 13)
                plan.attrs[node.name] = {"split": tuple(s // plan.n for s in sizes)}
            else:
                plan.splits[node.inputs[1]] = [s // plan.n for s in sizes]
        elif node.op == "linear":
            parts[node.name] = [_weight(graph, node).type.shape[0]]
        else:
            raise KilnError(f"tensor parallelism: value {v} comes from node {node.name} "
                            f"({node.op}), not a projection")
    by_name = {nd.name: nd for nd in graph.nodes}
    for name, sizes in parts.items():
        linear = by_name[name]
        _weight(graph, linear)
        starts = np.cumsum([0, *sizes[:-1]]).tolist()
        cuts = [(int(s), _divide(rows, plan.n, linear, "rows")) for s, rows in
                zip(starts, sizes, strict=True)]
        plan.cuts[linear.inputs[1]] = (0, cuts)
        if _bias(linear):
            plan.cuts[linear.inputs[2]] = (0, cuts)


def _split_sizes(graph: Graph, split: Node) -> list[int]:
    if "split" in split.attrs:
        return [int(s) for s in split.attrs["split"]]
    if len(split.inputs) < 2 or split.inputs[1] not in graph.params:
        raise KilnError(f"tensor parallelism: node {split.name} (Split): sizes not constant")
    return [int(s) for s in graph.params[split.inputs[1]].load()]


def _row_parallel(graph: Graph, value: str, plan: _Plan, cons) -> None:
    """The linear consuming `value` (its only consumer) cut along its input columns, then
    all-reduced."""
    users = cons.get(value, [])
    if len(users) != 1 or users[0].op != "linear" or users[0].inputs[0] != value:
        raise KilnError(f"tensor parallelism: value {value} feeds {[str(u) for u in users]}, "
                        "not one output projection")
    linear = users[0]
    w = _weight(graph, linear)
    plan.cuts[linear.inputs[1]] = (1, [(0, _divide(w.type.shape[1], plan.n, linear,
                                                   "input features"))])
    plan.reduce_after.append(linear.name)
    if _bias(linear):
        plan.bias_once.add(linear.inputs[2])


def _plan_attention(graph: Graph, node: Node, plan: _Plan, prod, cons) -> None:
    a = node.attrs
    h, kvh = int(a["num_heads"]), int(a["num_kv_heads"])
    for heads, what in ((h, "query heads"), (kvh, "KV heads")):
        if heads % plan.n:
            raise KilnError(f"tensor parallelism: node {node.name} (attention): {heads} "
                            f"{what} do not split {plan.n} ways")
    if len(node.inputs) > 6 and node.inputs[6]:
        raise KilnError(f"tensor parallelism: node {node.name} (attention): an additive bias "
                        "does not split by heads yet")
    qkv = list(node.inputs[:3])
    _column_parallel(graph, qkv, plan, prod)
    plan.attrs[node.name] = {"num_heads": h // plan.n, "num_kv_heads": kvh // plan.n}
    for v in qkv[:2]:
        r = prod[v]
        while r.op == "rotary":
            plan.attrs[r.name] = {"num_heads": int(r.attrs["num_heads"]) // plan.n}
            r = prod[r.inputs[0]]
    plan.caches.update(v for v in (*node.inputs[3:5], *node.outputs[1:3]) if v)
    _row_parallel(graph, node.outputs[0], plan, cons)


def _plain_mlp(node: Node, prod, cons) -> bool:
    """An activation between two linears, read by nothing else: a plain MLP."""
    src, users = prod.get(node.inputs[0]), cons.get(node.outputs[0], [])
    return (src is not None and src.op == "linear" and len(cons.get(node.inputs[0], [])) == 1
            and len(users) == 1 and users[0].op == "linear")


def _plan_mlp(graph: Graph, node: Node, inputs, plan: _Plan, prod, cons) -> None:
    """The linear(s) producing the activation `node`'s `inputs` column-parallel, the one
    consuming its output row-parallel."""
    _column_parallel(graph, list(inputs), plan, prod, skip=())
    _row_parallel(graph, node.outputs[0], plan, cons)


def _shard(graph: Graph, plan: _Plan, r: int) -> Graph:
    n, params = plan.n, dict(graph.params)
    renamed: dict[str, str] = {}
    for name, (axis, cuts) in plan.cuts.items():
        p = graph.params[name]
        parts = [Derived("slice", (p.source,), Attrs({
            "axis": axis, "start": start + r * size // n, "stop": start + (r + 1) * size // n}))
            for start, size in cuts]
        src = parts[0] if len(parts) == 1 else Derived("concat", tuple(parts),
                                                        Attrs({"axis": axis}))
        shape = list(p.type.shape)
        shape[axis] = sum(size // n for _, size in cuts)
        new = f"{name}:tp{r}of{n}"
        params[new] = Param(new, TensorType(p.type.dtype, tuple(shape)), src)
        renamed[name] = new
    for name in plan.bias_once:
        if r:
            p = graph.params[name]
            new = f"{name}:zero"
            params[new] = inline_param(new, np.zeros(p.type.shape, p.type.dtype.numpy))
            renamed[name] = new
    for name, sizes in plan.splits.items():
        new = f"{name}:tp{n}"
        params[new] = inline_param(new, np.array(sizes, np.int64))
        renamed[name] = new
    nodes = []
    for node in graph.nodes:
        attrs = node.attrs.updated(**plan.attrs[node.name]) if node.name in plan.attrs \
            else node.attrs
        inputs = tuple(renamed.get(v, v) for v in node.inputs)
        if node.name in plan.reduce_after or node.name in plan.gather_after:
            y = node.outputs[0]
            nodes.append(Node(node.op, inputs, (f"{y}:partial", *node.outputs[1:]), attrs,
                              node.name))
            op, extra = ("all_reduce", {}) if node.name in plan.reduce_after else (
                "all_gather", {"axis": -1})
            nodes.append(Node(op, (f"{y}:partial",), (y,), Attrs({"shards": n, **extra}),
                              f"{node.name}:{op}"))
        else:
            nodes.append(Node(node.op, inputs, node.outputs, attrs, node.name))
    used = {v for nd in nodes for v in nd.inputs}
    params = {k: p for k, p in params.items() if k in used}
    types = {v: graph.types[v] for v in graph.inputs}
    for v in plan.caches & set(graph.inputs):  # each shard's KV heads
        t = types[v]
        types[v] = TensorType(t.dtype, (t.shape[0], t.shape[1] // n, *t.shape[2:]))
    types.update((k, p.type) for k, p in params.items())  # node outputs: inferred below
    meta = {**graph.meta, "tensor_parallel": {"shards": n, "rank": r,
                                              "caches": sorted(plan.caches)}}
    out = graph.replace(nodes=tuple(nodes), params=params, types=types, meta=meta,
                        name=f"{graph.name}.tp{r}of{n}")
    from kiln.passes.infer_shapes import infer_shapes

    return infer_shapes(out, strict=False)
