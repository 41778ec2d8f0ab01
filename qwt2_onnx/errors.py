"""The two kinds of error.

``QwtError`` is the user's problem (bad model, bad data, bad option): the CLI
prints its message and ``Note:`` lines without a traceback and exits 2.
Anything else is our bug and keeps its traceback.
"""
from __future__ import annotations


class QwtError(Exception):
    """A user-facing error: what failed, the actual values, and the fix."""

    def __init__(self, message: str, notes: list[str] | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.notes = list(notes or [])
        self.fix = fix

    def __str__(self) -> str:
        lines = [self.message]
        lines += [f"Note: {n}" for n in self.notes]
        if self.fix:
            lines.append(f"Fix: {self.fix}")
        return "\n".join(lines)


class StageError(QwtError):
    """A pipeline stage failed on a user model; names the stage and the node."""

    def __init__(self, stage: str, cause: BaseException, node: str | None = None):
        where = f" on node '{node}'" if node else ""
        detail = cause.message if isinstance(cause, QwtError) else f"{type(cause).__name__}: {cause}"
        notes = cause.notes if isinstance(cause, QwtError) else []
        fix = cause.fix if isinstance(cause, QwtError) else None
        super().__init__(f"stage '{stage}' failed{where}: {detail}", notes, fix)
        self.stage = stage
        self.node = node


class CheckFailed(QwtError):
    """The equivalence check failed: the CLI exits 1 (not 2), and the report is kept."""

    exit_code = 1
