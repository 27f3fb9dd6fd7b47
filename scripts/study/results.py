# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The study's files: ``study.json`` (settings, data, invocations) and ``results.jsonl`` (one record per finished
cell, appended as each cell finishes).

``results.jsonl`` is the study's only results store: the report, tables, statistics and figures are computed
from it. A record is written in one ``write`` of one line, flushed and synced; a run killed while writing leaves
at most a partial last line, which :meth:`ResultsFile.read` ignores (with a warning) and :meth:`ResultsFile.repair`
cuts off before the next record is appended. A cell whose record is present is finished; everything else is
re-run on resume.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ResultsFile", "StudyFile", "SettingsMismatchError"]


class SettingsMismatchError(ValueError):
    """A run folder was made with other settings than the ones asked for."""


class ResultsFile:
    """Append-only JSON-lines file of finished cell records, keyed by ``record["cell"]``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def _lines(self) -> Iterator[tuple[int, str, bool]]:
        if not self.path.is_file():
            return
        text = self.path.read_text()
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if line.strip():
                yield i + 1, line, i == len(lines) - 1  # the last piece has no newline: possibly cut short

    def read(self) -> dict[str, dict]:
        """``{cell name: record}`` of every complete record (a later record of the same cell wins).

        Raises:
            ValueError: naming the file and line when a complete line is not a JSON record.
        """
        out: dict[str, dict] = {}
        for number, line, unterminated in self._lines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if unterminated:
                    warnings.warn(
                        f"{self.path}: ignoring the unfinished last line {number} (an interrupted write).", stacklevel=2
                    )
                    continue
                raise ValueError(f"{self.path}, line {number}: not a JSON record ({e}).") from None
            if not isinstance(record, dict) or "cell" not in record:
                raise ValueError(f"{self.path}, line {number}: a record needs a 'cell' key.")
            out[record["cell"]] = record
        return out

    def repair(self) -> bool:
        """Cut an unfinished last line (no trailing newline); returns whether something was cut."""
        if not self.path.is_file():
            return False
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return False
        keep = data.rfind(b"\n") + 1
        with self.path.open("r+b") as f:
            f.truncate(keep)
        return True

    def append(self, record: dict) -> None:
        """Append one record as one line, flushed and synced to disk."""
        if "cell" not in record:
            raise ValueError("a record needs a 'cell' key.")
        self.repair()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


class StudyFile:
    """``study.json``: the settings every cell of a run folder shares, its data sets and every invocation.

    A run folder can be resumed and extended (more seeds, projections, ...) with the same settings; other
    settings (epochs, grid, data) would mix incomparable cells, so :meth:`check` refuses them.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def read(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path} is not valid JSON: {e}") from None

    def write(self, content: dict) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(content, indent=2) + "\n")
        os.replace(tmp, self.path)

    def check(self, settings: dict) -> None:
        """Raise :class:`SettingsMismatchError` naming the differing settings when the folder holds other ones."""
        content = self.read()
        if content is None:
            return
        old = content.get("settings", {})
        if old.get("cell_rules") != settings.get("cell_rules"):
            raise SettingsMismatchError(
                f"run folder {self.path.parent} was made by a version of the study that configures its cells "
                f"differently ({old.get('cell_rules')!r} there, {settings.get('cell_rules')!r} now); new cells would "
                "not be comparable with its finished ones: choose another --run-dir, or move the folder aside to "
                "start afresh (its results and report stay readable)."
            )
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
            raise SettingsMismatchError(
                f"run folder {self.path.parent} was made with other settings ({detail}); "
                "resume it with its own settings, choose another --run-dir, or move the folder aside to start afresh "
                "(make demo and make study use a fixed one)."
            )
