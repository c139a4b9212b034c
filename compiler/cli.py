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


if __name__ == "__main__":
    main()  # `python -m kiln.compiler.cli`
