# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""User-facing errors: bad input is reported as one clear line, not as a stack trace.

MONAI wraps exceptions raised inside transforms and config components (``RuntimeError: applying transform
...``), which buries the useful message. Every input problem the bundle detects raises an :class:`InputError`
that names the file and the problem. When the program is MONAI's bundle command line (``python -m monai.bundle``,
also under ``torchrun``), :func:`install_cli_excepthook` (called by every config's ``initialize``) prints that
message alone when such an error ends the program. Inside any other program (a MONAI Label server, a notebook,
pytest) it does nothing: library code never replaces another program's exception hook.
"""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["InputError", "MissingFileError", "find_input_error", "install_cli_excepthook"]

CLI_MODULES = ("monai.bundle.__main__",)
"""``__main__`` module names of the command lines whose exception hook the bundle may set."""


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


def _running_cli() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name in CLI_MODULES


def install_cli_excepthook() -> bool:
    """Report :class:`InputError`s as ``error: <message>`` (exit status 1) instead of a traceback.

    Only when the running program is MONAI's bundle command line; returns whether the hook was installed.
    """
    if not _running_cli():
        return False
    sys.excepthook = _hook
    return True
