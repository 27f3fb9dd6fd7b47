# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The warm-up cosine schedule with halving restarts and the reference override that uses it."""

import math

import pytest
import torch
from conftest import BUNDLE_ROOT
from scripts.schedulers import WarmupCosineRestarts


def _lrs(steps, **kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=kwargs.pop("floor", 0.0))
    sched = WarmupCosineRestarts(opt, **kwargs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_reference_schedule_warms_up_linearly_then_anneals_and_halves_every_cycle():
    lrs = _lrs(60, T_0=20, T_up=10, eta_max=0.01, gamma=0.5)
    for step, lr in enumerate(lrs):
        c, tau = divmod(step, 20)
        peak = 0.01 * 0.5**c
        expected = peak * tau / 10 if tau < 10 else peak * (1 + math.cos(math.pi * (tau - 10) / 10)) / 2
        assert lr == pytest.approx(expected, abs=1e-12), step
    assert lrs[0] == lrs[20] == lrs[40] == 0.0 and lrs[10] == pytest.approx(0.01) and lrs[30] == pytest.approx(0.005)


def test_cycles_grow_with_t_mult_and_the_floor_is_the_optimisers_lr():
    lrs = _lrs(40, T_0=4, T_mult=2, T_up=1, eta_max=1.0, gamma=1.0, floor=0.1)
    starts = [0, 4, 12, 28]  # cycle lengths 4, 8, 16
    assert all(lrs[s] == pytest.approx(0.1) for s in starts)
    assert all(lrs[s + 1] == pytest.approx(1.0) for s in starts)
    assert min(lrs) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"T_0": 0}, "T_0"),
        ({"T_0": 5, "T_up": 5}, "T_up"),
        ({"T_0": 5, "gamma": 0.0}, "gamma"),
        ({"T_0": 5, "eta_max": 0.0}, "eta_max"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    with pytest.raises(ValueError, match=message):
        WarmupCosineRestarts(opt, **kwargs)


@pytest.mark.parametrize("config", ["train_teacher.json", "distill.json"])
def test_reference_override_sets_the_reference_recipe(config, monkeypatch):
    from monai.bundle import ConfigParser

    monkeypatch.chdir(BUNDLE_ROOT)
    parser = ConfigParser()
    parser.read_config([f"configs/{config}", "configs/reference.json"])
    parser.update({"spatial_size": [16, 16, 16]})
    assert parser.get_parsed_content("batch_size") == 64
    optimizer = parser.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.RAdam) and optimizer.param_groups[0]["lr"] == 0.0
    scheduler = parser.get_parsed_content("lr_scheduler")
    assert isinstance(scheduler, WarmupCosineRestarts) and (scheduler.T_0, scheduler.T_up) == (20, 10)
    handler = parser.get_parsed_content("train#handlers#1")
    assert type(handler).__name__ == "LrScheduleHandler" and handler.epoch_level is False  # stepped per iteration
    if config == "distill.json":
        assert parser.get_parsed_content("loss").decor_weight == 1.0
        projection = parser.get_parsed_content("projection_transform")
        parser["projection"] = "dynamic_image"
        projection = parser.get_parsed_content("projection_transform", lazy=False)
        assert projection.transform.transform.variant == "reference"
