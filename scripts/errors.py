# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""User-facing errors: bad input is reported as one clear line, not as a stack trace.

MONAI wraps exceptions raised inside transforms and config components (``RuntimeError: applying transform
...``), which buries the useful message. Every input problem the bundle detects raises an :class:`InputError`
that names the file and the problem; :func:`install_excepthook` (called by every config's ``initialize``)
prints that message alone when such an error ends the program. Other errors keep their full traceback.
"""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["InputError", "MissingFileError", "find_input_error", "install_excepthook"]


class InputError(ValueError):
    """A file, datalist or checkpoint given to the bundle is not usable; the message says which and why."""


class MissingFileError(InputError, FileNotFoundError):
    """A file the bundle needs does not exist; the message says how to produce it."""


def find_input_error(exc: BaseException | None) -> InputError | None:
    """The first :class:`InputError` in ``exc``'s chain of causes and contexts, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    error = find_input_error(exc)
    if error is None:
        sys.__excepthook__(exc_type, exc, tb)
        return
    print(f"error: {error}", file=sys.stderr)


def install_excepthook() -> None:
    """Report :class:`InputError`s as ``error: <message>`` (exit status 1) instead of a traceback."""
    sys.excepthook = _hook
