"""Groups 5 and 6: optimizer steps (LARS, Adam; warmup and cosine), and a 20-step trajectory."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_impl.optim import build_optimizer as jax_build_optimizer
from jax_impl.model import build_model
from jax_impl.train import TrainState, make_train_step
from parity_tests.models import inert_under_batchnorm, jax_twin, nchw, torch_named, torch_vicreg
from shared.config import make_config
from shared.data import CIFAR10_MEAN, CIFAR10_STD
from shared.loader import epoch_batches, steps_per_epoch
from shared.schedule import lr_at
from torch_impl.optim import build_optimizer as torch_build_optimizer, set_lr
from torch_impl.train import train_step as torch_train_step

WIDTH, MLP = 4, [32, 16]
# 80 images in batches of 16: 5 steps an epoch, 4 epochs = 20 steps, warmup over the first 5.
NUM_IMAGES, BATCH, EPOCHS = 80, 16, 4
OPTIMIZERS = {
    "lars": dict(optimizer="lars", base_lr=0.3, wd=1e-4),  # lr scaled by 16/256 as the recipe's
    "adam": dict(optimizer="adam", base_lr=1e-3, lr_scaling=False, wd=1e-6),
}
WARMUP_STEP, COSINE_STEP = 2, 12


def config(optimizer: str):
    return make_config({"preset": "smoke", "width": WIDTH, "mlp": "32-16", "batch_size": BATCH,
                        "epochs": EPOCHS, "warmup_epochs": 1.0, "subset": 0,
                        **OPTIMIZERS[optimizer]})


@functools.cache
def jax_optimizer_and_step(optimizer: str, dtype: str):
    """(optax optimizer, jitted train step) for config(optimizer) in `dtype`, built once: XLA takes
    about 20 s to compile the step and about 0.2 s to run it, so the tests share one compilation."""
    cfg = config(optimizer)
    jax_optimizer = jax_build_optimizer(cfg)
    model = build_model(cfg.arch, WIDTH, MLP, jnp.dtype(dtype))
    return jax_optimizer, make_train_step(model, jax_optimizer, cfg)


def train_images() -> np.ndarray:
    """uint8 [80, 32, 32, 3]: smooth random images (so crops and flips change them)."""
    rng = np.random.default_rng(11)
    coarse = rng.integers(0, 256, (NUM_IMAGES, 8, 8, 3)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.uint8)


class Twins:
    """A torch model + optimizer and the JAX train state + jitted step, from the same weights."""

    def __init__(self, optimizer: str, dtype: str, seed: int):
        self.cfg, self.dtype = config(optimizer), dtype
        self.torch_model = torch_vicreg(self.cfg.arch, WIDTH, MLP, dtype, seed).train()
        self.torch_optimizer = torch_build_optimizer(self.torch_model, self.cfg)
        _, variables = jax_twin(self.torch_model, self.cfg.arch, WIDTH, MLP, dtype)
        jax_optimizer, self.jax_step = jax_optimizer_and_step(optimizer, dtype)
        self.state = TrainState(variables["params"], variables["batch_stats"],
                                jax_optimizer.init(variables["params"]))

    def step(self, x_a: np.ndarray, x_b: np.ndarray, lr: float) -> tuple[dict, dict]:
        """One step on both sides; returns (torch terms, jax terms)."""
        set_lr(self.torch_optimizer, lr)
        t_terms = torch_train_step(self.torch_model, self.torch_optimizer, nchw(x_a, self.dtype),
                                   nchw(x_b, self.dtype), self.cfg, None)
        self.state, j_terms = self.jax_step(self.state, x_a.astype(self.dtype),
                                            x_b.astype(self.dtype), lr)
        return t_terms, j_terms

    def jax_weights(self) -> dict[str, np.ndarray]:
        return torch_named({"params": self.state.params, "batch_stats": self.state.batch_stats})

    def jax_optimizer_state(self) -> dict[str, dict[str, np.ndarray]]:
        """{torch moment name ("mu", or "exp_avg"/"exp_avg_sq"): {param name: array}}."""
        inner = self.state.opt_state.inner_state
        if self.cfg.optimizer == "lars":
            moments = {"mu": inner[0].mu}
        else:
            adam = inner[1]
            moments = {"exp_avg": adam.mu, "exp_avg_sq": adam.nu}
        return {k: torch_named({"params": v}) for k, v in moments.items()}

    def torch_optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        names = {id(p): n for n, p in self.torch_model.named_parameters()}
        moments: dict[str, dict] = {}
        for p, state in self.torch_optimizer.state.items():
            for key, value in state.items():
                if key != "step":
                    moments.setdefault(key, {})[names[id(p)]] = value
        return moments


def check_weights(parity, group: str, dtype: str, label: str, twins: Twins,
                  lr_sum: float) -> float:
    """All parameters and BN statistics; returns the largest relative difference.

    lr_sum: the learning rates of the steps taken so far. Under Adam the inert biases (see
    models.inert_under_batchnorm) take steps of up to lr in directions set by rounding noise, so
    for them only that bound is checked: the two sides lie within 2 * lr_sum of each other.
    """
    jax_weights = twins.jax_weights()
    largest = 0.0
    for key, value in twins.torch_model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(jax_weights[key]), key
        elif twins.cfg.optimizer == "adam" and inert_under_batchnorm(key):
            gap = float(np.abs(value.numpy() - jax_weights[key]).max())
            assert gap <= 2 * lr_sum * (1 + 1e-3), f"{label} {key}: {gap} > 2 * {lr_sum}"
        else:
            largest = max(largest, parity.check(group, dtype, f"{label} {key}", value,
                                                jax_weights[key]))
    return largest


def check_moments(parity, dtype: str, label: str, twins: Twins) -> None:
    """The optimizer's per-parameter state (LARS momentum; Adam's two moments), matched by name;
    an inert bias's moments are noise, compared against the moment's scale over the model."""
    jax_moments = twins.jax_optimizer_state()
    torch_moments = twins.torch_optimizer_state()
    assert set(torch_moments) == set(jax_moments)
    for moment, tensors in torch_moments.items():
        model_scale = max(float(v.abs().max()) for v in tensors.values())
        assert set(tensors) == set(jax_moments[moment])
        for name, value in tensors.items():
            parity.check("optimizer_step", dtype, f"{label} {moment} of {name}", value,
                         jax_moments[moment][name],
                         scale=model_scale if inert_under_batchnorm(name) else 0.0)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("phase", ["warmup", "cosine"])
def test_optimizer_step_updates_params_and_state_alike(optimizer, phase, dtype, parity):
    cfg = config(optimizer)
    per_epoch = steps_per_epoch(NUM_IMAGES, BATCH)
    first = WARMUP_STEP if phase == "warmup" else COSINE_STEP
    lrs = [lr_at(first + i, per_epoch, cfg) for i in range(2)]
    warmup_steps = cfg.warmup_epochs * per_epoch
    assert (lrs[1] < cfg.peak_lr()) if phase == "warmup" else (first >= warmup_steps)
    twins = Twins(optimizer, dtype, seed=21)
    rng = np.random.default_rng(22)
    # Two steps, so the second one starts from a non-zero momentum / moment state.
    for i, lr in enumerate(lrs):
        x_a, x_b = (rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32) for _ in range(2))
        t_terms, j_terms = twins.step(x_a, x_b, lr)
        label = f"{optimizer} {phase} step {first + i} (lr {lr:.3g})"
        parity.check("optimizer_step", dtype, f"{label} loss", t_terms["loss"], j_terms["loss"])
        check_weights(parity, "optimizer_step", dtype, label, twins, sum(lrs[:i + 1]))
        check_moments(parity, dtype, label, twins)
    if optimizer == "adam":
        steps = {int(s["step"]) for s in twins.torch_optimizer.state.values()}
        assert steps == {2} == {int(twins.state.opt_state.inner_state[1].count)}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_twenty_training_steps_on_the_loader_batches_stay_together(optimizer, dtype, parity,
                                                                   capsys):
    cfg = config(optimizer)
    images = train_images()
    params = cfg.augment_params(CIFAR10_MEAN, CIFAR10_STD)
    per_epoch = steps_per_epoch(len(images), cfg.batch_size)
    twins = Twins(optimizer, dtype, seed=31)
    drift, lr_sum = [], 0.0
    for epoch in range(cfg.epochs):
        for batch in epoch_batches(images, params, cfg.batch_size, cfg.seed, epoch, workers=2):
            step = epoch * per_epoch + batch.step
            lr = lr_at(step, per_epoch, cfg)
            lr_sum += lr
            t_terms, j_terms = twins.step(batch.view_a, batch.view_b, lr)
            label = f"{optimizer} step {step + 1}"
            loss_rel = parity.check("trajectory", dtype, f"{label} loss", t_terms["loss"],
                                    j_terms["loss"])
            weights_rel = check_weights(parity, "trajectory_weights", dtype, label, twins, lr_sum)
            drift.append((step + 1, float(t_terms["loss"]), loss_rel, weights_rel))
    assert len(drift) == 20
    with capsys.disabled():
        print(f"\n{optimizer} {dtype}: step, torch loss, rel. diff of loss, of weights (largest)")
        for step, loss, loss_rel, weights_rel in drift[::5] + drift[-1:]:
            print(f"  {step:>2} {loss:10.5f} {loss_rel:9.2e} {weights_rel:9.2e}")
