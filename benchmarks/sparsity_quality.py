"""Sparsity quality table: `kiln compile --sparsity S --prune-method M [--quant w8]` then
`kiln eval ART --text TEXT --reference FP32_ART`, for every level, method and quantization.

    python benchmarks/sparsity_quality.py MODEL.onnx --work /tmp/h4a/sq \\
        [--levels 0.3,0.5,0.7,2:4] [--methods sparsegpt,wanda,magnitude] [--quant none,w8] \\
        [--text models/data/eval_pyref.txt] [--max-seq 1024] [--json results.jsonl] [--table T.md]
        [--via onnx [--calibration FILE ...] [--windows N]]

With `--via artifact` (the default) each variant is `kiln compile` then `kiln eval --json` in
processes of their own (a process that has loaded TVM's runtime alone cannot load its compiler).
With `--via onnx` a variant costs no compile: the same passes (prune_weights, then
quantize_weights) run on the canonical graph, the weights they produce (dequantized, for w8) are
written into a copy of the model's external data, and onnxruntime scores the copy with kiln's
evaluator against the fp32 model (whose logits are computed once), as
benchmarks/quant_ablation.py does, calibrated on kiln's calibration texts or on `--calibration`
FILEs (repeatable, joined by a blank line; a different calibration needs its own --work). A dense
compile of a pruned graph computes exactly these
weights, so the two differ only by kernel rounding; the table says which rows came which way.
Artifacts are compiled one at a time (the CPU is shared), evaluated against the fp32 artifact
(compiled first, kept) and deleted; each result is appended to the JSON lines file as it comes,
and a rerun skips the variants already there, so the table can be built in several sittings. The
markdown table is rewritten from the JSON lines after every variant. Variants run in an order
that puts the acceptance points first (sparsegpt and magnitude at 50%).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def variants(levels: list[str], methods: list[str], quants: list[str]) -> list[tuple]:
    """(level, method, quant) in the order they are run: without quantization first; SparseGPT
    and magnitude (the acceptance pair) level by level, 50% first, before the other methods."""
    order = sorted(levels, key=lambda s: (s != "0.5", s))
    pair = [m for m in methods if m in ("sparsegpt", "magnitude")]
    rest = [m for m in methods if m not in pair]
    return [(lv, m, q) for q in quants for group in (pair, rest) for lv in order
            for m in group]


def key(level: str, method: str, quant: str) -> str:
    return f"{level}/{method}/{quant}"


def load(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


def table(results: dict[str, dict], levels: list[str], methods: list[str],
          quants: list[str]) -> str:
    """Markdown: one row per (level, quant), perplexity (vs fp32), KL and top-1 per method."""
    ref = results.get("fp32")
    lines = [f"fp32: perplexity {ref['perplexity']:.3f} over {ref['tokens']} tokens"
             if ref else "fp32: not measured yet", "",
             "| sparsity | quant | " + " | ".join(
                 f"{m} ppl (vs fp32) | {m} KL | {m} top-1" for m in methods) + " |",
             "|---|---|" + "---|" * (3 * len(methods))]
    for q in quants:
        for lv in sorted(levels, key=lambda s: (":" in s, s)):
            cells = []
            for m in methods:
                r = results.get(key(lv, m, q))
                if r is None:
                    cells += ["-", "-", "-"]
                    continue
                rel = (r["perplexity"] / ref["perplexity"] - 1) * 100 if ref else float("nan")
                mark = "*" if r.get("via", "artifact") == "artifact" else ""
                cells += [f"{r['perplexity']:.3f} ({rel:+.1f}%){mark}",
                          f"{r['kl_divergence']:.3f}", f"{r['top1_agreement']:.3f}"]
            lines.append(f"| {lv} | {q} | " + " | ".join(cells) + " |")
    lines += ["", "*: `kiln compile` + `kiln eval` on the artifact; other rows: onnxruntime on the "
              "same weights (`--via onnx`)"]
    return "\n".join(lines) + "\n"


def kiln(*args) -> str:
    out = subprocess.run(["kiln", *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise click.ClickException(f"kiln {' '.join(map(str, args))}: {out.stderr.strip()}")
    return out.stdout


def evaluate(art: Path, text: Path, ref: Path | None = None) -> dict:
    return json.loads(kiln("eval", art, "--text", text, "--json",
                           *(("--reference", ref) if ref else ())))


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--work", type=click.Path(path_type=Path), required=True,
              help="folder for the artifacts (the fp32 one is kept)")
@click.option("--levels", default="0.3,0.5,0.7,2:4", show_default=True)
@click.option("--methods", default="sparsegpt,magnitude,wanda", show_default=True)
@click.option("--quant", "quants", default="none,w8", show_default=True)
@click.option("--text", type=click.Path(exists=True, path_type=Path),
              default=ROOT / "models" / "data" / "eval_pyref.txt", show_default=True)
@click.option("--max-seq", default=1024, show_default=True, help="the eval's context")
@click.option("--via", type=click.Choice(["artifact", "onnx"]), default="artifact",
              show_default=True)
@click.option("--calibration", "calibration", multiple=True,
              type=click.Path(exists=True, path_type=Path),
              help="with --via onnx: calibration text, repeatable (default: kiln's)")
@click.option("--windows", default=0, help="with --via onnx: at most this many calibration "
              "windows (default: kiln's)")
@click.option("--json", "json_out", type=click.Path(path_type=Path))
@click.option("--table", "table_out", type=click.Path(path_type=Path))
def main(model: Path, work: Path, levels: str, methods: str, quants: str, text: Path,
         max_seq: int, via: str, calibration: tuple[Path, ...], windows: int,
         json_out: Path | None, table_out: Path | None) -> None:
    lv, ms, qs = levels.split(","), methods.split(","), quants.split(",")
    json_out = json_out or work / "results.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    results = load(json_out)

    def record(row: dict) -> None:
        results[row["key"]] = row
        with json_out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if table_out is not None:
            table_out.write_text(table(results, lv, ms, qs))
        click.echo(json.dumps(row))

    if via == "onnx":
        onnx_rows(model, work, text, max_seq, variants(lv, ms, qs), results, record,
                  calibration, windows)
        return
    if calibration or windows:
        raise click.UsageError("--calibration and --windows need --via onnx (kiln compile "
                               "calibrates on kiln's texts)")
    ref = work / "fp32"
    if not (ref / "manifest.json").is_file():
        kiln("compile", model, "-o", ref, "--max-seq", max_seq)
    if "fp32" not in results:
        record({"key": "fp32", **evaluate(ref, text)})
    for level, method, quant in variants(lv, ms, qs):
        k = key(level, method, quant)
        if k in results:
            continue
        art = work / k.replace("/", "_").replace(":", "of")
        start = time.perf_counter()
        kiln("compile", model, "-o", art, "--max-seq", max_seq, "--sparsity", level,
             "--prune-method", method, *(() if quant == "none" else ("--quant", quant)))
        compiled = time.perf_counter() - start
        row = evaluate(art, text, ref)
        record({"key": k, "sparsity": level, "method": method, "quant": quant, "via": via,
                "compile_seconds": round(compiled, 1), **row})
        shutil.rmtree(art)


def onnx_rows(model: Path, work: Path, text: Path, max_seq: int, todo: list[tuple],
              results: dict, record, texts: tuple[Path, ...] = (), count: int = 0) -> None:
    """The `--via onnx` variants (see the module docstring)."""
    import tempfile

    from tokenizers import Tokenizer

    from kiln.compiler.calibration import CALIBRATION_TEXTS, CALIBRATION_WINDOWS, calibration
    from kiln.compiler.compile import compile_graph
    from kiln.compiler.evaluation import read_text
    from kiln.compiler.frontend.onnxruntime_lm import OrtLM
    from kiln.passes.prune_weights import parse_config, prunable, prune_weights
    from kiln.passes.quantize import parse_preset, quantize_weights
    from kiln.runtime.evaluate import evaluate

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quant_ablation import write_copy

    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    graph = compile_graph(model, max_seq=max_seq, progress=lambda m: None,
                          weights_optional=False)
    texts = tuple(t.resolve() for t in texts) or CALIBRATION_TEXTS
    windows = calibration(model, say, max_seq, texts=texts, count=count or CALIBRATION_WINDOWS)
    cal = {"calibration": "+".join(Path(t).name for t in texts), "windows": len(windows)}
    ids = Tokenizer.from_file(str(model.with_name("tokenizer.json"))).encode(
        read_text(text)).ids
    cache: dict = {}
    base = OrtLM(model, threads=2)

    def reference(feed):
        key = feed.tobytes()
        if key not in cache:
            cache[key] = base(feed)
        return cache[key]

    def score(onnx: Path) -> dict:
        r = evaluate(OrtLM(onnx, threads=2), ids, context=max_seq, stride=max_seq // 2,
                     reference=reference)
        return {"tokens": r.tokens, "context": max_seq, "stride": max_seq // 2,
                "perplexity": r.perplexity, "reference_perplexity": r.reference_perplexity,
                "kl_divergence": r.kl_divergence, "top1_agreement": r.top1_agreement}

    if "fp32" not in results:
        record({"key": "fp32", "via": "onnx", **score(model)})
    for level, method, quant in todo:
        k = key(level, method, quant)
        if k in results:
            continue
        start = time.perf_counter()
        g = prune_weights(graph, config=parse_config(level, method), calibration=windows)
        if quant != "none":
            g = quantize_weights(g, preset=parse_preset(quant), calibration=windows)
        weights = dense_weights(g, graph)
        solved = time.perf_counter() - start
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            row = score(write_copy(model, graph, weights, Path(tmp)))
        pruned = [weights[w] for w in prunable(graph)]
        zeros = sum(int((w == 0).sum()) for w in pruned) / sum(w.size for w in pruned)
        record({"key": k, "sparsity": level, "method": method, "quant": quant, "via": "onnx",
                "solve_seconds": round(solved, 1), "zero_fraction": round(zeros, 4), **cal,
                **row})


def dense_weights(g, original) -> dict:
    """original linear weight name -> the [N, K] float32 weight graph g computes with (pruned,
    and dequantized where g quantized it)."""
    from kiln.compiler.interpreter.transformer_ops import dequantize

    out = {}
    for n in g.nodes:
        if n.op == "linear" and n.inputs[1] in original.params:
            out[n.inputs[1]] = g.params[n.inputs[1]].load()
        elif n.op in ("quant_linear", "quant_embedding"):
            slots = (1, 2, 3) if n.op == "quant_linear" else (0, 1, 2)
            q, s, z = (g.params[n.inputs[i]].load() if n.inputs[i] else None for i in slots)
            name = n.inputs[slots[0]].removesuffix(".qweight")
            w = dequantize(q, s, z, n.attrs)
            out[name] = w[:n.attrs["out_features"], :n.attrs["in_features"]]
    return out


if __name__ == "__main__":
    main()
