# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""``python -m scripts.study``: run the experiment matrix through the bundle's configs, resumably, and report it.

    python -m scripts.study run --matrix demo|cpu|full [--run-dir DIR] [--dataset-dir DIR --external NAME=DIR ...]
                                [--projections ...] [--seeds N] [--teachers N] [--variants ...] [--fractions ...]
                                [--teacher-fraction matched|full|both] [--centres auto] [--intensities occipital]
                                [--teacher-epochs N] [--student-epochs N] [--set KEY=VALUE ...]
                                [--prevalence NAME=P ...] [--subprocess | --jobs N] [--max-cells N]
                                [--only PATTERN ...] [--dry-run]
                                [--executor ray [--ray-address ADDR] [--gpus-per-teacher G] [--gpus-per-student G]
                                                [--cpus-per-task C]]
    python -m scripts.study report RUN_DIR [--out docs/results.md] [--figures docs/figures] [--no-figures]
                                   [--title TEXT] [--preface FILE] [--tables README.md docs/README.md]
    python -m scripts.study add-external RUN_DIR --external NAME=DIR [...] [--prevalence NAME=P ...]
    python -m scripts.study list --matrix cpu

``run`` (the default sub-command) builds the matrix (:mod:`scripts.study.matrix`), prepares the data (the
synthetic in-domain and external sets, unless ``--dataset-dir`` / ``--external`` name others), then runs every
cell that is not finished yet (:mod:`scripts.study.cells`), appending its record to ``<run dir>/results.jsonl``
as it finishes, and prints progress (cells done / total, elapsed, estimate). Re-running the same command resumes:
finished cells are skipped, an interrupted cell is run again from scratch. When every cell is finished it writes
``<run dir>/report.md`` with its figures (:mod:`scripts.study.report`) and prints the main table.

Cells run in this process by default (MONAI's ``ConfigWorkflow`` on the bundle's configs, the code path of
``python -m monai.bundle run``, without paying its start-up for every run); ``--subprocess`` runs each cell in
a fresh ``python -m scripts.study cell`` process instead (isolation from the study process, e.g. for memory),
``--jobs N`` runs N such processes side by side, and ``--executor ray`` runs every cell as a task on a Ray
cluster (:mod:`scripts.study.executors`, ``docs/cluster.md``). Whatever the executor, this process alone writes
the results file, and resuming is running the same command again.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fnmatch
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

from scripts.options import OptionError, check_overrides
from scripts.study.cells import BUNDLE_ROOT, StudyContext, cell_dir, run_cell
from scripts.study.executors import EXECUTORS, CellPlan, make_executor
from scripts.study.matrix import (
    PRESETS,
    TEACHER_FRACTIONS,
    VARIANTS,
    Cell,
    build_cells,
    cell_rules,
    count_cells,
    preset,
)
from scripts.study.power import counted
from scripts.study.results import ResultsFile, SettingsMismatchError, StudyFile

__all__ = ["main", "prepare_data", "context_from_study", "datalist_path", "exclusive"]


def _parse_value(text: str) -> object:
    """A command-line value as python-fire would read it: a Python literal when it is one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _pairs(items: Sequence[str], option: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            parser.error(f"{option} expects NAME=VALUE, got {item!r}.")
        out[key] = value
    return out


def datalist_path(path: str, option: str) -> str:
    """The absolute datalist of ``path`` (a data folder holding ``datalist.json``, or the file); exits naming
    ``option`` when there is none."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        p = p / "datalist.json"
    if not p.is_file():
        raise SystemExit(f"error: {option} {path}: no datalist found at {p}.")
    return str(p)


def synthetic_study_data(root: Path, n_subjects: int | dict[str, int] | None, workers: int = 2) -> dict[str, str]:
    """The synthetic sets of a study under ``root``: the in-domain set first, then the external sets.

    The generator's study sets (``scripts.synthetic.phantom.make_study_data``): the ``benchmark`` preset (the
    in-domain set) and two shifted sets made from other subjects, an AV133-like PET set and a SPECT set from
    another site, with all their scans in the ``test`` split. Generated once; a resumed study reads
    ``root/datasets.json``.
    """
    index = root / "datasets.json"
    if index.is_file():
        return json.loads(index.read_text())
    from scripts.synthetic.phantom import make_study_data

    root.mkdir(parents=True, exist_ok=True)
    made = make_study_data(root, seed=0, workers=workers, n_subjects=n_subjects)
    data = {"benchmark": str(made["benchmark"]), **{k: str(v) for k, v in made.items() if k != "benchmark"}}
    index.write_text(json.dumps(data, indent=2) + "\n")
    return data


def prepare_data(args: argparse.Namespace, run_dir: Path, n_subjects: int | dict[str, int] | None) -> dict[str, str]:
    """``{name: datalist}``: ``--dataset-dir`` (or the synthetic sets) and every ``--external NAME=DIR``."""
    externals = {k: datalist_path(v, "--external") for k, v in args.external.items()}
    if args.dataset_dir:
        data = {args.dataset_name: datalist_path(args.dataset_dir, "--dataset-dir")}
    else:
        data = synthetic_study_data(run_dir / "data", n_subjects)
    clash = set(externals) & set(data)
    if clash and any(externals[k] != data[k] for k in clash):
        raise SystemExit(f"error: --external name(s) {sorted(clash)} already used by another data set.")
    return {**data, **externals}


def context_from_study(run_dir: str | os.PathLike) -> StudyContext:
    """The :class:`StudyContext` recorded in ``<run dir>/study.json``."""
    content = StudyFile(Path(run_dir) / "study.json").read()
    if content is None:
        raise SystemExit(f"error: {run_dir} holds no study.json; start the study with `python -m scripts.study run`.")
    s = content["settings"]
    return StudyContext(
        run_dir=Path(run_dir),
        datasets=s["datasets"],
        settings=s["shared"],
        teacher_settings=s["teacher"],
        student_settings=s["student"],
        n_teachers=s["n_teachers"],
        prevalence=s["prevalence"],
        adabn_shares=content.get("matrix", {}).get("adabn_shares"),
    )


def _format_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Progress:
    """Cells done / total, elapsed time and an estimate of the rest (mean time per cell of each kind so far)."""

    def __init__(self, total: int, done: int, todo: Sequence[Cell], jobs: int = 1) -> None:
        self.total, self.done, self.todo, self.jobs = total, done, list(todo), max(1, int(jobs))
        self.start = time.perf_counter()
        self.seconds: dict[str, list[float]] = {}

    def finished(self, cell: Cell, seconds: float) -> str:
        self.done += 1
        self.todo.remove(cell)
        self.seconds.setdefault(cell.kind, []).append(seconds)
        everything = [s for v in self.seconds.values() for s in v]
        mean = {k: sum(v) / len(v) for k, v in self.seconds.items()}
        rest = sum(mean.get(c.kind, sum(everything) / len(everything)) for c in self.todo) / self.jobs
        elapsed = time.perf_counter() - self.start
        return (
            f"[{self.done}/{self.total}] {cell.name} done in {seconds:.0f} s | elapsed {_format_minutes(elapsed)}"
            + (f" | estimate {_format_minutes(rest)} more" if self.todo else "")
        )


def _check_dependencies(todo: Sequence[Cell], done: set[str], n_teachers: int) -> None:
    available = set(done)
    for cell in todo:
        teacher = cell.teacher(n_teachers)
        if teacher is not None and teacher.name not in available:
            raise SystemExit(
                f"error: {cell.name} needs its teacher {teacher.name}, which is neither finished nor scheduled "
                "before it (check --only)."
            )
        available.add(cell.name)


@contextlib.contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """Hold ``<run dir>/.lock`` (an OS file lock, released when the process ends however it ends): two studies
    writing to one folder would run the same cells twice."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "w")  # noqa: SIM115 - closed by the with block below
    except OSError as e:
        raise SystemExit(f"error: --run-dir {run_dir}: cannot use it as a study folder ({e.strerror}).") from None
    with handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except BlockingIOError:
            raise SystemExit(
                f"error: another study is running in {run_dir}; wait for it or choose another --run-dir."
            ) from None
        except OSError as e:  # a shared file system without locks (e.g. Lustre mounted without `flock`)
            print(f"note: {run_dir} cannot be locked ({e.strerror}); run one study at a time in this folder.")
        yield


def _check_executor_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--jobs``/``--subprocess`` belong to the local executor, ``--ray-address``/``--*-per-*`` to the Ray one."""
    ray_options = {
        "--ray-address": args.ray_address,
        "--gpus-per-teacher": args.gpus_per_teacher,
        "--gpus-per-student": args.gpus_per_student,
        "--cpus-per-task": args.cpus_per_task,
    }
    if args.executor != "ray":
        given = [k for k, v in ray_options.items() if v is not None]
        if given:
            parser.error(f"{', '.join(given)}: option(s) of --executor ray.")
        return
    if args.jobs != 1 or args.subprocess:
        parser.error(
            "--jobs and --subprocess are options of the local executor; Ray runs every cell in a worker process "
            "of its own, as many at once as the cluster's resources allow."
        )
    if args.cpus_per_task is None:
        args.cpus_per_task = 1.0
    try:
        make_executor(args)
    except ValueError as e:
        parser.error(str(e))


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    changes = {
        "projections": args.projections,
        "seeds": args.seeds,
        "teachers": args.teachers,
        "variants": args.variants,
        "fractions": args.fractions,
        "teacher_fraction": args.teacher_fraction,
        "centres": args.centres,
        "intensities": args.intensities,
        "teacher_epochs": args.teacher_epochs,
        "student_epochs": args.student_epochs,
        "n_subjects": args.n_subjects,
        "adabn_shares": args.adabn_shares,
    }
    try:
        spec = preset(args.matrix, **changes)
    except ValueError as e:
        parser.error(str(e))
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}.")
    _check_executor_options(args, parser)
    cells = build_cells(spec)
    if args.only:
        cells = [c for c in cells if any(fnmatch.fnmatch(c.name, pattern) for pattern in args.only)]
    run_dir = Path(args.run_dir or BUNDLE_ROOT / "eval" / f"study-{args.matrix}").resolve()
    if args.dry_run:
        for cell in cells:
            print(cell.name)
        print(f"{len(cells)} cells ({', '.join(f'{n} {k}' for k, n in count_cells(cells).items())}) in {run_dir}")
        return 0
    with exclusive(run_dir):
        return _run_study(args, spec, cells, run_dir)


def _run_study(args: argparse.Namespace, spec, cells: list[Cell], run_dir: Path) -> int:
    study = StudyFile(run_dir / "study.json")
    shared = {**spec.settings, **args.set}
    shared.setdefault("progress_bar", False)
    teacher = {"max_epochs": spec.teacher_epochs, "patience": shared.get("patience", spec.teacher_epochs)}
    student = {"max_epochs": spec.student_epochs, "patience": shared.get("patience", spec.student_epochs)}
    previous = study.read()
    datasets = previous["settings"]["datasets"] if previous and not (args.dataset_dir or args.external) else None
    if datasets is None:
        datasets = prepare_data(args, run_dir, spec.n_subjects)
    settings = {
        "shared": shared,
        "teacher": teacher,
        "student": student,
        "n_teachers": spec.teachers,
        "datasets": datasets,
        "prevalence": {k: float(v) for k, v in args.prevalence.items()},
        "cell_rules": cell_rules(),
    }
    try:
        study.check(settings)
    except SettingsMismatchError as e:
        raise SystemExit(f"error: {e}") from None
    invocation = {
        "command": "python -m scripts.study " + " ".join(shlex.quote(a) for a in args.argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    content = previous or {"created": invocation["started"]}
    content.update(settings=settings, matrix={"preset": args.matrix, **vars(spec)})
    content.setdefault("invocations", []).append(invocation)
    study.write(content)

    results = ResultsFile(run_dir / "results.jsonl")
    if results.repair():
        print(f"note: cut an unfinished last line from {results.path} (an interrupted write).")
    done = results.read()
    todo = [c for c in cells if c.name not in done]
    _check_dependencies(todo, set(done), spec.teachers)
    counts = ", ".join(f"{n} {k}" for k, n in count_cells(cells).items())
    print(f"Study {run_dir}: {len(cells)} cells ({counts}); {len(cells) - len(todo)} finished, {len(todo)} to run.")
    ctx = context_from_study(run_dir)
    progress = Progress(len(cells), len(cells) - len(todo), todo)
    if todo:
        status = _run_cells(args, CellPlan(ctx, todo, set(done), spec.teachers, args.max_cells), results, progress)
        if status is not None:
            return status

    from scripts.study.report import write_report

    report = write_report(run_dir, run_dir / "report.md", run_dir / "figures", figures=not args.no_figures)
    print(f"\n{report.summary}\n\nReport: {run_dir / 'report.md'}")
    if getattr(args, "publish", None) and publish_models(run_dir, cells, spec.teachers, Path(args.publish)):
        print(f"Score scans with it: {inference_command(next(iter(datasets.values())), Path(args.publish))}")
    return 0


def inference_command(datalist: str, models_dir: Path) -> str:
    """The inference command that serves the models published to ``models_dir`` on the test split of
    ``datalist`` (paths relative to the working directory where they lie under it)."""

    def shown(path: Path) -> str:
        path = path.resolve()
        return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)

    args = ["python", "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    args += ["--input", shown(Path(datalist))]
    if models_dir.resolve() != (BUNDLE_ROOT / "models").resolve():
        args += ["--model_file", shown(models_dir / "model.pt"), "--teacher_ckpt", shown(models_dir / "teacher.pt")]
    return shlex.join(args)


def published_cells(cells: Sequence[Cell], n_teachers: int) -> tuple[Cell, Cell] | None:
    """The KD student to serve (full training set, lowest seed, default centre and intensity, first variant in
    the matrix) and its teacher; ``None`` when the matrix has no such student."""
    students = [
        c
        for c in cells
        if c.kind == "student" and c.kd and c.fraction == 1.0 and not c.label_noise and c.intensity == "minmax"
    ]
    students = [c for c in students if c.centre == "template"] or students
    if not students:
        return None
    student = min(students, key=lambda c: c.seed)
    return student, student.teacher(n_teachers)


def publish_models(run_dir: Path, cells: Sequence[Cell], n_teachers: int, models_dir: Path) -> list[Path]:
    """Publish a study's teacher and KD student (their best checkpoints by validation) to ``models_dir`` as
    ``teacher.pt`` and ``model.pt``, so that the inference configs serve them; through
    :class:`scripts.handlers.PublishCheckpoint` (a better model already there on the same validation split is
    kept, the replaced one goes to ``models_dir/previous/``)."""
    from scripts.handlers import PublishCheckpoint
    from scripts.study.cells import best_checkpoint

    picked = published_cells(cells, n_teachers)
    if picked is None:
        print("note: no KD student in this matrix; nothing published.")
        return []
    published = []
    for cell, name in zip(picked, ("model.pt", "teacher.pt")):
        source = best_checkpoint(run_dir, cell)
        if not source.is_file():
            print(f"note: {cell.name} has no best checkpoint ({source}); {models_dir / name} left unchanged.")
            continue
        if PublishCheckpoint(source, models_dir / name).publish():
            published.append(models_dir / name)
            print(f"Published {cell.name} to {models_dir / name}")
    return published


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises :class:`KeyboardInterrupt` (see :func:`_terminate_as_interrupt`)."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While the cells run, SIGTERM (``kill``, ``timeout``, a batch system cancelling the job) stops them as Ctrl-C
    does: running cells are stopped, finished ones stay, and the command says how to resume. Without it the runner
    died at once and left its cell processes running (a background ``make study &`` also ignores SIGINT, so
    ``kill`` is how it is stopped). The previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_cells(args: argparse.Namespace, plan: CellPlan, results: ResultsFile, progress: Progress) -> int | None:
    """Run the plan's cells on the executor of ``args``, appending each record to ``results`` as it arrives (this
    process is the only writer of the results file); ``None`` when every cell finished, else the exit status
    (130 after Ctrl-C, 143 after SIGTERM)."""

    def finished(cell: Cell, record: dict) -> None:
        results.append(record)
        print(progress.finished(cell, record["seconds"]["wall"]), flush=True)

    try:
        with _terminate_as_interrupt(), make_executor(args) as executor:
            progress.jobs = executor.slots
            outcome = executor.run(plan, finished)
    except KeyboardInterrupt as interrupt:
        print(
            f"\nInterrupted: unfinished cells were stopped; {counted(len(results.read()), 'finished cell')} are in "
            f"{results.path}. Run the same command again to resume.",
            file=sys.stderr,
            flush=True,
        )
        return 143 if isinstance(interrupt, _Terminated) else 130
    if len(outcome.failures) == 1:
        failure = outcome.failures[0]
        raise SystemExit(
            f"error: cell {failure.cell.name} failed: {failure.message}"
            + (f" (log: {failure.log})" if failure.log else "")
        )
    if outcome.failures:
        lines = "\n".join(f"  {f.line()}" for f in outcome.failures)
        raise SystemExit(
            f"error: {len(outcome.failures)} cells failed (the other cells finished):\n{lines}\n"
            "Fix the cause and run the same command again: it runs the failed cells and keeps the finished ones."
        )
    if outcome.not_started:
        print(f"Stopping after {counted(args.max_cells, 'cell')} (--max-cells); run the same command again to go on.")
        return 0
    return None


def cmd_cell(args: argparse.Namespace) -> int:
    """Run one cell in this process and write its record to ``<cell dir>/record.json`` (``--subprocess``)."""
    ctx = context_from_study(args.run_dir)
    cell = Cell.from_dict(json.loads(args.cell))
    record = run_cell(ctx, cell)
    (cell_dir(ctx.run_dir, cell) / "record.json").write_text(json.dumps(record))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from scripts.study.report import StudyResults, check_table_files, write_report, write_tables

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "report.md"
    figures = Path(args.figures) if args.figures else out.parent / "figures"
    try:
        preface = Path(args.preface).read_text() if args.preface else None
    except OSError as e:
        raise SystemExit(f"error: --preface {args.preface}: {e.strerror or e}") from None
    check_table_files(args.tables or ())  # a file without a table block is refused before the report is written
    report = write_report(run_dir, out, figures, figures=not args.no_figures, preface=preface, title=args.title)
    print(f"{report.summary}\n\nWrote {out} and {counted(len(report.figures), 'figure')} in {figures}.")
    if args.tables:
        write_tables(StudyResults.load(run_dir), args.tables)
        print(f"Filled the results tables of {', '.join(args.tables)}.")
    return 0


def _add_matrix_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matrix", default="demo", choices=sorted(PRESETS), help="named matrix preset (default: demo)")
    p.add_argument("--projections", nargs="+", default=None, help="student projections of the main part")
    p.add_argument("--seeds", type=int, default=None, help="number of student seeds (0..N-1)")
    p.add_argument("--teachers", type=int, default=None, help="number of teacher seeds (0..N-1)")
    p.add_argument("--variants", nargs="*", default=None, choices=sorted(VARIANTS), help="loss ablation variants")
    p.add_argument("--fractions", type=float, nargs="*", default=None, help="low-data training fractions below 1")
    p.add_argument("--teacher-fraction", default=None, choices=TEACHER_FRACTIONS, help="teacher of low-data KD")
    p.add_argument("--centres", nargs="*", default=None, choices=["auto", "template"], help="extra slice centres")
    p.add_argument("--intensities", nargs="*", default=None, choices=["occipital", "zscore", "minmax"])
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--n-subjects", type=int, default=None, help="subjects of every generated synthetic set")
    p.add_argument(
        "--adabn-shares", type=float, nargs="+", default=None, help="site PD shares whose AdaBN scores are measured"
    )
    p.add_argument("--only", nargs="+", default=None, metavar="PATTERN", help="run only cells matching these globs")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("run", "report", "add-external", "list", "cell")
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    parser = argparse.ArgumentParser(prog="python -m scripts.study", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a study and report it")
    _add_matrix_options(run)
    run.add_argument("--run-dir", default=None, help="study folder (default: eval/study-<matrix>)")
    run.add_argument("--dataset-dir", default=None, help="in-domain data folder or datalist (default: synthetic)")
    run.add_argument("--dataset-name", default="in-domain", help="name of --dataset-dir in the report")
    run.add_argument("--external", action="append", default=[], metavar="NAME=DIR", help="external test set")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    run.add_argument("--prevalence", action="append", default=[], metavar="NAME=P", help="assumed PD prevalence")
    run.add_argument(
        "--no-shared-volumes",
        action="store_true",
        help="every cell preprocesses its own scans (default: each scan once per chain, in <run dir>/volumes)",
    )
    run.add_argument("--subprocess", action="store_true", help="run each cell in its own process")
    run.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells run at once, each in its own process (> 1 implies --subprocess; the cores are shared)",
    )
    run.add_argument("--executor", default="local", choices=EXECUTORS, help="where cells run (default: local)")
    run.add_argument(
        "--ray-address", default=None, help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray instance)"
    )
    run.add_argument(
        "--gpus-per-teacher", type=float, default=None, help="GPUs per teacher task (ray; default 1 with GPUs, else 0)"
    )
    run.add_argument(
        "--gpus-per-student",
        type=float,
        default=None,
        help="GPUs per student task (ray; default 0.5 with GPUs, else 0)",
    )
    run.add_argument("--cpus-per-task", type=float, default=None, help="CPUs (threads) per cell task (ray; default 1)")
    run.add_argument("--max-cells", type=int, default=None, help="stop after starting this many cells")
    run.add_argument("--dry-run", action="store_true", help="list the cells and stop")
    run.add_argument("--no-figures", action="store_true", help="write the report without figures")
    run.add_argument(
        "--publish",
        default=None,
        metavar="DIR",
        help="then publish the KD student and its teacher to DIR/model.pt and DIR/teacher.pt (e.g. models)",
    )

    rep = sub.add_parser("report", help="write the report of a study folder")
    rep.add_argument("run_dir")
    rep.add_argument("--out", default=None, help="report file (default: <run dir>/report.md)")
    rep.add_argument("--figures", default=None, help="figure folder (default: figures/ next to the report)")
    rep.add_argument("--no-figures", action="store_true")
    rep.add_argument("--title", default=None, help="the report's title (default: Results: what 3D-to-2D ...)")
    rep.add_argument("--preface", default=None, metavar="FILE", help="Markdown placed right after the title")
    rep.add_argument(
        "--tables",
        nargs="+",
        default=[],
        metavar="FILE",
        help="also fill the results block of these files (e.g. README.md docs/README.md); none by default",
    )

    add = sub.add_parser("add-external", help="score a finished study's cells on more external sets")
    add.add_argument("run_dir")
    add.add_argument("--external", action="append", required=True, metavar="NAME=DIR", help="external test set")
    add.add_argument("--prevalence", action="append", default=[], metavar="NAME=P", help="assumed PD prevalence")

    lst = sub.add_parser("list", help="list the cells of a matrix")
    _add_matrix_options(lst)

    cell = sub.add_parser("cell", help=argparse.SUPPRESS)
    cell.add_argument("run_dir")
    cell.add_argument("cell")

    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "cell":
        return cmd_cell(args)
    if args.command == "report":
        return cmd_report(args)
    if args.command == "list":
        args.dry_run, args.run_dir, args.jobs, args.executor, args.subprocess = True, None, 1, "local", False
        args.max_cells = args.ray_address = args.gpus_per_teacher = args.gpus_per_student = args.cpus_per_task = None
        return cmd_run(args, parser)
    _check_sets(args, parser)
    if args.command == "add-external":
        from scripts.study.added_sets import cmd_add_external

        return cmd_add_external(args)
    try:  # parsed as python-fire would, checked and normalised as the configs' options are
        args.set = check_overrides({k: _parse_value(v) for k, v in _pairs(args.set, "--set", parser).items()})
        if args.no_shared_volumes:
            args.set["shared_cache_dir"] = ""  # read by scripts.study.cells.volumes_dir
    except OptionError as e:
        parser.error(str(e))
    return cmd_run(args, parser)


def _check_sets(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Parse ``--external NAME=DIR`` and ``--prevalence NAME=P`` into dictionaries, or exit with a usage error."""
    args.external = _pairs(args.external, "--external", parser)
    for name in args.external:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            parser.error(
                f"--external {name}=...: a set's name has letters, digits, '_', '.', '-' only (it names folders)."
            )
    args.prevalence = _pairs(args.prevalence, "--prevalence", parser)
    for name, value in args.prevalence.items():
        try:
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError
        except ValueError:
            parser.error(f"--prevalence {name}={value}: expected a number in [0, 1].")


if __name__ == "__main__":
    raise SystemExit(main())
