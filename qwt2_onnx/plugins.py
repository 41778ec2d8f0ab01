"""``MODULE:NAME`` on the command line: an object of the user's code, from an importable module or a ``.py``
file (``qwt2-onnx export``'s model factory, ``qwt2-onnx bench --task``)."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from .errors import QwtError


def load_object(spec: str, what: str, example: str):
    """The object ``NAME`` of ``MODULE`` (a module name, or a path ending in .py) that ``spec`` names.  The
    user's code may raise anything while it is imported: that, a missing module or name is a ``QwtError``
    naming ``what`` (e.g. "the task"), with ``example`` in the fix."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise QwtError(f"cannot read {spec!r} as MODULE:NAME ({what})", fix=f"e.g. {example}")
    try:
        if where.endswith(".py"):
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            if loader is None or not Path(where).is_file():
                raise FileNotFoundError(where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        return getattr(module, name)
    except Exception as e:  # noqa: BLE001  (the user's code)
        raise QwtError(f"cannot load {what} {spec!r}", notes=[f"{type(e).__name__}: {str(e)[:300]}"],
                       fix=f"pass MODULE:NAME, e.g. {example}") from None
