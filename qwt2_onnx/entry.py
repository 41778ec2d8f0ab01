"""The ``qwt2-onnx`` console script: signal handlers first, then the command line.

SIGINT, SIGTERM (what ``timeout``, docker, Kubernetes and CI runners send) and
SIGHUP (a closed terminal) all raise :class:`errors.Interrupted`, which unwinds the run like Ctrl-C: every
staging folder and temporary file is removed on the way out, and the CLI exits
128 + the signal number (130, 143, 129) saying truthfully what was written.  A
second signal during that clean-up is ignored, so the clean-up finishes.  The
handlers are installed before numpy, onnx and onnxruntime are imported, so an
interrupt during start-up exits as cleanly as one during calibration.
"""
from __future__ import annotations

import signal
import sys

from .errors import Interrupted

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _raise_interrupted(signum: int, frame) -> None:
    for s in SIGNALS:  # the clean-up that follows must not be interrupted in turn
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    for s in SIGNALS:
        signal.signal(s, _raise_interrupted)


def main() -> None:
    install_signal_handlers()
    try:
        from .cli import main as cli
    except Interrupted as e:
        sys.stderr.write("interrupted while starting: nothing was written\n")
        sys.exit(e.exit_code)
    cli()


if __name__ == "__main__":
    main()
