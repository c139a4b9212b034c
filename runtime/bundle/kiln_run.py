"""Launcher of a kiln bundle: `python BUNDLE/kiln_run.py run|chat|bench|convert|tune|info ...` on a
host with only Python and numpy (tokenizers too, for text prompts).

The bundle holds (see kiln.compiler.package):
    kiln_run.py    this file
    bundle.json    what is inside, and the Python it was made for
    artifact/      the compiled artifact (`convert --weights` writes its parameters when it
                   was compiled --no-weights)
    tuning/        instead of artifact/ in a tuning bundle (`kiln tune --bundle`): candidate
                   kernels and their plan, which `tune -o TUNING.json` measures
    lib/           tvm (runtime only), kiln's runtime, typing_extensions
    wheels/        the apache-tvm-ffi wheel for that Python
    site/          that wheel unzipped, on the first run (elsewhere if the bundle is read-only)

Only the standard library is imported until the bundle's folders are on the import path.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
LIB = HERE / "lib"
#: what the launcher's wheel extraction leaves out: C sources of a vendored library
_SKIP_IN_WHEEL = ("tvm_ffi/3rdparty/",)


class _BundleFinder:
    """Imports `kiln`, `tvm` and `tvm_ffi` from the bundle even where others are installed
    (an editable kiln's finder, or a full tvm, would otherwise win), and keeps torch out:
    tvm-ffi imports it wherever it is installed, which costs seconds, may build an extension,
    and loads torch's libcudart in place of the bundled one. kiln's runtime never uses it."""

    roots: ClassVar[dict[str, Path]] = {}
    blocked: ClassVar[frozenset[str]] = frozenset({"torch"})

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in cls.blocked:
            raise ModuleNotFoundError(f"{name} is not used by kiln bundles", name=name)
        root = cls.roots.get(top)
        if root is None:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path or [str(root)])


def fail(message: str) -> None:
    sys.stderr.write(f"kiln_run: error: {message}\n")
    sys.exit(2)


def unpack_wheel(wheel: Path) -> Path:
    """The wheel unzipped (once) into BUNDLE/site, or into a user cache if the bundle is
    read-only; an interrupted unzip is never taken for a complete one."""
    for site in (HERE / "site", Path.home() / ".cache" / "kiln" / "bundle-site" / wheel.stem):
        done = site / ".complete"
        if done.is_file() and done.read_text() == wheel.name:
            return site
        try:
            site.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".site-", dir=site.parent))
        except OSError:
            continue
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp, [n for n in z.namelist() if not n.startswith(_SKIP_IN_WHEEL)])
        (tmp / ".complete").write_text(wheel.name)
        if site.exists():
            import shutil

            shutil.rmtree(site)
        os.replace(tmp, site)
        return site
    fail(f"cannot unzip {wheel.name}: neither {HERE} nor ~/.cache is writable")
    raise AssertionError  # unreachable


def setup() -> dict:
    """Check the Python version, unzip the wheel, and route imports into the bundle."""
    info = json.loads((HERE / "bundle.json").read_text())
    want = info["python"]
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if have != want:
        fail(f"this bundle was made for Python {want} (its tvm-ffi wheel is {info['ffi_wheel']}); "
             f"this is Python {have}: run it with python{want}, or repackage with "
             f"--python {have}")
    site = unpack_wheel(HERE / "wheels" / info["ffi_wheel"])
    sys.path[:0] = [str(site), str(LIB)]
    _BundleFinder.roots = {"kiln": LIB, "tvm": LIB, "tvm_ffi": site}
    sys.meta_path.insert(0, _BundleFinder)
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"  # never look for the compiler library
    os.environ.pop("TVM_LIBRARY_PATH", None)
    return info


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiln_run.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate from the bundled artifact (as `kiln run`)")
    run.add_argument("--prompt", help="text, tokenized with the artifact's tokenizer.json")
    run.add_argument("--prompt-ids", help="comma-separated token ids")
    run.add_argument("--chat", action="store_true", help="the prompt is a user message: apply "
                     "the model's chat template (needs jinja2), stop at the end of the turn")
    chat = sub.add_parser("chat", help="talk turn by turn, the KV cache kept (as `kiln chat`)")
    for cmd in (run, chat):
        cmd.add_argument("--max-new-tokens", type=int,
                         help="default: 32; with --chat and in chat: 256")
        cmd.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
        cmd.add_argument("--temperature", type=float, default=0.0)
        cmd.add_argument("--top-k", type=int, default=0)
        cmd.add_argument("--top-p", type=float, default=1.0)
        cmd.add_argument("--seed", type=int, default=0)
        cmd.add_argument("--ignore-eos", action="store_true",
                         help="do not stop on the model's end-of-sequence tokens")
        cmd.add_argument("--stop-token", dest="stop_token_ids", type=int, action="append",
                         default=[], metavar="ID", help="also stop on this token id")
        cmd.add_argument("--stop", dest="stop_texts", action="append", default=[],
                         metavar="TEXT", help="stop when the text contains TEXT")
        cmd.add_argument("--system", help="the system message of the conversation")
    bench = sub.add_parser("bench", help="prefill and decode tok/s on the artifact's device")
    bench.add_argument("--prompt-lens", default="128,512")
    bench.add_argument("--decode-len", type=int, default=64)
    bench.add_argument("--decode-after", default="16",
                       help="cached tokens before the decode steps (one decode row each)")
    bench.add_argument("--repeat", type=int, default=5)
    bench.add_argument("--json", dest="json_path", type=Path, help="write the results here")
    for cmd in (run, chat, bench):
        cmd.add_argument("--artifact", type=Path, default=HERE / "artifact")
        cmd.add_argument("--threads", type=int, help="CPU threads (CPU artifacts; default: "
                         "all usable cores)")
        cmd.add_argument("--synthetic-weights", type=int, metavar="SEED",
                         help="seeded random weights of the right shapes")
    run.add_argument("--json", dest="as_json", action="store_true",
                     help="print one JSON object at the end")
    conv = sub.add_parser("convert", help="write the artifact's parameters from the model's "
                          "weights (an artifact compiled --no-weights; as `kiln convert`)")
    conv.add_argument("--weights", type=Path, required=True,
                      help="the model's external data file (model.onnx.data), or its folder")
    conv.add_argument("--out", type=Path, help="write a converted copy of the artifact here "
                      "(else it is converted in place)")
    conv.add_argument("--artifact", type=Path, default=HERE / "artifact")
    tune = sub.add_parser("tune", help="measure a tuning bundle's candidate kernels and write "
                          "the tuning database (`kiln compile --tuning` reads it)")
    tune.add_argument("-o", "--out", type=Path, required=True,
                      help="the database to write (resumed when it exists)")
    tune.add_argument("--budget-s", type=float, help="start no kernel after this many seconds")
    tune.add_argument("--repeat", type=int, default=7, help="timed repeats (median)")
    tune.add_argument("--threads", type=int, help="CPU threads (default: all usable cores)")
    sub.add_parser("info", help="what the bundle holds, and where its imports come from")
    return p.parse_args(argv)


def cmd_run(a: argparse.Namespace) -> None:
    from kiln.runtime.cli import run_generation

    run_generation(a.artifact, prompt=a.prompt, prompt_ids=a.prompt_ids,
                   max_new_tokens=(256 if a.chat else 32) if a.max_new_tokens is None
                   else a.max_new_tokens,
                   temperature=0.0 if a.greedy else a.temperature, top_k=a.top_k,
                   top_p=a.top_p, seed=a.seed, threads=a.threads,
                   synthetic_weights=a.synthetic_weights, as_json=a.as_json, chat=a.chat,
                   system=a.system, ignore_eos=a.ignore_eos, stop_token_ids=a.stop_token_ids,
                   stop_texts=a.stop_texts)


def cmd_chat(a: argparse.Namespace) -> None:
    from kiln.runtime.cli import run_chat

    run_chat(a.artifact, system=a.system,
             max_new_tokens=256 if a.max_new_tokens is None else a.max_new_tokens,
             temperature=0.0 if a.greedy else a.temperature, top_k=a.top_k, top_p=a.top_p,
             seed=a.seed, threads=a.threads, synthetic_weights=a.synthetic_weights,
             ignore_eos=a.ignore_eos, stop_token_ids=a.stop_token_ids,
             stop_texts=a.stop_texts)


def cmd_bench(a: argparse.Namespace, info: dict) -> None:
    from kiln.runtime.bundle.bench import bench, format_report

    seed = a.synthetic_weights
    if seed is None and not info.get("params", True):
        seed = 0  # the bundle ships no weights: synthesize them
    report = bench(a.artifact, prompt_lens=[int(x) for x in a.prompt_lens.split(",") if x],
                   decode_len=a.decode_len, repeat=a.repeat, synthetic_weights=seed,
                   threads=a.threads,
                   decode_after=[int(x) for x in a.decode_after.split(",") if x])
    print(format_report(report))
    if a.json_path:
        a.json_path.write_text(json.dumps(report.to_dict(), indent=2))


def cmd_convert(a: argparse.Namespace, info: dict) -> None:
    from kiln.runtime.convert import convert_artifact

    out = convert_artifact(a.artifact, a.weights, out=a.out,
                           progress=lambda msg: sys.stderr.write(f"kiln_run: {msg}\n"))
    if a.out is None and a.artifact.resolve() == (HERE / "artifact").resolve():
        tmp = HERE / "bundle.json.tmp"  # the bundle now holds parameters (bench uses them)
        tmp.write_text(json.dumps({**info, "params": True}, indent=2))
        os.replace(tmp, HERE / "bundle.json")
    print(out)


def cmd_tune(a: argparse.Namespace, info: dict) -> None:
    from kiln.runtime.tune import measure

    if not info.get("tuning"):
        fail("this bundle holds an artifact, not a tuning plan (make one with `kiln tune "
             "MODEL --bundle DIR`)")
    measure(HERE / info["tuning"], a.out, budget_s=a.budget_s, repeat=a.repeat,
            threads=a.threads, progress=lambda msg: sys.stderr.write(f"kiln_run: {msg}\n"))
    print(a.out)


def cmd_info(info: dict) -> None:
    from kiln.runtime.tvm_runtime import import_tvm

    tvm = import_tvm()
    import kiln.runtime

    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    print(json.dumps({**info, "tvm": tvm.__file__, "kiln": kiln.runtime.__file__,
                      "tvm_ffi": sys.modules["tvm_ffi"].__file__,
                      "compiler_loaded": "libtvm_compiler" in maps}, indent=2))


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    info = setup()
    from kiln.compiler.errors import KilnError

    try:
        if args.command == "run":
            cmd_run(args)
        elif args.command == "chat":
            cmd_chat(args)
        elif args.command == "bench":
            cmd_bench(args, info)
        elif args.command == "convert":
            cmd_convert(args, info)
        elif args.command == "tune":
            cmd_tune(args, info)
        else:
            cmd_info(info)
    except KilnError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
