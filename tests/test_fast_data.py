# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The training data path's fast path: stacked cache, batches by index, plain tensors, disk cache; and the same
losses and metrics through the configs with the fast path on and off."""

from __future__ import annotations

import pytest
import torch
from conftest import BUNDLE_ROOT
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data import CacheDataset, MetaTensor, PersistentDataset
from monai.transforms import Compose, EnsureTyped, Lambdad, RandFlipd
from monai.utils import set_determinism
from scripts.fast_data import CacheBatchLoader, DeferredBatch, PlainTensorBatch, StackedCache, cached_dataset
from torch.utils.data import DistributedSampler

N = 7


def _items(n: int = N) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        volume = MetaTensor(torch.rand(1, 6, 6, 6, generator=g), meta={"filename_or_obj": f"scan{i}.nii.gz"})
        items.append({"image": volume, "image_3d": volume.clone(), "label": i % 2, "subject": f"sub-{i}"})
    return items


def _dataset(transform=None, **kwargs) -> CacheDataset:
    transform = transform or Compose([EnsureTyped(keys="image", track_meta=True)])
    return CacheDataset(_items(), transform=transform, progress=False, **kwargs)


def _epochs(loader, epochs: int = 2) -> list[dict]:
    return [batch for _ in range(epochs) for batch in loader]


def test_stacked_batches_hold_the_same_scans_in_the_same_order_as_monai_collation():
    set_determinism(seed=3)
    plain = _epochs(CacheBatchLoader(_dataset(), batch_size=3, stack=False, shuffle=True))
    set_determinism(seed=3)
    loader = CacheBatchLoader(_dataset(), batch_size=3, stack=True, shuffle=True)
    stacked = _epochs(loader)
    assert loader.stacked is not None and [len(b["label"]) for b in stacked] == [3, 3, 1, 3, 3, 1]
    for p, s in zip(plain, stacked):
        assert type(s["image"]) is torch.Tensor and isinstance(p["image"], MetaTensor)
        assert torch.equal(s["image"], p["image"].as_tensor()) and torch.equal(s["image_3d"], p["image_3d"].as_tensor())
        assert torch.equal(s["label"], p["label"]) and s["label"].dtype == p["label"].dtype
        assert s["subject"] == p["subject"]
        assert s["image_meta_dict"]["filename_or_obj"] == list(p["image"].meta["filename_or_obj"])
        assert s["image_3d_meta_dict"]["filename_or_obj"] == list(p["image_3d"].meta["filename_or_obj"])
    set_determinism(seed=None)


def test_the_cache_holds_the_data_once_as_views_of_the_stack():
    dataset = _dataset()
    stacked = StackedCache(dataset, "cpu")
    assert stacked.nbytes == N * (2 * 6**3 * 4 + 8)
    item = dataset[2]
    assert isinstance(item["image"], MetaTensor) and item["image"].meta["filename_or_obj"] == "scan2.nii.gz"
    assert item["image"].untyped_storage().data_ptr() == stacked.tensors["image"].untyped_storage().data_ptr()
    single = stacked[2]
    assert torch.equal(single["image"], item["image"].as_tensor()) and single["subject"] == "sub-2"


def test_a_deferred_key_is_gathered_only_when_read_and_then_equals_the_eager_batch():
    eager = StackedCache(_dataset(), "cpu")
    lazy = StackedCache(_dataset(), "cpu", deferred_keys=["image_3d", "not-a-key"])
    assert lazy.deferred_keys == ("image_3d",)
    batch = lazy.__getitems__([4, 1])
    assert isinstance(batch, DeferredBatch) and "image_3d" in batch and not batch.gathered("image_3d")
    assert "image_3d" not in list(batch) and batch["image_3d_meta_dict"]["filename_or_obj"] == [
        "scan4.nii.gz",
        "scan1.nii.gz",
    ]
    with pytest.raises(KeyError):
        batch["missing"]
    assert batch.get("missing", 7) == 7
    expected = eager.__getitems__([4, 1])
    assert torch.equal(batch.get("image_3d"), expected["image_3d"]) and batch.gathered("image_3d")
    assert set(batch) == set(expected) and batch["image_3d"] is batch["image_3d"]  # gathered once, then kept
    assert set(lazy[3]) == set(eager[3]) and torch.equal(lazy[3]["image_3d"], eager[3]["image_3d"])


def test_distributed_shards_cover_the_set_once():
    dataset = _dataset()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = CacheBatchLoader(dataset if rank == 0 else _dataset(), batch_size=2, sampler=sampler)
        assert loader.stacked is not None
        seen += [name for batch in loader for name in batch["image_meta_dict"]["filename_or_obj"]]
    assert sorted(set(seen)) == sorted(f"scan{i}.nii.gz" for i in range(N)) and len(seen) == N + 1  # padded


@pytest.mark.parametrize(
    "dataset, reason",
    [
        (lambda: _dataset(Compose([EnsureTyped(keys="image"), RandFlipd(keys="image", prob=0.5)])), "random"),
        (lambda: _dataset(cache_rate=0.5), "cache_rate"),
        (lambda: _dataset(Compose([Lambdad(keys="label", func=int)])), None),
    ],
    ids=["random-transform", "partial-cache", "deterministic"],
)
def test_stacking_falls_back_to_monai_collation_with_the_reason(dataset, reason, caplog):
    if reason is None:
        assert CacheBatchLoader(dataset(), batch_size=4).stacked is not None
        return
    with caplog.at_level("WARNING", logger="scripts.fast_data"):
        loader = CacheBatchLoader(dataset(), batch_size=4)
    assert any(reason in r.getMessage() for r in caplog.records)  # logged (stdout in the CLI), not a stderr warning
    assert loader.stacked is None and sum(len(b["label"]) for b in loader) == N
    with pytest.raises(ValueError, match=reason):
        StackedCache(loader.source)


def test_disk_cache_is_a_persistent_dataset_keyed_by_entry_and_transform(tmp_path):
    import numpy as np
    from conftest import write_nifti
    from scripts.transforms import LoadScand

    volumes = np.random.default_rng(0).random((2, 9, 9, 9))
    entries = [{"image": str(write_nifti(tmp_path / f"s{i}.nii.gz", volumes[i])), "label": i} for i in (0, 1)]
    first = cached_dataset(
        entries, Compose([LoadScand(keys="image", allow_nonstandard=True)]), cache_dir=tmp_path / "cache"
    )
    assert isinstance(first, PersistentDataset) and [first[i]["image"].shape for i in (0, 1)] == [(1, 9, 9, 9)] * 2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    other = Compose([LoadScand(keys="image", allow_nonstandard=True), EnsureTyped(keys="image", dtype=torch.float16)])
    assert cached_dataset(entries, other, cache_dir=tmp_path / "cache")[0]["image"].dtype == torch.float16
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3  # the other preprocessing has its own files
    assert isinstance(cached_dataset(entries, Compose([LoadScand(keys="image", allow_nonstandard=True)])), CacheDataset)


@pytest.mark.parametrize("store", ["cache_dir", "shared_dir"])
def test_a_scan_rewritten_at_the_same_path_is_not_served_from_its_stale_cache_file(tmp_path, store):
    """Both disk stores (a training run's ``--cache_dir``, a study's shared volumes) key a scan by its file too:
    the same path with new content (a data set generated again) is read again; an unchanged file is not."""
    import os

    import numpy as np
    from conftest import write_nifti
    from scripts.transforms import LoadScand

    path = tmp_path / "scan.nii.gz"
    entries = [{"image": str(write_nifti(path, np.zeros((9, 9, 9)))), "label": 0}]

    def first_voxel() -> float:  # a run: its transforms built afresh, as a config builds them
        load = Compose([LoadScand(keys="image", allow_nonstandard=True)])
        return float(cached_dataset(entries, load, **{store: tmp_path / "store"})[0]["image"].reshape(-1)[0])

    assert first_voxel() == 0.0 and first_voxel() == 0.0
    assert len(list((tmp_path / "store").glob("*.pt"))) == 1  # read back, not written again
    stamp = os.stat(path).st_mtime_ns
    write_nifti(path, np.ones((9, 9, 9)))
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # a later modification time, whatever the file system's clock
    assert first_voxel() == 1.0
    assert len(list((tmp_path / "store").glob("*.pt"))) == 2


def test_plain_tensor_batch_strips_metadata_but_not_values():
    image = MetaTensor(torch.arange(8.0).reshape(2, 1, 2, 2), meta={"filename_or_obj": ["a", "b"]})
    batch = {"image": image, "label": torch.tensor([0, 1]), "image_3d": image}
    x, y = PlainTensorBatch()(batch, torch.device("cpu"))
    assert type(x) is torch.Tensor and type(y) is torch.Tensor
    assert torch.equal(x, torch.arange(8.0).reshape(2, 1, 2, 2)) and torch.equal(y, torch.tensor([0, 1]))
    assert isinstance(batch["image_3d"], MetaTensor)  # the batch itself is untouched
    x, _ = PlainTensorBatch(enabled=False)(batch, torch.device("cpu"))
    assert isinstance(x, MetaTensor) and x.meta["filename_or_obj"] == ["a", "b"]  # MONAI's default behaviour


def _train(config: str, root, dataset_dir, fast: bool, **override) -> tuple[list[float], dict, object]:
    """Build the config's trainer (validation on the training split too), run it; its losses and metrics."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / config))
    import os

    cwd = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    try:
        parser.resolve_macro_and_relative_ids()
    finally:
        os.chdir(cwd)
    parser.update(
        {
            "bundle_root": str(root),
            "dataset_dir": str(dataset_dir),
            "spatial_size": [32, 32, 32],
            "batch_size": 6,
            "progress_bar": False,
            "stacked_cache": fast,
            "plain_tensor_batch": fast,
            "channels_last": False,  # the layout changes the convolution kernels (rounding), not the data path
            "run_name": f"{config}-{fast}",
            **override,
        }
    )
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    parser.get_parsed_content("validate#early_stop").set_trainer(trainer)
    assert (trainer.data_loader.stacked is not None) == fast
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    return losses, dict(parser.get_parsed_content("validate#evaluator").state.metrics), trainer


def test_fast_path_gives_the_same_losses_and_metrics_as_the_plain_path(tiny_phantom_dataset, tmp_path, single_thread):
    """Teacher training, then distillation with the teacher-output cache, with and without the fast data path
    (CPU: no mixed precision, and one weight layout, so the two paths compute the same numbers in the same order)."""
    data = tiny_phantom_dataset.parent
    runs = {fast: _train("train_teacher.json", tmp_path, data, fast, max_epochs=1) for fast in (False, True)}
    assert len(runs[True][0]) == len(runs[False][0]) > 1
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5, abs=1e-6)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-5, abs=1e-6)
    assert set(runs[True][1]) >= {"val_f1_macro", "val_auc", "val_accuracy"}
    runs = {fast: _train("distill.json", tmp_path, data, fast, max_epochs=2) for fast in (False, True)}
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5, abs=1e-6)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-5, abs=1e-6)
    cache = runs[True][2].teacher_cache  # keyed from the plain batches' file names: every scan hits in epoch 2
    assert cache.misses == cache.hits == len(runs[True][2].data_loader.dataset)
    last = runs[True][2].state.batch  # an epoch served from the cache never gathered the teacher's volume
    assert isinstance(last, DeferredBatch) and "image_3d" in last and not last.gathered("image_3d")
