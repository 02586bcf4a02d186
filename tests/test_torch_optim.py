"""LARS and the learning-rate schedule against hand computations in float64 numpy."""
import math

import numpy as np
import pytest
import torch

from shared.config import make_config
from shared.schedule import Plan, lr_at
from tests import references
from torch_impl.model import VICReg
from torch_impl.optim import LARS, build_optimizer


def test_lars_three_steps_match_numpy():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(5, 4))
    bias = rng.normal(size=4)
    zero = np.zeros((3, 2))  # ||p|| = 0: trust ratio falls back to 1
    params = [torch.tensor(x, requires_grad=True) for x in (weight, bias, zero)]
    opt = LARS(params, lr=0.0, weight_decay=1e-2, momentum=0.9, eta=0.02)
    ref = [(weight.copy(), np.zeros_like(weight)), (bias.copy(), np.zeros_like(bias)),
           (zero.copy(), np.zeros_like(zero))]
    for lr in (0.5, 0.3, 0.1):
        grads = [rng.normal(size=x.shape) for x in (weight, bias, zero)]
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ref = [references.lars_step(p, g, mu, lr, 1e-2, 0.9, 0.02)
               for (p, mu), g in zip(ref, grads)]
    for p, (ref_p, ref_mu) in zip(params, ref):
        np.testing.assert_allclose(p.detach().numpy(), ref_p, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(opt.state[p]["mu"].numpy(), ref_mu, rtol=1e-12, atol=1e-14)


def test_warmup_cosine_schedule_by_hand():
    cfg = make_config({"epochs": 10, "warmup_epochs": 2.0, "batch_size": 512, "base_lr": 0.3})
    per_epoch = 100
    peak = 0.3 * 512 / 256
    plan = Plan(cfg.epochs, per_epoch)
    assert lr_at(0, plan, cfg) == 0.0
    assert lr_at(100, plan, cfg) == pytest.approx(peak * 100 / 200)
    assert lr_at(200, plan, cfg) == pytest.approx(peak)
    q = 0.5 * (1 + math.cos(math.pi * 400 / 800))
    assert lr_at(600, plan, cfg) == pytest.approx(peak * q + peak * 0.001 * (1 - q))
    assert lr_at(1000, plan, cfg) == pytest.approx(peak * 0.001)


def test_per_epoch_cosine_of_the_homework_preset():
    cfg = make_config({"preset": "homework"})
    assert cfg.peak_lr() == 2e-4
    plan = Plan(cfg.epochs, 50)
    assert lr_at(0, plan, cfg) == pytest.approx(2e-4)
    assert lr_at(49, plan, cfg) == pytest.approx(2e-4)  # constant within an epoch
    assert lr_at(50 * 50, plan, cfg) == pytest.approx(
        2e-4 * 0.5 * (1 + math.cos(math.pi * 50 / 100)))


def test_build_optimizer_picks_lars_or_adam():
    model = VICReg("resnet18", 4, [8, 8])
    assert isinstance(build_optimizer(make_config({}), model=model), LARS)
    adam = build_optimizer(make_config({"preset": "homework"}), model=model)
    assert isinstance(adam, torch.optim.Adam)
    assert adam.param_groups[0]["weight_decay"] == 1e-6
