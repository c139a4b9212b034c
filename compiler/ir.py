"""kiln IR: typed tensors with symbolic dims, SSA nodes with named attributes, lazy parameters.

A Graph is immutable. Values are named by strings (SSA); every value that a node reads is a graph
input, a parameter or an output of an earlier node. Weights never live in nodes: they are Params,
whose data is produced lazily by a ParamSource, so a graph hashes and compares cheaply and can be
built from shapes alone when the weight files are absent.

Op naming: ONNX-level ("generic") ops keep their ONNX names (CamelCase: "MatMul", "Add");
canonical transformer ops are snake_case ("linear", "rms_norm", "attention").
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import sympy

from kiln.runtime import transforms  # numpy only: the GPU host's converter shares it

# ---------------------------------------------------------------------------------------------
# dtypes


class DType(enum.Enum):
    f32 = "float32"
    f16 = "float16"
    bf16 = "bfloat16"
    f64 = "float64"
    i64 = "int64"
    i32 = "int32"
    i16 = "int16"
    i8 = "int8"
    u16 = "uint16"
    u8 = "uint8"
    bool = "bool"
    i4 = "int4"  # packed: two values per byte, low nibble first
    u4 = "uint4"

    @property
    def numpy(self) -> np.dtype:
        return _NUMPY[self]

    @property
    def itemsize(self) -> float:
        return 0.5 if self in (DType.i4, DType.u4) else _NUMPY[self].itemsize

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f16, DType.bf16, DType.f64)

    @property
    def is_int(self) -> bool:
        return not self.is_float and self is not DType.bool

    @staticmethod
    def of(x: np.dtype | np.ndarray | str) -> DType:
        dt = np.dtype(x.dtype if isinstance(x, np.ndarray) else x)
        for k, v in _NUMPY.items():
            if v == dt:  # int4/uint4 arrays hold one unpacked value per element
                return k
        raise TypeError(f"no kiln dtype for numpy dtype {dt}")

    def __repr__(self) -> str:
        return self.value


_NUMPY: dict[DType, np.dtype] = {
    DType.f32: np.dtype(np.float32),
    DType.f16: np.dtype(np.float16),
    DType.bf16: np.dtype(ml_dtypes.bfloat16),
    DType.f64: np.dtype(np.float64),
    DType.i64: np.dtype(np.int64),
    DType.i32: np.dtype(np.int32),
    DType.i16: np.dtype(np.int16),
    DType.i8: np.dtype(np.int8),
    DType.u16: np.dtype(np.uint16),
    DType.u8: np.dtype(np.uint8),
    DType.bool: np.dtype(np.bool_),
    DType.i4: np.dtype(ml_dtypes.int4),
    DType.u4: np.dtype(ml_dtypes.uint4),
}

# ---------------------------------------------------------------------------------------------
# symbolic dimensions

Dim = int | sympy.Expr
Shape = tuple[Dim, ...]

#: canonical symbol names the frontend maps exporters' dimension names onto
BATCH, SEQ, PAST = "batch", "seq", "past"


def sym(name: str) -> sympy.Symbol:
    """A symbolic dimension (a non-negative integer)."""
    return sympy.Symbol(name, integer=True, nonnegative=True)


def dim(d: Any) -> Dim:
    """Normalize an int, a numpy int, a string expression or a sympy expression into a Dim."""
    if isinstance(d, bool):
        raise TypeError("a dimension cannot be a bool")
    if isinstance(d, int | np.integer):
        return int(d)
    if isinstance(d, str):
        names = {s: sym(s) for s in _identifiers(d)}
        d = sympy.sympify(d, locals=names)
    if isinstance(d, sympy.Basic):
        d = sympy.simplify(d) if not d.is_Atom else d
        return int(d) if d.is_Integer else d
    raise TypeError(f"not a dimension: {d!r}")


def _identifiers(expr: str) -> list[str]:
    import re

    return re.findall(r"[A-Za-z_][A-Za-z_0-9]*", expr)


def dim_str(d: Dim) -> str:
    return str(d)


def is_static(shape: Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def shape_str(shape: Shape | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join(dim_str(d) for d in shape) + "]"


def evaluate_dim(d: Dim, bindings: Mapping[str, int]) -> int:
    """The concrete value of a dim under symbol bindings, e.g. {"batch": 1, "seq": 7, "past": 0}."""
    if isinstance(d, int):
        return d
    subs = {s: bindings[s.name] for s in d.free_symbols}
    return int(d.subs(subs))


# ---------------------------------------------------------------------------------------------
# tensors, attributes, nodes


@dataclass(frozen=True, slots=True)
class TensorType:
    dtype: DType
    shape: Shape | None  # None: rank unknown

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype.value}{shape_str(self.shape)}"


AttrValue = int | float | str | bool | DType | sympy.Expr | tuple | None  # tuples nest


class Attrs(Mapping[str, AttrValue]):
    """An immutable, hashable mapping of named attributes (values: scalars, strings, tuples)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, AttrValue] | Iterable[tuple[str, AttrValue]] = ()):
        pairs = items.items() if isinstance(items, Mapping) else items
        object.__setattr__(self, "_items", tuple(sorted((k, _freeze(v)) for k, v in pairs)))

    def __getitem__(self, key: str) -> AttrValue:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Attrs) and self._items == other._items

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k}={v!r}" for k, v in self._items) + "}"

    @property
    def free_symbols(self) -> bool:
        """Whether any attribute holds a symbolic dim (a sympy expression)."""
        return any(_has_symbol(v) for _, v in self._items)

    def updated(self, **kw: AttrValue) -> Attrs:
        return Attrs({**dict(self._items), **kw})


def _has_symbol(v: Any) -> bool:
    if isinstance(v, tuple):
        return any(_has_symbol(x) for x in v)
    return isinstance(v, sympy.Basic)


def _freeze(v: Any) -> AttrValue:
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.ndarray):
        raise TypeError("tensor-valued attributes belong in the parameter table")
    return v


@dataclass(frozen=True, slots=True)
class Node:
    op: str
    inputs: tuple[str, ...]  # "" marks an omitted optional input
    outputs: tuple[str, ...]
    attrs: Attrs = field(default_factory=Attrs)
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.attrs, Attrs):
            object.__setattr__(self, "attrs", Attrs(self.attrs))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))

    def __str__(self) -> str:
        return f"{self.name or '?'} ({self.op})"


# ---------------------------------------------------------------------------------------------
# parameters


class ParamSource:
    """Where a parameter's data comes from. Subclasses are frozen dataclasses."""

    def load(self) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of how the data is derived (for manifests)."""
        raise NotImplementedError

    @property
    def available(self) -> bool:
        return True


@dataclass(frozen=True, slots=True, eq=False)
class Inline(ParamSource):
    """Data held in memory: the model's embedded initializers, folded values, or (computed=True)
    constants kiln computed itself (precomputed tables, split sizes), which ship with the
    kernels even when the weights do not."""

    array: np.ndarray
    computed: bool = False

    def load(self) -> np.ndarray:
        return self.array

    def describe(self) -> dict[str, Any]:
        return {"kind": "computed" if self.computed else "inline"}


@dataclass(frozen=True, slots=True)
class ExternalData(ParamSource):
    """Raw little-endian data at an offset of a file, read by memory map on first use."""

    path: str
    offset: int
    length: int | None
    dtype: DType
    shape: tuple[int, ...]

    def load(self) -> np.ndarray:
        import os

        if not os.path.exists(self.path):
            from kiln.compiler.errors import KilnError

            raise KilnError(f"{self.path}: external data file is missing")
        count = int(np.prod(self.shape, dtype=np.int64))
        arr = np.memmap(self.path, dtype=self.dtype.numpy, mode="r", offset=self.offset,
                        shape=(count,))
        return np.asarray(arr).reshape(self.shape)

    def describe(self) -> dict[str, Any]:
        # dtype and shape let a reader without the compiler (kiln.runtime.convert) read it
        return {"kind": "external", "path": self.path, "offset": self.offset,
                "dtype": self.dtype.value, "shape": list(self.shape)}

    @property
    def available(self) -> bool:
        import os

        return os.path.exists(self.path)


@dataclass(frozen=True, slots=True)
class Derived(ParamSource):
    """Data computed from other sources by a named transform (transpose, slice, quantize, ...).

    `fn` names an entry of `kiln.compiler.ir.PARAM_TRANSFORMS`; attrs are its keyword arguments.
    """

    fn: str
    sources: tuple[ParamSource, ...]
    attrs: Attrs = field(default_factory=Attrs)

    def load(self) -> np.ndarray:
        return PARAM_TRANSFORMS[self.fn](*(s.load() for s in self.sources), **dict(self.attrs))

    def describe(self) -> dict[str, Any]:
        return {"kind": "derived", "fn": self.fn, "attrs": {k: _jsonable(v) for k, v in
                self.attrs.items()}, "sources": [s.describe() for s in self.sources]}

    @property
    def available(self) -> bool:
        return all(s.available for s in self.sources)


def _jsonable(v: AttrValue) -> Any:
    if isinstance(v, DType):
        return v.value
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


#: named parameter transforms usable by Derived sources; passes register more (quantizers)
PARAM_TRANSFORMS: dict[str, Callable[..., np.ndarray]] = {
    **transforms.LAYOUT,
    **transforms.SPARSE,
    "cast": lambda a, dtype: a.astype(DType(dtype).numpy if isinstance(dtype, str) else
                                      dtype.numpy),
}


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: TensorType
    source: ParamSource

    def load(self) -> np.ndarray:
        arr = self.source.load()
        want = tuple(self.type.shape or ())
        if arr.shape != want:
            from kiln.compiler.errors import KilnError

            raise KilnError(f"parameter {self.name}: data has shape {list(arr.shape)}, "
                            f"declared {shape_str(self.type.shape)}")
        return arr

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.type.shape or (), dtype=np.int64) * self.type.dtype.itemsize)


def inline_param(name: str, array: np.ndarray, *, computed: bool = True) -> Param:
    """A parameter holding `array`; by default a constant kiln computed (see Inline)."""
    array = np.asarray(array)
    return Param(name, TensorType(DType.of(array), tuple(int(d) for d in array.shape)),
                 Inline(array, computed))


# ---------------------------------------------------------------------------------------------
# graph


@dataclass(frozen=True, slots=True)
class FusionGroup:
    """Nodes a fusion pass decided the kernels run as one region (kiln.passes.fusion); the
    lowerings read these records, they never match fusions themselves. `fusion` names the
    fusion (FUSIONS), `nodes` are node names in the order its pass documents, `id` is unique
    in the graph."""

    fusion: str
    id: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Graph:
    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    types: Mapping[str, TensorType]  # every value: inputs, params, node outputs
    params: Mapping[str, Param]
    name: str = "main"
    meta: Mapping[str, Any] = field(default_factory=dict)  # opset, producer, tokenizer hints...

    def replace(self, **changes: Any) -> Graph:
        return dataclasses.replace(self, **changes)

    def type_of(self, value: str) -> TensorType:
        return self.types[value]

    def producers(self) -> dict[str, Node]:
        return {out: n for n in self.nodes for out in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    users.setdefault(i, []).append(n)
        return users

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for n in self.nodes:
            hist[n.op] = hist.get(n.op, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))

    def param_count(self) -> int:
        return sum(int(np.prod(p.type.shape or (), dtype=np.int64)) for p in
                   self.params.values())

    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params.values())

    def to_networkx(self):
        """A DiGraph over node indices (edges follow values), for reachability and ordering."""
        import networkx as nx

        g = nx.DiGraph()
        producer = {out: i for i, n in enumerate(self.nodes) for out in n.outputs}
        for i, n in enumerate(self.nodes):
            g.add_node(i)
            for v in n.inputs:
                if v in producer:
                    g.add_edge(producer[v], i)
        return g

    @property
    def fusions(self) -> tuple[FusionGroup, ...]:
        """The fusion groups recorded by the fusion passes, in the order they were recorded."""
        return tuple(self.meta.get("fusions", ()))

    def dump(self) -> str:
        """A readable text form of the graph (used by --dump-ir); a node in fusion groups says
        which after its name, and the groups are listed after the body."""
        groups: dict[str, list[str]] = {}
        for g in self.fusions:
            for name in g.nodes:
                groups.setdefault(name, []).append(g.id)
        lines = [f"graph {self.name}("]
        lines += [f"    {v}: {self.types[v]}," for v in self.inputs]
        lines.append(f") params={len(self.params)} ({self.param_bytes():,} bytes) {{")
        for n in self.nodes:
            outs = ", ".join(f"{o}: {self.types.get(o, '?')}" for o in n.outputs)
            attrs = f" {n.attrs!r}" if n.attrs else ""
            fused = f" [fusion {', '.join(groups[n.name])}]" if n.name in groups else ""
            lines.append(f"    {outs} = {n.op}({', '.join(n.inputs)}){attrs}  # {n.name}{fused}")
        lines.append(f"    return {', '.join(self.outputs)}")
        lines.append("}")
        lines += [f"fusion {g.id}: {', '.join(g.nodes)}" for g in self.fusions]
        return "\n".join(lines)
