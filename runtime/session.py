"""A loaded artifact on a device: prefill and decode over a KV cache that lives with the session.

    session = Session.load("out/smollm2")
    logits = session.prefill([[1, 2, 3]])    # (batch, seq, vocab); the cache now holds 3 tokens
    logits = session.decode([4])             # (batch, 1, vocab); one token per sequence
    logits = session.prefill_batch([[1, 2, 3], [5, 6]])  # (batch, vocab): prompts of any lengths
    tokens = session.decode_greedy(logits.argmax(-1))    # every row at its own position

The KV cache is one preallocated buffer per layer and per key/value, (batch, kv_heads,
capacity, head_dim), which the compiled kernels write in place; `past` counts the tokens in it
(the shortest row's: row i of a batch of unequal lengths holds past + offsets[i], offsets >= 0,
which the entry points take after past where the artifact's target has `row_offsets`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af
from kiln.runtime import limits
from kiln.runtime.params import bfloat16_dtype, read_safetensors, synthetic_params
from kiln.runtime.tvm_runtime import import_tvm, load_cuda_runtime

if TYPE_CHECKING:
    from kiln.runtime.generate import Generation

CONSTANTS = "constants.safetensors"


def row_entry(entry: str, rows: int, buckets: Sequence[int]) -> str:
    """The entry point that runs `entry` for `rows` new tokens per sequence, given the row
    buckets the artifact's prefill entries were scheduled for (its manifest's `prefill_rows`,
    the plain entries' first; see kiln.codegen.build): the bucket nearest to the rows' power of
    two on a log scale, ties to the larger. Decode (one row) has a single entry."""
    if not entry.startswith("prefill") or len(buckets) < 2:
        return entry
    want = math.ceil(math.log2(max(rows, 1)))
    best = min(buckets, key=lambda r: (abs(math.log2(r) - want), -r))
    return entry if best == buckets[0] else f"{entry}_{best}"


def context_entry(entry: str, cached: int, contexts: Sequence[int]) -> str:
    """The decode entry point for rows of up to `cached` tokens in the cache, given the cached
    lengths the artifact's decode entries were scheduled for (its manifest's `decode_past`,
    the plain `decode`'s first): the nearest on a log scale, ties to the longer. Prefill and
    artifacts with one decode entry: `entry` itself."""
    if entry != "decode" or len(contexts) < 2:
        return entry
    want = math.log2(max(cached, 1))
    best = min(contexts, key=lambda c: (abs(math.log2(c) - want), -c))
    return entry if best == contexts[0] else f"{entry}_{best}"


class Session:
    def __init__(self, art: af.Artifact, vm, device, params: tuple, tvm):
        self.artifact, self._vm, self._dev, self._params, self._tvm = art, vm, device, params, tvm
        sig = art.signature
        self.inputs = [i["name"] for i in sig["inputs"]]
        self.caches_spec = sig["caches"]
        self.capacity = art.max_seq
        self.past = 0
        self.batch = 0
        #: per row: its cached length minus `past` (0 for all, unless prefill_batch was given
        #: prompts of unequal lengths); the CUDA entry points take `row_offsets` of them
        self.offsets = np.zeros(0, np.int64)
        self._row_offsets = int(art.manifest["target"].get("row_offsets", 0))
        self._caches: tuple = ()
        # CUDA: a captured decode graph holds the addresses of the caches it was captured with,
        # so caches are made once per batch size and kept (never reallocated)
        self._cuda = art.manifest["target"].get("kind") == "cuda"
        self._cache_pool: dict[int, tuple] = {}
        self._inputs: dict[tuple, object] = {}  # CUDA decode: (name, shape) -> device tensor
        # the last greedy tokens (host copy, device tensor): fed back as they are when the
        # next step's tokens are these (no copy to the device, no checks: ids from argmax)
        self._greedy: tuple | None = None

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", *, synthetic_weights: int | None = None,
             threads: int | None = None, verify: bool = True) -> Session:
        art = af.open_artifact(path, verify=verify, check_target=can_run)
        limits.check_fits(art)  # before anything is allocated
        tvm = import_tvm(threads)
        if art.manifest["target"]["kind"] == "cuda":
            load_cuda_runtime(tvm)
            device = "cuda"
        dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        try:
            lib = _load_kernels(tvm, art.file(af.KERNELS))
            vm = tvm.runtime.vm.VirtualMachine(lib, dev)
        except Exception as e:
            raise KilnError(f"{art.file(af.KERNELS)}: cannot load kernels: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        arrays = _param_arrays(art, synthetic_weights)
        dtypes = {p["name"]: p["dtype"] for p in art.manifest["params"]}
        params = tuple(upload(tvm, arrays[n], dtypes[n], dev) for n in art.signature["params"])
        return cls(art, vm, dev, params, tvm)

    @property
    def device(self):  # a tvm Device
        return self._dev

    @property
    def tvm(self):  # the tvm module (runtime-only)
        return self._tvm

    @property
    def vocab(self) -> int | None:
        return self.artifact.manifest["architecture"].get("vocab")

    # -- running --------------------------------------------------------------------------
    def reset(self, batch: int | None = None) -> None:
        """Forget the cache contents (and resize it to `batch` rows)."""
        self.past = 0
        self._greedy = None
        self.offsets = np.zeros(batch if batch is not None else self.batch, np.int64)
        if batch is not None and batch != self.batch:
            if batch > 1:
                limits.check_fits(self.artifact, batch=batch)
            self.batch = batch
            if self._cuda:
                self._caches = self._cuda_caches(batch)
                return
            self._caches = tuple(
                self._tvm.runtime.tensor(np.zeros((batch, c["kv_heads"], self.capacity,
                                                   c["head_dim"]), c["dtype"]), self._dev)
                for c in self.caches_spec)

    def _cuda_caches(self, batch: int) -> tuple:
        limit = int(self.artifact.manifest["target"].get("max_batch", 1))
        if batch > limit:
            raise KilnError(f"batch {batch} > {limit}, the largest this CUDA artifact's decode "
                            "step was planned for")
        if batch not in self._cache_pool:
            self._cache_pool[batch] = tuple(
                self._tvm.runtime.empty((batch, c["kv_heads"], self.capacity, c["head_dim"]),
                                        c["dtype"], self._dev) for c in self.caches_spec)
        return self._cache_pool[batch]

    def prefill(self, tokens, *, last_only: bool = False) -> np.ndarray:
        """Run a prompt from an empty cache; returns logits (batch, seq, vocab), or with
        `last_only` (batch, 1, vocab) for the last position, computed for it alone."""
        ids = np.atleast_2d(_token_array(tokens))
        self.reset(ids.shape[0])
        last = last_only and "prefill_last" in self.artifact.manifest["entry_points"]
        logits = self._step("prefill_last" if last else "prefill", ids)
        return logits[:, -1:] if last_only else logits

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Run several prompts of any lengths from an empty cache, one batch row each; returns
        the logits of each row's last position (batch, vocab). Then `decode`/`decode_greedy`
        take one token per row, each row at its own position. Prompts of one length run as
        one batch (`prefill`); else (CUDA artifacts) each runs alone into the cache of a
        single sequence, which is then copied into its row of the batch's cache."""
        rows = [np.asarray(_token_array(p)).reshape(-1) for p in prompts]
        lens = np.array([len(r) for r in rows], np.int64)
        if not rows or lens.min() == 0:
            raise KilnError("prefill_batch: no prompts, or an empty one; each needs a token")
        if lens.max() > self.capacity:
            raise KilnError(f"prefill_batch: a prompt of {lens.max()} tokens exceeds the "
                            f"context of {self.capacity} (compiled with --max-seq "
                            f"{self.capacity})")
        if (lens == lens[0]).all():
            return self.prefill(np.stack(rows), last_only=True)[:, -1]
        if not self._row_offsets:
            raise KilnError(f"prefill_batch: prompts of unequal lengths ({lens.tolist()} "
                            "tokens) but this artifact runs prompts of one length only ("
                            + ("a CPU artifact" if not self._cuda else "compiled before batches "
                               "of unequal lengths") + "); run them one by one")
        batch = self._cuda_caches(len(rows))  # (refuses more rows than max_batch)
        logits = []
        for r, ids in enumerate(rows):
            logits.append(self.prefill(ids[None], last_only=True)[0, -1])
            for big, one in zip(batch, self._caches, strict=True):
                view = big._create_view(tuple(one.shape), relative_byte_offset=r * _nbytes(one))
                view.copyfrom(one)
        self.batch, self._caches = len(rows), batch
        self.past = int(lens.min())
        self.offsets = lens - self.past
        self._greedy = None
        return np.stack(logits)

    @property
    def row_lengths(self) -> np.ndarray:
        """Tokens cached per batch row."""
        return self.past + self.offsets

    def extend(self, tokens, *, last_only: bool = False) -> np.ndarray:
        """Append several tokens per sequence to a non-empty cache (chunked prefill, a chat's
        next turn); `last_only` as for prefill."""
        self._equal_rows("extend")
        ids = np.atleast_2d(_token_array(tokens))
        last = last_only and "prefill_last" in self.artifact.manifest["entry_points"]
        logits = self._step("prefill_last" if last else "prefill", ids)
        return logits[:, -1:] if last_only else logits

    def rewind(self, past: int) -> None:
        """Keep only the first `past` cached tokens (the kernels read positions below `past`
        alone, and the next step overwrites what follows)."""
        if not 0 <= past <= self.past:
            raise KilnError(f"cannot rewind a cache of {self.past} tokens to {past}")
        self._equal_rows("rewind")
        self.past = past
        self._greedy = None

    def _equal_rows(self, what: str) -> None:
        if self.offsets.any():
            raise KilnError(f"{what}: the batch's rows hold unequal lengths "
                            f"({self.row_lengths.tolist()} tokens; prefill_batch); only decode "
                            "continues them")

    @property
    def threads(self) -> int | None:
        """Threads of TVM's CPU pool (None on CUDA, where kernels run on the GPU)."""
        return None if self._cuda else int(self._tvm.runtime.num_threads())

    def decode(self, tokens) -> np.ndarray:
        """One token per sequence; returns logits (batch, 1, vocab)."""
        ids = _token_array(tokens).reshape(-1, 1)
        return self._step("decode", ids)

    def decode_greedy(self, tokens) -> np.ndarray:
        """One token per sequence; returns the argmax token ids (batch,). Where the artifact's
        decode also returns them (CUDA), the argmax runs on the device and only the ids are
        copied back; else it is the host argmax of `decode`'s logits."""
        if not self.artifact.manifest["target"].get("decode_greedy"):
            return self.decode(tokens)[:, -1].argmax(-1)
        return self._step("decode", _token_array(tokens).reshape(-1, 1), output=1)[:, 0]

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop: Sequence[int] | None = None) -> Generation:
        """Continue `prompt` (text, or token ids) from an empty cache: a Generation with the
        new tokens, their text and timing. Greedy unless `temperature` > 0; `stop`: token ids
        that end it (default: the artifact's end-of-sequence tokens; `()`: none)."""
        from kiln.runtime.generate import generate_text

        return generate_text(self, prompt, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             stop=stop)

    def _step(self, entry: str, ids: np.ndarray, output: int = 0) -> np.ndarray:
        b, s = ids.shape
        if s == 0 or b == 0:
            raise KilnError(f"{entry}: no tokens (an empty prompt or batch); at least one is "
                            "needed")
        if not self._caches or b != self.batch:
            raise KilnError(f"{entry}: batch {b} does not match the cache's {self.batch} "
                            "(call prefill first)")
        longest = int(self.row_lengths.max(initial=self.past))
        if longest + s > self.capacity:
            raise KilnError(f"context exceeded: {longest} cached + {s} new tokens > "
                            f"{self.capacity} (compiled with --max-seq {self.capacity})")
        chained = (entry == "decode" and self._greedy is not None and self.inputs == [
            "input_ids"] and self._greedy[0].shape == ids.shape and
            np.array_equal(self._greedy[0], ids))
        vocab = self.vocab
        if not chained and vocab and (ids.min() < 0 or ids.max() >= vocab):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise KilnError(f"token id {bad} out of range for a vocab of {vocab} (ids are "
                            f"0..{vocab - 1})")
        tvm = self._tvm
        fn = context_entry(row_entry(entry, s, self.artifact.manifest.get("prefill_rows", ())),
                           longest, self.artifact.manifest.get("decode_past", ()))
        args = [tvm.runtime.ShapeTuple([self.past, *self._offsets_arg(entry)])]
        args += [self._greedy[1] if chained else
                 self._device_input(name, self._feed(name, ids),
                                    reuse=self._cuda and entry == "decode")
                 for name in self.inputs]
        try:
            out = self._vm[fn](*args, self._caches, self._params)
        except Exception as e:  # TVM's checks of arity, shapes, dtypes: a manifest that
            # does not describe its kernels (edited, or from another artifact)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KilnError(f"{self.artifact.path}: the kernels refused the {entry} call "
                            f"(manifest and kernels disagree?): {first}") from e
        self.past += s
        self._greedy = None
        if not hasattr(out, "numpy"):  # several outputs come back as an array of tensors
            out = out[output]
            if entry == "decode" and output == 1:
                self._greedy = (out.numpy(), out)
                return self._greedy[0]
        return out.numpy()

    def _offsets_arg(self, entry: str) -> list[int]:
        """The row offsets the entry points take after past (the artifact's `row_offsets` of
        them; rows beyond the batch 0); prefill runs equal rows."""
        if not self._row_offsets:
            return []
        out = [0] * self._row_offsets
        if entry == "decode":
            out[:len(self.offsets)] = self.offsets.tolist()
        return out

    def _device_input(self, name: str, value: np.ndarray, *, reuse: bool):
        """A device tensor holding `value`; with `reuse`, one kept per name and shape and
        overwritten (no device allocation per decode step)."""
        if not reuse:
            return self._tvm.runtime.tensor(value, self._dev)
        key = (name, value.shape, str(value.dtype))
        if key not in self._inputs:
            self._inputs[key] = self._tvm.runtime.empty(value.shape, str(value.dtype), self._dev)
        self._inputs[key].copyfrom(value)
        return self._inputs[key]

    def _feed(self, name: str, ids: np.ndarray) -> np.ndarray:
        b, s = ids.shape
        if name == "input_ids":
            return ids
        if name == "attention_mask":
            return np.ones((b, self.past + s), np.int64)
        if name == "position_ids":
            return np.broadcast_to(np.arange(self.past, self.past + s), (b, s)).copy()
        raise KilnError(f"the runtime cannot feed graph input {name}")


#: kernels path -> ((inode, size, mtime), loaded module): each load of a module grew the
#: process by about 2 MiB that closing the session never gave back (seen: 100 sessions opened
#: and closed, +235 MiB); one module per file serves every session's VM
_MODULES: dict[str, tuple[tuple[int, int, int], object]] = {}


def _load_kernels(tvm, path: Path):
    st = path.stat()
    key, name = (st.st_ino, st.st_size, st.st_mtime_ns), str(path.resolve())
    cached = _MODULES.get(name)
    if cached is None or cached[0] != key:  # a recompiled artifact: load the new file
        _MODULES.pop(name, None)
        _MODULES[name] = (key, tvm.runtime.load_module(str(path)))
    return _MODULES[name][1]


def _nbytes(t) -> int:
    """Bytes of a device tensor (a row of a batched cache: byte offset of the next row)."""
    return math.prod(t.shape) * np.dtype(str(t.dtype) if str(t.dtype) != "bfloat16"
                                         else np.uint16).itemsize


def _token_array(tokens) -> np.ndarray:
    """Token ids as int64, or a one-line error (ids beyond int64, or not integers at all)."""
    try:
        return np.asarray(tokens, np.int64)
    except (OverflowError, ValueError, TypeError) as e:
        raise KilnError(f"token ids must be integers within the vocabulary ({e})") from e


def _param_arrays(art: af.Artifact, synthetic: int | None) -> dict[str, np.ndarray]:
    table = art.manifest["params"]
    arrays = read_safetensors(art.file(CONSTANTS)) if CONSTANTS in art.manifest["files"] else {}
    weights = [p for p in table if p["file"] == af.PARAMS]
    if synthetic is not None:
        arrays.update(synthetic_params(weights, synthetic))
    elif weights:
        if not art.has_params:
            raise KilnError(f"{art.path}: compiled without weights; run `kiln convert` (in a "
                            "bundle: `kiln_run.py convert --weights FILE`) or pass "
                            "--synthetic-weights SEED")
        arrays.update(read_safetensors(art.file(af.PARAMS)))
    missing = [p["name"] for p in table if p["name"] not in arrays]
    if missing:
        raise KilnError(f"{art.path}: parameter file lacks {missing[0]} "
                        f"({len(missing)} missing; mismatched artifact?)")
    for p in table:
        a = arrays[p["name"]]
        if list(a.shape) != p["shape"] or not _is_dtype(a, p["dtype"]):
            raise KilnError(f"{art.path}: parameter {p['name']} is {a.dtype}{list(a.shape)}, "
                            f"the manifest says {p['dtype']}{p['shape']}")
    return arrays


def _is_dtype(a: np.ndarray, dtype: str) -> bool:
    """Whether `a` holds the manifest's `dtype`: bfloat16 arrives as ml_dtypes' type or, where
    numpy alone is installed, as its uint16 bits (kiln.runtime.params.bfloat16_dtype)."""
    return a.dtype == bfloat16_dtype() if dtype == "bfloat16" else str(a.dtype) == dtype


def upload(tvm, a: np.ndarray, dtype: str, dev):
    """A device tensor of `dtype` holding `a` (bfloat16 from its 16-bit patterns)."""
    a = np.require(a, requirements="C")
    if dtype == "bfloat16":  # TVM copies bfloat16 from the raw bits, whatever numpy calls them
        return tvm.runtime.empty(a.shape, "bfloat16", dev).copyfrom(a)
    return tvm.runtime.tensor(a, dev)


def can_run(target: dict) -> str | None:
    """Why this machine cannot run kernels built for `target` (None when it can)."""
    if target.get("kind") == "cuda":
        if not any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl")):
            return "no NVIDIA GPU here"
        return None
    if target.get("kind") not in ("llvm", "cpu"):
        return f"unknown target kind {target.get('kind')!r}"
    flags = _cpu_flags()
    missing = [f for f in target.get("cpu_flags", []) if f not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    return None


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^(flags|Features)\s*:(.*)$", text, re.MULTILINE)
    return set(m.group(2).split()) if m else set()


