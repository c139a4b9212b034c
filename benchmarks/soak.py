"""Soak: resident memory while one session generates many tokens, and while many sessions are
opened and closed in one process (issue 16). Growth is measured after a warm-up, so one-time
allocations (the thread pool, first-touch pages) do not count as a leak.

    python benchmarks/soak.py ARTIFACT --tokens 10000 --sessions 1000

ARTIFACT needs a context of at least --tokens + 1 (compile with --max-seq); the tiny test
fixture compiled with --max-seq 10016 takes seconds per thousand tokens.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_bytes() -> int:
    """This process's resident set size now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclass
class Soak:
    steps: int  # tokens generated, or sessions opened and closed
    seconds: float
    samples: list[tuple[int, int]]  # (step, RSS bytes)
    warmup: int  # steps before the baseline sample

    @property
    def baseline(self) -> int:
        return next(r for s, r in self.samples if s >= self.warmup)

    @property
    def growth(self) -> int:
        """RSS at the end minus RSS after the warm-up (bytes)."""
        return self.samples[-1][1] - self.baseline

    @property
    def peak_growth(self) -> int:
        return max(r for _, r in self.samples) - self.baseline


def soak_tokens(artifact: Path, tokens: int, *, every: int = 100, warmup: int = 200,
                threads: int | None = None) -> Soak:
    """Greedy-decode `tokens` tokens in one session (one prefill, then decode steps)."""
    from kiln.runtime.session import Session

    session = Session.load(artifact, threads=threads)
    if tokens + 1 > session.capacity:
        raise SystemExit(f"{artifact}: context {session.capacity} < {tokens + 1} tokens")
    start = time.perf_counter()
    token = int(session.prefill([[1]], last_only=True)[0, -1].argmax())
    samples = [(0, rss_bytes())]
    for step in range(1, tokens + 1):
        token = int(session.decode([token])[0, -1].argmax())
        if step % every == 0 or step == tokens:
            samples.append((step, rss_bytes()))
    return Soak(tokens, time.perf_counter() - start, samples, min(warmup, tokens))


def soak_sessions(artifact: Path, sessions: int, *, every: int = 10, warmup: int = 20,
                  threads: int | None = None) -> Soak:
    """Open a session, prefill and decode a few tokens, drop it; `sessions` times."""
    from kiln.runtime.session import Session

    start = time.perf_counter()
    samples = []
    for step in range(1, sessions + 1):
        s = Session.load(artifact, threads=threads)
        token = int(s.prefill([[1, 2, 3]], last_only=True)[0, -1].argmax())
        s.decode([token])
        del s
        if step % every == 0 or step == sessions:
            gc.collect()
            samples.append((step, rss_bytes()))
    return Soak(sessions, time.perf_counter() - start, samples, min(warmup, sessions))


def _line(name: str, r: Soak, unit: str) -> str:
    mb = 1 / 2**20
    return (f"{name}: {r.steps} {unit} in {r.seconds:.1f} s; RSS {r.baseline * mb:.1f} MiB after "
            f"{r.warmup} {unit}, {r.samples[-1][1] * mb:.1f} MiB at the end (growth "
            f"{r.growth * mb:+.2f} MiB, peak {r.peak_growth * mb:+.2f} MiB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--tokens", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--threads", type=int)
    a = p.parse_args()
    if a.tokens:
        print(_line("one session", soak_tokens(a.artifact, a.tokens, threads=a.threads),
                    "tokens"), flush=True)
    if a.sessions:
        print(_line("sessions", soak_sessions(a.artifact, a.sessions, threads=a.threads),
                    "sessions"), flush=True)


if __name__ == "__main__":
    main()
