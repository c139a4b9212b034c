"""Weight-only quantization: presets, the numpy quantizer and the `quantize_weights` pass.

The op this pass emits (its numpy specification: compiler/interpreter/transformer_ops.py):

    quant_linear(x[..., K], qweight, scales[, zero_points][, bias[N]]) -> [..., N]
        attrs: bits (8 | 4), group_size g (K for per output channel), in_features K,
               out_features N, layout ("nk" | "blocked")
        W[n, k] = (q[n, k] - zp[n, k // g]) * scales[n, k // g];  y = x @ W[:N, :K]^T (+ bias)
    quant_embedding(qtable, scales, zero_points | "", ids[...]) -> [..., K]
        the same attributes; row ids of W (a tied LM head's table, read without a fp32 copy)

The stored format (code offsets, nibble order, groups, the `nk` and `blocked` layouts) and
its dequantization are kiln.runtime.quant_format's, written down there once. Zero points, when
present, are float32 integers (onnxruntime's MatMulNBits and QDQ zero points convert to them
exactly; see kiln.compiler.frontend.onnx_quant_import). pack_linear_weights lays weights out
`blocked` (see kiln.codegen.kernels.quant_linear).

The pass quantizes every `linear` whose weight is a 2-D float32 parameter read by nothing but
linears and (tied) embeddings, the LM head included, unless a `keep` pattern matches it; the
preset's `int8` roles (the LM head, the q/k/v projections) get int8 per output channel instead
of its own scheme. A tied embedding becomes `quant_embedding` over the same quantized table, so
the fp32 table is no longer shipped. With calibration windows and the weights at hand, weights
are solved by GPTQ (kiln.passes.gptq), otherwise rounded to nearest. The pass emits `nk`;
pack_linear_weights lays quantized weights (its own and imported ones) out `blocked` for the CPU.
Quantized parameters are Derived from the originals by the transforms registered here, so
`kiln convert` regenerates them from the weights.
Requires: linear recognized (canonical graph). Preserves: every value name and type.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import (
    PARAM_TRANSFORMS,
    Attrs,
    Derived,
    DType,
    Graph,
    Inline,
    Node,
    Param,
    TensorType,
)
from kiln.passes import register
from kiln.runtime import quant_format as qf
from kiln.runtime import transforms
from kiln.runtime.quant_format import CLIP_SEARCH, quantize_codes
from kiln.runtime.quant_format import LANES as LANES
from kiln.runtime.quant_format import blocked as blocked
from kiln.runtime.quant_format import groups_of as groups_of
from kiln.runtime.quant_format import pack_nibbles as pack_nibbles


@dataclass(frozen=True, slots=True)
class QuantPreset:
    """A weight quantization scheme; `group_size` 0 means one group per output channel.

    `int8` names roles whose weights are quantized to int8 per output channel instead (the most
    sensitive few, as llama.cpp's mixes keep attn_v and the output matrix at more bits):
    "lm_head" (the LM head and the embedding tied to it) and "attn_qkv" (the linears whose
    outputs are attention's queries, keys and values). `keep` patterns stay in fp32."""

    name: str
    bits: int = 8
    group_size: int = 0
    symmetric: bool = True
    kv_bits: int = 0  # 8: int8 KV cache (kiln.passes.quantize_kv_cache)
    keep: tuple[str, ...] = ()  # fnmatch patterns of node/param names kept in fp32
    method: str = "gptq"  # "gptq" (calibrated, when weights are at hand) | "rtn"
    int8: tuple[str, ...] = ()  # roles quantized to int8 per channel: "lm_head", "attn_qkv"
    act_order: bool = True  # GPTQ's column order (kiln.passes.gptq)
    #: > 0: the int8 weights are chosen by measured sensitivity (kiln.passes.quant_sensitivity)
    #: instead of by `int8` roles, adding at most this fraction of the all-`bits` weight bytes
    int8_budget: float = 0.0
    #: 8: the quantized linears' activations are quantized to int8 per row and 32 columns
    #: (`-a8`): the CPU's kernels multiply codes with VNNI (kiln.codegen.kernels.quant_linear)
    act_bits: int = 0
    #: int8 activations wherever the target multiplies codes in hardware (`for_target`): the
    #: int4 presets' default, as their quality holds with them (benchmarks/RESULTS.md); `-a32`
    #: keeps float activations
    act_auto: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise KilnError(f"quant preset {self.name}: bits must be 4 or 8, got {self.bits}")
        if self.group_size and (self.group_size < 2 or self.group_size % 2):
            raise KilnError(f"quant preset {self.name}: group size {self.group_size} must be "
                            "even")
        unknown = set(self.int8) - set(ROLES)
        if unknown:
            raise KilnError(f"quant preset {self.name}: unknown roles {sorted(unknown)}; known: "
                            f"{', '.join(ROLES)}")

    def for_target(self, int8_dot: bool) -> QuantPreset:
        """This preset as compiled for a target that does (`int8_dot`) or does not multiply
        int8 activation codes in hardware: `act_auto` presets take int8 activations there."""
        if self.act_auto and not self.act_bits and int8_dot:
            return dataclasses.replace(self, act_bits=8)
        return self

    def scheme(self, roles: set[str]) -> tuple[int, int, bool]:
        """(bits, group size, symmetric) of a weight with these roles."""
        if roles & set(self.int8) and not self.int8_budget:
            return 8, 0, True
        return self.bits, self.group_size, self.symmetric

    @classmethod
    def from_dict(cls, d: dict) -> QuantPreset:
        """The preset a manifest recorded (`to_dict`), as it was then: fields an older kiln did
        not record take the behaviour it had (no int8 roles, no act order)."""
        return cls(d["preset"], bits=d["bits"], group_size=d["group_size"],
                   symmetric=d["symmetric"], kv_bits=d.get("kv_bits", 0),
                   keep=tuple(d.get("keep", ())), method=d.get("method", "gptq"),
                   int8=tuple(d.get("int8", ())), act_order=d.get("act_order", False),
                   int8_budget=d.get("int8_budget", 0.0), act_bits=d.get("act_bits", 0),
                   act_auto=d.get("act_auto", False))

    def to_dict(self) -> dict:
        return {"preset": self.name, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "kv_bits": self.kv_bits, "keep": list(self.keep),
                "method": self.method, "int8": list(self.int8), "act_order": self.act_order,
                "int8_budget": self.int8_budget, "act_bits": self.act_bits,
                "act_auto": self.act_auto}


#: the roles a preset may keep at int8 (see QuantPreset.int8); the int4 presets keep all of them
#: at int8 unless "-pure" (measured on SmolLM2-135M: benchmarks/RESULTS.md, "CPU quantization,
#: session 3")
ROLES = ("lm_head", "attn_qkv")

#: the int8 budget of "-auto" (a fraction of the all-int4 weight bytes): about what the int8 roles
#: cost on SmolLM2-135M at w4g32 (11.2 of 101 MB)
AUTO_BUDGET = 0.11

#: named presets; int4 ones have zero points, "s" makes them symmetric ("w4g32s"), and int8
#: activations where the target multiplies codes (VNNI; "-a32": float activations); combine
#: with "-": "w4g32-kv8", "w4g32-pure" (no int8 roles), "w4g32-rtn" (round to nearest),
#: "w4g32-auto" (int8 weights by measured sensitivity within AUTO_BUDGET; "-auto0.2": within
#: 0.2), "w8-a8" (int8 activations on any CPU)
PRESETS: dict[str, QuantPreset] = {p.name: p for p in (
    QuantPreset("w8", bits=8),
    *(QuantPreset(f"w4g{g}{'s' if sym else ''}", bits=4, group_size=g, symmetric=sym,
                  int8=ROLES, act_auto=True) for g in (32, 64, 128) for sym in (False, True)),
    QuantPreset("kv8", bits=8, kv_bits=8),
)}


def parse_preset(spec: str, keep: tuple[str, ...] | list[str] = ()) -> QuantPreset:
    """`w4g32`, `w8`, `w4g32-kv8`, `kv8`, `w4g32-rtn`, `w4g32-pure` ... -> a QuantPreset (keep
    patterns attached); `rtn` rounds to nearest instead of calibrating with GPTQ, `pure`
    quantizes every weight with the preset's own scheme (no int8 roles), `auto[F]` chooses the
    int8 weights by measured sensitivity within a budget (F, default AUTO_BUDGET), `a8` quantizes
    the activations of the quantized linears to int8 (per row and 32 columns), `a32` keeps
    them float (the int4 presets otherwise take int8 ones where the target multiplies codes:
    QuantPreset.for_target)."""
    modifiers = ("kv8", "rtn", "pure", "a8", "a32")
    parts = [p for p in spec.strip().lower().split("-") if p]
    auto = [p for p in parts if p.startswith("auto")]
    budget = _auto_budget(spec, auto[-1]) if auto else 0.0
    parts = [p for p in parts if not p.startswith("auto")]
    weights = [p for p in parts if p not in modifiers]
    unknown = [p for p in weights if p not in PRESETS] + (["-"] if len(weights) > 1 else [])
    if not parts or unknown:
        raise KilnError(f"unknown quantization preset {spec!r}; known: "
                        f"{', '.join(sorted(PRESETS))} (combine with -kv8, -rtn, -pure, -a8, "
                        "-a32, -auto)")
    if "a8" in parts and "a32" in parts:
        raise KilnError(f"quantization preset {spec!r}: -a8 and -a32 contradict each other")
    if "a8" in parts and not weights:
        raise KilnError(f"quantization preset {spec!r}: -a8 quantizes the activations of "
                        "quantized weights; name a weight preset (e.g. w4g32-a8)")
    base = PRESETS[weights[0]] if weights else dataclasses.replace(PRESETS["kv8"], bits=8)
    kv = 8 if "kv8" in parts else 0
    weights_on = bool(weights)
    return dataclasses.replace(base, name=spec.strip().lower(), kv_bits=kv,
                               keep=tuple(keep) + (() if weights_on else ("*",)),
                               method="rtn" if "rtn" in parts else "gptq",
                               int8=() if "pure" in parts else base.int8,
                               int8_budget=budget if weights_on else 0.0,
                               act_bits=8 if "a8" in parts and weights_on else 0,
                               act_auto=base.act_auto and "a32" not in parts)


def _auto_budget(spec: str, part: str) -> float:
    try:
        budget = float(part[4:]) if part[4:] else AUTO_BUDGET
    except ValueError:
        budget = -1.0
    if not 0 < budget <= 1:
        raise KilnError(f"quantization preset {spec!r}: {part!r} needs a budget in (0, 1], "
                        "a fraction of the weight bytes (e.g. auto0.2)")
    return budget


# ---------------------------------------------------------------------------------------------
# the compile-time transforms (the format and the quantizer: kiln.runtime.quant_format)


def quantize(w: np.ndarray, *, bits: int, group: int, symmetric: bool = True,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """w[N, K] -> (q[N, Kp] unpacked codes, scales[N, G], zero_points[N, G] | None), rounded
    to nearest with the searched clip (kiln.runtime.quant_format.quantize_codes: numpy only, so
    the GPU host's converter quantizes with the same code)."""
    return quantize_codes(w, bits=bits, group=group, symmetric=symmetric, clip=CLIP_SEARCH)


def _quantize_part(w: np.ndarray, *, bits: int, group: int, symmetric: bool, part: str,
                   ) -> np.ndarray:
    q, scales, zp = quantize(np.asarray(w, np.float32), bits=bits, group=group,
                             symmetric=symmetric)
    if part == "qweight":
        return qf.pack_codes(q, bits)
    return scales if part == "scales" else zp


PARAM_TRANSFORMS["quantize"] = _quantize_part
PARAM_TRANSFORMS.update(transforms.QUANT_LAYOUT)
# the transforms of imported (pre-quantized) weights live in compiler/frontend/onnx_quant_import


# ---------------------------------------------------------------------------------------------
# the pass

#: (op, input slot) pairs that may read a weight the pass quantizes
_READERS = {("linear", 1), ("embedding", 0)}


@register("quantize_weights")
def quantize_weights(graph: Graph, *, preset: QuantPreset | None = None,
                     calibration: tuple = ()) -> Graph:
    """Quantize linear weights per `preset` (None: the graph as it is). `calibration`: token
    windows (1, T) for GPTQ; without them (or without the weights) the weights are rounded to
    nearest. pack_linear_weights lays the quantized weights out `blocked` for the CPU."""
    return graph if preset is None else _quantize_linears(graph, preset, calibration)


def _quantize_linears(graph: Graph, preset: QuantPreset, calibration: tuple = ()) -> Graph:
    uses: dict[str, set[tuple[str, int]]] = {}
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            if v in graph.params:
                uses.setdefault(v, set()).add((n.op, i))
    heads = {n.name for n in graph.nodes if n.op == "linear" and n.outputs[0] in graph.outputs}
    kept = {n.inputs[1] for n in graph.nodes if n.op == "linear"
            and _kept(n, preset.keep, n.name in heads)}
    chosen = {name for name, u in uses.items() if ("linear", 1) in u and u <= _READERS
              and name not in kept and _quantizable(graph.params[name])}
    if not chosen:
        return graph
    roles = weight_roles(graph)
    schemes = {name: preset.scheme(roles.get(name, set())) for name in chosen}
    if preset.int8_budget:
        schemes = int8_by_sensitivity(graph, schemes, calibration, preset.int8_budget)
    hess = (_calibrate(graph, schemes, calibration, preset.act_order)
            if preset.method == "gptq" else {})
    params, types = dict(graph.params), dict(graph.types)
    made: dict[str, tuple[str, str, str, Attrs]] = {}
    for name in sorted(chosen):
        made[name] = _add_quantized(params, types, graph.params[name], schemes[name],
                                    hess.get(name), preset.act_order)
    nodes = tuple(_rewrite(n, made, preset.act_bits) for n in graph.nodes)
    for name in chosen:
        del params[name], types[name]
    return graph.replace(nodes=nodes, params=params, types=types,
                         meta={**graph.meta, "quant": preset.to_dict()})


def _kept(node: Node, patterns: tuple[str, ...], is_head: bool) -> bool:
    names = (node.name, node.inputs[1])
    return any((p == "lm_head" and is_head) or any(fnmatch.fnmatchcase(s, p) for s in names)
               for p in patterns)


def _quantizable(p: Param) -> bool:
    shape = p.type.shape or ()
    return p.type.dtype is DType.f32 and len(shape) == 2 and all(isinstance(d, int) and d > 0
                                                                 for d in shape)


#: ops a linear's output may pass through on its way to attention's q, k or v
_TO_ATTENTION = {"Split", "rotary", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}


def weight_roles(graph: Graph) -> dict[str, set[str]]:
    """linear weight name -> its roles: "lm_head" (the linear makes a graph output),
    "attn_qkv" (its output reaches attention's q, k or v through reshapes, splits, rotary)."""
    producer = {v: n for n in graph.nodes for v in n.outputs if v}
    roles: dict[str, set[str]] = {}
    for n in graph.nodes:
        if n.op == "linear" and n.outputs[0] in graph.outputs:
            roles.setdefault(n.inputs[1], set()).add("lm_head")
    for n in graph.nodes:
        if n.op != "attention":
            continue
        todo = list(n.inputs[:3])
        while todo:
            p = producer.get(todo.pop())
            if p is None:
                continue
            if p.op == "linear":
                roles.setdefault(p.inputs[1], set()).add("attn_qkv")
            elif p.op in _TO_ATTENTION:
                todo.append(p.inputs[0])
    return roles


def _calibrate(graph: Graph, schemes: dict[str, tuple[int, int, bool]], calibration: tuple,
               act_order: bool) -> dict:
    """weight name -> the Hessian of its linear's input over the calibration windows, each
    taken with the weights before it already quantized ({} when there is no calibration text or
    the weights are not at hand: round to nearest then)."""
    if not calibration or not all(graph.params[n].source.available for n in schemes):
        return {}
    from kiln.passes.gptq import calibrate, solved_weight
    from kiln.passes.prune_weights import gptq_source

    def quantized(name: str, w: np.ndarray, h: np.ndarray) -> np.ndarray:
        bits, group, symmetric = schemes[name]
        src, pruning = gptq_source(graph.params[name])  # a pruned weight: see prune_weights
        return solved_weight(w if src is graph.params[name].source else src.load(), h,
                             bits=bits, group=group, symmetric=symmetric, act_order=act_order,
                             **pruning)

    return calibrate(graph, schemes, list(calibration), quantized)


def int8_by_sensitivity(graph: Graph, schemes: dict[str, tuple[int, int, bool]],
                        calibration: tuple, budget: float) -> dict[str, tuple[int, int, bool]]:
    """`schemes` with the weights kiln.passes.quant_sensitivity picks within `budget` at int8,
    measured with the fp32 model's Hessians over the calibration windows (the identity, i.e.
    the weights' own error, without calibration text)."""
    from kiln.passes import quant_sensitivity as qs

    names = sorted(schemes)
    if not all(graph.params[n].source.available for n in names):
        raise KilnError("quantization with -auto measures each weight's sensitivity, so it "
                        "needs the weights at compile time (not --no-weights)")
    hess: dict = {}
    if calibration:
        from kiln.passes.gptq import calibrate

        hess = calibrate(graph, names, list(calibration), lambda n, w, h: w)
    weights = ((n, np.asarray(graph.params[n].load(), np.float32), schemes[n]) for n in names)
    costs = qs.measure((n, w, hess.get(n, np.eye(w.shape[1])), s) for n, w, s in weights)
    shapes = {n: tuple(graph.params[n].type.shape) for n in names}
    picked = qs.choose_int8(costs, sum(qs.budget_of({n: shapes[n]}, schemes[n], budget)
                                       for n in names))
    return {n: qs.INT8 if n in picked else s for n, s in schemes.items()}


def _add_quantized(params: dict, types: dict, p: Param, scheme: tuple[int, int, bool],
                   hessian: np.ndarray | None = None, act_order: bool = False,
                   ) -> tuple[str, str, str, Attrs]:
    bits, group, symmetric = scheme
    n, k = p.type.shape
    g, ng = groups_of(k, group)
    base = dict(bits=bits, group=group, symmetric=symmetric)
    q_shape = (n, qf.packed_columns(ng * g, bits))
    q_dtype = DType(qf.qweight_dtype(bits))
    specs = [("qweight", TensorType(q_dtype, q_shape)),
             ("scales", TensorType(DType.f32, (n, ng)))]
    if not symmetric:
        specs.append(("zero_points", TensorType(DType.f32, (n, ng))))
    names = []
    if hessian is not None:
        from kiln.passes.prune_weights import gptq_source

        solved, pruning = gptq_source(p)  # a pruned weight keeps its zeros
    for part, t in specs:
        src = (Derived("gptq", (solved, Inline(hessian)),
                       Attrs({**base, "part": part, "act_order": act_order, **pruning}))
               if hessian is not None else
               Derived("quantize", (p.source,), Attrs({**base, "part": part})))
        q = Param(f"{p.name}.{part}", t, src)
        params[q.name], types[q.name] = q, t
        names.append(q.name)
    attrs = Attrs({"bits": bits, "group_size": g, "in_features": k, "out_features": n,
                   "layout": "nk"})
    return names[0], names[1], names[2] if len(names) > 2 else "", attrs


def _rewrite(n: Node, made: dict[str, tuple[str, str, str, Attrs]], act_bits: int = 0) -> Node:
    if n.op == "linear" and n.inputs[1] in made:
        q, s, z, attrs = made[n.inputs[1]]
        if act_bits:  # its activations quantized to int8 (quant_format.quantize_rows)
            attrs = Attrs({**attrs, "act_bits": act_bits})
        bias = n.inputs[2] if len(n.inputs) > 2 else ""
        inputs = (n.inputs[0], q, s, z, bias) if bias else (n.inputs[0], q, s, z)
        return dataclasses.replace(n, op="quant_linear", inputs=inputs, attrs=attrs)
    if n.op == "embedding" and n.inputs[0] in made:
        q, s, z, attrs = made[n.inputs[0]]
        return dataclasses.replace(n, op="quant_embedding", inputs=(q, s, z, n.inputs[1]),
                                   attrs=attrs)
    return n
