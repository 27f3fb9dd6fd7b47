# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The distillation engine: a MONAI ``SupervisedTrainer`` that trains a 2D student against a frozen 3D teacher."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import PostFix
from scripts.checkpoints import load_weights, unwrap
from scripts.fast_data import device_index
from scripts.options import parse_bool
from torch import nn

__all__ = [
    "load_teacher",
    "TeacherOutputCache",
    "LossLog",
    "LeanTrainer",
    "DistillationTrainer",
    "loss_terms",
    "loss_logged",
    "LOSS_LOG",
]

LOSS_LOG = "loss_log"
"""Engine-output key of the averaged loss terms, present on the iterations where :class:`LossLog` read them."""


def load_teacher(teacher: nn.Module, checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a teacher checkpoint (:func:`scripts.checkpoints.load_weights`), freeze it and put it in eval mode.

    Raises:
        MissingFileError: when ``checkpoint`` does not exist; the message gives the command that trains it.
        InputError: when the file is unreadable or does not match the teacher definition (another backbone, say).
    """
    teacher = load_weights(teacher, checkpoint, device, role="teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class TeacherOutputCache:
    """Teacher logits and embeddings of each scan, computed once.

    The teacher is frozen and, without augmentation of its input, deterministic, so its outputs for a scan
    never change: the first epoch computes them and later epochs read them from this cache. The entries are rows of
    two stacked tensors on the device the teacher ran on (the training device), in float32, keyed by the scan's file
    name: a hit is one ``index_select`` per tensor (its row index from :func:`scripts.fast_data.device_index`,
    which does not make the host wait) and no host-device copy of the outputs. The batches written during the first
    epoch are joined into the stack once, at the first read that needs them.
    """

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}
        self._logits: torch.Tensor | None = None
        self._embeddings: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._size = 0  # rows written, pending ones included
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(logits, embeddings)`` of ``keys``, stacked in their order, when every key is cached, else ``None``."""
        try:
            rows = [self._rows[k] for k in keys]
        except KeyError:
            return None
        if not rows:
            return None
        if self._pending:
            done = [] if self._logits is None else [(self._logits, self._embeddings)]
            logits, embeddings = zip(*(done + self._pending))
            self._logits, self._embeddings, self._pending = torch.cat(logits), torch.cat(embeddings), []
        index = device_index(rows, self._logits.device)
        self.hits += len(rows)
        return self._logits.index_select(0, index), self._embeddings.index_select(0, index)

    def put(self, keys: Sequence[str], logits: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Add the outputs of a batch (row ``i`` of each tensor belongs to ``keys[i]``); a key seen before points to
        its new row."""
        self.misses += len(keys)
        for i, key in enumerate(keys):
            self._rows[key] = self._size + i
        self._size += len(keys)
        self._pending.append((logits.detach(), embeddings.detach()))


def _scan_keys(batchdata: dict, key: str) -> list[str] | None:
    """The file names of the scans of ``batchdata[key]``: from the ``{key}_meta_dict`` of a batch of plain tensors
    (:class:`scripts.fast_data.StackedCache`; the volume itself is not read, so a deferred key stays ungathered),
    or from the ``MetaTensor`` metadata of the volume; ``None`` if absent."""
    names = (batchdata.get(PostFix.meta(key)) or {}).get("filename_or_obj")
    size = None
    if names is None:
        image = batchdata.get(key)
        names = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
        size = None if image is None else image.shape[0]
    if isinstance(names, (list, tuple)) and names and all(names) and size in (None, len(names)):
        return [str(n) for n in names]
    return None


def loss_terms(output) -> dict[str, float]:
    """``output_transform`` for Stats/TensorBoard/MLflow handlers: the training loss as ``train_loss`` and, for a
    distillation run, each of its terms as ``loss_<term>`` (``loss_ce``, ``loss_fg``...).

    On the iterations where a :class:`LossLog` read the values it kept on the device (see :func:`loss_logged`),
    these are the means since its previous reading, with no further host-device synchronisation; otherwise the
    values of the last iteration (each ``float()`` then waits for the device).
    """
    first = output[0] if isinstance(output, list) else output
    if LOSS_LOG in first:
        return dict(first[LOSS_LOG])
    terms = {"train_loss": _scalar(first[Keys.LOSS])}
    terms.update({k: _scalar(v) for k, v in first.items() if k.startswith("loss_")})
    return terms


def _scalar(value) -> float:
    """A loss value as a float (a tensor still attached to the graph is detached first)."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def loss_logged(engine, event: int | None = None) -> bool:
    """Event filter (``iteration_log`` of MONAI's Stats/TensorBoard handlers): whether this iteration's output
    holds the averaged loss terms, i.e. whether the trainer's :class:`LossLog` read them from the device."""
    output = engine.state.output
    first = output[0] if isinstance(output, list) and output else output
    return isinstance(first, dict) and LOSS_LOG in first


class LossLog:
    """The training loss and its terms kept on the device, read by the host every ``interval`` iterations.

    A ``float()`` or ``.item()`` of a CUDA tensor waits until the device has finished every queued kernel, so a
    trainer that logs its loss each iteration cannot queue the next iteration while the current one runs. This
    handler, at ``MODEL_COMPLETED``, keeps the detached ``loss`` and every ``loss_<term>`` of the engine output (no
    device work per iteration); every ``interval`` iterations and at the last iteration of each epoch it stacks them
    and reads their means once (one ``tolist()``), and puts the means since the previous reading in the output as
    ``output["loss_log"] = {"train_loss": ..., "loss_<term>": ...}`` and in ``engine.state.loss_log``.
    :func:`loss_terms` returns them, and :func:`loss_logged` (an event filter) limits logging handlers to those
    iterations. With ``interval=1`` the values are those of each iteration.

    Args:
        interval: iterations between two readings (>= 1); the last iteration of an epoch is always read.
    """

    def __init__(self, interval: int = 10) -> None:
        if int(interval) < 1:
            raise ValueError(f"log interval must be >= 1, got {interval}.")
        self.interval = int(interval)
        self._names: list[str] = []
        self._kept: list = []  # the detached values of each iteration since the last reading, in ``_names`` order

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def reset(self, engine=None) -> None:
        self._kept, self._names = [], []

    def __call__(self, engine) -> None:
        output = engine.state.output
        first = output[0] if isinstance(output, list) else output
        if not isinstance(first, dict) or Keys.LOSS not in first:
            return
        names = ["train_loss"] + [k for k in first if k.startswith("loss_") and k != LOSS_LOG]
        if names != self._names:  # another set of terms: start again
            self._kept, self._names = [], names
        loss = first[Keys.LOSS]
        values = [loss, *(first[k] for k in names[1:])]
        self._kept.extend(v.detach() if isinstance(v, torch.Tensor) else v for v in values)
        iteration, epoch_length = engine.state.iteration, engine.state.epoch_length
        if iteration % self.interval and not (epoch_length and iteration % epoch_length == 0):
            return
        device = torch.as_tensor(loss).device
        if all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.device == device for v in self._kept):
            kept = torch.stack(self._kept).float()  # one op on the device
        else:  # a term given as a number (or another shape) joins the loss's device
            kept = torch.stack([torch.as_tensor(v, device=device).float().reshape(()) for v in self._kept])
        means = kept.view(-1, len(names)).mean(0).tolist()  # the one host-device synchronisation
        logged = dict(zip(names, means))
        engine.state.loss_log = logged
        for item in output if isinstance(output, list) else [output]:
            if isinstance(item, dict):
                item[LOSS_LOG] = logged
        self._kept = []


class LeanTrainer(SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` without per-iteration host-device synchronisation of its own.

    The iteration is MONAI's; what changes is around it:

    * the loss (and, for distillation, its terms) is accumulated on the device by a :class:`LossLog` and read
      every ``log_interval`` iterations and at the end of each epoch (use :func:`loss_terms` as the handlers'
      ``output_transform`` and :func:`loss_logged` as their ``iteration_log``);
    * the batch is not decollated by default (``decollate=False``): postprocessing then acts on the batch (a
      softmax over ``dim=1``) and metrics receive batch tensors, instead of one ``.item()`` per scalar per scan;
    * gradient scaling is enabled only for float16 mixed precision: bfloat16 has float32's range and needs no
      scaler, whose ``update()`` reads the device every step (the disabled ``GradScaler`` passes through).

    Args:
        log_interval: iterations between two readings of the loss by the host.
        kwargs: ``SupervisedTrainer`` arguments.
    """

    def __init__(self, *args, log_interval: int = 10, decollate: bool = False, **kwargs) -> None:
        super().__init__(*args, decollate=decollate, **kwargs)
        self.loss_log = LossLog(log_interval)
        self.loss_log.attach(self)
        if self.amp:
            dtype = (self.amp_kwargs or {}).get("dtype", torch.float16)
            self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


class DistillationTrainer(LeanTrainer):
    """:class:`LeanTrainer` (MONAI's ``SupervisedTrainer``) that adds knowledge distillation from a frozen 3D teacher.

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
    ``loss_<term>`` at ``LOSS_COMPLETED`` (detached device tensors, kept by the :class:`LossLog`; see
    :func:`loss_terms`).

    Args:
        teacher: the 3D teacher network (``forward_with_embedding`` returning ``(logits, embedding)``).
        teacher_checkpoint: state dict file of the teacher, loaded when the trainer is built.
        teacher_key: batch key of the teacher's input volume.
        kd_enabled: ``False`` trains the same student with the same data and schedule but without the teacher
            (the no-KD baseline); the teacher is then neither loaded nor run.
        cache_teacher_outputs: reuse teacher outputs per scan after the first epoch (valid only when no random
            transform touches the teacher's input).
        loss_function: the distillation loss (e.g. :class:`scripts.losses.DistillationLoss`).
        kwargs: the other :class:`LeanTrainer` / ``SupervisedTrainer`` arguments (``network`` must have a ``head``
            module taking the embedding).
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
        self.kd_enabled = parse_bool(kd_enabled, "kd_enabled")
        self.teacher_key = teacher_key
        self.teacher: nn.Module | None = None
        if self.kd_enabled:
            if teacher is None or teacher_checkpoint is None:
                raise ValueError(
                    "knowledge distillation needs a teacher and a teacher_checkpoint (or kd_enabled=False)."
                )
            self.teacher = load_teacher(teacher, teacher_checkpoint, self.state.device)
        self.teacher_cache = TeacherOutputCache() if (self.kd_enabled and cache_teacher_outputs) else None
        head = getattr(unwrap(self.network), "head", None)
        if not isinstance(head, nn.Module):
            raise ValueError(
                f"the student {type(unwrap(self.network)).__name__} has no 'head' module to read embeddings from."
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
        """``LOSS_COMPLETED``: every loss term in the engine output as ``loss_<term>`` (a detached tensor on the
        device), for the :class:`LossLog`."""
        for name, value in self._terms.items():
            if name != "loss":
                engine.state.output[f"loss_{name}"] = value.detach() if isinstance(value, torch.Tensor) else value
