# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The study report: Markdown tables, paired statistics and the paper's claims, generated from ``results.jsonl``.

    python -m scripts.study report RUN_DIR [--out docs/results.md] [--figures docs/figures]

Nothing in the report is typed by hand: every number is computed here from the cell records (per-scan scores,
metrics at each operating point, timings), every claim carries its paired difference, 95 % bootstrap interval
and sign-flip p-value (:mod:`scripts.study.stats`), and the figures are drawn by :mod:`scripts.study.figures`
(matplotlib, imported only when figures are drawn).

Metrics are read at the in-domain operating point (Youden's J on the validation split, see
:mod:`scripts.study.operating`) unless a table says otherwise; ROC AUC is threshold-free.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from scripts.study.matrix import DEFAULT_PROJECTION, DEFAULT_VARIANT, VARIANTS, Cell
from scripts.study.power import VarianceComponents, counted, minimum_detectable, power_note, variance_components
from scripts.study.results import ResultsFile, StudyFile
from scripts.study.stats import (
    MIN_PAIRS,
    PairedComparison,
    Summary,
    min_p_value,
    paired_comparison,
    summarise,
    two_level_contrast_ci,
)

__all__ = ["StudyResults", "Report", "write_report", "summary_tables", "write_tables", "METRICS", "CLOSE_MARGIN"]

METRICS = ("accuracy", "sensitivity", "specificity", "f1_macro", "f1_weighted", "roc_auc")
METRIC_TITLES = {
    "accuracy": "accuracy",
    "sensitivity": "PD sensitivity",
    "specificity": "specificity",
    "f1_macro": "macro F1",
    "f1_weighted": "weighted F1",
    "roc_auc": "ROC AUC",
}
PRIMARY = "roc_auc"
"""The metric the claims are judged on (threshold-free); macro F1 at the operating point is shown beside it."""
CLOSE_MARGIN = 0.02
"""A student "comes close" to the teacher when the 95 % interval of (student - teacher) ROC AUC stays above
``-CLOSE_MARGIN``."""
OP = "validation"


def _short(name: str) -> str:
    return name.replace("_", " ")


@dataclass
class StudyResults:
    """The records of a study folder, indexed by cell, with selection helpers."""

    run_dir: Path
    study: dict
    records: dict[str, dict]
    cells: dict[str, Cell] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> StudyResults:
        run_dir = Path(run_dir)
        study = StudyFile(run_dir / "study.json").read()
        if study is None:
            raise SystemExit(f"error: {run_dir} holds no study.json (not a study folder).")
        records = ResultsFile(run_dir / "results.jsonl").read()
        if not records:
            raise SystemExit(f"error: {run_dir / 'results.jsonl'} holds no finished cell yet.")
        cells = {name: Cell.from_dict(r["axes"]) for name, r in records.items()}
        return cls(run_dir, study, records, cells)

    @property
    def datasets(self) -> dict[str, str]:
        return self.study["settings"]["datasets"]

    @property
    def in_domain(self) -> str:
        return next(iter(self.datasets))

    @property
    def externals(self) -> list[str]:
        return [n for n in self.datasets if n != self.in_domain]

    @property
    def n_teachers(self) -> int:
        return int(self.study["settings"]["n_teachers"])

    def test_key(self, name: str | None = None) -> str:
        return f"{name or self.in_domain}/test"

    def select(self, kind: str, **axes) -> dict[int, dict]:
        """``{seed: record}`` of the finished cells of ``kind`` whose axes equal ``axes`` (missing axes take the
        main part's values: fraction 1, template centre, minmax intensity, teacher on the full data, clean labels)."""
        want = {"fraction": 1.0, "intensity": "minmax", "label_noise": 0.0}
        if kind == "student":
            want.update(centre="template")
            if axes.get("kd", True):
                want.update(variant=DEFAULT_VARIANT, teacher_fraction=1.0)
        want.update(axes)
        out = {}
        for name, cell in self.cells.items():
            if cell.kind == kind and all(getattr(cell, k) == v for k, v in want.items()):
                out[cell.seed] = self.records[name]
        return dict(sorted(out.items()))

    def baseline(self, name: str) -> dict | None:
        return self.records.get(f"baseline-{name}")


def value(record: dict, key: str, metric: str, op: str = OP) -> float | None:
    """A metric of a record on ``key`` (``set/split``) at operating point ``op`` (``None`` when absent)."""
    m = record.get("metrics", {}).get(key, {}).get(op)
    return None if m is None else m.get(metric)


def values(group: dict[int, dict], key: str, metric: str, op: str = OP) -> dict[int, float | None]:
    return {s: value(r, key, metric, op) for s, r in group.items()}


def summary_of(group: dict[int, dict], key: str, metric: str, op: str = OP) -> Summary | None:
    return summarise(list(values(group, key, metric, op).values()))


def _scores(record: dict, key: str, op: str) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``(labels, scores, threshold)`` of a record on ``key``, scans in file-name order; ``None`` when unknown."""
    pred = (record.get("predictions") or {}).get(key)
    threshold = (record.get("thresholds") or {}).get(op)
    if not pred or threshold is None or pred.get("labels") is None or pred.get("scores") is None:
        return None
    order = np.argsort(np.asarray(pred["files"], dtype=str), kind="stable")
    labels = np.asarray(pred["labels"], dtype=np.int64)[order]
    return labels, np.asarray(pred["scores"], dtype=np.float64)[order], float(threshold)


@dataclass(frozen=True)
class PoweredComparison(PairedComparison):
    """A :class:`~scripts.study.stats.PairedComparison` with the variance components of its contrast
    (:mod:`scripts.study.power`); its text carries the minimum detectable difference beside the interval."""

    power: VarianceComponents | None = None

    @property
    def mde(self) -> float | None:
        """The minimum difference this comparison detects with 80 % power (two-sided, α = 0.05)."""
        return None if self.power is None else minimum_detectable(self.power)


def _with_power(c: PairedComparison | None) -> str:
    """A claim's measurement: the comparison and, when known, its power (MDE, seeds and scans 0.01 needs)."""
    if c is None:
        return "–"
    power = getattr(c, "power", None)
    return c.format() if power is None else f"{c.format()}; {power_note(power)}"


def _with_contrast_ci(
    c: PairedComparison,
    records: Sequence[Sequence[dict | None]],
    coefficients: Sequence[float],
    key: str,
    metric: str = PRIMARY,
    op: str = OP,
) -> PairedComparison:
    """``c`` with the two-level interval of ``Σ coefficient · metric(record)``, one list of records per seed pair
    of ``c`` (left as it is when a record is missing or lacks its per-scan scores on ``key``)."""
    terms, labels = [], None
    for seed_records in records:
        scored = [_scores(r, key, op) if r is not None else None for r in seed_records]
        if any(x is None for x in scored):
            return c
        labels = scored[0][0] if labels is None else labels
        if any(not np.array_equal(x[0], labels) for x in scored):
            return c
        terms.append([(x[1], x[2], w) for x, w in zip(scored, coefficients)])
    if not terms:
        return c
    vc = variance_components(labels, terms, metric, n_boot=300)
    base = {f.name: getattr(c, f.name) for f in fields(PairedComparison)}
    return PoweredComparison(**{**base, "scan_ci": two_level_contrast_ci(labels, terms, metric)}, power=vc)


def _fmt(s: Summary | None) -> str:
    return "–" if s is None else s.format()


def _fmt_cmp(c: PairedComparison | None) -> str:
    if c is None:
        return "–"
    verdict = f"**{c.verdict}**" if c.decided else c.verdict
    mde = getattr(c, "mde", None)
    bound = "≥ " if mde is not None and c.n < 2 else ""  # one seed pair: the scan term only
    return f"{c.format()} ({verdict}" + (f"; MDE {bound}{mde:.3f})" if mde is not None else ")")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------------
class _Builder:
    """Cell groups and paired comparisons of one study, shared by the report's sections and the figures."""

    def __init__(self, res: StudyResults) -> None:
        self.res = res
        self.teachers = res.select("teacher")
        self.projections = self._projections()
        self.p0 = DEFAULT_PROJECTION if DEFAULT_PROJECTION in self.projections else (self.projections or [None])[0]

    def teacher_pair(self, group: dict[int, dict]) -> dict[int, int]:
        """Student seed -> the seed of the teacher it learned from (``s mod n_teachers``)."""
        return {s: s % self.res.n_teachers for s in group}

    def _projections(self) -> list[str]:
        seen = []
        for cell in self.res.cells.values():
            if cell.kind == "student" and cell.projection not in seen:
                seen.append(cell.projection)
        return sorted(seen, key=lambda p: (p != DEFAULT_PROJECTION, p))

    def kd(self, projection=None, **axes) -> dict[int, dict]:
        return self.res.select("student", projection=projection or self.p0, kd=True, **axes)

    def nokd(self, projection=None, **axes) -> dict[int, dict]:
        return self.res.select("student", projection=projection or self.p0, kd=False, **axes)

    def compare(self, a, b, key, metric=PRIMARY, op=OP, pair=None) -> PairedComparison | None:
        """Paired comparison ``a - b`` over seeds, with the two-level (seeds × test scans) interval when every
        record of the pairs holds its per-scan scores on ``key``."""
        c = paired_comparison(values(a, key, metric, op), values(b, key, metric, op), pair)
        if c is None:
            return None
        return _with_contrast_ci(c, [[a[s], b[t]] for s, t in c.pairs], (1.0, -1.0), key, metric, op)

    def metric_row(self, label: str, group: dict[int, dict], key: str, op: str = OP) -> list[str]:
        n = len(group)
        return [label, str(n)] + [_fmt(summary_of(group, key, m, op)) for m in METRICS]

    # -- main table ----------------------------------------------------------------------------------------------
    def main_rows(self, key: str, op: str = OP) -> list[list[str]]:
        rows = []
        if self.teachers:
            rows.append(self.metric_row("3D teacher", self.teachers, key, op))
        for p in self.projections:
            for kd, group in (("with KD", self.kd(p)), ("without KD", self.nokd(p))):
                if group:
                    rows.append(self.metric_row(f"2D {_short(p)}, {kd}", group, key, op))
        for name, label in (("sbr", "SBR threshold (lowest putamen)"), ("always_pd", "always PD")):
            record = self.res.baseline(name)
            if record is not None:
                rows.append(self.metric_row(label, {0: record}, key, op))
        return rows

    def main_table(self, key: str, op: str = OP) -> str:
        header = ["model", "seeds"] + [METRIC_TITLES[m] for m in METRICS]
        return _table(header, self.main_rows(key, op))

    # -- paired comparisons -----------------------------------------------------------------------------------
    def kd_rows(self, key: str) -> list[list[str]]:
        rows = []
        for p in self.projections:
            a, b = self.kd(p), self.nokd(p)
            if a and b:
                rows.append(
                    [_short(p)] + [_fmt_cmp(self.compare(a, b, key, m)) for m in ("roc_auc", "f1_macro", "accuracy")]
                )
        return rows

    def teacher_rows(self, key: str) -> list[list[str]]:
        rows = []
        if not self.teachers:
            return rows
        for p in self.projections:
            for kd, group in (("with KD", self.kd(p)), ("without KD", self.nokd(p))):
                if group:
                    pair = self.teacher_pair(group)
                    rows.append(
                        [f"{_short(p)}, {kd}"]
                        + [
                            _fmt_cmp(self.compare(group, self.teachers, key, m, pair=pair))
                            for m in ("roc_auc", "f1_macro")
                        ]
                    )
        return rows


@dataclass
class Report:
    """A written report: its Markdown, the short console summary and the figure files."""

    markdown: str
    summary: str
    figures: list[Path]


def _data_table(res: StudyResults) -> str:
    from scripts.data import load_datalist

    rows = []
    for name, path in res.datasets.items():
        splits = ("training", "validation", "test") if name == res.in_domain else ("test",)
        for split in splits:
            try:
                labels = [e["label"] for e in load_datalist(path, split)]
            except Exception:  # noqa: BLE001 - a moved data set still gets its report
                labels = []
            role = "in-domain" if name == res.in_domain else "external"
            rows.append([name, role, split, len(labels), sum(labels), len(labels) - sum(labels)])
    return _table(["data set", "role", "split", "scans", "PD", "HC"], rows)


def _hardware(res: StudyResults) -> tuple[str, float, float]:
    hw = [r.get("hardware", {}) for r in res.records.values()]
    cpus = sorted({h.get("cpu", "?") for h in hw})
    gpus = sorted({h["gpu"] for h in hw if h.get("gpu")})
    threads = sorted({str(h.get("torch_threads")) for h in hw})
    loads = [h["load_average"][0] for h in hw if h.get("load_average")]
    versions = sorted({f"torch {h.get('torch')}, MONAI {h.get('monai')}" for h in hw})
    wall = sum(r["seconds"].get("wall", r["seconds"].get("total", 0.0)) for r in res.records.values())
    cpu = sum(r.get("cpu_seconds", 0.0) for r in res.records.values())
    text = (
        f"{', '.join(cpus)} ({hw[0].get('cpu_count')} logical cores), torch threads {', '.join(threads)}"
        + (f", GPU {', '.join(gpus)}" if gpus else ", no GPU")
        + f"; {'; '.join(versions)}"
        + (f"; 1-min load average at cell start {min(loads):.1f}–{max(loads):.1f}" if loads else "")
    )
    return text, wall, cpu


def _timing_table(res: StudyResults) -> str:
    by_kind: dict[str, list[dict]] = {}
    for name, r in res.records.items():
        by_kind.setdefault(res.cells[name].kind, []).append(r)
    rows = []
    for kind, records in by_kind.items():
        wall = [r["seconds"].get("wall", r["seconds"].get("total", 0.0)) for r in records]
        cpu = [r.get("cpu_seconds", 0.0) for r in records]
        train = [r["seconds"].get("train", 0.0) for r in records]
        rows.append(
            [kind, len(records), f"{sum(wall) / len(wall):.0f}", f"{sum(train) / len(train):.0f}",
             f"{sum(cpu) / len(cpu):.0f}", f"{sum(wall) / 60:.1f}"]
        )  # fmt: skip
    return _table(["cells", "n", "wall s / cell", "training s / cell", "CPU s / cell", "wall min total"], rows)


def _low_data_selection(res: StudyResults) -> str:
    """How the study folder's low-data cells chose their checkpoint, in words (from its recorded cell rules)."""
    metric = res.study["settings"].get("cell_rules", {}).get("low_data_selection_metric", "auc")
    if metric == "auc_ce":
        return "validation ROC AUC with ties broken by the validation cross-entropy (`auc_ce`)"
    return "validation ROC AUC" if metric == "auc" else f"validation `{metric}`"


def _settings_line(res: StudyResults) -> str:
    s = res.study["settings"]
    shared = ", ".join(f"`{k}` {v}" for k, v in s["shared"].items() if k != "progress_bar") or "the configs' defaults"
    return (
        f"Teacher `max_epochs` {s['teacher']['max_epochs']} (patience {s['teacher']['patience']}), student "
        f"`max_epochs` {s['student']['max_epochs']} (patience {s['student']['patience']}); shared overrides: "
        f"{shared}; everything else as in `configs/`."
    )


def _claims(b: _Builder) -> tuple[str, dict]:
    """The paper's five claims, each with its measurement and a verdict."""
    res = b.res
    key = res.test_key()
    rows, verdicts = [], {}

    # (1) KD improves every projection
    comps = {p: b.compare(b.kd(p), b.nokd(p), key) for p in b.projections}
    comps = {p: c for p, c in comps.items() if c is not None}
    if comps:
        up = [p for p, c in comps.items() if c.decided and c.mean > 0]
        down = [p for p, c in comps.items() if c.decided and c.mean < 0]
        verdict = "supported" if len(up) == len(comps) else ("contradicted" if down else "not shown")
        detail = (
            f"KD − no-KD ROC AUC higher for {len(up)} of {len(comps)} projections"
            + (f" ({', '.join(map(_short, up))})" if up else "")
            + (f"; lower for {', '.join(map(_short, down))}" if down else "")
            + f"; within noise or too few seeds for {len(comps) - len(up) - len(down)}"
        )
    else:
        verdict, detail = "not measured", "no KD / no-KD pair"
    rows.append(["(1) KD improves every projection", detail, verdict])
    verdicts[1] = verdict

    # (2) joint fusion + KD comes close to the teacher
    c = b.compare(b.kd("joint_fusion_slices"), b.teachers, key, pair=b.teacher_pair(b.kd("joint_fusion_slices")))
    if c is None:
        verdict, detail = "not measured", "no joint-fusion KD student or no teacher"
    else:
        verdict = _decide(c, lambda c: c.interval[0] > -CLOSE_MARGIN, lambda c: c.interval[1] < -CLOSE_MARGIN)
        detail = f"student − teacher ROC AUC {_with_power(c)}; close = interval above −{CLOSE_MARGIN}"
    rows.append(["(2) joint fusion + KD comes close to the teacher", detail, verdict])
    verdicts[2] = verdict

    # (3) on AV133 the KD student beats the teacher
    av = [n for n in res.externals if "av133" in n.lower()]
    if av and b.teachers and b.kd():
        k = res.test_key(av[0])
        c = b.compare(b.kd(), b.teachers, k, pair=b.teacher_pair(b.kd()))
        s = b.compare(b.kd(), b.teachers, k, "sensitivity", pair=b.teacher_pair(b.kd()))
        if c is None:
            verdict, detail = "not measured", "no paired values"
        else:
            verdict = _decide(c)
            detail = f"on {av[0]}: KD student − teacher ROC AUC {_with_power(c)}" + (
                f"; PD sensitivity at the in-domain threshold {_with_power(s)}" if s is not None else ""
            )
    else:
        verdict, detail = "not measured", "no AV133 set, teacher or KD student"
    rows.append(["(3) on AV133 PET the KD student beats the 3D teacher", detail, verdict])
    verdicts[3] = verdict

    # (4) L_fg matters more than L_lg
    fg, lg = b.kd(variant="fg"), b.kd(variant="lg")
    c = b.compare(fg, lg, key)
    if c is None:
        verdict, detail = "not measured", "no fg-only / lg-only ablation"
    else:
        verdict = _decide(c)
        detail = f"L_fg-only − L_lg-only ROC AUC {_with_power(c)}"
    rows.append(["(4) L_fg matters more than L_lg", detail, verdict])
    verdicts[4] = verdict

    # (5) KD helps most when labelled data are scarce: per low-data projection, the KD gain at the smallest fraction
    # minus the gain at full data when that projection has a full-data pair, else KD − no-KD at the smallest fraction
    fractions = sorted({c.fraction for c in res.cells.values() if c.kind == "student" and c.fraction < 1})
    low_projections = sorted(
        {c.projection for c in res.cells.values() if c.kind == "student" and c.fraction < 1},
        key=lambda p: (p != b.p0, p),
    )
    details, found = [], []
    for p in low_projections:
        f = fractions[0]
        tf = f if b.kd(p, fraction=f, teacher_fraction=f) else 1.0
        teacher = "teacher on the same fraction" if tf == f else "full-data teacher"
        low_kd, low_nokd = b.kd(p, fraction=f, teacher_fraction=tf), b.nokd(p, fraction=f)
        if b.kd(p) and b.nokd(p):
            groups = (low_kd, low_nokd, b.kd(p), b.nokd(p))
            c = paired_comparison(_diffs(groups[0], groups[1], key), _diffs(groups[2], groups[3], key))
            if c is not None:
                records = [[g.get(s) for g in groups] for s, _ in c.pairs]
                c = _with_contrast_ci(c, records, (1.0, -1.0, -1.0, 1.0), key)
            what = f"{_short(p)}: KD gain in ROC AUC at {f:g} of the training subjects ({teacher}) minus gain at 1"
        else:
            c = b.compare(low_kd, low_nokd, key)
            what = f"{_short(p)} at {f:g} of the training subjects ({teacher}): KD − no-KD ROC AUC"
        if c is not None:
            details.append(f"{what} {_with_power(c)}")
            found.append(_decide(c))
    if not low_projections:
        verdict, detail = "not measured", "no low-data sweep"
    else:
        verdict = (
            "supported"
            if found and all(v == "supported" for v in found)
            else ("contradicted" if "contradicted" in found else ("not shown" if found else "not measured"))
        )
        detail = "; ".join(details) or "no KD / no-KD pair at a low-data fraction"
    rows.append(["(5) KD helps most when labelled data are scarce", detail, verdict])
    verdicts[5] = verdict
    header = ["claim", "measured (paired; 95 % CI over seeds × test scans; sign-flip p over seeds)", "verdict"]
    return _table(header, rows), verdicts


def _decide(c: PairedComparison, supports=None, contradicts=None) -> str:
    """``supported`` / ``contradicted`` / ``not shown`` (default: the interval excludes 0 upwards / downwards)."""
    if c.n < MIN_PAIRS:
        return "not shown (too few seeds)"
    supports = supports or (lambda c: c.decided and c.mean > 0)
    contradicts = contradicts or (lambda c: c.decided and c.mean < 0)
    return "supported" if supports(c) else ("contradicted" if contradicts(c) else "not shown")


def _diffs(a: dict[int, dict], b: dict[int, dict], key: str, metric: str = PRIMARY) -> dict[int, float]:
    va, vb = values(a, key, metric), values(b, key, metric)
    return {s: va[s] - vb[s] for s in va if s in vb and va[s] is not None and vb[s] is not None}


def _ablation(b: _Builder, key: str) -> str:
    base = b.nokd()
    rows = []
    if base:
        rows.append(
            [
                "no KD",
                len(base),
                _fmt(summary_of(base, key, "roc_auc")),
                _fmt(summary_of(base, key, "f1_macro")),
                "–",
                "–",
            ]
        )
    for variant in VARIANTS:
        group = b.kd(variant=variant)
        if not group:
            continue
        rows.append(
            [f"KD `{variant}`", len(group), _fmt(summary_of(group, key, "roc_auc")),
             _fmt(summary_of(group, key, "f1_macro")), _fmt_cmp(b.compare(group, base, key)),
             _fmt_cmp(b.compare(group, base, key, "f1_macro"))]
        )  # fmt: skip
    return _table(["loss", "seeds", "ROC AUC", "macro F1", "Δ ROC AUC vs no KD", "Δ macro F1 vs no KD"], rows)


def _low_data(b: _Builder, key: str) -> str:
    """Every low-data / label-noise group: per projection, training fraction and label noise, the teachers, the KD
    students (per teacher) and the no-KD students, with the paired KD − no-KD difference and its power."""
    res = b.res
    students = [c for c in res.cells.values() if c.kind == "student" and (c.fraction < 1 or c.label_noise > 0)]
    arms = sorted({(c.projection, c.fraction, c.label_noise) for c in students}, key=lambda a: (a[0] != b.p0, a))
    rows = []
    for projection, f, noise in arms:
        where = f"{_short(projection)}, {f:g}" + (f", {noise:.0%} labels flipped" if noise else "")
        teacher = res.select("teacher", fraction=f)
        if teacher and not noise:
            rows.append([where, "3D teacher (same fraction)", len(teacher), _fmt(summary_of(teacher, key, "roc_auc")),
                         _fmt(summary_of(teacher, key, "f1_macro")), "–"])  # fmt: skip
        axes = {"fraction": f, "label_noise": noise}
        nokd = b.nokd(projection, **axes)
        for tf in sorted({c.teacher_fraction for c in students if c.kd and (c.projection, c.fraction, c.label_noise)
                          == (projection, f, noise)}):  # fmt: skip
            kd = b.kd(projection, teacher_fraction=tf, **axes)
            if kd:
                label = f"2D with KD (teacher on {tf:g})"
                rows.append([where, label, len(kd), _fmt(summary_of(kd, key, "roc_auc")),
                             _fmt(summary_of(kd, key, "f1_macro")), _fmt_cmp(b.compare(kd, nokd, key))])  # fmt: skip
        if nokd:
            rows.append([where, "2D without KD", len(nokd), _fmt(summary_of(nokd, key, "roc_auc")),
                         _fmt(summary_of(nokd, key, "f1_macro")), "–"])  # fmt: skip
    header = ["projection, training fraction", "model", "seeds", "ROC AUC", "macro F1", "Δ ROC AUC KD − no KD"]
    return _table(header, rows)


def _external(b: _Builder) -> tuple[str, str]:
    res = b.res
    groups = []
    for inten in sorted({c.intensity for c in res.cells.values() if c.kind != "baseline"}):
        t = res.select("teacher", intensity=inten)
        if t:
            groups.append((f"3D teacher ({inten})", t))
        for p in b.projections:
            if inten != "minmax" and p != b.p0:
                continue
            for kd, g in (("KD", b.kd(p, intensity=inten)), ("no KD", b.nokd(p, intensity=inten))):
                if g:
                    groups.append((f"2D {_short(p)}, {kd} ({inten})", g))
    for name, label in (("sbr", "SBR threshold"), ("always_pd", "always PD")):
        if res.baseline(name):
            groups.append((label, {0: res.baseline(name)}))
    sections, fixed_bal, recal_bal = [], [], []
    for ext in res.externals:
        k_in, k_ext = res.test_key(), res.test_key(ext)
        rows = []
        for label, g in groups:
            prevalence = next(iter(g.values()))["metrics"].get(k_ext, {}).get("assumed_prevalence")
            row = [label, _fmt(summary_of(g, k_in, "roc_auc")), _fmt(summary_of(g, k_ext, "roc_auc"))]
            for op in ("validation", "recalibrated"):
                row += [_fmt(summary_of(g, k_ext, "sensitivity", op)), _fmt(summary_of(g, k_ext, "specificity", op))]
            rows.append(row)
            if not label.startswith("always"):
                for r in g.values():
                    for op, sink in (("validation", fixed_bal), ("recalibrated", recal_bal)):
                        se, sp = value(r, k_ext, "sensitivity", op), value(r, k_ext, "specificity", op)
                        if se is not None and sp is not None:
                            sink.append((se + sp) / 2)
        header = ["model", f"ROC AUC {res.in_domain}", f"ROC AUC {ext}", "sensitivity (in-domain threshold)",
                  "specificity (in-domain threshold)", "sensitivity (recalibrated)",
                  "specificity (recalibrated)"]  # fmt: skip
        note = f"assumed PD prevalence {prevalence:.2f}" if prevalence is not None else ""
        sections.append(f"**{ext}** ({note}):\n\n" + _table(header, rows))
    others = sorted({c.intensity for c in res.cells.values() if c.kind != "baseline"} - {"minmax"})
    if others:
        rows = []
        sets = [res.in_domain, *res.externals]
        getters = {
            "3D teacher": lambda i: res.select("teacher", intensity=i),
            f"2D KD ({_short(b.p0)})": lambda i: b.kd(intensity=i),
            f"2D no KD ({_short(b.p0)})": lambda i: b.nokd(intensity=i),
        }
        for inten in others:
            for label, get in getters.items():
                a, m = get(inten), get("minmax")
                if a and m:
                    cmps = [_fmt_cmp(b.compare(a, m, res.test_key(n))) for n in sets]
                    rows.append([label, f"{inten} − minmax", *cmps])
        if rows:
            sections.append(
                "**Intensity normalisation** (paired by seed, Δ ROC AUC):\n\n"
                + _table(["model", "difference", *[f"{n} test" for n in sets]], rows)
            )
    recommendation = ""
    if fixed_bal and recal_bal:
        f, r = sum(fixed_bal) / len(fixed_bal), sum(recal_bal) / len(recal_bal)
        better = "recalibrated" if r > f + 0.01 else ("in-domain" if f > r + 0.01 else None)
        recommendation = (
            f"Mean balanced accuracy ((sensitivity + specificity) / 2) over every model and external set: "
            f"{f:.3f} at the fixed in-domain threshold, {r:.3f} at the label-free recalibrated threshold. "
            + (
                f"On these sets the **{better} threshold** transfers better. "
                if better
                else "The two are within 0.01 of each other on these sets. "
            )
        )
    return "\n\n".join(sections), recommendation


def _centres(b: _Builder, key: str) -> str:
    res = b.res
    record = res.baseline("centres")
    lines = []
    if record is not None:
        from scripts.metrics import classification_report

        rows = []
        for set_key, c in record["centres"].items():
            if set_key.endswith("/validation"):
                continue
            labels = c["labels"]
            for view in ("axial", "coronal", "sagittal"):
                auto = c["auto"][view]
                template = sorted(set(c["template"][view]))
                auc = None
                if 0 < sum(labels) < len(labels) and len(set(auto)) > 1:
                    a = classification_report(labels, auto)["roc_auc"]
                    auc = max(a, 1 - a)
                rows.append([set_key, view, ", ".join(map(str, template)), f"{min(auto)}–{max(auto)}",
                             "–" if auc is None else f"{auc:.2f}"])  # fmt: skip
        lines.append(
            "Centre slice per view (template: the template striatum's centre on the working grid; auto: the "
            "uptake-weighted centre of each scan's hottest voxels). *Class AUC* is how well the auto index alone "
            "separates PD from HC (max(AUC, 1 − AUC); 0.5 = no information): a value well above 0.5 means the "
            "anatomy an `auto` student sees depends on the class.\n\n"
            + _table(["scans", "view", "template centre", "auto centres (range)", "class AUC of the auto index"], rows)
        )
    rows = []
    for centre in ("template", "auto"):
        for kd, group in (("KD", b.kd(centre=centre)), ("no KD", b.nokd(centre=centre))):
            if group:
                rows.append(
                    [
                        centre,
                        kd,
                        len(group),
                        _fmt(summary_of(group, key, "roc_auc")),
                        _fmt(summary_of(group, key, "f1_macro")),
                    ]
                )
    if any(r[0] == "auto" for r in rows):
        lines.append(_table(["slice_centre", "student", "seeds", "ROC AUC", "macro F1"], rows))
        comps = [
            [kd, _fmt_cmp(b.compare(g(centre="template"), g(centre="auto"), key))]
            for kd, g in (("KD", b.kd), ("no KD", b.nokd))
        ]
        lines.append(_table(["student", "Δ ROC AUC template − auto (paired)"], comps))
    return "\n\n".join(lines)


def _recipe(command: str) -> str:
    """``command`` without ``--max-cells N``: a run stopped after N cells and resumed is one recipe."""
    return re.sub(r"\s--max-cells(?:=|\s+)\S+", "", command)


DEFAULT_TITLE = "Results: what 3D-to-2D distillation does"


def write_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    figures_dir: str | os.PathLike,
    figures: bool = True,
    preface: str | None = None,
    title: str | None = None,
) -> Report:
    """Write the Markdown report of ``run_dir`` to ``out`` and its figures to ``figures_dir``; ``preface``
    (Markdown, e.g. what a reduced run left out) goes right after the ``title``."""
    res = StudyResults.load(run_dir)
    out, figures_dir = Path(out), Path(figures_dir)
    b = _Builder(res)
    key = res.test_key()
    n_seeds = max((len(g) for g in [b.kd(p) for p in b.projections] + [b.teachers]), default=0)
    min_p = min_p_value(max(n_seeds, 1))
    figure_files: list[Path] = []
    if figures:
        from scripts.study.figures import draw_figures

        figure_files = draw_figures(res, b, figures_dir)

    def fig(name: str, caption: str) -> str:
        path = figures_dir / name
        if path not in figure_files:
            return ""
        return f"\n\n![{caption}]({os.path.relpath(path, out.parent)})"

    hardware, wall, cpu = _hardware(res)
    commands = list(dict.fromkeys(_recipe(i["command"]) for i in res.study.get("invocations", [])))  # resumes repeat
    claims, _ = _claims(b)
    main = b.main_table(key)
    kd_rows, teacher_rows = b.kd_rows(key), b.teacher_rows(key)
    external, recommendation = _external(b)
    parts = [
        f"# {title or DEFAULT_TITLE}",
        preface or "",
        f"Generated by `python -m scripts.study report` from `results.jsonl` of the study folder "
        f"(`{res.run_dir.name}`, {len(res.records)} finished cells); do not edit by hand. Reproduce with "
        + ("the command" if len(commands) < 2 else "these commands, in order (each adds cells to the folder)")
        + ":\n\n"
        + "\n".join(f"    {c}" for c in commands),
        f"**Hardware**: {hardware}. **Run time**: {wall / 3600:.2f} h wall, {cpu / 3600:.2f} h CPU over all cells.",
        "## Data\n\n" + _data_table(res) + "\n\n" + _settings_line(res),
        "## How to read it\n\n"
        "* Every network is trained by the bundle's own configs (`configs/train_teacher.json`, `configs/distill.json`) "
        "and scored by `configs/evaluate.json` on its own best checkpoint (by validation macro F1; below 100 % of "
        f"the training subjects by {_low_data_selection(res)}, "
        "after about as many optimiser steps as at full data).\n"
        "* Metrics on the in-domain test split at the in-domain operating point: the threshold on P(PD) that "
        "maximises Youden's J on the validation split (never tuned on test). ROC AUC is threshold-free.\n"
        f"* Mean ± sample std over seeds. KD and no-KD students of one seed share initial weights and data order; a "
        f"KD student of seed s learns from teacher s mod {res.n_teachers}, and student–teacher comparisons pair "
        "them so.\n"
        "* A paired difference is given as mean [95 % CI], p. The interval is a two-level paired bootstrap: each "
        "resample draws the seed pairs with replacement *and* the test scans with replacement (within each class, the "
        "same scans for both models) and recomputes the metric from the per-scan scores, so it covers both training "
        "noise and the finite test split; a difference is *within noise* when the interval contains 0. p is the "
        f"exact sign-flip test over seeds: with {counted(n_seeds, 'seed')} the smallest attainable p is "
        f"{min_p:.3g} (all seeds agree in sign)"
        + (
            ", so p < 0.05 is out of reach by construction and the verdict rests on the interval"
            if min_p >= 0.05
            else ""
        )
        + f". With fewer than {MIN_PAIRS} seed pairs no verdict is given.",
        "## The paper's claims\n\n" + claims,
        "## In-domain test: every model\n\n" + main,
        "## Distillation vs none (paired: same seeds, same test scans)\n\n"
        + (_table(["projection", "Δ ROC AUC", "Δ macro F1", "Δ accuracy"], kd_rows) if kd_rows else "No pairs.")
        + fig("kd_vs_nokd.png", "KD vs no-KD per projection")
        + "\n\n### Student − teacher (paired by teacher seed)\n\n"
        + (_table(["student", "Δ ROC AUC", "Δ macro F1"], teacher_rows) if teacher_rows else "No teacher.")
        + fig("roc.png", "ROC curves"),
    ]
    if any(b.kd(variant=v) for v in VARIANTS if v != DEFAULT_VARIANT):
        parts.append(
            f"## Loss ablation ({_short(b.p0)})\n\n"
            "`fg+lg` is the default loss (CE + 5 L_fg + 5 L_lg); `fg+lg+decor` adds the reference's decorrelation "
            "term M; `hinton` is soft-target KD without graph terms.\n\n"
            + _ablation(b, key)
            + fig("ablation.png", "ablation")
        )
    if any(c.fraction < 1 or c.label_noise > 0 for c in res.cells.values()):
        from scripts.study.matrix import VALIDATION_FLOOR

        parts.append(
            "## Low-data sweep and label noise\n\n"
            "Each fraction keeps that share of the training subjects (the same subset for every model of the "
            "fraction) and the same share of the validation subjects, but never fewer than "
            f"{VALIDATION_FLOOR} validation subjects (model selection needs a few controls). The teacher column says "
            "which teacher a KD student learned from: a teacher trained on the same fraction gives the KD student no "
            "label the no-KD student lacks; the full-data teacher (1) is a large centre teaching a small one. "
            "Label-noise rows flip that share of the students' training labels (the teacher keeps clean labels). "
            "MDE: the smallest KD − no-KD difference this many seeds and test scans detect with 80 % power "
            "(`scripts/study/power.py`).\n\n" + _low_data(b, key) + fig("low_data.png", "low-data curves")
        )
        for ext in res.externals:  # the same models applied unchanged to each external set
            parts.append(
                f"**On {ext}** (test split; every model applied unchanged):\n\n" + _low_data(b, res.test_key(ext))
            )
    if res.externals:
        parts.append(
            "## External and shifted test sets\n\n"
            "Every model is applied unchanged. *In-domain threshold*: the validation operating point above. "
            "*Recalibrated*: label-free, the threshold that calls the assumed PD prevalence of the new site PD "
            "(the top share of its own scores; by default the PD share of the development data; set it per site with "
            "`--prevalence NAME=P`).\n\n"
            + external
            + "\n\n**Operating point for a new site.** "
            + recommendation
            + "The recalibrated threshold needs no labels from the new site, only its scans and an honest estimate of "
            "its PD share; a wrong estimate moves sensitivity and specificity one for one. When that share is "
            "unknown, keep the in-domain threshold and check a few labelled scans; the ROC AUC column shows whether "
            "the ranking itself survived the shift (no threshold can repair a lost ranking)."
            + fig("external.png", "in-domain vs external")
        )
    from scripts.study.adaptation import section_for_study

    parts.append(section_for_study(res))  # label-free site adaptation on the external sets (empty without them)
    centres = _centres(b, key)
    if centres:
        parts.append("## Slice centre: template vs auto\n\n" + centres + fig("centres.png", "auto centres by class"))
    parts.append(
        "## Operating points on the in-domain test split\n\n"
        "The bundle's own decision (argmax, P(PD) ≥ 0.5; the SBR baseline's training-split threshold) for comparison "
        "with the validation operating point used above.\n\n" + b.main_table(key, "default")
    )
    gallery = fig("gallery.png", "gallery")
    if gallery:
        parts.append("## Gallery\n\nOne HC and one PD test scan under every projection." + gallery)
    parts.append(
        "## Summary tables\n\nThe README's and the model card's results tables, generated from the same results file "
        "(`python -m scripts.study report RUN_DIR --tables README.md docs/README.md`).\n\n" + summary_tables(res)
    )
    parts.append("## Run time per cell\n\n" + _timing_table(res))
    markdown = "\n\n".join(p for p in parts if p) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    summary = "In-domain test (" + key + ", validation operating point):\n\n" + main
    if kd_rows:
        summary += "\n\nKD − no-KD, paired over seeds:\n\n" + _table(
            ["projection", "Δ ROC AUC", "Δ macro F1", "Δ accuracy"], kd_rows
        )
    return Report(markdown, summary, figure_files)


# ----------------------------------------------------------------------------------------------------------------
# the README's and the model card's tables
# ----------------------------------------------------------------------------------------------------------------
TABLE_START = "<!-- results-tables:start (generated by python -m scripts.study.report; do not edit) -->"
TABLE_END = "<!-- results-tables:end -->"


def _student_groups(res: StudyResults) -> list[tuple]:
    """``(projection, fraction, teacher fraction, label noise)`` of every group of default-loss, template-centre,
    min-max students, the full-data groups first."""
    keys = {
        (c.projection, c.fraction, c.teacher_fraction, c.label_noise)
        for c in res.cells.values()
        if c.kind == "student" and c.variant in (DEFAULT_VARIANT, "none") and c.centre == "template"
        and c.intensity == "minmax"
    }  # fmt: skip
    return sorted(keys, key=lambda k: (-k[1], k[3], k[0], k[2] is not None, -(k[2] or 0.0)))


def summary_tables(res: StudyResults) -> str:
    """The results tables the README and the model card show: every model group's in-domain test metrics (and ROC
    AUC on each external set), and every KD − no-KD pair with its interval and minimum detectable effect."""
    b = _Builder(res)
    key = res.test_key()
    ext_keys = [res.test_key(n) for n in res.externals]
    header = ["model", "training subjects", "seeds", "accuracy", "macro-F1", "ROC AUC"] + [
        f"ROC AUC {n}" for n in res.externals
    ]

    def row(label: str, share: str, group: dict[int, dict]) -> list[str]:
        cells = [label, share, str(len(group))]
        cells += [_fmt(summary_of(group, key, m)) for m in ("accuracy", "f1_macro", "roc_auc")]
        return cells + [_fmt(summary_of(group, k, "roc_auc")) for k in ext_keys]

    def share(f: float, noise: float = 0.0) -> str:
        text = "100 %" if f >= 1 else f"{100 * f:.1f} %"
        return text + (f", {100 * noise:g} % labels flipped" if noise else "")

    rows = []
    for f in sorted({c.fraction for c in res.cells.values() if c.kind == "teacher"}, reverse=True):
        group = res.select("teacher", fraction=f)
        if group:
            rows.append(row("3D teacher", share(f), group))
    pairs = []
    for projection, f, tf, noise in _student_groups(res):
        axes = {"fraction": f, "label_noise": noise}
        if tf is None:
            group = b.nokd(projection, **axes)
            label = f"2D {_short(projection)}, without KD"
        else:
            group = b.kd(projection, teacher_fraction=tf, **axes)
            label = f"2D {_short(projection)}, with KD (teacher on {share(tf)})"
            nokd = b.nokd(projection, **axes)
            if group and nokd:
                pairs.append(
                    [f"{_short(projection)}, {share(f, noise)}, teacher on {share(tf)}"]
                    + [_fmt_cmp(b.compare(group, nokd, key, m)) for m in ("roc_auc", "f1_macro")]
                )
        if group:
            rows.append(row(label, share(f, noise), group))
    for name, label in (("sbr", "SBR threshold (lowest putamen)"), ("always_pd", "always PD")):
        record = res.baseline(name)
        if record is not None:
            rows.append(row(label, "100 %" if name == "sbr" else "–", {0: record}))
    text = (
        f"In-domain test split ({key}) at the operating point chosen on the validation split; ROC AUC is "
        "threshold-free. Mean ± SD over seeds.\n\n" + _table(header, rows)
    )
    if pairs:
        text += (
            "\n\nDistillation minus no distillation, paired (same seed, same initial weights and data order, same "
            "test scans); 95 % interval over seeds and test scans, sign-flip p over seeds; MDE: the smallest "
            "difference detected with 80 % power.\n\n"
            + _table(["students (projection, training subjects, teacher)", "Δ ROC AUC", "Δ macro-F1"], pairs)
        )
    return text


def check_table_files(paths: Sequence[str | os.PathLike]) -> dict[Path, tuple[str, str]]:
    """``{path: (text up to the table block's start marker, text from its end marker)}`` of every file in ``paths``,
    read before anything is written.

    Raises:
        SystemExit: naming a file without the two markers.
    """
    parts = {}
    for path in map(Path, paths):
        text = path.read_text() if path.is_file() else ""
        start, end = text.find(TABLE_START), text.find(TABLE_END)
        if start < 0 or end < start:
            raise SystemExit(f"error: {path} has no '{TABLE_START}' ... '{TABLE_END}' block to fill.")
        parts[path] = (text[: start + len(TABLE_START)], text[end:])
    return parts


def write_tables(res: StudyResults, paths: Sequence[str | os.PathLike]) -> str:
    """Replace the block between :data:`TABLE_START` and :data:`TABLE_END` of every file in ``paths`` with
    :func:`summary_tables`; returns the tables.

    Raises:
        SystemExit: naming a file without the two markers (nothing is written then).
    """
    tables = summary_tables(res)
    for path, (head, tail) in check_table_files(paths).items():
        path.write_text(head + "\n" + tables + "\n" + tail)
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.study.report ...``: the same as ``python -m scripts.study report ...`` (see its
    ``--help``)."""
    import sys

    from scripts.study.runner import main as study_main

    return study_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
