"""The compiled artifact end to end on the CPU: logits and greedy tokens against onnxruntime,
prefill/decode consistency, the runtime without TVM's compiler, and refusal of bad artifacts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af
from kiln.runtime.session import Session
from tests.helpers import assert_close

pytestmark = pytest.mark.tvm

DATA = Path(__file__).parent.parent / "data"
FIXTURES = ["llama-optimum", "qwen2-dynamo", "gpt2-optimum", "llama-dynamo", "qwen2-optimum",
            "gpt2-dynamo"]
MAX_SEQ = 320


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Each fixture compiled once for this CPU (artifact paths by fixture name)."""
    from kiln.compiler.compile import compile_model

    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:  # GPT-2's learned positions stop at 256
            cache[name] = compile_model(DATA / f"{name}.onnx", root / name,
                                        max_seq=256 if name.startswith("gpt2") else MAX_SEQ)
        return cache[name]

    return get


def ort_logits(model: Path, ids: np.ndarray, past=None, past_len: int = 0):
    """onnxruntime on the ONNX file: logits and presents for `ids` after `past_len` tokens."""
    from kiln.compiler.frontend.onnxruntime_ref import model_io, run_onnxruntime

    inputs, _ = model_io(model)
    b, s = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, past_len + s), np.int64),
             "position_ids": np.broadcast_to(np.arange(past_len, past_len + s), (b, s)).copy()}
    for info in inputs:
        if info.name.startswith("past_key_values"):
            kv = int(info.dims[1])
            d = int(info.dims[3])
            feeds[info.name] = (past[info.name.replace("past_key_values", "present")]
                                if past is not None else np.zeros((b, kv, 0, d), np.float32))
    return run_onnxruntime(model, {k: v for k, v in feeds.items()
                                   if k in {i.name for i in inputs}})


def ort_greedy(model: Path, prompt: np.ndarray, steps: int) -> list[int]:
    out = ort_logits(model, prompt)
    tokens, past_len = [], prompt.shape[1]
    for _ in range(steps):
        tok = int(out["logits"][0, -1].argmax())
        tokens.append(tok)
        out = ort_logits(model, np.array([[tok]]), past=out, past_len=past_len)
        past_len += 1
    return tokens


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_onnxruntime(compiled, name, rng):
    session = Session.load(compiled(name))
    for n in (1, 7, 64, 250 if name.startswith("gpt2") else 300):
        ids = rng.integers(0, 256, (1, n))
        got = session.prefill(ids)
        want = ort_logits(DATA / f"{name}.onnx", ids)["logits"]
        assert_close(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()),
                     name=f"{name} logits at prompt length {n}")


@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_tokens_match_onnxruntime(compiled, name, rng):
    from kiln.runtime.generate import generate

    prompt = rng.integers(0, 256, (1, 5))
    want = ort_greedy(DATA / f"{name}.onnx", prompt, 32)
    session = Session.load(compiled(name))
    got = list(generate(session, list(prompt[0]), max_new_tokens=32))
    assert got == want


def test_prefill_then_decode_equals_longer_prefill(compiled, rng):
    session = Session.load(compiled("llama-optimum"))
    ids = rng.integers(0, 256, (2, 12))
    full = session.prefill(ids)
    session.prefill(ids[:, :9])
    steps = [session.decode(ids[:, 9 + k])[:, 0] for k in range(3)]
    for k, logits in enumerate(steps):
        assert_close(logits, full[:, 9 + k], rtol=1e-4, atol=1e-5, name=f"decode step {k}")
    session.prefill(ids[:, :4])
    chunk = session.extend(ids[:, 4:12])
    assert_close(chunk, full[:, 4:12], rtol=1e-4, atol=1e-5, name="chunked prefill")


def test_context_overflow_is_refused(compiled):
    session = Session.load(compiled("llama-optimum"))
    with pytest.raises(KilnError, match="context"):
        session.prefill(np.zeros((1, MAX_SEQ + 1), np.int64))
    from kiln.runtime.generate import generate

    with pytest.raises(KilnError, match="exceeds the context"):
        list(generate(session, [1] * (MAX_SEQ - 4), max_new_tokens=8))


# -- bad artifacts -------------------------------------------------------------------------------

@pytest.fixture
def art_copy(compiled, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(compiled("llama-optimum"), dst)
    return dst


def test_flipped_byte_is_refused(art_copy):
    kernels = art_copy / af.KERNELS
    data = bytearray(kernels.read_bytes())
    data[len(data) // 2] ^= 0x40
    kernels.write_bytes(bytes(data))
    with pytest.raises(KilnError, match=r"kernels\.so: checksum mismatch"):
        Session.load(art_copy)


def test_missing_file_is_refused(art_copy):
    (art_copy / af.PARAMS).unlink()
    with pytest.raises(KilnError, match=r"params\.safetensors: missing"):
        Session.load(art_copy)


def test_unknown_format_version_is_refused(art_copy):
    m = json.loads((art_copy / af.MANIFEST).read_text())
    m["format_version"] = 99
    (art_copy / af.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(KilnError, match="format version 99"):
        Session.load(art_copy)


def test_foreign_target_is_refused(art_copy, monkeypatch):
    m = json.loads((art_copy / af.MANIFEST).read_text())
    m["target"]["cpu_flags"] = ["avx10_9"]
    (art_copy / af.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(KilnError, match=r"cannot run.*avx10_9"):
        Session.load(art_copy)
    m["target"] = {"name": "cuda", "kind": "cuda", "arch": "sm_90"}
    (art_copy / af.MANIFEST).write_text(json.dumps(m))
    # checked on every host: on a GPU host the device files are hidden from the runtime
    exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p, *a, **k: not str(p).startswith("/dev/nvidia")
                        and exists(p, *a, **k))
    with pytest.raises(KilnError, match="no NVIDIA GPU"):
        Session.load(art_copy)


def test_cli_reports_bad_artifact_in_one_line(art_copy):
    (art_copy / af.MANIFEST).write_text("{not json")
    p = subprocess.run([sys.executable, "-m", "kiln.compiler.cli", "run", str(art_copy),
                        "--prompt-ids", "1,2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "corrupt manifest" in p.stderr


def test_interrupted_compile_leaves_no_artifact(tmp_path, monkeypatch):
    from kiln.compiler import compile as comp

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(comp, "_save", boom)
    with pytest.raises(KeyboardInterrupt):
        comp.compile_model(DATA / "llama-optimum.onnx", tmp_path / "out", max_seq=64)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())  # the staging directory is gone too


# -- the runtime without TVM's compiler ---------------------------------------------------------

def test_runtime_works_without_the_compiler_library(compiled, tmp_path):
    """Copy the tvm package minus libtvm_compiler.so; generate in a fresh process using it."""
    import tvm

    src = Path(tvm.__file__).parent
    site = tmp_path / "site"
    shutil.copytree(src, site / "tvm", ignore=shutil.ignore_patterns(
        "libtvm_compiler.so", "3rdparty", "include", "src", "*.pyc", "__pycache__"))
    assert not list(site.rglob("libtvm_compiler*"))
    code = (
        "import sys\n"
        "from kiln.runtime.session import Session\n"
        "from kiln.runtime.generate import generate\n"
        f"s = Session.load({str(compiled('llama-optimum'))!r})\n"
        "toks = list(generate(s, [1, 2, 3], max_new_tokens=8))\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libtvm_compiler' not in maps, 'compiler library loaded'\n"
        "import tvm; assert tvm.__file__.startswith(sys.argv[1]), tvm.__file__\n"
        "print(','.join(map(str, toks)))\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout.strip().split(",")) == 8


def test_context_beyond_learned_positions_is_refused(tmp_path):
    from kiln.compiler.compile import compile_model

    with pytest.raises(KilnError, match="exceeds the model's 256 positions"):
        compile_model(DATA / "gpt2-optimum.onnx", tmp_path / "a", max_seq=512)
    assert not (tmp_path / "a").exists()


ZOO_COMPILES = ["falcon-optimum", "gpt_neox-optimum", "gptj-optimum", "mistral-optimum",
                "phi-optimum", "phi3-optimum", "qwen3-optimum", "gemma-optimum", "opt-optimum"]


@pytest.mark.parametrize("name", ZOO_COMPILES)
def test_other_architectures_compile_and_match(name, tmp_path, rng):
    """Multi-query, partial and interleaved rotary, per-head norms, fused projections, GeGLU with
    positions from Range(past, past + seq) (gemma), learned positions with ReLU MLPs (opt)."""
    from kiln.compiler.compile import compile_model

    model = DATA / "zoo" / f"{name}.onnx"
    session = Session.load(compile_model(model, tmp_path / name, max_seq=64))
    for n in (1, 9):
        ids = rng.integers(0, 100, (1, n))
        want = ort_logits(model, ids)["logits"]
        assert_close(session.prefill(ids), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()),
                     name=f"{name} logits at prompt length {n}")
    past = ort_logits(model, ids)  # then one decode step on the 9-token cache
    tok = np.array([[int(past["logits"][0, -1].argmax())]])
    want = ort_logits(model, tok, past=past, past_len=9)["logits"]
    assert_close(session.decode(tok), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()),
                 name=f"{name} decode logits after 9 tokens")


def test_sliding_window_shorter_than_the_context(tmp_path, rng):
    """gemma2's 4-token window, alternating with global layers, at prompts well past it."""
    from kiln.compiler.compile import compile_model

    model = DATA / "zoo" / "gemma2-optimum.onnx"
    session = Session.load(compile_model(model, tmp_path / "g", max_seq=64))
    ids = rng.integers(0, 100, (1, 21))
    want = ort_logits(model, ids)
    assert_close(session.prefill(ids), want["logits"], rtol=1e-4,
                 atol=1e-4 * float(np.abs(want["logits"]).max()), name="gemma2 prefill")
    past, n = want, 21
    for _ in range(3):  # decode reads only the window's keys from the cache
        tok = np.array([[int(past["logits"][0, -1].argmax())]])
        past = ort_logits(model, tok, past=past, past_len=n)
        n += 1
        assert_close(session.decode(tok), past["logits"], rtol=1e-4,
                     atol=1e-4 * float(np.abs(past["logits"]).max()), name="gemma2 decode")


@pytest.mark.parametrize("name, culprit", [("bloom-dynamo", "past_key_values.0.key"),
                                           ("bert-optimum", "token_type_ids")])
def test_inputs_the_runtime_cannot_feed_are_refused(name, culprit, tmp_path):
    """bloom's ALiBi attention is not recognized, so its past_key_values stay plain inputs; BERT
    is an encoder with token types. Both are refused at compile time, naming the input."""
    from kiln.compiler.compile import compile_model

    with pytest.raises(KilnError, match=f"graph input {culprit}: the runtime feeds only"):
        compile_model(DATA / "zoo" / f"{name}.onnx", tmp_path / "a", max_seq=64)
    assert not (tmp_path / "a").exists()
