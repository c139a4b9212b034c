"""Which quantization choices matter: fake-quantized weights evaluated by onnxruntime.

Each variant quantizes the linear weights of an fp32 ONNX decoder with kiln's GPTQ
(kiln.passes.gptq), writes the *dequantized* weights into a copy of the model's external data and
scores the copy against the original with kiln's evaluator (perplexity, KL, top-1 agreement on
kiln's default evaluation text). Only the weight rounding differs from the fp32 model, so a
variant costs one GPTQ pass and two onnxruntime evaluations, not a compile; the table in
benchmarks/RESULTS.md ("Quantization quality") was made this way and the shipped presets were then
compiled and checked with `kiln eval`.

    python benchmarks/quant_ablation.py MODEL.onnx --variant 'w4g32:asym,act,seq,int8=qkv+head' \
        --variant 'w4g32:sym' [--calibration FILE ...] [--windows N] [--json OUT.jsonl]

A variant is `w<bits>g<group>` then options: sym|asym, act (act order), seq (sequential
calibration: each linear's Hessian taken with the layers before it quantized; otherwise all
Hessians come from the fp32 model), int8=ROLES (ROLES joined by +: head, qkv, q, k, v, o, gate_up,
down; q/k/v split a fused projection by rows), damp=F,
auto=F (int8 weights by measured sensitivity within F of the weight bytes, as `-autoF`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from kiln.compiler.calibration import (
    CALIBRATION_TEXTS,
    CALIBRATION_WINDOW,
    CALIBRATION_WINDOWS,
    calibration_text,
)
from kiln.compiler.calibration import windows as cut_windows
from kiln.compiler.compile import compile_graph
from kiln.compiler.evaluation import default_text, read_text
from kiln.compiler.frontend.onnxruntime_lm import OrtLM
from kiln.compiler.interpreter import run
from kiln.compiler.ir import Derived, ExternalData, Graph
from kiln.passes import gptq as G
from kiln.passes.quantize import AUTO_BUDGET, int8_by_sensitivity, weight_roles
from kiln.runtime.evaluate import evaluate


@dataclass
class Variant:
    spec: str
    bits: int
    group: int
    symmetric: bool = True
    act_order: bool = False
    sequential: bool = False
    int8: set[str] = field(default_factory=set)
    damp: float = G.DAMP
    auto: float = 0.0  # int8 weights by measured sensitivity within this budget (fraction)
    picked: set[str] = field(default_factory=set)  # the weights `auto` put at int8

    @classmethod
    def parse(cls, spec: str) -> Variant:
        head, _, opts = spec.partition(":")
        bits, _, group = head.lstrip("w").partition("g")
        v = cls(spec, int(bits), int(group or 0))
        for o in filter(None, opts.split(",")):
            key, _, val = o.partition("=")
            if key in ("sym", "asym"):
                v.symmetric = key == "sym"
            elif key == "act":
                v.act_order = True
            elif key == "seq":
                v.sequential = True
            elif key == "int8":
                v.int8 = set(val.split("+"))
            elif key == "damp":
                v.damp = float(val)
            elif key == "auto":
                v.auto = float(val or AUTO_BUDGET)
            else:
                raise click.BadParameter(f"{spec}: unknown option {o!r}")
        return v


def quantizer(graph: Graph, v: Variant, q_rows: tuple[int, int, int]):
    """(weight name, w, H) -> dequantized w, per the variant."""
    roles = weight_roles(graph)
    layer_kind: dict[str, str] = {}
    after_qkv = 0  # the other linears of a layer follow its q/k/v: o, gate_up, down
    for n in graph.nodes:
        w = n.inputs[1] if n.op == "linear" else ""
        if not w or w in layer_kind:
            continue
        r = roles.get(w, set())
        if "lm_head" in r:
            layer_kind[w] = "head"
        elif "attn_qkv" in r:
            layer_kind[w], after_qkv = "qkv", 0
        else:
            layer_kind[w] = ("o", "gate_up", "down")[min(after_qkv, 2)]
            after_qkv += 1

    def one(w: np.ndarray, h: np.ndarray, eight: bool) -> np.ndarray:
        bits, group, sym = (8, 0, True) if eight else (v.bits, v.group, v.symmetric)
        return G.solved_weight(w, h, bits=bits, group=group, symmetric=sym,
                               act_order=v.act_order, damp=v.damp)

    def fn(name: str, w: np.ndarray, h: np.ndarray) -> np.ndarray:
        kind = layer_kind[name]
        if kind == "qkv" and v.int8 & {"q", "k", "v"} and w.shape[0] == sum(q_rows):
            bounds = np.cumsum((0, *q_rows))
            return np.concatenate([one(w[a:b], h, part in v.int8) for part, a, b in
                                   zip("qkv", bounds[:-1], bounds[1:], strict=True)])
        return one(w, h, kind in v.int8 or name in v.picked)

    return fn


def pick_auto(graph: Graph, v: Variant, windows: list[np.ndarray]) -> set[str]:
    """The weights kiln's `-auto` would put at int8 (kiln.passes.quantize.int8_by_sensitivity)."""
    weights = list(dict.fromkeys(n.inputs[1] for n in graph.nodes if n.op == "linear"))
    low = (v.bits, v.group, v.symmetric)
    schemes = int8_by_sensitivity(graph, dict.fromkeys(weights, low), tuple(windows), v.auto)
    return {n for n, s in schemes.items() if s != low}


def calibrate(graph: Graph, v: Variant, windows: list[np.ndarray], fn) -> dict:
    weights = list(dict.fromkeys(n.inputs[1] for n in graph.nodes if n.op == "linear"))
    if v.sequential:
        out = {}
        G.calibrate(graph, weights, windows, lambda n, w, h: out.setdefault(n, fn(n, w, h)))
        return out
    inputs = {n.inputs[1]: n.inputs[0] for n in graph.nodes if n.op == "linear"}
    acts = run(graph, G._feeds(graph, np.concatenate(windows)), outputs=sorted(set(
        inputs.values())))
    out = {}
    for w, x in inputs.items():
        a = np.asarray(acts[x], np.float64).reshape(-1, acts[x].shape[-1])
        out[w] = fn(w, np.asarray(graph.params[w].load(), np.float32), a.T @ a)
    return out


def write_copy(model: Path, graph: Graph, weights: dict[str, np.ndarray], out: Path) -> Path:
    """A copy of MODEL (external data in one file) with `weights` ([N, K], as kiln's linears
    hold them) written back where their initializers lie."""
    shutil.copy(model, out / model.name)
    data = None
    for name, w in weights.items():
        src = graph.params[name].source
        parts = list(src.sources) if isinstance(src, Derived) and src.fn == "concat" else [src]
        row = 0
        for s in parts:
            transposed = isinstance(s, Derived) and s.fn == "transpose"
            ext = s.sources[0] if transposed else s
            if not isinstance(ext, ExternalData):
                raise click.ClickException(f"{name}: not stored as external data")
            if data is None:
                data = out / Path(ext.path).name
                shutil.copy(ext.path, data)
                mm = np.memmap(data, dtype=np.uint8, mode="r+")
            rows = ext.shape[1] if transposed else ext.shape[0]
            block = w[row:row + rows].T if transposed else w[row:row + rows]
            raw = np.ascontiguousarray(block, np.float32).view(np.uint8).reshape(-1)
            mm[ext.offset:ext.offset + raw.size] = raw
            row += rows
    mm.flush()
    return out / model.name


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--variant", "variants", multiple=True, required=True)
@click.option("--calibration", "calibration", multiple=True,
              type=click.Path(exists=True, path_type=Path),
              help="calibration text, repeatable: the texts are joined by a blank line "
                   "(default: kiln's, kiln.compiler.calibration.CALIBRATION_TEXTS)")
@click.option("--windows", default=CALIBRATION_WINDOWS, show_default=True,
              help=f"calibration windows of {CALIBRATION_WINDOW} tokens (at most)")
@click.option("--qkv-rows", default="576,192,192", show_default=True,
              help="rows of q, k, v in a fused projection (for int8=q/k/v)")
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="evaluation text, repeatable (default: kiln's default evaluation text)")
@click.option("--eval-tokens", default=0, help="score only the first N tokens of each text")
@click.option("--json", "json_out", type=click.Path(path_type=Path))
def main(model: Path, variants, calibration, windows, qkv_rows, texts, eval_tokens,
         json_out) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model.with_name("tokenizer.json")))
    sources = tuple(t.resolve() for t in calibration) or CALIBRATION_TEXTS
    cal_name = "+".join(Path(t).name for t in sources)
    wins = list(cut_windows(tok.encode(calibration_text(sources)).ids, CALIBRATION_WINDOW,
                            windows))
    print(f"calibration: {cal_name}, {len(wins)} windows of {CALIBRATION_WINDOW}", flush=True)
    graph = compile_graph(model, max_seq=1024, progress=lambda m: None, weights_optional=False)
    texts = texts or (default_text(),)
    eval_ids = {t: tok.encode(read_text(t)).ids[:eval_tokens or None] for t in texts}
    cache: dict = {}
    base = OrtLM(model, threads=2)

    def reference(feed):
        key = feed.tobytes()
        if key not in cache:
            cache[key] = base(feed)
        return cache[key]

    rows = tuple(int(r) for r in qkv_rows.split(","))
    for spec in variants:
        v = Variant.parse(spec)
        if v.auto:
            v.picked = pick_auto(graph, v, wins)
            print(f"{spec}: int8 by sensitivity: {sorted(v.picked)}", flush=True)
        deq = calibrate(graph, v, wins, quantizer(graph, v, rows))
        with tempfile.TemporaryDirectory() as tmp:
            copy = write_copy(model, graph, deq, Path(tmp))
            lm = OrtLM(copy, threads=2)
            for t, ids in eval_ids.items():
                r = evaluate(lm, ids, context=1024, stride=512, reference=reference)
                row = {"variant": spec, "calibration": cal_name, "windows": len(wins),
                       "text": t.name, "tokens": r.tokens, "perplexity": r.perplexity,
                       "reference_perplexity": r.reference_perplexity,
                       "kl_divergence": r.kl_divergence, "top1_agreement": r.top1_agreement}
                print(json.dumps(row), flush=True)
                if json_out:
                    with open(json_out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
