# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Self-describing checkpoints: their metadata, reading and writing, and the checks before a config uses one.

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

Run folders and resumable training state are in :mod:`scripts.runs`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pickle
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from scripts.errors import InputError, MissingFileError
from scripts.options import OptionError, calling_parser
from torch import nn

__all__ = [
    "METADATA_KEY",
    "CLASS_NAMES",
    "bundle_version",
    "describe_network",
    "checkpoint_metadata",
    "read_checkpoint",
    "load_weights",
    "save_checkpoint",
    "split_digest",
    "DescribedModel",
    "datalist_of",
    "check_checkpoint",
    "check_teacher",
    "random_transforms_seen_by",
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
        kind = "teacher" if role == "teacher" or "teacher" in path.name else "student"
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


def _mismatch(error: RuntimeError) -> str:
    """The first informative line of ``load_state_dict``'s error (missing or unexpected keys, a size mismatch)."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    return (lines[0] if lines else str(error))[:240]


def load_weights(
    network: nn.Module, checkpoint: str | os.PathLike, device: str | torch.device = "cpu", role: str = "model"
) -> nn.Module:
    """Load ``checkpoint`` (:func:`read_checkpoint`) strictly into ``network``, in eval mode, on ``device``.

    The one loader of weights outside MONAI's ``CheckpointLoader``: the distillation teacher, the explanation and
    report networks.

    Raises:
        MissingFileError, InputError: one line naming the file and the problem (missing, unreadable, or weights of
            another network definition).
    """
    state, _ = read_checkpoint(checkpoint, role)
    try:
        unwrap(network).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(
            f"{role} checkpoint {checkpoint} does not match the {role} definition "
            f"({json.dumps(describe_network(network), separators=(',', ':'))}): {_mismatch(e)}. Use the checkpoint "
            f"trained with these settings, or set the backbone and projection it was trained with."
        ) from None
    return network.to(device).eval()


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
            raise InputError(
                f"{role} checkpoint {path} does not fit {network_id} "
                f"({json.dumps(describe_network(network), separators=(',', ':'))}): {_mismatch(e)}"
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
            key = parser.get_parsed_content("train#trainer#teacher_key", default="image_3d")
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
