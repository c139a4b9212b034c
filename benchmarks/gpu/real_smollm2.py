"""The real SmolLM2-135M on the GPU host: its weights made there, greedy tokens vs the CPU's.

    python benchmarks/gpu/real_smollm2.py prepare .device/real     # here (no GPU)
    python3 benchmarks/gpu/real_smollm2.py gpu .device/real         # on the GPU host

The weights exceed what one call to the GPU host may carry (model.onnx.data: 538 MB of float32),
so the host receives their source instead, the Q4_1 GGUF that `kiln models export smollm2`
reads (98 MB, in two parts sent by two calls to a warm machine), and runs the same exporter
there (kiln.models.smollm2, numpy and onnx; the `gguf` package travels with the parts). The
exported model.onnx.data must hash to the very bytes this host compiled from; the bundle's
converter (`kiln_run.py convert`, runtime-only) then writes each CUDA artifact's parameters.

`prepare` (here): the CUDA artifacts (float32, float16; --no-weights), the bundle, the GGUF's
parts and the reference: the CPU float32 artifact's greedy continuation of a text prompt (32
tokens) with, per step, its top two logits (the margin a lower precision must not cross).

`gpu` (there): rebuild and hash the weights, convert, then per artifact
- free-running greedy decoding of 32 tokens: equal to the CPU's? where they part, the CPU's
  margin (top-1 minus top-2 logit) at that step and the GPU's own;
- teacher-forced: the CPU's tokens fed to the GPU artifact, its argmax compared at every step
  (and the margins wherever they disagree), so one near-tie does not hide the steps after it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
STEPS = 32
DTYPES = ("float32", "float16")
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted "
          "from those used to make wine. Within fifty years")
PARTS = 2


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def greedy(session, ids: list[int], forced: list[int] | None = None) -> dict:
    """Greedy continuation (or, with `forced`, those tokens fed back): per step the argmax,
    the top-1 and top-2 logits."""
    logits = session.prefill(np.array(ids)[None], last_only=True)[0, -1]
    toks, top1, top2 = [], [], []
    for i in range(STEPS):
        order = np.argsort(logits)[::-1][:2]
        toks.append(int(order[0]))
        top1.append(float(logits[order[0]]))
        top2.append(float(logits[order[1]]))
        if i + 1 < STEPS:
            nxt = forced[i] if forced is not None else toks[-1]
            logits = session.decode([nxt])[0, -1].astype(np.float32)
    return {"tokens": toks, "top1": top1, "top2": top2}


# -- here ---------------------------------------------------------------------------------------

def prepare(out: Path, model: Path) -> None:
    from tokenizers import Tokenizer

    from kiln.compiler.compile import compile_model
    from kiln.compiler.package import package
    from kiln.models.smollm2 import gguf_path
    from kiln.runtime.session import Session

    out.mkdir(parents=True, exist_ok=True)
    arts = out / "arts"
    for dtype in DTYPES:
        dst = arts / f"smollm2-{dtype}"
        if not (dst / "manifest.json").is_file():
            t = time.perf_counter()
            compile_model(model, dst, target="cuda:sm_90", max_seq=2048, weights=False,
                          dtype=dtype)
            print(f"{dst.name}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
    if not (out / "bundle").is_dir():
        b = package(arts / f"smollm2-{DTYPES[0]}", out / "bundle", python="3.12", params=False)
        print(f"bundle: {b.total / 1e6:.1f} MB")

    cpu = out / "cpu-float32"  # the reference (not carried: it holds the weights)
    if not (cpu / "manifest.json").is_file():
        compile_model(model, cpu, max_seq=2048)
    ids = Tokenizer.from_file(str(model.parent / "tokenizer.json")).encode(PROMPT).ids
    s = Session.load(cpu)
    ref = greedy(s, ids)
    ref["forced"] = greedy(s, ids, forced=ref["tokens"])["tokens"]
    assert ref["forced"] == ref["tokens"]
    src = gguf_path()
    (out / "reference.json").write_text(json.dumps({
        "prompt": PROMPT, "prompt_ids": ids, **ref, "gguf_sha256": sha256(src),
        "weights_sha256": sha256(model.parent / "model.onnx.data")}, indent=1))

    parts = out / "gguf"
    parts.mkdir(exist_ok=True)
    data = src.read_bytes()
    step = -(-len(data) // PARTS)
    for i in range(PARTS):
        (parts / f"part{i}").write_bytes(data[i * step:(i + 1) * step])
    import gguf

    pylib = out / "pylib"
    shutil.rmtree(pylib, ignore_errors=True)
    shutil.copytree(Path(gguf.__file__).parent, pylib / "gguf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    print(f"reference: {len(ids)} prompt tokens -> {ref['tokens']}")
    for p in sorted(out.iterdir()):
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() \
            else p.stat().st_size
        print(f"  {p.name}: {size / 2**20:.1f} MiB")


# -- the GPU host -------------------------------------------------------------------------------

def make_weights(out: Path, ref: dict) -> Path:
    """The GGUF from its parts, exported by kiln's own exporter to /tmp; both hashes checked."""
    work = Path("/tmp/real_smollm2")
    work.mkdir(exist_ok=True)
    src = work / "model.gguf"
    with open(src, "wb") as f:
        for i in range(PARTS):
            f.write((out / "gguf" / f"part{i}").read_bytes())
    if sha256(src) != ref["gguf_sha256"]:
        sys.exit(f"{src}: sha256 differs from the GGUF this host's reference came from")
    shim = work / "shim" / "kiln"  # `kiln.models` from the checkout, without installing kiln
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text("")
    if not (shim / "models").exists():
        (shim / "models").symlink_to(REPO / "models")
    t = time.perf_counter()
    code = ("import sys; from kiln.models.smollm2 import export_smollm2; "
            f"export_smollm2({str(work / 'onnx')!r}, gguf_file={str(src)!r})")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": f"{work / 'shim'}:{out / 'pylib'}"})
    data = work / "onnx" / "model.onnx.data"
    same = sha256(data) == ref["weights_sha256"]
    print(f"weights: exported from the GGUF in {time.perf_counter() - t:.0f} s, "
          f"{data.stat().st_size / 1e6:.0f} MB, sha256 equal to the CPU host's: {same}",
          flush=True)
    if not same:
        sys.exit("the exported weights differ from those the reference was computed with")
    return data


def report(dtype: str, ref: dict, run: dict, forced: dict) -> list[str]:
    got, want = np.array(run["tokens"]), np.array(ref["tokens"])
    same = got == want
    first = int(np.argmin(same)) if not same.all() else None
    lines = [f"{dtype}: greedy {int(np.cumprod(same).sum())}/{STEPS} equal before the first "
             f"difference" + ("" if first is None else f" (step {first}: GPU {got[first]} vs "
                              f"CPU {want[first]}; CPU margin there "
                              f"{ref['top1'][first] - ref['top2'][first]:.4f}, GPU margin "
                              f"{run['top1'][first] - run['top2'][first]:.4f})")]
    f = np.array(forced["tokens"]) == want
    lines.append(f"{dtype}: teacher-forced, argmax equal at {int(f.sum())}/{STEPS} steps")
    for i in np.flatnonzero(~f):
        lines.append(f"    step {i}: GPU {forced['tokens'][i]} vs CPU {want[i]}, CPU margin "
                     f"{ref['top1'][i] - ref['top2'][i]:.4f}")
    top1 = np.abs(np.array(forced["top1"]) - np.array(ref["top1"]))
    lines.append(f"{dtype}: teacher-forced top-1 logit |GPU - CPU| max {top1.max():.2e}, "
                 f"median {np.median(top1):.2e}")
    return lines


def gpu(out: Path) -> None:
    ref = json.loads((out / "reference.json").read_text())
    data = make_weights(out, ref)
    bundle = out / "bundle"
    results, lines = {}, []
    for dtype in DTYPES:
        dst = Path(f"/tmp/real_smollm2/smollm2-{dtype}")
        shutil.rmtree(dst, ignore_errors=True)
        subprocess.run([sys.executable, str(bundle / "kiln_run.py"), "convert", "--artifact",
                        str(out / "arts" / f"smollm2-{dtype}"), "--weights", str(data),
                        "--out", str(dst)], check=True)
    sys.path.insert(0, str(HERE.parent))
    from cuda_llm import enter_bundle

    enter_bundle(bundle)
    from kiln.runtime.session import Session

    for dtype in DTYPES:
        s = Session.load(f"/tmp/real_smollm2/smollm2-{dtype}")
        run = greedy(s, ref["prompt_ids"])
        forced = greedy(s, ref["prompt_ids"], forced=ref["tokens"])
        results[dtype] = {"free": run, "forced": forced}
        lines += report(dtype, ref, run, forced)
    print("\n".join(lines))
    (out / "gpu_result.json").write_text(json.dumps(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("prepare", "gpu"))
    p.add_argument("out", type=Path)
    p.add_argument("--model", type=Path, default=Path("/work/smollm2/model.onnx"))
    a = p.parse_args()
    prepare(a.out, a.model) if a.command == "prepare" else gpu(a.out)


if __name__ == "__main__":
    main()
