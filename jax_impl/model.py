"""ResNet backbones with a CIFAR or ImageNet stem, the VICReg expander, and the two together, in
flax.linen.

The twin of torch_impl.model: NHWC input, and every module is named as in torch's state_dict, so a
variable's path joined with "." is its torch key (`backbone/layer2/0/downsample/0/kernel` is
`backbone.layer2.0.downsample.0.weight`, kernels transposed). BatchNorm follows torch exactly
(momentum 0.1, eps 1e-5, the unbiased batch variance in running_var) and keeps torch's names
(weight, bias, running_mean, running_var, num_batches_tracked). Initialisation draws from
PyTorch's default distributions, so a JAX run from scratch trains like a torch run.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from shared.archs import BLOCKS, EXPANSION, check_arch, check_stem, stage_planes

IMAGE_SHAPE = (32, 32, 3)


def torch_uniform(fan_in: int | None = None):
    """Flax initializer of torch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    That is kaiming_uniform_(a=sqrt(5)) (gain^2 = 2 / (1 + 5), bound = gain * sqrt(3 / fan_in)) for
    weights, and the same bound for linear biases. fan_in defaults to the product of all but the
    last axis: H*W*I of an HWIO kernel, `in` of an [in, out] kernel, as torch counts it.
    """

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(fan_in or math.prod(shape[:-1]))

        def draw(key_data):
            rng = np.random.default_rng(np.asarray(key_data).tolist())
            return rng.uniform(-bound, bound, shape).astype(dtype)

        # Drawn on the host from the flax key: XLA:CPU spends seconds compiling each threefry draw,
        # which made the jitted init of a ResNet-18 take most of a minute.
        return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype), jax.random.key_data(key))

    return init


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm{1,2}d over the last axis: [..., C] -> [..., C] in `dtype`.

    train: y = (x - mean_B) / sqrt(var_B + eps) * weight + bias with the biased batch variance, and
    running = (1 - momentum) * running + momentum * batch_stat, where running_var takes the UNBIASED
    variance var_B * n / (n - 1) as torch does; eval: the running statistics. Statistics in float32
    (float64 for a float64 model, as the parity tests run it).
    """

    momentum: float = 0.1  # torch's convention: the weight of the new batch (flax's momentum 0.9)
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (channels,),
                                     jnp.float32)
        running_var = self.variable("batch_stats", "running_var", jnp.ones, (channels,),
                                    jnp.float32)
        tracked = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = x32.mean(axes)
            var = jnp.square(x32 - mean).mean(axes)
            if not self.is_initializing():
                n = x.size // channels
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * jax.lax.stop_gradient(mean)
                unbiased = jax.lax.stop_gradient(var) * (n / (n - 1))
                running_var.value = (1 - m) * running_var.value + m * unbiased
                tracked.value = tracked.value + 1
        else:
            mean, var = running_mean.value, running_var.value
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * weight + bias
        return y.astype(self.dtype)


CONV_IMPLS = ("lax", "im2col")


class Conv(nn.Module):
    """torch.nn.Conv2d(bias=False) with symmetric padding (k-1)//2: [N, H, W, I] -> [N, H', W', O].

    Parameter "kernel" float32 [k, k, I, O] (HWIO). impl "lax" is one lax.conv_general_dilated;
    "im2col" computes the same y[n,h,w,o] = sum_{i,j,c} x_pad[n, s*h+i, s*w+j, c] * kernel[i,j,c,o]
    as one matmul over the k*k shifted slices, which XLA:CPU runs (and differentiates) faster than
    its convolution in float32 at CIFAR sizes (bench/throughput.py measures both;
    docs/performance.md has the figures).
    """

    features: int
    kernel: int
    stride: int
    dtype: Any = jnp.float32
    impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, cin = self.kernel, self.stride, x.shape[-1]
        w = self.param("kernel", torch_uniform(), (k, k, cin, self.features), jnp.float32)
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        pad = (k - 1) // 2
        if self.impl == "lax":
            # Explicit symmetric padding: 'SAME' pads a stride-2 3x3 conv (0, 1), torch pads (1, 1).
            return jax.lax.conv_general_dilated(x, w, (s, s), ((pad, pad), (pad, pad)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        out_h, out_w = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
        slices = [x[:, i:i + s * (out_h - 1) + 1:s, j:j + s * (out_w - 1) + 1:s, :]
                  for i in range(k) for j in range(k)]
        columns = slices[0] if k == 1 else jnp.concatenate(slices, axis=-1)  # (i, j, c) order = HWI
        return jnp.dot(columns, w.reshape(k * k * cin, self.features))


# A module class with its settings bound (functools.partial): the convolution and the norm layer
# are chosen once, in ResNet, and the blocks only give them sizes and names.
ModuleDef = Any


class Downsample(nn.Module):
    """The shortcut projection: 1x1 conv (strided) then BN, torch's `downsample.0` and `.1`."""

    features: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.norm(name="1")(self.conv(self.features, 1, self.stride, name="0")(x), train)


class BasicBlock(nn.Module):
    """Two 3x3 convs; out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); NHWC."""

    planes: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = Downsample(self.planes, self.stride, self.conv, self.norm,
                                  name="downsample")(x, train)
        y = self.conv(self.planes, 3, self.stride, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y, train))
        y = self.conv(self.planes, 3, 1, name="conv2")(y)
        return nn.relu(self.norm(name="bn2")(y, train) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, torchvision's v1.5), 1x1 expand by 4, plus the shortcut; NHWC."""

    planes: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cout = self.planes * EXPANSION["bottleneck"]
        shortcut = x
        if self.stride != 1 or x.shape[-1] != cout:
            shortcut = Downsample(cout, self.stride, self.conv, self.norm,
                                  name="downsample")(x, train)
        y = self.conv(self.planes, 1, 1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y, train))
        y = self.conv(self.planes, 3, self.stride, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y, train))
        y = self.conv(cout, 1, 1, name="conv3")(y)
        return nn.relu(self.norm(name="bn3")(y, train) + shortcut)


class Stage(nn.Module):
    """One `layerK` of the ResNet: `depth` blocks named "0", "1", ..., the first one strided."""

    kind: str
    planes: int
    depth: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        block = BasicBlock if self.kind == "basic" else Bottleneck
        for i in range(self.depth):
            x = block(self.planes, self.stride if i == 0 else 1, self.conv, self.norm,
                      name=str(i))(x, train)
        return x


class ResNet(nn.Module):
    """ResNet: float32 [N, H, W, 3] NHWC -> pooled features float32 [N, feature_dim].

    stem: "cifar" (3x3 stride-1 conv, no max-pool) or "imagenet" (7x7 stride-2 conv, 3x3 stride-2
    max-pool), as torch_impl.model; dtype: what the convolutions and BatchNorms compute in;
    conv_impl: Conv's `impl`; last_width: the last stage's planes (0: 8 x width;
    shared.archs.stage_planes).
    """

    arch: str = "resnet18"
    width: int = 64
    dtype: Any = jnp.float32
    conv_impl: str = "lax"
    stem: str = "cifar"
    last_width: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        check_arch(self.arch)
        check_stem(self.stem)
        kind, depths = BLOCKS[self.arch]
        conv = functools.partial(Conv, dtype=self.dtype, impl=self.conv_impl)
        norm = functools.partial(BatchNorm, dtype=self.dtype)
        imagenet = self.stem == "imagenet"
        x = conv(self.width, 7 if imagenet else 3, 2 if imagenet else 1, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x, train))
        if imagenet:  # torch's MaxPool2d(3, 2, padding=1) pads with -inf, as reduce_window does
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        widths = stage_planes(self.arch, self.width, self.last_width)
        for stage, (depth, planes) in enumerate(zip(depths, widths)):
            x = Stage(kind, planes, depth, 2 if stage > 0 else 1, conv, norm,
                      name=f"layer{stage + 1}")(x, train)
        return x.astype(jnp.promote_types(x.dtype, jnp.float32)).mean(axis=(1, 2))


class Expander(nn.Module):
    """[N, in_dim] -> [N, dims[-1]]: (Linear+BN+ReLU) for all but the last layer, the last Linear
    without bias.

    Layers are named by their index in torch's nn.Sequential ("0", "1", "3", ...; ReLUs hold
    nothing).
    """

    dims: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i, out in enumerate(self.dims[:-1]):
            x = nn.Dense(out, dtype=self.dtype, kernel_init=torch_uniform(),
                         bias_init=torch_uniform(x.shape[-1]), name=str(3 * i))(x)
            x = nn.relu(BatchNorm(dtype=self.dtype, name=str(3 * i + 1))(x, train))
        return nn.Dense(self.dims[-1], use_bias=False, dtype=self.dtype,
                        kernel_init=torch_uniform(),
                        name=str(3 * (len(self.dims) - 1)))(x)


class VICReg(nn.Module):
    """Backbone + expander: float32 [N, H, W, 3] NHWC -> embeddings [N, dims[-1]] in `dtype`."""

    arch: str
    width: int
    mlp_dims: tuple[int, ...]
    dtype: Any = jnp.float32
    conv_impl: str = "lax"
    stem: str = "cifar"
    last_width: int = 0

    def setup(self):
        self.backbone = ResNet(self.arch, self.width, self.dtype, self.conv_impl, self.stem,
                               self.last_width)
        self.projector = Expander(tuple(self.mlp_dims), self.dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.projector(self.backbone(x, train), train)


def default_conv_impl(dtype=jnp.float32) -> str:
    """The faster convolution for a model computing in `dtype` here: "im2col" for float32 on the
    CPU, XLA's own "lax" otherwise (GPUs, and bf16 on a CPU, where XLA's is the faster one;
    bench/throughput.py measures both)."""
    cpu_float32 = jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32
    return "im2col" if cpu_float32 else "lax"


def build_model(arch: str, width: int, mlp_dims, stem: str = "cifar", last_width: int = 0, *,
                dtype=jnp.float32, conv_impl: str | None = None) -> VICReg:
    """The VICReg module with `stem` ("cifar" or "imagenet"; UserError for an unknown arch) and
    the last stage `last_width` wide (0: 8 x width), computing in `dtype`, float32 parameters.

    conv_impl: "lax" or "im2col" (the same function and parameters); None picks
    default_conv_impl(dtype).
    """
    check_arch(arch)
    impl = conv_impl or default_conv_impl(dtype)
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    return VICReg(arch, width, tuple(mlp_dims), dtype, impl, stem, last_width)


@functools.partial(jax.jit, static_argnums=0)
def _init(model: nn.Module, key: jax.Array) -> dict:
    return model.init(key, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False)


def init_variables(model: VICReg, seed: int) -> dict:
    """{"params", "batch_stats"} drawn from torch's default init distributions with PRNG key
    `seed`."""
    return dict(_init(model, jax.random.key(seed)))


def variable_shapes(model: nn.Module, input_shape: tuple = (1, *IMAGE_SHAPE)) -> dict:
    """The {"params", "batch_stats"} tree of jax.ShapeDtypeStruct, without computing anything.

    model: any module of this file called as model(x, train); input_shape: NHWC float32 input.
    """
    dummy = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    return dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy))


def backbone_of(model: VICReg) -> ResNet:
    """VICReg's backbone as a module of its own: float32 [N, H, W, 3] -> features float32 [N, F]."""
    return ResNet(model.arch, model.width, model.dtype, model.conv_impl, model.stem,
                  model.last_width)


def backbone_variables(variables: dict) -> dict:
    """The backbone's share of VICReg's variables, to apply a ResNet alone (the probe's
    features)."""
    return {"params": variables["params"]["backbone"],
            "batch_stats": variables["batch_stats"]["backbone"]}
