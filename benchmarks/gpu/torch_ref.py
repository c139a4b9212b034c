"""A torch interpreter of kiln's canonical graphs (float64 reference for the CUDA checks).

Needs torch and numpy only (it runs on the GPU host, where neither TVM's compiler nor onnx is).
The graph comes as JSON (`graph_json`, written beside each artifact at build time): nodes with
attributes, and the symbolic output shapes of the ops that need one (Reshape, Expand ...), as
strings over batch, seq and past. `forward` runs one prompt from an empty cache: batch 1,
past 0, the prompt the whole context, so attention sees exactly the prompt (causal, sliding
window). Semantics follow kiln.compiler.interpreter (the numpy specification of every op).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: ops whose output shape the reference reads from the graph's types
SHAPED = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Gather",
          "ConstantOfShape")


def graph_json(graph) -> dict[str, Any]:
    """A kiln Graph as JSON for the reference (build time: needs kiln's IR)."""
    return {"inputs": list(graph.inputs), "outputs": list(graph.outputs),
            "nodes": [{"op": n.op, "name": n.name, "inputs": list(n.inputs),
                       "outputs": list(n.outputs), "attrs": _attrs(n.attrs),
                       **({"shape": [str(d) for d in graph.types[n.outputs[0]].shape]}
                          if n.op in SHAPED else {})}
                      for n in graph.nodes]}


def _attrs(attrs) -> dict[str, Any]:
    def plain(v):
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if hasattr(v, "value") and not isinstance(v, int | float | str | bool):
            return v.value  # DType
        if isinstance(v, int | float | str | bool) or v is None:
            return v
        return str(v)  # a symbolic dim (sympy)

    return {k: plain(v) for k, v in dict(attrs).items()}


def dim(v: Any, symbols: dict[str, int]) -> int:
    """A dim: an int, or a string over batch, seq and past ("past + seq", "batch*seq")."""
    if isinstance(v, int | float):
        return int(v)
    return int(eval(str(v), {"__builtins__": {}}, dict(symbols)))  # our own JSON


_UNARY = {
    "Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Neg": "neg", "Erf": "erf",
    "Cos": "cos", "Sin": "sin", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Abs": "abs",
    "Floor": "floor", "Ceil": "ceil", "Reciprocal": "reciprocal", "Not": "logical_not",
}
_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Equal": "eq", "Less": "lt",
    "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge", "And": "logical_and",
    "Or": "logical_or", "Max": "maximum", "Min": "minimum", "Pow": "pow",
}
_DTYPES = {"float16": "float64", "bfloat16": "float64", "float32": "float64",
           "float64": "float64", "int64": "int64", "int32": "int32", "int8": "int8",
           "uint8": "uint8", "bool": "bool"}


def gelu(v, approximate: str):
    import torch

    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * v * (1.0 + torch.tanh(c * (v + 0.044715 * v ** 3)))
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def kv8_roundtrip(x):
    """What an int8 KV cache hands back for rows x[..., D] (kiln's kv8: per row and head one
    scale absmax / 127, codes rounded half to even)."""
    import torch

    amax = x.abs().amax(-1, keepdim=True)
    scale = amax / 127
    return torch.where(amax > 0, torch.round(x / torch.where(amax > 0, scale, 1)) * scale, 0)


def attention(q, k, v, a: dict):
    """Causal attention of the prompt over itself (no cache), GQA, scale, sliding window; with
    `kv_bits` 8 the keys and values are what an int8 cache holds."""
    import torch

    h, kvh, d = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
    b, n = q.shape[:2]
    q = q.reshape(b, n, h, d).transpose(1, 2)
    k, v = k.reshape(b, n, kvh, d), v.reshape(b, n, kvh, d)
    if int(a.get("kv_bits", 0)) == 8:
        k, v = kv8_roundtrip(k), kv8_roundtrip(v)
    k = k.transpose(1, 2).repeat_interleave(h // kvh, 1)
    v = v.transpose(1, 2).repeat_interleave(h // kvh, 1)
    scores = q @ k.transpose(-1, -2) * float(a.get("scale", d ** -0.5))
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    allowed = (j <= i) if a.get("causal", False) else torch.ones_like(j <= i)
    if a.get("window"):
        allowed = allowed & (j > i - int(a["window"]))
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    o = p @ v
    return o.transpose(1, 2).reshape(b, n, h * d)


def run_node(node: dict, x: list, symbols: dict[str, int]) -> list:
    """One canonical kiln op in torch (float64 tensors; None for an omitted input)."""
    import torch
    import torch.nn.functional as F

    op, a = node["op"], node["attrs"]
    shape = [dim(d, symbols) for d in node.get("shape", [])]
    if op == "embedding":
        return [x[0][x[1].long()]]
    if op == "linear":
        y = x[0] @ x[1].T
        return [y + x[2] if len(x) > 2 and x[2] is not None else y]
    if op == "rms_norm":
        v = x[0]
        g = int(a.get("group_size") or v.shape[-1])
        vv = v.reshape(*v.shape[:-1], -1, g)
        vv = vv * torch.rsqrt(vv.pow(2).mean(-1, keepdim=True) + float(a["eps"]))
        return [(vv * x[1]).reshape(v.shape)]  # w[E], or w[G] per head
    if op == "layer_norm":
        v = x[0]
        mean = v.mean(-1, keepdim=True)
        var = ((v - mean) ** 2).mean(-1, keepdim=True)
        y = (v - mean) / torch.sqrt(var + float(a["eps"]))
        y = y * x[1] if x[1] is not None else y
        return [y + x[2] if len(x) > 2 and x[2] is not None else y]
    if op == "Split":
        axis = int(a.get("axis", 0))
        n = x[0].shape[axis]
        if len(x) > 1 and x[1] is not None:
            sizes = [int(s) for s in x[1].reshape(-1).tolist()]
        elif a.get("split") is not None:
            sizes = [int(s) for s in a["split"]]
        else:
            count = len(node["outputs"])
            chunk = -(-n // count)
            sizes = [chunk] * (count - 1) + [n - chunk * (count - 1)]
        return list(torch.split(x[0], sizes, dim=axis))
    if op == "rotary":
        v, cos, sin = x
        h, d = int(a["num_heads"]), int(a["head_dim"])
        r = cos.shape[-1]
        v = v.reshape(*v.shape[:-1], h, d)
        c, s_ = cos[..., None, :], sin[..., None, :]
        rot, rest = v[..., :r], v[..., r:]
        if a.get("interleaved"):
            pair = torch.stack([-rot[..., 1::2], rot[..., ::2]], -1).reshape(rot.shape)
        else:
            pair = torch.cat([-rot[..., r // 2:], rot[..., :r // 2]], -1)
        out = torch.cat([rot * c + pair * s_, rest], -1)
        return [out.reshape(*out.shape[:-2], h * d)]
    if op == "attention":
        if len(x) > 6 and x[6] is not None:
            raise NotImplementedError("torch reference: attention with an additive bias")
        return [attention(x[0], x[1], x[2], a), None, None]
    if op == "silu_mul":
        return [F.silu(x[0]) * x[1]]
    if op == "silu":
        return [F.silu(x[0])]
    if op == "gelu":
        return [gelu(x[0], a.get("approximate", "none"))]
    if op == "gelu_mul":
        return [gelu(x[0], a.get("approximate", "none")) * x[1]]
    if op in _UNARY:
        return [getattr(torch, _UNARY[op])(x[0])]
    if op in _BINARY:
        return [getattr(torch, _BINARY[op])(x[0], x[1])]
    if op == "Mod":
        return [torch.fmod(x[0], x[1]) if a.get("fmod") else torch.remainder(x[0], x[1])]
    if op == "Cast":
        return [x[0].to(getattr(torch, _DTYPES[str(a["to"])]))]
    if op == "Where":
        return [torch.where(x[0].bool(), x[1], x[2])]
    if op == "Clip":
        lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
        hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
        return [torch.clamp(x[0], None if lo is None else float(lo),
                            None if hi is None else float(hi))]
    if op in ("Reshape", "Unsqueeze", "Squeeze", "Flatten"):
        return [x[0].reshape(shape)]
    if op == "Identity":
        return [x[0]]
    if op == "Expand":
        return [x[0].expand(shape)]
    if op == "Transpose":
        perm = a.get("perm") or list(range(x[0].dim()))[::-1]
        return [x[0].permute(*[int(p) for p in perm])]
    if op == "Concat":
        return [torch.cat([t for t in x if t is not None], int(a["axis"]))]
    if op == "Slice":
        return [_slice(x, a, symbols)]
    if op == "Gather":
        axis = int(a.get("axis", 0)) % x[0].dim()
        return [torch.index_select(x[0], axis, x[1].long().reshape(-1)).reshape(shape)]
    if op == "Range":
        start, limit, delta = (dim(a[k], symbols) for k in ("start", "limit", "delta"))
        return [torch.arange(start, limit, delta, dtype=getattr(torch, _DTYPES[a["dtype"]]),
                             device=_device(x))]
    if op == "MatMul":
        return [x[0] @ x[1]]
    if op == "Softmax":
        return [torch.softmax(x[0], int(a.get("axis", -1)))]
    if op == "ConstantOfShape":
        value = np.asarray(a.get("value") if a.get("value") is not None else 0.0).reshape(-1)
        return [torch.full(shape, float(value[0]), dtype=torch.float64, device=_device(x))]
    if op == "CumSum":
        axis = int(a["axis"] if x[1] is None else x[1].reshape(-1)[0])
        return [torch.cumsum(x[0], axis)]
    raise NotImplementedError(f"torch reference: op {op}")


def _device(x: list):
    import torch

    return next((t.device for t in x if t is not None), torch.device("cpu"))


def _slice(x: list, a: dict, symbols: dict[str, int]):
    v = x[0]
    if len(x) > 1 and any(t is not None for t in x[1:]):
        starts, ends, axes, steps = ([int(i) for i in t.reshape(-1).tolist()] if t is not None
                                     else None for t in (*x[1:], None, None, None)[:4])
    else:
        starts, ends, axes, steps = (a.get(k) for k in ("starts", "ends", "axes", "steps"))
        starts, ends = ([dim(s, symbols) for s in t] for t in (starts, ends))
    axes = list(range(len(starts))) if axes is None else [int(i) % v.dim() for i in axes]
    steps = [1] * len(axes) if steps is None else steps
    index = [slice(None)] * v.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        index[ax] = slice(s, e, st)
    return v[tuple(index)]


def forward(graph: dict, params: dict, ids: np.ndarray, device) -> Any:
    """Logits [seq, vocab] of one prompt (batch 1, empty cache) in float64."""
    import torch

    n = len(ids)
    symbols = {"batch": 1, "seq": n, "past": 0}
    env = dict(params)
    feeds = {"input_ids": torch.tensor(np.asarray(ids)[None], device=device),
             "position_ids": torch.arange(n, device=device)[None],
             "attention_mask": torch.ones(1, n, dtype=torch.int64, device=device)}
    env.update({k: v for k, v in feeds.items() if k in graph["inputs"]})
    for node in graph["nodes"]:
        outs = run_node(node, [env.get(i) if i else None for i in node["inputs"]], symbols)
        for name, v in zip(node["outputs"], outs, strict=False):
            if name:
                env[name] = v
    return env[graph["outputs"][0]][0]


def as_float64(params: dict, device) -> dict:
    """numpy parameters (any float dtype, bfloat16 included) as float64 torch tensors."""
    import torch

    out = {}
    for k, v in params.items():
        a = np.asarray(v)
        if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
            a = a.astype(np.float32).astype(np.float64)
        out[k] = torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return out
