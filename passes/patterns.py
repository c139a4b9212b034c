"""A small pattern language over kiln graphs, used by the recognition passes.

Patterns describe the dataflow that produces a value, read as the formula it computes:

    x, w = Var("x"), Const("w")
    inv_rms = Op("Div", Const(value=1.0), Op("Sqrt", Op("Add", mean_square, Const("eps"))))
    rms = Op("Mul", w, Op("Mul", x, inv_rms))

`Op` matches the node producing a value (commutative ops try both input orders), `Var` binds any
value (and must bind the same value everywhere it appears), `Const` binds a parameter and may check
its contents, `a | b` tries alternatives and `Skip(op, p)` matches `p` with or without one
`op` node (Cast, Identity) on top. Matching backtracks and yields every binding that fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.compiler.ir import Graph, Node

Bindings = Mapping[str, Any]

COMMUTATIVE = frozenset({"Add", "Mul", "And", "Or", "Equal", "Max", "Min"})


class Pattern:
    def __or__(self, other: Pattern) -> Pattern:
        return Alt((self, other))

    def match(self, m: Matcher, value: str, b: dict) -> Iterator[dict]:
        raise NotImplementedError


@dataclass(frozen=True)
class Var(Pattern):
    """Any value; binds `name` to the value's name (the same value at every occurrence)."""

    name: str
    where: Callable[[Matcher, str], bool] | None = None

    def match(self, m, value, b):
        if self.name in b:
            if b[self.name] == value:
                yield b
            return
        if self.where is None or self.where(m, value):
            yield {**b, self.name: value}


@dataclass(frozen=True)
class Const(Pattern):
    """A parameter. With `value`, every element must equal it (within `rtol`)."""

    name: str | None = None
    value: float | None = None
    rtol: float = 1e-6
    scalar: bool = False  # exactly one element

    def match(self, m, value, b):
        p = m.graph.params.get(value)
        if p is None:
            return
        if self.scalar and int(np.prod(p.type.shape or (), dtype=np.int64)) != 1:
            return
        if self.value is not None:  # only a value check needs the data
            arr = m.const(value)
            if arr is None or arr.size == 0 or not np.allclose(
                    arr.astype(np.float64), self.value, rtol=self.rtol, atol=1e-12):
                return
        if self.name is None:
            yield b
        elif self.name not in b or b[self.name] == value:
            yield {**b, self.name: value}


@dataclass(frozen=True)
class Op(Pattern):
    """The node of type `op` whose output `out` is the value; inputs match `args` in order;
    `where(matcher, node)` may check attributes."""

    op: str
    args: tuple[Pattern, ...] = ()
    name: str | None = None
    out: int = 0
    where: Callable[[Matcher, Node], bool] | None = None
    commutative: bool | None = None

    def __init__(self, op: str, *args: Pattern, name: str | None = None, out: int = 0,
                 where: Callable[[Matcher, Node], bool] | None = None,
                 commutative: bool | None = None):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "args", tuple(args))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "out", out)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "commutative", commutative)

    def match(self, m, value, b):
        node = m.producer.get(value)
        if node is None or node.op != self.op or node.outputs[self.out] != value:
            return
        if self.where is not None and not self.where(m, node):
            return
        if self.name is not None:
            if self.name in b and b[self.name] is not node:
                return
            b = {**b, self.name: node}
        inputs = [v for v in node.inputs]
        if len(self.args) > len(inputs):
            return
        orders = [inputs]
        commutative = self.op in COMMUTATIVE if self.commutative is None else self.commutative
        if commutative and len(self.args) == 2 and len(inputs) == 2:
            orders.append(inputs[::-1])
        for order in orders:
            yield from _match_seq(m, self.args, order, b)


def _match_seq(m: Matcher, pats, values, b) -> Iterator[dict]:
    if not pats:
        yield b
        return
    for b2 in pats[0].match(m, values[0], b):
        yield from _match_seq(m, pats[1:], values[1:], b2)


@dataclass(frozen=True)
class Alt(Pattern):
    options: tuple[Pattern, ...]

    def __or__(self, other: Pattern) -> Pattern:
        return Alt((*self.options, other))

    def match(self, m, value, b):
        for p in self.options:
            yield from p.match(m, value, b)


def Skip(op: str, inner: Pattern) -> Pattern:
    """`inner`, optionally wrapped in one `op` node (e.g. a Cast or an Identity)."""
    return Op(op, inner) | inner


@dataclass
class Matcher:
    """Match patterns against one graph (producer map and constant cache built once)."""

    graph: Graph
    producer: dict[str, Node] = field(init=False)
    _consts: dict[str, np.ndarray | None] = field(init=False, default_factory=dict)
    _consumers: dict[str, list[Node]] | None = field(init=False, default=None)
    max_const_elements: int = 1 << 16

    def __post_init__(self) -> None:
        self.producer = self.graph.producers()

    def const(self, value: str) -> np.ndarray | None:
        """The contents of a small parameter (None for big or unavailable ones)."""
        if value not in self._consts:
            p = self.graph.params.get(value)
            small = p is not None and np.prod(p.type.shape or (), dtype=np.int64) <= \
                self.max_const_elements
            self._consts[value] = p.load() if small and p.source.available else None
        return self._consts[value]

    def users(self, value: str) -> list[Node]:
        """The nodes that read `value` (the consumer map is built on first use)."""
        if self._consumers is None:
            self._consumers = self.graph.consumers()
        return self._consumers.get(value, [])

    def first(self, pattern: Pattern, value: str) -> dict | None:
        return next(iter(pattern.match(self, value, {})), None)
