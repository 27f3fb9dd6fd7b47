# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Run folders and resumable training state.

Run folders
    :func:`claim_run_folder` (an ``initialize`` step) refuses to reuse a run folder (``eval/<run_name>``) unless the
    run is resumed, and claims it atomically (two runs started with the same ``--run_name`` cannot both use it).

Resumable training
    :class:`TrainingState` writes model, optimiser, scheduler, trainer and early-stopping state atomically after
    every epoch and, with ``resume``, restores the latest at the start of training. :class:`BestCheckpointSaver`
    is MONAI's ``CheckpointSaver`` writing atomically and continuing from the best checkpoint of a resumed run.

The checkpoints themselves (their metadata, reading, checking) are in :mod:`scripts.checkpoints`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from scripts.checkpoints import bundle_version, read_checkpoint
from scripts.errors import InputError, set_interrupt_message
from scripts.options import OptionError

__all__ = ["STATE_DIR", "claim_run_folder", "latest_state", "HOLD_ENV", "TrainingState", "BestCheckpointSaver"]

logger = logging.getLogger(__name__)

STATE_DIR = "resume"
"""Sub-folder of a run folder holding the per-epoch training state."""


# --------------------------------------------------------------------------------------------------------------------
# run folders
# --------------------------------------------------------------------------------------------------------------------
def _is_fresh(folder: Path) -> bool:
    """A folder no run has written results into: absent, or holding only MONAI's record of the config
    (``config_*.json``, experiment tracking), the record of runs that stopped before writing anything and the
    claim of a run (:data:`CLAIM_FILE`)."""
    return not folder.exists() or all(
        re.fullmatch(r"config_.*\.json|run\.json|\.claim", p.name) for p in folder.iterdir()
    )


CLAIM_FILE = ".claim"
"""File of a run folder that the run using it holds locked (``flock``) while it runs."""
_CLAIMED: dict[str, int] = {}
"""Run folders this process has claimed, with the descriptor holding the lock (released when the process ends)."""


def _claim(folder: Path) -> None:
    """Claim ``folder`` for this process, atomically: an exclusive ``flock`` on ``<folder>/.claim``, held until the
    process ends (the kernel releases it even after ``kill -9``), so two runs started with the same ``--run_name``
    at the same moment cannot both use the folder.

    Raises:
        OptionError: another running process holds the folder.
    """
    key = os.path.realpath(folder)
    if key in _CLAIMED:
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no claim
        return
    fd = os.open(folder / CLAIM_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OptionError(
            f"run folder {folder} is in use by another run started with the same --run_name; choose another "
            "--run_name (or wait for that run to finish)."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _CLAIMED[key] = fd


def latest_state(folder: str | os.PathLike) -> Path | None:
    """The training-state file of the latest epoch in ``<folder>`` (``state_checkpoint_<epoch>.pt``), if any."""
    folder = Path(folder)
    found = []
    for path in folder.glob("state_*.pt") if folder.is_dir() else ():
        match = re.search(r"_(\d+)\.pt$", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _resume_command(run_name: str) -> str:
    """The command line that continues this run: the running one with ``--run_name`` and ``--resume true``."""
    args = list(sys.argv[1:])
    for flag in ("--run_name", "--resume"):
        while flag in args:
            i = args.index(flag)
            del args[i : i + 2]
    return shlex.join(["python", "-m", "monai.bundle", *args, "--run_name", run_name, "--resume", "true"])


def claim_run_folder(output_dir: str | os.PathLike, resume: Any = False, kind: str = "training") -> str:
    """Make sure a run never writes into another run's folder; record the run in ``<output_dir>/run.json``.

    Args:
        output_dir: the run folder (``eval/<run_name>``).
        resume: continue the run in ``output_dir`` (it must hold a saved epoch) instead of starting one.
        kind: ``"training"`` (resumable) or ``"inference"``/``"evaluation"`` (not resumable).

    Raises:
        OptionError: the folder holds another run (and ``resume`` is off), or there is nothing to resume.
    """
    from scripts.options import parse_bool

    folder = Path(output_dir)
    resume = parse_bool(resume, "resume")
    state_dir = folder / STATE_DIR
    if resume and kind != "training":
        raise OptionError(f"--resume true continues a training run; an {kind} run starts afresh.")
    if resume and not folder.is_dir():
        runs = sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) if folder.parent.is_dir() else []
        listed = ", ".join(runs[-5:]) if runs else "none"
        raise OptionError(
            f"--resume true: run folder {folder} not found; pass the --run_name of the run to continue "
            f"(runs in {folder.parent}: {listed})."
        )
    try:
        _claim(folder)
    except PermissionError as e:
        raise InputError(
            f"cannot create the run folder {folder}: {e.strerror}; choose a writable --bundle_root."
        ) from None
    if resume:
        if latest_state(state_dir) is None:
            raise OptionError(
                f"--resume true: {folder} holds no completed epoch to continue from ({state_dir} is empty); "
                "start the run again without --resume."
            )
    elif not _is_fresh(folder):
        advice = "; or continue it with --resume true" if kind == "training" else ""
        raise OptionError(f"run folder {folder} already holds a run; choose another --run_name{advice}.")
    folder.mkdir(parents=True, exist_ok=True)
    record = {"kind": kind, "command": sys.argv, "bundle_version": bundle_version()}
    runs = (
        json.loads((folder / "run.json").read_text(encoding="utf-8")).get("runs", [])
        if (folder / "run.json").is_file()
        else []
    )
    runs.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed": resume, **record})
    tmp = folder / f".run.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"runs": runs}, indent=2), encoding="utf-8")
    os.replace(tmp, folder / "run.json")

    def describe() -> str:
        if kind != "training":
            rows = folder / "predictions.csv"
            done = max(sum(1 for _ in rows.open(encoding="utf-8")) - 1, 0) if rows.is_file() else 0
            return f"{done} rows written so far are in {rows}."
        latest = latest_state(state_dir)
        if latest is None:
            return f"no epoch was completed; nothing to resume in {folder}."
        epoch = re.search(r"_(\d+)\.pt$", latest.name).group(1)
        return f"the partial run is in {folder} (last completed epoch {epoch}); continue it with: " + _resume_command(
            folder.name
        )

    set_interrupt_message(describe)
    return str(folder)


# --------------------------------------------------------------------------------------------------------------------
# resumable training
# --------------------------------------------------------------------------------------------------------------------
class _SaveThenRemove(DiskSaver):
    """An atomic ``DiskSaver`` that removes a superseded file only after the new one is complete (ignite asks for
    the removal first), so a complete training state exists at every moment."""

    def __init__(self, dirname: str) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, filename, metadata)
        pending, self._pending = self._pending, []
        for name in pending:
            if name != filename and (Path(self.dirname) / name).is_file():
                super().remove(name)

    def remove(self, filename: str) -> None:
        self._pending.append(filename)


@contextlib.contextmanager
def _writing(path: Path, what: str):
    """Turn a failed write (disk full, read-only folder, no permission) into one line naming ``path``; the files
    written before stay as they were (every write goes through a temporary file and a rename)."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        raise InputError(
            f"cannot write {what} to {path}: {reason}. Free disk space or make the folder writable; the files "
            "written before are intact."
        ) from None
    except RuntimeError as e:  # torch.save reports a failed write as a RuntimeError ("... file write failed")
        if "write" not in str(e).lower():
            raise
        raise InputError(
            f"cannot write {what} to {path}: {str(e).splitlines()[0][:160]}. Free disk space or make the folder "
            "writable; the files written before are intact."
        ) from None


HOLD_ENV = "PD_KD_HOLD_AFTER_EPOCH"
"""Environment variable for the tests of interruption: with ``N`` set, training stops after writing the state of
epoch ``N`` and waits for a signal (Ctrl-C, kill), so a signal is certain to find the run between two epochs
whatever the machine's speed. Unset in normal use."""


def _hold_for_a_signal(save_dir: Path, limit_s: float = 600.0) -> None:
    """Write ``<save_dir>/held`` and sleep until a signal interrupts (``KeyboardInterrupt``) or kills the process;
    give up after ``limit_s`` seconds so a forgotten variable never hangs a run forever."""
    marker = save_dir / "held"
    marker.write_text(str(os.getpid()), encoding="utf-8")
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        marker.unlink(missing_ok=True)


class TrainingState:
    """Save the whole training state after every epoch; restore the latest when a run is resumed.

    The state (``objects``: network, optimiser, LR scheduler, trainer, early stopping, plus this handler's own
    record of its file) goes to ``<save_dir>/state_checkpoint_<epoch>.pt`` through ignite's ``Checkpoint``: written
    to a temporary file and renamed, the previous epoch's file removed only afterwards, so one complete state always
    exists. With ``resume`` the latest state is loaded by MONAI's ``CheckpointLoader`` when the trainer starts; the
    trainer then continues with the next epoch. Data order does not depend on the restart when the training sampler
    is seeded per epoch (the configs' ``train#sampler``), so a resumed run reaches the weights of an uninterrupted
    one. When training completes the state is deleted (the run's best checkpoint stays), unless
    ``keep_on_completion``.

    Args:
        save_dir: the folder of the state files (``<run folder>/resume``).
        objects: ``{name: object with state_dict/load_state_dict}``; ``None`` values are left out.
        resume: load the latest state at ``Events.STARTED``.
        map_location: device the state is loaded to.
        keep_on_completion: keep the state file of a completed run.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        objects: Mapping[str, Any],
        resume: Any = False,
        map_location: Any = None,
        keep_on_completion: Any = False,
    ) -> None:
        from scripts.options import parse_bool

        self.save_dir = Path(save_dir)
        self.objects = {k: v for k, v in objects.items() if v is not None}
        self.resume = parse_bool(resume, "resume")
        self.map_location = map_location
        self.keep_on_completion = parse_bool(keep_on_completion, "keep_training_state")
        self.checkpoint: Checkpoint | None = None

    def attach(self, engine: Engine) -> None:
        self.checkpoint = Checkpoint(
            self.objects,
            _SaveThenRemove(str(self.save_dir)),
            filename_prefix="state",
            n_saved=1,
            global_step_transform=lambda e, _: e.state.epoch,
            include_self=True,
        )
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if not self.keep_on_completion:
            engine.add_event_handler(Events.COMPLETED, self.clear)

    def save(self, engine: Engine) -> None:
        """Write this epoch's state (then, for the tests of interruption only, hold; see :data:`HOLD_ENV`)."""
        with _writing(self.save_dir, "the training state"):
            self.checkpoint(engine)
        hold = os.environ.get(HOLD_ENV, "")
        if hold.isdigit() and int(hold) == engine.state.epoch:
            _hold_for_a_signal(self.save_dir)

    def load(self, engine: Engine) -> None:
        path = latest_state(self.save_dir)
        if path is None:
            raise OptionError(f"--resume true: no saved epoch in {self.save_dir}.")
        loader = CheckpointLoader(
            load_path=str(path),
            load_dict={**self.objects, "checkpointer": self.checkpoint},
            map_location=self.map_location,
        )
        try:
            loader(engine)
        except InputError:
            raise
        except (RuntimeError, KeyError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
            raise InputError(f"cannot resume from {path}: {first}") from None
        engine.logger.info(f"resumed from {path} (epoch {engine.state.epoch} of {engine.state.max_epochs})")

    def clear(self, engine: Engine) -> None:
        """Delete the state files of a completed run."""
        for path in self.save_dir.glob("state_*.pt") if self.save_dir.is_dir() else ():
            path.unlink()
        if self.save_dir.is_dir() and not any(self.save_dir.iterdir()):
            self.save_dir.rmdir()


class _ReplacingDiskSaver(DiskSaver):
    """A ``DiskSaver`` writing atomically; with a fixed ``filename`` each save replaces the file by a rename, and
    ignite's removal of the previous best (the same file) is skipped, so the file never goes missing."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        with _writing(Path(self.dirname) / (self.filename or filename), "the best checkpoint"):
            super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class BestCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` that writes atomically and continues a resumed run's selection.

    Files are written to a temporary file and renamed over the previous one, so a run killed while saving never
    leaves a truncated or missing checkpoint. When the key-metric file already exists (the run is resumed), its
    recorded validation score (see :class:`DescribedModel`) seeds the selection, so a worse epoch after the restart
    does not replace it. Arguments are MONAI's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None and isinstance(checkpoint.save_handler, DiskSaver):
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _ReplacingDiskSaver(str(self.save_dir), fixed)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        handler = self._key_metric_checkpoint
        filename = getattr(getattr(handler, "save_handler", None), "filename", None)
        if handler is None or not filename:
            return
        existing = Path(self.save_dir) / filename
        if existing.is_file():
            try:
                _, info = read_checkpoint(existing)
            except InputError:
                return
            score = ((info or {}).get("validation") or {}).get("score")
            if isinstance(score, (int, float)):
                handler.load_state_dict({"_saved": [(float(score), filename)]})
                logger.info(f"best checkpoint so far: {existing} (score {score:.4f})")
