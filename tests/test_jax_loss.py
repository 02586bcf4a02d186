"""jax_impl.loss against an independent float64 numpy computation of the VICReg formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_impl.loss import vicreg_loss
from shared.errors import UserError
from tests import references
from torch_impl.loss import vicreg_loss as torch_vicreg_loss


def sample(n, d, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)) * rng.uniform(0.1, 2.0, size=d)  # some columns below std 1
    return a, a + 0.3 * rng.normal(size=(n, d))


@pytest.mark.parametrize("variant", references.VARIANTS)
@pytest.mark.parametrize("n,d", [(2, 1), (3, 7), (16, 64), (128, 32)])
def test_float64_matches_numpy(variant, n, d):
    a, b = sample(n, d, n * 100 + d)
    sim, std, cov = 3.0, 7.0, 0.5
    with jax.enable_x64(True):
        loss_fn = jax.jit(functools.partial(vicreg_loss, sim_coeff=sim, std_coeff=std,
                                            cov_coeff=cov, variant=variant))
        loss, terms = loss_fn(jnp.asarray(a), jnp.asarray(b))
        assert loss.dtype == jnp.float64
        got = [float(terms[k]) for k in ("invariance", "variance", "covariance")]
        total = float(loss)
    inv, var, cv = references.vicreg_terms(a, b, 1e-4, variant)
    np.testing.assert_allclose(got, [inv, var, cv], rtol=1e-12, atol=1e-14)
    assert total == pytest.approx(sim * inv + std * var + cov * cv, rel=1e-12)


@pytest.mark.parametrize("variant", references.VARIANTS)
def test_float32_jitted_matches_numpy(variant):
    a, b = sample(64, 48, 7)
    loss_fn = jax.jit(functools.partial(vicreg_loss, variant=variant))
    loss, terms = loss_fn(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    assert loss.dtype == jnp.float32
    inv, var, cv = references.vicreg_terms(a.astype(np.float32), b.astype(np.float32), 1e-4,
                                           variant)
    np.testing.assert_allclose([terms["invariance"], terms["variance"], terms["covariance"]],
                               [inv, var, cv], rtol=2e-5, atol=1e-6)
    assert float(loss) == pytest.approx(25 * inv + 25 * var + cv, rel=2e-5)


def test_default_coefficients_and_hinge_by_hand():
    # Constant columns: std = sqrt(0 + 1e-4) = 0.01, so v = 0.99 per branch (summed 1.98, halved
    # 0.99), no covariance, and every entry differs by 1: loss = 25 * 1 + 25 * 1.98 + 0.
    loss, terms = vicreg_loss(jnp.zeros((8, 4)), jnp.ones((8, 4)))
    assert float(terms["variance"]) == pytest.approx(1.98, abs=1e-6)
    assert float(terms["covariance"]) == 0.0
    assert float(loss) == pytest.approx(25 + 25 * 1.98, rel=1e-6)
    loss, terms = vicreg_loss(jnp.zeros((8, 4)), jnp.ones((8, 4)), variant="official")
    assert float(loss) == pytest.approx(25 + 25 * 0.99, rel=1e-6)


def test_gradient_matches_torch_autograd():
    a, b = sample(6, 3, 1)
    with jax.enable_x64(True):
        ga, gb = jax.grad(lambda x, y: vicreg_loss(x, y)[0], argnums=(0, 1))(jnp.asarray(a),
                                                                             jnp.asarray(b))
        ga, gb = np.asarray(ga), np.asarray(gb)
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    torch_vicreg_loss(ta, tb)[0].backward()
    np.testing.assert_allclose(ga, ta.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_errors_are_raised_while_tracing():
    loss_fn = jax.jit(vicreg_loss, static_argnames="variant")
    with pytest.raises(UserError, match="at least 2"):
        loss_fn(jnp.zeros((1, 4)), jnp.zeros((1, 4)))
    with pytest.raises(UserError, match="one shape"):
        loss_fn(jnp.zeros((4, 3)), jnp.zeros((4, 2)))
    with pytest.raises(UserError, match="unknown loss variant"):
        loss_fn(jnp.zeros((4, 3)), jnp.zeros((4, 3)), variant="nope")


def test_the_default_is_solo_learns_loss_with_the_papers_coefficients():
    a, b = sample(32, 16, 5)
    with jax.enable_x64(True):
        loss, _ = jax.jit(vicreg_loss)(jnp.asarray(a), jnp.asarray(b))
        assert float(loss) == pytest.approx(references.solo_learn_vicreg_loss(a, b), rel=1e-12)
