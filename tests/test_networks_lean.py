# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Joint fusion in evaluation: the channels through the shared encoder as one batch give the serial outputs."""

from __future__ import annotations

import pytest
import torch
from scripts.networks import Student2D


@pytest.mark.parametrize("fusion", ["joint", "mean"])
@pytest.mark.parametrize("batch", [1, 3])
def test_batched_shared_encoder_equals_one_call_per_channel(fusion, batch, single_thread):
    torch.manual_seed(0)
    student = Student2D("resnet18", in_channels=3, fusion=fusion)
    student.train()
    student(torch.rand(4, 3, 32, 32))  # running statistics away from their initial values
    student.eval()
    x = torch.rand(batch, 3, 32, 32)
    encoder = student.encoder
    calls = []
    handle = encoder.encoder.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    with torch.no_grad():
        logits, embedding = student.forward_with_embedding(x)
        assert calls == [3 * batch]  # one call of the shared encoder
        encoder.batched = False
        serial_logits, serial_embedding = student.forward_with_embedding(x)
        assert calls[1:] == [batch] * 3  # one call per channel
    handle.remove()
    assert torch.allclose(embedding, serial_embedding, atol=1e-5, rtol=1e-5)
    assert torch.allclose(logits, serial_logits, atol=1e-5, rtol=1e-5)


def test_training_keeps_one_call_per_channel():
    torch.manual_seed(0)
    student = Student2D("resnet18", in_channels=3, fusion="joint").train()
    calls = []
    student.encoder.encoder.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    student(torch.rand(2, 3, 32, 32))
    assert calls == [2, 2, 2]  # batch normalisation keeps each channel's own batch statistics
