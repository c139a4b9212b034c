"""kiln's Python API: `kiln.compile` an ONNX decoder, `kiln.Session.load` the artifact, generate.

    import kiln
    kiln.compile("out/smollm2/model.onnx", "out/smollm2.kiln", target="cpu")
    session = kiln.Session.load("out/smollm2.kiln")
    print(session.generate("The capital of France is", max_new_tokens=16).text)

This file is the top-level `kiln` package (setup.py maps it from api/). Its names load on first
use: `import kiln.runtime` runs this file too, and a host with TVM's runtime alone (a `kiln
package` bundle) must not pull in the compiler, onnx or TVM's compiler through it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.compiler.compile import compile_model as compile
    from kiln.compiler.errors import KilnError
    from kiln.runtime.generate import Generation
    from kiln.runtime.session import Session

#: public name -> (module, attribute)
_EXPORTS = {
    "compile": ("kiln.compiler.compile", "compile_model"),
    "Session": ("kiln.runtime.session", "Session"),
    "Generation": ("kiln.runtime.generate", "Generation"),
    "KilnError": ("kiln.compiler.errors", "KilnError"),
}

__all__ = ["Generation", "KilnError", "Session", "compile"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
