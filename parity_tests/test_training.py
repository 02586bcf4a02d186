"""Groups 5 and 6: optimizer steps (LARS, Adam; warmup and cosine), and a 20-step trajectory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.model import build_model
from jax_impl.optim import build_optimizer as jax_build_optimizer
from jax_impl.step import TrainState, make_train_step
from parity_tests.compare import as_numpy
from parity_tests.conftest import DTYPES, jax_precision
from parity_tests.kinks import (
    branch_taken,
    float32_reach,
    jax_relu_inputs,
    kink_allowance,
    relu_inputs,
)
from parity_tests.models import inert_under_batchnorm, jax_twin, nchw, torch_named, torch_vicreg
from shared.augment import view_params
from shared.config import make_config
from shared.data import CIFAR10_MEAN, CIFAR10_STD
from shared.loader import epoch_batches, steps_per_epoch
from shared.schedule import Plan, lr_at
from torch_impl.optim import build_optimizer as torch_build_optimizer
from torch_impl.step import TrainState as TorchTrainState
from torch_impl.step import train_step as torch_train_step

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
    model = build_model(cfg.arch, WIDTH, MLP, dtype=jnp.dtype(dtype))
    return jax_optimizer, make_train_step(cfg, model=model, optimizer=jax_optimizer)


@functools.cache
def jax_relu_capture(arch: str, dtype: str):
    """jit(capture)(params, batch_stats, x) -> the module outputs of one train-mode forward of the
    flax model of `arch` in `dtype` (the inputs of its ReLUs: kinks.jax_relu_inputs)."""
    model = build_model(arch, WIDTH, MLP, dtype=jnp.dtype(dtype))

    def capture(params, batch_stats, x):
        _, collections = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                     train=True, mutable=["batch_stats", "intermediates"],
                                     capture_intermediates=True)
        return collections["intermediates"]

    return jax.jit(capture)


def train_images() -> np.ndarray:
    """uint8 [80, 32, 32, 3]: smooth random images (so crops and flips change them)."""
    rng = np.random.default_rng(11)
    coarse = rng.integers(0, 256, (NUM_IMAGES, 8, 8, 3)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.uint8)


class TorchRun:
    """torch_impl's model and optimizer in `dtype` from torch_vicreg(seed); with `derivative`, its
    ReLUs take that derivative at the kinks float32 could cross (kinks.branch_taken)."""

    def __init__(self, optimizer: str, dtype: str, seed: int, derivative: float | None = None):
        self.cfg, self.dtype, self.derivative = config(optimizer), dtype, derivative
        self.model = torch_vicreg(self.cfg.arch, WIDTH, MLP, dtype, seed).train()
        self.optimizer = torch_build_optimizer(self.cfg, model=self.model)

    def step(self, x_a: np.ndarray, x_b: np.ndarray, lr: float,
             reach: float | None = None) -> tuple[dict, list]:
        """One train step: (its terms as numpy values, the ReLU inputs of its forwards)."""
        with relu_inputs(self.model) as inputs, branch_taken(
                self.model, reach if self.derivative is not None else None, self.derivative or 0):
            _, terms = torch_train_step(TorchTrainState(self.model, self.optimizer),
                                        nchw(x_a, self.dtype), nchw(x_b, self.dtype), lr,
                                        cfg=self.cfg, dtype=None)
        return {k: as_numpy(v) for k, v in terms.items()}, inputs

    def weights(self) -> dict[str, np.ndarray]:
        return {k: as_numpy(v) for k, v in self.model.state_dict().items()}

    def optimizer_state(self) -> dict[str, dict[str, np.ndarray]]:
        """{moment name ("mu", or "exp_avg"/"exp_avg_sq"): {param name: array}}."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        moments: dict[str, dict] = {}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                if key != "step":
                    moments.setdefault(key, {})[names[id(p)]] = as_numpy(value)
        return moments

    def steps_taken(self) -> set[int]:
        return {int(s["step"]) for s in self.optimizer.state.values()}


class JaxRun:
    """jax_impl's train state and jitted step in `dtype`, converted from torch_vicreg(seed)."""

    def __init__(self, optimizer: str, dtype: str, seed: int):
        self.cfg, self.dtype = config(optimizer), dtype
        torch_model = torch_vicreg(self.cfg.arch, WIDTH, MLP, dtype, seed)
        with jax_precision(dtype):
            _, variables = jax_twin(torch_model, self.cfg.arch, WIDTH, MLP, dtype)
            jax_optimizer, self.jax_step = jax_optimizer_and_step(optimizer, dtype)
            self.state = TrainState(variables["params"], variables["batch_stats"],
                                    jax_optimizer.init(variables["params"]))

    def step(self, x_a: np.ndarray, x_b: np.ndarray, lr: float) -> tuple[dict, list]:
        """One train step: (its terms as numpy values, the ReLU inputs of its forwards)."""
        with jax_precision(self.dtype):
            views = [x.astype(self.dtype) for x in (x_a, x_b)]
            capture = jax_relu_capture(self.cfg.arch, self.dtype)
            inputs = [x for view in views for x in jax_relu_inputs(
                capture(self.state.params, self.state.batch_stats, view))]
            self.state, terms = self.jax_step(self.state, *views, lr)
            return {k: np.asarray(v) for k, v in terms.items()}, inputs

    def weights(self) -> dict[str, np.ndarray]:
        return torch_named({"params": self.state.params, "batch_stats": self.state.batch_stats})

    def optimizer_state(self) -> dict[str, dict[str, np.ndarray]]:
        """As TorchRun.optimizer_state, by torch's names."""
        inner = self.state.opt_state.inner_state
        if self.cfg.optimizer == "lars":
            moments = {"mu": inner[0].mu}
        else:
            adam = inner[1]
            moments = {"exp_avg": adam.mu, "exp_avg_sq": adam.nu}
        return {k: torch_named({"params": v}) for k, v in moments.items()}

    def steps_taken(self) -> set[int]:
        return {int(self.state.opt_state.inner_state[1].count)}


class Runs:
    """The same training in torch and jax, float64 and float32, plus torch in float64 taking the
    other branch at every kink float32 could cross ("on", "off"): see kinks.py."""

    def __init__(self, optimizer: str, seed: int):
        self.optimizer = optimizer
        self.torch = {dtype: TorchRun(optimizer, dtype, seed) for dtype in DTYPES}
        self.jax = {dtype: JaxRun(optimizer, dtype, seed) for dtype in DTYPES}
        self.branches = {name: TorchRun(optimizer, "float64", seed, derivative)
                         for name, derivative in (("on", 1.0), ("off", 0.0))}

    def step(self, x_a: np.ndarray, x_b: np.ndarray, lr: float) -> dict[str, tuple[dict, dict]]:
        """One step of every run on the same float32 inputs: {dtype: (torch terms, jax terms)}."""
        terms, inputs = {}, {}
        for dtype in DTYPES:
            torch_terms, torch_inputs = self.torch[dtype].step(x_a, x_b, lr)
            jax_terms, jax_inputs = self.jax[dtype].step(x_a, x_b, lr)
            terms[dtype], inputs[dtype] = (torch_terms, jax_terms), (torch_inputs, jax_inputs)
        # each framework's float32 rounding moves its own ReLU inputs; either may cross a kink
        reach = max(float32_reach(inputs["float32"][side], inputs["float64"][side])
                    for side in range(2))
        self.branch_losses = {name: run.step(x_a, x_b, lr, reach)[0]["loss"]
                              for name, run in self.branches.items()}
        return terms

    def check_terms(self, parity, group: str, label: str, terms: dict) -> float:
        """The step's loss (computed before the step's update, so continuous in the inputs only
        at the first step: later ones follow weights that kinks moved); returns the float32
        difference."""
        (t64, j64), (t32, j32) = terms["float64"], terms["float32"]
        on, off = self.branch_losses["on"], self.branch_losses["off"]
        return parity.check(group, f"{label} loss", t64["loss"], j64["loss"], t32["loss"],
                            j32["loss"], kink_allowance=kink_allowance(t64["loss"], on, off))[1]


def check_weights(parity, group: str, label: str, runs: Runs, lr_sum: float) -> float:
    """All parameters and BN statistics; returns the largest float32 difference.

    lr_sum: the learning rates of the steps taken so far. Under Adam the inert biases (see
    models.inert_under_batchnorm) take steps of up to lr in directions set by rounding noise, so
    for them only that bound is checked: the two sides lie within 2 * lr_sum of each other.
    """
    t64, j64 = runs.torch["float64"].weights(), runs.jax["float64"].weights()
    t32, j32 = runs.torch["float32"].weights(), runs.jax["float32"].weights()
    on, off = (run.weights() for run in runs.branches.values())
    largest = 0.0
    for key, value in t64.items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(j64[key]) == int(t32[key]) == int(j32[key]), key
        elif runs.optimizer == "adam" and inert_under_batchnorm(key):
            for dtype, t, j in (("float64", t64, j64), ("float32", t32, j32)):
                gap = float(np.abs(t[key] - j[key]).max())
                assert gap <= 2 * lr_sum * (1 + 1e-3), (f"{label} {key} ({dtype}): "
                                                        f"{gap} > 2 * {lr_sum}")
        else:
            _, rel32 = parity.check(group, f"{label} {key}", value, j64[key], t32[key], j32[key],
                                    kink_allowance=kink_allowance(value, on[key], off[key]))
            largest = max(largest, rel32)
    return largest


def check_moments(parity, label: str, runs: Runs) -> None:
    """The optimizer's per-parameter state (LARS momentum; Adam's two moments), matched by name;
    an inert bias's moments are noise, compared against the moment's scale over the model."""
    t64, j64 = runs.torch["float64"].optimizer_state(), runs.jax["float64"].optimizer_state()
    t32, j32 = runs.torch["float32"].optimizer_state(), runs.jax["float32"].optimizer_state()
    on, off = (run.optimizer_state() for run in runs.branches.values())
    assert set(t64) == set(j64) == set(t32) == set(j32)
    for moment, tensors in t64.items():
        model_scale = max(float(np.abs(v).max()) for v in tensors.values())
        assert set(tensors) == set(j64[moment])
        for name, value in tensors.items():
            scale = model_scale if inert_under_batchnorm(name) else 0.0
            parity.check("optimizer_step", f"{label} {moment} of {name}", value,
                         j64[moment][name], t32[moment][name], j32[moment][name], scale=scale,
                         kink_allowance=kink_allowance(value, on[moment][name],
                                                       off[moment][name], scale))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("phase", ["warmup", "cosine"])
def test_optimizer_step_updates_params_and_state_alike(optimizer, phase, parity):
    cfg = config(optimizer)
    per_epoch = steps_per_epoch(NUM_IMAGES, BATCH)
    first = WARMUP_STEP if phase == "warmup" else COSINE_STEP
    lrs = [lr_at(first + i, Plan(cfg.epochs, per_epoch), cfg) for i in range(2)]
    warmup_steps = cfg.warmup_epochs * per_epoch
    assert (lrs[1] < cfg.peak_lr()) if phase == "warmup" else (first >= warmup_steps)
    runs = Runs(optimizer, seed=21)
    rng = np.random.default_rng(22)
    # Two steps, so the second one starts from a non-zero momentum / moment state.
    for i, lr in enumerate(lrs):
        x_a, x_b = (rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32) for _ in range(2))
        terms = runs.step(x_a, x_b, lr)
        label = f"{optimizer} {phase} step {first + i} (lr {lr:.3g})"
        runs.check_terms(parity, "optimizer_step", label, terms)
        check_weights(parity, "optimizer_step", label, runs, sum(lrs[:i + 1]))
        check_moments(parity, label, runs)
    if optimizer == "adam":
        for run in (*runs.torch.values(), *runs.jax.values()):
            assert run.steps_taken() == {2}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_twenty_training_steps_on_the_loader_batches_stay_together(optimizer, parity, capsys):
    cfg = config(optimizer)
    images = train_images()
    params = view_params(cfg, CIFAR10_MEAN, CIFAR10_STD)
    per_epoch = steps_per_epoch(len(images), cfg.batch_size)
    runs = Runs(optimizer, seed=31)
    drift, lr_sum = [], 0.0
    for epoch in range(cfg.epochs):
        for batch in epoch_batches(images, params, batch_size=cfg.batch_size, seed=cfg.seed,
                                   epoch=epoch, workers=2):
            step = epoch * per_epoch + batch.step
            lr = lr_at(step, Plan(cfg.epochs, per_epoch), cfg)
            lr_sum += lr
            terms = runs.step(batch.view_a, batch.view_b, lr)
            label = f"{optimizer} step {step + 1}"
            loss_rel = runs.check_terms(parity, "trajectory", label, terms)
            weights_rel = check_weights(parity, "trajectory_weights", label, runs, lr_sum)
            drift.append((step + 1, float(terms["float32"][0]["loss"]), loss_rel, weights_rel))
    assert len(drift) == 20
    with capsys.disabled():
        print(f"\n{optimizer} float32: step, torch loss, rel. diff of loss, of weights (largest)")
        for step, loss, loss_rel, weights_rel in drift[::5] + drift[-1:]:
            print(f"  {step:>2} {loss:10.5f} {loss_rel:9.2e} {weights_rel:9.2e}")
