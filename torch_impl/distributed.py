"""Data-parallel training for torch_impl: one process per device, started by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT for the rendezvous). A
process started without them is a job of one, and nothing here changes what it computes.

The loss is the single-process loss of the global batch. Every process gathers the embeddings of
all W processes (FullGatherLayer) and computes the same loss L on them. Gradients, per parameter:

    gather backward:  sum over processes of dL/dz, this process's rows  = W dL/dz_local
    local backward:   W g_r, g_r = the part of dL/dtheta through this process's images
    DDP all-reduce:   (1 / W) sum_r W g_r = sum_r g_r = dL/dtheta

so the W from the gather and DDP's 1 / W cancel and no loss scaling is needed. Batch-norm layers
take their statistics over the global batch (--sync-bn, on by default) with the same convention:
their backward sums the gradients of the statistics over processes.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from shared.backend import World
from shared.errors import UserError
from torch_impl.runtime import pick_device


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    """The World torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; World() without them."""
    if "WORLD_SIZE" not in environ:
        return World()
    try:
        size = int(environ["WORLD_SIZE"])
        world = World(int(environ["RANK"]), size,
                      int(environ.get("LOCAL_RANK", environ["RANK"])), parts=size)
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE is set but RANK, WORLD_SIZE or LOCAL_RANK is missing or not an "
                        "integer; start data-parallel runs with torchrun") from None
    if not 0 <= world.rank < world.size or world.local_rank < 0:
        raise UserError(f"RANK {world.rank} is outside WORLD_SIZE {world.size} (or LOCAL_RANK "
                        f"{world.local_rank} is negative); start data-parallel runs with torchrun")
    return world


def process_device(world: World) -> torch.device:
    """This process's device: its machine's GPU number LOCAL_RANK when there is CUDA, else CPU."""
    device = pick_device()
    if world.size == 1 or device.type != "cuda":
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {world.local_rank} but this machine has "
                        f"{torch.cuda.device_count()} GPUs; start at most one process per GPU "
                        "(torchrun --nproc_per_node)")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


@contextmanager
def joined(world: World) -> Iterator[torch.device]:
    """Inside: this process's device, in the job's process group (NCCL on GPUs, gloo on CPUs) when
    world.size > 1; the group is destroyed on the way out."""
    device = process_device(world)
    if world.size == 1:
        yield device
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def on_main(world: World, action: Callable[[], object]) -> None:
    """action() on rank 0 only; a UserError there is raised on every rank, so the job stops as one
    instead of leaving the others waiting in their next collective."""
    if world.size == 1:
        action()
        return
    message = [None]
    if world.is_main:
        try:
            action()
        except UserError as exc:
            message = [str(exc)]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise UserError(message[0])


def broadcast_from_main(world: World, value: float) -> float:
    """Rank 0's `value` (a number) in every rank (the job's processes agree on what rank 0
    decided)."""
    if world.size == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


class FullGatherLayer(torch.autograd.Function):
    """all_gather that keeps the gradient, as facebookresearch/vicreg's FullGatherLayer.

    forward: [B, D] on each of W processes -> W tensors [B, D] in rank order, the same everywhere.
    backward: every process's loss uses every process's rows, so the gradient of a process's rows
    is the sum over processes of their gradients: all_reduce(sum) of the W gradients, then this
    process's slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(output, x)
        return tuple(output)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        all_gradients = torch.stack(grads)
        dist.all_reduce(all_gradients)
        return all_gradients[dist.get_rank()]


def gather_batch(z: torch.Tensor) -> torch.Tensor:
    """[B, D] from each process -> the global batch [W B, D] in rank order, differentiable
    (FullGatherLayer); z itself outside a process group of several."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return z
    return torch.cat(FullGatherLayer.apply(z))


class AllReduceSum(torch.autograd.Function):
    """A sum over processes that every process's loss uses: forward all_reduce(sum) of x; backward
    all_reduce(sum) of the gradient, d(sum_r L_r)/dx = sum_r dL_r/d(sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch for CPUs, where nn.SyncBatchNorm (and DDP holding one)
    refuses to run: training statistics per channel over the n = (rows x pixels) x W values,

        mean = sum x / n,   var = sum (x - mean)^2 / n,   y = (x - mean) / sqrt(var + eps) w + b,

    running_var takes the unbiased var n / (n - 1), as nn.BatchNorm does; eval: running statistics.
    Input [N, C] or [N, C, H, W]; parameter and buffer names are nn.BatchNorm's.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected an input of 2 or more dimensions, got {x.ndim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        axes = [0, *range(2, x.ndim)]
        per_channel = (1, -1) + (1,) * (x.ndim - 2)
        n = x.numel() // x.shape[1] * dist.get_world_size()
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 statistics lose digits
        mean = AllReduceSum.apply(wide.sum(axes)) / n
        centred = wide - mean.view(per_channel)
        # two passes (mean, then squared deviations) rather than E[x^2] - mean^2, which cancels
        var = AllReduceSum.apply(centred.square().sum(axes)) / n
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        scale = torch.rsqrt(var + self.eps) * self.weight
        y = centred * scale.view(per_channel) + self.bias.view(per_channel)
        return y.to(x.dtype)


def _to_global_batch_norm(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        norm = GlobalBatchNorm(module.num_features, module.eps, module.momentum,
                               device=module.weight.device, dtype=module.weight.dtype)
        norm.load_state_dict(module.state_dict())
        return norm
    for name, child in module.named_children():
        setattr(module, name, _to_global_batch_norm(child))
    return module


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every BatchNorm normalising over the global batch: nn.SyncBatchNorm on GPUs,
    GlobalBatchNorm elsewhere. Weights, running statistics and state_dict names are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_global_batch_norm(model)


def data_parallel(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module the train steps call: DistributedDataParallel(model) (averages the gradients
    over processes), or model itself in a job of one."""
    if world.size == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
