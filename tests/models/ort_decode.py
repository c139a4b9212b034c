"""Run optimum-style `text-generation-with-past` ONNX decoders in onnxruntime (prefill, decode)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

Past = dict[str, np.ndarray]


def session(path: Path | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def empty_past(sess: ort.InferenceSession, batch: int) -> Past:
    """Zero-length past for every past_key_values.* input (kv_heads and head_dim from the graph)."""
    past = {}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            _, kv_heads, _, head_dim = inp.shape
            past[inp.name] = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
    return past


def positions(mask: np.ndarray, seq: int) -> np.ndarray:
    """Hugging Face position ids for the last `seq` tokens: cumsum(mask) - 1, pads at 1."""
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return pos[:, -seq:].astype(np.int64)


def step(sess: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray,
         past: Past) -> tuple[np.ndarray, Past]:
    """One forward: new tokens `ids` [b, s], full `mask` [b, past + s]; returns logits, present."""
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
            "position_ids": positions(mask, ids.shape[1]), **past}
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feed), strict=True))
    present = {k.replace("present.", "past_key_values.", 1): v for k, v in outs.items()
               if k.startswith("present.")}
    return outs["logits"], present


def greedy(sess: ort.InferenceSession, prompt: list[int], n: int,
           eos: int | None = None) -> list[int]:
    """Greedy decode with the KV cache; returns only the generated ids."""
    ids = np.array([prompt], np.int64)
    mask = np.ones_like(ids)
    logits, past = step(sess, ids, mask, empty_past(sess, 1))
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(logits[0, -1]))
        out.append(nxt)
        if nxt == eos:
            break
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits, past = step(sess, np.array([[nxt]]), mask, past)
    return out
