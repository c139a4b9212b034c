"""Run `kiln` commands in forked children of one process that imported kiln, onnx, onnxruntime
and TVM once: a child per command (its own exit code, stdout, stderr, a timeout that kills its
process group) for a fraction of a fresh interpreter's start-up (about 10 s on 2 busy cores).

Protocol (one JSON object per line): stdin {"argv": [...], "cwd": DIR, "stdout": FILE,
"stderr": FILE, "timeout": SECONDS}; stdout {"rc": int, "seconds": float, "timed_out": bool}.
rc is the child's exit code, or -N when signal N ended it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback


def _preload() -> None:
    """Everything the commands import, before any fork (no threads are started by these)."""
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    import kiln.codegen.build
    import kiln.compiler.check
    import kiln.compiler.cli
    import kiln.compiler.compile
    import kiln.runtime.cli
    import kiln.runtime.session  # noqa: F401


def _child(req: dict) -> None:
    os.setpgid(0, 0)  # the timeout kills the command and whatever it started (the linker)
    os.chdir(req["cwd"])
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    code = 1
    try:
        from kiln.compiler.cli import main

        main(args=req["argv"], prog_name="kiln")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()  # what the interpreter prints for an uncaught exception
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), True
        time.sleep(0.02)


def serve() -> None:
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(req)
        rc, timed_out = _wait(pid, float(req["timeout"]))
        print(json.dumps({"rc": rc, "seconds": round(time.monotonic() - start, 3),
                          "timed_out": timed_out}), flush=True)


if __name__ == "__main__":
    serve()
