"""The kinds of error, and the exit codes the CLI gives them (README, "Exit codes"):

* ``QwtError``: the user's problem (bad model, bad data, bad option): the CLI
  prints its message and ``Note:`` lines without a traceback and exits 2;
* ``CheckFailed`` (a ``QwtError``): the equivalence check failed: exit 1;
* ``Interrupted``: SIGINT or SIGTERM arrived: exit 128 + the signal (130, 143);
* anything else is our bug: exit 3, a line saying so, then the traceback.

This module imports nothing heavy: the command line's entry point uses it
before numpy, onnx and onnxruntime are loaded.
"""
from __future__ import annotations


class QwtError(Exception):
    """A user-facing error: what failed, the actual values, and the fix."""

    def __init__(self, message: str, notes: list[str] | None = None, fix: str | None = None,
                 node: str | None = None):
        super().__init__(message)
        self.message = message
        self.notes = list(notes or [])
        self.fix = fix
        self.node = node  # the graph node it failed on, where known (a stage failure names it)

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
        super().__init__(f"stage '{stage}' failed{where}: {detail}", notes, fix, node)
        self.stage = stage


class CheckFailed(QwtError):
    """The equivalence check failed: the CLI exits 1 (not 2), and the report is kept."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``entry.install_signal_handlers``); unwinds like Ctrl-C, so every
    ``finally`` and ``with`` block removes its temporary files on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


EXIT_OK, EXIT_CHECK_FAILED, EXIT_USER_ERROR, EXIT_INTERNAL = 0, 1, 2, 3


def failed_node(message: str) -> str | None:
    """The node an onnxruntime error names (``... running Conv node. Name:'conv1' Status Message: ...``)."""
    import re

    found = re.search(r"node\. Name:'([^']*)'", message)
    return found.group(1) if found else None
