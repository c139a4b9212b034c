"""The `kiln` command line: parses arguments and calls library functions; holds no logic."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from kiln.compiler.errors import KilnError, UnsupportedOps
from kiln.compiler.fusions import FUSIONS


class KilnGroup(click.Group):
    """Turns KilnError into one line on stderr and exit code 2 (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UnsupportedOps as e:
            for line in e.lines:
                click.echo(f"kiln: error: {line}", err=True)
            sys.exit(e.exit_code)
        except KilnError as e:
            click.echo(f"kiln: error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=KilnGroup)
@click.version_option(package_name="kiln")
def main() -> None:
    """kiln: compile ONNX transformer exports into per-target kernels, and run them."""
    warnings.formatwarning = _one_line  # a warning is one line, as an error is


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"kiln: warning: {message}\n"


#: --quiet on every command that shows progress (kiln.compiler.progress)
quiet_option = click.option("-q", "--quiet", is_flag=True,
                            help="no progress on stderr (errors still print)")


def _canonicalize(model: Path, dump_ir: Path | None, *, weights_optional: bool, quiet: bool):
    from kiln.compiler.driver import canonicalize
    from kiln.compiler.progress import progress

    with progress(f"importing {model.name}", quiet=quiet) as report:
        def on_pass(name, graph, seconds):
            report(f"{name}: {len(graph.nodes)} nodes ({seconds:.2f} s)")

        return canonicalize(model, dump_ir=dump_ir, weights_optional=weights_optional,
                            on_pass=on_pass)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="write the IR after each pass")
@quiet_option
def inspect(model: Path, as_json: bool, dump_ir: Path | None, quiet: bool) -> None:
    """Show the architecture kiln recognizes in MODEL and its op histograms."""
    from kiln.compiler.analysis import describe, generic_ops, ops_per_layer, weight_sparsity

    result = _canonicalize(model, dump_ir, weights_optional=True, quiet=quiet)
    g0, g = result.original, result.canonical
    report = {
        "model": str(model),
        "architecture": describe(g),
        "nodes_before": len(g0.nodes),
        "nodes_after": len(g.nodes),
        "ops_per_layer": ops_per_layer(g),
        "ops_before": g0.op_histogram(),
        "ops_after": g.op_histogram(),
        "generic_ops_left": generic_ops(g),
        "parameters": g.param_count(),
        "parameter_bytes": g.param_bytes(),
        "weight_sparsity": weight_sparsity(g),
        "passes": [{"pass": p, "seconds": round(s, 3), "nodes": n} for p, s, n in
                   result.timings],
    }
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    _print_inspect(report)


def _print_inspect(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    arch = r["architecture"]
    con.print(f"[bold]{r['model']}[/]: {arch['family']}")
    t = Table(show_header=False, box=None)
    for k, v in arch.items():
        t.add_row(k, str(v))
    t.add_row("parameters", f"{r['parameters']:,} ({r['parameter_bytes'] / 1e6:.1f} MB)")
    t.add_row("nodes", f"{r['nodes_before']:,} ONNX -> {r['nodes_after']:,} canonical"
              + (f" ({r['ops_per_layer']:.1f} per layer)" if r["ops_per_layer"] else ""))
    con.print(t)
    h = Table("op", "before", "after", title="op histogram")
    for op in sorted(set(r["ops_before"]) | set(r["ops_after"]),
                     key=lambda o: -(r["ops_before"].get(o, 0) + r["ops_after"].get(o, 0))):
        h.add_row(op, str(r["ops_before"].get(op, "")), str(r["ops_after"].get(op, "")))
    con.print(h)
    left = r["generic_ops_left"]
    con.print("generic ops left: " + (", ".join(f"{k} x{v}" for k, v in left.items())
                                      if left else "none"))
    _print_sparsity(con, r["weight_sparsity"])


def _print_sparsity(con, layers: list[dict] | None) -> None:
    from rich.table import Table

    from kiln.compiler.analysis import SPARSE_REPORT

    if layers is None:
        con.print("weight sparsity: unknown (the weights are not at hand)")
        return
    sparse = [w for w in layers if w["zeros"] >= SPARSE_REPORT]
    if not sparse:
        con.print(f"weight sparsity: dense (no linear weight is {SPARSE_REPORT:.0%} zeros)")
        return
    t = Table("linear", "weight [N, K]", "zeros", "N:M", title=f"weight sparsity ({len(sparse)} "
              f"of {len(layers)} linear weights hold zeros)")
    for w in sparse:
        t.add_row(w["node"], f"{w['shape']}", f"{w['zeros']:.1%}", w["pattern"] or "-")
    con.print(t)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch", default=1, show_default=True)
@click.option("--tolerance", default=1e-4, show_default=True,
              help="max |kiln - onnxruntime| / max |onnxruntime| per output")
@quiet_option
def check(model: Path, as_json: bool, seed: int, batch: int, tolerance: float, quiet: bool) -> None:
    """Compare kiln's interpreter with onnxruntime on MODEL (prefill and decode); exit 0 only
    when every output is within tolerance."""
    from kiln.compiler.analysis import describe
    from kiln.compiler.check import check_model

    result = _canonicalize(model, None, weights_optional=False, quiet=quiet)
    vocab = describe(result.canonical)["vocab"]
    cases = check_model(model, result.canonical, tol=tolerance, seed=seed, batch=batch,
                        vocab=vocab)
    ok = all(c.ok for c in cases)
    if as_json:
        click.echo(json.dumps({"model": str(model), "ok": ok, "tolerance": tolerance, "cases": [
            {"case": c.case, "seq": c.seq, "past": c.past, "ok": c.ok,
             "top1_agreement": c.top1_agreement,
             "outputs": [o.__dict__ for o in c.outputs]} for c in cases]}, indent=2))
    else:
        for c in cases:
            worst = max(c.outputs, key=lambda o: o.rel)
            click.echo(f"{c.case:8s} seq={c.seq} past={c.past}: {len(c.outputs)} outputs, "
                       f"worst {worst.name} rel err {worst.rel:.2e} (max abs {worst.max_abs:.2e})"
                       + (f", top-1 agreement {c.top1_agreement:.3f}"
                          if c.top1_agreement is not None else "")
                       + ("  OK" if c.ok else "  FAIL"))
            for o in c.outputs:
                if not o.ok:
                    click.echo(f"    {o.name}: rel err {o.rel:.2e} > {tolerance:g}")
        click.echo("check passed" if ok else "check FAILED")
    sys.exit(0 if ok else 1)


@main.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option("--target", default="cpu", show_default=True,
              help="cpu (this host), cpu:<mcpu>, cuda or cuda:<sm_XX>")
@click.option("--max-seq", default=2048, show_default=True, help="context length (KV cache)")
@click.option("--no-weights", is_flag=True, help="kernels only; `kiln convert` adds weights")
@click.option("--quant", metavar="PRESET",
              help="w8 (int8), w4g32 | w4g64 | w4g128 (int4 with zero points; the LM head and "
                   "q/k/v at int8), suffix s: symmetric; kv8 (int8 KV cache); modifiers "
                   "-kv8, -pure (every weight int4), -rtn (no GPTQ), -a8 (int8 activations): "
                   "w4g32-kv8")
@click.option("--quant-keep", "quant_keep", multiple=True, metavar="PATTERN",
              help="keep matching layers (node/param names, fnmatch; 'lm_head') in fp32")
@click.option("--arch", help="CUDA arch (default sm_90a; sm_90, sm_80 ...): same as "
                             "--target cuda:<arch>")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="compute dtype on CUDA (default float16; accumulation stays float32)")
@click.option("--tuning", type=click.Path(path_type=Path),
              help="kernel schedules measured by `kiln tune` (a database for another target or "
                   "kiln version is ignored with a warning)")
@click.option("--sparsity", metavar="S",
              help="prune linear weights: a fraction of every row (0.5) or N:M along the input "
                   "dimension (2:4); embeddings and the LM head stay dense")
@click.option("--prune-method", "prune_method",
              type=click.Choice(["sparsegpt", "wanda", "magnitude"], case_sensitive=False),
              help="how --sparsity chooses what goes (default sparsegpt; sparsegpt and wanda "
                   "calibrate on kiln's calibration text)")
@click.option("--sparsity-keep", "sparsity_keep", multiple=True, metavar="PATTERN",
              help="keep matching layers (node/param names, fnmatch) dense")
@click.option("--force", is_flag=True,
              help="replace OUT if it is an artifact (else an existing OUT is refused)")
@click.option("--dump-ir", type=click.Path(path_type=Path),
              help="write the IR after each pass (the quantization and layout stages too)")
@click.option("--no-fuse", "no_fuse", multiple=True, metavar="NAME",
              type=click.Choice([*FUSIONS, "all"]),
              help="leave out one fusion of those the target takes (repeatable; 'all': none), "
                   "for A/B runs: " + "; ".join(f"{k}: {v}" for k, v in FUSIONS.items()))
@quiet_option
def compile_cmd(model: Path, out: Path, target: str, max_seq: int, no_weights: bool,
                quant: str | None, quant_keep: tuple[str, ...], arch: str | None,
                dtype: str | None, tuning: Path | None, sparsity: str | None,
                prune_method: str | None, sparsity_keep: tuple[str, ...], force: bool,
                dump_ir: Path | None, no_fuse: tuple[str, ...], quiet: bool) -> None:
    """Compile MODEL (ONNX decoder) into an artifact directory OUT."""
    from kiln.compiler.compile import compile_model
    from kiln.compiler.progress import progress

    with progress(f"compiling {model.name}", quiet=quiet) as report:
        path = compile_model(model, out, target=f"{target}:{arch}" if arch else target,
                             max_seq=max_seq, weights=not no_weights, progress=report,
                             quant=quant, quant_keep=quant_keep, dtype=dtype, tuning=tuning,
                             sparsity=sparsity, prune_method=prune_method,
                             sparsity_keep=sparsity_keep, force=force, dump_ir=dump_ir,
                             no_fuse=no_fuse)
    click.echo(str(path))


@main.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
def verify_cmd(artifact: Path) -> None:
    """Check every file of ARTIFACT against its manifest (size, sha256) and every parameter
    against the manifest's table; exit 0 when all match, 2 naming the first that does not."""
    from kiln.runtime.verify import verify_artifact

    v = verify_artifact(artifact)
    total = sum(v.files.values())
    click.echo(f"{v.path}: {len(v.files)} files ({total / 1e6:.1f} MB) match their checksums; "
               f"{v.params} parameters match the manifest"
               + ("" if v.has_weights else "; no weights yet (compiled --no-weights)"))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="the tuning database (JSON) to write; resumed when it exists")
@click.option("--target", default="cpu", show_default=True,
              help="cpu (measured here), cuda or cuda:<sm_XX> (with --bundle)")
@click.option("--bundle", type=click.Path(path_type=Path),
              help="write a tuning bundle to measure on another host: "
                   "`python DIR/kiln_run.py tune -o TUNING.json` there")
@click.option("--budget-s", type=float, help="start no kernel after this many seconds")
@click.option("--threads", type=int, help="CPU threads (default: all usable cores)")
@click.option("--max-seq", default=512, show_default=True,
              help="context length; prefill kernels are tuned at min(max-seq, 512) rows and, "
                   "when it holds them, at 2048")
@click.option("--rows", metavar="N,N,...", callback=lambda ctx, param, v: _ints(v, "--rows"),
              help="prompt lengths to tune prefill kernels at (each gets its own prefill "
                   "entry in the compiled artifact)")
@click.option("--quant", metavar="PRESET", help="tune the kernels of this quantization preset")
@click.option("--sparsity", metavar="S",
              help="tune the kernels of an artifact compiled with --sparsity S (pruned here by "
                   "magnitude: the sparse kernels' shapes depend on the level, not on which "
                   "weights go)")
@click.option("--max-candidates", type=int,
              help="configs per kernel instance (default 12; the GEMM's space: all)")
@click.option("--only", metavar="KERNEL,...", callback=lambda ctx, param, v: _names(v),
              help="tune only these kernel families (e.g. cuda.decode_attention; "
                   "docs/tuning.md lists them); instances the -o file already holds are kept "
                   "(remove their entries to re-measure them)")
@click.option("--python", help="the GPU host's Python for --bundle (default 3.12)")
@quiet_option
def tune(model: Path, out: Path | None, target: str, bundle: Path | None,
         budget_s: float | None, threads: int | None, max_seq: int, rows: tuple | None,
         quant: str | None, sparsity: str | None, max_candidates: int | None,
         only: tuple | None, python: str | None, quiet: bool) -> None:
    """Measure the schedule candidates of MODEL's kernels and write the fastest per kernel and
    shape bucket; `kiln compile --tuning OUT` uses them (docs/tuning.md)."""
    from kiln.compiler.progress import progress
    from kiln.compiler.tuning import tune_model

    with progress(f"tuning {model.name}", quiet=quiet) as report:
        path = tune_model(model, out, target=target, bundle=bundle, budget_s=budget_s,
                          threads=threads, max_seq=max_seq, quant=quant,
                          sparsity=sparsity, rows=rows,
                          max_candidates=max_candidates, only=only, python=python,
                          progress=report)
    click.echo(str(path))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--artifact", type=click.Path(path_type=Path), required=True)
@quiet_option
def convert(model: Path, artifact: Path, quiet: bool) -> None:
    """Write the parameters of MODEL into an ARTIFACT compiled with --no-weights."""
    from kiln.compiler.compile import convert as convert_params
    from kiln.compiler.progress import progress

    with progress("converting parameters", quiet=quiet) as report:
        path = convert_params(model, artifact, progress=report)
    click.echo(str(path))


def _names(value: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of names, or None."""
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str | None, option: str) -> tuple[int, ...] | None:
    """A comma-separated list of positive integers, or None."""
    if value is None:
        return None
    try:
        return tuple(sorted({int(v) for v in value.split(",")}))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected integers separated by commas "
                                 f"(e.g. 512,2048)", param_hint=option) from None


def _decoding_options(f):
    """The options `run` and `chat` share: sampling, stopping, threads."""
    options = [
        click.option("--max-new-tokens", default=None, type=int,
                     help="tokens to generate at most  [default: 32; with --chat and in "
                          "`kiln chat`: 256]"),
        click.option("--greedy", is_flag=True,
                     help="argmax decoding (the default when no --temperature)"),
        click.option("--temperature", default=0.0, show_default=True),
        click.option("--top-k", default=0, show_default=True),
        click.option("--top-p", default=1.0, show_default=True),
        click.option("--seed", default=0, show_default=True),
        click.option("--ignore-eos", is_flag=True,
                     help="do not stop on the model's end-of-sequence tokens"),
        click.option("--stop-token", "stop_token_ids", type=int, multiple=True, metavar="ID",
                     help="also stop on this token id (repeatable; kept with --ignore-eos)"),
        click.option("--stop", "stop_texts", multiple=True, metavar="TEXT",
                     help="stop when the text contains TEXT, cut before it (repeatable)"),
        click.option("--system", help="the system message of the conversation"),
        click.option("--threads", type=int,
                     help="CPU threads  [default: all usable cores (affinity and cgroup quota)]"),
        click.option("--synthetic-weights", type=int, metavar="SEED",
                     help="seeded random weights of the right shapes (benchmarking)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", help="text, tokenized with the artifact's tokenizer.json")
@click.option("--prompt-ids", help="comma-separated token ids")
@click.option("--chat", is_flag=True,
              help="the prompt is a user message: apply the model's chat template, stop at the "
                   "end of the assistant's turn")
@_decoding_options
@click.option("--json", "as_json", is_flag=True, help="print one JSON object at the end")
def run(artifact: Path, prompt: str | None, prompt_ids: str | None, chat: bool,
        max_new_tokens: int | None, greedy: bool, temperature: float, top_k: int, top_p: float,
        seed: int, ignore_eos: bool, stop_token_ids: tuple[int, ...],
        stop_texts: tuple[str, ...], system: str | None, threads: int | None,
        synthetic_weights: int | None, as_json: bool) -> None:
    """Generate from a compiled ARTIFACT: streams text, prints speed to stderr; stops on the
    model's end-of-sequence tokens (generation_config.json, else config.json, else the
    tokenizer's), --stop-token ids and --stop texts."""
    from kiln.runtime.cli import run_generation

    run_generation(artifact, prompt=prompt, prompt_ids=prompt_ids,
                   max_new_tokens=(256 if chat else 32) if max_new_tokens is None
                   else max_new_tokens,
                   temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p,
                   seed=seed, threads=threads, synthetic_weights=synthetic_weights,
                   as_json=as_json, chat=chat, system=system, ignore_eos=ignore_eos,
                   stop_token_ids=stop_token_ids, stop_texts=stop_texts)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@_decoding_options
def chat(artifact: Path, max_new_tokens: int | None, greedy: bool, temperature: float,
         top_k: int, top_p: float, seed: int, ignore_eos: bool,
         stop_token_ids: tuple[int, ...], stop_texts: tuple[str, ...], system: str | None,
         threads: int | None, synthetic_weights: int | None) -> None:
    """Talk with ARTIFACT turn by turn (its chat template; the KV cache is kept between turns,
    so only each new turn is prefilled). /reset starts over; /exit or Ctrl-D ends."""
    from kiln.runtime.cli import run_chat

    run_chat(artifact, system=system,
             max_new_tokens=256 if max_new_tokens is None else max_new_tokens,
             temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p, seed=seed,
             threads=threads, synthetic_weights=synthetic_weights, ignore_eos=ignore_eos,
             stop_token_ids=stop_token_ids, stop_texts=stop_texts)


@main.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--vs-onnx", multiple=True, type=click.Path(path_type=Path),
              help="an ONNX file run by onnxruntime (repeatable)")
@click.option("--label", "labels", multiple=True,
              help="a name per engine, in order: artifacts, then --vs-onnx files (repeatable)")
@click.option("--prompt-lens", default="128,512", show_default=True)
@click.option("--decode-len", default=64, show_default=True)
@click.option("--threads", type=int,
              help="CPU threads of kiln and onnxruntime  [default: all usable cores]")
@click.option("--repeat", default=5, show_default=True)
@click.option("--synthetic-weights", type=int, metavar="SEED")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write results here")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="write a PNG chart")
@quiet_option
def bench(artifacts: tuple[Path, ...], vs_onnx: tuple[Path, ...], labels: tuple[str, ...],
          prompt_lens: str, decode_len: int, threads: int | None, repeat: int,
          synthetic_weights: int | None, json_path: Path | None, plot_path: Path | None,
          quiet: bool) -> None:
    """Benchmark ARTIFACTS (prefill, decode) side by side, and against onnxruntime on ONNX files,
    alternating between them; ratios are against the first artifact."""
    from kiln.compiler import bench as b
    from kiln.compiler.progress import progress

    lens = [int(x) for x in prompt_lens.split(",") if x]
    with progress("benchmarking", quiet=quiet) as report:
        report = b.bench(list(artifacts), list(vs_onnx), prompt_lens=lens,
                         decode_len=decode_len, threads=threads, repeat=repeat,
                         labels=list(labels), progress=report,
                         synthetic_weights=synthetic_weights)
    _print_bench(report)
    if json_path:
        json_path.write_text(json.dumps(report.to_dict(), indent=2))
    if plot_path:
        b.plot(report, plot_path)


def _print_bench(report) -> None:
    from rich.console import Console
    from rich.table import Table

    base = report.engines[0].label
    cases = list(dict.fromkeys((r.phase, r.tokens) for r in report.rows))
    t = Table("engine", "MB/token", "roofline", *(f"{p} {n}" for p, n in cases),
              title=f"tok/s, median of runs, {report.threads} threads (x: vs {base})")
    for e in report.engines:
        cells = []
        for phase, n in cases:
            rate, ratio = report.tok_s(e.label, phase, n), report.ratio(phase, n, e.label, base)
            cells.append("-" if rate is None else f"{rate:.1f}" if e.label == base or not ratio
                         else f"{rate:.1f} ({ratio:.2f}x)")
        t.add_row(e.label, f"{e.weight_bytes_per_token / 1e6:.1f}",
                  f"{report.roofline(e):.1f}", *cells)
    con = Console()
    con.print(t)
    con.print(f"memory read bandwidth {report.bandwidth_gb_s:.1f} GB/s; roofline = bandwidth / "
              "weight bytes read per decoded token")
    for e in report.engines:
        dec = next((r.tok_s for r in report.rows if r.engine == e.label and r.phase == "decode"),
                   None)
        if dec:
            con.print(f"{e.label}: decode at {100 * dec / report.roofline(e):.0f}% of its roofline")


@main.command("eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(path_type=Path),
              help="UTF-8 text to score (default: a public-domain passage shipped with kiln)")
@click.option("--reference", type=click.Path(path_type=Path),
              help="another artifact, or an ONNX file run by onnxruntime")
@click.option("--max-tokens", type=int, help="score only the first N tokens of the text")
@click.option("--stride", type=int, help="window step (default: half the context)")
@click.option("--threads", type=int, help="CPU threads (default: all usable cores)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@quiet_option
def eval_cmd(artifact: Path, text: Path | None, reference: Path | None, max_tokens: int | None,
             stride: int | None, threads: int | None, as_json: bool, quiet: bool) -> None:
    """Perplexity of ARTIFACT over a text (sliding windows over its context) and, with
    --reference, the mean KL(reference || artifact) and top-1 agreement per position."""
    from kiln.compiler.evaluation import evaluate_artifact
    from kiln.compiler.progress import progress

    with progress("scoring tokens", quiet=quiet, counted=True) as report:
        result = evaluate_artifact(artifact, text=text, reference=reference,
                                   max_tokens=max_tokens, stride=stride, threads=threads,
                                   progress=report.count)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['tokens']} tokens of {result['text']} (context {result['context']}, "
               f"stride {result['stride']}): perplexity {result['perplexity']:.4f}")
    if result["reference"]:
        click.echo(f"reference {result['reference']}: perplexity "
                   f"{result['reference_perplexity']:.4f}; KL(reference || artifact) "
                   f"{result['kl_divergence']:.3e} nats/token; top-1 agreement "
                   f"{result['top1_agreement']:.4f}")


@main.group()
def models() -> None:
    """Model sources: the real SmolLM2 and seeded synthetic configs."""


@models.command("export")
@click.argument("name", type=click.Choice(["smollm2"]))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@quiet_option
def models_export(name: str, out: Path, quiet: bool) -> None:
    """Convert a shipped model (GGUF) into an ONNX decoder plus tokenizer.json."""
    from kiln.compiler.progress import progress
    from kiln.models.smollm2 import export_smollm2

    with progress(f"exporting {name}", quiet=quiet) as report:
        path = export_smollm2(out, progress=report)
    click.echo(str(path))


@models.command("quantize-onnx")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option("--bits", default=4, show_default=True)
@click.option("--block-size", default=32, show_default=True)
@click.option("--accuracy-level", default=4, show_default=True,
              help="MatMulNBits accuracy_level (4: int8 activations on CPU; 0: leave unset)")
@click.option("--symmetric/--asymmetric", default=True, show_default=True)
@click.option("--tied-head/--no-tied-head", default=False, show_default=True,
              help="also quantize an LM head tied to the embedding table (a copy of it)")
@quiet_option
def models_quantize_onnx(model: Path, out: Path, bits: int, block_size: int, accuracy_level: int,
                         symmetric: bool, tied_head: bool, quiet: bool) -> None:
    """Quantize MODEL's MatMul weights with onnxruntime's MatMulNBitsQuantizer (the int4 peer
    of kiln's quantized artifacts)."""
    from kiln.compiler.frontend.onnx_quantize import quantize_onnx
    from kiln.compiler.progress import progress

    with progress(f"quantizing {model.name}", quiet=quiet):
        r = quantize_onnx(model, out, bits=bits, block_size=block_size,
                          accuracy_level=accuracy_level or None, symmetric=symmetric,
                          tied_head=tied_head)
    click.echo(f"{r.quantized} MatMul -> MatMulNBits; {len(r.left_float)} left float"
               + (f" ({', '.join(r.left_float[:3])}{', ...' if len(r.left_float) > 3 else ''})"
                  if r.left_float else ""))
    if r.tied_head:
        click.echo(f"tied LM head {r.tied_head}: "
                   + ("quantized (from a copy of the table)" if r.tied_head_quantized else
                      "left float (it reads the table through a Transpose; see --tied-head)"))
    click.echo(f"weights {r.bytes_before / 1e6:.1f} MB -> {r.bytes_after / 1e6:.1f} MB  {r.path}")


@models.command("synth")
@click.argument("name")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--weights/--no-weights", default=True, show_default=True,
              help="write the seeded weights too (else the graph alone)")
def models_synth(name: str, out: Path, seed: int, weights: bool) -> None:
    """Write a seeded synthetic model (llama-tiny, smollm2-135m, llama-3.2-1b, gpt2-tiny, ...)."""
    from kiln.models.synthetic import write_synthetic

    click.echo(str(write_synthetic(name, out, seed=seed, weights=weights)))


@main.command("package")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="the bundle folder to write")
@click.option("--python", default="3.12", show_default=True,
              help="the target host's Python (major.minor): picks the tvm-ffi wheel")
@click.option("--params/--no-params", default=True, show_default=True,
              help="ship the weights (without them: run with --synthetic-weights)")
@quiet_option
def package_cmd(artifact: Path, out: Path, python: str, params: bool, quiet: bool) -> None:
    """Bundle ARTIFACT with TVM's runtime, tvm-ffi and kiln's runtime into OUT, for a host with
    only Python and numpy: `python OUT/kiln_run.py run|bench|info`."""
    from kiln.compiler.package import package
    from kiln.compiler.progress import progress

    with progress("packaging", quiet=quiet) as report:
        bundle = package(artifact, out, python=python, params=params, progress=report)
    for part, size in bundle.sizes.items():
        click.echo(f"{part:24s} {size / 1e6:8.2f} MB")
    click.echo(f"{'total':24s} {bundle.total / 1e6:8.2f} MB  {bundle.path}")


if __name__ == "__main__":
    main()  # `python -m kiln.compiler.cli`
