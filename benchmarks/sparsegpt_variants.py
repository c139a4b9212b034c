"""SparseGPT variants measured in session 10 (benchmarks/logs/sparsegpt_refine_session10.md):
benchmarks/sparsity_quality.py --via onnx with kiln's SparseGPT replaced by a variant.

    VARIANT=mask=rolling,damp=0.1,cg=30 python benchmarks/sparsegpt_variants.py MODEL.onnx \\
        --via onnx --levels 0.5 --methods sparsegpt --quant none --work DIR

VARIANT (comma-separated, each optional): mask=block (kiln's sweep) | rolling (each row's count
over the whole row, re-planned at every block from the corrected weights); damp=F (of H's mean
diagonal; default 0.01, the session-9 value); cg=N (conjugate-gradient steps re-solving the
kept entries, kiln.passes.gptq.refit; default 0); asym=1 (each weight's target moved to the
dense model's output before the sweep: W C H^-1, C = X_dense^T X_pruned).

Session 11 (same log, "Session 11 variants"): mask=wanda (Wanda's mask, the least
|W[n, k]| * ||X[:, k]||_2 of every row, fixed up front; the kept entries as they are, or re-solved
with cg=N) | wandasweep (that fixed mask, the sweep's corrections applied under it before any
refit) | mixed (the sweep, each block's mask chosen by Wanda's score on the corrected weights,
W^2 * H_jj, instead of W^2 / U_jj^2; alpha=A blends them, W^2 * H_jj^A / U_jj^(2 (1 - A)),
default 1); rdamp=F (the refit's dampening, default damp's: the mask
from the sweep at damp, the kept entries re-solved with H dampened by rdamp); window=T (calibration
windows of T tokens, as many as keep the total at 8,192: window=1024 -> 8 x 1024).

Session 12: order=act (the sweep takes the columns in descending order of H's diagonal, GPTQ's
"act order", the mask and corrections computed in that order, then put back).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import kiln.compiler.calibration as C
import kiln.passes.gptq as G
import kiln.passes.prune_weights as PW
from kiln.compiler.interpreter import run
from kiln.compiler.ir import Inline
from kiln.runtime.pruning import mask, smallest

OPTS = dict(kv.split("=") for kv in os.environ.get("VARIANT", "").split(",") if kv)
MASK, DAMP = OPTS.get("mask", "block"), float(OPTS.get("damp", "0.01"))
CG, ASYM = int(OPTS.get("cg", "0")), OPTS.get("asym", "0") == "1"
RDAMP = float(OPTS.get("rdamp", DAMP))
WINDOW = int(OPTS.get("window", "0"))
ALPHA = float(OPTS.get("alpha", "1"))
ORDER = OPTS.get("order", "")


def _sweep_block(W, U, out, pruned, P1, b0: int, b1: int) -> None:
    """Columns b0:b1 pruned by P1 in turn (each one's error pushed onto the block's later
    columns), then the block's errors onto the columns after it; W, out, pruned updated."""
    W1, E, d = W[:, b0:b1].copy(), np.zeros((W.shape[0], b1 - b0)), np.diag(U)[b0:b1]
    for i in range(b1 - b0):
        w = W1[:, i]
        out[:, b0 + i] = q = np.where(P1[:, i], 0.0, w)
        E[:, i] = e = (w - q) / d[i]
        W1[:, i + 1:] -= np.outer(e, U[b0 + i, b0 + i + 1:b1])
    pruned[:, b0:b1] = P1
    W[:, b1:] -= E @ U[b0:b1, b1:]


def sweep_rolling(W: np.ndarray, U: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The sweep with each row's `count` spread over the blocks as the smallest W^2 / U_jj^2 of
    all the columns not yet swept choose at the start of each block."""
    n, k = W.shape
    W, out, pruned = W.copy(), np.zeros((n, k)), np.zeros((n, k), bool)
    d_all, remaining = np.diag(U), np.full(n, count)
    for b0 in range(0, k, G.BLOCK):
        b1 = min(b0 + G.BLOCK, k)
        score = W[:, b0:] ** 2 / d_all[b0:] ** 2
        rank = np.argsort(np.argsort(score, axis=1, kind="stable"), axis=1, kind="stable")
        P1 = (rank < remaining[:, None])[:, :b1 - b0]
        remaining = remaining - P1.sum(1)
        _sweep_block(W, U, out, pruned, P1, b0, b1)
    return out, pruned


def sweep_mixed(W: np.ndarray, U: np.ndarray, hd: np.ndarray, count: int,
                ) -> tuple[np.ndarray, np.ndarray]:
    """The block sweep with each block's row-uniform mask chosen by Wanda's score on the
    corrected weights, W^2 * H_jj (hd: H's undamped diagonal), instead of W^2 / U_jj^2, or
    with alpha < 1 by the blend W^2 * H_jj^alpha / U_jj^(2 (1 - alpha))."""
    n, k = W.shape
    W, out, pruned = W.copy(), np.zeros((n, k)), np.zeros((n, k), bool)
    d_all = np.diag(U)
    weight = hd ** ALPHA / d_all ** (2 * (1 - ALPHA))
    for b0 in range(0, k, G.BLOCK):
        b1 = min(b0 + G.BLOCK, k)
        share = round(count * b1 / k) - round(count * b0 / k)
        P1 = smallest(W[:, b0:b1] ** 2 * weight[b0:b1], share)
        _sweep_block(W, U, out, pruned, P1, b0, b1)
    return out, pruned


def sparsegpt(w, h, pattern, *, damp=G.DAMP, refine=0) -> np.ndarray:
    k = w.shape[1]
    H, dead = G.hessian(h, k, DAMP)
    W = np.asarray(w, np.float64).copy()
    W[:, dead] = 0.0
    U = G.inverse_factor(H)
    real = np.ones(k, bool)
    if MASK == "rolling" and not pattern.structured:
        out, pruned = sweep_rolling(W, U, pattern.zeros(k))
    elif MASK in ("wanda", "wandasweep"):  # Wanda's score: |W| * ||X[:, k]||_2
        hd = np.diag(np.asarray(h, np.float64))
        pruned = mask(np.abs(W) * np.sqrt(np.maximum(hd, 0.0)), pattern)
        out = np.where(pruned, 0.0, W)
        if MASK == "wandasweep":
            out, pruned = G.sweep(W, U, real=real, fixed=pruned)
    elif MASK == "mixed" and not pattern.structured:
        out, pruned = sweep_mixed(W, U, np.diag(np.asarray(h, np.float64)), pattern.zeros(k))
    elif ORDER == "act" and not pattern.structured:  # columns by descending H_jj
        perm = np.argsort(-np.diag(H), kind="stable")
        back = np.argsort(perm)
        out, pruned = G.sweep(W[:, perm], G.inverse_factor(H[np.ix_(perm, perm)]), real=real,
                              pattern=pattern)
        out, pruned = out[:, back], pruned[:, back]
    else:
        out, pruned = G.sweep(W, U, real=real, pattern=pattern)
    if CG:
        out = G.refit(out, W, H if RDAMP == DAMP else G.hessian(h, k, RDAMP)[0], ~pruned,
                      steps=CG)
    out = out.astype(np.float32)
    out[pruned] = 0.0
    return out


def calibrate_asymmetric(graph, weights, windows, solve) -> dict:
    """gptq.calibrate, each weight solved from W C H^-1 instead of W (dense inputs recorded by
    a first run of the unpruned graph: ~3.2 GB for SmolLM2 on 8,192 tokens)."""
    wanted, ids = set(weights), np.concatenate(windows, axis=0)
    head = lambda n: n.op == "linear" and n.outputs[0] in graph.outputs  # noqa: E731
    dense: dict = {}

    def record(node, values) -> None:
        w = node.inputs[1] if node.op == "linear" and len(node.inputs) > 1 else ""
        if w in wanted and node.inputs[0] not in dense:
            x = np.asarray(values[node.inputs[0]], np.float32)
            dense[node.inputs[0]] = x.reshape(-1, x.shape[-1])

    run(graph, G._feeds(graph, ids), outputs=[], before=record, skip=head)
    solved, out = {}, {}

    def before(node, values) -> None:
        w = node.inputs[1] if node.op == "linear" and len(node.inputs) > 1 else ""
        if w in wanted and w not in solved:
            x = np.asarray(values[node.inputs[0]], np.float64).reshape(-1, values[
                node.inputs[0]].shape[-1])
            out[w] = x.T @ x
            c = dense[node.inputs[0]].astype(np.float64).T @ x
            W = np.asarray(graph.params[w].load(), np.float64)
            H, _ = G.hessian(out[w], W.shape[1], DAMP)
            solved[w] = solve(w, np.linalg.solve(H, (W @ c).T).T.astype(np.float32), out[w])

    run(graph, G._feeds(graph, ids), outputs=[], params=solved, before=before, skip=head)
    SOLVED.update(solved)
    return out


SOLVED: dict = {}
PW.sparsegpt = sparsegpt
if WINDOW:  # calibration() reads these at call time
    C.CALIBRATION_WINDOWS = C.CALIBRATION_WINDOW * C.CALIBRATION_WINDOWS // WINDOW
    C.CALIBRATION_WINDOW = WINDOW
if ASYM:
    G.calibrate = calibrate_asymmetric
    PW._pruned_source = lambda p, config, stat: Inline(SOLVED[p.name])

if __name__ == "__main__":
    print(f"variant mask={MASK} order={ORDER or '-'} damp={DAMP} cg={CG} rdamp={RDAMP} "
          f"alpha={ALPHA} asym={ASYM} "
          f"windows={C.CALIBRATION_WINDOWS} x {C.CALIBRATION_WINDOW}", file=sys.stderr)
    sys.path.insert(0, str(Path(__file__).parent))
    import sparsity_quality

    sparsity_quality.main()
