# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The distillation engine: a MONAI ``SupervisedTrainer`` that trains a 2D student against a frozen 3D teacher."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import PostFix
from scripts.errors import InputError, MissingFileError
from torch import nn

__all__ = ["load_teacher", "TeacherOutputCache", "DistillationTrainer", "loss_terms"]

TEACHER_TRAIN_COMMAND = "python -m monai.bundle run training --config_file configs/train_teacher.json"


def _unwrap(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if hasattr(network, "module") and isinstance(network.module, nn.Module):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def load_teacher(teacher: nn.Module, checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a teacher state dict, freeze it and put it in eval mode.

    Raises:
        FileNotFoundError: when ``checkpoint`` does not exist; the message gives the command that trains it.
        ValueError: when the checkpoint does not match the teacher definition (another backbone, say).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingFileError(
            f"teacher checkpoint {path} not found. Train the 3D teacher first: {TEACHER_TRAIN_COMMAND}"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable or not a state dict
        raise InputError(f"teacher checkpoint {path} could not be read ({type(e).__name__}: {e}).") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = [line.strip() for line in str(e).splitlines()[1:3]]
        raise InputError(
            f"teacher checkpoint {path} does not match the teacher definition ({type(teacher).__name__} "
            f"{getattr(teacher, 'backbone', '')}): {' '.join(missing)[:400]} ... Retrain it with "
            f"{TEACHER_TRAIN_COMMAND}, or set the teacher backbone the checkpoint was trained with."
        ) from None
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class TeacherOutputCache:
    """Teacher logits and embeddings of each scan, computed once.

    The teacher is frozen and, without augmentation of its input, deterministic, so its outputs for a scan
    never change: the first epoch computes them and later epochs read them from this cache. The entries stay on
    the device the teacher ran on (the training device), in float32, so a hit costs no host-device copy. Entries
    are keyed by the scan's file name.
    """

    def __init__(self) -> None:
        self._logits: dict[str, torch.Tensor] = {}
        self._embeddings: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._logits)

    def get(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stacked ``(logits, embeddings)`` when every key is cached, else ``None``."""
        if not keys or any(k not in self._logits for k in keys):
            return None
        self.hits += len(keys)
        return torch.stack([self._logits[k] for k in keys]), torch.stack([self._embeddings[k] for k in keys])

    def put(self, keys: Sequence[str], logits: torch.Tensor, embeddings: torch.Tensor) -> None:
        self.misses += len(keys)
        for k, lg, em in zip(keys, logits.detach(), embeddings.detach()):
            self._logits[k] = lg
            self._embeddings[k] = em


def _scan_keys(batchdata: dict, key: str) -> list[str] | None:
    """The file names of the scans of ``batchdata[key]``: from its ``MetaTensor`` metadata, or from the
    ``{key}_meta_dict`` of a batch of plain tensors (:class:`scripts.fast_data.StackedCache`); ``None`` if absent."""
    image = batchdata.get(key)
    if isinstance(image, MetaTensor):
        names = image.meta.get("filename_or_obj")
    else:
        names = (batchdata.get(PostFix.meta(key)) or {}).get("filename_or_obj")
    if isinstance(names, (list, tuple)) and image is not None and len(names) == image.shape[0] and all(names):
        return [str(n) for n in names]
    return None


def loss_terms(output) -> dict[str, float]:
    """``output_transform`` for Stats/TensorBoard/MLflow handlers: the loss of the last iteration as
    ``train_loss`` and, for a distillation run, each of its terms as ``loss_<term>`` (``loss_ce``, ``loss_fg``...)."""
    first = output[0] if isinstance(output, list) else output
    terms = {"train_loss": float(first[Keys.LOSS])}
    terms.update({k: float(v) for k, v in first.items() if k.startswith("loss_")})
    return terms


class DistillationTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` that adds knowledge distillation from a frozen 3D teacher.

    The iteration is MONAI's own (``SupervisedTrainer._iteration``: batch preparation, optional ``torch.compile``,
    automatic mixed precision, every iteration event); distillation plugs into it at two points:

    * at ``ITERATION_STARTED`` the frozen teacher (3D, eval mode, no gradient) computes its logits and pooled
      embedding of ``batch[teacher_key]`` (the volume of the same scans), or reads them from the
      :class:`TeacherOutputCache`;
    * the ``loss_function`` MONAI calls as ``loss(pred, label)`` is a wrapper around the distillation loss, called
      as ``loss_function(student_logits, student_embedding, labels, teacher_logits, teacher_embedding)``. The
      student's embedding is captured at the input of its ``head`` during the one forward pass that produces the
      logits, so the distillation terms act on the weights that classify (also under
      ``DistributedDataParallel``). Under mixed precision the loss is computed in float32.

    The loss returns a dict with ``"loss"`` and its terms; every term is put in the engine output as
    ``loss_<term>`` at ``LOSS_COMPLETED`` for logging (see :func:`loss_terms`).

    Args:
        teacher: the 3D teacher network (``forward_with_embedding`` returning ``(logits, embedding)``).
        teacher_checkpoint: state dict file of the teacher, loaded when the trainer is built.
        teacher_key: batch key of the teacher's input volume.
        kd_enabled: ``False`` trains the same student with the same data and schedule but without the teacher
            (the no-KD baseline); the teacher is then neither loaded nor run.
        cache_teacher_outputs: reuse teacher outputs per scan after the first epoch (valid only when no random
            transform touches the teacher's input).
        loss_function: the distillation loss (e.g. :class:`scripts.losses.DistillationLoss`).
        kwargs: the other ``SupervisedTrainer`` arguments (``network`` must have a ``head`` module taking the
            embedding).
    """

    def __init__(
        self,
        loss_function: Callable[..., dict[str, torch.Tensor]],
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | os.PathLike | None = None,
        teacher_key: str = "image_3d",
        kd_enabled: bool = True,
        cache_teacher_outputs: bool = True,
        **kwargs,
    ) -> None:
        self.distillation_loss = loss_function
        super().__init__(loss_function=self._loss, **kwargs)
        self.kd_enabled = bool(kd_enabled)
        self.teacher_key = teacher_key
        self.teacher: nn.Module | None = None
        if self.kd_enabled:
            if teacher is None or teacher_checkpoint is None:
                raise ValueError(
                    "knowledge distillation needs a teacher and a teacher_checkpoint (or kd_enabled=False)."
                )
            self.teacher = load_teacher(teacher, teacher_checkpoint, self.state.device)
        self.teacher_cache = TeacherOutputCache() if (self.kd_enabled and cache_teacher_outputs) else None
        head = getattr(_unwrap(self.network), "head", None)
        if not isinstance(head, nn.Module):
            raise ValueError(
                f"the student {type(_unwrap(self.network)).__name__} has no 'head' module to read embeddings from."
            )
        head.register_forward_pre_hook(self._capture_embedding)
        self._embedding: torch.Tensor | None = None
        self._teacher_outputs: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._terms: dict[str, torch.Tensor] = {}
        self.add_event_handler(Events.ITERATION_STARTED, self._run_teacher)
        self.add_event_handler(IterationEvents.LOSS_COMPLETED, self._record_terms)

    def _capture_embedding(self, module: nn.Module, args: tuple) -> None:
        self._embedding = args[0]

    def _run_teacher(self, engine: DistillationTrainer) -> None:
        """``ITERATION_STARTED``: the teacher outputs for this batch (``(None, None)`` without distillation)."""
        self._embedding = None
        if not self.kd_enabled:
            self._teacher_outputs = (None, None)
            return
        self._teacher_outputs = self._teacher_outputs_of(engine.state.batch, engine.state.device)

    def _teacher_outputs_of(self, batchdata: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        keys = _scan_keys(batchdata, self.teacher_key) if self.teacher_cache is not None else None
        if keys is not None:
            cached = self.teacher_cache.get(keys)
            if cached is not None:
                return cached
        if self.teacher_key not in batchdata:
            raise KeyError(f"the batch has no {self.teacher_key!r} (the teacher's 3D input); check the preprocessing.")
        volume = batchdata[self.teacher_key]
        volume = volume.as_tensor() if isinstance(volume, MetaTensor) else volume  # no metadata through the network
        volume = volume.to(device, non_blocking=self.non_blocking)
        self.teacher.eval()
        autocast = self.amp and torch.device(device).type == "cuda"  # as MONAI: mixed precision on CUDA only
        with torch.no_grad(), torch.autocast("cuda", enabled=autocast, **(self.amp_kwargs if autocast else {})):
            logits, embedding = self.teacher.forward_with_embedding(volume)
        logits, embedding = logits.float(), embedding.float()
        if keys is not None:
            self.teacher_cache.put(keys, logits, embedding)
        return logits, embedding

    def _loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss MONAI's iteration calls: the distillation loss on the captured embedding, in float32."""
        if self._embedding is None:
            raise RuntimeError("the student's head was not called; cannot read its embedding.")
        teacher_logits, teacher_embedding = self._teacher_outputs
        with torch.autocast(device_type=pred.device.type, enabled=False):
            self._terms = self.distillation_loss(
                pred.float(), self._embedding.float(), target, teacher_logits, teacher_embedding
            )
        return self._terms["loss"]

    def _record_terms(self, engine: DistillationTrainer) -> None:
        """``LOSS_COMPLETED``: every loss term in the engine output as ``loss_<term>``, for the handlers."""
        for name, value in self._terms.items():
            if name != "loss":
                engine.state.output[f"loss_{name}"] = float(value)
