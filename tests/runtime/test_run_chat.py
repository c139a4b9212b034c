"""`kiln run` and `kiln chat` on a compiled tiny Llama with a byte tokenizer: stop tokens from
generation_config.json, --ignore-eos, --stop-token, --stop, the chat template, a multi-turn chat
that prefills only each new turn (tokens equal onnxruntime's on the whole conversation), the
thread default following the affinity mask, and the bundle's launcher doing the same."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.runtime.threads import allowed_cpus, usable_cores
from tests.runtime.chat_fixtures import SMOLLM2_TEMPLATE, byte_tokenizer

pytestmark = pytest.mark.tvm
pytest.importorskip("tvm")

DATA = Path(__file__).parent.parent / "data"
MODEL = DATA / "llama-optimum.onnx"
PROMPT = [72, 101, 108, 108, 111, 33, 32, 87]  # "Hello! W" in the byte tokenizer
STEPS = 12


def ort_greedy(ids: list[int], steps: int) -> list[int]:
    from tests.runtime.test_runtime import ort_greedy as greedy

    return greedy(MODEL, np.array([ids]), steps)


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """onnxruntime's greedy continuation of PROMPT, the independent reference."""
    return ort_greedy(PROMPT, STEPS)


def first_new(tokens: list[int], start: int) -> int:
    """The first index >= start whose token did not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, reference) -> Path:
    """The tiny Llama exported with the files an optimum export carries: generation_config.json
    names two stop tokens, one of them what greedy decoding produces at step 4 or later (so
    stopping is seen), tokenizer_config.json a different eos and the chat template."""
    from kiln.compiler.compile import compile_model

    src = tmp_path_factory.mktemp("export")
    shutil.copyfile(MODEL, src / "model.onnx")
    byte_tokenizer().save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "chat_template": SMOLLM2_TEMPLATE}))
    stop = reference[first_new(reference, 4)]
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, stop]}))
    (src / "config.json").write_text(json.dumps({"eos_token_id": 5}))  # loses to the above
    return compile_model(src / "model.onnx", tmp_path_factory.mktemp("art") / "llama",
                         max_seq=128)


def kiln(*args, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_BIND_THREADS")}
    return subprocess.run([sys.executable, "-m", "kiln.compiler.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, **kw)


def run_json(artifact: Path, *args, prompt: tuple = ("--prompt-ids", ",".join(map(str, PROMPT)))
             ) -> dict:
    """`kiln run ... --json` in this process (the subprocess tests are about threads)."""
    from click.testing import CliRunner

    from kiln.compiler.cli import main

    r = CliRunner().invoke(main, ["run", str(artifact), *prompt, "--json", *map(str, args)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_manifest_records_stop_tokens_and_chat_template(artifact, reference):
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["stop_token_ids"] == [0, reference[first_new(reference, 4)]]
    assert m["stop_tokens_from"] == "generation_config.json"
    assert m["special_tokens"]["eos_token"] == "<|im_end|>"
    assert m["special_tokens"]["eos_token_id"] == 2  # resolved through tokenizer.json
    assert (artifact / m["chat_template"]).read_text() == SMOLLM2_TEMPLATE
    assert {"generation_config.json", "chat_template.jinja"} <= set(m["files"])


def test_run_stops_where_generation_config_says(artifact, reference):
    stop_at = first_new(reference, 4)
    out = run_json(artifact, "--max-new-tokens", STEPS)
    assert out["tokens"] == reference[:stop_at + 1]
    assert out["stopped"] == "stop token"
    ignored = run_json(artifact, "--max-new-tokens", STEPS, "--ignore-eos")
    assert ignored["tokens"] == reference and ignored["stopped"] == "length"


def test_stop_token_and_stop_text(artifact, reference):
    at = first_new(reference, 2)
    out = run_json(artifact, "--max-new-tokens", STEPS, "--ignore-eos", "--stop-token",
                   reference[at])
    assert out["tokens"] == reference[:at + 1] and out["stopped"] == "stop token"
    text = byte_tokenizer().decode(reference)
    k = next(i for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    stop = text[k:k + 2]
    out = run_json(artifact, "--max-new-tokens", STEPS, "--ignore-eos", "--stop", stop)
    assert out["stopped"] == "stop text" and out["text"] == text[:text.find(stop)]
    assert out["tokens"] == reference[:len(out["tokens"])]


def test_stats_line_and_threads_follow_the_affinity_mask(artifact):
    p = kiln("run", artifact, "--prompt-ids", "1,2,3", "--max-new-tokens", 2)
    assert p.returncode == 0, p.stderr
    n = usable_cores()
    assert p.stderr.strip().endswith(f"; {n} thread{'s' if n > 1 else ''}"), p.stderr
    if len(allowed_cpus()) < 2:
        return  # a one-CPU machine cannot be restricted further
    last = max(os.sched_getaffinity(0))
    p = kiln("run", artifact, "--prompt-ids", "1,2,3", "--max-new-tokens", 2,
             preexec_fn=lambda: os.sched_setaffinity(0, {last}))
    assert p.returncode == 0 and p.stderr.strip().endswith("; 1 thread"), p.stderr
    assert kiln("run", artifact, "--prompt-ids", "1,2,3", "--max-new-tokens", 2, "--threads",
                2, preexec_fn=lambda: os.sched_setaffinity(0, {last})
                ).stderr.strip().endswith("; 2 threads")


def test_threads_stay_inside_the_affinity_mask(artifact):
    """TVM pins its workers to CPUs 0..n-1; kiln unpins them under a narrower mask."""
    if len(allowed_cpus()) < 2:
        pytest.skip("needs two CPUs to restrict to one")
    last = max(os.sched_getaffinity(0))
    code = ("import glob, os\n"
            "from kiln.runtime.session import Session\n"
            f"s = Session.load({str(artifact)!r})\n"
            "s.prefill([[1, 2, 3]]); s.decode([4])\n"
            "for t in glob.glob(f'/proc/{os.getpid()}/task/*/status'):\n"
            "    print([x for x in open(t).read().splitlines()"
            " if x.startswith('Cpus_allowed_list')][0].split()[1])\n")
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, preexec_fn=lambda: os.sched_setaffinity(0, {last}))
    assert p.returncode == 0, p.stderr
    assert set(p.stdout.split()) == {str(last)}


def test_chat_prompt_uses_the_template(artifact):
    """--chat: the prompt rendered by the template (tokens equal onnxruntime's on it)."""
    from kiln.runtime.chat import ChatTemplate, messages_for

    text = ChatTemplate(SMOLLM2_TEMPLATE).render(messages_for("2+2?", "Be brief."))
    ids = byte_tokenizer().encode(text, add_special_tokens=False).ids
    out = run_json(artifact, "--chat", "--system", "Be brief.", "--max-new-tokens", 6,
                   "--ignore-eos", prompt=("--prompt", "2+2?"))
    assert out["prompt_tokens"] == len(ids)
    assert out["tokens"] == ort_greedy(ids, 6)


def test_chat_keeps_the_cache_between_turns(artifact):
    """Each turn prefills only what is not cached; its tokens equal onnxruntime's greedy
    continuation of the whole conversation rendered from scratch."""
    from kiln.runtime.chat import ChatTemplate, Conversation
    from kiln.runtime.generate import Generation
    from kiln.runtime.sampling import Sampler
    from kiln.runtime.session import Session

    tok, template = byte_tokenizer(), ChatTemplate(SMOLLM2_TEMPLATE)
    conv = Conversation(Session.load(artifact), tok, template, stop=(), system="S")
    history = [{"role": "system", "content": "S"}]
    prev_ids: list[int] = []
    for n, text in enumerate(["Hi", "And?", "ok"]):
        cached_before = list(conv.cached)
        result = Generation()
        tokens = list(conv.turn(text, max_new_tokens=5, sampler=Sampler(), result=result))
        history.append({"role": "user", "content": text})
        ids = tok.encode(template.render(history), add_special_tokens=False).ids
        assert tokens == ort_greedy(ids, 5), f"turn {n}"
        t = result.timing
        reused = next((i for i, (a, b) in enumerate(zip(cached_before, ids, strict=False))
                       if a != b), min(len(cached_before), len(ids)))
        assert t.cached_tokens == reused and t.prompt_tokens == len(ids) - reused
        assert t.cached_tokens >= len(prev_ids), f"turn {n}: the last prompt not reused"
        prev_ids = ids
        history.append({"role": "assistant", "content": tok.decode(tokens)})


def test_chat_command_says_when_the_context_is_full(artifact):
    from kiln.runtime.cli import run_chat

    out, err = io.StringIO(), io.StringIO()
    turns = run_chat(artifact, system=None, max_new_tokens=4, temperature=0.0, top_k=0,
                     top_p=1.0, seed=0, threads=None, ignore_eos=True,
                     stdin=io.StringIO("hello\n" + "x" * 200 + "\n/reset\nagain\n/exit\nnever\n"),
                     out=out, err=err)
    assert turns == 2
    full = [line for line in err.getvalue().splitlines() if "context full" in line]
    assert len(full) == 1 and "the context 128" in full[0], err.getvalue()
    stats = [line for line in err.getvalue().splitlines() if "prefill" in line]
    assert len(stats) == 2 and "cached" in stats[1]  # the system prompt came from the cache


def test_bundle_launcher_stops_and_reports_threads(artifact, reference, tmp_path):
    from kiln.compiler.package import package
    from tests.runtime.test_package import PYTHON, launch

    b = package(artifact, tmp_path / "bundle", python=PYTHON).path
    site = tmp_path / "numpy-only"
    src = Path(np.__file__).parent
    for name in ("numpy", "numpy.libs"):
        if (src.parent / name).exists():
            site.mkdir(exist_ok=True)
            (site / name).symlink_to(src.parent / name)
    p = launch(b, site, "run", "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
               str(STEPS))
    assert p.returncode == 0, p.stderr
    stop_at = first_new(reference, 4)
    assert p.stdout.strip() == ",".join(map(str, reference[:stop_at + 1]))
    n = usable_cores()
    assert p.stderr.strip().endswith(f"; {n} thread{'s' if n > 1 else ''}"), p.stderr
