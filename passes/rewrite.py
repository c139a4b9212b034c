"""Graph surgery for passes: an editor that emits typed nodes, and a pattern-rewrite driver.

Passes stay pure: `GraphEditor(graph)` copies what it changes and `finish()` returns a new,
topologically ordered Graph. Replacement nodes keep the original output names, so consumers
need no rewiring; the nodes they replace go dead and eliminate_dead_code removes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from kiln.compiler import shapes
from kiln.compiler.errors import KilnError
from kiln.compiler.frontend import graph_order
from kiln.compiler.ir import Attrs, Graph, Node, Param, TensorType
from kiln.passes.patterns import Matcher, Pattern


class GraphEditor:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list[Node | None] = list(graph.nodes)
        self.types: dict[str, TensorType] = dict(graph.types)
        self.params: dict[str, Param] = dict(graph.params)
        self._inserts: dict[int, list[Node]] = {}
        self._names: set[str] = set(self.types) | {n.name for n in graph.nodes}
        self._cursor = len(self.nodes)
        self.matcher: Matcher | None = None  # set by rewrite(): patterns see the input graph

    # -- naming and emission --------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def at(self, index: int) -> GraphEditor:
        """Emit the next nodes just before node `index` (default: at the end)."""
        self._cursor = index
        return self

    def emit(self, op: str, inputs: Sequence[str], attrs: dict | None = None, *,
             name: str, outputs: Sequence[str] | None = None, n_outputs: int = 1,
             types: Sequence[TensorType] | None = None) -> list[str]:
        """Add a node; output types come from `types` or the op's inference rule."""
        node_name = self.fresh(name)
        outs = list(outputs) if outputs is not None else [self.fresh(f"{node_name}:{i}")
                                                          for i in range(n_outputs)]
        node = Node(op, tuple(inputs), tuple(outs), Attrs(attrs or {}), node_name)
        if types is None:
            in_types = [self.types.get(v) if v else None for v in node.inputs]
            inferred = shapes.infer(node, in_types, [self._small_const(v) for v in node.inputs])
            if inferred is None:
                raise KilnError(f"pass emitted {op} (node {node_name}) with no type rule")
            types = inferred
        for o, t in zip(outs, types, strict=False):
            if outputs is None or o not in self.types:  # a reused output keeps its declared type
                self.types[o] = t
        self._inserts.setdefault(self._cursor, []).append(node)
        return outs

    def _small_const(self, v: str):
        p = self.params.get(v)
        if p is None or not p.type.dtype.is_int or p.nbytes > 1024 or not p.source.available:
            return None
        return p.load()

    def add_param(self, param: Param) -> str:
        name = param.name if param.name not in self.types else self.fresh(param.name)
        if name != param.name:
            param = Param(name, param.type, param.source)
        self.params[name] = param
        self.types[name] = param.type
        self._names.add(name)
        return name

    def remove(self, nodes: Iterable[Node]) -> None:
        doomed = {id(n) for n in nodes}
        self.nodes = [None if n is not None and id(n) in doomed else n for n in self.nodes]

    # -- result -----------------------------------------------------------------------------
    def finish(self, **graph_changes) -> Graph:
        ordered: list[Node] = []
        for i in range(len(self.nodes) + 1):
            ordered += self._inserts.get(i, [])
            if i < len(self.nodes) and self.nodes[i] is not None:
                ordered.append(self.nodes[i])
        nodes = graph_order.toposort(ordered, {*self.graph.inputs, *self.params})
        return self.graph.replace(nodes=tuple(nodes), types=self.types, params=self.params,
                                  **graph_changes)


Rule = tuple[Pattern, Callable[[GraphEditor, Node, dict], bool]]


def rewrite(graph: Graph, rules: Sequence[Rule], *, ops: Iterable[str] | None = None) -> Graph:
    """Try each rule on each node; a rule's builder emits replacement nodes for the node's
    output and returns True when it rewrote. Each node is rewritten at most once.

    Nodes are visited consumers first, so the largest match wins: the outer Mul of a norm is
    rewritten before its inner Mul could match a smaller pattern (which then only feeds dead
    nodes, left for eliminate_dead_code)."""
    matcher = Matcher(graph)
    editor = GraphEditor(graph)
    editor.matcher = matcher
    only = set(ops) if ops is not None else None
    for index, node in reversed(list(enumerate(graph.nodes))):
        if only is not None and node.op not in only:
            continue
        for pattern, build in rules:
            done = False
            for b in pattern.match(matcher, node.outputs[0], {}):
                editor.at(index)
                if build(editor, node, b):
                    editor.remove([node])
                    done = True
                    break
            if done:
                break
    return editor.finish()
