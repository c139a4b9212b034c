"""Issue 16: artifacts verified at load and by `kiln verify`, compiles into an existing or
contested OUT, concurrent runs, memory and token limits, and resident memory over long runs."""

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
from kiln.runtime import limits
from kiln.runtime.params import read_safetensors, write_safetensors
from kiln.runtime.session import Session
from kiln.runtime.verify import verify_artifact
from tests.helpers import error_lines

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL = DATA / "llama-optimum.onnx"
#: room for the soak's 500 decoded tokens
MAX_SEQ = 520


def env() -> dict[str, str]:
    """This environment without the runtime-only switch a loaded Session sets (a compile in a
    child process needs TVM's compiler)."""
    return {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}


def kiln(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.compiler.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=env())


def one_error(p: subprocess.CompletedProcess) -> str:
    """The single error line of a refused command (exit 2), asserting there is just one."""
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("kiln: error:"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    from kiln.compiler.compile import compile_model

    return compile_model(MODEL, tmp_path_factory.mktemp("rel") / "art", max_seq=MAX_SEQ)


@pytest.fixture
def copy(art, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(art, dst)
    return dst


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / af.MANIFEST).read_text())
    edit(m)
    (path / af.MANIFEST).write_text(json.dumps(m))


# -- artifacts: checksums, sizes, kiln verify ---------------------------------------------------

def test_manifest_records_size_and_digest_of_every_file(art):
    m = json.loads((art / af.MANIFEST).read_text())
    assert set(m["files"]) == set(m["file_sizes"]) >= {af.KERNELS, af.PARAMS}
    for name, digest in m["files"].items():
        assert af.sha256(art / name) == digest
        assert (art / name).stat().st_size == m["file_sizes"][name]
    v = verify_artifact(art)
    assert v.params == len(m["params"]) and v.has_weights


def test_verify_command_accepts_a_good_artifact(art):
    p = kiln("verify", str(art))
    assert p.returncode == 0, p.stderr
    assert "match their checksums" in p.stdout


def test_truncated_params_refused_even_without_hashing(copy):
    p = copy / af.PARAMS
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    for verify in (True, False):  # the size is checked on every load
        with pytest.raises(KilnError, match=rf"params\.safetensors: {size // 2} bytes, the "
                                            rf"manifest records {size}"):
            Session.load(copy, verify=verify)
    assert "params.safetensors" in one_error(kiln("verify", str(copy)))


def test_params_from_another_artifact_refused(copy):
    """Same names and shapes, other values: only the checksum can tell."""
    arrays = read_safetensors(copy / af.PARAMS)
    rng = np.random.default_rng(3)
    other = copy.parent / "other.safetensors"
    write_safetensors(other, [(n, str(a.dtype), list(a.shape)) for n, a in arrays.items()],
                      lambda n: (arrays[n] + rng.standard_normal(arrays[n].shape)
                                 .astype(arrays[n].dtype)))
    other.replace(copy / af.PARAMS)
    if (copy / af.PARAMS).stat().st_size == json.loads(
            (copy / af.MANIFEST).read_text())["file_sizes"][af.PARAMS]:
        with pytest.raises(KilnError, match="checksum mismatch"):
            Session.load(copy)
    msg = one_error(kiln("verify", str(copy)))
    assert "params.safetensors" in msg


def test_manifest_edited_to_other_shapes_refused(copy):
    name = {}

    def edit(m):
        p = next(p for p in m["params"] if p["file"] == af.PARAMS and len(p["shape"]) == 2)
        p["shape"] = [p["shape"][0] + 1, p["shape"][1]]
        name["p"] = p["name"]

    _edit_manifest(copy, edit)
    with pytest.raises(KilnError, match=rf"parameter {name['p']} is .* the manifest says"):
        Session.load(copy)
    assert name["p"] in one_error(kiln("verify", str(copy)))


def test_weights_written_by_the_converter_are_checksummed(copy):
    """The GPU host's converter installs its parameter file through add_params_file: the
    manifest then records that file's digest and size, and a later flip is caught."""
    staged = copy.parent / "new.safetensors"
    shutil.copyfile(copy / af.PARAMS, staged)
    _edit_manifest(copy, lambda m: (m["files"].pop(af.PARAMS), m["file_sizes"].pop(af.PARAMS)))
    (copy / af.PARAMS).unlink()
    af.add_params_file(af.open_artifact(copy), staged)
    m = json.loads((copy / af.MANIFEST).read_text())
    assert m["files"][af.PARAMS] == af.sha256(copy / af.PARAMS)
    assert m["file_sizes"][af.PARAMS] == (copy / af.PARAMS).stat().st_size
    verify_artifact(copy)
    data = bytearray((copy / af.PARAMS).read_bytes())
    data[-5] ^= 0x10
    (copy / af.PARAMS).write_bytes(bytes(data))
    with pytest.raises(KilnError, match="checksum mismatch"):
        verify_artifact(copy)


# -- compiling into an existing or contested OUT ------------------------------------------------

def test_existing_out_refused_unless_force(art, tmp_path):
    from kiln.compiler.compile import compile_model

    out = tmp_path / "out"
    shutil.copytree(art, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(KilnError, match="already exists; pass --force"):
        compile_model(MODEL, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an artifact")
    with pytest.raises(KilnError, match="not a kiln artifact; refusing"):
        compile_model(MODEL, mine, force=True)
    assert (mine / "notes.txt").read_text() == "not an artifact"


def test_writer_never_mixes_two_artifacts(tmp_path):
    """Two writers staged into one OUT: the second to commit is refused (its stage removed) or,
    forced, replaces the whole directory; OUT is always exactly one writer's files."""
    out = tmp_path / "out"

    def stage(tag: str, **kw) -> af.ArtifactWriter:
        w = af.ArtifactWriter(out, **kw)
        for name in ("kernels.so", f"only-{tag}.bin"):
            w.path(name).write_text(tag)
            w.add(name)
        return w

    a, b, c = stage("a", force=False), stage("b", force=False), stage("c", force=True)
    a.commit({"who": "a"})
    with pytest.raises(KilnError, match="another compile wrote it meanwhile"):
        b.commit({"who": "b"})
    b.abort()
    assert sorted(p.name for p in out.iterdir()) == ["kernels.so", "manifest.json", "only-a.bin"]
    c.commit({"who": "c"})
    assert sorted(p.name for p in out.iterdir()) == ["kernels.so", "manifest.json", "only-c.bin"]
    assert (out / "kernels.so").read_text() == "c"
    assert af.open_artifact(out).manifest["who"] == "c"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no stage or old copy left


@pytest.mark.slow  # two compiles at once: about a minute on 2 cores
def test_two_compiles_into_one_out_at_once(tmp_path):
    out = tmp_path / "out"
    args = ["compile", str(MODEL), "-o", str(out), "-q", "--max-seq", "32"]
    procs = [subprocess.Popen([sys.executable, "-m", "kiln.compiler.cli", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env())
             for _ in range(2)]
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert len(error_lines(loser)) == 1
    assert "another compile wrote it meanwhile" in loser or "already exists" in loser
    verify_artifact(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_two_processes_run_one_artifact_at_once(art):
    args = ["run", str(art), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "12", "--json",
            "--threads", "1", "--ignore-eos"]
    procs = [subprocess.Popen([sys.executable, "-m", "kiln.compiler.cli", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env())
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    tokens = [json.loads(o.strip().splitlines()[-1])["tokens"] for o, _ in outs]
    session = Session.load(art)
    ref = session.generate([1, 2, 3, 4], max_new_tokens=12, stop=()).tokens
    assert tokens[0] == tokens[1] == list(ref)


# -- limits ------------------------------------------------------------------------------------

def test_session_that_does_not_fit_is_refused_with_the_estimate(art, monkeypatch):
    est = limits.estimate(af.open_artifact(art))
    assert est.params == sum((art / n).stat().st_size for n in ("params.safetensors",
                                                                 "constants.safetensors"))
    monkeypatch.setattr(limits, "available_memory", lambda: (est.total - 1, "test limit"))
    with pytest.raises(KilnError, match=r"needs about .* KV cache .* for 520 tokens .* only "
                                        r".* is available \(test limit\)"):
        Session.load(art)


def test_max_seq_beyond_memory_refused_at_load(copy):
    """A context whose KV cache cannot exist on this machine (10^12 tokens), refused before
    any allocation with this machine's real figure."""
    _edit_manifest(copy, lambda m: m["kv_cache"].update(capacity=10**12))
    with pytest.raises(KilnError, match=r"KV cache .* for 1000000000000 tokens .* available "
                                        r"\((MemAvailable|cgroup)"):
        Session.load(copy, verify=False)
    msg = one_error(kiln("run", str(copy), "--prompt-ids", "1,2"))
    assert "needs about" in msg


@pytest.mark.parametrize("ids, match", [
    ([], "prompt is empty"),
    ([1, 256], "token id 256 out of range for a vocab of 256"),
    ([-1, 2], "token id -1 out of range"),
    (list(range(1, MAX_SEQ + 1)), "exceeds the context of 520"),
])
def test_bad_prompts_refused(art, ids, match):
    session = Session.load(art)
    with pytest.raises(KilnError, match=match):
        session.generate(ids, max_new_tokens=1)


def test_bad_prompt_ids_on_the_command_line(art):
    assert "out of range" in one_error(kiln("run", str(art), "--prompt-ids", "5,-3"))
    assert "prompt is empty" in one_error(kiln("run", str(art), "--prompt-ids", ","))
    assert "out of range" in one_error(kiln("run", str(art), "--prompt-ids", f"1,{2**70}"))
    with pytest.raises(KilnError, match="token ids must be integers"):
        Session.load(art).prefill([[1, 2**70]])


# -- soak (small versions of benchmarks/soak.py) -----------------------------------------------

def test_resident_memory_flat_over_500_tokens(art):
    from benchmarks.soak import soak_tokens

    r = soak_tokens(art, 500, every=50, warmup=100, threads=1)
    assert r.growth < 4 * 2**20, r.samples  # bound: 4 MiB after the warm-up


def test_resident_memory_flat_over_60_sessions(art):
    from benchmarks.soak import soak_sessions

    r = soak_sessions(art, 60, every=10, warmup=20, threads=1)
    assert r.growth < 8 * 2**20, r.samples  # before the fix: about 2 MiB per session
