"""ReLU kinks: how far float32 rounding can move a result that depends on a ReLU's derivative.

relu'(x) jumps from 0 to 1 at x = 0, so everything computed from a ReLU network's gradient (the
parameter gradients, the optimizer's state, the weights after a step) is discontinuous wherever a
pre-activation lies at 0. A float32 forward moves every pre-activation by rounding; one that lies
within that distance of 0 in float64 can land on either side in a float32 run, and then the whole
gradient upstream of it changes by that one element's contribution (at width 4, a layer4 channel
sums 256 such contributions). Which side each framework lands on is decided by its rounding, so it
differs between frameworks and between CPUs.

What float32 can do there is measured in float64, in the same test: the reach is how far either
framework's float32 run moved its ReLU inputs from its float64 run, max|x32 - x64| / max|x64| per
ReLU call (torch's through hooks on its ReLUs, JAX's rebuilt from the module outputs flax
captures); torch's float64 run is repeated with every ReLU input within KINK_REACH x reach of 0
taking derivative 1 ("on") and 0 ("off"). How far those two runs move a result from the plain
float64 one is its kink allowance, added to the float32 bound of the groups downstream of a ReLU
derivative (see tolerances.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from flax.traverse_util import flatten_dict
from torch import nn

from parity_tests.compare import as_numpy, relative_difference
from parity_tests.tolerances import KINK_REACH


@contextlib.contextmanager
def relu_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside: a list that collects a copy of the input of every ReLU call of `model`, in order."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def float32_reach(inputs32: list, inputs64: list) -> float:
    """How far float32 moved the ReLU inputs (torch tensors or numpy arrays, call by call): max
    over calls of max|x32 - x64| / max|x64|."""
    assert len(inputs32) == len(inputs64) > 0
    return max(relative_difference(as_numpy(x64), as_numpy(x32))
               for x32, x64 in zip(inputs32, inputs64))


def jax_relu_inputs(intermediates: dict) -> list[np.ndarray]:
    """The inputs of every ReLU of jax_impl's VICReg in one forward, from the module outputs that
    `apply(..., capture_intermediates=True)` collected (flax's "intermediates" collection): the
    stem's and the expander's BatchNorm outputs, and in each residual block every BatchNorm's
    output but the last, which enters its ReLU with the shortcut added (the downsample's output,
    or the block's input: the output before it)."""
    flat = {key[:-1]: np.asarray(value[0]) for key, value in flatten_dict(intermediates).items()
            if len(key) > 1}
    inputs = [flat[("backbone", "bn1")]]
    previous = np.maximum(inputs[0], 0)
    stages = sorted({key[1] for key in flat if key[:2] != ("backbone", "bn1")
                     and len(key) > 2 and key[0] == "backbone"})
    for stage in stages:
        blocks = sorted({key[2] for key in flat if key[:2] == ("backbone", stage) and len(key) > 2},
                        key=int)
        for block in blocks:
            path = ("backbone", stage, block)
            norms = sorted(key[-1] for key in flat if key[:3] == path and len(key) == 4
                           and key[-1].startswith("bn"))
            inputs += [flat[(*path, bn)] for bn in norms[:-1]]
            shortcut = flat.get((*path, "downsample"), previous)
            inputs.append(flat[(*path, norms[-1])] + shortcut)
            previous = flat[path]
    norms = sorted((key for key in flat if key[0] == "projector" and len(key) == 2
                    and int(key[1]) % 3 == 1), key=lambda key: int(key[1]))
    return inputs + [flat[key] for key in norms]


class _ReLUTakingBranch(torch.autograd.Function):
    """relu(x), with derivative `derivative` where |x| <= reach * max|x| and the usual elsewhere."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, reach: float, derivative: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.reach, ctx.derivative = reach, derivative
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        near = x.abs() <= ctx.reach * x.abs().max()
        slope = torch.where(near, torch.full_like(x, ctx.derivative), (x > 0).to(x.dtype))
        return grad * slope, None, None


@contextlib.contextmanager
def branch_taken(model: nn.Module, reach: float | None, derivative: float) -> Iterator[None]:
    """Inside: every ReLU of `model` takes derivative `derivative` (1 or 0) at the inputs within
    KINK_REACH x reach of 0 (see the module docstring); nothing changes when reach is None."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)] if reach is not None else []
    for relu in relus:
        relu.forward = lambda x: _ReLUTakingBranch.apply(x, KINK_REACH * reach, derivative)
    try:
        yield
    finally:
        for relu in relus:
            del relu.forward


def kink_allowance(plain64, on64, off64, scale: float = 0.0) -> float:
    """How far taking the other branch at the kinks moves a float64 result, relative to its scale
    (max(max|plain64|, scale))."""
    plain = as_numpy(plain64)
    scale = max(float(np.abs(np.asarray(plain, np.float64)).max(initial=0.0)), scale)
    return max(relative_difference(plain, as_numpy(on64), scale),
               relative_difference(plain, as_numpy(off64), scale))
