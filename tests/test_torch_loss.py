"""torch_impl.loss against an independent float64 numpy computation of the VICReg formulas."""
import numpy as np
import pytest
import torch

from shared.errors import UserError
from tests import references
from torch_impl.loss import vicreg_loss


@pytest.mark.parametrize("variant", references.VARIANTS)
@pytest.mark.parametrize("n,d", [(2, 1), (3, 7), (16, 64), (64, 16), (128, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_matches_numpy(variant, n, d, dtype):
    rng = np.random.default_rng(n * 1000 + d)
    scale = rng.uniform(0.1, 2.0, size=d)  # some columns below std 1 so the hinge is active
    a = rng.normal(size=(n, d)) * scale
    b = a + 0.3 * rng.normal(size=(n, d))
    sim, std, cov = rng.uniform(0.5, 30, size=3)
    loss, terms = vicreg_loss(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype),
                              sim_coeff=sim, std_coeff=std, cov_coeff=cov, variant=variant)
    ref = references.vicreg_loss(a, b, sim, std, cov, 1e-4, variant)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    got = [loss.item(), terms["invariance"].item(), terms["variance"].item(),
           terms["covariance"].item()]
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol)


def test_constant_column_hits_the_variance_hinge():
    a = np.zeros((8, 4))
    b = np.ones((8, 4))
    _, terms = vicreg_loss(torch.tensor(a), torch.tensor(b))
    # std = sqrt(0 + 1e-4) = 0.01 per column, so v = 0.99 per branch: 1.98 summed, 0.99 halved
    assert terms["variance"].item() == pytest.approx(1.98, abs=1e-12)
    _, terms = vicreg_loss(torch.tensor(a), torch.tensor(b), variant="official")
    assert terms["variance"].item() == pytest.approx(0.99, abs=1e-12)
    assert terms["covariance"].item() == 0.0
    assert terms["invariance"].item() == pytest.approx(1.0)


def test_the_default_is_solo_learns_loss_with_the_papers_coefficients():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 16)) * rng.uniform(0.1, 2.0, size=16)  # hinge active on some columns
    b = a + 0.3 * rng.normal(size=(32, 16))
    loss, _ = vicreg_loss(torch.tensor(a), torch.tensor(b))
    assert loss.item() == pytest.approx(references.solo_learn_vicreg_loss(a, b), rel=1e-12)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    a = torch.tensor(rng.normal(size=(6, 3)), requires_grad=True)
    b = torch.tensor(rng.normal(size=(6, 3)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: vicreg_loss(x, y)[0], (a, b))


def test_batch_of_one_is_a_clear_error():
    with pytest.raises(UserError, match="at least 2"):
        vicreg_loss(torch.zeros(1, 4), torch.zeros(1, 4))


def test_shape_mismatch_and_unknown_variant_are_errors():
    with pytest.raises(UserError, match="one shape"):
        vicreg_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(UserError, match="unknown loss variant"):
        vicreg_loss(torch.zeros(4, 3), torch.zeros(4, 3), variant="nope")


def test_the_former_name_no_eps_had_is_the_same_loss():
    rng = np.random.default_rng(3)
    a, b = (torch.tensor(rng.normal(size=(8, 5))) for _ in range(2))
    renamed, _ = vicreg_loss(a, b, variant="homework")
    assert renamed.item() == vicreg_loss(a, b, variant="no-eps")[0].item()
