"""jax_impl.optim (LARS, Adam with L2, the schedule) against numpy hand computations in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from jax_impl.optim import build_optimizer, set_lr
from shared.config import make_config
from tests import references

LRS = (0.5, 0.3, 0.1)  # a different learning rate at each of the 3 steps


def start(seed=0):
    """Parameters with a 4-D kernel, a 2-D kernel, a bias (1-D: excluded) and an all-zero kernel."""
    rng = np.random.default_rng(seed)
    return {"conv": rng.normal(size=(3, 3, 2, 4)), "dense": {"kernel": rng.normal(size=(5, 4)),
            "bias": rng.normal(size=4)}, "zero": np.zeros((3, 2))}


def run_optax(cfg, params, grads_per_step):
    """3 steps of build_optimizer(cfg) in float64, the lr set before each step as train.py does."""
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, params)
        optimizer = build_optimizer(cfg)
        state = optimizer.init(params)
        step = jax.jit(lambda p, s, g, lr: optimizer.update(g, set_lr(s, lr), p))
        for lr, grads in zip(LRS, grads_per_step):
            updates, state = step(params, state, jax.tree.map(jnp.asarray, grads), lr)
            params = optax.apply_updates(params, updates)
        return jax.tree.map(np.asarray, params), state


def grads_for(params, steps=3, seed=1):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(steps)]


def test_lars_three_steps_match_numpy():
    cfg = make_config({"optimizer": "lars", "wd": 1e-2, "momentum": 0.9, "lars_eta": 0.02})
    params = start()
    grads = grads_for(params)
    got, state = run_optax(cfg, params, grads)
    ref, mu = jax.tree.map(np.copy, params), jax.tree.map(np.zeros_like, params)
    pairs = {"is_leaf": lambda x: isinstance(x, tuple)}
    for lr, g in zip(LRS, grads):
        stepped = jax.tree.map(lambda p, g, m, lr=lr: references.lars_step(p, g, m, lr, 1e-2, 0.9,
                                                                           0.02), ref, g, mu)
        ref = jax.tree.map(lambda pair: pair[0], stepped, **pairs)
        mu = jax.tree.map(lambda pair: pair[1], stepped, **pairs)
    for path_value, expected in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(path_value, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(state.inner_state[0].mu["conv"]), mu["conv"], rtol=1e-12)
    assert not np.array_equal(got["zero"], params["zero"])  # ||p|| = 0 still moves (q = 1)


def test_adam_coupled_l2_three_steps_match_numpy_and_torch():
    cfg = make_config({"preset": "homework", "wd": 0.1})
    params = start(2)
    grads = grads_for(params, seed=3)
    got, _ = run_optax(cfg, params, grads)
    # torch.optim.Adam(weight_decay): g' = g + wd p; m = b1 m + (1 - b1) g';
    # v = b2 v + (1 - b2) g'^2; p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    ref = jax.tree.map(np.copy, params)
    m = jax.tree.map(np.zeros_like, params)
    v = jax.tree.map(np.zeros_like, params)
    for t, (lr, g) in enumerate(zip(LRS, grads), start=1):
        g = jax.tree.map(lambda g, p: g + 0.1 * p, g, ref)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g ** 2, v, g)
        ref = jax.tree.map(lambda p, m, v, lr=lr, t=t: p - lr * (m / (1 - 0.9 ** t)) /
                           (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8), ref, m, v)
    tensors = [torch.tensor(p, requires_grad=True) for p in jax.tree.leaves(params)]
    adam = torch.optim.Adam(tensors, lr=0.0, weight_decay=0.1)
    for lr, g in zip(LRS, grads):
        for tensor, grad in zip(tensors, jax.tree.leaves(g)):
            tensor.grad = torch.tensor(grad)
        adam.param_groups[0]["lr"] = lr
        adam.step()
    for value, expected, tensor in zip(jax.tree.leaves(got), jax.tree.leaves(ref), tensors):
        np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(value, tensor.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_set_lr_replaces_only_the_learning_rate():
    optimizer = build_optimizer(make_config({"preset": "homework"}))
    state = optimizer.init({"w": jnp.ones((2, 2))})
    new = jax.jit(set_lr)(state, 0.25)
    assert float(new.hyperparams["learning_rate"]) == 0.25
    assert new.hyperparams["learning_rate"].dtype == jnp.float32
    assert jax.tree.structure(new) == jax.tree.structure(state)
