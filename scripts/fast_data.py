# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The training data path: cached scans (in memory, on the training device or on disk) and how batches are made.

MONAI's recipe for fast training (``CacheDataset`` + ``ToDeviced`` + ``ThreadDataLoader``) caches the output of the
deterministic transforms once, but still builds every batch item by item: the ``DataLoader`` fetches ``B`` cached
dictionaries and ``list_data_collate`` stacks their ``MetaTensor`` values and their metadata (affine, file name,
applied operations) per batch. On a GPU that trains a 3D ResNet-10 at thousands of scans per second, this per-item
Python work, not the network, bounds the speed. The components here remove it where the metadata is not needed:

* :class:`StackedCache`: the items of a filled ``CacheDataset`` (deterministic transforms only) stacked into one
  tensor per key, kept on ``device``; a batch is one ``index_select`` per key (``__getitems__``). The cached items
  become views of the stack, so the data are held once. Keys read only now and then (the teacher's volume, which
  a cached teacher output makes unnecessary after the first epoch) can be *deferred*: gathered on first access.
* :class:`CacheBatchLoader`: a MONAI ``DataLoader`` that batches from a :class:`StackedCache` when it can (the
  same samplers, shuffling, ``DistributedSampler`` and random-number use as the plain loader, so the order of the
  scans is the same) and otherwise behaves exactly like MONAI's ``DataLoader`` over the given dataset.
* :class:`PlainTensorBatch`: a ``prepare_batch`` that hands plain ``torch.Tensor`` inputs to the network
  (``MetaTensor`` metadata dropped from the network input only), so that the forward and backward passes do not
  go through ``MetaTensor.__torch_function__``.
* :func:`cached_dataset`: ``CacheDataset`` in memory, or ``PersistentDataset`` (preprocessed scans written once
  to a folder and read back every epoch) when a cache folder is given, for data sets larger than memory.

Batches from a :class:`StackedCache` hold plain tensors; the file names of each key's ``MetaTensor`` items are
kept in ``batch[f"{key}_meta_dict"]["filename_or_obj"]`` (MONAI's metadata-dictionary convention), which is what
the distillation engine keys its teacher-output cache on.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import stat
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, MetaTensor, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.transforms import Compose, RandomizableTrait, Transform
from monai.utils import PostFix

logger = logging.getLogger(__name__)

__all__ = [
    "cached_dataset",
    "entry_hashing",
    "PreprocessedOnce",
    "StackedCache",
    "DeferredBatch",
    "CacheBatchLoader",
    "PlainTensorBatch",
    "stacking_problem",
    "device_index",
]

FILENAME = "filename_or_obj"


def _file_stamps(value: Any, stamps: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for v in value.values():
            _file_stamps(v, stamps)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _file_stamps(v, stamps)
    elif isinstance(value, (str, os.PathLike)):
        try:
            st = os.stat(value)
            if stat.S_ISDIR(st.st_mode):  # a DICOM series: every file in it
                files = [(e.name, e.stat()) for e in os.scandir(value) if e.is_file()]
                stamps[str(value)] = sorted((name, s.st_size, s.st_mtime_ns) for name, s in files)
            else:
                stamps[str(value)] = (st.st_size, st.st_mtime_ns)
        except (OSError, ValueError):  # not a path (a label, a subject id) or not there
            pass


def entry_hashing(entry: Any) -> bytes:
    """``hash_func`` of the bundle's ``PersistentDataset`` stores: the hash of a datalist entry *and* of the files
    it names (size and modification time of each file; of each file in a folder, for a DICOM series).

    MONAI's default (``pickle_hashing``) hashes the entry only, so a scan replaced at the same path (a data set
    generated again, a corrected export) would be served from its stale cache file. With this key it gets a new
    one; an unchanged file keeps its key. Cost: one ``stat`` per file named (a folder listing per series).
    """
    stamps: dict[str, Any] = {}
    _file_stamps(entry, stamps)
    return pickle_hashing({"entry": entry, "files": stamps})


class PreprocessedOnce(Transform):
    """The deterministic ``transform`` of a datalist entry, computed once and kept on disk for every later run.

    A MONAI ``PersistentDataset`` store: the result for an entry is written to ``cache_dir`` as one ``.pt`` file
    named by the hash of the entry, of the files it names (:func:`entry_hashing`) and of the transforms with
    their settings, and read back by any run (any process) that applies the same transforms to the same entry.
    Runs that share a folder (the cells of a study) therefore decode, resample and normalise each scan once per
    preprocessing chain; another grid, intensity mode or projection is another chain, and a scan rewritten at the
    same path another file: other cache files, never stale ones.

    Args:
        transform: deterministic transforms (no random part).
        cache_dir: the shared folder.
    """

    def __init__(self, transform: Callable, cache_dir: str | os.PathLike) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        self.store = PersistentDataset(
            data=[],
            transform=transform,
            cache_dir=cache_dir,
            hash_func=entry_hashing,
            hash_transform=pickle_hashing,
            track_meta=True,  # MetaTensors with their metadata (file names key the teacher-output cache)
            weights_only=False,  # MetaTensors are not plain weights; the files are the study's own
        )

    def __call__(self, data: Mapping) -> Any:
        return self.store._cachecheck(data)


def cached_dataset(
    data: Sequence,
    transform: Callable,
    cache_rate: float = 1.0,
    num_workers: int | None = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    shared_dir: str | os.PathLike | None = None,
) -> CacheDataset | PersistentDataset:
    """The training/validation dataset: preprocessed once, kept in memory or, with ``cache_dir``, on disk.

    Args:
        data: datalist entries.
        transform: the preprocessing (a ``Compose``); its deterministic part is what is cached.
        cache_rate: share of the scans kept in memory (``CacheDataset``); the others are preprocessed every epoch.
        num_workers: threads that fill the in-memory cache.
        cache_dir: when given (non-empty), a ``PersistentDataset`` instead: the deterministic part of the
            preprocessing is written once per scan to this folder (one ``.pt`` file each, about 1 MB per scan at
            64³) and read back every epoch, so the memory needed no longer grows with the number of scans. A file
            name is the hash of the datalist entry, of the files it names and of the deterministic transforms with
            their settings (:func:`entry_hashing`), so runs with another grid, projection or intensity mode, and a
            scan rewritten at the same path, get their own files in the same folder.
        progress: show a progress bar while the in-memory cache fills.
        shared_dir: (in-memory cache only) the deterministic part of the preprocessing of each scan is read from
            this folder when another run already computed it with the same transforms, else computed and written
            there (:class:`PreprocessedOnce`): the cells of a study preprocess each scan once per chain.
    """
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        return PersistentDataset(
            data=data, transform=transform, cache_dir=cache_dir, hash_func=entry_hashing, hash_transform=pickle_hashing
        )
    if shared_dir and isinstance(transform, Compose):
        first = transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
        steps = list(transform.transforms)
        deterministic, rest = (steps, []) if first is None else (steps[:first], steps[first:])
        if deterministic:
            transform = Compose([PreprocessedOnce(Compose(deterministic), shared_dir), *rest])
    return CacheDataset(
        data=data, transform=transform, cache_rate=cache_rate, num_workers=num_workers, progress=progress
    )


def stacking_problem(dataset: Any) -> str | None:
    """Why ``dataset`` cannot be served from a :class:`StackedCache` (``None`` when it can).

    It can when it is a ``CacheDataset`` (not a subclass that replaces items, such as ``SmartCacheDataset``) whose
    every item is cached and whose transform has no random part: then each item is the same tensor every epoch.
    """
    if not isinstance(dataset, CacheDataset) or type(dataset).__name__ in ("SmartCacheDataset", "LMDBDataset"):
        return f"{type(dataset).__name__} is not an in-memory CacheDataset"
    if getattr(dataset, "hash_as_key", False) or getattr(dataset, "runtime_cache", False):
        return "the CacheDataset uses hash keys or a runtime cache"
    if dataset.cache_num < len(dataset):
        return f"only {dataset.cache_num} of {len(dataset)} scans are cached (cache_rate < 1)"
    transform = dataset.transform
    if isinstance(transform, Compose):
        first = transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
        if first is not None:
            return f"the preprocessing has a random (or non-MONAI) transform at position {first}"
    elif transform is not None:
        return "the transform is not a monai.transforms.Compose"
    return None


def device_index(indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """``indices`` as a long tensor on ``device``; to a CUDA device through page-locked memory and a non-blocking
    copy, so that building a batch's index never makes the host wait for the device."""
    index = torch.as_tensor(indices, dtype=torch.long)
    if torch.device(device).type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
    return index


class DeferredBatch(dict):
    """A batch dictionary whose *deferred* keys are gathered only when read.

    ``batch[key]``, ``batch.get(key)`` and ``key in batch`` treat a deferred key as present; its tensor is gathered
    (by ``gather(key)``) on the first read and kept. Iteration, ``len``, ``keys()``, ``items()`` and ``values()``
    list only what has been gathered, so code that walks every key of a batch (moving it to a device, logging its
    size) does not pay for the deferred ones.

    Args:
        data: the gathered part of the batch.
        gather: returns the batch's tensor of a deferred key.
        deferred: the keys ``gather`` serves.
    """

    def __init__(self, data: Mapping, gather: Callable[[Hashable], Any], deferred: Sequence[Hashable]) -> None:
        super().__init__(data)
        self._gather = gather
        self._deferred = frozenset(deferred)

    def __missing__(self, key: Hashable) -> Any:
        if key not in self._deferred:
            raise KeyError(key)
        value = self[key] = self._gather(key)
        return value

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or key in self._deferred

    def get(self, key: Hashable, default: Any = None) -> Any:
        return self[key] if key in self else default

    def gathered(self, key: Hashable) -> bool:
        """Whether ``key``'s tensor has been gathered (``False`` for a deferred key not read yet)."""
        return super().__contains__(key)


class StackedCache(torch.utils.data.Dataset):
    """The items of a filled, deterministic ``CacheDataset`` stacked into one tensor per key on ``device``.

    Every item must have the same keys; per key, tensor values (``MetaTensor`` included) of one shape are stacked to
    ``(N, *shape)``, numbers to an ``(N,)`` tensor, anything else is kept as a list. A batch (``__getitems__``) is
    ``{key: stacked[key][indices]}`` (one ``index_select`` per key), lists are indexed in Python, and for keys whose
    items were ``MetaTensor`` with a file name, ``{key}_meta_dict = {"filename_or_obj": [names]}``.

    The cached items of ``dataset`` are replaced by views of the stack (``MetaTensor`` with their metadata, on
    ``device``), so the preprocessed data are held once; ``dataset[i]`` still works and returns tensors on ``device``.

    Args:
        dataset: a ``CacheDataset`` for which :func:`stacking_problem` returns ``None``.
        device: where the stacked tensors live (the training device, or ``"cpu"``).
        pin_memory: with a host (``"cpu"``) stack and CUDA available, keep the stack and each batch in page-locked
            memory, so that ``prepare_batch(..., non_blocking=True)`` copies it to the GPU asynchronously.
        deferred_keys: stacked keys whose batch tensor is gathered only when read: the batch is then a
            :class:`DeferredBatch` (the distillation trainer's teacher volume, unused once the teacher's outputs
            are cached; keys that are not stacked tensors are ignored).

    Raises:
        ValueError: when the dataset cannot be stacked (the reason is given), or its items differ in keys or shapes.
    """

    def __init__(
        self,
        dataset: CacheDataset,
        device: str | torch.device | None = "cpu",
        pin_memory: bool = False,
        deferred_keys: Sequence[Hashable] = (),
    ) -> None:
        problem = stacking_problem(dataset)
        if problem is not None:
            raise ValueError(f"cannot stack the cache: {problem}.")
        self.device = torch.device(device if device is not None else "cpu")
        self.pin_memory = bool(pin_memory) and self.device.type == "cpu" and torch.cuda.is_available()
        items = [dataset[i] for i in range(len(dataset))]
        if not items:
            raise ValueError("cannot stack the cache of an empty dataset.")
        if not all(isinstance(item, Mapping) for item in items):
            raise ValueError("cannot stack the cache: the items are not dictionaries.")
        keys = list(items[0])
        for i, item in enumerate(items):
            if list(item) != keys:
                raise ValueError(f"cannot stack the cache: item {i} has the keys {list(item)}, item 0 {keys}.")
        self.tensors: dict[Hashable, torch.Tensor] = {}
        self.lists: dict[Hashable, list] = {}
        self.names: dict[Hashable, list[str]] = {}
        for key in keys:
            values = [item[key] for item in items]
            if all(isinstance(v, torch.Tensor) for v in values):
                shapes = {tuple(v.shape) for v in values}
                dtypes = {v.dtype for v in values}
                if len(shapes) > 1 or len(dtypes) > 1:
                    found = sorted(map(str, shapes | dtypes))[:4]
                    raise ValueError(f"cannot stack the cache: {key!r} has several shapes or dtypes {found}.")
                metas = [v.meta for v in values if isinstance(v, MetaTensor)]
                if len(metas) == len(values) and all(m.get(FILENAME) for m in metas):
                    self.names[key] = [str(m[FILENAME]) for m in metas]
                del values
                self.tensors[key] = self._stack_in_place(items, dataset, key, self.device, self.pin_memory)
            elif all(isinstance(v, (bool, int, float)) for v in values):
                self.tensors[key] = torch.as_tensor(values).to(self.device)
            else:
                self.lists[key] = values
        self._length = len(items)
        self.deferred_keys = tuple(k for k in deferred_keys if k in self.tensors)

    @staticmethod
    def _stack_in_place(
        items: list, dataset: CacheDataset, key: Hashable, device: torch.device, pin_memory: bool = False
    ) -> torch.Tensor:
        """Copy ``item[key]`` of every cached item into one ``(N, *shape)`` tensor on ``device``, replacing each
        cached value by its view as it goes, so that at most one item is held twice at any time."""
        first = items[0][key]
        stacked = torch.empty((len(items), *first.shape), dtype=first.dtype, device=device, pin_memory=pin_memory)
        for i, item in enumerate(items):
            value = item[key]
            stacked[i].copy_(_plain(value))
            view = stacked[i]
            if isinstance(value, MetaTensor):
                view = MetaTensor(view, meta=value.meta, applied_operations=value.applied_operations)
            item[key] = view
            if dataset._cache[i] is not item:
                dataset._cache[i][key] = view
            del value
            if i % 64 == 63:
                _release_freed_memory()
        _release_freed_memory()
        return stacked

    def __len__(self) -> int:
        return self._length

    @property
    def nbytes(self) -> int:
        """Bytes held by the stacked tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __getitems__(self, indices: Sequence[int]) -> dict[Hashable, Any]:
        """The batch of ``indices``: stacked tensors indexed on their device, lists and file names indexed (a
        :class:`DeferredBatch` when there are deferred keys).

        On a CUDA stack the index goes through page-locked memory, so its copy does not make the host wait; on a
        pinned host stack the batch is gathered into page-locked memory."""
        index = device_index(indices, self.device)

        def gather(key: Hashable) -> torch.Tensor:
            t = self.tensors[key]
            if not self.pin_memory:
                return t.index_select(0, index)
            out = torch.empty((len(index), *t.shape[1:]), dtype=t.dtype).pin_memory()
            return torch.index_select(t, 0, index, out=out)

        batch: dict[Hashable, Any] = {k: gather(k) for k in self.tensors if k not in self.deferred_keys}
        for key, values in self.lists.items():
            batch[key] = [values[i] for i in indices]
        for key, names in self.names.items():
            batch[PostFix.meta(str(key))] = {FILENAME: [names[i] for i in indices]}
        return DeferredBatch(batch, gather, self.deferred_keys) if self.deferred_keys else batch

    def __getitem__(self, index: int) -> dict[Hashable, Any]:
        """One item (plain tensors, numbers as 0-d tensors), as the single-item form of :meth:`__getitems__`."""
        batch = self.__getitems__([index])
        batch.update({k: batch[k] for k in self.deferred_keys})
        return {
            k: v[0] if isinstance(v, (torch.Tensor, list)) else {n: m[0] for n, m in v.items()}
            for k, v in batch.items()
        }


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Give the memory of freed cached items back to the operating system (glibc ``malloc_trim``), so that the
    host memory of a stacked cache stays about one copy of the data; a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _plain(value: torch.Tensor) -> torch.Tensor:
    return value.as_tensor() if isinstance(value, MetaTensor) else value


def _collated(batch: Any) -> Any:
    """``collate_fn`` of a :class:`StackedCache` loader: its ``__getitems__`` already returns the batch."""
    return batch


class CacheBatchLoader(DataLoader):
    """MONAI ``DataLoader`` that gathers each batch from a :class:`StackedCache` of ``dataset`` when it can.

    With ``stack=True`` and a dataset that :func:`stacking_problem` accepts, the cached items are stacked on
    ``device`` once (when the loader is built) and each batch is one ``index_select`` per key, in the main process
    (``num_workers`` is then not used). The batch indices come from the usual ``DataLoader`` machinery (``sampler``,
    ``shuffle``, ``batch_size``, ``drop_last``, ``generator``), so a run draws the same random numbers and sees the
    scans in the same order as with MONAI's ``DataLoader``, also under a ``DistributedSampler``.

    Otherwise (``stack=False``, a ``PersistentDataset``, random transforms, ``cache_rate < 1``) it is MONAI's
    ``DataLoader`` over ``dataset`` with ``num_workers`` workers and ``list_data_collate``; a requested stacking
    that is not possible for a ``CacheDataset`` is reported with a ``UserWarning`` naming the reason.

    Args:
        dataset: the training or validation dataset (typically from :func:`cached_dataset`).
        batch_size: scans per batch.
        device: where the stacked cache lives (the training device; ``None`` or ``"cpu"``: host memory).
        stack: batch from a stacked cache when possible (the fast path).
        num_workers: worker processes of the plain path.
        pin_memory: page-locked batches for asynchronous copies to the GPU (a host stack: see
            :class:`StackedCache`; the plain path: the ``DataLoader`` option).
        deferred_keys: keys of the stacked path gathered only when read (see :class:`StackedCache`).
        kwargs: other ``DataLoader`` arguments (``sampler``, ``shuffle``, ``drop_last``...).

    Attributes:
        stacked: the :class:`StackedCache`, or ``None`` on the plain path.
        source: the dataset given (``self.dataset`` is the stacked cache on the fast path).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        device: str | torch.device | None = None,
        stack: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        deferred_keys: Sequence[Hashable] = (),
        **kwargs: Any,
    ) -> None:
        from scripts.options import parse_bool

        self.source = dataset
        self.stacked: StackedCache | None = None
        if parse_bool(stack, "stacked_cache"):
            problem = stacking_problem(dataset)
            if problem is None:
                pin = parse_bool(pin_memory, "pin_memory")
                self.stacked = StackedCache(dataset, device, pin_memory=pin, deferred_keys=deferred_keys)
            elif isinstance(dataset, CacheDataset):  # a disk cache or a plain Dataset is a choice, not a surprise
                logger.warning(f"batches are collated item by item: {problem}.")
        if self.stacked is not None:
            kwargs.pop("collate_fn", None)
            super().__init__(self.stacked, batch_size=batch_size, num_workers=0, collate_fn=_collated, **kwargs)
        else:
            pin = bool(pin_memory) and torch.cuda.is_available()
            super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin, **kwargs)


class PlainTensorBatch(PrepareBatch):
    """``prepare_batch`` returning plain ``torch.Tensor`` image and label batches (``MetaTensor`` metadata dropped).

    MONAI's default (``monai.engines.default_prepare_batch``) hands the collated ``MetaTensor`` to the network, so
    every operation of the forward and backward passes goes through ``MetaTensor.__torch_function__``, the autograd
    graph keeps ``MetaTensor`` activations, and the prediction is decollated with its metadata. Only the returned
    ``(image, label)`` change: the batch dictionary is untouched, so handlers that read file names from
    ``engine.state.batch`` and the distillation engine (which reads the scan names of its teacher input) work as
    before.

    Args:
        enabled: ``False`` returns the ``default_prepare_batch`` result unchanged, so that a config flag can switch
            the option.
    """

    def __init__(self, enabled: bool = True) -> None:
        from scripts.options import parse_bool

        self.enabled = parse_bool(enabled, "plain_tensor_batch")

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(image, label)`` of ``batchdata`` on ``device``; ``label`` is ``None`` when the batch has none."""
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if self.enabled and isinstance(image, MetaTensor):
            image = image.as_tensor()
        if self.enabled and isinstance(label, MetaTensor):
            label = label.as_tensor()
        return image, label
