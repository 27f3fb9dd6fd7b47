# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""``python -m scripts.study add-external RUN_DIR --external NAME=DIR ...``: score a finished study on external
sets it did not have.

A study's data sets are part of its settings (``study.json``), so ``run`` refuses a folder made with other ones:
new cells would not be comparable. An external set is different: every cell applies its finished best checkpoint
to it unchanged, nothing is trained, and the in-domain results stay as they were. This command scores every
finished cell on each set's ``test`` split with the cell's own checkpoint and config overrides
(:func:`scripts.study.cells.score_added_sets`: the same ``configs/evaluate.json`` run a cell does at the end of its
training; the SBR baseline with the threshold it fitted on the training split), appending each updated record to
``results.jsonl``, and lists the sets in ``study.json`` (this command among its ``invocations``) once every cell
has been through. Interrupted, or stopped by a scan that cannot be read, it goes on where it stopped when run again
(a cell that has the set is skipped); ``report`` then writes the report with the sets.

To resume the study itself afterwards (more seeds, say), give ``run`` the same ``--external`` options, as if
the sets had been there from the start.
"""

from __future__ import annotations

import argparse
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path

from scripts.data import load_datalist
from scripts.errors import InputError
from scripts.study.cells import cell_dir, score_added_sets, unscored_sets
from scripts.study.matrix import Cell
from scripts.study.results import ResultsFile, StudyFile

__all__ = ["cmd_add_external"]


def _with_sets(study: StudyFile, externals: dict[str, str], prevalence: dict[str, str], argv: list[str]) -> dict:
    """The content of ``study`` with ``externals`` (``{name: datalist}``), their assumed prevalences and this
    command's invocation added (not written); exits when a set clashes with the study's own."""
    content = study.read()
    settings = content["settings"]
    datasets, known = settings["datasets"], settings.setdefault("prevalence", {})
    in_domain = next(iter(datasets))
    for name, path in externals.items():
        if name == in_domain:
            raise SystemExit(f"error: --external {name}=...: {name} is the study's in-domain set.")
        if name in datasets and datasets[name] != path:
            raise SystemExit(f"error: --external {name}=...: the study already has {name} at {datasets[name]}.")
    for name, value in prevalence.items():
        if name not in externals:
            raise SystemExit(f"error: --prevalence {name}=...: only the sets added here can be given one.")
        if name in known and float(known[name]) != float(value):
            raise SystemExit(f"error: --prevalence {name}={value}: the study assumes {known[name]} for {name}.")
    settings["datasets"] = {**datasets, **externals}
    known.update({name: float(value) for name, value in prevalence.items()})
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "scripts.study", *argv])
    content.setdefault("invocations", []).append({"command": command, "started": started})
    return content


def cmd_add_external(args: argparse.Namespace) -> int:
    """Register ``args.external`` in the study of ``args.run_dir`` and score every finished cell on them."""
    from scripts.study.runner import context_from_study, datalist_path, exclusive

    run_dir = Path(args.run_dir)
    ctx = context_from_study(run_dir)  # exits when the folder holds no study
    externals = {name: datalist_path(path, "--external") for name, path in args.external.items()}
    for name, path in externals.items():  # every entry checked before the study is touched
        try:
            if not load_datalist(path, "test"):
                raise InputError(f"datalist file {path} has an empty 'test' list: nothing to score.")
        except InputError as e:
            raise SystemExit(f"error: --external {name}: {e}") from None
    with exclusive(run_dir):
        study = StudyFile(run_dir / "study.json")
        content, names = _with_sets(study, externals, args.prevalence, args.argv), list(externals)
        ctx.datasets, ctx.prevalence = content["settings"]["datasets"], content["settings"]["prevalence"]
        results = ResultsFile(run_dir / "results.jsonl")
        records = results.read()
        todo = [r for r in records.values() if unscored_sets(r, names)]
        print(f"{len(records)} finished cells; {len(todo)} to score on {', '.join(names)}.", flush=True)
        failed = []
        start = time.perf_counter()
        for i, record in enumerate(todo, 1):
            missing = unscored_sets(record, names)
            try:
                results.append(score_added_sets(ctx, record, missing))
            except RuntimeError as e:  # this cell's checkpoint is gone: the others can still be scored
                failed.append(str(e))
                print(f"[{i}/{len(todo)}] not scored: {e}", flush=True)
                continue
            except Exception as e:  # a scan the set's datalist names cannot be scored: every cell would fail
                log = cell_dir(run_dir, Cell.from_dict(record["axes"])) / "log.txt"
                raise SystemExit(
                    f"error: scoring {record['cell']} on {', '.join(missing)}: {e} (traceback in {log}). The {i - 1} "
                    "cell(s) scored before keep their scores (the study lists the set once every cell has it); "
                    "correct the set and run the same command to go on."
                ) from None
            print(f"[{i}/{len(todo)}] {record['cell']}: {', '.join(missing)} ({time.perf_counter() - start:.0f} s)")
        study.write(content)  # the report shows the sets from now on
    if failed:
        print(f"error: {len(failed)} cell(s) could not be scored; their records keep the sets they had.")
        return 1
    print(f"Done. Write the report with: python -m scripts.study report {shlex.quote(str(run_dir))}")
    return 0
