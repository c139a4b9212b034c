"""The calibration windows of calibrated passes: GPTQ (`--quant`), `-auto`'s sensitivity,
SparseGPT and Wanda (`--sparsity`).

The calibration texts ship under models/data (provenance: models/data/EVAL_TEXT.md); they are
joined by a blank line, tokenized with the model's own tokenizer (tokenizer.json beside it) and
cut into CALIBRATION_WINDOWS windows of CALIBRATION_WINDOW tokens. None of kiln's evaluation
texts (eval*.txt) is, or holds a piece of, a calibration text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

#: the calibration texts, in models/data, in order: fiction with dialogue, scientific prose, C
#: source and a changelog's lists (until session 9 `calibration.txt`, fiction and optics alone:
#: w4g32 and SparseGPT generalized worse to other domains, benchmarks/RESULTS.md "Calibration
#: that generalizes")
CALIBRATION_TEXTS = ("calibration_mixed.txt",)
#: windows of this many tokens (fewer when the context is shorter), at most this many windows
CALIBRATION_WINDOW, CALIBRATION_WINDOWS = 512, 16


def calibration_text(texts: Sequence[str | Path] = CALIBRATION_TEXTS) -> str:
    """The texts (names in models/data, or absolute paths) joined by a blank line."""
    import kiln.models

    data = Path(kiln.models.__file__).parent / "data"
    return "\n\n".join((data / t).read_text() for t in texts)


def windows(ids: Sequence[int], window: int = CALIBRATION_WINDOW,
            count: int = CALIBRATION_WINDOWS) -> tuple[np.ndarray, ...]:
    """The first `count` whole windows (1, window) of the token ids."""
    ids = np.asarray(ids, np.int64)
    return tuple(ids[i * window:(i + 1) * window][None]
                 for i in range(min(len(ids) // window, count)))


def calibration(model: str | Path, progress: Callable[[str], None],
                max_seq: int = CALIBRATION_WINDOW, *,
                texts: Sequence[str | Path] = CALIBRATION_TEXTS,
                count: int = CALIBRATION_WINDOWS) -> tuple[np.ndarray, ...]:
    """Token windows (1, T) of the calibration texts, tokenized with the model's own tokenizer
    (tokenizer.json beside it); () without one (weights are then rounded to nearest)."""
    tok_path = Path(model).with_name("tokenizer.json")
    if not tok_path.exists():
        progress("no tokenizer.json beside the model: quantizing without calibration (RTN)")
        return ()
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tok_path)).encode(calibration_text(texts)).ids
    n = min(CALIBRATION_WINDOW, max_seq)  # positions past the context have no table rows
    out = windows(ids, n, count)
    progress(f"calibrating on {len(out) * n} tokens")
    return out
