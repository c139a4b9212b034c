"""`kiln bench`: kiln's artifact and onnxruntime on the same ONNX, measured alternately in one run.

Medians of several repetitions; decode is also put against the machine's memory-bandwidth
roofline (bytes of weights streamed per token / measured read bandwidth), measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Row:
    engine: str
    phase: str  # "prefill" (all logits, as onnxruntime) | "prefill_last" | "decode"
    tokens: int  # prompt length (prefill) or generated tokens (decode)
    tok_s: float
    runs: list[float] = field(default_factory=list)  # tok/s of each repetition


@dataclass
class BenchReport:
    threads: int
    bandwidth_gb_s: float
    weight_bytes: int
    roofline_tok_s: float
    rows: list[Row]

    def ratio(self, phase: str, tokens: int) -> float | None:
        k = [r for r in self.rows if r.engine == "kiln" and (r.phase, r.tokens) == (phase, tokens)]
        o = [r for r in self.rows if r.engine == "onnxruntime" and (r.phase, r.tokens) == (phase,
                                                                                       tokens)]
        return k[0].tok_s / o[0].tok_s if k and o and o[0].tok_s else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratios"] = {f"{r.phase}@{r.tokens}": self.ratio(r.phase, r.tokens)
                       for r in self.rows if r.engine == "kiln"}
        d["decode_fraction_of_roofline"] = next(
            (r.tok_s / self.roofline_tok_s for r in self.rows
             if r.engine == "kiln" and r.phase == "decode"), None)
        return d


def measure_bandwidth(threads: int, mbytes: int = 512, repeat: int = 5) -> float:
    """Read bandwidth in GB/s: `threads` workers summing disjoint slices of a large array."""
    a = np.ones(mbytes * (1 << 20) // 4, np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        def once() -> float:
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            return time.perf_counter() - t

        once()
        return a.nbytes / min(once() for _ in range(repeat)) / 1e9


class _Ort:
    """onnxruntime driving the same ONNX file: prefill, then decode with its presents."""

    def __init__(self, model: Path, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # its idle workers would otherwise spin on the cores while kiln runs in between
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def _feeds(self, ids: np.ndarray, past: dict, past_len: int) -> dict:
        b, s = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, past_len + s), np.int64),
                 "position_ids": np.arange(past_len, past_len + s)[None].repeat(b, 0)}
        for name, info in self.inputs.items():
            if name.startswith("past_key_values"):
                present = name.replace("past_key_values", "present")
                feeds[name] = past.get(present, np.zeros((b, info.shape[1], 0, info.shape[3]),
                                                         np.float32))
        return {k: v for k, v in feeds.items() if k in self.inputs}

    def prefill(self, ids: np.ndarray) -> dict:
        return dict(zip(self.outputs, self.sess.run(None, self._feeds(ids, {}, 0)), strict=True))

    def decode(self, prompt: np.ndarray, steps: int) -> float:
        """Tokens/s of `steps` greedy decode steps after prefilling `prompt`."""
        out = self.prefill(prompt)
        past_len = prompt.shape[1]
        t = time.perf_counter()
        for _ in range(steps):
            tok = out["logits"][:, -1].argmax(-1)[:, None]
            out = dict(zip(self.outputs, self.sess.run(None, self._feeds(tok, out, past_len)),
                           strict=True))
            past_len += 1
        return steps / (time.perf_counter() - t)


def bench(artifact: Path, onnx_model: Path | None, *, prompt_lens: list[int], decode_len: int,
          threads: int, repeat: int = 5, progress: Callable[[str], None] = lambda m: None,
          synthetic_weights: int | None = None) -> BenchReport:
    from kiln.runtime.session import Session

    progress("measuring memory bandwidth")
    bw = measure_bandwidth(threads)
    session = Session.load(artifact, threads=threads, synthetic_weights=synthetic_weights)
    ort = _Ort(onnx_model, threads) if onnx_model is not None else None
    vocab = session.vocab or 2
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    engines = [("kiln", session)] + ([("onnxruntime", ort)] if ort else [])
    for n in prompt_lens:
        ids = rng.integers(0, vocab, (1, n))
        rates = {e: [] for e, _ in engines}
        for i in range(repeat + 1):  # alternate engines; the first round warms up
            for e, eng in engines:
                progress(f"prefill {n}: {e} run {i}")
                t = time.perf_counter()
                eng.prefill(ids)
                r = n / (time.perf_counter() - t)
                if i:
                    rates[e].append(r)
        rows += [Row(e, "prefill", n, statistics.median(v), v) for e, v in rates.items()]
        last = []  # what `kiln run` does: the LM head on the last position only
        for _ in range(repeat):
            t = time.perf_counter()
            session.prefill(ids, last_only=True)
            last.append(n / (time.perf_counter() - t))
        rows.append(Row("kiln", "prefill_last", n, statistics.median(last), last))
    prompt = rng.integers(0, vocab, (1, 16))
    rates = {e: [] for e, _ in engines}
    for i in range(repeat + 1):
        for e, _ in engines:
            progress(f"decode {decode_len}: {e} run {i}")
            r = (_kiln_decode(session, prompt, decode_len) if e == "kiln" else
                 ort.decode(prompt, decode_len))
            if i:
                rates[e].append(r)
    rows += [Row(e, "decode", decode_len, statistics.median(v), v) for e, v in rates.items()]
    weight_bytes = _weight_bytes(session)
    return BenchReport(threads, bw, weight_bytes, bw * 1e9 / weight_bytes, rows)


def _kiln_decode(session, prompt: np.ndarray, steps: int) -> float:
    logits = session.prefill(prompt)
    tok = logits[:, -1].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        tok = session.decode(tok)[:, -1].argmax(-1)
    return steps / (time.perf_counter() - t)


def _weight_bytes(session) -> int:
    return sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
               for p in session.artifact.manifest["params"] if p["role"] != "table")


def plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r.phase, r.tokens) for r in report.rows})
    engines = sorted({r.engine for r in report.rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.4))
    for ax, (phase, n) in zip(np.atleast_1d(axes), cases, strict=True):
        vals = [next((r.tok_s for r in report.rows if (r.engine, r.phase, r.tokens) ==
                      (e, phase, n)), 0.0) for e in engines]
        ax.bar(engines, vals, color=["#d9662b" if e == "kiln" else "#777777" for e in engines])
        if phase == "decode":
            ax.axhline(report.roofline_tok_s, ls="--", c="k", lw=1)
            ax.text(0, report.roofline_tok_s, " bandwidth roofline", va="bottom", fontsize=8)
        ax.set_title(f"{phase} {n} tokens")
        ax.set_ylabel("tokens/s")
    fig.suptitle(f"{report.threads} threads, {report.bandwidth_gb_s:.1f} GB/s measured")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
