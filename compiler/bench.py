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

from kiln.compiler.errors import KilnError


@dataclass
class Row:
    engine: str
    phase: str  # "prefill" (all logits, as onnxruntime) | "prefill_last" | "decode"
    tokens: int  # prompt length (prefill) or generated tokens (decode)
    tok_s: float
    runs: list[float] = field(default_factory=list)  # tok/s of each repetition


@dataclass
class Engine:
    """One thing measured: a kiln artifact or an ONNX file run by onnxruntime."""

    label: str
    kind: str  # "kiln" | "onnxruntime"
    path: str
    weight_bytes_per_token: int  # parameter bytes read to decode one token


@dataclass
class BenchReport:
    threads: int
    bandwidth_gb_s: float
    weight_bytes: int  # per decoded token, of the first (baseline) engine
    roofline_tok_s: float
    rows: list[Row]
    engines: list[Engine] = field(default_factory=list)  # the first is the baseline

    def tok_s(self, label: str, phase: str, tokens: int) -> float | None:
        return next((r.tok_s for r in self.rows if (r.engine, r.phase, r.tokens) ==
                     (label, phase, tokens)), None)

    def ratio(self, phase: str, tokens: int, label: str | None = None,
              baseline: str | None = None) -> float | None:
        """tok/s of `label` over `baseline`: by default the first artifact over the first
        onnxruntime model (kiln / onnxruntime with one of each)."""
        label = label or next((e.label for e in self.engines if e.kind == "kiln"), "kiln")
        baseline = baseline or next((e.label for e in self.engines if e.kind == "onnxruntime"),
                                    "onnxruntime")
        a, b = self.tok_s(label, phase, tokens), self.tok_s(baseline, phase, tokens)
        return a / b if a is not None and b else None

    def roofline(self, engine: Engine) -> float:
        return self.bandwidth_gb_s * 1e9 / engine.weight_bytes_per_token

    def to_dict(self) -> dict:
        d = asdict(self)
        first = next((e.label for e in self.engines if e.kind == "kiln"), "kiln")
        d["ratios"] = {f"{r.phase}@{r.tokens}": self.ratio(r.phase, r.tokens)
                       for r in self.rows if r.engine == first}
        d["decode_fraction_of_roofline"] = next(
            (r.tok_s / self.roofline_tok_s for r in self.rows
             if r.engine == first and r.phase == "decode"), None)
        d["baseline"] = self.engines[0].label if self.engines else None
        d["engines"] = [self._summary(e) for e in self.engines]
        return d

    def _summary(self, e: Engine) -> dict:
        base = self.engines[0].label
        decode = next((r.tok_s for r in self.rows if r.engine == e.label and
                       r.phase == "decode"), None)
        return {**asdict(e), "roofline_tok_s": self.roofline(e), "decode_tok_s": decode,
                "decode_fraction_of_roofline": decode / self.roofline(e) if decode else None,
                "prefill_tok_s": {str(r.tokens): r.tok_s for r in self.rows
                                  if r.engine == e.label and r.phase == "prefill"},
                "vs_baseline": {f"{r.phase}@{r.tokens}": self.ratio(r.phase, r.tokens, e.label,
                                                                   base)
                                for r in self.rows if r.engine == e.label}}


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


def bench(artifacts: Path | list[Path], onnx_models: Path | list[Path] | None = None, *,
          prompt_lens: list[int], decode_len: int, threads: int | None = None, repeat: int = 5,
          labels: list[str] | None = None, progress: Callable[[str], None] = lambda m: None,
          synthetic_weights: int | None = None) -> BenchReport:
    """Artifacts and ONNX models (onnxruntime) measured in one run, alternating between them in
    every repetition; the first artifact is the baseline of the ratios. `threads` (default:
    the usable cores) for kiln and onnxruntime alike."""
    from kiln.runtime.session import Session
    from kiln.runtime.threads import default_threads

    threads = default_threads(threads)

    artifacts = [artifacts] if isinstance(artifacts, (str, Path)) else list(artifacts)
    onnx_models = [onnx_models] if isinstance(onnx_models, (str, Path)) else \
        list(onnx_models or [])
    names = _labels(artifacts, onnx_models, labels or [])
    progress("measuring memory bandwidth")
    bw = measure_bandwidth(threads)
    engines: list[tuple[Engine, object]] = []
    for path, label in zip(artifacts, names[:len(artifacts)], strict=True):
        session = Session.load(path, threads=threads, synthetic_weights=synthetic_weights)
        info = Engine(label, "kiln", str(path), artifact_bytes_per_token(session.artifact.manifest))
        engines.append((info, session))
    for path, label in zip(onnx_models, names[len(artifacts):], strict=True):
        from kiln.compiler.frontend.onnx_traffic import bytes_per_token

        engines.append((Engine(label, "onnxruntime", str(path), bytes_per_token(path)),
                        _Ort(path, threads)))
    vocab = min(e.vocab or 2 for _, e in engines if isinstance(e, Session))
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    for n in prompt_lens:
        ids = rng.integers(0, vocab, (1, n))
        rows += _alternate(engines, f"prefill {n}", "prefill", n, repeat, progress,
                           lambda eng, ids=ids, n=n: _timed(n, eng.prefill, ids))
        for info, eng in engines:  # what `kiln run` does: the LM head on the last position only
            if info.kind == "kiln":
                last = [_timed(n, lambda ids=ids, eng=eng: eng.prefill(ids, last_only=True))
                        for _ in range(repeat)]
                rows.append(Row(info.label, "prefill_last", n, statistics.median(last), last))
    prompt = rng.integers(0, vocab, (1, 16))
    rows += _alternate(engines, f"decode {decode_len}", "decode", decode_len, repeat, progress,
                       lambda eng: (eng.decode(prompt, decode_len) if isinstance(eng, _Ort) else
                                    _kiln_decode(eng, prompt, decode_len)))
    first = engines[0][0].weight_bytes_per_token
    return BenchReport(threads, bw, first, bw * 1e9 / first, rows, [e for e, _ in engines])


def _labels(artifacts: list[Path], onnx_models: list[Path], given: list[str]) -> list[str]:
    """Given labels in order (artifacts, then ONNX models), else "kiln" and "onnxruntime" for
    one of each, else the artifact folder and ONNX file names."""
    if not artifacts:
        raise KilnError("give at least one artifact to benchmark")
    total = len(artifacts) + len(onnx_models)
    if len(given) > total:
        raise KilnError(f"{len(given)} --label values for {total} engines")
    default = (["kiln"] * (len(artifacts) == 1) or [Path(a).name for a in artifacts]) + \
        (["onnxruntime"] * (len(onnx_models) == 1) or
         [f"onnxruntime:{Path(m).stem}" for m in onnx_models])
    names = [*given, *default[len(given):]]
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise KilnError(f"engine label {dupes[0]!r} is used twice; name them with --label")
    return names


def _timed(tokens: int, fn: Callable, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return tokens / (time.perf_counter() - t)


def _alternate(engines, what: str, phase: str, tokens: int, repeat: int,
               progress: Callable[[str], None], run: Callable[[object], float]) -> list[Row]:
    """`repeat` rounds over all engines in turn (after one warm-up round): one row each."""
    rates: dict[str, list[float]] = {info.label: [] for info, _ in engines}
    for i in range(repeat + 1):
        for info, eng in engines:
            progress(f"{what}: {info.label} run {i}")
            r = run(eng)
            if i:
                rates[info.label].append(r)
    return [Row(label, phase, tokens, statistics.median(v), v) for label, v in rates.items()]


def _kiln_decode(session, prompt: np.ndarray, steps: int) -> float:
    logits = session.prefill(prompt)
    tok = logits[:, -1].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        tok = session.decode(tok)[:, -1].argmax(-1)
    return steps / (time.perf_counter() - t)


def artifact_bytes_per_token(manifest: dict) -> int:
    """Parameter bytes an artifact reads to decode one token, from its parameter table.

    Every parameter is read whole, except position tables and an embedding table, of which one
    row is read, unless the LM head reads the embedding table too (tied). The table says a
    parameter's first use only, so tied means: the table is packed for the linear kernels
    (3-D), or no other parameter has vocab output rows (an LM head of its own).
    """
    params = manifest["params"]
    vocab = manifest.get("architecture", {}).get("vocab")

    def nbytes(p: dict) -> int:
        return int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize

    def rows_out(p: dict) -> int | None:
        shape = p["shape"]
        return shape[0] if len(shape) == 2 else shape[0] * shape[2] if len(shape) == 3 else None

    total = 0
    for p in params:
        one_row = p["role"] == "table"
        if p["role"] == "embedding.table" and vocab and len(p["shape"]) == 2:
            one_row = any(q is not p and q["role"] not in ("embedding.table", "table") and
                          rows_out(q) == vocab for q in params)
        total += nbytes(p) // p["shape"][0] if one_row and p["shape"] else nbytes(p)
    return total


def plot(report: BenchReport, path: Path) -> None:
    """One panel per (phase, tokens), one bar per engine; decode panels mark each engine's
    bandwidth roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r.phase, r.tokens) for r in report.rows})
    engines = [e.label for e in report.engines] or sorted({r.engine for r in report.rows})
    palette = ["#d9662b", "#2b7bd9", "#3a9e4f", "#9b59b6", "#c0392b", "#777777"]
    colors = {e: palette[i % len(palette)] for i, e in enumerate(engines)}
    fig, axes = plt.subplots(1, len(cases), figsize=(max(3.2, 1.1 * len(engines)) * len(cases),
                                                    3.6))
    for ax, (phase, n) in zip(np.atleast_1d(axes), cases, strict=True):
        shown = [e for e in engines if report.tok_s(e, phase, n) is not None]
        ax.bar(range(len(shown)), [report.tok_s(e, phase, n) for e in shown],
               color=[colors[e] for e in shown])
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
        if phase == "decode":
            for i, e in enumerate(report.engines):
                if e.label in shown:
                    x = shown.index(e.label)
                    ax.hlines(report.roofline(e), x - 0.4, x + 0.4, colors="k", linestyles="--",
                              lw=1, label="bandwidth roofline" if i == 0 else None)
            ax.legend(fontsize=7)
        ax.set_title(f"{phase} {n} tokens")
        ax.set_ylabel("tokens/s")
    fig.suptitle(f"{report.threads} threads, {report.bandwidth_gb_s:.1f} GB/s measured")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
