"""Memory limits: what a session will hold (parameters, KV cache, workspace) against what this
machine can give it (MemAvailable, the cgroup's memory.max), checked before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4,
             "int64": 8, "float64": 8}
#: activations live per layer and are freed after it: a few hidden-sized rows per position
#: (q, k, v, attention output, MLP up/gate) bound them, plus the logits of every position
WORKSPACE_ROWS = 16


@dataclass(frozen=True)
class Estimate:
    params: int  # bytes of parameters and constants (copied into the device's memory)
    kv_cache: int  # bytes of the KV cache for `batch` sequences of the full context
    workspace: int  # bytes of activations and logits of a full-context prefill
    batch: int
    capacity: int

    @property
    def total(self) -> int:
        return self.params + self.kv_cache + self.workspace


def estimate(art: af.Artifact, batch: int = 1) -> Estimate:
    """The bytes a session of `art` holds at most (prefill of the whole context, `batch`)."""
    man = art.manifest
    capacity = art.max_seq
    if capacity <= 0:
        raise KilnError(f"{art.path / af.MANIFEST}: KV-cache capacity {capacity} is not a "
                        "positive number of tokens (corrupt manifest)")
    params = sum(art.file(n).stat().st_size for n in man["files"]
                 if n.endswith(".safetensors"))
    kv = sum(batch * int(c["kv_heads"]) * capacity * int(c["head_dim"]) *
             _ITEMSIZE.get(c.get("dtype", "float32"), 4)
             for c in man["signature"].get("caches", []))
    arch = man.get("architecture", {})
    hidden, vocab = int(arch.get("hidden") or 0), int(arch.get("vocab") or 0)
    workspace = batch * capacity * (WORKSPACE_ROWS * hidden + vocab) * 4
    return Estimate(params, kv, workspace, batch, capacity)


def available_memory() -> tuple[int, str] | None:
    """(bytes this process may still allocate, where that figure comes from), or None when
    this machine does not say: the smaller of MemAvailable and the cgroup's headroom."""
    found = []
    meminfo = _read("/proc/meminfo")
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    limit, used = _read("/sys/fs/cgroup/memory.max").strip(), _read(
        "/sys/fs/cgroup/memory.current").strip()
    if limit.isdigit() and used.isdigit():
        found.append((max(0, int(limit) - int(used)), "cgroup memory.max"))
    v1 = _read("/sys/fs/cgroup/memory/memory.limit_in_bytes").strip()
    v1_used = _read("/sys/fs/cgroup/memory/memory.usage_in_bytes").strip()
    if v1.isdigit() and v1_used.isdigit() and int(v1) < 1 << 60:
        found.append((max(0, int(v1) - int(v1_used)), "cgroup memory.limit_in_bytes"))
    return min(found) if found else None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def check_fits(art: af.Artifact, *, batch: int = 1,
               available: tuple[int, str] | None = None) -> Estimate:
    """Refuse, in one line with the estimate and what is available, an artifact whose session
    cannot fit in this machine's memory (CPU; a CUDA artifact's device memory is not known
    without the driver and is not checked here)."""
    est = estimate(art, batch)
    if art.manifest["target"].get("kind") == "cuda":
        return est
    have = available if available is not None else available_memory()
    if have is not None and est.total > have[0]:
        raise KilnError(
            f"{art.path}: needs about {_size(est.total)} (parameters {_size(est.params)}, KV "
            f"cache {_size(est.kv_cache)} for {est.capacity} tokens x batch {batch}, workspace "
            f"{_size(est.workspace)}), but only {_size(have[0])} is available ({have[1]}); "
            "recompile with a smaller --max-seq, quantize (--quant), or free memory")
    return est


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
