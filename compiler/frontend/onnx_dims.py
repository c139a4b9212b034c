"""Exporters' symbolic dimension names -> kiln's canonical symbols (batch, seq, past)."""

from __future__ import annotations

import keyword
import re
from collections.abc import Iterable

import onnx
import sympy

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import BATCH, PAST, SEQ, Dim, Shape, sym

#: inputs whose dims have a known role: name pattern -> {axis: canonical symbol}
_ROLES: list[tuple[re.Pattern[str], int, dict[int, str]]] = [
    (re.compile(r"^(input_ids|inputs_embeds)$"), 2, {0: BATCH, 1: SEQ}),
    (re.compile(r"^past.*(key|value)"), 4, {0: BATCH, 2: PAST}),
]

#: sympy functions exporters write inside dim expressions (torch dynamo: "Max(1, s0)")
_FUNCTIONS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Max": sympy.Max,
              "Min": sympy.Min, "max": sympy.Max, "min": sympy.Min, "Mod": sympy.Mod}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


class DimNamer:
    """Turns ONNX dims (dim_value / dim_param / unnamed) into kiln Dims, consistently per graph.

    Exporter names found on role inputs (input_ids, past_key_values.*) become batch/seq/past;
    expressions over them ("past_sequence_length + sequence_length", "s0 + s1") are rewritten
    by substitution; other names stay as sanitized symbols; unnamed dims get fresh symbols.
    """

    def __init__(self, renames: dict[str, str]):
        self.renames = dict(renames)
        self._fresh = 0

    @classmethod
    def from_inputs(cls, inputs: Iterable[onnx.ValueInfoProto]) -> DimNamer:
        renames: dict[str, str] = {}
        for vi in inputs:
            dims = _dims_of(vi)
            for pattern, rank, roles in _ROLES:
                if dims is None or len(dims) != rank or not pattern.search(vi.name):
                    continue
                for axis, canonical in roles.items():
                    name = dims[axis].dim_param.strip() if dims[axis].HasField("dim_param") \
                        else ""
                    if _IDENT.fullmatch(name) and canonical not in renames.values():
                        renames.setdefault(name, canonical)
        return cls(renames)

    def shape(self, value: str, type_proto: onnx.TypeProto) -> Shape | None:
        """The kiln shape of a tensor type (None when its rank is unknown)."""
        if not type_proto.tensor_type.HasField("shape"):
            return None
        return tuple(self.dim(value, axis, d)
                     for axis, d in enumerate(type_proto.tensor_type.shape.dim))

    def dim(self, value: str, axis: int, d: onnx.TensorShapeProto.Dimension) -> Dim:
        if d.HasField("dim_value"):
            if d.dim_value < 0:
                raise KilnError(f"{value} declares dim {axis} = {d.dim_value} (negative)")
            return int(d.dim_value)
        name = d.dim_param.strip() if d.HasField("dim_param") else ""
        if not name:
            return self._fresh_symbol()
        out = self._parse(name)
        if isinstance(out, int) and out < 0:
            raise KilnError(f"{value} declares dim {axis} = {name!r} (negative)")
        return out

    def _parse(self, text: str) -> Dim:
        names = {n: sym(self.renames.get(n, sanitize(n))) for n in _IDENT.findall(text)
                 if n not in _FUNCTIONS}
        if not keyword.iskeyword(text) and not any(keyword.iskeyword(n) for n in names):
            try:
                expr = sympy.sympify(text, locals={**_FUNCTIONS, **names})
            except (sympy.SympifyError, SyntaxError, TypeError, ValueError):
                expr = None
            if isinstance(expr, sympy.Expr) and (expr.free_symbols or expr.is_Integer):
                return int(expr) if expr.is_Integer else expr
        return sym(self.renames.get(text, sanitize(text)))

    def _fresh_symbol(self) -> sympy.Symbol:
        self._fresh += 1
        return sym(f"unnamed_{self._fresh}")

    def names(self) -> dict[str, str]:
        """Exporter dim name -> canonical symbol, for graph.meta."""
        return dict(self.renames)


def sanitize(name: str) -> str:
    """A valid identifier made from an exporter's dim name ("batch size" -> "batch_size")."""
    ident = re.sub(r"\W", "_", name.strip()) or "dim"
    if ident[0].isdigit() or keyword.iskeyword(ident):
        ident = "d_" + ident
    return ident


def _dims_of(vi: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension] | None:
    tt = vi.type.tensor_type
    return list(tt.shape.dim) if vi.type.HasField("tensor_type") and tt.HasField("shape") \
        else None
