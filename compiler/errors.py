"""The one error type kiln raises for bad input: its message is a single line naming the culprit."""


class KilnError(Exception):
    """A user-facing error: one line naming the file, node, op or shape at fault (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class UnsupportedOps(KilnError):
    """The model uses ops kiln cannot import; `ops` maps op type -> (count, first node name)."""

    def __init__(self, path: str, ops: dict[str, tuple[int, str]]):
        self.ops = ops
        self.lines = [f"{path}: unsupported op {op} ({count} node{'s' if count > 1 else ''}, "
                      f"first: {first})" for op, (count, first) in sorted(ops.items())]
        KilnError.__init__(self, self.lines[0] if len(self.lines) == 1 else
                           f"{path}: {len(ops)} unsupported op types: " + ", ".join(sorted(ops)))
