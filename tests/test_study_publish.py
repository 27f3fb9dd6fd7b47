# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""``scripts.study run --publish DIR`` (``make demo``): the KD student and its teacher land in DIR, loadable."""

from __future__ import annotations

import torch
from scripts.checkpoints import read_checkpoint
from scripts.study.cells import best_checkpoint
from scripts.study.matrix import build_cells, preset
from scripts.study.runner import publish_models, published_cells


def _demo_cells():
    spec = preset("demo")
    return build_cells(spec), spec.teachers


def test_the_demo_publishes_its_first_kd_student_and_that_students_teacher():
    cells, n_teachers = _demo_cells()
    student, teacher = published_cells(cells, n_teachers)
    assert student.kind == "student" and student.kd and student.fraction == 1.0 and student.seed == 0
    assert teacher.kind == "teacher" and teacher == student.teacher(n_teachers)


def test_publish_models_copies_the_best_checkpoints_and_they_load(tmp_path):
    cells, n_teachers = _demo_cells()
    student, teacher = published_cells(cells, n_teachers)
    run_dir = tmp_path / "study"
    weights = {}
    for cell in (student, teacher):
        path = best_checkpoint(run_dir, cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        weights[cell.kind] = {"w": torch.rand(3, 2)}
        torch.save(weights[cell.kind], path)
    models = tmp_path / "models"
    published = publish_models(run_dir, cells, n_teachers, models)
    assert sorted(p.name for p in published) == ["model.pt", "teacher.pt"]
    state, _ = read_checkpoint(models / "model.pt")
    assert torch.equal(state["w"], weights["student"]["w"])
    state, _ = read_checkpoint(models / "teacher.pt")
    assert torch.equal(state["w"], weights["teacher"]["w"])


def test_publish_models_leaves_the_folder_alone_without_checkpoints(tmp_path, capsys):
    cells, n_teachers = _demo_cells()
    assert publish_models(tmp_path / "study", cells, n_teachers, tmp_path / "models") == []
    assert not (tmp_path / "models" / "model.pt").exists() and "left unchanged" in capsys.readouterr().out


class _FinishedProcess:
    """A cell process that has already exited successfully."""

    returncode = 0

    def poll(self) -> int:
        return 0

    def terminate(self) -> None:
        pass

    def wait(self) -> int:
        return 0


def test_parallel_jobs_start_the_teacher_first_and_each_kd_student_after_it(tmp_path, monkeypatch):
    """``--jobs 2`` starts the cell that heads the longest chain (the teacher, then its KD students) before the
    baselines that precede it in matrix order; every KD student still waits for its teacher."""
    from scripts.study import executors
    from scripts.study.cells import StudyContext

    cells, n_teachers = _demo_cells()
    started: list[str] = []

    def start(run_dir, cell, threads=None):
        started.append(cell.name)
        return _FinishedProcess()

    monkeypatch.setattr(executors, "start_cell_process", start)
    monkeypatch.setattr(executors, "cell_process_record", lambda run_dir, cell, rc: {"seconds": {}})
    finished: list[str] = []
    plan = executors.CellPlan(StudyContext(tmp_path, {"benchmark": "unused.json"}), cells, n_teachers=n_teachers)
    outcome = executors.LocalExecutor(jobs=2).run(plan, lambda cell, record: finished.append(cell.name))
    assert outcome.failures == [] and outcome.not_started == 0 and sorted(finished) == sorted(c.name for c in cells)
    assert cells[0].kind == "baseline" and started[0].startswith("teacher-")
    for cell in cells:
        teacher = cell.teacher(n_teachers)
        if teacher is not None:
            assert finished.index(teacher.name) < started.index(cell.name)
