"""kiln's calibration windows (kiln.compiler.calibration): the shipped texts, how they are cut,
and that no evaluation text (nor a piece of one) is among them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from kiln.compiler import calibration as C
from tests.compiler.test_eval_and_bench import byte_tokenizer

DATA = Path(C.__file__).resolve().parents[1] / "models" / "data"
MODEL = Path(__file__).parent.parent / "data" / "llama-optimum.onnx"


def test_windows_are_whole_and_capped():
    ids = np.arange(10 * 7 + 3)
    wins = C.windows(ids, 7, 4)
    assert [w.shape for w in wins] == [(1, 7)] * 4
    assert np.array_equal(np.concatenate(wins, 1)[0], ids[:28])
    assert len(C.windows(ids, 7, 100)) == 10  # the partial window is dropped


def test_calibration_fills_its_windows(tmp_path):
    shutil.copy(MODEL, tmp_path / MODEL.name)
    said = []
    assert C.calibration(tmp_path / MODEL.name, said.append) == ()  # no tokenizer: RTN
    byte_tokenizer(tmp_path / "tokenizer.json")
    wins = C.calibration(tmp_path / MODEL.name, said.append, max_seq=64)
    # the shipped texts are long enough for every window, and one byte is one token here
    assert [w.shape for w in wins] == [(1, 64)] * C.CALIBRATION_WINDOWS
    assert said[-1] == f"calibrating on {64 * C.CALIBRATION_WINDOWS} tokens"


def test_calibration_texts_hold_no_evaluation_text():
    text = C.calibration_text()
    for name in C.CALIBRATION_TEXTS:
        assert (DATA / name).is_file() and not name.startswith("eval")
    for ev in sorted(DATA.glob("eval*.txt")):
        lines = [s.strip() for s in ev.read_text().splitlines() if len(s.strip()) >= 60]
        assert lines and not [s for s in lines if s in text], ev.name
