"""CUDA target end to end: build artifacts here (no GPU), check and time them on the GPU host.

    python benchmarks/gpu/cuda_llm.py build .device llama-3.2-1b:float16 smollm2-135m:float32 ...
    python3 benchmarks/gpu/cuda_llm.py check .device      # on the GPU host: vs torch, same weights
    python3 benchmarks/gpu/cuda_llm.py bench .device      # on the GPU host: vs HF eager, roofline
    python3 benchmarks/gpu/cuda_llm.py steptime .device NAME...   # decode step: API vs entry
    python3 benchmarks/gpu/cuda_llm.py profile .device NAME PROMPT STEPS   # ncu, per kernel
    python3 benchmarks/gpu/cuda_llm.py ctxdecode .device NAME... --lens 16,2048  # long contexts
    python3 benchmarks/gpu/cuda_llm.py checkbatch .device --only NAME   # ragged batches vs torch
    python3 benchmarks/gpu/cuda_llm.py batchbench .device NAME... --batches 1,4,8,16  # tok/s

`build` compiles each CONFIG:DTYPE[:QUANT[:VARIANT]] (kiln.models.synthetic names, a
--quant preset, the attention kernel's operand loads, `sp24`: --sparsity 2:4 --prune-method
magnitude, so every linear but the LM head is a 2:4 `sparse_linear`) with --no-weights into
.device/arts/NAME, writes its canonical graph as JSON beside it (the torch reference runs it),
and packages one bundle (.device/bundle: TVM runtime, kiln runtime; the artifacts are passed
with --artifact). On the GPU host, weights are synthesized from a seed by kiln's runtime
(`synthetic_params`); the torch reference synthesizes the very same arrays with that function.

`check`: for each artifact, logits of prefill at several prompt lengths and greedy decoding of
32 tokens (prefill + decode steps through the KV cache and the CUDA graph) against a float64
torch forward of the same canonical graph on the GPU. kiln runs inside the bundle (runtime-only
TVM; torch is kept out of that process), torch in a child process.
`bench [--rounds R]`: kiln prefill/decode tok/s (bundle bench; R rounds alternate the
artifacts, A B A B, each round's ratios printed), HF transformers eager `generate` on the same
shapes (random weights, fp16; once per model shape, `--no-hf` skips it), device copy bandwidth,
printed as a table. Quantized artifacts: the runtime synthesizes their weights by rounding seeded
float weights to nearest (kiln.runtime.params.quantize_rtn); the torch reference runs the float
graph with those weights dequantized, so only the compute dtype's rounding differs.
2:4 artifacts (`sp24`): the runtime synthesizes a seeded float matrix pruned 2:4 by magnitude
in the `nm` layout (kiln.runtime.params); the reference runs the float graph with the weights
densified from those values and metadata; `bench` prints each such artifact's ratio to its
dense twin (the same spec without the sparse variants), measured in the same run.
`checkbatch`: batched decode of prompts of unequal lengths (Session.prefill_batch, then greedy
steps of all rows at once, each at its own position): for CHECK_BATCHES rows, each row's 32
greedy tokens against the torch float64 reference of that prompt alone, and against kiln's own
batch-1 run of it (the CUDA-core batched GEMVs, `nomma`, give each row bitwise the one-row
result; the tensor-core ones sum in another order: a near-tie may go the other way).
`batchbench`: greedy decode tok/s summed over the rows at several batch sizes (unequal prompt
lengths), and the ratio to batch 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SEED = 7
CHECK_LENS = (1, 9, 64, 300)
DECODE_STEPS = 32
#: greedy decode after this many prompt tokens too: past the switch to the split-KV decode
#: entry (kiln.runtime.session.context_entry: 363 cached tokens), for artifacts that have one
LONG_PROMPT, LONG_STEPS = 420, 16
CHECK_BATCHES = (4, 16)  # checkbatch: rows of unequal prompt lengths
HERE = Path(__file__).resolve()


# -- here: build --------------------------------------------------------------------------------

def graph_json(graph) -> dict:
    return {"inputs": list(graph.inputs), "outputs": list(graph.outputs),
            "nodes": [{"op": n.op, "name": n.name, "inputs": list(n.inputs),
                       "outputs": list(n.outputs), "attrs": dict(n.attrs)}
                      for n in graph.nodes]}


def build(out: Path, specs: list[str], max_seq: int) -> None:
    from kiln.compiler.compile import compile_graph, compile_model
    from kiln.compiler.package import package
    from kiln.models.synthetic import write_synthetic

    arts = out / "arts"
    arts.mkdir(parents=True, exist_ok=True)
    from kiln.codegen.cuda import lower_sparse
    from kiln.codegen.cuda.kernels import (
        attention,
        flash_attention,
        gemv,
        gemv_mma,
        pdl,
        quant_gemv,
        wgmma_gemm,
    )

    default_ldsm = flash_attention.LDSM
    # CONFIG:DTYPE[:QUANT][:VARIANT[+VARIANT...]], for A/B runs: ldsm|noldsm (the flash
    # kernel's operand loads), nopdl (no programmatic dependent launch), norope (decode's
    # rotary and KV append a kernel of their own), oldattn (the thread-per-key decode attention),
    # sp24 (2:4 sparse linears), spfused (their prefill GEMM with the 2:4 decode in its fetch),
    # tuned (compiled with --tuning OUT/tuning.json, what `kiln_run.py tune` wrote on the GPU),
    # nofuse (--no-fuse all: every canonical op through its unfused lowering), nosplit (decode
    # attention without split-KV: one block per head), nomma (batched decode GEMVs on the CUDA
    # cores instead of the tensor cores), wgmma (for an sm_90a target: its prefill GEMMs
    # then take the wgmma kernel by default, kernels/wgmma_gemm.py), nowgmma (sm_90a, with
    # the wgmma default switched off: dlight's GEMMs), qf32 (quantized decode GEMVs unpack codes
    # to float32 instead of half2)
    for spec in specs:
        name, dtype, quant, variant = [*spec.split(":"), "", ""][:4]
        flags = set(variant.split("+")) - {""}
        src = write_synthetic(name, out / "models" / name, weights=False)
        dst = arts / "-".join(x for x in (name, dtype, quant, variant) if x)
        t = time.perf_counter()
        flash_attention.LDSM = ("ldsm" in flags or default_ldsm) and "noldsm" not in flags
        pdl.ENABLED = "nopdl" not in flags
        attention.WARP_DECODE = "oldattn" not in flags
        attention.SPLIT_DECODE = "nosplit" not in flags
        wgmma_gemm.WGMMA = "nowgmma" not in flags
        quant_gemv.HALF2 = "qf32" not in flags
        mma = "nomma" not in flags
        if gemv_mma.TENSOR_CORES is not mma:  # (the kernels are cached: built anew)
            gemv_mma.TENSOR_CORES = mma
            for fn in (gemv.gemv_kernel, gemv._norm_gemv, gemv._splitk_gemv,
                       gemv.swiglu_gemv_kernel, gemv.qkv_rope_gemv_kernel):
                fn.cache_clear()
        lower_sparse.PREFILL = "fused" if "spfused" in flags else "scratch"
        sparse = {"sparsity": "2:4", "prune_method": "magnitude"} if "sp24" in flags else {}
        tuning = out / "tuning.json" if "tuned" in flags else None
        # a tuned artifact is compiled for the arch it was tuned on (sm_90a: wgmma candidates)
        arch = json.loads(tuning.read_text())["target"]["arch"] if tuning else (
            "sm_90a" if flags & {"wgmma", "nowgmma"} else "sm_90")
        compile_model(src, dst, target=f"cuda:{arch}",
                      max_seq=max_seq, weights=False,
                      dtype=dtype, quant=quant or None, tuning=tuning, **sparse,
                      no_fuse=("all",) if "nofuse" in flags
                      else ("qkv_projection",) if "norope" in flags else ())
        flash_attention.LDSM, pdl.ENABLED = default_ldsm, True
        attention.WARP_DECODE, lower_sparse.PREFILL = True, "scratch"
        attention.SPLIT_DECODE, wgmma_gemm.WGMMA = True, True
        quant_gemv.HALF2 = True
        # the reference runs the float graph; quantized weights are dequantized into it
        g = compile_graph(src, max_seq=max_seq, progress=lambda m: None, weights_optional=True,
                          fusions=() if "nofuse" in flags else None)  # the artifact's params
        gj = graph_json(g)
        if "kv8" in quant.split("-"):  # the int8 cache's rows, round-tripped in the reference
            for n in gj["nodes"]:
                if n["op"] == "attention":
                    n["attrs"]["kv_bits"] = 8
        (dst / "graph.json").write_text(json.dumps(gj, default=str))
        (dst / "spec.json").write_text(json.dumps({"model": name, "dtype": dtype,
                                                   "quant": quant, "variant": variant}))
        size = (dst / "kernels.so").stat().st_size
        print(f"{dst.name}: compiled in {time.perf_counter() - t:.1f} s, kernels.so "
              f"{size / 1e6:.2f} MB", flush=True)
    first = next(p for p in sorted(arts.iterdir()) if not p.name.startswith("."))
    b = package(first, out / "bundle", python="3.12", params=False)
    print(f"bundle {b.path}: {b.total / 1e6:.1f} MB")


# -- the GPU host -------------------------------------------------------------------------------

def enter_bundle(bundle: Path) -> None:
    spec = importlib.util.spec_from_file_location("kiln_run", bundle / "kiln_run.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.setup()


def prompts(vocab: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {n: rng.integers(0, vocab, n) for n in CHECK_LENS}


def kiln_outputs(art: Path) -> dict:
    """Logits (last position and a few others) per prompt length, and greedy tokens."""
    from kiln.runtime.session import Session

    s = Session.load(art, synthetic_weights=SEED)
    out = session_outputs(s, prompts(s.vocab), prompts(s.vocab)[9])
    if s.artifact.manifest.get("decode_past"):  # the long-context decode entry too
        toks, logits, first = _kiln_greedy(s, long_prompt(s.vocab), LONG_STEPS)
        out.update(greedy_long=toks, decode_logits_long=logits, prompt_logits_long=first)
    return out


def long_prompt(vocab: int) -> np.ndarray:
    return np.random.default_rng(SEED + 1).integers(0, vocab, LONG_PROMPT)


def _kiln_greedy(s, ids: np.ndarray, steps: int) -> tuple[np.ndarray, ...]:
    """`steps` greedy tokens after prompt `ids` (host argmax), each step's logits and the
    prompt's last logits (which chose the first token)."""
    toks, logits = [], []
    prompt_logits = s.prefill(ids[None], last_only=True)[0, -1].astype(np.float32)
    tok = int(prompt_logits.argmax())
    for _ in range(steps):
        toks.append(tok)
        step = s.decode([tok])[0, -1]
        logits.append(step.astype(np.float32))
        tok = int(step.argmax())
    return np.array(toks), np.stack(logits), prompt_logits


def session_outputs(s, by_length: dict[int, np.ndarray], greedy_ids: np.ndarray,
                    steps: int = DECODE_STEPS) -> dict:
    """A loaded session's prefill logits (first, middle and last positions, and prefill_last's)
    per prompt of `by_length`, and `steps` greedy tokens after `greedy_ids` with their logits,
    the argmax taken on the host and again on the device (decode's second output)."""
    out = {}
    for n, ids in by_length.items():
        logits = s.prefill(ids[None])[0]
        last = s.prefill(ids[None], last_only=True)[0, -1]
        out[f"prefill{n}"] = logits[[0, n // 2, n - 1]].astype(np.float32)
        out[f"last{n}"] = last.astype(np.float32)
    out["greedy"], out["decode_logits"], out["prompt_logits"] = _kiln_greedy(s, greedy_ids,
                                                                             steps)
    tok, dev = s.prefill(greedy_ids[None], last_only=True)[:, -1].argmax(-1), []
    for _ in range(steps):
        dev.append(int(tok[0]))
        tok = s.decode_greedy(tok)
    out["greedy_device"] = np.array(dev)
    return out


def torch_reference(art: Path, bundle: Path) -> dict:
    """The canonical graph run by torch in float64 on the GPU, same synthesized weights."""
    import torch

    forward, vocab = torch_forward(art, bundle)
    out = {}
    with torch.no_grad():
        for n, ids in prompts(vocab).items():
            logits = forward(ids)
            out[f"prefill{n}"] = logits[[0, n // 2, n - 1]].float().cpu().numpy()
            out[f"last{n}"] = logits[-1].float().cpu().numpy()
        out["greedy"], out["decode_logits"], out["prompt_logits"] = _torch_greedy(
            forward, prompts(vocab)[9], DECODE_STEPS)
        out["greedy_long"], out["decode_logits_long"], out["prompt_logits_long"] = \
            _torch_greedy(forward, long_prompt(vocab), LONG_STEPS)
    return out


def _torch_greedy(forward, prompt: np.ndarray, steps: int) -> tuple[np.ndarray, ...]:
    """`steps` greedy tokens after `prompt`, the whole sequence recomputed each step; each
    step's logits and the prompt's last ones."""
    ids, toks, logits = list(prompt), [], []
    prompt_logits = forward(np.array(ids))[-1].float().cpu().numpy()
    tok = int(prompt_logits.argmax())
    for _ in range(steps):
        toks.append(tok)
        ids.append(tok)
        step = forward(np.array(ids))[-1]
        logits.append(step.float().cpu().numpy())
        tok = int(step.argmax())
    return np.array(toks), np.stack(logits), prompt_logits


def torch_forward(art: Path, bundle: Path, device: str = "cuda"):
    """(forward(ids) -> logits (n, vocab) of one prompt, torch float64 on the GPU; vocab)."""
    import torch

    sys.path.insert(0, str(HERE.parent))  # torch_ref, beside this file

    sys.path.insert(0, str(bundle / "lib"))
    from kiln.runtime.params import read_safetensors, synthetic_params

    manifest = json.loads((art / "manifest.json").read_text())
    graph = json.loads((art / "graph.json").read_text())
    table = manifest["params"]
    arrays = dict(read_safetensors(art / "constants.safetensors"))
    arrays.update(densified(dequantized(synthetic_params(
        [p for p in table if p["file"] == "params.safetensors"], SEED), table), table))
    dev = torch.device(device)
    p = {k: torch.from_numpy(to_float64(np.asarray(v))).to(dev) for k, v in arrays.items()}

    def forward(ids: np.ndarray) -> torch.Tensor:
        n = len(ids)
        env = dict(p)
        env["input_ids"] = torch.tensor(ids[None], device=dev)
        env["position_ids"] = torch.arange(n, device=dev)[None]
        env["attention_mask"] = torch.ones(1, n, dtype=torch.int64, device=dev)
        for node in graph["nodes"]:
            outs = run_node(node, [env.get(i) if i else None for i in node["inputs"]],
                            {"batch": 1, "seq": n, "past": 0})
            for name, v in zip(node["outputs"], outs, strict=False):
                if name:
                    env[name] = v
        return env[graph["outputs"][0]][0]

    return forward, manifest["architecture"]["vocab"]


# -- batches of unequal prompt lengths ----------------------------------------------------------

def batch_prompts(vocab: int, rows: int) -> list[np.ndarray]:
    """`rows` seeded prompts of unequal lengths (1 to 80 tokens; the first two 1 and 80)."""
    rng = np.random.default_rng(SEED + rows)
    lens = [1, 80, *rng.integers(2, 80, rows - 2)][:rows]
    return [rng.integers(0, vocab, n) for n in lens]


def kiln_batch_outputs(art: Path) -> dict:
    """Per CHECK_BATCHES: the rows' greedy tokens decoded as one batch (prefill_batch, then
    decode_greedy of all rows), each prompt's alone (batch 1), the first tokens' logits."""
    from kiln.runtime.session import Session

    s = Session.load(art, synthetic_weights=SEED)
    out = {}
    for rows in CHECK_BATCHES:
        ps = batch_prompts(s.vocab, rows)
        logits = s.prefill_batch(ps)
        out[f"b{rows}_logits"] = logits.astype(np.float32)
        tok, toks = logits.argmax(-1), []
        for _ in range(DECODE_STEPS):
            toks.append(tok)
            tok = s.decode_greedy(tok)
        out[f"b{rows}_batched"] = np.stack(toks, 1)
        single = []
        for p in ps:
            tok, toks = s.prefill(p[None], last_only=True)[:, -1].argmax(-1), []
            for _ in range(DECODE_STEPS):
                toks.append(int(tok[0]))
                tok = s.decode_greedy(tok)
            single.append(toks)
        out[f"b{rows}_single"] = np.array(single)
    return out


def torch_batch_reference(art: Path, bundle: Path) -> dict:
    """Each prompt of kiln_batch_outputs alone: greedy tokens, the first step's logits and each
    step's margin (top-1 minus top-2 logit: how near a tie the step's choice is)."""
    import torch

    forward, vocab = torch_forward(art, bundle)
    out = {}
    with torch.no_grad():
        for rows in CHECK_BATCHES:
            toks, first, gaps = [], [], []
            for p in batch_prompts(vocab, rows):
                ids, row, gap = list(p), [], []
                for step in range(DECODE_STEPS):
                    logits = forward(np.array(ids))[-1]
                    if step == 0:
                        first.append(logits.float().cpu().numpy())
                    top = torch.topk(logits, 2).values
                    gap.append(float(top[0] - top[1]))
                    row.append(int(logits.argmax()))
                    ids.append(row[-1])
                toks.append(row)
                gaps.append(gap)
            out[f"b{rows}_greedy"] = np.array(toks)
            out[f"b{rows}_logits"] = np.stack(first)
            out[f"b{rows}_margin"] = np.array(gaps)
    return out


def compare_batch(got: dict, ref: dict) -> list[str]:
    lines = []
    for rows in CHECK_BATCHES:
        g, r, one = got[f"b{rows}_batched"], ref[f"b{rows}_greedy"], got[f"b{rows}_single"]
        equal = (g == r).sum(1)
        lg, lr = got[f"b{rows}_logits"], ref[f"b{rows}_logits"]
        rel = float(np.linalg.norm(lg - lr) / np.linalg.norm(lr))
        lines.append(f"  batch {rows} (prompt lengths {[len(p) for p in batch_prompts(1, rows)]})"
                     f": rows with {DECODE_STEPS}/{DECODE_STEPS} greedy tokens = torch: "
                     f"{int((equal == DECODE_STEPS).sum())}/{rows} (per row "
                     f"{' '.join(map(str, equal.tolist()))}); rows = kiln batch 1: "
                     f"{int((g == one).all(1).sum())}/{rows}; kiln batch 1 = torch: "
                     f"{int((one == r).all(1).sum())}/{rows}; first logits rel err {rel:.2e}")
        for i in np.flatnonzero((g != r).any(1)):  # where a row parts from torch: how near a tie
            d = int(np.argmax(g[i] != r[i]))
            lines.append(f"    row {i}: parts at step {d}, torch's top-1 margin there "
                         f"{ref[f'b{rows}_margin'][i, d]:.2e} (logits' std "
                         f"{float(np.std(lr[i])):.2e})")
    return lines


def to_float64(a: np.ndarray) -> np.ndarray:
    from kiln.runtime.params import to_float32

    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        return to_float32(a).astype(np.float64) if a.dtype.kind != "f" else a.astype(
            np.float64)
    return a


def dequantized(arrays: dict, table: list[dict]) -> dict:
    """The synthesized parameters with each quantized triple replaced by the float weight it
    stands for (named as in the float graph): the reference then differs from the quantized
    artifact by the compute dtype's rounding only."""
    from kiln.runtime.params import dequantize

    out = dict(arrays)
    for p in table:
        d = p.get("derivation")
        if not (isinstance(d, dict) and d.get("fn") == "quantize" and
                d["attrs"].get("part") == "qweight"):
            continue
        base = p["name"][: -len(".qweight")]
        zp = out.pop(base + ".zero_points", None)
        out[base] = dequantize(out.pop(p["name"]), out.pop(base + ".scales"), zp,
                               bits=int(d["attrs"]["bits"]))
    return out


def densified(arrays: dict, table: list[dict]) -> dict:
    """The parameters with each 2:4 (values, meta) pair replaced by the dense weight it
    encodes (kiln.runtime.sparse_format.nm_decode), named as in the float graph (the pair is
    `W.nm.values`, `W.nm.meta`)."""
    from kiln.runtime.params import sparse_part
    from kiln.runtime.sparse_format import nm_decode

    out = dict(arrays)
    for p in table:
        if sparse_part(p) != "values" or p["derivation"]["attrs"].get("layout") != "nm":
            continue
        base = p["name"].rsplit(".", 2)[0]
        values, meta = out.pop(p["name"]), out.pop(base + ".nm.meta")
        out[base] = nm_decode(values, meta, 2 * values.shape[1])
    return out


def run_node(node: dict, x: list, symbols: dict[str, int] | None = None):
    """One canonical kiln op in torch (batch 1, empty cache: the prompt is the whole context):
    torch_ref's interpreter, the dequantized weights (padded to whole groups) cut to k first."""
    from torch_ref import run_node as reference_node

    if node["op"] == "linear" and x[1].shape[1] > x[0].shape[-1]:
        x = [x[0], x[1][:, :x[0].shape[-1]], *x[2:]]
    return reference_node(node, x, symbols or {})


def compare(art: Path, got: dict, ref: dict, fp32: bool) -> list[str]:
    lines = []
    for key in [k for k in ref if k.startswith(("prefill", "last"))]:
        g, r = got[key], ref[key]
        rel = float(np.linalg.norm(g - r) / np.linalg.norm(r))
        top1 = float(np.mean(g.argmax(-1) == r.argmax(-1)))
        lines.append(f"  {key:11s} rel err {rel:.2e}  max abs {np.abs(g - r).max():.2e}  "
                     f"top-1 agree {top1:.2f}  nan {bool(np.isnan(g).any())}")
    if "greedy_device" in got:
        lines.append(f"  greedy with the device argmax (decode_greedy) = host argmax: "
                     f"{bool((got['greedy_device'] == got['greedy']).all())}")
    for key, what in (("", ""), ("_long", f" after {LONG_PROMPT} tokens")):
        if f"greedy{key}" not in got:
            continue
        same = got[f"greedy{key}"] == ref[f"greedy{key}"]
        steps = len(same)
        first = int(np.argmin(same)) if not same.all() else steps
        lines.append(f"  greedy {steps} steps{what}: {int(same.sum())} equal, first divergence "
                     f"at {first if first < steps else '-'}"
                     + (f" (kiln {got[f'greedy{key}'][first]} vs torch "
                        f"{ref[f'greedy{key}'][first]})" if first < steps else "")
                     + (" [fp32 mode]" if fp32 else ""))
        if first < steps and f"prompt_logits{key}" in got:
            lines.append("  " + _tie_at(got, ref, key, first))
        if first > 0:
            g, r = got[f"decode_logits{key}"][:first], ref[f"decode_logits{key}"][:first]
            lines.append(f"  decode logits{what} (steps before divergence) rel err "
                         f"{float(np.linalg.norm(g - r) / np.linalg.norm(r)):.2e}")
    return lines


def _tie_at(got: dict, ref: dict, key: str, step: int) -> str:
    """How near a tie the step where the greedy tokens part was: the logits that chose it (the
    prompt's last ones at step 0, else the step before's, on the same prefix), torch's top-1
    minus its top-2, and kiln's logit of its own choice minus that of torch's."""
    pick = (lambda d: d[f"prompt_logits{key}"]) if step == 0 else (
        lambda d: d[f"decode_logits{key}"][step - 1])
    g, r = pick(got), pick(ref)
    kt, tt = int(g.argmax()), int(r.argmax())
    top2 = np.sort(r)[-2:]
    return (f"where they part: torch's top-1 margin {float(top2[1] - top2[0]):.3e}, kiln's "
            f"{float(g[kt] - g[tt]):.3e} (logits' std {float(r.std()):.3e})")


def spec_of(art: Path) -> dict:
    f = art / "spec.json"
    if f.is_file():
        return json.loads(f.read_text())
    name, _, dtype = art.name.rpartition("-")
    return {"model": name, "dtype": dtype, "quant": ""}


def check(root: Path, only: str = "", workers: int = 4, batched: bool = False) -> None:
    """Every artifact against its torch reference; artifacts run `workers` at a time (each
    pair of processes mostly synthesizes weights on one CPU core; the GPU has room for all).
    `batched`: batches of unequal prompt lengths (checkbatch) instead."""
    from concurrent.futures import ThreadPoolExecutor

    arts = [p for p in sorted((root / "arts").iterdir()) if not p.name.startswith(".")
            and not (only and re.search(only, p.name) is None)]
    # the bundle's first launch unpacks its wheel: once, before launches run side by side
    subprocess.run([sys.executable, str(root / "bundle" / "kiln_run.py"), "info"],
                   capture_output=True, check=True)

    def one(art: Path) -> str:
        def run(mode):
            t = time.perf_counter()
            c = subprocess.run([sys.executable, str(HERE), mode + ("-batch" if batched else ""),
                                str(root), art.name], capture_output=True, text=True)
            return c, time.perf_counter() - t

        with ThreadPoolExecutor(2) as pool:
            ref_job, kiln_job = pool.submit(run, "torch-ref"), pool.submit(run, "kiln-out")
            (rc, tref), (kc, tk) = ref_job.result(), kiln_job.result()
        for what, c in (("torch reference", rc), ("kiln", kc)):
            if c.returncode:
                return (f"== {art.name}: {what} FAILED\n{c.stdout[-3000:]}\n"
                        f"{c.stderr[-6000:]}")
        tag = "batch-" if batched else ""
        got = dict(np.load(Path("/tmp") / f"kiln-{tag}{art.name}.npz"))
        ref = dict(np.load(Path("/tmp") / f"ref-{tag}{art.name}.npz"))
        lines = compare_batch(got, ref) if batched else compare(
            art, got, ref, spec_of(art)["dtype"] == "float32")
        return "\n".join([f"== {art.name} (torch reference {tref:.1f} s; kiln {tk:.1f} s)",
                          *lines])

    with ThreadPoolExecutor(workers) as pool:
        for text in pool.map(one, arts):
            print(text, flush=True)


# -- bench -------------------------------------------------------------------------------------

def hf_numbers(config: dict, lens: list[int], decode: int) -> dict:
    """transformers LlamaForCausalLM, random fp16 weights, eager (no compile), sdpa attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=config["vocab"], hidden_size=config["hidden"],
                      intermediate_size=config["ffn"], num_hidden_layers=config["layers"],
                      num_attention_heads=config["heads"], num_key_value_heads=config["kv_heads"],
                      head_dim=config["head_dim"], max_position_embeddings=8192,
                      rope_theta=config.get("rope_theta", 10000.0),
                      tie_word_embeddings=config.get("tie_embeddings", True))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).half().eval()
    res: dict = {"prefill": {}, "decode": None}

    def timed(fn, reps):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    with torch.no_grad():
        for n in lens:
            ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
            sec = timed(lambda ids=ids: model(ids, logits_to_keep=1), 5)
            res["prefill"][n] = n / sec
        ids = torch.randint(0, cfg.vocab_size, (1, 16), device="cuda")

        def gen(k):
            return lambda: model.generate(ids, max_new_tokens=k, min_new_tokens=k,
                                          do_sample=False, pad_token_id=0)
        t1, tn = timed(gen(1), 3), timed(gen(decode + 1), 3)
        res["decode"] = decode / (tn - t1)
    torch_copy = []
    a = torch.empty(256 << 20, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        torch_copy.append(2 * a.numel() * 4 / s.elapsed_time(e) / 1e6)
    res["torch_copy_gb_s"] = statistics.median(torch_copy)
    res["device"] = torch.cuda.get_device_name()
    return res


def bench(root: Path, lens: list[int], decode: int, repeat: int, only: str,
          with_hf: bool = True, rounds: int = 1, decode_after: str = "16") -> None:
    """`rounds` > 1: the artifacts benched in turn that many times (A B C A B C ...), each
    round's twin ratios printed; the table is the first round's."""
    rows, peers, by_round = [], {}, []
    for rnd, art in ((r, a) for r in range(rounds) for a in sorted((root / "arts").iterdir())):
        if art.name.startswith(".") or (only and not re.search(only, art.name)):
            continue
        cfg_file = root / "models" / spec_of(art)["model"] / "config.json"
        child = subprocess.run(
            [sys.executable, str(root / "bundle" / "kiln_run.py"), "bench", "--artifact",
             str(art), "--synthetic-weights", str(SEED), "--prompt-lens",
             ",".join(map(str, lens)), "--decode-len", str(decode), "--repeat", str(repeat),
             "--decode-after", decode_after,
             "--json", f"/tmp/bench-{art.name}.json"], capture_output=True, text=True)
        print(f"== kiln {art.name} (round {rnd + 1})\n{child.stdout}{child.stderr[-3000:]}",
              flush=True)
        if child.returncode:
            continue
        k = json.loads(Path(f"/tmp/bench-{art.name}.json").read_text())
        while len(by_round) <= rnd:
            by_round.append({})
        by_round[rnd][art.name] = k
        if rnd:
            continue
        model = spec_of(art)["model"]
        if model not in peers and not with_hf:
            peers[model] = {"prefill": {}, "decode": float("nan"),
                            "torch_copy_gb_s": float("nan")}
        if model not in peers:  # HF eager once per model shape, right after its first artifact
            h = subprocess.run([sys.executable, str(HERE), "hf", str(cfg_file),
                                ",".join(map(str, lens)), str(decode)], capture_output=True,
                               text=True)
            if h.returncode:
                print(f"HF failed: {h.stderr[-3000:]}")
                continue
            peers[model] = json.loads(h.stdout.strip().splitlines()[-1])
            print(f"HF eager: {peers[model]}", flush=True)
        rows.append((art.name, k, peers[model]))
    print("\nmodel dtype | phase tokens | kiln tok/s | HF eager tok/s | kiln/HF | roofline "
          "(weight bytes per token / copy bandwidth)")
    for name, k, hf in rows:
        roof = k["roofline_tok_s"]
        for r in k["rows"]:
            peer = hf["decode"] if r["phase"] == "decode" else hf["prefill"].get(
                str(r["tokens"]), hf["prefill"].get(r["tokens"], float("nan")))
            extra = f"{100 * r['tok_s'] / roof:.0f}% of {roof:.0f}" if r["phase"] == "decode" \
                else ""
            after = f" after {r['past']}" if r.get("past") else ""
            print(f"{name} | {r['phase']} {r['tokens']}{after} | {r['tok_s']:.1f} | "
                  f"{peer:.1f} | {r['tok_s'] / peer:.2f}x | {extra}")
        print(f"{name}: copy {k['copy_gb_s']:.0f} GB/s (TVM), torch {hf['torch_copy_gb_s']:.0f}"
              f" GB/s; weights {k['weight_bytes'] / 1e6:.0f} MB read per decoded token")
    for rnd, results in enumerate(by_round):
        print(f"round {rnd + 1}:")
        twin_ratios(root, results)


def twin_ratios(root: Path, results: dict[str, dict]) -> None:
    """Each 2:4 artifact's tok/s over its dense twin's (same model, dtype and quant; both
    timed in this run)."""
    for name, k in results.items():
        spec = spec_of(root / "arts" / name)
        if "sp24" not in spec.get("variant", "").split("+"):
            continue
        twin = "-".join(x for x in (spec["model"], spec["dtype"], spec["quant"]) if x)
        if twin not in results:
            continue
        dense = {(r["phase"], r["tokens"]): r["tok_s"] for r in results[twin]["rows"]}
        for r in k["rows"]:
            d = dense.get((r["phase"], r["tokens"]))
            if d:
                print(f"{name} / {twin} | {r['phase']} {r['tokens']} | {r['tok_s']:.1f} / "
                      f"{d:.1f} = {r['tok_s'] / d:.3f}x")


def profile_run(art: Path, prompt: int, steps: int) -> None:
    """What `profile` runs under Nsight Compute: a prompt, then `steps` decode steps."""
    from kiln.runtime.session import Session

    s = Session.load(art, synthetic_weights=SEED)
    ids = np.random.default_rng(0).integers(0, s.vocab, (1, prompt))
    tok = s.prefill(ids, last_only=True)[:, -1].argmax(-1)
    for _ in range(steps):
        tok = s.decode(tok)[:, -1].argmax(-1)


def step_time(art: Path, steps: int = 128) -> None:
    """Where a decode step's time goes: the Session API (inputs up, logits down, argmax on the
    host) against back-to-back calls of the compiled entry point with the same token (no
    readback until the end: device-bound), after a 16-token prompt."""
    from kiln.runtime.session import Session

    s = Session.load(art, synthetic_weights=SEED)
    ids = np.random.default_rng(0).integers(0, s.vocab, (1, 16))
    for mode in ("session", "greedy", "entry"):
        times = []
        for _ in range(3):
            tok = s.prefill(ids, last_only=True)[:, -1].argmax(-1)
            s.device.sync()
            t = time.perf_counter()
            if mode == "session":  # logits to the host, argmax there
                for _ in range(steps):
                    tok = s.decode(tok)[:, -1].argmax(-1)
            elif mode == "greedy":  # argmax on the device, one id back
                for _ in range(steps):
                    tok = s.decode_greedy(tok)
            else:
                tvm = s.tvm
                base = s.past
                for i in range(steps):
                    args = [tvm.runtime.ShapeTuple([base + i, *s._offsets_arg("decode")])]
                    args += [s._device_input(n, s._feed(n, tok.reshape(-1, 1)), reuse=True)
                             for n in s.inputs]
                    s._vm["decode"](*args, s._caches, s._params)
                    s.past += 1
                s.device.sync()
            times.append((time.perf_counter() - t) / steps)
        print(f"{art.name} decode step, {mode}: {1e3 * statistics.median(times):.3f} ms "
              f"({1 / statistics.median(times):.0f} tok/s)")


def context_decode(art: Path, contexts: list[int], steps: int = 128, repeat: int = 3) -> None:
    """Greedy decode tok/s (device argmax, as `bench`) after prompts of several lengths: the
    attention's share grows with the cached tokens."""
    from kiln.runtime.session import Session

    s = Session.load(art, synthetic_weights=SEED)
    rng = np.random.default_rng(0)
    for n in contexts:
        runs = []
        for i in range(repeat + 1):
            tok = s.prefill(rng.integers(0, s.vocab, (1, n)), last_only=True)[:, -1].argmax(-1)
            s.device.sync()
            t = time.perf_counter()
            for _ in range(steps):
                tok = s.decode_greedy(tok)
            if i:
                runs.append(steps / (time.perf_counter() - t))
        print(f"{art.name} decode after {n} tokens: {statistics.median(runs):.1f} tok/s "
              f"(median of {repeat}: {' '.join(f'{r:.0f}' for r in runs)})", flush=True)


def batch_decode(art: Path, batches: list[int], steps: int, repeat: int, after: int) -> None:
    """Greedy decode tok/s summed over the rows (decode_greedy: argmax on the device, the
    tokens fed back without a copy) for each batch size, the prompts of unequal lengths around
    `after` tokens (after .. after + rows - 1), and the ratio to batch 1."""
    from kiln.runtime.session import Session

    s = Session.load(art, synthetic_weights=SEED)
    rng = np.random.default_rng(0)
    base = None
    print(f"{art.name}: greedy decode, {steps} steps after prompts of {after}.. tokens; "
          "batch | tok/s (all rows) | per row | vs batch 1", flush=True)
    for rows in batches:
        ps = [rng.integers(0, s.vocab, after + r) for r in range(rows)]
        runs = []
        for i in range(repeat + 1):  # the first run captures the CUDA graph: not timed
            tok = s.prefill_batch(ps).argmax(-1)
            s.device.sync()
            t = time.perf_counter()
            for _ in range(steps):
                tok = s.decode_greedy(tok)
            if i:
                runs.append(rows * steps / (time.perf_counter() - t))
        tok_s = statistics.median(runs)
        base = base or (tok_s if rows == 1 else None)
        ratio = f"{tok_s / base:.2f}x" if base else "-"
        print(f"{art.name} | batch {rows} | {tok_s:.1f} | {tok_s / rows:.1f} | {ratio} "
              f"(median of {repeat}: {' '.join(f'{r:.0f}' for r in runs)})", flush=True)


def profile(root: Path, name: str, prompt: int, steps: int) -> None:
    """Per-kernel GPU time (ncu gpu__time_duration) of a prefill and of one decode step."""
    import csv
    import io

    cmd = ["ncu", "--csv", "--metrics", "gpu__time_duration.sum", sys.executable, str(HERE),
           "profile-run", str(root), name, str(prompt), str(steps)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('"')]
    if not lines:
        print(f"ncu failed: {p.stdout[-2000:]}{p.stderr[-2000:]}")
        return
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    per: dict[str, list[float]] = {}
    for r in rows:
        unit = r.get("Metric Unit", "ns")
        v = float(r["Metric Value"].replace(",", ""))
        v *= {"ns": 1e-3, "usecond": 1, "us": 1, "msecond": 1e3, "ms": 1e3}.get(unit, 1e-3)
        per.setdefault(r["Kernel Name"], []).append(v)
    total = sum(sum(v) for v in per.values())
    print(f"{name}: {len(rows)} kernels, {total:.0f} us in all (prompt {prompt}, "
          f"{steps} decode steps); per kernel name: calls, total us, mean us")
    for k, v in sorted(per.items(), key=lambda kv: -sum(kv[1]))[:40]:
        print(f"  {k[:60]:60s} {len(v):5d} {sum(v):10.1f} {sum(v) / len(v):8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["build", "check", "bench", "torch-ref", "kiln-out", "hf",
                                    "profile", "profile-run", "steptime", "ctxdecode",
                                    "checkbatch", "torch-ref-batch", "kiln-out-batch",
                                    "batchbench"])
    p.add_argument("root", type=Path)
    p.add_argument("rest", nargs="*")
    p.add_argument("--max-seq", type=int, default=4096)
    p.add_argument("--lens", default="128,512,2048")
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--only", default="")
    p.add_argument("--no-hf", action="store_true", help="bench: kiln only (no HF eager peer)")
    p.add_argument("--decode-after", default="16",
                   help="bench: cached tokens before the decode steps (a decode row each)")
    p.add_argument("--batches", default="1,4,8,16", help="batchbench: batch sizes")
    p.add_argument("--rounds", type=int, default=1,
                   help="bench: the artifacts in turn this many times (alternated A/B)")
    a = p.parse_args()
    if a.mode == "build":
        build(a.root, a.rest, a.max_seq)
    elif a.mode == "check":
        check(a.root, a.only)
    elif a.mode == "checkbatch":
        check(a.root, a.only, batched=True)
    elif a.mode == "torch-ref-batch":
        art = a.root / "arts" / a.rest[0]
        np.savez(f"/tmp/ref-batch-{art.name}.npz", **torch_batch_reference(art,
                                                                         a.root / "bundle"))
    elif a.mode == "kiln-out-batch":
        enter_bundle(a.root / "bundle")
        art = a.root / "arts" / a.rest[0]
        np.savez(f"/tmp/kiln-batch-{art.name}.npz", **kiln_batch_outputs(art))
    elif a.mode == "batchbench":
        enter_bundle(a.root / "bundle")
        for name in a.rest:
            batch_decode(a.root / "arts" / name, [int(x) for x in a.batches.split(",")],
                         a.decode, a.repeat, int(a.decode_after.split(",")[0]))
    elif a.mode == "bench":
        bench(a.root, [int(x) for x in a.lens.split(",")], a.decode, a.repeat, a.only,
              with_hf=not a.no_hf, rounds=a.rounds, decode_after=a.decode_after)
    elif a.mode == "torch-ref":
        art = a.root / "arts" / a.rest[0]
        np.savez(f"/tmp/ref-{art.name}.npz", **torch_reference(art, a.root / "bundle"))
    elif a.mode == "kiln-out":
        enter_bundle(a.root / "bundle")
        art = a.root / "arts" / a.rest[0]
        t = time.perf_counter()
        np.savez(f"/tmp/kiln-{art.name}.npz", **kiln_outputs(art))
        print(f"{time.perf_counter() - t:.1f} s")
    elif a.mode == "profile":
        profile(a.root, a.rest[0], int(a.rest[1]), int(a.rest[2]))
    elif a.mode == "steptime":
        enter_bundle(a.root / "bundle")
        for name in a.rest:
            step_time(a.root / "arts" / name)
    elif a.mode == "ctxdecode":  # ctxdecode ROOT NAME... --lens 16,1024,3072
        enter_bundle(a.root / "bundle")
        for name in a.rest:
            context_decode(a.root / "arts" / name, [int(x) for x in a.lens.split(",")],
                           a.decode, a.repeat)
    elif a.mode == "profile-run":
        enter_bundle(a.root / "bundle")
        profile_run(a.root / "arts" / a.rest[0], int(a.rest[1]), int(a.rest[2]))
    elif a.mode == "hf":
        cfg = json.loads(a.root.read_text())
        print(json.dumps(hf_numbers(cfg, [int(x) for x in a.rest[0].split(",")],
                                    int(a.rest[1]))))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
