"""The fusions kiln knows, and how their passes record and the lowerings read fusion groups.

A fusion pass (`fuse_<name>`, one file each) records which nodes a target's kernels may run
as one region, as FusionGroups in graph.meta["fusions"] (kiln.compiler.ir); it changes no node,
so every op keeps its unfused lowering and switching a fusion off (`kiln compile --no-fuse
NAME`) changes the kernels, never the result. `projections` is the one rewrite (it concatenates
weights) and records its groups too. Which fusions run comes from the target
(kiln.codegen.targets: `fusions`); the lowerings then consume the records: they never match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kiln.compiler.errors import KilnError
from kiln.compiler.fusions import FUSIONS
from kiln.compiler.ir import FusionGroup, Graph, Node
from kiln.passes.patterns import Matcher, Op, Pattern

#: the ops a linear's fusions apply to
LINEARS = ("linear", "quant_linear", "sparse_linear")


def pass_name(fusion: str) -> str:
    """The pass that records `fusion` (passes/fuse_<fusion>.py)."""
    return f"fuse_{fusion}"


def linear(name: str = "linear", *args: Pattern,
           where: Callable[[Matcher, Node], bool] | None = None) -> Pattern:
    """Any of LINEARS producing the value, bound to `name`."""
    alts = [Op(op, *args, name=name, where=where) for op in LINEARS]
    out = alts[0]
    for alt in alts[1:]:
        out = out | alt
    return out


def bias_of(node: Node) -> str:
    """A linear's bias input ("" when it has none); it follows the weight's tables."""
    slot = 2 if node.op == "linear" else 4
    return node.inputs[slot] if len(node.inputs) > slot else ""


def only_user(m: Matcher, value: str, node: Node) -> bool:
    """`node` alone reads `value`, and it is no graph output."""
    return value not in m.graph.outputs and [u.name for u in m.users(value)] == [node.name]


def find(graph: Graph, pattern: Pattern, anchors: Iterable[str],
         build: Callable[[Matcher, dict], tuple[Node, ...] | None]) -> list[tuple[str, ...]]:
    """Groups: for each node of an `anchors` op, each match of `pattern` at its first output
    that `build` accepts (it returns the group's nodes, None to refuse)."""
    m, ops, seen, groups = Matcher(graph), set(anchors), set(), []
    for node in graph.nodes:
        if node.op not in ops:
            continue
        for b in pattern.match(m, node.outputs[0], {}):
            nodes = build(m, b)
            key = tuple(sorted(n.name for n in nodes)) if nodes else None
            if key and key not in seen:
                seen.add(key)
                groups.append(tuple(n.name for n in nodes))
    return groups


def record(graph: Graph, fusion: str, groups: Iterable[Iterable[str]]) -> Graph:
    """The graph with `fusion`'s groups (node names, in the order its pass documents)
    recorded, replacing any earlier record of it; ids `<fusion>.<i>`."""
    kept = tuple(g for g in graph.fusions if g.fusion != fusion)
    new = tuple(FusionGroup(fusion, f"{fusion}.{i}", tuple(g)) for i, g in enumerate(groups))
    return graph.replace(meta={**graph.meta, "fusions": kept + new})


def recorded(graph: Graph, fusion: str) -> list[tuple[Node, ...]]:
    """`fusion`'s groups as nodes, in recorded order (what a lowering reads); a group one of
    whose nodes a later pass removed is dropped."""
    nodes = {n.name: n for n in graph.nodes}
    return [tuple(nodes[name] for name in g.nodes) for g in graph.fusions
            if g.fusion == fusion and all(name in nodes for name in g.nodes)]


def enabled(no_fuse: Iterable[str] = (), *, take: Iterable[str] = tuple(FUSIONS)
            ) -> tuple[str, ...]:
    """The fusions to run: those the target takes, less `no_fuse` ("all": none). An unknown
    name is refused, naming the known ones."""
    off = set(no_fuse)
    unknown = off - set(FUSIONS) - {"all"}
    if unknown:
        raise KilnError(f"--no-fuse {', '.join(sorted(unknown))}: unknown fusion (known: "
                        f"{', '.join(FUSIONS)}, all)")
    return () if "all" in off else tuple(f for f in take if f not in off)


def options(fusions: Iterable[str]) -> dict[str, dict]:
    """Pipeline options running the passes of `fusions` and no other fusion pass."""
    on = set(fusions)
    return {pass_name(f): {"enabled": f in on} for f in FUSIONS}
