# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
import copy

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.transforms import Activationsd
from scripts.engine import DistillationTrainer, TeacherOutputCache, load_teacher, loss_terms
from scripts.errors import InputError, MissingFileError
from scripts.losses import DistillationLoss
from scripts.networks import Student2D, Teacher3D


def _data(n=6):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        vol = MetaTensor(torch.rand(1, 16, 16, 16, generator=g), meta={"filename_or_obj": f"scan{i}.nii.gz"})
        items.append({"image": vol[:, :, :, 6:9].permute(3, 1, 2, 0)[..., 0].clone(), "image_3d": vol, "label": i % 2})
    for item in items:  # the 2D input keeps the scan's file name, as the projection transforms do
        item["image"] = MetaTensor(
            item["image"].as_tensor(), meta={"filename_or_obj": item["image_3d"].meta["filename_or_obj"]}
        )
    return items


@pytest.fixture()
def teacher_file(tmp_path):
    torch.manual_seed(0)
    teacher = Teacher3D("resnet10")
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    return path


def _trainer(teacher_file, kd=True, cache=True, epochs=2, seed=0):
    torch.manual_seed(seed)
    student = Student2D("resnet18", in_channels=3, fusion="joint")
    loader = DataLoader(_data(), batch_size=3, shuffle=False)
    return DistillationTrainer(
        teacher=Teacher3D("resnet10") if kd else None,
        teacher_checkpoint=teacher_file,
        kd_enabled=kd,
        cache_teacher_outputs=cache,
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.01),
        loss_function=DistillationLoss(fg_weight=5.0, lg_weight=5.0),
        postprocessing=Activationsd(keys="pred", softmax=True, dim=1),
    )


def test_every_iteration_event_fires_and_terms_are_logged(teacher_file):
    trainer = _trainer(teacher_file, epochs=1)
    events = (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    )
    fired = dict.fromkeys(events, 0)
    for event in events:
        trainer.add_event_handler(event, lambda e, ev=event: fired.__setitem__(ev, fired[ev] + 1))
    terms = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: terms.append(loss_terms(e.state.output)))
    trainer.run()
    assert all(count == 2 for count in fired.values()), fired
    assert set(terms[0]) == {"train_loss", "loss_ce", "loss_fg", "loss_lg", "loss_decor"}
    assert terms[0]["loss_fg"] > 0 and terms[0]["loss_lg"] > 0
    # postprocessing ran on the batch output (probabilities sum to one per scan)
    assert torch.allclose(trainer.state.output["pred"].sum(dim=1), torch.ones(3))


def test_teacher_is_frozen_in_eval_mode_and_unchanged(teacher_file):
    trainer = _trainer(teacher_file)
    before = copy.deepcopy(trainer.teacher.state_dict())  # includes BN running statistics
    student_before = copy.deepcopy(trainer.network.state_dict())
    trainer.run()
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    after = trainer.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(student_before[k], v) for k, v in trainer.network.state_dict().items())


def test_teacher_cache_computes_each_scan_once_and_changes_nothing(teacher_file):
    cached = _trainer(teacher_file, cache=True)
    calls = []
    cached.teacher.head.register_forward_hook(lambda *a: calls.append(1))
    cached.run()
    assert len(calls) == 2  # first epoch: 2 batches; second epoch served from the cache
    assert len(cached.teacher_cache) == 6 and cached.teacher_cache.hits == 6
    uncached = _trainer(teacher_file, cache=False)
    uncached.run()
    for a, b in zip(cached.network.parameters(), uncached.network.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_teacher_cache_returns_the_rows_of_the_keys_in_their_order():
    cache = TeacherOutputCache()
    logits, embeddings = torch.arange(10.0).view(5, 2), torch.arange(15.0).view(5, 3)
    cache.put(["a", "b"], logits[:2], embeddings[:2])
    assert cache.get(["a", "c"]) is None and cache.get([]) is None  # a key never seen: a miss
    cache.put(["c", "d", "e"], logits[2:], embeddings[2:])
    got_logits, got_embeddings = cache.get(["e", "a", "c", "a"])
    assert torch.equal(got_logits, logits[[4, 0, 2, 0]]) and torch.equal(got_embeddings, embeddings[[4, 0, 2, 0]])
    cache.put(["a"], -logits[:1], -embeddings[:1])  # written again: the new outputs
    got_logits, _ = cache.get(["b", "a"])
    assert torch.equal(got_logits, torch.stack([logits[1], -logits[0]]))
    assert len(cache) == 5 and cache.hits == 6 and cache.misses == 6


def test_kd_gradient_reaches_the_classifying_weights(teacher_file):
    # with CE switched off, the only gradient comes from the distillation terms; it must move the student
    trainer = _trainer(teacher_file, epochs=1)
    trainer.distillation_loss = DistillationLoss(cls_weight=0.0, fg_weight=1.0, lg_weight=0.0)
    before = copy.deepcopy(trainer.network.encoder.state_dict())
    trainer.run()
    assert any(not torch.equal(before[k], v) for k, v in trainer.network.encoder.state_dict().items())


def test_kd_off_needs_no_teacher_and_matches_plain_training(tmp_path):
    trainer = _trainer(tmp_path / "missing.pt", kd=False, epochs=1)
    assert trainer.teacher is None
    trainer.run()
    torch.manual_seed(0)
    student = Student2D("resnet18", in_channels=3, fusion="joint")
    plain = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(_data(), batch_size=3, shuffle=False),
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.01),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    plain.run()
    for a, b in zip(trainer.network.parameters(), student.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_missing_or_mismatched_teacher_checkpoint_is_reported(tmp_path, teacher_file):
    with pytest.raises(MissingFileError, match=r"missing.pt not found.*configs/train_teacher.json"):
        _trainer(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="does not match the teacher definition"):
        load_teacher(Teacher3D("resnet18"), teacher_file)
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(InputError, match="could not be read"):
        load_teacher(Teacher3D("resnet10"), bad)
