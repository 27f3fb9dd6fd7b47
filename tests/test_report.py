# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Per-scan reports and the index page from inference (``--report True``), checked in a headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, config_preprocessing
from ignite.engine import Engine
from PIL import Image
from scripts.networks import Student2D, Teacher3D
from scripts.report import ReportWriter, render_scan_report

pytestmark = pytest.mark.usefixtures("single_thread")

GRID = [32, 32, 32]


def _checkpoints(root: Path, teacher: bool = True) -> Path:
    """Untrained but loadable student (and teacher) checkpoints in ``root/models``: a report needs weights, not
    good weights."""
    torch.manual_seed(0)
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    torch.save(Student2D("resnet18", projection="joint_fusion_slices").state_dict(), models / "model.pt")
    if teacher:
        torch.save(Teacher3D("resnet10").state_dict(), models / "teacher.pt")
    return models


def _infer(root: Path, dataset: Path, scans: Path, run_name: str) -> Path:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(BUNDLE_ROOT / "configs" / "inference.json"),
        meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
        logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(root),
        dataset_dir=str(dataset),
        spatial_size=GRID,
        input=str(scans),
        report=True,
        run_name=run_name,
        batch_size=2,
        allow_nonstandard_input=True,  # the moved scan is refused by the inference gate otherwise
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return root / "eval" / run_name / "report"


@pytest.fixture(scope="module")
def report_dir(tiny_phantom_dataset, tmp_path_factory) -> Path:
    """Inference with ``--report True`` on three phantom scans, one of them moved 40 mm out of MNI space."""
    dataset = tiny_phantom_dataset.parent
    root = tmp_path_factory.mktemp("report")
    _checkpoints(root)
    scans = root / "scans"
    scans.mkdir()
    images = sorted((dataset / "images").glob("*.nii.gz"))[:3]
    for image in images[:2]:
        shutil.copy(image, scans / image.name)
    moved = nib.load(str(images[2]))
    affine = moved.affine.copy()
    affine[:3, 3] += [0.0, 40.0, 0.0]
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj), affine), str(scans / "moved.nii.gz"))
    return _infer(root, dataset, scans, "report")


def test_inference_report_writes_one_png_per_scan_and_the_index(report_dir):
    rows = json.loads((report_dir / "report.json").read_text())
    assert len(rows) == 3 and all(r["error"] is None for r in rows)
    for row in rows:
        png = report_dir / row["png"]
        assert png.is_file()
        width, height = Image.open(png).size
        assert width > 800 and height > 500
        assert 0.0 <= row["student_pd"] <= 1.0 and 0.0 <= row["teacher_pd"] <= 1.0
        assert row["predicted_label"] == ("PD" if row["student_pd"] >= 0.5 else "HC")
        assert {"putamen_L", "putamen_R", "putamen_ai", "lowest_putamen"} <= set(row["sbr"])
    moved = next(r for r in rows if r["name"] == "moved")
    assert any("not be in MNI space" in w for w in moved["warnings"])
    assert not any("MNI" in w for r in rows if r["name"] != "moved" for w in r["warnings"])
    page = (report_dir / "index.html").read_text()
    assert page.count('class="thumb"') == 3 and "http" not in page.replace("http-equiv", "")
    # rows are sorted by the student's P(PD), highest first
    order = [r["name"] for r in sorted(rows, key=lambda r: -r["student_pd"])]
    assert [page.index(f'data-name="{n}"') for n in order] == sorted(page.index(f'data-name="{n}"') for n in order)


def test_report_without_a_teacher_checkpoint_says_so(tiny_phantom_dataset, tmp_path):
    dataset = tiny_phantom_dataset.parent
    _checkpoints(tmp_path, teacher=False)
    one = sorted((dataset / "images").glob("*.nii.gz"))[0]
    report = _infer(tmp_path, dataset, one, "no-teacher")
    rows = json.loads((report / "report.json").read_text())
    assert len(rows) == 1 and rows[0]["png"] and rows[0]["teacher_pd"] is None
    page = (report / "index.html").read_text()
    assert "No teacher panel" in page and "teacher.pt not found" in page and "configs/train_teacher.json" in page


def test_a_scan_that_cannot_be_read_gets_an_error_row_and_the_others_their_report(tiny_phantom_dataset, tmp_path):
    """A run that could not process a scan (here the engine only yields the readable one) lists it with the
    reason; the readable scan gets its report."""
    dataset = tiny_phantom_dataset.parent
    good = sorted((dataset / "images").glob("*.nii.gz"))[0]
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    preprocessing = config_preprocessing(GRID, projection="joint_fusion_slices")
    student = Student2D("resnet18", projection="joint_fusion_slices").eval()
    models = _checkpoints(tmp_path)
    writer = ReportWriter(
        tmp_path / "report",
        student,
        config_preprocessing(GRID).transforms,
        teacher=Teacher3D("resnet10"),
        teacher_file=models / "teacher.pt",
        datalist=[{"image": str(good)}, {"image": str(bad)}],
        reference_datalist=dataset / "datalist.json",
    )

    def step(engine, _):
        item = preprocessing({"image": str(good)})
        with torch.no_grad():
            pred = torch.softmax(student(item["image"].as_tensor()[None]), dim=1)[0]
        engine.state.batch = [item]
        return [{"pred": pred}]

    engine = Engine(step)
    writer.attach(engine)
    engine.run([0], max_epochs=1)
    rows = {r["name"]: r for r in json.loads((tmp_path / "report" / "report.json").read_text())}
    assert set(rows) == {good.name[: -len(".nii.gz")], "broken"}
    assert rows["broken"]["png"] is None and "could not be read" in rows["broken"]["error"]
    assert rows[good.name[: -len(".nii.gz")]]["error"] is None
    assert (tmp_path / "report" / rows[good.name[: -len(".nii.gz")]]["png"]).is_file()
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'class="error"' in page and "broken" in page


def test_the_bundle_needs_matplotlib_only_to_draw_a_report(monkeypatch):
    """No module-level matplotlib import (inference without --report never needs it); drawing asks for it."""
    import ast

    for module in ("report.py", "explain.py"):
        tree = ast.parse((BUNDLE_ROOT / "scripts" / module).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not any(name.startswith("matplotlib") for name in names), module
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError):
        render_scan_report("unused.png", "x", np.zeros((4, 4, 4)), {})


# ---------------------------------------------------------------------------------------------------------------
# The index page in a real browser
# ---------------------------------------------------------------------------------------------------------------

_CHECK = """
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {src: img.getAttribute("src"), ok: img.complete && img.naturalWidth > 0};
  });
  var before = Array.prototype.map.call(document.querySelectorAll("#scans tbody tr"), function (r) {
    return r.getAttribute("data-name");
  });
  window.sortReport(2, false);
  var ascending = Array.prototype.map.call(document.querySelectorAll("#scans tbody tr"), function (r) {
    return r.getAttribute("data-name");
  });
  var out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({images: images, before: before, ascending: ascending});
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _chromium_args(profile: Path) -> list[str]:
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,1000",
    ]  # fmt: skip


def test_index_page_loads_every_image_and_sorts_in_headless_chromium(report_dir, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "chromium is not installed (Debian: apt-get install chromium, as .ci/run does): index.html not checked"
        )
    page = (report_dir / "index.html").read_text()
    check = report_dir / "browser-check.html"  # beside index.html, so relative image paths resolve the same way
    check.write_text(page.replace("</body>", _CHECK + "</body>"))
    try:
        result = subprocess.run(
            [chromium, *_chromium_args(tmp_path / "profile"), "--virtual-time-budget=5000", "--dump-dom",
             check.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        check.unlink()
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    start = dom.index('<pre id="check">') + len('<pre id="check">')
    found = json.loads(dom[start : dom.index("</pre>", start)].replace("&quot;", '"').replace("&amp;", "&"))
    rows = json.loads((report_dir / "report.json").read_text())
    assert len(found["images"]) == len(rows) == 3
    assert all(image["ok"] for image in found["images"]), found["images"]
    by_pd = sorted(rows, key=lambda r: r["student_pd"])
    assert found["before"] == [r["name"] for r in reversed(by_pd)]
    assert found["ascending"] == [r["name"] for r in by_pd]
    # a screenshot of the page as a reader sees it
    shot = tmp_path / "index.png"
    subprocess.run(
        [chromium, *_chromium_args(tmp_path / "profile"), f"--screenshot={shot}", (report_dir / "index.html").as_uri()],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file() and Image.open(shot).size == (1400, 1000)
