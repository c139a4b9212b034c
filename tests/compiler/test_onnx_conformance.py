"""ONNX's node conformance tests, run through load_onnx_model and kiln's interpreter.

Only the node tests whose ops all have a kiln kernel are included. Tests kiln cannot express are
excluded with a written reason (EXCLUDED); the rest count towards PASS_FLOOR, which the summary
test asserts so that regressions fail. Models at opsets outside 13-23 are re-declared at 13 or
23 when every op they use has the same definition there (their meaning is unchanged).
"""

from __future__ import annotations

import functools
import re
import unittest
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnx.backend.test
from onnx.backend.base import Backend, BackendRep
from onnx.backend.test.loader import load_model_tests

from kiln.compiler import interpreter
from kiln.compiler.errors import KilnError
from kiln.compiler.frontend.onnx import OPSETS, load_onnx_model, op_name
from kiln.compiler.frontend.onnx_tensors import DTYPES
from kiln.compiler.interpreter import KERNELS
from kiln.compiler.ir import Graph

#: passed tests measured when the floor was last raised (of the included total)
PASS_FLOOR = 1030

#: explicit exclusions, regex on the test name -> reason
EXCLUDED = {
    r"^test_training_dropout": "training-mode Dropout draws a random mask: not reproducible",
}


# --- selection -------------------------------------------------------------------------------


def _opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _target_opset(model: onnx.ModelProto) -> int:
    v = _opset(model) or OPSETS.start
    return min(max(v, OPSETS.start), OPSETS.stop - 1)


def _schema(op: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op, opset)
    except onnx.defs.SchemaError:
        return None


def _same_meaning(node: onnx.NodeProto, opset: int, target: int) -> bool:
    """Whether the node means the same at `target` as at `opset`: same definition, or one that
    differs only by optional inputs/outputs/attributes (with defaults kept) the node doesn't use.
    """
    have, want = _schema(node.op_type, opset), _schema(node.op_type, target)
    if have is None or want is None:
        return False
    if have.since_version == want.since_version:
        return True

    def attrs(s: onnx.defs.OpSchema) -> dict[str, str]:
        return {k: str(a.default_value) for k, a in s.attributes.items()}

    def names(params) -> list[str]:
        return [p.name for p in params]

    same_prefix = (names(have.inputs)[:len(want.inputs)] == names(want.inputs)
                   and names(have.outputs)[:len(want.outputs)] == names(want.outputs))
    used_inputs = len([i for i in node.input if i]) <= len(want.inputs) and \
        all(not i for i in node.input[len(want.inputs):])
    used_outputs = all(not o for o in node.output[len(want.outputs):])
    kept = all(attrs(have).get(k) == v for k, v in attrs(want).items())
    return same_prefix and used_inputs and used_outputs and kept and \
        {a.name for a in node.attribute} <= set(want.attributes)


def _elem_types(model: onnx.ModelProto) -> set[int]:
    g = model.graph
    types = {vi.type.tensor_type.elem_type for vi in (*g.input, *g.output)
             if vi.type.HasField("tensor_type")}
    types |= {t.data_type for t in g.initializer}
    for n in g.node:
        types |= {a.i for a in n.attribute if (n.op_type, a.name) in
                  {("Cast", "to"), ("EyeLike", "dtype")}}
        types |= {a.t.data_type for a in n.attribute if a.type == onnx.AttributeProto.TENSOR}
    return types - {0}


def exclusion(model: onnx.ModelProto) -> str | None:
    """Why kiln cannot run this test model (None: it can, given kernels for its ops)."""
    v = _opset(model)
    if v is None:
        return "no default-domain opset (ai.onnx.ml / preview domains are not imported)"
    g = model.graph
    if any(not vi.type.HasField("tensor_type") for vi in (*g.input, *g.output)):
        return "sequence/optional/map values: kiln imports tensors only"
    bad = sorted(onnx.TensorProto.DataType.Name(t) for t in _elem_types(model) - set(DTYPES))
    if bad:
        return f"element types kiln lacks: {', '.join(bad)}"
    target = _target_opset(model)
    for n in g.node:
        if n.domain in ("", "ai.onnx") and not _same_meaning(n, v, target):
            return f"{n.op_type} at opset {v} differs from its opset-{target} definition"
    return None


def _ops(model: onnx.ModelProto) -> set[str]:
    try:
        return {op_name(n) for n in model.graph.node} - {"Constant"}
    except KilnError:
        return {"<other domain>"}


_ONNX_OPS = {s.name for s in onnx.defs.get_all_schemas() if s.domain in ("", "ai.onnx")}


def _main_op(test: str, model: onnx.ModelProto) -> str:
    """The op a test is about: the one its name starts with, else its last node's."""
    ops = sorted(_ONNX_OPS | {n.op_type for n in model.graph.node}, key=len, reverse=True)
    snake = {op: re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", op).lower() for op in ops}
    hit = next((op for op in ops if test.startswith((f"test_{snake[op]}", f"test_{op.lower()}"))),
               None)
    return hit or (model.graph.node[-1].op_type if model.graph.node else "?")


@functools.cache
def selection() -> tuple[dict[str, str], dict[str, str]]:
    """(included test name -> main op, excluded test name -> reason) over supported-op tests."""
    included, excluded = {}, {}
    for t in load_model_tests(kind="node"):
        ops = _ops(t.model)
        if not ops <= set(KERNELS):
            continue
        reason = next((r for pat, r in EXCLUDED.items() if re.search(pat, t.name)), None)
        reason = reason or exclusion(t.model)
        main = _main_op(t.name, t.model)
        (excluded if reason else included)[t.name] = reason or main
    return included, excluded


# --- the backend ------------------------------------------------------------------------------


class KilnRep(BackendRep):
    def __init__(self, graph: Graph):
        self.graph = graph

    def run(self, inputs, **kwargs) -> list[np.ndarray]:
        names = self.graph.meta["onnx_inputs"]
        feeds = {n: np.asarray(x) for n, x in zip(names, inputs, strict=False) if n}
        out = interpreter.run(self.graph, feeds)
        return [out[n] for n in self.graph.outputs]


class KilnBackend(Backend):
    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> KilnRep:
        model = _redeclare_opset(model)
        return KilnRep(load_onnx_model(model, path_hint=f"{model.graph.name or 'test'}.onnx"))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


def _redeclare_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    target = _target_opset(model)
    if _opset(model) == target:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = target
    return model


# --- collection and the summary ---------------------------------------------------------------

RESULTS: dict[str, str] = {}  # test name -> "pass" or the first line of the failure


def _recording(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except unittest.SkipTest:
            RESULTS[name] = "skip"
            raise
        except BaseException as e:
            RESULTS[name] = f"{type(e).__name__}: {_first_line(e)}"
            raise
        RESULTS[name] = "pass"

    return run


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _test_cases() -> dict[str, type[unittest.TestCase]]:
    included, _ = selection()
    backend_test = onnx.backend.test.BackendTest(KilnBackend, __name__)
    backend_test.include("^(" + "|".join(map(re.escape, included)) + ")_cpu$")
    cases = backend_test.test_cases
    wanted = {f"{n}_cpu" for n in included}
    for case in cases.values():
        for attr in [a for a in vars(case) if a.startswith("test_")]:
            if attr in wanted:  # the runner keeps every other test as a skip: drop them
                setattr(case, attr, _recording(attr.removesuffix("_cpu"), getattr(case, attr)))
            else:
                delattr(case, attr)
    return {k: c for k, c in cases.items() if any(a.startswith("test_") for a in vars(c))}


globals().update(_test_cases())


def _run_missing(cases: dict[str, type[unittest.TestCase]]) -> None:
    """Run the included tests that this session did not (e.g. under -k), to count them all."""
    for case in cases.values():
        for attr in [a for a in vars(case) if a.startswith("test_")]:
            if attr.removesuffix("_cpu") not in RESULTS:
                case(attr).run(unittest.TestResult())


def test_conformance_summary(capsys):
    included, excluded = selection()
    _run_missing({k: v for k, v in globals().items() if k.startswith("OnnxBackend")})
    passed = sum(RESULTS.get(n) == "pass" for n in included)
    failing = Counter(included[n] for n in included if RESULTS.get(n) != "pass")
    with capsys.disabled():
        print(f"\nONNX node conformance: {passed}/{len(included)} passed "
              f"({len(excluded)} excluded with reasons)")
        if failing:
            print("failing by op: " + ", ".join(f"{op} {k}" for op, k in failing.most_common()))
    assert passed >= PASS_FLOOR, f"conformance regressed: {passed} < floor {PASS_FLOOR}"
