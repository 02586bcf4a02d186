"""jax_impl.model against torch_impl.model (names, shapes, outputs) and against hand
computations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from interop.mapping import from_torch_state, to_torch_state, torch_name
from jax_impl import runtime
from jax_impl.model import (
    CONV_IMPLS,
    BatchNorm,
    Bottleneck,
    Conv,
    ResNet,
    backbone_of,
    backbone_variables,
    build_model,
    default_conv_impl,
    init_variables,
    variable_shapes,
)
from shared.archs import feature_dim
from shared.errors import UserError
from torch_impl.model import Bottleneck as TorchBottleneck
from torch_impl.model import VICReg as TorchVICReg

MLP = [16, 8]


def torch_layout_shapes(tree) -> dict:
    """{torch key: shape in torch's layout} of a flax variables tree (kernels transposed by
    hand)."""
    shapes = {}
    for (_, *path), leaf in flatten_dict(tree).items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        shapes[torch_name(tuple(path))] = shape
    return shapes


@pytest.mark.parametrize("arch,width,last_width", [
    ("resnet18", 4, 0), ("resnet34", 4, 0), ("resnet50", 4, 0), ("resnet18", 8, 0),
    ("resnet18", 4, 24), ("resnet50", 4, 12)])
def test_names_shapes_and_parameter_count_equal_torch(arch, width, last_width):
    model = build_model(arch, width, MLP, last_width=last_width)
    shapes = variable_shapes(model)
    torch_model = TorchVICReg(arch, width, MLP, last_width=last_width)
    assert torch_layout_shapes(shapes) == {k: tuple(v.shape)
                                           for k, v in torch_model.state_dict().items()}
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))
    assert count == sum(p.numel() for p in torch_model.parameters())
    assert feature_dim(arch, width, last_width) == torch_model.backbone.feature_dim


@pytest.mark.parametrize("arch,width,last_width,dim", [
    ("resnet18", 16, 0, 128), ("resnet18", 16, 256, 256), ("resnet50", 4, 12, 48),
    ("resnet50", 64, 0, 2048)])
def test_feature_dim_by_hand(arch, width, last_width, dim):
    assert feature_dim(arch, width, last_width) == dim
    backbone = backbone_of(build_model(arch, width, MLP, last_width=last_width))
    features = jax.eval_shape(
        lambda x: backbone.init_with_output(jax.random.key(0), x, train=False)[0],
        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert features.shape == (2, dim)


def test_expander_last_linear_has_no_bias_and_others_do():
    params = variable_shapes(build_model("resnet18", 4, [32, 24, 8]))["params"]["projector"]
    # torch's Sequential indices (ReLUs hold nothing)
    assert sorted(params) == ["0", "1", "3", "4", "6"]
    assert set(params["0"]) == {"kernel", "bias"} and set(params["3"]) == {"kernel", "bias"}
    assert set(params["6"]) == {"kernel"}
    assert params["6"]["kernel"].shape == (24, 8)


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
def test_conv_equals_torch_conv2d_with_symmetric_padding(impl, kernel, stride):
    # 'SAME' would pad a stride-2 3x3 conv by (0, 1); torch (and Conv) pad (1, 1) on both sides.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    weights = rng.normal(size=(kernel, kernel, 3, 5)).astype(np.float32)
    with exact_float32():
        got = Conv(5, kernel, stride, jnp.float32, impl).apply({"params": {"kernel": weights}}, x)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                     torch.from_numpy(weights).permute(3, 2, 0, 1), stride=stride,
                                     padding=(kernel - 1) // 2)
    np.testing.assert_allclose(np.asarray(got), ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5,
                               atol=1e-5)


def test_conv_impl_is_im2col_on_cpu_and_checked():
    assert default_conv_impl() == ("im2col" if jax.default_backend() == "cpu" else "lax")
    assert default_conv_impl(jnp.bfloat16) == "lax"
    assert build_model("resnet18", 8, MLP).conv_impl == default_conv_impl()
    assert build_model("resnet18", 8, MLP, dtype=jnp.bfloat16).conv_impl == "lax"
    assert build_model("resnet18", 8, MLP, conv_impl="lax").conv_impl == "lax"
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        build_model("resnet18", 8, MLP, conv_impl="winograd")


@pytest.mark.parametrize("shape", [(6, 3), (4, 5, 5, 3)])
def test_batchnorm_follows_torch_by_hand(shape):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=shape).astype(np.float32)
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=False)
    variables = {"params": {"weight": np.array([0.5, 1.0, 2.0], np.float32),
                            "bias": np.array([0.1, -0.2, 0.3], np.float32)},
                 "batch_stats": variables["batch_stats"]}
    y, updated = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    axes = tuple(range(len(shape) - 1))
    n = x.size // 3
    # biased, to normalise
    mean, var = x.astype(np.float64).mean(axes), x.astype(np.float64).var(axes)
    ref = ((x - mean) / np.sqrt(var + 1e-5) * variables["params"]["weight"]
           + variables["params"]["bias"])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    stats = updated["batch_stats"]
    # running = 0.9 running + 0.1 batch, with the UNBIASED variance var * n / (n - 1) (init 0 and 1)
    np.testing.assert_allclose(stats["running_mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["running_var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    assert int(stats["num_batches_tracked"]) == 1
    y_eval = bn.apply({"params": variables["params"], "batch_stats": stats}, x, train=False)
    ref_eval = ((x - stats["running_mean"]) / np.sqrt(stats["running_var"] + 1e-5)
                * variables["params"]["weight"] + variables["params"]["bias"])
    np.testing.assert_allclose(np.asarray(y_eval), ref_eval, rtol=1e-5, atol=1e-5)


def test_init_draws_torch_default_distributions():
    model = build_model("resnet18", 8, [64, 16])
    variables = init_variables(model, seed=0)
    flat = flatten_dict(variables)
    for (_collection, *path), value in flat.items():
        value = np.asarray(value)
        assert value.dtype == (np.int32 if path[-1] == "num_batches_tracked" else np.float32)
        if path[-1] == "kernel":
            bound = 1 / np.sqrt(np.prod(value.shape[:-1]))  # fan_in = H*W*I, or in
            assert np.abs(value).max() <= bound
            if value.size >= 10_000:  # U(-b, b): std b / sqrt(3), mean 0
                assert value.std() == pytest.approx(bound / np.sqrt(3), rel=0.03)
                assert abs(value.mean()) < 0.02 * bound
        elif path[-1] == "bias" and path[-2] == "0":  # the expander's first Linear, fan_in 64
            assert np.abs(value).max() <= 1 / 8 and value.std() > 0
        elif path[-1] in ("weight", "running_var"):
            assert np.all(value == 1)
        else:  # BN bias, running_mean, num_batches_tracked
            assert np.all(value == 0)
    again = init_variables(model, seed=0)
    other = init_variables(model, seed=1)
    kernel = ("params", "backbone", "layer4", "1", "conv2", "kernel")
    assert np.array_equal(again["params"]["backbone"]["conv1"]["kernel"],
                          variables["params"]["backbone"]["conv1"]["kernel"])
    assert not np.array_equal(flatten_dict(other)[kernel], flat[kernel])


def exact_float32():
    """No TF32 in float32 convs and matmuls (a GPU's default), so parity holds to 1e-4 there too."""
    return jax.default_matmul_precision("highest")


def torch_and_converted(arch, conv_impl, seed=0):
    """A torch VICReg whose BN statistics moved (one train forward) and the same weights for
    flax."""
    torch.manual_seed(seed)
    torch_model = TorchVICReg(arch, 4, MLP)
    with torch.no_grad():
        torch_model.train()(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    weights = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    model = build_model(arch, 4, MLP, conv_impl=conv_impl)
    return torch_model, model, from_torch_state(weights, variable_shapes(model), "test", arch)


def images(n=6, seed=3):
    x = np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)
    return x, torch.from_numpy(x).permute(0, 3, 1, 2)


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
def test_eval_outputs_and_features_match_torch_with_converted_weights(conv_impl):
    torch_model, model, variables = torch_and_converted("resnet18", conv_impl)
    x, x_torch = images()
    with torch.no_grad():
        ref = torch_model.eval()(x_torch).numpy()
        ref_features = torch_model.backbone(x_torch).numpy()
    with exact_float32():
        got, features = jax.jit(lambda v, x: (
            model.apply(v, x, train=False),
            backbone_of(model).apply(backbone_variables(v), x, train=False)))(variables, x)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert features.shape == (6, feature_dim("resnet18", 4))
    np.testing.assert_allclose(np.asarray(features), ref_features, rtol=1e-4,
                               atol=1e-4 * np.abs(ref_features).max())


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_strided_bottleneck_block_matches_torch(precision, conv_impl):
    # resnet50's block: stride on the 3x3 (torchvision v1.5), expansion 4, projected shortcut.
    torch.manual_seed(1)
    block = TorchBottleneck(8, 4, stride=2)
    with torch.no_grad():
        block.train()(torch.randn(8, 8, 8, 8) + 1.0)  # move the BN statistics
    weights = {k: v.detach().numpy().copy() for k, v in block.state_dict().items()}
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    mine = Bottleneck(4, 2, functools.partial(Conv, dtype=dtype, impl=conv_impl),
                      functools.partial(BatchNorm, dtype=dtype))
    x = np.random.default_rng(2).normal(size=(4, 8, 8, 8)).astype(np.float32)
    variables = from_torch_state(weights, variable_shapes(mine, x.shape), "test", "bottleneck")
    with torch.no_grad():
        ref = block.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    with exact_float32():
        got = jax.jit(lambda v, x: mine.apply(v, x, train=False))(variables, x)
    assert got.shape == (4, 4, 4, 16) and got.dtype == dtype
    tol = 1e-4 if precision == "fp32" else 5e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=tol,
                               atol=tol * np.abs(ref).max())


def test_bf16_model_computes_in_bf16_with_float32_parameters():
    model = build_model("resnet50", 4, MLP, dtype=jnp.bfloat16)
    shapes = variable_shapes(model)
    assert ({leaf.dtype for leaf in jax.tree.leaves(shapes)}
            == {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)})
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes,
                         jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    features = jax.eval_shape(lambda v, x: backbone_of(model).apply(v, x, train=False),
                              backbone_variables(shapes),
                              jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert (out.shape, out.dtype) == ((2, 8), jnp.bfloat16)
    assert (features.shape, features.dtype) == ((2, 128), jnp.float32)  # pooled in float32


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
def test_train_mode_outputs_and_running_stats_match_torch(conv_impl):
    torch_model, model, variables = torch_and_converted("resnet18", conv_impl)
    x, x_torch = images(seed=4)
    with torch.no_grad():
        ref = torch_model.train()(x_torch).numpy()
    after = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    with exact_float32():
        got, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, x)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    mine = to_torch_state({"params": variables["params"], "batch_stats": updated["batch_stats"]})
    for key, value in after.items():
        if key.endswith("num_batches_tracked"):
            assert mine[key] == value == 2, key
        elif "running" in key:
            np.testing.assert_allclose(mine[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_precision_auto_is_bf16_only_where_native(monkeypatch):
    cpu = jax.devices("cpu")[0]
    assert runtime.compute_dtype("fp32", cpu) == jnp.float32
    assert runtime.compute_dtype("bf16", cpu) == jnp.bfloat16
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "fma"})
    assert runtime.compute_dtype("auto", cpu) == jnp.float32
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert runtime.compute_dtype("auto", cpu) == jnp.bfloat16


def test_unknown_arch_is_an_error():
    with pytest.raises(UserError, match="unknown architecture 'resnet19'"):
        build_model("resnet19", 8, MLP)
    with pytest.raises(UserError, match="unknown architecture"):
        variable_shapes(ResNet("resnet19", 8))
