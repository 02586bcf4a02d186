"""The same VICReg network in both frameworks: a torch model and its JAX twin via
interop.mapping."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from interop.mapping import from_torch_state, to_torch_state
from jax_impl.model import VICReg as JaxVICReg
from jax_impl.model import build_model, variable_shapes
from torch_impl.model import VICReg as TorchVICReg

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_vicreg(arch: str, width: int, mlp: list[int], dtype: str, seed: int,
                 stem: str = "cifar", last_width: int = 0) -> TorchVICReg:
    """torch's default init from `seed`, then random BN weights, biases and running statistics
    (drawn in float32, so the float64 model holds the same numbers), cast to `dtype`."""
    torch.manual_seed(seed)
    model = TorchVICReg(arch, width, mlp, stem, last_width)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32)))
                module.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, c).astype(np.float32)))
                module.running_mean.copy_(
                    torch.from_numpy(rng.normal(0, 0.3, c).astype(np.float32)))
                module.running_var.copy_(
                    torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32)))
    return model.to(TORCH_DTYPES[dtype])


def jax_twin(torch_model: TorchVICReg, arch: str, width: int, mlp: list[int],
             dtype: str, stem: str = "cifar", last_width: int = 0) -> tuple[JaxVICReg, dict]:
    """(flax VICReg computing in `dtype`, its {"params", "batch_stats"}) converted from torch_model,
    which was built as torch_vicreg(arch, width, mlp, ..., stem, last_width)."""
    model = build_model(arch, width, mlp, stem, last_width, dtype=jnp.dtype(dtype))
    state = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
    variables = from_torch_state(state, variable_shapes(model), "the parity model", "parity")
    return model, cast_floats(variables, dtype)


def cast_floats(tree, dtype: str):
    """Every floating leaf of `tree` as a jax array of `dtype` (integers untouched)."""
    return jax.tree.map(lambda v: jnp.asarray(v, dtype) if jnp.issubdtype(v.dtype, jnp.floating)
                        else jnp.asarray(v), tree)


def torch_named(tree: dict) -> dict[str, np.ndarray]:
    """A flax {"params": ..., "batch_stats": ...}-shaped tree (values, grads, optimizer moments)
    -> {torch state_dict key: array in torch's layout}."""
    return to_torch_state(jax.tree.map(np.asarray, tree))


def inert_under_batchnorm(name: str) -> bool:
    """Whether parameter `name` (a torch key) is an expander Linear's bias, which the BatchNorm
    right after it cancels (it subtracts the batch mean): its gradient is zero in exact arithmetic,
    so both frameworks compute rounding noise there (about 1e-7 of the other gradients in float32).
    Such tensors are compared against the scale of the whole model, and Adam, which divides that
    noise by its own root mean square, turns it into full +-lr steps that differ between the sides
    without changing any output."""
    parts = name.split(".")
    return parts[0] == "projector" and parts[-1] == "bias" and int(parts[1]) % 3 == 0


def nchw(x: np.ndarray, dtype: str) -> torch.Tensor:
    """NHWC numpy images -> an NCHW torch tensor of `dtype`."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(TORCH_DTYPES[dtype])


def images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """float32 [n, size, size, 3] NHWC inputs, roughly normalised."""
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)
