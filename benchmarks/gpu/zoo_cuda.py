"""Every zoo architecture on the CUDA target: build here (no GPU), check on the GPU host.

    python benchmarks/gpu/zoo_cuda.py build .device/zoo [--zoo DIR]... [--dtypes D,D] [NAME...]
    python3 benchmarks/gpu/zoo_cuda.py check .device/zoo        # on the GPU host, one call

`build` compiles each ONNX export of tests/data/zoo (and of every --zoo DIR, written by
`python -m kiln.models.zoo DIR`) for cuda:sm_90 in each dtype, with its real (tiny, seeded)
weights, into ROOT/arts/NAME-DTYPE, writes its canonical graph beside it (graph.json, for
torch_ref.py) and packages one bundle (ROOT/bundle: runtime-only TVM, kiln's runtime; the
artifacts are loaded from ROOT/arts). Exports the CUDA target refuses are listed in
ROOT/build.json with the refusal. `--target cpu` builds CPU artifacts instead (ROOT/arts holds
them; the reference then reads the unpacked weights saved beside each, ref_params.npz): the
host-side part of `check` can be run here on them.

`check`: per artifact, the kiln artifact (in the bundle: runtime-only TVM, no torch) against a
float64 torch run of its canonical graph with exactly the artifact's parameters
(benchmarks/gpu/torch_ref.py), on the GPU: logits of prefill at prompt lengths CHECK_LENS
(rows 0, n/2, n-1 and the last-only entry) and 32 greedy decode steps after a 9-token prompt
(prefill + decode through the KV cache; the reference recomputes the whole sequence each step).
One line per artifact: worst relative error of the prefill logits, decode logits' relative
error before any divergence, the least top-1 agreement, greedy tokens equal out of 32 (and
the device argmax = host argmax), then a summary. The torch reference runs in one process for
all artifacts, kiln in one process per artifact (several at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))
import torch_ref  # noqa: E402

SEED = 7
MAX_SEQ = 128  # the zoo's position tables hold 128 positions
CHECK_LENS = (1, 9, 40, 100)
GREEDY_PROMPT = 9
DECODE_STEPS = 32


# -- here: build --------------------------------------------------------------------------------

def sources(zoo_dirs: list[Path], names: list[str]) -> list[Path]:
    """The ONNX exports, one per stem (a later directory's export replaces an earlier one)."""
    found: dict[str, Path] = {}
    for d in [REPO / "tests" / "data" / "zoo", *zoo_dirs]:
        for p in sorted(d.glob("*.onnx")):
            found[p.stem] = p
    return [p for stem, p in sorted(found.items())
            if not names or stem in names or stem.split("-")[0] in names]


def build(root: Path, zoo_dirs: list[Path], dtypes: list[str], names: list[str],
          target: str) -> None:
    from kiln.compiler.compile import compile_graph, compile_model
    from kiln.compiler.errors import KilnError
    from kiln.compiler.package import package

    arts = root / "arts"
    arts.mkdir(parents=True, exist_ok=True)
    record = json.loads((root / "build.json").read_text()) if (root / "build.json").is_file() \
        else {}
    for src in sources(zoo_dirs, names):
        graph = None
        for dtype in dtypes if target == "cuda" else ["float32"]:
            name = f"{src.stem}-{dtype}"
            t = time.perf_counter()
            try:
                dst = compile_model(src, arts / name, target="cuda:sm_90" if target == "cuda"
                                    else "cpu", max_seq=MAX_SEQ, dtype=dtype
                                    if target == "cuda" else None, force=True)
            except KilnError as e:
                record[name] = {"ok": False, "error": str(e).splitlines()[0]}
                print(f"{name}: refused: {record[name]['error']}", flush=True)
                continue
            if graph is None:
                graph = compile_graph(src, max_seq=MAX_SEQ, progress=lambda m: None,
                                      weights_optional=target == "cuda")
            (dst / "graph.json").write_text(json.dumps(torch_ref.graph_json(graph)))
            if target == "cpu":  # packed in the artifact: the reference reads these
                np.savez(dst / "ref_params.npz", **{k: p.load() for k, p in graph.params.items()})
            size = sum(f.stat().st_size for f in dst.iterdir())
            record[name] = {"ok": True, "seconds": round(time.perf_counter() - t, 1),
                            "bytes": size}
            print(f"{name}: compiled in {record[name]['seconds']} s, {size / 1e6:.2f} MB",
                  flush=True)
    (root / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    first = next(a for a in sorted(arts.iterdir()) if (a / "manifest.json").is_file())
    b = package(first, root / "bundle", python=f"{sys.version_info[0]}.{sys.version_info[1]}"
                if target == "cpu" else "3.12", params=False)
    print(f"bundle {b.path}: {b.total / 1e6:.1f} MB")


# -- the GPU host -------------------------------------------------------------------------------

def prompts(vocab: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {n: rng.integers(0, vocab, n) for n in CHECK_LENS}


def greedy_prompt(vocab: int) -> np.ndarray:
    return np.random.default_rng(SEED + 1).integers(0, vocab, GREEDY_PROMPT)


def kiln_outputs(art: Path) -> dict[str, np.ndarray]:
    """Prefill logits per prompt length, 32 greedy steps (host and device argmax)."""
    from cuda_llm import session_outputs

    from kiln.runtime.session import Session

    s = Session.load(art)
    return session_outputs(s, prompts(s.vocab), greedy_prompt(s.vocab), DECODE_STEPS)


def reference_params(art: Path) -> dict[str, np.ndarray]:
    """Exactly the artifact's parameters (stored dtype), or for a CPU artifact the unpacked
    weights saved beside it."""
    if (art / "ref_params.npz").is_file():
        return dict(np.load(art / "ref_params.npz"))
    from kiln.runtime.params import read_safetensors

    arrays: dict[str, np.ndarray] = {}
    for f in ("constants.safetensors", "params.safetensors"):
        if (art / f).is_file():
            arrays.update(read_safetensors(art / f))
    return arrays


def torch_outputs(art: Path, device) -> dict[str, np.ndarray]:
    """The same as kiln_outputs, from torch_ref in float64."""
    import torch

    graph = json.loads((art / "graph.json").read_text())
    params = torch_ref.as_float64(reference_params(art), device)
    vocab = json.loads((art / "manifest.json").read_text())["architecture"]["vocab"]
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for n, ids in prompts(vocab).items():
            logits = torch_ref.forward(graph, params, ids, device)
            out[f"prefill{n}"] = logits[[0, n // 2, n - 1]].float().cpu().numpy()
            out[f"last{n}"] = logits[-1].float().cpu().numpy()
        ids = list(greedy_prompt(vocab))
        toks, steps = [], []
        tok = int(torch_ref.forward(graph, params, np.array(ids), device)[-1].argmax())
        for _ in range(DECODE_STEPS):
            toks.append(tok)
            ids.append(tok)
            step = torch_ref.forward(graph, params, np.array(ids), device)[-1]
            steps.append(step.float().cpu().numpy())
            tok = int(step.argmax())
    out["greedy"], out["decode_logits"] = np.array(toks), np.stack(steps)
    return out


def summary_line(name: str, got: dict, ref: dict) -> tuple[str, bool]:
    keys = [k for k in ref if k.startswith(("prefill", "last"))]
    rel = max(float(np.linalg.norm(got[k] - ref[k]) / np.linalg.norm(ref[k])) for k in keys)
    top1 = min(float(np.mean(got[k].argmax(-1) == ref[k].argmax(-1))) for k in keys)
    same = got["greedy"] == ref["greedy"]
    first = int(np.argmin(same)) if not same.all() else DECODE_STEPS
    n = max(first, 1)
    drel = float(np.linalg.norm(got["decode_logits"][:n] - ref["decode_logits"][:n])
                 / np.linalg.norm(ref["decode_logits"][:n]))
    device = bool((got["greedy_device"] == got["greedy"]).all())
    nan = any(bool(np.isnan(got[k]).any()) for k in keys)
    ok = (not nan and device and first == DECODE_STEPS and top1 == 1.0
          and rel < (2e-2 if "float16" in name or "bfloat16" in name else 1e-4))
    return (f"{'ok  ' if ok else 'FAIL'} {name:32s} prefill rel err {rel:.2e}  decode rel err "
            f"{drel:.2e}  top-1 {top1:.2f}  greedy {int(same.sum())}/{DECODE_STEPS}"
            + (f" (first divergence at {first})" if first < DECODE_STEPS else "")
            + f"  device argmax {'=' if device else '!='} host" + ("  NaN" if nan else ""), ok)


def check(root: Path, only: str, workers: int) -> int:
    arts = [a for a in sorted((root / "arts").iterdir())
            if (a / "manifest.json").is_file() and only in a.name]
    results = root / "results"
    results.mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(root / "bundle" / "kiln_run.py"), "info"],
                   capture_output=True, check=True)  # unpacks the bundle's wheel once
    t0 = time.perf_counter()
    ref_job = subprocess.Popen([sys.executable, str(HERE), "torch-ref", str(root), only],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def kiln_one(art: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(HERE), "kiln-out", str(root), art.name],
                              capture_output=True, text=True)

    with ThreadPoolExecutor(workers) as pool:
        kiln_runs = dict(zip(arts, pool.map(kiln_one, arts), strict=True))
    ref_log = ref_job.communicate()[0]
    print(f"kiln and torch runs: {time.perf_counter() - t0:.1f} s")
    passed = 0
    for art in arts:
        k = kiln_runs[art]
        kf, rf = results / f"kiln-{art.name}.npz", results / f"ref-{art.name}.npz"
        if k.returncode or not kf.is_file():
            print(f"FAIL {art.name:32s} kiln failed:\n{(k.stdout + k.stderr)[-3000:]}")
            continue
        if not rf.is_file():
            print(f"FAIL {art.name:32s} no torch reference (see its log below)")
            continue
        line, ok = summary_line(art.name, dict(np.load(kf)), dict(np.load(rf)))
        passed += ok
        print(line, flush=True)
    if "FAIL" in ref_log or "Traceback" in ref_log:
        print("torch reference log:\n" + ref_log[-4000:])
    record = root / "build.json"
    refused = {k: v for k, v in json.loads(record.read_text()).items()
               if not v["ok"]} if record.is_file() else {}
    for name, v in refused.items():
        print(f"REFUSED at build {name}: {v['error']}")
    print(f"summary: {passed}/{len(arts)} artifacts match torch float64 (greedy "
          f"{DECODE_STEPS}/{DECODE_STEPS}, top-1 1.00); {len(refused)} refused at build")
    return 0 if passed == len(arts) else 1


def torch_refs(root: Path, only: str) -> None:
    import torch

    sys.path.insert(0, str(root / "bundle" / "lib"))  # kiln.runtime.params (safetensors)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for art in sorted((root / "arts").iterdir()):
        if not (art / "manifest.json").is_file() or only not in art.name:
            continue
        try:
            t = time.perf_counter()
            np.savez(root / "results" / f"ref-{art.name}.npz", **torch_outputs(art, device))
            print(f"{art.name}: reference in {time.perf_counter() - t:.1f} s", flush=True)
        except Exception as e:  # one graph the reference cannot run: say so, go on
            print(f"FAIL {art.name}: {type(e).__name__}: {e}", flush=True)


def enter_bundle(bundle: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kiln_run", bundle / "kiln_run.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.setup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["build", "check", "torch-ref", "kiln-out"])
    p.add_argument("root", type=Path)
    p.add_argument("rest", nargs="*")
    p.add_argument("--zoo", type=Path, action="append", default=[])
    p.add_argument("--dtypes", default="float16,float32")
    p.add_argument("--target", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--only", default="", help="check: artifacts whose name contains this")
    p.add_argument("--workers", type=int, default=6)
    a = p.parse_intermixed_args()
    if a.mode == "build":
        build(a.root, a.zoo, a.dtypes.split(","), a.rest, a.target)
    elif a.mode == "check":
        return check(a.root, a.only, a.workers)
    elif a.mode == "torch-ref":
        torch_refs(a.root, a.rest[0] if a.rest else "")
    elif a.mode == "kiln-out":
        enter_bundle(a.root / "bundle")
        art = a.root / "arts" / a.rest[0]
        np.savez(a.root / "results" / f"kiln-{art.name}.npz", **kiln_outputs(art))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
