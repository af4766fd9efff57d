"""The learning-rate schedules equal transformers' (same factors step by step) without importing it."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from neuroada_cli.training.parts import SCHEDULERS, make_optimizer


@pytest.mark.parametrize("schedule", SCHEDULERS)
@pytest.mark.parametrize("total, warmup_ratio", [(50, 0.06), (7, 0.0), (3, 0.5)])
def test_schedule_equals_transformers(schedule, total, warmup_ratio):
    from transformers import get_scheduler

    model = torch.nn.Linear(4, 3)
    options = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                                "scheduler": schedule, "warmup_ratio": warmup_ratio})
    optimizer, ours = make_optimizer(model, options, total)
    reference_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warmup = ours.lr_lambdas[0].keywords["warmup"]
    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    theirs = get_scheduler(name, reference_optimizer, num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(total + 2):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-12, abs=1e-15)
        optimizer.step(); ours.step(); reference_optimizer.step(); theirs.step()
