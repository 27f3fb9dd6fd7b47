# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The trainer's hot loop: the same losses, metrics and best checkpoint as MONAI's decollating path, and no
host-device synchronising call (``item``, ``float``, ``tolist``...) in an iteration that does not log."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ROCAUC, ConfusionMatrix, ValidationHandler, from_engine
from monai.transforms import Activationsd, AsDiscreted, Compose, CopyItemsd
from scripts.engine import LeanTrainer, LossLog, loss_logged, loss_terms
from torch import nn

CONFIGS = BUNDLE_ROOT / "configs"
SYNC_CALLS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__")


def _data(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.rand(1, 8, 8, 8, generator=g) + 0.2 * (i % 2), "label": torch.tensor(i % 2)} for i in range(n)
    ]


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))


def _config(*ids: str):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train_teacher.json"))
    parser["device"] = "cpu"
    return [parser.get_parsed_content(i) for i in ids]


def _old_metrics() -> tuple[dict, dict]:
    """The validation metrics as MONAI's handlers computed them on the decollated output (the former configs)."""
    from ignite.metrics import Accuracy, Fbeta

    pl, oh = from_engine(["pred", "label"]), from_engine(["pred", "label_onehot"])
    ooh = from_engine(["pred_onehot", "label_onehot"])
    key = {"val_f1_macro": Fbeta(beta=1.0, average=True, output_transform=pl)}
    extra = {
        "val_accuracy": Accuracy(output_transform=pl),
        "val_auc": ROCAUC(output_transform=oh),
        "val_sensitivity": ConfusionMatrix(include_background=False, metric_name="sensitivity", output_transform=ooh),
        "val_specificity": ConfusionMatrix(include_background=False, metric_name="specificity", output_transform=ooh),
    }
    return key, extra


def _run(lean: bool, epochs: int = 4) -> dict:
    from ignite.metrics import Accuracy
    from monai.data import DataLoader

    network = _network()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.2)
    val_loader = DataLoader(_data(10, seed=2), batch_size=4)
    if lean:
        train_post, val_post, key, extra, train_metric = _config(
            "train#postprocessing",
            "validate#postprocessing",
            "validate#key_metric",
            "validate#additional_metrics",
            "train#key_metric",
        )
        extra = {k: m for k, m in extra.items() if k != "val_auc_ce"}  # no former metric (tests/test_metrics.py)
    else:
        train_post = Activationsd(keys="pred", softmax=True)
        val_post = Compose(
            [
                Activationsd(keys="pred", softmax=True),
                CopyItemsd(keys=["pred", "label"], names=["pred_onehot", "label_onehot"]),
                AsDiscreted(keys=["pred_onehot", "label_onehot"], argmax=[True, False], to_onehot=2),
            ]
        )
        key, extra = _old_metrics()
        train_metric = {"train_accuracy": Accuracy(output_transform=from_engine(["pred", "label"]))}
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=val_loader,
        network=network,
        postprocessing=val_post,
        key_val_metric=key,
        additional_metrics=extra,
        decollate=not lean,
    )
    best = {"score": -1.0, "epoch": 0, "state": None}

    def keep_best(engine):  # what MONAI's CheckpointSaver(save_key_metric=True) keeps
        score = engine.state.metrics["val_f1_macro"]
        if score > best["score"]:
            best.update(
                score=score, epoch=engine.state.epoch, state={k: v.clone() for k, v in network.state_dict().items()}
            )

    evaluator.add_event_handler(Events.EPOCH_COMPLETED, keep_best)
    args = dict(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=DataLoader(_data(12, seed=1), batch_size=4, shuffle=False),
        network=network,
        optimizer=optimizer,
        loss_function=nn.CrossEntropyLoss(),
        postprocessing=train_post,
        key_train_metric=train_metric,
        train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True)],
    )
    trainer = LeanTrainer(log_interval=1, **args) if lean else SupervisedTrainer(**args)
    losses, metrics = [], []
    if lean:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(event_filter=loss_logged),
            lambda e: losses.append(loss_terms(e.state.output)["train_loss"]),
        )
    else:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: losses.append(loss_terms(e.state.output)["train_loss"])
        )
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: metrics.append(dict(e.state.metrics)))
    trainer.run()
    return {
        "losses": losses,
        "metrics": metrics,
        "best": best,
        "train_accuracy": trainer.state.metrics["train_accuracy"],
    }


def test_lean_loop_gives_the_losses_metrics_and_best_checkpoint_of_the_decollating_one():
    old, new = _run(lean=False), _run(lean=True)
    assert len(new["losses"]) == len(old["losses"]) == 12
    assert new["losses"] == pytest.approx(old["losses"], rel=1e-6)
    assert new["train_accuracy"] == pytest.approx(old["train_accuracy"])
    assert len(new["metrics"]) == len(old["metrics"]) == 4
    for got, want in zip(new["metrics"], old["metrics"]):
        assert set(got) == set(want)
        for name in want:
            assert got[name] == pytest.approx(want[name], nan_ok=True), name
    assert len({m["val_f1_macro"] for m in old["metrics"]}) > 1  # the metric moved: the comparison is not trivial
    assert new["best"]["epoch"] == old["best"]["epoch"]
    assert all(torch.allclose(new["best"]["state"][k], v) for k, v in old["best"]["state"].items())


def test_config_postprocessing_is_activationsd_softmax_as_a_plain_tensor():
    """Both engines' postprocessing of the config gives ``Activationsd(softmax=True)``'s values over the class
    dimension of a batch, as a plain tensor (a MetaTensor would slow every later metric operation)."""
    from monai.data import MetaTensor

    logits = MetaTensor(torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 4.0]]))
    want = Activationsd(keys="pred", softmax=True, dim=1)({"pred": logits.clone()})["pred"].as_tensor()
    for post in _config("train#postprocessing", "validate#postprocessing"):
        got = post({"pred": logits.clone(), "label": torch.tensor([0, 1, 1])})
        assert type(got["pred"]) is torch.Tensor and torch.equal(got["label"], torch.tensor([0, 1, 1]))
        assert torch.allclose(got["pred"], want, atol=0, rtol=1e-6)


def test_loss_log_averages_between_readings_and_reads_every_epoch_end():
    values = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])

    class State:
        iteration, epoch_length, output = 0, 5, None

    class FakeEngine:
        state = State()

    log, engine, seen = LossLog(interval=2), FakeEngine(), []
    for _ in range(7):
        engine.state.iteration += 1
        engine.state.output = {"loss": torch.tensor(next(values)), "loss_ce": torch.tensor(1.0)}
        log(engine)
        seen.append(loss_terms(engine.state.output)["train_loss"] if loss_logged(engine) else None)
    # read at 2, 4, 5 (epoch end), 6: the mean since the previous reading
    assert seen == [None, 1.5, None, 3.5, 5.0, 6.0, None]
    with pytest.raises(ValueError, match="log interval"):
        LossLog(0)


def test_loss_log_takes_terms_given_as_numbers_and_starts_again_when_the_terms_change():
    class State:
        iteration, epoch_length, output = 0, 100, None

    class FakeEngine:
        state = State()

    log, engine = LossLog(interval=2), FakeEngine()
    outputs = [
        {"loss": torch.tensor(1.0), "loss_ce": 0.5},  # a term as a number
        {"loss": torch.tensor([3.0]), "loss_ce": torch.tensor(1.5, dtype=torch.float64)},  # shape (1,), float64
        {"loss": torch.tensor(5.0), "loss_ce": torch.tensor(9.0)},
        {"loss": torch.tensor(5.0), "loss_fg": torch.tensor(2.0)},  # another term: the unread iteration is dropped
        {"loss": torch.tensor(7.0), "loss_fg": torch.tensor(4.0)},
        {"loss": torch.tensor(9.0), "loss_fg": torch.tensor(6.0)},
    ]
    logged = []
    for output in outputs:
        engine.state.iteration += 1
        engine.state.output = output
        log(engine)
        logged.append(loss_terms(output) if loss_logged(engine) else None)
    assert logged[:2] == [None, {"train_loss": 2.0, "loss_ce": 1.0}] and logged[2] is None and logged[4] is None
    assert logged[3] == {"train_loss": 5.0, "loss_fg": 2.0} and logged[5] == {"train_loss": 8.0, "loss_fg": 5.0}


def _host_by_design(frame) -> bool:
    """PyTorch's optimizers read their step counter with ``item()``; it lives on the host (``capturable=False``),
    so that read never waits for the device."""
    return "torch/optim/" in frame.f_code.co_filename.replace(os.sep, "/")


@contextlib.contextmanager
def _counting_sync_calls():
    """Count the Python-level calls that wait for the device (``item``, ``float()``, ``tolist``...)."""
    counts = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_CALLS}

    def counted(original):
        def call(self, *args, **kwargs):
            if not _host_by_design(sys._getframe(1)):
                counts["n"] += 1
            return original(self, *args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _per_iteration_sync_calls(trainer) -> dict[str, list[int]]:
    """Synchronising calls between consecutive ``ITERATION_COMPLETED`` of one epoch (the whole iteration: batch,
    step, postprocessing, metrics, handlers), split by whether the loss was read on the later one."""
    found = {"quiet": [], "logged": []}
    last = {}

    def mark(engine):
        counts = last["counts"]
        if engine.state.iteration % engine.state.epoch_length != 1:
            found["logged" if loss_logged(engine) else "quiet"].append(counts["n"] - last["n"])
        last["n"] = counts["n"]

    trainer.add_event_handler(Events.ITERATION_COMPLETED, mark)
    return found, last


def _workflow(config: str, root: Path, dataset: Path, **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / config),
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(dataset),
        spatial_size=[16, 16, 16],
        **{"batch_size": 4, "progress_bar": True, "num_workers": 0, **override},
    )
    wf.initialize()
    return wf


def _count(wf: ConfigWorkflow) -> dict[str, list[int]]:
    trainer = wf.parser.get_parsed_content("train#trainer")
    found, last = _per_iteration_sync_calls(trainer)
    with _counting_sync_calls() as counts:
        last.update(counts=counts, n=0)
        wf.run()
    wf.finalize()
    return found


@pytest.mark.parametrize("config", ["train_teacher.json", "distill.json"])
def test_no_synchronising_call_in_an_iteration_of_the_bundle_trainers(config, tiny_phantom_dataset, tmp_path):
    dataset = tiny_phantom_dataset.parent
    override = {}
    if config == "distill.json":  # a teacher first (one epoch, validated, published to models/teacher.pt)
        _workflow("train_teacher.json", tmp_path, dataset, max_epochs=1, progress_bar=False).run()
        override = {"teacher_ckpt": str(tmp_path / "models" / "teacher.pt")}
        assert Path(override["teacher_ckpt"]).is_file()
    wf = _workflow(
        config, tmp_path, dataset, max_epochs=3, val_interval=2, log_interval=100, run_name="counted", **override
    )
    found = _count(wf)
    assert found["quiet"] and found["logged"]
    assert max(found["quiet"]) == 0, found  # no synchronising call per iteration
    assert max(found["logged"]) <= 1, found  # one tolist() where the loss is read (epoch ends)
