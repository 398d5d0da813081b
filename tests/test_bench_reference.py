"""The reference loop's clock-driven one-cycle schedule is PyTorch's OneCycleLR."""

import pytest
import torch

from bench.reference import one_cycle


def test_one_cycle_follows_pytorch_one_cycle_lr():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    steps = 200
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=steps + 1)
    for step in range(steps + 1):
        lr, beta1 = one_cycle(step / steps, 1e-3)
        assert lr == pytest.approx(optimizer.param_groups[0]["lr"], rel=0.02, abs=1e-8)
        assert beta1 == pytest.approx(optimizer.param_groups[0]["betas"][0], abs=2e-3)
        optimizer.step()
        if step < steps:
            schedule.step()


def test_one_cycle_holds_its_floor_past_the_end():
    assert one_cycle(1.5, 1e-3) == one_cycle(1.0, 1e-3)
