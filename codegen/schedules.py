"""Schedule spaces: every hot kernel's tunable knobs, the default a cost model picks, and the
tuning database `kiln tune` writes and `kiln compile --tuning` reads.

A kernel family (say `cpu.packed_linear`) registers a `Space`: typed knobs with their choices,
a `default` (the cost model: a config from the instance's shape and the target, no measurement)
and a `valid` filter (a tiling that does not divide the shape, a block larger than shared
memory). A lowering asks `ctx.schedules.pick(kernel, shape)` for the config of one kernel
instance; the answer comes from the database when it holds that target, kernel and shape
bucket, else from the space's default, and every pick is recorded for the manifest.

The database is keyed by target (kind, arch, dtype, threads on a CPU, kiln version), kernel and
shape bucket, so one tuning run serves every model with the same shapes. A file written for
another target or kiln version is ignored with one warning line, never applied.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.compiler.errors import KilnError
from kiln.runtime import tuning_file

FORMAT = tuning_file.FORMAT
Config = dict[str, Any]
Shape = Mapping[str, Any]  # named dims and flags of one kernel instance: {"phase", "n", "k"...}


@dataclass(frozen=True, slots=True)
class Knob:
    """One tunable parameter and the values it may take (ints, bools or short strings)."""

    name: str
    choices: tuple

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"knob {self.name}: no choices")


@dataclass(frozen=True, slots=True)
class Space:
    """The search space of one kernel family on one target kind."""

    kernel: str  # "<target kind>.<family>", e.g. "cpu.packed_linear", "cuda.gemv"
    knobs: tuple[Knob, ...]
    default: Callable[[Shape, Any], Config]  # (shape, target) -> config, the cost model
    valid: Callable[[Shape, Config, Any], bool] = lambda shape, config, target: True
    #: dims that vary at run time (prefill rows): bucketed by powers of two in the database key
    dynamic: tuple[str, ...] = ()
    doc: str = ""
    #: the kernel alone, for measuring: (shape, config, target) -> tirx.PrimFunc whose symbolic
    #: dims are tirx.Vars named after keys of `shape`; its last `outputs` params are written
    build: Callable[[Shape, Config, Any], Any] | None = None
    outputs: int = 1
    #: its arguments when seeded random values of each param's dtype will not do (indices,
    #: packed metadata): (shape, numpy Generator) -> one numpy array per param, outputs included
    make_args: Callable[[Shape, Any], list] | None = None
    #: values of the built kernel's symbolic dims and scalar params by name, where they are not
    #: the shape's own keys (attention's batch and cache capacity): shape -> {name: int}
    bind: Callable[[Shape], dict[str, int]] | None = None
    #: configs `kiln tune` measures per instance at least (its cap applies to spaces without)
    max_candidates: int | None = None
    #: other shapes the same built kernel serves and `kiln tune` measures it at too (values of
    #: its run-time dims only: a decode entry's span of cached lengths): shape -> shapes. A
    #: candidate then wins only where it is no slower than the default at any of them
    probes: Callable[[Shape], list[Shape]] | None = None

    def dims(self, shape: Shape) -> dict[str, int]:
        """Values for the symbolic dims and scalar params of `build`'s PrimFunc."""
        own = {k: v for k, v in shape.items() if isinstance(v, int) and not isinstance(v, bool)}
        return {**own, **(self.bind(shape) if self.bind is not None else {})}

    def configs(self, shape: Shape, target) -> list[Config]:
        """Every valid config for `shape`, the default first."""
        first = self.default(shape, target)
        rest = (dict(zip([k.name for k in self.knobs], values, strict=True))
                for values in itertools.product(*(k.choices for k in self.knobs)))
        return [first] + [c for c in rest if c != first and self.valid(shape, c, target)]

    def check(self, config: Config) -> Config:
        """`config` with every knob present and within its choices (a tuning file's entry)."""
        names = {k.name for k in self.knobs}
        if set(config) != names:
            raise KilnError(f"{self.kernel}: config {config} has knobs {sorted(config)}, "
                            f"expected {sorted(names)}")
        for k in self.knobs:
            if config[k.name] not in k.choices:
                raise KilnError(f"{self.kernel}: {k.name}={config[k.name]!r} is not one of "
                                f"{list(k.choices)}")
        return dict(config)


SPACES: dict[str, Space] = {}


def register(space: Space) -> Space:
    if space.kernel in SPACES and SPACES[space.kernel] != space:
        raise ValueError(f"schedule space {space.kernel} registered twice")
    SPACES[space.kernel] = space
    return space


def space(kernel: str) -> Space:
    try:
        return SPACES[kernel]
    except KeyError:
        raise KilnError(f"no schedule space {kernel!r} (known: {sorted(SPACES)})") from None


def bucket(shape: Shape, dynamic: tuple[str, ...] = ()) -> str:
    """The database key of a shape: `k=v` sorted by name; dynamic dims rounded up to a power of
    two (a tuning at 512 prefill rows serves 300)."""
    parts = []
    for name in sorted(shape):
        v = shape[name]
        if name in dynamic and isinstance(v, int) and v > 0:
            v = 1 << math.ceil(math.log2(v))
        parts.append(f"{name}={v}")
    return ",".join(parts)


def target_key(target) -> dict[str, Any]:
    """What a tuning result depends on besides the kernel and its shape."""
    from kiln.compiler.compile import _kiln_version

    if target.kind == "cpu":
        key = {"kind": "cpu", "arch": target.mcpu, "dtype": "float32",
               "threads": target.threads}
    else:
        key = {"kind": target.kind, "arch": target.arch, "dtype": target.dtype}
    return {**key, "kiln": _kiln_version()}


@dataclass(slots=True)
class Choice:
    """One kernel instance's schedule, as the manifest records it."""

    kernel: str
    shape: str  # its bucket
    config: Config
    source: str  # "tuned" | "default"
    dims: dict[str, Any] = field(default_factory=dict)  # the shape dict itself (for `kiln tune`)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "shape": self.shape, "config": self.config,
                "source": self.source}


@dataclass(slots=True)
class TuningDB:
    """Measured winners: kernel -> bucket -> {"config", "seconds", "default_seconds"}."""

    target: dict[str, Any]
    entries: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def lookup(self, kernel: str, key: str) -> Config | None:
        """The winner measured for `kernel` at bucket `key`, if any. An entry measured when
        the space had other knobs (an older kiln of the same version) is ignored with one
        warning; a knob value outside its choices is an error (a damaged file)."""
        entry = self.entries.get(kernel, {}).get(key)
        if entry is None:
            return None
        sp = space(kernel)
        if set(entry["config"]) != {k.name for k in sp.knobs}:
            warnings.warn(f"tuning entry {kernel} [{key}] has knobs {sorted(entry['config'])}, "
                          f"the space now {sorted(k.name for k in sp.knobs)}: ignored, the "
                          "cost model decides (re-run `kiln tune`)", stacklevel=2)
            return None
        return sp.check(entry["config"])

    def record(self, kernel: str, key: str, config: Config, seconds: float,
               default_seconds: float | None) -> None:
        self.entries.setdefault(kernel, {})[key] = {
            "config": config, "seconds": seconds, "default_seconds": default_seconds}

    def prefill_rows(self) -> set[int]:
        """The prompt lengths (row buckets) prefill kernels were measured at."""
        rows = set()
        for buckets in self.entries.values():
            for key in buckets:
                dims = dict(part.split("=", 1) for part in key.split(","))
                if dims.get("phase") == "prefill":
                    rows.update(int(dims[d]) for d in ("m", "s") if d in dims)
        return rows

    def save(self, path: Path) -> None:
        """Atomically (a resumed or interrupted tuning never leaves half a file)."""
        tuning_file.write(path, self.target, self.entries)

    @classmethod
    def load(cls, path: Path) -> TuningDB:
        return cls(*tuning_file.read(path))

    def for_target(self, target, path: Path | str = "tuning file") -> TuningDB | None:
        """This database if it was measured on `target` (same kind, arch, dtype, threads and
        kiln version), else None after one warning line naming what differs."""
        want = target_key(target)
        diff = [f"{k} {self.target.get(k)!r} != {v!r}" for k, v in want.items()
                if self.target.get(k) != v]
        if diff:
            warnings.warn(f"{path}: measured on another target ({', '.join(diff)}); "
                          "ignored, the cost model decides", stacklevel=2)
            return None
        return self


class Schedules:
    """What the lowerings ask for a kernel instance's config; records every pick."""

    def __init__(self, target, db: TuningDB | None = None) -> None:
        self.target = target
        self.db = db
        self.choices: dict[tuple[str, str], Choice] = {}

    def pick(self, kernel: str, shape: Shape) -> Config:
        sp = space(kernel)
        key = bucket(shape, sp.dynamic)
        config = self.db.lookup(kernel, key) if self.db is not None else None
        source = "tuned"
        if config is None or not sp.valid(shape, config, self.target):
            config, source = sp.default(shape, self.target), "default"
        self.choices[(kernel, key)] = Choice(kernel, key, config, source, dict(shape))
        return dict(config)

    def manifest(self) -> list[dict[str, Any]]:
        return [c.to_dict() for _, c in sorted(self.choices.items())]

    def instances(self) -> list[Choice]:
        """Every kernel instance picked so far, one per kernel and bucket (what `kiln tune`
        measures)."""
        return [c for _, c in sorted(self.choices.items())]
