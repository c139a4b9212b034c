"""The tuning database file `kiln tune` writes (docs/tuning.md): read, checked, written atomically.

    {"format": 2,
     "target": {"kind", "arch", "dtype", ("threads",) "kiln"},   what the times depend on
     "entries": {kernel: {bucket: {"config", "seconds", "default_seconds", ...}}}}

Plain JSON and no TVM, so the measuring host (runtime only) and the compiler share one reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kiln.compiler.errors import KilnError

FORMAT = 2


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, dict]]]:
    """(target, entries) of the file at `path`; a KilnError of one line when it is not a tuning
    file of this format (an old format-1 table says to re-run `kiln tune`)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise KilnError(f"{path}: not a kiln tuning file ({e.__class__.__name__}: "
                        f"{first})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise KilnError(f"{path}: tuning file format {got!r}, this kiln reads format "
                        f"{FORMAT} (re-run `kiln tune`)")
    if not isinstance(doc.get("target"), dict) or not isinstance(doc.get("entries"), dict):
        raise KilnError(f"{path}: tuning file without its target or entries")
    return doc["target"], doc["entries"]


def write(path: str | os.PathLike, target: dict[str, Any], entries: dict) -> None:
    """Atomically: an interrupted or resumed tuning never leaves half a file."""
    doc = {"format": FORMAT, "target": target, "entries": entries}
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
