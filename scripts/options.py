# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The bundle's user options: what each one accepts, checked before anything is built.

MONAI's bundle command line hands every ``--name value`` override to the config as the Python value that
python-fire makes of it: ``--kd_enabled false`` arrives as the *string* ``"false"`` (which Python reads as true),
``--max_epochs abc`` as the string ``"abc"``, ``--max_epoch 0`` (a typo) as a new, unused id. :func:`check_options`
is the first step of every config's ``initialize`` list; it

* checks every option of :data:`OPTIONS` present in the config and normalises it in the config (``"false"``,
  ``"FALSE"`` -> ``False``), so that every later reference reads the checked value;
* refuses an id that no config file of the bundle defines and nothing in the config reads, naming the closest
  valid option (``--max_epoch`` -> ``--max_epochs``);
* warns about a bundle option that was changed but that nothing in the running config reads (``--kd_enabled
  false`` given to ``train_teacher.json``).

A failed check raises :class:`OptionError` with one line naming the option, what it expects and what it got.
Expressions (``"$..."``), references (``"@..."``) and macros (``"%..."``) are the configs' own definitions and are
not checked. ``slice_centre`` is checked by the projection transform itself.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver
from monai.utils import look_up_option
from scripts.errors import InputError

__all__ = [
    "Option",
    "OPTIONS",
    "OptionError",
    "parse_bool",
    "check_value",
    "check_options",
    "check_overrides",
    "calling_parser",
]

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The bundle's config folder: the ids its files define are the valid ones."""

RESERVED_IDS = frozenset({"_meta_", "imports", "initialize", "run", "finalize", "training", "evaluating"})
"""Top-level ids MONAI itself reads (never options)."""


class OptionError(InputError):
    """An option has a value it cannot take, or is not an option of the bundle; the message names it."""


def parse_bool(value: Any, name: str = "option") -> bool:
    """``True``/``False``, or the strings ``"true"``/``"false"`` in any case (what ``--x false`` arrives as).

    Raises:
        OptionError: for anything else (``1``, ``"yes"``, ``None``...), naming ``name``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise OptionError(f"option --{name} expects true or false, got {value!r}.")


@dataclass(frozen=True)
class Option:
    """What one option accepts.

    Args:
        kind: ``"bool"``, ``"int"``, ``"float"``, ``"str"``, ``"name"`` (one folder name: no path separator, not
            ``.`` or ``..``), ``"choice"`` or ``"size3"`` (three integers).
        minimum / maximum: inclusive bounds of a number (or of each integer of a ``"size3"``).
        above: exclusive lower bound of a number.
        choices: the accepted values of a ``"choice"`` (a callable returning them is read lazily).
        hint: what to do, appended to the error.
        empty: a ``"str"`` that may be empty (a folder option whose empty value means none).
    """

    kind: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    hint: str = ""
    empty: bool = False

    def expects(self) -> str:
        """What the option accepts, in words."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return "a string (empty for none)" if self.empty else "a non-empty string"
        if self.kind == "name":
            return "a folder name (no '/', not '.' or '..')"
        if self.kind == "device":
            return "a device this machine has (cpu, cuda, cuda:0...)"
        if self.kind == "choice":
            return "one of " + ", ".join(str(c) for c in self._choices())
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {_num(self.minimum)}")
        if self.above is not None:
            bounds.append(f"> {_num(self.above)}")
        if self.maximum is not None:
            bounds.append(f"<= {_num(self.maximum)}")
        bound = (" " + " and ".join(bounds)) if bounds else ""
        if self.kind == "size3":
            return f"three integers{bound}, as in [64,64,64]"
        return ("an integer" if self.kind == "int" else "a number") + bound

    def _choices(self) -> Sequence[Any]:
        return tuple(self.choices()) if callable(self.choices) else tuple(self.choices or ())


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _choices(module: str, name: str) -> Callable[[], Sequence[Any]]:
    """The accepted values of a choice, read from the runtime module that defines them (imported on use)."""

    def read() -> Sequence[Any]:
        import importlib

        return getattr(importlib.import_module(module), name)

    return read


OPTIONS: dict[str, Option] = {
    # switches
    "kd_enabled": Option("bool"),
    "progress_bar": Option("bool"),
    "save_projection_png": Option("bool"),
    "load_pretrain": Option("bool"),
    "synthetic_data": Option("bool"),
    "cache_teacher_outputs": Option("bool"),
    "resume": Option("bool"),
    "keep_training_state": Option("bool"),
    "overwrite": Option("bool"),
    "publish": Option("bool"),
    "allow_nonstandard_input": Option("bool"),
    "settings_from_checkpoint": Option("bool"),
    "debug": Option("bool"),
    "report": Option("bool"),
    "stacked_cache": Option("bool"),
    "amp": Option("bool"),
    "cudnn_benchmark": Option("bool"),
    "non_blocking": Option("bool"),
    "channels_last": Option("bool"),
    "plain_tensor_batch": Option("bool"),
    "faithfulness": Option("bool"),
    "save_execute_config": Option("bool"),
    "device": Option("device"),
    # grid, intensity, projection, networks
    "spatial_size": Option("size3", minimum=16, hint="(the networks need at least 16 voxels per side)"),
    "intensity": Option("choice", choices=_choices("scripts.transforms", "INTENSITY_MODES")),
    "projection": Option("choice", choices=_choices("scripts.projections", "PROJECTIONS")),
    "view": Option("choice", choices=_choices("scripts.projections", "VIEWS")),
    "num_slices": Option("int", minimum=1, hint="(an odd number of adjacent slices)"),
    "gap": Option("int", minimum=0),
    "student_backbone": Option("choice", choices=_choices("scripts.networks", "BACKBONES")),
    "teacher_backbone": Option("choice", choices=_choices("scripts.networks", "BACKBONES")),
    "num_classes": Option("int", minimum=2, maximum=2, hint="(the bundle classifies HC vs PD)"),
    # training recipe
    "max_epochs": Option("int", minimum=1),
    "patience": Option("int", minimum=1),
    "selection_metric": Option("choice", choices=_choices("scripts.metrics", "SELECTION_METRICS")),
    "val_interval": Option("int", minimum=1),
    "log_interval": Option("int", minimum=1),
    "batch_size": Option("int", minimum=1),
    "num_workers": Option("int", minimum=0),
    "learning_rate": Option("float", above=0.0),
    "weight_decay": Option("float", minimum=0.0),
    "cache_rate": Option("float", minimum=0.0, maximum=1.0),
    "train_fraction": Option("float", above=0.0, maximum=1.0),
    "seed": Option("int", minimum=0),
    "data_seed": Option("int", minimum=0),
    "synthetic_subjects": Option("int", minimum=1, hint="(checked against --synthetic_preset: see below)"),
    "synthetic_preset": Option("choice", choices=_choices("scripts.synthetic.presets", "PRESETS")),
    # distillation
    "kd_mode": Option("choice", choices=("graph", "hinton")),
    "graph_kernel": Option("choice", choices=_choices("scripts.losses", "KERNELS")),
    "cls_weight": Option("float", minimum=0.0),
    "fg_weight": Option("float", minimum=0.0),
    "lg_weight": Option("float", minimum=0.0),
    "decor_weight": Option("float", minimum=0.0),
    "temperature": Option("float", above=0.0),
    # files, names, splits
    "bundle_root": Option("str"),
    "dataset_dir": Option("str"),
    "datalist_file": Option("str"),
    "ckpt_dir": Option("str"),
    "model_file": Option("str"),
    "teacher_ckpt": Option("str"),
    "eval_checkpoint": Option("str"),
    "checkpoint_name": Option("str"),
    "shared_cache_dir": Option("str", empty=True),
    "persistent_cache_dir": Option("str", empty=True),
    "run_name": Option("name", hint="(the run's folder is eval/<run_name> under the bundle root)"),
    "output_dir": Option("str"),
    "input": Option("str"),
    "input_split": Option("str", empty=True),
    "eval_split": Option("str"),
    "explain_split": Option("str"),
    "report_reference_split": Option("str"),
    # explanation, site adaptation
    "saliency_method": Option("choice", choices=_choices("scripts.explain", "SALIENCY_METHODS")),
    "saliency_target": Option("choice", choices=("label", "predicted", "hc", "pd")),
    "top_percent": Option("float", above=0.0, maximum=100.0),
    "occlusion_scans": Option("int", minimum=0),
    "occlusion_mask": Option("int", minimum=1),
    "occlusion_overlap": Option("float", minimum=0.0, maximum=0.99),
    "site_adaptation_min_scans": Option("int", minimum=1),
    "dynamic_image_variant": Option("choice", choices=_choices("scripts.projections", "DYNAMIC_IMAGE_VARIANTS")),
}
"""The options a user sets on the command line (``--name value``), with what each accepts."""


def inferred_options(defined: Mapping[str, list[Any]] | None = None) -> dict[str, Option]:
    """Options for the config ids not in :data:`OPTIONS` whose values in the bundle's configs are all literal
    booleans, integers or numbers: a switch or number added to a config is parsed like the listed ones
    (``"false"`` is ``False`` for every switch), without waiting for someone to list it."""
    defined = _defined_ids() if defined is None else defined
    out: dict[str, Option] = {}
    for key, values in defined.items():
        if key in OPTIONS or key in RESERVED_IDS or not values:
            continue
        kinds = {type(v) for v in values}
        if kinds == {bool}:
            out[key] = Option("bool")
        elif kinds == {int}:
            out[key] = Option("int")
        elif kinds <= {int, float}:
            out[key] = Option("float")
    return out


def _is_config_expression(value: Any) -> bool:
    return isinstance(value, str) and value[:1] in ("$", "@", "%")


def check_value(name: str, value: Any, option: Option | None = None) -> Any:
    """Check one option value and return it normalised (``"False"`` -> ``False``, ``(64, 64, 64)`` -> list).

    Raises:
        OptionError: one line: the option, what it expects, what it got (and the closest choice).
    """
    option = OPTIONS[name] if option is None else option

    def fail(extra: str = "") -> OptionError:
        hint = f" {option.hint}" if option.hint else ""
        return OptionError(f"option --{name} expects {option.expects()}, got {value!r}{extra}{hint}.")

    if option.kind == "bool":
        try:
            return parse_bool(value, name)
        except OptionError:
            raise fail() from None
    if option.kind == "str":
        if not isinstance(value, str) or not (value.strip() or (option.empty and value == "")):
            raise fail()
        return value
    if option.kind == "name":
        if not isinstance(value, str) or not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0"):
            raise fail()
        return value
    if option.kind == "device":
        return _check_device(name, value, fail)
    if option.kind == "choice":
        choices = option._choices()
        try:
            return look_up_option(value, choices)
        except (ValueError, TypeError):
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            raise fail(f" (did you mean {close[0]!r}?)" if close else "") from None
    if option.kind == "size3":
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise fail()
        return [_check_number(name, v, option, integer=True, fail=fail) for v in value]
    return _check_number(name, value, option, integer=option.kind == "int", fail=fail)


def _check_device(name: str, value: Any, fail: Callable[..., OptionError]) -> Any:
    """A device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``) or ``torch.device`` that this machine has, as given."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise fail() from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(
                f"option --{name} {value}: CUDA is not available on this machine (no GPU, or a CPU-only PyTorch); "
                "use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(
                f"option --{name} {value}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
    elif device.type not in ("cpu", "mps"):
        raise fail()
    return value


def _check_number(name: str, value: Any, option: Option, integer: bool, fail: Callable[[], OptionError]) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail()
    if integer and not isinstance(value, int):
        raise fail()
    if not math.isfinite(value):
        raise fail()
    if option.minimum is not None and value < option.minimum:
        raise fail()
    if option.maximum is not None and value > option.maximum:
        raise fail()
    if option.above is not None and not value > option.above:
        raise fail()
    return int(value) if integer else float(value)


# --------------------------------------------------------------------------------------------------------------------
# the config being run
# --------------------------------------------------------------------------------------------------------------------
def calling_parser() -> ConfigParser | None:
    """The :class:`~monai.bundle.ConfigParser` that is instantiating the calling component, if any.

    MONAI hands a config component only its arguments, never the config that builds it; a check of the config as a
    whole (unknown ids, values to normalise in place) needs that config. The parser is the ``self`` of the
    ``ConfigParser.get_parsed_content`` frame that is resolving the component, found on the call stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner
        frame = frame.f_back
    return None


def _defined_ids(config_dir: Path = CONFIG_DIR) -> dict[str, list[Any]]:
    """Top-level id -> the values the bundle's config files give it."""
    defined: dict[str, list[Any]] = {}
    for path in sorted(config_dir.glob("*.json")):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(content, dict):
            for key, value in content.items():
                defined.setdefault(key, []).append(value)
            for key, value in (content.get("configs") or {}).items() if path.name == "mlflow.json" else ():
                defined.setdefault(key, []).append(value)
    return defined


def _referenced_ids(config: Any) -> set[str]:
    """The top-level ids that some value of ``config`` refers to (``@id``, ``@id#sub``, inside ``$`` expressions)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, str) and "@" in value:
            for ref in ReferenceResolver.match_refs_pattern(value):
                found.add(ref.replace("#", "::").split("::")[0])

    walk(config)
    return found


def _unused_ids(config: Mapping[str, Any], defined: Mapping[str, list[Any]]) -> tuple[list[str], list[str]]:
    """``(unknown, ignored)``: ids that no config file defines and nothing reads (typos); bundle options whose value
    differs from every config file's (so they were set by the user) but that nothing in this config reads."""
    referenced = _referenced_ids(config)
    unknown, ignored = [], []
    for key, value in config.items():
        if key in RESERVED_IDS or key.startswith("_") or key in referenced:
            continue
        if key not in defined:
            unknown.append(key)
        elif key in OPTIONS and all(value != v for v in defined[key]):
            ignored.append(key)
    return unknown, ignored


PROJECTION_IDS = ("projection", "view", "slice_centre", "num_slices", "gap")


def _check_projection(values: Mapping[str, Any]) -> None:
    """The projection settings together: built once as the projection transform, and a multi-view projection
    needs a cubic grid (its views become channels of one image)."""
    if not all(k in values for k in PROJECTION_IDS):
        return
    from scripts.projections import Projection

    try:
        transform = Projection(
            values["projection"], values["view"], values["slice_centre"], values["num_slices"], values["gap"]
        )
    except (ValueError, TypeError) as e:
        raise OptionError(f"projection settings: {e}") from None
    size = values.get("spatial_size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(n, int) for n in size)):
        return
    if "views" in transform.spec.name and len(set(size)) > 1:
        raise OptionError(
            f"option --projection {transform.spec.name} stacks three views as channels and needs a cubic grid; "
            f"--spatial_size is {size} (use e.g. [64,64,64])."
        )
    import torch

    try:  # what fits the working grid (slices, centre) is known before any scan is read
        transform(torch.rand(1, *size, generator=torch.Generator().manual_seed(0)))
    except ValueError as e:
        raise OptionError(f"projection settings on the --spatial_size {size} grid: {e}") from None


def minimum_subjects(preset: str = "default") -> int:
    """The fewest subjects the phantom generator accepts for ``preset``: every split gets both classes."""
    from scripts.synthetic.phantom import _resolve_design, _validate_dataset_args

    for n in range(1, 1000):
        try:
            _, n_subjects, modality, pd_fraction, max_visits, split = _resolve_design(preset, n, None, None, None, None)
            _validate_dataset_args(n_subjects, modality, pd_fraction, max_visits, split, 1)
        except ValueError:
            continue
        return n
    return 1


def _check_synthetic(values: Mapping[str, Any]) -> None:
    """``synthetic_subjects`` against what the generator accepts for ``synthetic_preset`` (when data are made)."""
    n = values.get("synthetic_subjects")
    if not isinstance(n, int) or values.get("synthetic_data") is False:
        return
    preset = values.get("synthetic_preset", "default")
    needed = minimum_subjects(preset if isinstance(preset, str) else "default")
    if n < needed:
        raise OptionError(
            f"option --synthetic_subjects expects an integer >= {needed} for --synthetic_preset {preset} (each split "
            f"needs subjects of both classes), got {n}."
        )


def _did_you_mean(key: str, valid: Iterable[str], prefix: str = "--") -> str:
    """The end of an unknown-option message: the closest valid id, or where the options are listed."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else "; see the options in docs/troubleshooting.md."


def check_overrides(overrides: Mapping[str, Any], source: str = "--set") -> dict[str, Any]:
    """Check overrides given to the bundle's configs from outside a config run (the study's ``--set KEY=VALUE``)
    as :func:`check_options` checks a run's options, before anything runs: an id that no config defines is refused
    with the closest one, a value by its option. ``key#sub`` paths are checked by their top-level id.

    Returns:
        the overrides with their values normalised (``"false"`` -> ``False``).

    Raises:
        OptionError: naming ``source``, the key and the problem.
    """
    defined = _defined_ids()
    names = {**inferred_options(defined), **OPTIONS}
    out = {}
    for key, value in overrides.items():
        top = key.split("#", 1)[0]
        if top not in defined and top not in names:
            suggestion = _did_you_mean(top, [k for k in defined if not k.startswith("_")], prefix="")
            raise OptionError(f"{source} {key}={value}: {top} is not an option of this bundle{suggestion}")
        if top != key or top not in names or _is_config_expression(value):
            out[key] = value
            continue
        try:
            out[key] = check_value(top, value, names[top])
        except OptionError as e:
            raise OptionError(f"{source} {key}={value}: {e}") from None
    return out


def check_options(parser: ConfigParser | None = None, options: Iterable[str] | None = None) -> dict[str, Any]:
    """Check the options of the config being run, normalise them in place, refuse unknown ids.

    Used as the first step of a config's ``initialize`` list (``{"_target_": "scripts.options.check_options"}``),
    where the config is the one instantiating it (see :func:`calling_parser`).

    Args:
        parser: the config to check; default: the calling config.
        options: the option names to check; default all of :data:`OPTIONS`.

    Returns:
        ``{name: value}`` of the checked options.

    Raises:
        OptionError: a value an option cannot take, or an id that is not an option of the bundle (with the
            closest valid name).
    """
    parser = calling_parser() if parser is None else parser
    if parser is None:
        raise RuntimeError("check_options needs the config to check: call it from a config or pass `parser`.")
    config = parser.get()
    if not isinstance(config, dict):
        return {}
    defined = _defined_ids()
    names = {**inferred_options(defined), **OPTIONS} if options is None else {n: OPTIONS[n] for n in options}
    checked, updates = {}, {}
    for name, option in names.items():
        if name not in config or _is_config_expression(config[name]):
            continue
        value = check_value(name, config[name], option)
        checked[name] = value
        if type(value) is not type(config[name]) or value != config[name]:
            updates[name] = value
    literal = {**{k: v for k, v in config.items() if not _is_config_expression(v)}, **checked}
    _check_projection(literal)
    _check_synthetic(literal)
    unknown, ignored = _unused_ids(config, defined)
    if unknown:
        valid = sorted(k for k in set(defined) | set(config) if k not in unknown and not k.startswith("_"))
        key = unknown[0]
        suggestion = _did_you_mean(key, valid)
        more = f" (also unknown: {', '.join('--' + k for k in unknown[1:])})" if len(unknown) > 1 else ""
        raise OptionError(f"--{key} is not an option of this bundle{suggestion}{more}")
    for key in ignored:
        logger.warning(f"option --{key} is not used by this config; it has no effect here.")
    for name, value in updates.items():
        parser[name] = value
    return checked
