"""Progress on stderr: timestamped phase lines on a non-terminal, a live line on a terminal,
nothing with --quiet; stdout keeps the command's result alone."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.compiler import progress as pg
from kiln.compiler.cli import main
from kiln.runtime import artifact as af

DATA = Path(__file__).parent.parent / "data"
MODEL = DATA / "llama-optimum.onnx"


def kiln(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def seconds(lines: list[str]) -> list[float]:
    return [float(re.match(r"^kiln: \[ *(\d+\.\d) s\]", line).group(1)) for line in lines]


@pytest.mark.tvm
def test_compile_prints_phases_on_a_non_terminal_and_convert_quiet_does_not(tmp_path):
    r = kiln("compile", MODEL, "-o", tmp_path / "a", "--max-seq", 32, "--no-weights")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path / "a")  # the result alone on stdout
    lines = r.stderr.strip().splitlines()
    assert all(pg.PLAIN_LINE.match(line) for line in lines), r.stderr
    text = [pg.PLAIN_LINE.sub("", line) for line in lines]
    assert text[:3] == ["compiling llama-optimum.onnx", "loading TVM",
                        "importing llama-optimum.onnx"]
    assert any(t.startswith("recognize_attention: ") for t in text)
    steps = ["generating kernels for cpu", "compiling kernels for cpu (LLVM)",
             "linking kernels.so", "writing parameters"]
    assert [t for t in text if t in steps] == steps
    assert text[-1] == "compiling llama-optimum.onnx: done"
    elapsed = seconds(lines)
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0
    assert af.open_artifact(tmp_path / "a").max_seq == 32

    r = kiln("convert", MODEL, "--artifact", tmp_path / "a", "--quiet")
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and r.stdout == f"{tmp_path / 'a' / af.PARAMS}\n"


def test_quiet_compile_prints_the_path_alone(tmp_path, monkeypatch):
    """The command's wiring, with compile_model replaced by one that reports two phases (the
    real one is run above)."""
    def fake_compile(model, out, *, progress, **options):
        progress("phase one")
        progress("phase two")
        return Path(out)

    monkeypatch.setattr("kiln.compiler.compile.compile_model", fake_compile)
    r = kiln("compile", MODEL, "-o", tmp_path / "a")
    assert [pg.PLAIN_LINE.sub("", line) for line in r.stderr.splitlines()] == [
        "compiling llama-optimum.onnx", "phase one", "phase two",
        "compiling llama-optimum.onnx: done"]
    r = kiln("compile", MODEL, "-o", tmp_path / "a", "--quiet")
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and r.stdout == f"{tmp_path / 'a'}\n"


def test_quiet_keeps_errors_and_inspect_json(tmp_path):
    r = kiln("inspect", tmp_path / "missing.onnx", "-q")
    assert r.exit_code == 2 and r.stderr.startswith("kiln: error: ") and \
        len(r.stderr.splitlines()) == 1, r.stderr
    r = kiln("inspect", MODEL, "--json", "--quiet")
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert '"nodes_after"' in r.stdout
    r = kiln("inspect", MODEL, "--json")
    assert r.exit_code == 0
    assert pg.PLAIN_LINE.sub("", r.stderr.splitlines()[-1]) == "importing llama-optimum.onnx: done"


def test_counted_work_is_rate_limited(monkeypatch, capsys):
    clock = iter([0.0, 0.0, 1.0, 2.0, 6.0, 6.5, 7.0, 7.0, 7.5])  # perf_counter, call by call
    monkeypatch.setattr(pg.time, "perf_counter", lambda: next(clock))
    with pg.progress("scoring tokens") as report:  # 0.0, 0.0: start; title line at 0.0
        report.count(10, 100)  # 1.0: within 5 s of the start, skipped
        report.count(50, 100)  # 2.0: skipped
        report.count(90, 100)  # 6.0: printed (6.5 for its stamp)
        report.count(100, 100)  # 7.0: the last count, printed (7.0)
    err = capsys.readouterr().err.splitlines()  # done line at 7.5
    assert err == ["kiln: [  0.0 s] scoring tokens", "kiln: [  6.5 s] scoring tokens: 90/100",
                   "kiln: [  7.0 s] scoring tokens: 100/100",
                   "kiln: [  7.5 s] scoring tokens: done"]


def test_a_terminal_gets_a_live_line_and_no_plain_lines(monkeypatch):
    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr("rich.console.Console",
                        lambda **kw: Console(file=screen, force_terminal=True, width=80))
    with pg.progress("compiling m.onnx") as report:
        report("generating and compiling kernels for cpu")
    shown = screen.getvalue()
    assert "generating and compiling kernels for cpu" in shown
    assert not any(pg.PLAIN_LINE.match(line) for line in shown.splitlines())
