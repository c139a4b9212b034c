"""The `kiln` command line: parses arguments and calls library functions; holds no logic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kiln.compiler.errors import KilnError, UnsupportedOps


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


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _canonicalize(model: Path, dump_ir: Path | None, *, weights_optional: bool):
    from kiln.compiler.driver import canonicalize

    console = _console()
    with console.status(f"importing {model.name}") as status:
        def on_pass(name, graph, seconds):
            status.update(f"{name}: {len(graph.nodes)} nodes ({seconds:.2f} s)")

        return canonicalize(model, dump_ir=dump_ir, weights_optional=weights_optional,
                            on_pass=on_pass)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="write the IR after each pass")
def inspect(model: Path, as_json: bool, dump_ir: Path | None) -> None:
    """Show the architecture kiln recognizes in MODEL and its op histograms."""
    from kiln.compiler.analysis import describe, generic_ops, ops_per_layer

    result = _canonicalize(model, dump_ir, weights_optional=True)
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


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch", default=1, show_default=True)
@click.option("--tolerance", default=1e-4, show_default=True,
              help="max |kiln - onnxruntime| / max |onnxruntime| per output")
def check(model: Path, as_json: bool, seed: int, batch: int, tolerance: float) -> None:
    """Compare kiln's interpreter with onnxruntime on MODEL (prefill and decode); exit 0 only
    when every output is within tolerance."""
    from kiln.compiler.analysis import describe
    from kiln.compiler.check import check_model

    result = _canonicalize(model, None, weights_optional=False)
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
def compile_cmd(model: Path, out: Path, target: str, max_seq: int, no_weights: bool) -> None:
    """Compile MODEL (ONNX decoder) into an artifact directory OUT."""
    from kiln.compiler.compile import compile_model

    console = _console()
    with console.status(f"compiling {model.name}") as status:
        path = compile_model(model, out, target=target, max_seq=max_seq,
                             weights=not no_weights, progress=status.update)
    click.echo(str(path))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--artifact", type=click.Path(path_type=Path), required=True)
def convert(model: Path, artifact: Path) -> None:
    """Write the parameters of MODEL into an ARTIFACT compiled with --no-weights."""
    from kiln.compiler.compile import convert as convert_params

    with _console().status("converting parameters") as status:
        click.echo(str(convert_params(model, artifact, progress=status.update)))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", help="text, tokenized with the artifact's tokenizer.json")
@click.option("--prompt-ids", help="comma-separated token ids")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--greedy", is_flag=True, help="argmax decoding (the default when no --temperature)")
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", type=int, help="CPU threads (default: all usable cores)")
@click.option("--synthetic-weights", type=int, metavar="SEED",
              help="seeded random weights of the right shapes (benchmarking)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object at the end")
def run(artifact: Path, prompt: str | None, prompt_ids: str | None, max_new_tokens: int,
        greedy: bool, temperature: float, top_k: int, top_p: float, seed: int,
        threads: int | None, synthetic_weights: int | None, as_json: bool) -> None:
    """Generate from a compiled ARTIFACT: streams text, prints speed to stderr."""
    from kiln.runtime.cli import run_generation

    run_generation(artifact, prompt=prompt, prompt_ids=prompt_ids,
                   max_new_tokens=max_new_tokens,
                   temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p,
                   seed=seed, threads=threads, synthetic_weights=synthetic_weights,
                   as_json=as_json)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--vs-onnx", type=click.Path(path_type=Path),
              help="the ONNX file, run by onnxruntime")
@click.option("--prompt-lens", default="128,512", show_default=True)
@click.option("--decode-len", default=64, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--repeat", default=5, show_default=True)
@click.option("--synthetic-weights", type=int, metavar="SEED")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write results here")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="write a PNG chart")
def bench(artifact: Path, vs_onnx: Path | None, prompt_lens: str, decode_len: int, threads: int,
          repeat: int, synthetic_weights: int | None, json_path: Path | None,
          plot_path: Path | None) -> None:
    """Benchmark ARTIFACT (prefill, decode) against onnxruntime on the same ONNX."""
    from kiln.compiler import bench as b

    lens = [int(x) for x in prompt_lens.split(",") if x]
    with _console().status("benchmarking") as status:
        report = b.bench(artifact, vs_onnx, prompt_lens=lens, decode_len=decode_len,
                         threads=threads, repeat=repeat, progress=status.update,
                         synthetic_weights=synthetic_weights)
    _print_bench(report)
    if json_path:
        json_path.write_text(json.dumps(report.to_dict(), indent=2))
    if plot_path:
        b.plot(report, plot_path)


def _print_bench(report) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("phase", "tokens", "kiln tok/s", "onnxruntime tok/s", "kiln / ort",
              title=f"median of runs, {report.threads} threads")
    for r in (r for r in report.rows if r.engine == "kiln"):
        o = next((x for x in report.rows if x.engine == "onnxruntime" and
                  (x.phase, x.tokens) == (r.phase, r.tokens)), None)
        ratio = report.ratio(r.phase, r.tokens)
        t.add_row(r.phase, str(r.tokens), f"{r.tok_s:.1f}", f"{o.tok_s:.1f}" if o else "-",
                  f"{ratio:.2f}x" if ratio else "-")
    con = Console()
    con.print(t)
    dec = next((r for r in report.rows if r.engine == "kiln" and r.phase == "decode"), None)
    con.print(f"memory read bandwidth {report.bandwidth_gb_s:.1f} GB/s; weights "
              f"{report.weight_bytes / 1e6:.0f} MB/token -> decode roofline "
              f"{report.roofline_tok_s:.1f} tok/s" + (
                  f"; kiln decode at {100 * dec.tok_s / report.roofline_tok_s:.0f}% of it"
                  if dec else ""))


@main.group()
def models() -> None:
    """Model sources: the real SmolLM2 and seeded synthetic configs."""


@models.command("export")
@click.argument("name", type=click.Choice(["smollm2"]))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
def models_export(name: str, out: Path) -> None:
    """Convert a shipped model (GGUF) into an ONNX decoder plus tokenizer.json."""
    from kiln.models.smollm2 import export_smollm2

    console = _console()
    with console.status(f"exporting {name}") as status:
        path = export_smollm2(out, progress=lambda msg: status.update(msg))
    click.echo(str(path))


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
def package_cmd(artifact: Path, out: Path, python: str, params: bool) -> None:
    """Bundle ARTIFACT with TVM's runtime, tvm-ffi and kiln's runtime into OUT, for a host with
    only Python and numpy: `python OUT/kiln_run.py run|bench|info`."""
    from kiln.compiler.package import package

    with _console().status("packaging") as status:
        bundle = package(artifact, out, python=python, params=params, progress=status.update)
    for part, size in bundle.sizes.items():
        click.echo(f"{part:24s} {size / 1e6:8.2f} MB")
    click.echo(f"{'total':24s} {bundle.total / 1e6:8.2f} MB  {bundle.path}")


if __name__ == "__main__":
    main()  # `python -m kiln.compiler.cli`
