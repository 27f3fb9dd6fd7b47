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

import logging
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = [
    "InputError",
    "MissingFileError",
    "find_input_error",
    "install_cli_excepthook",
    "set_interrupt_message",
    "CliLogFilter",
]

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


_state: dict[str, Any] = {"debug": False, "interrupt_message": None}


def set_interrupt_message(describe: Callable[[], str] | None) -> None:
    """What an interruption (Ctrl-C) of the command line reports: ``describe()`` says where the partial run is."""
    _state["interrupt_message"] = describe


def _interrupt_line() -> str:
    describe = _state["interrupt_message"]
    try:
        detail = describe() if describe is not None else ""
    except Exception:  # noqa: BLE001 - the report of an interruption must not fail
        detail = ""
    return "interrupted" + (f": {detail}" if detail else ".")


def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if _state["debug"]:
        sys.__excepthook__(exc_type, exc, tb)
    if isinstance(exc, KeyboardInterrupt):
        print(_interrupt_line(), file=sys.stderr)
        return
    error = find_input_error(exc)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
    elif not _state["debug"]:
        sys.__excepthook__(exc_type, exc, tb)


class CliLogFilter(logging.Filter):
    """Keep the command line's log free of tracebacks that the exception hook reports anyway.

    When an engine stops on an exception, ignite logs "... terminating due to exception" once per level of its run
    loop and MONAI's ``StatsHandler`` logs the exception with its traceback each time, so the whole chain appears
    twice before the hook's own report. This filter (installed with the hook, on the command line only, not with
    ``debug``) drops ignite's two lines, keeps the first ``StatsHandler`` record of an exception as one line (the
    user-facing message when the chain holds an :class:`InputError`) and drops its repeats.
    """

    IGNITE_MESSAGES = ("Current run is terminating due to exception", "Engine run is terminating due to exception")

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name.startswith("ignite.engine") and message.startswith(self.IGNITE_MESSAGES):
            return False
        if not record.exc_info or record.exc_info[1] is None:
            return True
        exc = record.exc_info[1]
        if id(exc) in self._seen:
            return False
        self._seen.add(id(exc))
        error = find_input_error(exc)
        if isinstance(exc, KeyboardInterrupt):
            record.msg, record.args = "interrupted", ()
        elif error is not None:
            record.msg, record.args = f"{type(error).__name__}: {error}", ()
        else:
            first = (str(exc).strip().splitlines() or [""])[0]
            record.msg, record.args = f"{type(exc).__name__}: {first} (traceback below)", ()
        record.exc_info, record.exc_text = None, None
        return True


def _running_cli() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name in CLI_MODULES


def install_cli_excepthook(debug: Any = False) -> bool:
    """Report :class:`InputError`s as ``error: <message>`` (exit status 1) instead of a traceback.

    Only when the running program is MONAI's bundle command line; returns whether the hook was installed. The log
    handlers of the root logger get a :class:`CliLogFilter`. An interruption (Ctrl-C) is reported as one line saying
    where the partial run is (see :func:`set_interrupt_message`).

    Args:
        debug: ``True`` (or ``"true"`` in any case) keeps every traceback: the hook prints the full traceback
            and the log is not filtered.
    """
    if not _running_cli():
        return False
    _state["debug"] = isinstance(debug, bool) and debug or str(debug).strip().lower() == "true"
    sys.excepthook = _hook
    if not _state["debug"]:
        _filter_log_handlers(CliLogFilter())
    return True


def _filter_log_handlers(log_filter: logging.Filter) -> None:
    """Add ``log_filter`` to the handlers of the root logger and of every logger created so far.

    MONAI's ``StatsHandler`` logs through its own logger (``monai.handlers.StatsHandler``, with its own stdout
    handler, not propagating), created when the handler is built, after this runs: it is created here first, the way
    MONAI creates it, so that it has its handler (and this filter) already.
    """
    import inspect

    from monai.apps.utils import get_logger
    from monai.handlers import StatsHandler

    name = inspect.signature(StatsHandler.__init__).parameters["name"].default
    if isinstance(name, str):
        get_logger(name)
    loggers = [logging.getLogger()] + [
        logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, type(log_filter)) for f in handler.filters):
                handler.addFilter(log_filter)
