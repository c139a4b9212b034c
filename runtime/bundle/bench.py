"""`kiln_run.py bench`: prefill and decode tokens/s of an artifact on its device, runtime only.

Medians over repetitions after one warm-up; every step returns logits to the host, so a timing
includes the device work and one small copy. The device's copy bandwidth (read + write) is
measured in the same run, to put decode against the weights-streaming roofline.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from kiln.runtime.session import Session


@dataclass(frozen=True)
class Row:
    phase: str  # "prefill" | "decode"
    tokens: int  # prompt length (prefill) or decoded tokens (decode)
    tok_s: float  # median
    runs: tuple[float, ...]
    past: int = 0  # decode: tokens cached before the first step (the prompt)


@dataclass(frozen=True)
class Report:
    device: str
    weight_bytes: int
    copy_gb_s: float
    rows: tuple[Row, ...]
    gpu: bool = False
    threads: int | None = None  # TVM's CPU threads (None on a GPU)

    @property
    def read_gb_s(self) -> float:
        """The rate weights can be streamed at: on a GPU, HBM's bandwidth is shared by reads
        and writes, so a copy's rate counting both is what a read-only stream gets; on a CPU
        a copy reads and writes each byte, so half its counted rate is the read rate."""
        return self.copy_gb_s if self.gpu else self.copy_gb_s / 2

    @property
    def roofline_tok_s(self) -> float:
        """Decode upper bound: weights read once per token at `read_gb_s`."""
        return self.read_gb_s * 1e9 / self.weight_bytes if self.weight_bytes else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "read_gb_s": self.read_gb_s,
                "roofline_tok_s": self.roofline_tok_s}


def bench(artifact, *, prompt_lens: list[int], decode_len: int, repeat: int,
          synthetic_weights: int | None, threads: int | None = None,
          decode_after: Sequence[int] = (16,)) -> Report:
    """Prefill at each of `prompt_lens`; `decode_len` greedy steps after a prompt of each of
    `decode_after` tokens (attention's share of a step grows with the cache)."""
    session = Session.load(artifact, threads=threads, synthetic_weights=synthetic_weights)
    rng = np.random.default_rng(0)
    vocab = session.vocab or 2
    # on CUDA, the prompt's last-position logits only (what generation uses; all positions'
    # logits of a long prompt are a large device-to-host copy that would dominate)
    cuda = session.artifact.manifest["target"].get("kind") == "cuda"
    last = cuda and "prefill_last" in session.artifact.manifest["entry_points"]
    rows = [_prefill(session, rng.integers(0, vocab, (1, n)), repeat, last_only=last)
            for n in prompt_lens]
    rows += [_decode(session, rng.integers(0, vocab, (1, n)), decode_len, repeat)
             for n in decode_after]
    return Report(str(session.device), _weight_bytes(session), copy_bandwidth(session),
                  tuple(rows), gpu=cuda, threads=session.threads)


def _prefill(session: Session, ids: np.ndarray, repeat: int, *, last_only: bool = False) -> Row:
    runs = []
    for i in range(repeat + 1):
        t = time.perf_counter()
        session.prefill(ids, last_only=last_only)
        if i:  # the first run warms up
            runs.append(ids.shape[1] / (time.perf_counter() - t))
    return Row("prefill_last" if last_only else "prefill", ids.shape[1],
               statistics.median(runs), tuple(runs))


def _decode(session: Session, prompt: np.ndarray, steps: int, repeat: int) -> Row:
    runs = []
    for i in range(repeat + 1):
        tok = session.prefill(prompt)[:, -1].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):  # greedy: the argmax on the device where the artifact has it
            tok = session.decode_greedy(tok)
        if i:
            runs.append(steps / (time.perf_counter() - t))
    return Row("decode", steps, statistics.median(runs), tuple(runs), past=prompt.shape[1])


def copy_bandwidth(session: Session, mbytes: int = 1024, copies: int = 20) -> float:
    """GB/s of a device-to-device copy through the TVM runtime, bytes read plus written."""
    return device_copy_gb_s(session.tvm, session.device, mbytes, copies)


def device_copy_gb_s(tvm, dev, mbytes: int = 1024, copies: int = 20) -> float:
    """GB/s of `copies` copies of an `mbytes` float32 tensor on `dev` (read plus written)."""
    n = mbytes * (1 << 20) // 4
    a = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(n, np.float32), dev)
    b = tvm.runtime.empty((n,), "float32", dev)
    a.copyto(b)
    dev.sync()
    t = time.perf_counter()
    for _ in range(copies):
        a.copyto(b)
    dev.sync()
    return 2 * 4 * n * copies / (time.perf_counter() - t) / 1e9


def _weight_bytes(session: Session) -> int:
    return sum(int(np.prod(p["shape"])) * _itemsize(p["dtype"])
               for p in session.artifact.manifest["params"] if p.get("role") != "table")


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize  # numpy has no bfloat16


def format_report(report: Report) -> str:
    lines = [f"device {report.device}: copy {report.copy_gb_s:.0f} GB/s (read + write), "
             f"weights stream at {report.read_gb_s:.0f} GB/s; "
             f"weights {report.weight_bytes / 1e6:.1f} MB -> decode roofline "
             f"{report.roofline_tok_s:.0f} tok/s"
             + (f"; {report.threads} CPU threads" if report.threads else ""),
             f"{'phase':12s} {'tokens':>6s} {'tok/s':>10s}  runs"]
    lines += [f"{r.phase:12s} {r.tokens:6d} {r.tok_s:10.1f}  "
              + " ".join(f"{x:.0f}" for x in r.runs)
              + (f"  (after {r.past} cached tokens)" if r.past else "") for r in report.rows]
    return "\n".join(lines)
