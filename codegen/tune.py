"""`kiln tune`: choose the packed GEMM/GEMV register tiling per weight shape on the machine at hand.

The tilings in `packed_linear.SEARCH_SPACE` trade registers, loads and parallel balance
differently, and which one wins depends on N, K, the core count and the cache sizes. The tuner
compiles each candidate for every distinct (N, K) of a model, checks it against numpy, and times
it the way the model runs it: prefill at `m` rows with the weight hot in cache (it is reused by
every row tile), decode at one row cycling through weight copies larger than the last-level
cache (each weight comes from DRAM once per token). Medians of `repeat` runs. The result is a
small JSON table that `kiln compile --tuning` turns into per-shape kernel choices.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.codegen.kernels import packed_linear as plin
from kiln.codegen.lower import PHASE_CONFIGS, KernelConfigs
from kiln.codegen.targets import CpuTarget
from kiln.compiler.errors import KilnError

FORMAT = 1
_COLD_BYTES = 96 << 20  # decode weights cycle through copies this large (> a 32 MB L3)


@dataclass(frozen=True, slots=True)
class Trial:
    phase: str  # "prefill" | "decode"
    n: int
    k: int
    config: plin.PackedConfig
    seconds: float


def candidates(phase: str) -> tuple[plin.PackedConfig, ...]:
    """Decode runs one row: only mr = 1 tilings; prefill any with mr > 1."""
    if phase == "decode":
        return tuple(c for c in plin.SEARCH_SPACE if c.mr == 1)
    return tuple(c for c in plin.SEARCH_SPACE if c.mr > 1)


def tune(shapes: Iterable[tuple[int, int]], target: CpuTarget, *, m: int = 128, repeat: int = 5,
         progress: Callable[[str], None] = lambda msg: None) -> list[Trial]:
    """Every candidate tiling of every (N, K) in both phases, checked and timed."""
    trials = []
    rng = np.random.default_rng(0)
    for n, k in sorted(set(shapes)):
        if n % target.lanes(4):
            continue
        for phase in ("prefill", "decode"):
            rows = m if phase == "prefill" else 1
            copies = 1 if phase == "prefill" else max(1, -(-_COLD_BYTES // (n * k * 4)))
            ws = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(copies)]
            x = rng.standard_normal((rows, k), dtype=np.float32)
            for cfg in candidates(phase):
                progress(f"{phase} {n}x{k} mr={cfg.mr} nv={cfg.nv}")
                trials.append(Trial(phase, n, k, cfg, _time(target, cfg, x, ws, repeat)))
    return trials


def _time(target: CpuTarget, cfg: plin.PackedConfig, x: np.ndarray, ws: list[np.ndarray],
          repeat: int) -> float:
    import tvm

    (m, k), n, lanes = x.shape, ws[0].shape[0], target.lanes(4)
    f = plin.packed_linear_kernel(n, k, cfg, lanes=lanes)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=target.tvm_target())
    kernel = lib["main"]
    xt, yt = tvm.runtime.tensor(x), tvm.runtime.tensor(np.empty((m, n), np.float32))
    wts = [tvm.runtime.tensor(plin.pack(w, lanes)) for w in ws]
    kernel(xt, wts[0], yt)
    ref = x @ ws[0].T
    err = float(np.abs(yt.numpy() - ref).max() / max(np.abs(ref).max(), 1e-30))
    if err > 1e-4:
        raise KilnError(f"tune: packed linear {n}x{k} {cfg} disagrees with numpy "
                        f"(rel err {err:.2e})")
    for w in wts:  # warm: page faults, thread pool
        kernel(xt, w, yt)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for w in wts:
            kernel(xt, w, yt)
        times.append((time.perf_counter() - t0) / len(wts))
    return statistics.median(times)


def best(trials: list[Trial]) -> dict[str, dict[str, dict]]:
    """phase -> "NxK" -> the fastest tiling, its time and the default's time."""
    out: dict[str, dict[str, dict]] = {"prefill": {}, "decode": {}}
    for phase in out:
        default = PHASE_CONFIGS[phase].packed
        by_shape: dict[tuple[int, int], list[Trial]] = {}
        for t in trials:
            if t.phase == phase:
                by_shape.setdefault((t.n, t.k), []).append(t)
        for (n, k), ts in sorted(by_shape.items()):
            win = min(ts, key=lambda t: t.seconds)
            base = next((t.seconds for t in ts if t.config == default), None)
            out[phase][f"{n}x{k}"] = {"mr": win.config.mr, "nv": win.config.nv,
                                      "seconds": win.seconds, "default_seconds": base}
    return out


def save(path: Path, table: dict, target: CpuTarget, *, m: int, threads: int) -> None:
    doc = {"format": FORMAT, "kernel": "packed_linear", "target": target.tvm_dict(),
           "prefill_rows": m, "threads": threads, **table}
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load_configs(path: Path) -> dict[str, KernelConfigs]:
    """Entry point -> KernelConfigs with the tuned per-shape tilings (for codegen.build)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise KilnError(f"{path}: not a kiln tuning file ({e.__class__.__name__})") from e
    if doc.get("format") != FORMAT or doc.get("kernel") != "packed_linear":
        raise KilnError(f"{path}: not a kiln tuning file of format {FORMAT}")
    from dataclasses import replace

    configs = {}
    for entry, phase in (("prefill", "prefill"), ("prefill_last", "prefill"),
                         ("decode", "decode")):
        table = []
        for shape, c in doc.get(phase, {}).items():
            try:
                n, k = (int(v) for v in shape.split("x"))
                table.append(((n, k), plin.PackedConfig(int(c["mr"]), int(c["nv"]))))
            except (ValueError, KeyError, TypeError) as e:
                raise KilnError(f"{path}: bad {phase} entry {shape!r}: {e}") from e
        configs[entry] = replace(PHASE_CONFIGS[phase], packed_by_shape=tuple(table))
    return configs
