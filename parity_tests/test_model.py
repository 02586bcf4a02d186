"""Groups 3 and 4: forward passes with converted weights, and the objective's parameter
gradients."""
import jax
import numpy as np
import pytest
import torch

from jax_impl.step import step_loss as jax_step_loss
from parity_tests.compare import as_numpy
from parity_tests.conftest import DTYPES, jax_precision
from parity_tests.kinks import branch_taken, float32_reach, kink_allowance, relu_inputs
from parity_tests.models import (
    images,
    inert_under_batchnorm,
    jax_twin,
    nchw,
    torch_named,
    torch_vicreg,
)
from shared.archs import stem_for
from shared.config import make_config
from torch_impl.step import step_loss as torch_step_loss

WIDTH, MLP = 4, [32, 16]
TERMS = ("loss", "invariance", "variance", "covariance")
ARCHS = ("resnet18", "resnet50")


def split_forward(module, x, train):
    """Backbone features and expander output of the flax VICReg in one pass."""
    features = module.backbone(x, train)
    return features, module.projector(features, train)


def forwards(arch: str, train: bool, dtype: str, size: int = 32,
             last_width: int = 0) -> tuple[dict, dict]:
    """({name: torch result}, {name: jax result}) of one forward of the same model (its last
    stage last_width wide; 0: 8 x WIDTH) and images of `size` pixels (the stem stem_for(size)) in
    `dtype`: backbone features, expander output, and the BN statistics after it (by torch
    name)."""
    stem = stem_for(size)
    torch_model = torch_vicreg(arch, WIDTH, MLP, dtype, seed=1, stem=stem, last_width=last_width)
    x = images(8, seed=2, size=size) * 1.5 + 0.3
    with jax_precision(dtype):
        model, variables = jax_twin(torch_model, arch, WIDTH, MLP, dtype, stem, last_width)
        (j_features, j_z), updated = jax.jit(lambda v, x: model.apply(
            v, x, train, method=split_forward, mutable=["batch_stats"]))(variables, x.astype(dtype))
        after = torch_named(updated)
    torch_model.train(train)
    with torch.no_grad():
        t_features = torch_model.backbone(nchw(x, dtype))
        t_z = torch_model.projector(t_features)
    torch_results = {"backbone features": t_features, "expander output": t_z,
                     **torch_model.state_dict()}
    return ({k: as_numpy(v) for k, v in torch_results.items()},
            {"backbone features": np.asarray(j_features), "expander output": np.asarray(j_z),
             **after})


@pytest.mark.parametrize("arch, size, last_width",
                         [("resnet18", 32, 0), ("resnet50", 32, 0), ("resnet18", 96, 0),
                          ("resnet18", 32, 12)],
                         ids=["resnet18", "resnet50", "resnet18-96px-imagenet-stem",
                              "resnet18-last-stage-12"])
@pytest.mark.parametrize("train", [True, False], ids=["train_mode", "eval_mode"])
def test_backbone_and_expander_forward_agree(arch, size, last_width, train, parity):
    (t64, j64), (t32, j32) = (forwards(arch, train, dtype, size, last_width) for dtype in DTYPES)
    expansion = 4 if arch == "resnet50" else 1
    assert t64["backbone features"].shape == (8, (last_width or 8 * WIDTH) * expansion)
    mode = (("train" if train else "eval") + ("" if size == 32 else f" {size}px")
            + (f" last stage {last_width}" if last_width else ""))
    for key, value in t64.items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(j64[key]) == int(j32[key]) == (1 if train else 0), key
        elif key.endswith("features") or key.endswith("output") or "running" in key:
            # the running statistics after a train-mode forward: torch's update with the unbiased
            # batch variance
            parity.check("forward", f"{arch} {mode} {key}", value, j64[key], t32[key], j32[key])


def torch_objective(arch: str, dtype: str, reach: float | None = None,
                    derivative: float = 0.0) -> tuple[dict, float, list]:
    """torch_impl's side of one step's objective in `dtype`: ({name: value}, the gradients' largest
    magnitude over the model, the ReLU inputs of the forwards). Names: "objective " + term, "dL/d "
    + parameter name, and the BN statistics after the step's two forwards. With reach, the ReLUs
    take `derivative` at the kinks float32 could cross (kinks.branch_taken)."""
    cfg = make_config({"preset": "smoke", "arch": arch, "width": WIDTH, "mlp": "32-16"})
    torch_model = torch_vicreg(arch, WIDTH, MLP, dtype, seed=3).train()
    x_a, x_b = images(16, seed=4), images(16, seed=5)
    with relu_inputs(torch_model) as inputs, branch_taken(torch_model, reach, derivative):
        t_loss, t_terms = torch_step_loss(torch_model, nchw(x_a, dtype), nchw(x_b, dtype), cfg,
                                          None)
        t_loss.backward()
    grads = dict(torch_model.named_parameters())
    results = {**{f"objective {term}": t_terms[term] for term in TERMS},
               **{f"dL/d {name}": p.grad for name, p in grads.items()},
               **{key: v for key, v in torch_model.state_dict().items() if "running" in key}}
    model_scale = max(float(p.grad.abs().max()) for p in grads.values())
    return {k: as_numpy(v) for k, v in results.items()}, model_scale, inputs


def jax_objective(arch: str, dtype: str) -> dict:
    """jax_impl's side of torch_objective(arch, dtype), by torch name."""
    cfg = make_config({"preset": "smoke", "arch": arch, "width": WIDTH, "mlp": "32-16"})
    torch_model = torch_vicreg(arch, WIDTH, MLP, dtype, seed=3)
    x_a, x_b = images(16, seed=4), images(16, seed=5)
    with jax_precision(dtype):
        model, variables = jax_twin(torch_model, arch, WIDTH, MLP, dtype)
        grads, (terms, batch_stats) = jax.jit(jax.grad(
            lambda params: jax_step_loss(model, params, variables["batch_stats"],
                                         x_a.astype(dtype), x_b.astype(dtype), cfg),
            has_aux=True))(variables["params"])
        results = {**{f"objective {term}": terms[term] for term in TERMS},
                   **{f"dL/d {name}": g for name, g in torch_named({"params": grads}).items()},
                   **{key: v for key, v in torch_named({"batch_stats": batch_stats}).items()
                      if "running" in key}}
        return {k: np.asarray(v) for k, v in results.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_objective_gradients_agree_for_every_parameter(arch, parity):
    t64, model_scale, inputs64 = torch_objective(arch, "float64")
    t32, _, inputs32 = torch_objective(arch, "float32")
    reach = float32_reach(inputs32, inputs64)
    on64, off64 = (torch_objective(arch, "float64", reach, derivative)[0] for derivative in (1, 0))
    j64, j32 = jax_objective(arch, "float64"), jax_objective(arch, "float32")
    assert set(t64) == set(j64)  # every parameter, matched by its torch name
    for key, value in t64.items():
        gradient = key.startswith("dL/d ")
        scale = model_scale if gradient and inert_under_batchnorm(key[len("dL/d "):]) else 0.0
        allowance = kink_allowance(value, on64[key], off64[key], scale) if gradient else 0.0
        # the objective and the running statistics come from the forwards: no kink allowance
        parity.check("param_grad", f"{arch} {key}", value, j64[key], t32[key], j32[key],
                     scale=scale, kink_allowance=allowance)
