"""Groups 3 and 4: forward passes with converted weights, and the objective's parameter gradients."""
import jax
import pytest
import torch

from jax_impl.train import step_loss as jax_step_loss
from parity_tests.models import (images, inert_under_batchnorm, jax_twin, nchw, torch_named,
                                 torch_vicreg)
from shared.config import make_config
from torch_impl.train import step_loss as torch_step_loss

WIDTH, MLP = 4, [32, 16]
ARCHS = ("resnet18", "resnet50")


def split_forward(module, x, train):
    """Backbone features and expander output of the flax VICReg in one pass."""
    features = module.backbone(x, train)
    return features, module.projector(features, train)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train", [True, False], ids=["train_mode", "eval_mode"])
def test_backbone_and_expander_forward_agree(arch, train, dtype, parity):
    torch_model = torch_vicreg(arch, WIDTH, MLP, dtype, seed=1)
    model, variables = jax_twin(torch_model, arch, WIDTH, MLP, dtype)
    x = images(8, seed=2) * 1.5 + 0.3
    torch_model.train(train)
    with torch.no_grad():
        t_features = torch_model.backbone(nchw(x, dtype))
        t_z = torch_model.projector(t_features)
    (j_features, j_z), updated = jax.jit(lambda v, x: model.apply(
        v, x, train, method=split_forward, mutable=["batch_stats"]))(variables, x.astype(dtype))
    mode = "train" if train else "eval"
    parity.check("forward", dtype, f"{arch} {mode} backbone features", t_features, j_features)
    parity.check("forward", dtype, f"{arch} {mode} expander output", t_z, j_z)
    after = torch_named(updated)
    for key, value in torch_model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(after[key]) == (1 if train else 0), key
        elif "running" in key:  # train mode: torch's update with the unbiased batch variance
            parity.check("forward", dtype, f"{arch} {mode} {key} after the forward", value, after[key])


@pytest.mark.parametrize("arch", ARCHS)
def test_objective_gradients_agree_for_every_parameter(arch, dtype, parity):
    cfg = make_config({"preset": "smoke", "arch": arch, "width": WIDTH, "mlp": "32-16"})
    torch_model = torch_vicreg(arch, WIDTH, MLP, dtype, seed=3).train()
    model, variables = jax_twin(torch_model, arch, WIDTH, MLP, dtype)
    x_a, x_b = images(16, seed=4), images(16, seed=5)
    t_loss, t_terms = torch_step_loss(torch_model, nchw(x_a, dtype), nchw(x_b, dtype), cfg, None)
    t_loss.backward()
    grads, (j_terms, batch_stats) = jax.jit(jax.grad(
        lambda params: jax_step_loss(model, params, variables["batch_stats"], x_a.astype(dtype),
                                     x_b.astype(dtype), cfg), has_aux=True))(variables["params"])
    for term in ("loss", "invariance", "variance", "covariance"):
        parity.check("param_grad", dtype, f"{arch} objective {term}", t_terms[term], j_terms[term])
    j_grads = torch_named({"params": grads})
    t_grads = dict(torch_model.named_parameters())
    assert set(j_grads) == set(t_grads)  # every parameter, matched by its torch name
    model_scale = max(float(p.grad.abs().max()) for p in t_grads.values())
    for name, parameter in t_grads.items():
        parity.check("param_grad", dtype, f"{arch} dL/d {name}", parameter.grad, j_grads[name],
                     scale=model_scale if inert_under_batchnorm(name) else 0.0)
    stats = torch_named({"batch_stats": batch_stats})
    for key, value in torch_model.state_dict().items():
        if "running" in key:  # two BN updates per step, one per view, on both sides
            parity.check("param_grad", dtype, f"{arch} {key} after the step's two forwards",
                         value, stats[key])
