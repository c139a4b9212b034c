"""`kiln compile` and `kiln convert`: canonical graph -> kernels + parameters -> artifact."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.compiler.analysis import describe
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Graph, Inline, Param
from kiln.runtime import artifact as af

Progress = Callable[[str], None]

#: the constants kiln computes (tables, split sizes) ship beside the kernels, always
CONSTANTS = "constants.safetensors"


def _kiln_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kiln")
    except PackageNotFoundError:
        return "unknown"


def compile_graph(model: Path, *, max_seq: int, progress: Progress,
                  weights_optional: bool, pack_block: int = 0, quant=None,
                  dump_ir: Path | None = None, prune=None, sparse_target: str | None = None,
                  sparse_plan: dict | None = None,
                  fusions: Sequence[str] | None = None) -> Graph:
    """The graph after the `compile` pipeline: canonical; with `quant` (a
    kiln.passes.quantize.QuantPreset) its weights and KV cache quantized; with `pack_block`,
    weights in the CPU kernels' layout. `dump_ir`: the IR after each pass, as `kiln inspect`.
    `prune` (a kiln.passes.prune_weights.PruneConfig): weights pruned before they are quantized.
    `sparse_target` ("cpu", "cuda"): linears with enough zeros become sparse_linear in its layout
    (kiln.passes.sparsify), or as `sparse_plan` (an artifact's recorded decisions) says.
    `fusions`: the kiln.passes.fusion fusions to run (recorded for the lowering); all by
    default (a target runs those it takes, less --no-fuse)."""
    from kiln.compiler.calibration import calibration as calibration_windows
    from kiln.compiler.driver import canonicalize
    from kiln.passes import fusion

    kv_bits = quant.kv_bits if quant is not None else 0
    weights = quant if quant is not None and quant.keep != ("*",) else None  # kv8 alone: none
    calibrated = weights is not None or (prune is not None and prune.method != "magnitude")
    calibration = calibration_windows(model, progress, max_seq) if calibrated else ()
    options = {
        "tabulate_positions": {"max_positions": max_seq},
        "prune_weights": {"config": prune, "calibration": calibration},
        "quantize_kv_cache": {"bits": kv_bits},
        "quantize_weights": {"preset": weights, "calibration": calibration},
        "sparsify": {"target": sparse_target, "plan": sparse_plan},
        "pack_linear_weights": {"block": pack_block},
        **fusion.options(fusion.FUSIONS if fusions is None else fusions),
    }
    progress(f"importing {model.name}")
    return canonicalize(model, pipeline="compile", weights_optional=weights_optional,
                        dump_ir=dump_ir, options=options,
                        on_pass=lambda name, g, s: progress(f"{name}: {len(g.nodes)} nodes "
                                                            f"({s:.2f} s)")).canonical


def compile_model(model: str | Path, out: str | Path, *, target: str = "cpu",
                  max_seq: int = 2048, weights: bool = True,
                  progress: Progress = lambda msg: None, quant: str | None = None,
                  quant_keep: tuple[str, ...] = (), dtype: str | None = None,
                  tuning: str | Path | None = None, sparsity: str | None = None,
                  prune_method: str | None = None, sparsity_keep: tuple[str, ...] = (),
                  force: bool = False, dump_ir: Path | None = None,
                  no_fuse: Sequence[str] = ()) -> Path:
    """Compile an ONNX decoder into an artifact directory (written atomically); `quant` names
    a weight quantization preset (kiln.passes.quantize.PRESETS), `quant_keep` fnmatch patterns
    of layers kept in fp32 ("lm_head": the output projection); `dtype` the compute dtype of
    a CUDA target (float16, bfloat16 or float32; parameters are stored in it); `tuning` a
    `kiln tune` database of per-kernel schedules (docs/tuning.md). `sparsity` (0.5, 2:4) prunes
    the linear weights first with `prune_method` (sparsegpt, wanda, magnitude), leaving those
    matching `sparsity_keep` dense (kiln.passes.prune_weights). An existing OUT is refused
    unless `force`; then it is replaced whole (kiln.runtime.artifact.ArtifactWriter).
    `dump_ir`: a folder for the IR after each pass of the compile pipeline, quantization and
    layout stages included. `no_fuse`: fusions (kiln.passes.fusion.FUSIONS, or "all") left
    out of those the target takes, for A/B runs; the manifest records the ones that ran."""
    progress("loading TVM")  # its import alone takes seconds
    from kiln.codegen.build import build
    from kiln.codegen.schedules import Schedules
    from kiln.codegen.targets import resolve
    from kiln.passes import fusion
    from kiln.passes.prune_weights import parse_config

    model, start = Path(model), time.perf_counter()
    af.check_out(Path(out), force=force)  # before the minutes of work, not after
    tgt = resolve(target)
    tgt = tgt.with_dtype(dtype) if dtype is not None else tgt
    db = tuning_db(tuning, tgt)  # a bad file is refused before the minutes of work
    fusions = fusion.enabled(no_fuse, take=tgt.fusions)
    preset = _preset(quant, quant_keep, tgt)
    prune = parse_config(sparsity, prune_method, sparsity_keep)
    if prune is not None:
        _check_pruning(prune, model, weights)
    if preset is not None and not tgt.quant_kernels:
        raise KilnError(f"--quant {preset.name}: target {tgt.name} has no quantized kernels")
    if preset is not None and preset.act_bits and not tgt.int8_activations:
        raise KilnError(f"--quant {preset.name}: int8 activations (-a8) have CPU kernels only, "
                        f"not target {tgt.name}")
    if preset is not None and preset.kv_bits and not tgt.kv8:
        raise KilnError(f"--quant {preset.name}: target {tgt.name} has no kernels for the int8 KV "
                        "cache (kv8); weight presets such as w8, w4g32 are fine")
    graph = compile_graph(model, max_seq=max_seq, progress=progress,
                          weights_optional=not weights,
                          pack_block=tgt.pack_block, quant=preset, prune=prune,
                          sparse_target=tgt.sparse_target(), dump_ir=dump_ir, fusions=fusions)
    _check_inputs(graph)
    _check_positions(graph, max_seq, windows=tgt.sliding_windows)
    graph = _without_idle_windows(graph, max_seq)
    with af.ArtifactWriter(out, force=force) as w:
        schedules = Schedules(tgt, db)
        sig = build(graph, tgt, w.path(af.KERNELS), schedules=schedules,
                    prefill_rows=row_buckets(max_seq, db), progress=progress)
        w.add(af.KERNELS)
        table = _in_dtype(param_table(graph, sig.params), tgt.storage_dtype())
        progress("writing parameters")
        _save(graph, [p for p in table if p["file"] == CONSTANTS], w.path(CONSTANTS))
        w.add(CONSTANTS)
        if weights:
            _save(graph, [p for p in table if p["file"] == af.PARAMS], w.path(af.PARAMS))
            w.add(af.PARAMS)
        _copy_tokenizer(model, w)
        manifest = _manifest(model, graph, tgt, sig, table, max_seq)
        manifest["compile_seconds"] = round(time.perf_counter() - start, 2)
        manifest["fusions"] = list(fusions)  # convert rebuilds the same graph from it
        if preset is not None:
            manifest["quant"] = preset.to_dict()
        if prune is not None:
            manifest["sparsity"] = prune.to_dict()
        if graph.meta.get("sparse"):  # the linears that went sparse (kiln.passes.sparsify)
            manifest["sparse"] = graph.meta["sparse"]
        manifest["schedules"] = schedules.manifest()  # each kernel instance's config, and why
        return w.commit(manifest)


def convert(model: str | Path, artifact_dir: str | Path, *,
            progress: Progress = lambda msg: None) -> Path:
    """Produce the parameter file of an artifact compiled --no-weights, from the model."""
    from kiln.codegen.targets import target_type

    art = af.open_artifact(artifact_dir, verify=False)
    q, sparsity = art.manifest.get("quant"), art.manifest.get("sparsity")
    tgt = target_type(art.manifest["target"]["name"])  # its capabilities: no TVM needed
    graph = compile_graph(Path(model), max_seq=art.max_seq, progress=progress,
                          weights_optional=False, pack_block=tgt.pack_block,
                          quant=_recorded_preset(q) if q else None,
                          prune=_recorded_prune(sparsity) if sparsity else None,
                          sparse_target=tgt.sparse_layout,
                          sparse_plan=art.manifest.get("sparse", {}),
                          fusions=art.manifest.get("fusions", tgt.fusions))
    want = {p["name"]: p for p in art.manifest["params"] if p["file"] == af.PARAMS}
    have = {p["name"]: p for p in _in_dtype(param_table(graph, list(graph.params)),
                                            art.manifest["target"].get("dtype"))
            if p["file"] == af.PARAMS}
    for name, p in want.items():
        q = have.get(name)
        if q is None or (q["shape"], q["dtype"]) != (p["shape"], p["dtype"]):
            got = "absent" if q is None else f"{q['dtype']}{q['shape']}"
            raise KilnError(f"{model}: parameter {name} is {got}, the artifact expects "
                            f"{p['dtype']}{p['shape']} (a different model?)")
    tmp = art.path / (af.PARAMS + ".partial")
    _save(graph, list(want.values()), tmp)
    af.add_params_file(art, tmp)
    return art.path / af.PARAMS


def _recorded_preset(q: dict):
    """The preset an artifact was compiled with, from its manifest (not re-read by name: a
    preset's meaning may have changed since)."""
    from kiln.passes.quantize import QuantPreset

    try:
        return QuantPreset.from_dict(q)
    except (KeyError, TypeError) as e:
        raise KilnError(f"manifest: malformed quantization record {q!r} ({e})") from e


def _check_pruning(prune, model: Path, weights: bool) -> None:
    """Refuse, before any work, a calibrated pruning method that cannot calibrate or whose
    parameters a --no-weights artifact could not derive later without the compiler."""
    from kiln.passes.prune_weights import CALIBRATED

    if prune.method not in CALIBRATED:
        return
    if not weights:
        raise KilnError(f"--prune-method {prune.method} with --no-weights: the pruning is "
                        "calibrated on the weights, so it needs them at compile time; compile "
                        "with the weights, or use --prune-method magnitude")
    if not model.with_name(af.TOKENIZER).is_file():
        raise KilnError(f"--prune-method {prune.method} needs calibration text, tokenized with "
                        f"the model's tokenizer: no {af.TOKENIZER} beside {model} (use "
                        "--prune-method magnitude, or put the tokenizer there)")


def _recorded_prune(d: dict):
    """The pruning an artifact was compiled with, from its manifest."""
    from kiln.passes.prune_weights import PruneConfig

    try:
        return PruneConfig.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise KilnError(f"manifest: malformed sparsity record {d!r} ({e})") from e


def _preset(quant: str | None, keep: tuple[str, ...], tgt=None):
    """The --quant preset as compiled for `tgt` (the int4 presets take int8 activations where
    it multiplies codes: QuantPreset.for_target)."""
    if not quant:
        if keep:
            raise KilnError("--quant-keep needs --quant PRESET")
        return None
    from kiln.passes.quantize import parse_preset

    preset = parse_preset(quant, keep)
    return preset if tgt is None else preset.for_target(tgt.int8_dot)


#: prefill kernels are tuned (and looked up) for prompts of at most this many tokens
TUNED_PROMPT = 512
#: the long prompt `kiln tune` also measures prefill kernels at, when the context holds it
LONG_PROMPT = 2048


def prefill_rows(max_seq: int) -> int:
    """The rows a prefill kernel instance is scheduled for: the prompt length `kiln tune`
    measures at, the same for `kiln tune` and `kiln compile` with the same --max-seq."""
    return min(max_seq, TUNED_PROMPT)


def row_buckets(max_seq: int, db=None) -> tuple[int, ...]:
    """The rows prefill kernels are scheduled for: `prefill_rows(max_seq)`, then every other
    prompt length the tuning database `db` measured prefill kernels at (up to `max_seq`), each
    of which gets its own prefill entry points (kiln.codegen.build)."""
    first = prefill_rows(max_seq)
    tuned = db.prefill_rows() if db is not None else set()
    return (first, *sorted(r for r in tuned if r != first and r <= max_seq))


def tune_rows(max_seq: int) -> tuple[int, ...]:
    """The prompt lengths `kiln tune` measures prefill kernels at by default: the compile's
    first bucket and, where the context holds them, long prompts of 2048 tokens."""
    first = prefill_rows(max_seq)
    return (first, LONG_PROMPT) if max_seq >= LONG_PROMPT > first else (first,)


def tuning_db(tuning: str | Path | None, tgt):
    """The `kiln tune` database at `tuning` if it was measured for `tgt`; None (after one
    warning line) when it was measured elsewhere; an unreadable or old file is an error."""
    if tuning is None:
        return None
    if not tgt.tuning_tables:
        raise KilnError(f"--tuning: target {tgt.name} has no tunable schedules")
    from kiln.codegen.schedules import TuningDB

    return TuningDB.load(Path(tuning)).for_target(tgt, tuning)


#: the graph inputs kiln's runtime feeds (past_key_values become its in-place KV cache)
_FED = {"input_ids", "attention_mask", "position_ids"}


def _check_inputs(graph: Graph) -> None:
    """Refuse graphs with inputs the runtime cannot feed, typically a past_key_values input whose
    attention was not recognized (ALiBi, say), so it never became the in-place cache."""
    caches = {n.inputs[i] for n in graph.nodes if n.op == "attention"
              for i in (3, 4) if len(n.inputs) > i}
    for name in graph.inputs:
        if name not in _FED and name not in caches:
            hint = (" (its attention was not recognized, so it cannot become the KV cache; "
                    "`kiln inspect` shows what was)" if "past" in name else "")
            raise KilnError(f"graph input {name}: the runtime feeds only {sorted(_FED)} and the "
                            f"KV cache{hint}")
        shape = graph.types[name].shape or ()
        if any(d == 0 for d in shape):
            raise KilnError(f"graph input {name} declares an empty shape {list(shape)}: the "
                            "runtime feeds tokens, so a static dim of 0 is a mis-edited export")


def _check_positions(graph: Graph, max_seq: int, *, windows: bool = True) -> None:
    """A learned position table bounds the context: refuse a longer --max-seq. Without
    `windows` (a target whose attention kernels lack sliding windows), a window shorter than the
    context is refused too (one at least as long as the context never masks anything)."""
    for n in graph.nodes:
        window = n.attrs.get("window") if n.op == "attention" else None
        if window and window < max_seq and not windows:
            raise KilnError(f"node {n.name} (attention): sliding window {window} < --max-seq "
                            f"{max_seq} has no kernel yet; compile with --max-seq <= {window}")
        if n.op == "embedding" and n.inputs[1] == "position_ids" and \
                not n.inputs[0].endswith(".table"):
            rows = graph.types[n.inputs[0]].shape[0]
            if isinstance(rows, int) and rows < max_seq:
                raise KilnError(f"--max-seq {max_seq} exceeds the model's {rows} positions "
                                f"(learned position table {n.inputs[0]})")


def _without_idle_windows(graph: Graph, max_seq: int) -> Graph:
    """Attention windows at least as long as the context dropped: they never mask anything,
    and without one the attention takes the kernels of full causal attention (Mistral's 4096
    at a shorter --max-seq)."""
    import dataclasses

    nodes = tuple(dataclasses.replace(n, attrs=n.attrs.updated(window=None))
                  if n.op == "attention" and (n.attrs.get("window") or 0) >= max_seq else n
                  for n in graph.nodes)
    return graph.replace(nodes=nodes)


def param_table(graph: Graph, names: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    roles = _roles(graph)
    table = []
    for name in names:
        p: Param = graph.params[name]
        computed = isinstance(p.source, Inline) and p.source.computed
        table.append({"name": name, "shape": [int(d) for d in p.type.shape],
                      "dtype": p.type.dtype.value, "role": roles.get(name, "constant"),
                      "file": CONSTANTS if computed else af.PARAMS,
                      "derivation": p.source.describe()})
    return table


def _roles(graph: Graph) -> dict[str, str]:
    slots = {"linear": ("x", "weight", "bias"), "embedding": ("table", "ids"),
             "rms_norm": ("x", "norm.weight"), "layer_norm": ("x", "norm.weight", "norm.bias"),
             "quant_linear": ("x", "qweight", "scales", "zero_points", "bias"),
             "quant_embedding": ("qweight", "scales", "zero_points", "ids")}
    roles = {}
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            if v in graph.params and n.op in slots and i < len(slots[n.op]):
                roles.setdefault(v, f"{n.op}.{slots[n.op][i]}" if n.op != "embedding" or
                                 n.inputs[1] != "position_ids" else "table")
    return roles


def _save(graph: Graph, entries: list[dict], path: Path) -> None:
    from safetensors.numpy import save_file

    # np.require keeps 0-d scalars 0-d (ascontiguousarray would make them [1])
    arrays = {e["name"]: np.require(_as_dtype(graph.params[e["name"]].load(), e["dtype"]),
                                    requirements="C") for e in entries}
    save_file(arrays, str(path))


def _copy_tokenizer(model: Path, w: af.ArtifactWriter) -> None:
    """The tokenizer and generation files beside the model; the chat template as a file of its
    own (chat_template.jinja, wherever the export kept it)."""
    from kiln.compiler.generation_files import CHAT_TEMPLATE, read_chat_template

    for name in (af.TOKENIZER, "tokenizer_config.json", "generation_config.json"):
        src = model.parent / name
        if src.is_file():
            w.copy(src, name)
    template = read_chat_template(model.parent)
    if template is not None:
        w.path(CHAT_TEMPLATE).write_text(template, encoding="utf-8")
        w.add(CHAT_TEMPLATE)


def _manifest(model: Path, graph: Graph, tgt, sig, table, max_seq: int) -> dict[str, Any]:
    def io(name: str) -> dict[str, Any]:
        t = graph.types[name]
        return {"name": name, "dtype": t.dtype.value, "shape": [str(d) for d in t.shape]}

    return {
        "kiln_version": _kiln_version(),
        "target": {"name": tgt.name, **tgt.tvm_dict(), **tgt.requirements()},
        "architecture": describe(graph),
        "source": {"model": str(model), "sha256": af.sha256(model)},
        "entry_points": list(sig.entry_points),
        "prefill_rows": list(sig.prefill_rows),  # the row buckets of the prefill entries
        "decode_past": list(sig.decode_past),  # the cached lengths of the decode entries
        "signature": {
            "inputs": [io(v) for v in sig.inputs],
            "outputs": [io(v) for v in sig.outputs],
            "caches": [{"name": c.name, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
                        "dtype": c.dtype} for c in sig.caches],
            "params": list(sig.params),
        },
        "kv_cache": {"capacity": max_seq, "layout": "(batch, kv_heads, capacity, head_dim)",
                     "per_layer": ["key", "value"]},
        "params": table,
        **_generation(model),
    }


_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _in_dtype(table: list[dict[str, Any]], dtype: str | None) -> list[dict[str, Any]]:
    """The parameter table with floating-point parameters stored in `dtype` (when given)."""
    if dtype is None:
        return table
    return [{**p, "dtype": dtype} if p["dtype"] in _FLOATS else p for p in table]


def _as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    if str(array.dtype) == dtype:
        return array
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(dtype)


def _generation(model: Path) -> dict[str, Any]:
    """The manifest's generation record: stop tokens (and the file they came from), special
    tokens, and the chat template's file in the artifact."""
    from kiln.compiler.generation_files import CHAT_TEMPLATE, read_generation_files

    g = read_generation_files(model.parent)
    return {"special_tokens": g.special_tokens, "stop_token_ids": g.stop_token_ids,
            "stop_tokens_from": g.stop_tokens_from,
            "chat_template": CHAT_TEMPLATE if g.chat_template is not None else None}
