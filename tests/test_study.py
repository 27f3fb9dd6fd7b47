# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The study runner: matrix, pairing, resumable results, isolation of cells, report and figures.

The default suite runs a tiny matrix (2 projections × KD on/off × 2 seeds, one teacher, one ablation variant, one
external set; 24³ grid, 1 epoch) in-process through the bundle's configs, interrupted by ``--max-cells`` and
resumed; the slow test runs it with ``--subprocess`` and kills the runner's process group mid-study.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT
from scripts.study.matrix import PRESETS, VARIANTS, Cell, build_cells, count_cells, preset
from scripts.study.results import ResultsFile, StudyFile
from scripts.study.runner import main

TINY = ["--set", "spatial_size=[24,24,24]", "--set", "batch_size=6", "--teacher-epochs", "1", "--student-epochs", "1"]
MATRIX = ["--matrix", "demo", "--projections", "joint_fusion_slices", "dynamic_image", "--seeds", "2",
          "--teachers", "1", "--variants", "fg", "--adabn-shares", "0.5"]  # fmt: skip
N_CELLS = 3 + 1 + 2 * 2 * 2 + 2  # baselines, teacher, projections × KD on/off × seeds, ablation variant × seeds


def _run(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# matrix and pairing
# ----------------------------------------------------------------------------------------------------------------
def test_presets_have_the_documented_cells():
    counts = {name: count_cells(build_cells(preset(name))) for name in PRESETS}
    assert counts["demo"] == {"baseline": 3, "teacher": 1, "student": 4}
    # cpu: 3 + 3·2 + 3 teachers (full data, each low-data fraction, occipital); students: 5 projections × 2 × 3 +
    # 4 extra variants × 3 + auto centre 2 × 3 + occipital 2 × 3, then the low-data sweep (2 fractions × 2
    # projections × 10 seeds × {KD from the matched teacher, KD from the full-data one, no KD}) and the label-noise
    # arm (2 projections × 10 seeds × {KD, no KD})
    assert counts["cpu"] == {"baseline": 3, "teacher": 12, "student": 30 + 12 + 6 + 6 + 120 + 40}
    # full: 10 projections, matched and full-data teachers in the low-data sweep
    assert counts["full"] == {"baseline": 3, "teacher": 25, "student": 100 + 20 + 45 + 10 + 10}
    # the demo leaves AdaBN out (at one site share it was 39 s of the teacher's 178 s cell, on the demo's critical
    # path); the cpu matrix measures it at every share
    assert preset("demo").adabn_shares == () and preset("cpu").adabn_shares is None
    assert preset("demo", adabn_shares=[0.2, 0.5, 0.8]).adabn_shares == (0.2, 0.5, 0.8)
    with pytest.raises(ValueError, match=r"must be among \[0.2, 0.5, 0.8\], got \[0.3\]"):
        preset("demo", adabn_shares=(0.3,))


def test_list_prints_every_cell_of_a_preset():
    out = _run("list", "--matrix", "cpu")
    assert "229 cells (12 teacher, 214 student, 3 baseline)" in out
    assert "student-entropy-nokd-f1-template-minmax-s2" in out and "teacher-f0.0556-minmax-s2" in out


def test_one_study_at_a_time_per_run_folder(tmp_path):
    from scripts.study.runner import exclusive

    with exclusive(tmp_path):
        with pytest.raises(SystemExit, match="another study is running"):
            with exclusive(tmp_path):
                pass
    with exclusive(tmp_path):  # released
        pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--set", "max_epoch=3"],
            "--set max_epoch=3: max_epoch is not an option of this bundle; did you mean max_epochs?",
        ),
        (["--set", "max_epochs=abc"], "--set max_epochs=abc: option --max_epochs expects an integer >= 1, got 'abc'."),
        (["--set", "amp=maybe"], "--set amp=maybe: option --amp expects true or false"),
        (["--external", "a/b=x"], "--external a/b=...: a set's name has letters, digits"),
    ],
)
def test_a_study_option_every_cell_would_fail_on_is_refused_before_anything_runs(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as stopped:
        main(["run", "--matrix", "demo", "--run-dir", str(tmp_path / "run"), *options])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_that_is_a_file_is_one_line(tmp_path):
    afile = tmp_path / "results"
    afile.write_text("mine")
    with pytest.raises(SystemExit, match=f"error: --run-dir {afile}: cannot use it as a study folder"):
        main(["run", "--matrix", "demo", "--run-dir", str(afile), "--max-cells", "0"])
    assert afile.read_text() == "mine"


def test_cells_are_unique_and_teachers_come_before_their_students():
    spec = preset("cpu")
    cells = build_cells(spec)
    assert len({c.name for c in cells}) == len(cells)
    seen = set()
    for cell in cells:
        teacher = cell.teacher(spec.teachers)
        assert teacher is None or teacher.name in seen, cell.name
        seen.add(cell.name)
    # the main KD cell of the default projection doubles as the ablation's fg+lg and the low-data fraction 1
    main_kd = Cell("student", 0, "joint_fusion_slices", True, "fg+lg", 1.0, 1.0)
    assert sum(c == main_kd for c in cells) == 1
    assert {c.variant for c in cells if c.kind == "student" and c.kd} == set(VARIANTS)


def test_kd_and_nokd_cells_of_a_seed_differ_only_by_distillation():
    kd = Cell("student", 3, "dynamic_image", True, "fg", 0.5, 0.5, "template", "occipital")
    nokd = Cell("student", 3, "dynamic_image", False, "none", 0.5, None, "template", "occipital")
    a, b = kd.overrides(), nokd.overrides()
    assert {k for k in a if a.get(k) != b.get(k)} == {"kd_enabled", "kd_mode", "fg_weight", "lg_weight", "decor_weight"}
    assert a["fg_weight"] == 5.0 and a["lg_weight"] == 0.0
    # student seed s is distilled from teacher s mod n, trained on the teacher fraction with the same intensity
    assert kd.teacher(2) == Cell("teacher", seed=1, fraction=0.5, intensity="occipital")
    assert nokd.teacher(2) is None
    assert kd.name == "student-dynamic_image-kd-fg-f0.5-tf0.5-template-occipital-s3"
    with pytest.raises(ValueError):
        Cell("student", 0, "joint_fusion_slices", True, "nope", 1.0, 1.0)


def test_kd_and_nokd_students_of_one_seed_share_initialisation_and_data_order(tiny_phantom_dataset, tmp_path):
    from monai.bundle import ConfigWorkflow
    from scripts.networks import Teacher3D

    teacher = tmp_path / "teacher.pt"
    torch.save(Teacher3D(backbone="resnet10").state_dict(), teacher)
    states = {}
    cwd = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    try:
        for kd in (True, False):
            cell = Cell("student", 5, "joint_fusion_slices", kd, "fg+lg" if kd else "none", 1.0, 1.0 if kd else None)
            wf = ConfigWorkflow(
                config_file="configs/distill.json", logging_file=False, bundle_root=str(tmp_path),
                dataset_dir=str(tiny_phantom_dataset.parent), spatial_size=[24, 24, 24], teacher_ckpt=str(teacher),
                progress_bar=False, **cell.overrides(),
            )  # fmt: skip
            wf.initialize()
            trainer = wf.parser.get_parsed_content("train#trainer")  # builds everything, in the order run() does
            weights = [v.clone() for v in wf.parser.get_parsed_content("network").state_dict().values()]
            rng = torch.random.get_rng_state()
            first = next(iter(trainer.data_loader))  # plain-tensor batches keep the file names in image_meta_dict
            order = list(first["image_meta_dict"]["filename_or_obj"])
            states[kd] = (weights, rng, order)
    finally:
        os.chdir(cwd)
    (w_kd, rng_kd, order_kd), (w_no, rng_no, order_no) = states[True], states[False]
    assert all(torch.equal(a, b) for a, b in zip(w_kd, w_no))
    assert torch.equal(rng_kd, rng_no) and order_kd == order_no


# ----------------------------------------------------------------------------------------------------------------
# results file
# ----------------------------------------------------------------------------------------------------------------
def test_results_file_survives_an_interrupted_write(tmp_path):
    results = ResultsFile(tmp_path / "results.jsonl")
    results.append({"cell": "a", "x": 1})
    results.append({"cell": "b", "x": 2})
    with results.path.open("a") as f:
        f.write('{"cell": "c", "x"')  # killed mid-write
    with pytest.warns(UserWarning, match="unfinished last line"):
        assert set(results.read()) == {"a", "b"}
    results.append({"cell": "c", "x": 3})  # cuts the partial line first
    assert results.read()["c"]["x"] == 3 and len(results.path.read_text().splitlines()) == 3
    results.path.write_text('{"cell": "a"}\nnot json\n{"cell": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        results.read()


def test_a_run_folder_refuses_other_settings(tmp_path):
    study = StudyFile(tmp_path / "study.json")
    study.write({"settings": {"student": {"max_epochs": 15}}})
    study.check({"student": {"max_epochs": 15}})
    with pytest.raises(ValueError, match="max_epochs"):
        study.check({"student": {"max_epochs": 30}})


# ----------------------------------------------------------------------------------------------------------------
# the tiny matrix, in-process
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def av133_set(tmp_path_factory) -> Path:
    from scripts.synthetic.phantom import generate_dataset

    out = tmp_path_factory.mktemp("av133")
    return generate_dataset(out, n_subjects=8, seed=5, modality="av133", split=(0, 0, 1), workers=1)


def _models_state() -> dict:
    folder = BUNDLE_ROOT / "models"
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.is_dir() else {}


@pytest.fixture(scope="module")
def tiny_study(tiny_phantom_dataset, av133_set, tmp_path_factory):
    """The tiny matrix run in two goes: interrupted after 5 cells by --max-cells, then resumed to the end."""
    run_dir = tmp_path_factory.mktemp("study") / "run"
    models = _models_state()
    args = ["run", *MATRIX, *TINY, "--run-dir", str(run_dir), "--dataset-dir", str(tiny_phantom_dataset.parent),
            "--external", f"av133={av133_set.parent}"]  # fmt: skip
    with torch.random.fork_rng():
        first = _run(*args, "--max-cells", "5")
        lines_first = (run_dir / "results.jsonl").read_text().splitlines()
        second = _run(*args)
    return {"run_dir": run_dir, "args": args, "first": first, "second": second, "lines_first": lines_first,
            "models": models}  # fmt: skip


def test_an_interrupted_study_resumes_with_the_unfinished_cells(tiny_study):
    assert f"0 finished, {N_CELLS} to run" in tiny_study["first"] and "Stopping after 5 cells" in tiny_study["first"]
    assert f"5 finished, {N_CELLS - 5} to run" in tiny_study["second"]
    lines = (tiny_study["run_dir"] / "results.jsonl").read_text().splitlines()
    assert lines[:5] == tiny_study["lines_first"]  # finished cells were not run again
    assert f"[{N_CELLS}/{N_CELLS}]" in tiny_study["second"] and "estimate" in tiny_study["first"]


def test_parallel_jobs_give_the_cells_of_the_in_process_run(tiny_study, tmp_path, monkeypatch):
    """``--jobs 2``: cell processes side by side (the no-KD student beside the teacher), each KD student after its
    teacher; the same records as in-process (with the same number of threads: other reduction orders would give
    other last digits, which a 1-epoch training amplifies)."""
    cells = ["teacher-f1-minmax-s0", "student-dynamic_image-kd-fg+lg-f1-tf1-template-minmax-s0",
             "student-dynamic_image-nokd-f1-template-minmax-s0"]  # fmt: skip
    reference = {
        r["cell"]: r for r in map(json.loads, (tiny_study["run_dir"] / "results.jsonl").read_text().splitlines())
    }
    monkeypatch.setenv("OMP_NUM_THREADS", str(reference[cells[0]]["hardware"]["torch_threads"]))
    args = [a if a != str(tiny_study["run_dir"]) else str(tmp_path / "run") for a in tiny_study["args"]]
    out = _run(*args, "--jobs", "2", "--no-figures", "--only", *cells)
    assert f"[{len(cells)}/{len(cells)}]" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    order = [r["cell"] for r in records]
    assert set(order) == set(cells) and order.index(cells[0]) < order.index(cells[1])  # KD waits for its teacher
    assert {r["mode"] for r in records} == {"subprocess (2 jobs)"}
    for r in records:  # a cell's outcome does not depend on how it was run
        for key, got in r["predictions"].items():
            want = reference[r["cell"]]["predictions"][key]
            assert got["files"] == want["files"] and got["labels"] == want["labels"]
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-5), (r["cell"], key)


def test_a_rerun_skips_every_finished_cell(tiny_study):
    before = (tiny_study["run_dir"] / "results.jsonl").read_bytes()
    out = _run(*tiny_study["args"], "--no-figures")
    assert f"{N_CELLS} finished, 0 to run" in out and "->" not in out
    assert (tiny_study["run_dir"] / "results.jsonl").read_bytes() == before


def test_add_external_scores_a_finished_study_as_if_the_set_had_been_there(tiny_study, tmp_path):
    """A copy of the tiny study (moved: its records name the original folder), with av133 taken out of its settings
    and out of five cells' records, then ``add-external``: those cells get the very scores and metrics they had,
    the others are left alone, a second call has nothing to do; a clashing, unreadable or split-less set is
    refused in one line and leaves the study as it was."""
    import copy

    from scripts.data import load_datalist

    run = tmp_path / "moved"
    shutil.copytree(tiny_study["run_dir"], run, ignore=shutil.ignore_patterns(".lock"))
    reference = ResultsFile(run / "results.jsonl").read()
    study = StudyFile(run / "study.json")
    content = study.read()
    datalist = content["settings"]["datasets"].pop("av133")
    study.write(content)
    stripped = ["baseline-sbr", "baseline-always_pd", "baseline-centres", "teacher-f1-minmax-s0",
                "student-dynamic_image-kd-fg+lg-f1-tf1-template-minmax-s1"]  # fmt: skip
    lines = []
    for name, record in reference.items():
        record = copy.deepcopy(record)
        if name in stripped:
            for part in ("predictions", "metrics", "centres"):
                record.get(part, {}).pop("av133/test", None)
        lines.append(json.dumps(record))
    (run / "results.jsonl").write_text("\n".join(lines) + "\n")
    out = _run("add-external", str(run), "--external", f"av133={Path(datalist).parent}")
    assert f"{N_CELLS} finished cells; {len(stripped)} to score on av133." in out and f"[{len(stripped)}/" in out
    records = ResultsFile(run / "results.jsonl").read()
    for name in stripped:
        got, ref = records[name], reference[name]
        part = "centres" if name == "baseline-centres" else "predictions"
        assert got[part]["av133/test"] == ref[part]["av133/test"], name
        assert got.get("metrics") == ref.get("metrics") and got["added_sets"] == ["av133"], name
    # scored in the moved folder's cell, beside (not over) the run folder the study's own scoring left there
    assert (run / "cells" / "teacher-f1-minmax-s0" / "eval" / "eval-av133-test-2" / "predictions.csv").is_file()
    assert not (tiny_study["run_dir"] / "cells" / "teacher-f1-minmax-s0" / "eval" / "eval-av133-test-2").exists()
    assert study.read()["settings"]["datasets"]["av133"] == datalist
    assert "add-external" in study.read()["invocations"][-1]["command"]
    assert "0 to score" in _run("add-external", str(run), "--external", f"av133={Path(datalist).parent}")
    in_domain, other = next(iter(content["settings"]["datasets"].items()))
    with pytest.raises(SystemExit, match="already has av133"):
        main(["add-external", str(run), "--external", f"av133={Path(other).parent}"])
    with pytest.raises(SystemExit, match="is the study's in-domain set"):
        main(["add-external", str(run), "--external", f"{in_domain}={Path(datalist).parent}"])
    # a set that cannot be scored leaves the study as it was, with one line naming the file and the problem
    broken = tmp_path / "broken"
    shutil.copytree(Path(datalist).parent, broken)
    scan = broken / load_datalist(str(broken / "datalist.json"), "test")[0]["image"]
    scan.write_bytes(scan.read_bytes()[:200])  # a truncated gzip stream
    before = (run / "study.json").read_text(), (run / "results.jsonl").read_text()
    with pytest.raises(SystemExit, match=f"cannot read image {scan}"):
        main(["add-external", str(run), "--external", f"broken={broken}"])
    (broken / "datalist.json").write_text(json.dumps({"training": []}))
    with pytest.raises(SystemExit, match="--external broken: .* has no list named 'test'"):
        main(["add-external", str(run), "--external", f"broken={broken}"])
    assert ((run / "study.json").read_text(), (run / "results.jsonl").read_text()) == before


def test_results_file_has_every_cell_once_with_its_metrics(tiny_study):
    lines = (tiny_study["run_dir"] / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == N_CELLS == len({r["cell"] for r in records})
    assert {r["cell"] for r in records} >= {"baseline-sbr", "baseline-always_pd", "baseline-centres"}
    for r in records:
        assert r["hardware"]["cpu_count"] >= 1 and r["seconds"]["wall"] > 0 and "finished" in r
        if r["axes"]["baseline"] == "centres":
            continue
        assert set(r["predictions"]) == {"in-domain/validation", "in-domain/test", "av133/test"}
        for key in ("in-domain/test", "av133/test"):
            assert {"default", "validation", "recalibrated"} <= set(r["metrics"][key])
            assert 0.0 <= r["metrics"][key]["validation"]["accuracy"] <= 1.0
        if r["axes"]["kind"] != "baseline":
            assert r["training"]["epochs"] == 1 and r["axes"]["seed"] in (0, 1)
    variants = {(r["axes"]["projection"], r["axes"]["variant"]) for r in records if r["axes"]["kind"] == "student"}
    assert variants == {("joint_fusion_slices", "fg+lg"), ("joint_fusion_slices", "none"), ("dynamic_image", "fg+lg"),
                        ("dynamic_image", "none"), ("joint_fusion_slices", "fg")}  # fmt: skip
    always = next(r for r in records if r["cell"] == "baseline-always_pd")
    assert always["metrics"]["in-domain/test"]["validation"]["sensitivity"] == 1.0  # always PD at every threshold


def test_every_cell_trains_and_scores_its_own_checkpoint_outside_the_repository(tiny_study):
    run_dir = tiny_study["run_dir"]
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    for r in records:
        if r["axes"]["kind"] == "baseline":
            continue
        own = run_dir / "cells" / r["cell"]
        assert Path(r["checkpoint"]).parent == own / "eval" / "train" and Path(r["checkpoint"]).is_file()
        for command in r["commands"]:
            args = shlex.split(command)
            assert args[args.index("--bundle_root") + 1] == str(own)
            if "--eval_checkpoint" in args:
                assert args[args.index("--eval_checkpoint") + 1] == r["checkpoint"]
        if r["axes"]["kd"]:
            args = shlex.split(r["commands"][0])
            teacher = run_dir / "cells" / r["teacher_cell"] / "eval" / "train" / "teacher.pt"
            assert args[args.index("--teacher_ckpt") + 1] == str(teacher) == r["teacher_checkpoint"]
    assert _models_state() == tiny_study["models"]  # the repository's models/ was not touched


def test_report_and_figures_render_with_the_right_rows(tiny_study, tmp_path):
    run_dir = tiny_study["run_dir"]
    report = (run_dir / "report.md").read_text()
    rows = ("| 3D teacher | 1 |", "| 2D joint fusion slices, with KD | 2 |",
            "| 2D joint fusion slices, without KD | 2 |", "| 2D dynamic image, with KD | 2 |",
            "| 2D dynamic image, without KD | 2 |",
            "| SBR threshold (lowest putamen) | 1 |", "| always PD | 1 |", "| KD `fg` | 2 |", "**av133**",
            "| (1) KD improves every projection |", "template centre")  # fmt: skip
    for row in rows:
        assert row in report, row
    assert "too few seeds" in report  # two seeds never give a verdict
    assert "by validation ROC AUC with ties broken by the validation cross-entropy (`auc_ce`)" in report
    # the report command writes anywhere, figures beside it, linked relative to the report
    out = tmp_path / "docs" / "results.md"
    _run("report", str(run_dir), "--out", str(out), "--figures", str(tmp_path / "docs" / "figures"))
    text = out.read_text()
    figures = {p.name for p in (tmp_path / "docs" / "figures").glob("*.png")}
    assert figures >= {"kd_vs_nokd.png", "roc.png", "external.png", "ablation.png", "centres.png", "gallery.png"}
    for name in figures:
        assert (tmp_path / "docs" / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{name})" in text
    assert all(row in text for row in rows)


def test_the_run_folder_keeps_its_settings(tiny_study):
    with pytest.raises(SystemExit, match="student"):
        _run(*tiny_study["args"], "--student-epochs", "3")


def test_publish_prints_the_inference_command_that_serves_the_published_models(tiny_study, tmp_path):
    models = tmp_path / "models"
    out = _run(*tiny_study["args"], "--publish", str(models))
    assert (models / "model.pt").is_file() and (models / "teacher.pt").is_file()
    line = next(x for x in out.splitlines() if x.startswith("Score scans with it: "))
    command = shlex.split(line.split(": ", 1)[1])
    assert command[:6] == ["python", "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *command[1:], "--bundle_root", str(tmp_path)], cwd=BUNDLE_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (predictions,) = (tmp_path / "eval").glob("inference-*/predictions.csv")
    assert len(predictions.read_text().splitlines()) > 1


def test_a_run_folder_made_under_other_cell_rules_is_not_extended(tiny_study, tmp_path):
    """A folder whose cells were configured by other rules (here: low-data checkpoints picked by macro-F1, as
    before the study selected them by ROC AUC) is not mixed with new cells; its results stay readable."""
    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_study["run_dir"], run_dir)
    study = StudyFile(run_dir / "study.json")
    content = study.read()
    content["settings"]["cell_rules"]["low_data_selection_metric"] = "f1_macro"
    study.write(content)
    args = list(tiny_study["args"])
    args[args.index("--run-dir") + 1] = str(run_dir)
    with pytest.raises(SystemExit, match="configures its cells differently.*choose another --run-dir"):
        _run(*args)
    out = tmp_path / "old.md"
    _run("report", str(run_dir), "--out", str(out), "--no-figures")  # readable, with the rule it was made under
    assert "training subjects by validation `f1_macro`" in out.read_text()
    del content["settings"]["cell_rules"]  # a folder from before the rules were recorded
    study.write(content)
    with pytest.raises(SystemExit, match="configures its cells differently"):
        _run(*args)


def _cell_processes(run_dir: Path) -> list[str]:
    """Process ids of the cells of ``run_dir`` (each cell process names the run folder on its command line)."""
    found = subprocess.run(["pgrep", "-f", f"scripts.study cell {run_dir}"], capture_output=True, text=True)
    return found.stdout.split()


def test_a_terminated_study_stops_its_cells_and_says_how_to_resume(tiny_phantom_dataset, tmp_path):
    """``kill`` (SIGTERM: ``timeout``, a batch system cancelling the job; a background ``make study &`` ignores
    SIGINT) stops a study as Ctrl-C does: its running cell processes are stopped with it, none is left running, and
    the command exits 143 saying how to resume. Before, the runner died at once and its cells ran on."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "scripts.study", "run", *MATRIX, *TINY, "--run-dir", str(run_dir), "--jobs", "2",
           "--dataset-dir", str(tiny_phantom_dataset.parent), "--only", "teacher-*", "--no-figures"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not _cell_processes(run_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and _cell_processes(run_dir), "the teacher cell never started"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-2000:] + err[-2000:]
    assert "Interrupted: unfinished cells were stopped" in err and "Run the same command again to resume" in err
    assert not _cell_processes(run_dir), "a cell process outlived the terminated study"


# ----------------------------------------------------------------------------------------------------------------
# the tiny matrix, one process per cell, killed and resumed
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_subprocess_study_killed_mid_run_resumes_and_its_commands_are_real(tiny_phantom_dataset, av133_set, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "scripts.study", "run", *MATRIX, *TINY, "--run-dir", str(run_dir), "--subprocess",
           "--dataset-dir", str(tiny_phantom_dataset.parent), "--external", f"av133={av133_set.parent}"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_ROOT), OMP_NUM_THREADS="1")
    results = run_dir / "results.jsonl"
    proc = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and len(results.read_text().splitlines()) >= 6:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(2.0)  # into the next cell's training
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its cell process, as a Ctrl-C or a lost session would
    proc.wait()
    done = results.read_text().splitlines()
    assert 6 <= len(done) < N_CELLS

    result = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(done)} finished, {N_CELLS - len(done)} to run" in result.stdout
    lines = results.read_text().splitlines()
    assert lines[: len(done)] == done and len(lines) == N_CELLS
    records = [json.loads(line) for line in lines]
    assert {r["mode"] for r in records} == {"subprocess"} and (run_dir / "report.md").is_file()

    # a recorded evaluation command, run by hand through MONAI's CLI, reproduces the cell's predictions
    student = next(r for r in records if r["axes"]["kind"] == "student" and r["axes"]["kd"])
    command = next(c for c in student["commands"] if "eval-av133-test" in c)
    args = shlex.split(command)
    args[args.index("--run_name") + 1] = "by-hand"
    by_hand = subprocess.run([sys.executable, *args[1:]], cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True)
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    rows = (run_dir / "cells" / student["cell"] / "eval" / "by-hand" / "predictions.csv").read_text().splitlines()
    scores = {Path(r.split(",")[0]).name: float(r.split(",")[2]) for r in rows}
    pred = student["predictions"]["av133/test"]
    assert [scores[f] for f in pred["files"]] == pytest.approx(pred["scores"], abs=1e-5)


ADABN_CELLS = ["teacher-f1-minmax-s0", "student-joint_fusion_slices-nokd-f1-template-minmax-s0"]


@pytest.mark.parametrize("cell_name", ADABN_CELLS)
def test_adabn_scores_of_the_study_equal_the_inference_command(tiny_study, tmp_path, monkeypatch, cell_name):
    """The study's AdaBN re-scoring (site subsets read from its preprocessed scans) gives the scores of
    ``configs/inference.json --site_adaptation adabn`` on the same scans, for a teacher and a student."""
    import csv

    import scripts.study.adaptation as adaptation
    from scripts.study.cells import best_checkpoint
    from scripts.study.runner import context_from_study

    run_dir = tmp_path / "run"  # a copy: the study's own folders stay as the other tests read them
    (run_dir / "cells").mkdir(parents=True)
    shutil.copy(tiny_study["run_dir"] / "study.json", run_dir / "study.json")
    shutil.copytree(tiny_study["run_dir"] / "cells" / cell_name, run_dir / "cells" / cell_name)
    cell = next(c for c in build_cells(preset("demo", projections=("joint_fusion_slices",))) if c.name == cell_name)
    monkeypatch.setattr(adaptation, "MIN_SCANS", 3)  # the tiny external set has 8 scans
    ctx = context_from_study(run_dir)
    checkpoint = best_checkpoint(run_dir, cell)
    with torch.random.fork_rng():
        out = adaptation.adabn_predictions(ctx, cell, checkpoint)
    site = "av133@0.5"  # the tiny set (8 scans) is too small for some other shares' subsets
    assert site in out and set(out) <= {f"av133@{share}" for share in adaptation.SHARES}, out.keys()
    settings = {k: v for k, v in ctx.settings.items() if k in ("spatial_size",)}
    configs = ["configs/inference.json"] + (["configs/inference_teacher.json"] if cell.kind == "teacher" else [])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
           "--bundle_root", str(tmp_path / "cli"), "--input", str(run_dir / "cells" / cell_name / "adaptation" /
           f"{site}.json"), "--input_split", "test", "--model_file", str(checkpoint), "--site_adaptation", "adabn",
           "--site_adaptation_min_scans", "3", "--run_name", "cli", "--progress_bar", "false"]  # fmt: skip
    for key, value in settings.items():
        cmd += [f"--{key}", json.dumps(value)]
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_ROOT))
    done = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "cli" / "eval" / "cli" / "predictions.csv").open(newline="", encoding="utf-8") as f:
        cli = {Path(r["image"]).name: float(r["pd_probability"]) for r in csv.DictReader(f)}
    assert len(out[site]["files"]) >= 3
    for name, score in zip(out[site]["files"], out[site]["scores"]):
        assert score == pytest.approx(cli[name], abs=2e-5), name
