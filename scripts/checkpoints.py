# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Self-describing checkpoints, run folders and resumable training state.

Self-describing checkpoints
    Every model file the bundle writes (``eval/<run>/<name>.pt``, ``models/*.pt``) is a flat state dict, as MONAI's
    tooling expects (``ckpt_export``, ``verify_net_in_out``, ``monai.bundle.load``, MONAI Label, ``CheckpointLoader``),
    loadable with ``torch.load(..., weights_only=True)``. What it takes to serve it rides in the state dict's own
    ``_metadata`` attribute (which ``torch.save`` keeps, ``weights_only`` loading restores and ``load_state_dict``
    ignores) under the key :data:`METADATA_KEY`::

        {"bundle": ..., "bundle_version": "0.1.0", "kind": "student",
         "network": {"_target_": "scripts.networks.Student2D", "backbone": "resnet18", ...},
         "settings": {"spatial_size": [64, 64, 64], "intensity": "minmax", "projection": ..., ...},
         "class_names": ["HC", "PD"],
         "validation": {"metric": "val_f1_macro", "score": 0.91, "epoch": 7, "split": "<sha1>", "scans": 40}}

    ``settings`` are config ids; :func:`check_checkpoint` (an ``initialize`` step) compares them with the config
    about to use the checkpoint and, for inference, takes them from the checkpoint.

Run folders
    :func:`claim_run_folder` refuses to reuse a run folder (``eval/<run_name>``) unless the run is resumed.

Resumable training
    :class:`TrainingState` writes model, optimiser, scheduler, trainer and early-stopping state atomically after
    every epoch and, with ``resume``, restores the latest at the start of training. :class:`BestCheckpointSaver`
    is MONAI's ``CheckpointSaver`` writing atomically and continuing from the best checkpoint of a resumed run.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import pickle
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from scripts.errors import InputError, MissingFileError, set_interrupt_message
from scripts.options import OptionError, calling_parser
from torch import nn

__all__ = [
    "METADATA_KEY",
    "CLASS_NAMES",
    "bundle_version",
    "describe_network",
    "checkpoint_metadata",
    "read_checkpoint",
    "save_checkpoint",
    "split_digest",
    "DescribedModel",
    "datalist_of",
    "check_checkpoint",
    "check_teacher",
    "random_transforms_seen_by",
    "claim_run_folder",
    "latest_state",
    "HOLD_ENV",
    "TrainingState",
    "BestCheckpointSaver",
    "unwrap",
]

logger = logging.getLogger(__name__)

METADATA_KEY = "__bundle__"
"""Key of the bundle's description in a state dict's ``_metadata`` (never the name of a sub-module)."""

CLASS_NAMES = ("HC", "PD")
"""Class names by label (0 = healthy control, 1 = Parkinson's disease)."""

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TRAIN_COMMANDS = {
    "teacher": "python -m monai.bundle run training --config_file configs/train_teacher.json",
    "student": "python -m monai.bundle run training --config_file configs/distill.json",
}
STATE_DIR = "resume"
"""Sub-folder of a run folder holding the per-epoch training state."""


def _bundle_metadata() -> dict[str, Any]:
    try:
        return dict(json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return {}


def bundle_version() -> str:
    """The bundle's version (``configs/metadata.json``)."""
    return str(_bundle_metadata().get("version", "unknown"))


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if isinstance(getattr(network, "module", None), nn.Module):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):
            network = network._orig_mod
        else:
            return network


def _plain(value: Any) -> Any:
    """``value`` as JSON-like Python (tuples -> lists), for metadata and comparisons."""
    return json.loads(json.dumps(value, default=str))


def describe_network(network: nn.Module) -> dict[str, Any]:
    """The network's definition: ``_target_`` and the constructor arguments it keeps as attributes.

    For the bundle's networks this rebuilds the same architecture, e.g. ``{"_target_": "scripts.networks.Student2D",
    "backbone": "resnet18", "projection": "joint_fusion_slices", "in_channels": 3, "fusion": "joint",
    "num_classes": 2}``.
    """
    network = unwrap(network)
    cls = type(network)
    out: dict[str, Any] = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
    for name in inspect.signature(cls.__init__).parameters:
        value = getattr(network, name, None)
        if name != "self" and isinstance(value, (bool, int, float, str, list, tuple)):
            out[name] = _plain(value)
    if "num_classes" not in out and isinstance(getattr(network, "head", None), nn.Linear):
        out["num_classes"] = int(network.head.out_features)
    return out


def split_digest(entries: Sequence[Mapping]) -> str:
    """A fingerprint of a datalist split (its images and labels, in any order): equal digests, same split."""
    rows = sorted(f"{os.path.realpath(str(e.get('image')))}\t{e.get('label')}" for e in entries)
    return hashlib.sha1("\n".join(rows).encode()).hexdigest()


def checkpoint_metadata(state: Mapping) -> dict[str, Any] | None:
    """The bundle's description of a loaded state dict (``None`` for a checkpoint written without one)."""
    meta = getattr(state, "_metadata", None)
    info = meta.get(METADATA_KEY) if isinstance(meta, Mapping) else None
    return dict(info) if isinstance(info, Mapping) else None


def read_checkpoint(path: str | os.PathLike, role: str = "model") -> tuple[dict, dict[str, Any] | None]:
    """``(state_dict, description)`` of a checkpoint file, loaded with ``weights_only=True`` on the CPU.

    A training-state file (``{"model": ..., "optimizer": ...}``) gives its model entry.

    Raises:
        MissingFileError: the file does not exist (the message gives the command that trains it).
        InputError: the file is not a readable PyTorch state dict.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{role} checkpoint {path} is a folder; give the checkpoint file (e.g. {path}/model.pt).")
    if not path.is_file():
        kind = "teacher" if "teacher" in path.name else "student"
        raise MissingFileError(f"{role} checkpoint {path} not found. Train it first: {TRAIN_COMMANDS[kind]}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported with its name
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if isinstance(e, pickle.UnpicklingError):  # torch's advice on weights_only is not for this case
            reason = "not a file torch.save wrote, or holds objects other than tensors"
        raise InputError(
            f"{role} checkpoint {path} could not be read ({type(e).__name__}: {reason}); the file is damaged or not "
            "a PyTorch checkpoint. Restore it (models/previous/ keeps the last replaced one) or retrain."
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{role} checkpoint {path} is not a state dict of network weights.")
    return state, checkpoint_metadata(state)


def save_checkpoint(
    network: nn.Module, path: str | os.PathLike, settings: Mapping[str, Any], kind: str = "student", **extra: Any
) -> Path:
    """Write ``network``'s weights with their description (atomically); for scripts and tests."""
    model = DescribedModel(network, settings, kind=kind, **extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def datalist_of(loader: Any) -> list[Mapping] | None:
    """The datalist (``[{"image": ..., "label": ...}, ...]``) a data loader reads, whatever the data path: a MONAI
    ``Dataset``/``CacheDataset`` (``.data``), one wrapped by another dataset (``.dataset``), or the bundle's
    :class:`scripts.fast_data.CacheBatchLoader` whose stacked cache keeps the dataset it was filled from
    (``.source``). ``None`` when none is found."""
    seen: set[int] = set()
    pending = [loader]
    while pending:
        obj = pending.pop(0)
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        data = getattr(obj, "data", None)
        if isinstance(data, Sequence) and data and all(isinstance(e, Mapping) and "image" in e for e in data):
            return list(data)
        pending += [getattr(obj, name, None) for name in ("source", "dataset", "data_source")]
    return None


class DescribedModel:
    """The network as its checkpoints are saved: its state dict carries what serving it takes.

    Give it to ``CheckpointSaver`` (``save_dict={"model": ...}``) in place of the network: its ``state_dict()`` is
    the network's flat state dict with the description (see the module docstring) in ``_metadata``. Attached to the
    validator (listed in its handlers) it also records the validation score the checkpoint was selected with.
    ``load_state_dict`` refuses a state dict whose recorded settings differ from this model's (a resumed run cannot
    continue with another projection or grid).

    Args:
        network: the network (``DistributedDataParallel`` and ``torch.compile`` wrappers are looked through).
        settings: the config settings that serving the network needs, by config id (``spatial_size``,
            ``intensity``, ``projection``, ``view``, ``slice_centre``, ``num_slices``, ``gap``, backbone...).
        kind: ``"student"`` or ``"teacher"``.
        training: free-form facts about the run (``kd_enabled``, seeds...), recorded as they are.
    """

    def __init__(
        self, network: nn.Module, settings: Mapping[str, Any], kind: str = "student", training: Mapping | None = None
    ) -> None:
        self.network = network
        self.settings = _plain(dict(settings))
        self.kind = kind
        self.training = _plain(dict(training or {}))
        self.validator: Engine | None = None
        self._split: tuple[str, int] | None = None
        self._scores: list[float] = []
        self._labels: list[int] = []

    def attach(self, engine: Engine) -> None:
        """Record the validation split of ``engine`` (the validator), its per-scan PD scores and labels (the
        label-free site adaptation calibrates on them, see :mod:`scripts.site_adaptation`) and read its score when
        saving."""
        self.validator = engine
        data = datalist_of(getattr(engine, "data_loader", None))
        if data:
            self._split = (split_digest(data), len(data))
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: (self._scores.clear(), self._labels.clear()))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)

    def _collect(self, engine: Engine) -> None:
        """Keep P(PD) (channel 1 of ``pred``, the softmax) and the label of every validation scan."""
        from monai.handlers import from_engine

        try:
            preds, labels = from_engine(["pred", "label"])(engine.state.output)
            preds = torch.stack([torch.as_tensor(p) for p in preds]) if isinstance(preds, list) else preds
            labels = torch.stack([torch.as_tensor(y) for y in labels]) if isinstance(labels, list) else labels
            preds = torch.as_tensor(preds).detach().float().reshape(len(preds), -1)
            self._scores += preds[:, -1].cpu().tolist()
            self._labels += torch.as_tensor(labels).detach().reshape(-1).long().cpu().tolist()
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError):
            return

    def description(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "bundle": str(_bundle_metadata().get("name", "")),
            "bundle_version": bundle_version(),
            "kind": self.kind,
            "network": describe_network(self.network),
            "settings": self.settings,
            "class_names": list(CLASS_NAMES),
            "training": self.training,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        state = getattr(self.validator, "state", None)
        metric = getattr(state, "key_metric_name", None)
        metrics = getattr(state, "metrics", None) or {}
        if metric in metrics:
            info["validation"] = {
                "metric": str(metric),
                "score": float(metrics[metric]),
                "epoch": int(state.epoch),
                "split": self._split[0] if self._split else None,
                "scans": self._split[1] if self._split else None,
            }
            if self._scores and len(self._scores) == len(self._labels):
                info["validation"]["pd_scores"] = [round(x, 6) for x in self._scores]
                info["validation"]["labels"] = list(self._labels)
        return info

    def state_dict(self) -> dict:
        state = unwrap(self.network).state_dict()
        state._metadata[METADATA_KEY] = self.description()
        return state

    def load_state_dict(self, state_dict: Mapping, strict: bool = True) -> Any:
        recorded = checkpoint_metadata(state_dict)
        if recorded is not None:
            differ = _differences(recorded.get("settings", {}), self.settings)
            if differ:
                raise InputError(f"the checkpoint was saved with {differ[0][0]}, this run has {differ[0][1]}.")
        return unwrap(self.network).load_state_dict(state_dict, strict=strict)


def _differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[("projection='a'", "projection='b'"), ...]`` for the settings both define with different values."""
    out = []
    for key, value in recorded.items():
        if key in current and _plain(current[key]) != _plain(value):
            out.append((f"{key}={_plain(value)!r}", f"{key}={_plain(current[key])!r}"))
    return out


# --------------------------------------------------------------------------------------------------------------------
# checking a checkpoint against the config that uses it
# --------------------------------------------------------------------------------------------------------------------
def _config_defaults() -> dict[str, Any]:
    """The shared settings as ``configs/inference.json`` defines them (the values a user did not change)."""
    try:
        return json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _config_target(config: Mapping[str, Any], net_id: str) -> str | None:
    """The ``_target_`` of the network definition ``net_id``, following ``@id`` references."""
    value, seen = config.get(net_id), set()
    while isinstance(value, str) and value.startswith("@") and value not in seen:
        seen.add(value)
        value = config.get(value[1:])
    return value.get("_target_") if isinstance(value, Mapping) else None


def _short_target(target: str | None) -> str:
    return str(target).rsplit(".", 1)[-1]


SERVING_SETTINGS = ("spatial_size", "intensity", "projection")
"""Settings without which a checkpoint cannot be served as it was trained (the grid, the intensity scaling, the
projection of a student)."""


def _warn_unrecorded(
    path: Path, role: str, recorded: Mapping[str, Any], config: Mapping[str, Any], parser: Any
) -> None:
    """Warn when a checkpoint to serve does not record a setting of :data:`SERVING_SETTINGS` that the config uses
    and the user left at the bundle's default: it is served with the default, which may not be what it was trained
    on (the prediction of a scan can change completely)."""
    defaults = _config_defaults()
    guessed = []
    for key in SERVING_SETTINGS:
        if key in recorded or key not in config or key not in defaults:
            continue
        value = config[key]
        if isinstance(value, str) and value[:1] in ("$", "@", "%") and parser is not None:
            value = parser.get_parsed_content(key)
        if _plain(value) == _plain(defaults[key]):
            guessed.append(f"{key}={_plain(value)!r}")
    if guessed:
        logger.warning(
            f"{role} checkpoint {path} does not record the settings it was trained with; it is served with the "
            f"bundle's defaults {', '.join(guessed)}: if it was trained otherwise, pass them (e.g. --spatial_size "
            "[64,64,64]), or predictions will be wrong."
        )


def check_checkpoint(
    checkpoint: str | os.PathLike,
    role: str = "model",
    apply_settings: bool = False,
    network_id: str | None = "network_def",
    enabled: Any = True,
    parser: Any = None,
) -> dict[str, Any] | None:
    """Check, before anything is built, that ``checkpoint`` fits the config that will load it.

    An ``initialize`` step of the configs that load a checkpoint (inference, evaluation, the teacher of a
    distillation run). The checkpoint must exist and be readable. Its recorded ``settings`` are compared with the
    config's: with ``apply_settings`` (inference and evaluation) a setting the user left at the bundle's default is
    taken from the checkpoint, so a student trained on ``dynamic_image`` at 48³ is served with that projection and
    grid; a setting given explicitly with another value is an error naming both. Without ``apply_settings`` any
    difference is an error. Finally the weights are loaded strictly into a fresh ``network_id`` network, so a
    checkpoint of another architecture fails here with one line.

    Args:
        checkpoint: the checkpoint file.
        role: its name in messages (``"model"``, ``"teacher"``).
        apply_settings: take settings left at their defaults from the checkpoint.
        network_id: config id of the network definition to load the weights into; ``None`` skips that check.
        enabled: ``False`` skips every check (e.g. no teacher without distillation, no weights to load).
        parser: the config; default: the config running this step.

    Returns:
        The checkpoint's description (``None`` when it has none or the check is disabled).

    Raises:
        MissingFileError, InputError: one line naming the file and the problem.
    """
    from scripts.options import parse_bool

    if not parse_bool(enabled, "enabled"):
        return None
    parser = calling_parser() if parser is None else parser
    state, info = read_checkpoint(checkpoint, role)
    config = parser.get() if parser is not None else {}
    path = Path(checkpoint)
    if apply_settings:
        _warn_unrecorded(path, role, (info or {}).get("settings") or {}, config, parser)
    if info is None:
        logger.warning(f"{role} checkpoint {path} does not record its settings (saved by an older version).")
    else:
        target = _config_target(config, network_id) if network_id else None
        recorded_target = (info.get("network") or {}).get("_target_")
        if target and recorded_target and _short_target(target) != _short_target(recorded_target):
            raise InputError(
                f"{role} checkpoint {path} holds a {_short_target(recorded_target)} ({info.get('kind')}); this "
                f"config serves a {_short_target(target)} ({network_id}). Pass the matching checkpoint."
            )
        defaults = _config_defaults()
        updates, conflicts = {}, []
        for key, value in (info.get("settings") or {}).items():
            if key not in config:
                continue
            current = config[key]
            if isinstance(current, str) and current[:1] in ("$", "@", "%") and parser is not None:
                current = parser.get_parsed_content(key)
            if _plain(current) == _plain(value):
                continue
            if apply_settings and key in defaults and _plain(current) == _plain(defaults[key]):
                updates[key] = value
            else:
                conflicts.append((key, value, current))
        if conflicts:
            key, value, current = conflicts[0]
            more = f" (also {', '.join(k for k, _, _ in conflicts[1:])})" if len(conflicts) > 1 else ""
            advice = (
                f"drop --{key} to serve it with the checkpoint's settings"
                if apply_settings
                else f"set --{key} {json.dumps(_plain(value), separators=(',', ':'))} or retrain the {role}"
            )
            raise OptionError(
                f"{role} checkpoint {path} was trained with {key}={_plain(value)!r}, this run has "
                f"{key}={_plain(current)!r}{more}: {advice}."
            )
        if updates:
            for key, value in updates.items():
                parser[key] = value
            logger.info(f"settings from {path}: " + ", ".join(f"{k}={_plain(v)!r}" for k, v in updates.items()))
    if network_id and parser is not None and network_id in parser:
        network = parser.get_parsed_content(network_id)
        try:
            unwrap(network).load_state_dict(state, strict=True)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            detail = (lines[0] if lines else str(e))[:240]
            raise InputError(
                f"{role} checkpoint {path} does not fit {network_id} "
                f"({json.dumps(describe_network(network), separators=(',', ':'))}): {detail}"
            ) from None
        finally:
            parser.ref_resolver.remove_resolved_content(network_id)
    return info


def _flatten(transform: Any) -> list[Any]:
    from monai.transforms import Compose

    if isinstance(transform, Compose):
        return [t for inner in transform.transforms for t in _flatten(inner)]
    if isinstance(transform, (list, tuple)):
        return [t for inner in transform for t in _flatten(inner)]
    return [transform]


def random_transforms_seen_by(transform: Any, key: str) -> list[str]:
    """Names of the random (MONAI ``Randomizable``) transforms that change what ends up in ``data[key]``: those
    before the ``CopyItemsd`` that creates ``key`` (they change the volume it copies) and those applied to ``key``."""
    from monai.transforms import CopyItemsd, MapTransform, Randomizable

    transforms = _flatten(transform)
    copied = next(
        (i for i, t in enumerate(transforms) if isinstance(t, CopyItemsd) and key in tuple(t.names)), len(transforms)
    )
    return [
        type(t).__name__
        for i, t in enumerate(transforms)
        if isinstance(t, Randomizable) and (i < copied or (isinstance(t, MapTransform) and key in tuple(t.keys)))
    ]


def check_teacher(parser: Any = None) -> dict[str, Any] | None:
    """Check the teacher of a distillation run before anything is built; nothing in a config without
    ``teacher_ckpt`` or with ``kd_enabled`` false.

    * :func:`check_checkpoint` of ``teacher_ckpt`` into ``teacher_def``, its settings compared (not applied);
    * with ``cache_teacher_outputs``, no random transform of the training preprocessing (``train#preprocessing``)
      may change the teacher's input (:func:`random_transforms_seen_by`): the cache serves the teacher's outputs of
      the first epoch to every later one, which is right only when the teacher sees the same volume every epoch.

    One ``initialize`` step shared by both training configs and the multi-GPU override.

    Raises:
        OptionError: a random transform with ``cache_teacher_outputs`` true (and the checkpoint's errors).
    """
    from scripts.options import parse_bool

    parser = calling_parser() if parser is None else parser
    if parser is None or "teacher_ckpt" not in parser or "kd_enabled" not in parser:
        return None
    if not parse_bool(parser.get_parsed_content("kd_enabled"), "kd_enabled"):
        return None
    if "cache_teacher_outputs" in parser and parse_bool(parser.get_parsed_content("cache_teacher_outputs")):
        if "train#preprocessing" in parser:
            key = parser.get("train#trainer#teacher_key", "image_3d")
            random = random_transforms_seen_by(parser.get_parsed_content("train#preprocessing"), key)
            if random:
                raise OptionError(
                    f"the training transforms hold the random transform(s) {', '.join(random)}: the teacher's "
                    "outputs cached in the first epoch would be stale in the next ones. Set --cache_teacher_outputs "
                    "false."
                )
    return check_checkpoint(
        parser.get_parsed_content("teacher_ckpt"), role="teacher", network_id="teacher_def", parser=parser
    )


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
