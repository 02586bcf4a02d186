"""Throughput of the train step and of the augmentation pipeline, as one table with ratios.

    python bench/throughput.py --preset cpu [--batch-size 256] [--steps 5] [--compile]

Rows: the torch train step (two views forward + VICReg loss + backward + optimizer step) as eager
fp32 NCHW (the baseline), channels_last fp32, channels_last bf16 autocast, optionally
torch.compile; the same step fed by the shared loader (augmentation in background threads);
jax_impl's jitted step with XLA's convolution and with im2col convolutions (jax_impl's CPU
default), in fp32 and with bf16 compute (same preset and batch); and the augmentation
pipeline alone. Ratios are against the baseline measured in the same run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.augment import make_views  # noqa: E402
from shared.config import PRESETS, make_config  # noqa: E402
from shared.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from shared.loader import epoch_batches  # noqa: E402
from torch_impl.model import VICReg  # noqa: E402
from torch_impl.optim import build_optimizer  # noqa: E402
from torch_impl.runtime import pick_device, to_channels_last  # noqa: E402
from torch_impl.train import train_step  # noqa: E402


def time_steps(step, steps: int, device: torch.device) -> float:
    """Seconds per call of `step` after two warm-up calls."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def torch_step_rate(cfg, device, layout, amp, compile_step, steps) -> float:
    """Image pairs per second of the train step on fixed random views."""
    torch.manual_seed(0)
    model = VICReg(cfg.arch, cfg.width, cfg.mlp_dims()).to(device, memory_format=layout)
    optimizer = build_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    views = [torch.from_numpy(rng.normal(size=(cfg.batch_size, 3, 32, 32)).astype(np.float32))
             .to(device).contiguous(memory_format=layout) for _ in range(2)]
    fn = torch.compile(train_step) if compile_step else train_step
    return cfg.batch_size / time_steps(lambda: fn(model, optimizer, *views, cfg, amp), steps, device)


def jax_step_rate(cfg, bf16: bool, conv_impl: str, steps: int) -> float:
    """Image pairs per second of jax_impl's jitted train step on fixed random NHWC views."""
    import jax
    import jax.numpy as jnp

    from jax_impl.model import build_model
    from jax_impl.optim import build_optimizer as build_jax_optimizer
    from jax_impl.train import initial_state, make_train_step

    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), jnp.bfloat16 if bf16 else jnp.float32,
                        conv_impl)
    optimizer = build_jax_optimizer(cfg)
    step_fn = make_train_step(model, optimizer, cfg)
    rng = np.random.default_rng(0)
    views = [jnp.asarray(rng.normal(size=(cfg.batch_size, 32, 32, 3)).astype(np.float32))
             for _ in range(2)]
    holder = [initial_state(model, optimizer, cfg)]

    def step():
        holder[0], terms = step_fn(holder[0], *views, 0.01)
        jax.block_until_ready(terms)
    return cfg.batch_size / time_steps(step, steps, torch.device("cpu"))


def loader_fed_rate(cfg, device, amp, steps) -> float:
    """Image pairs per second of the chosen step fed by the shared loader (as in training)."""
    torch.manual_seed(0)
    model = VICReg(cfg.arch, cfg.width, cfg.mlp_dims()).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    images = np.random.default_rng(0).integers(0, 256, (cfg.batch_size * (steps + 2), 32, 32, 3),
                                               dtype=np.uint8)
    batches = epoch_batches(images, cfg.augment_params(CIFAR10_MEAN, CIFAR10_STD),
                            cfg.batch_size, 0, 0, workers=cfg.loader_workers())

    def step():
        batch = next(batches)
        train_step(model, optimizer, to_channels_last(batch.view_a, device),
                   to_channels_last(batch.view_b, device), cfg, amp)
    return cfg.batch_size / time_steps(step, steps, device)


def augment_rate(cfg, steps: int = 6) -> float:
    """Augmented images per second (both views counted) the loader delivers with its threads."""
    images = np.random.default_rng(0).integers(0, 256, (cfg.batch_size * steps, 32, 32, 3),
                                               dtype=np.uint8)
    params = cfg.augment_params(CIFAR10_MEAN, CIFAR10_STD)
    make_views(images[:cfg.batch_size], params, 0, 0, 0)
    start = time.perf_counter()
    for _ in epoch_batches(images, params, cfg.batch_size, 0, 0, workers=cfg.loader_workers()):
        pass
    return 2 * cfg.batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (slow "
                        "to compile on CPU)")
    parser.add_argument("--no-jax", action="store_true", help="skip the jax_impl rows")
    args = parser.parse_args()
    overrides = {"preset": args.preset}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg = make_config(overrides)
    device = pick_device()
    print(f"# {cfg.arch} width {cfg.width}, expander {cfg.mlp}, batch {cfg.batch_size}, "
          f"{cfg.optimizer}, device {device} ({torch.get_num_threads()} threads), torch "
          f"{torch.__version__}", flush=True)
    cl, nchw, bf16 = torch.channels_last, torch.contiguous_format, torch.bfloat16
    rows = [("torch eager fp32 NCHW (baseline)", nchw, None, False),
            ("torch channels_last fp32", cl, None, False),
            ("torch channels_last bf16 autocast", cl, bf16, False)]
    if args.compile:
        rows.append(("torch channels_last fp32 compiled", cl, None, True))
    results = []
    for name, layout, amp, compile_step in rows:
        results.append((name, torch_step_rate(cfg, device, layout, amp, compile_step, args.steps)))
        print(f"  measured {name}", file=sys.stderr, flush=True)
    best_name, best = max(results[1:], key=lambda r: r[1])
    best_amp = next(amp for name, _, amp, _ in rows if name == best_name)
    results.append((f"loader-fed: {best_name}", loader_fed_rate(cfg, device, best_amp, args.steps)))
    if not args.no_jax:
        for name, bf16, impl in (("jax jit fp32, lax conv", False, "lax"),
                                 ("jax jit fp32, im2col conv", False, "im2col"),
                                 ("jax jit bf16 compute, im2col conv", True, "im2col")):
            results.append((name, jax_step_rate(cfg, bf16, impl, args.steps)))
            print(f"  measured {name}", file=sys.stderr, flush=True)
    baseline = results[0][1]
    aug = augment_rate(cfg)
    print("\n| path | pairs/s | images/s | vs baseline |\n|---|---:|---:|---:|")
    for name, rate in results:
        print(f"| {name} | {rate:.1f} | {2 * rate:.1f} | {rate / baseline:.2f}x |")
    threads = cfg.loader_workers()
    print(f"| augmentation pipeline ({threads} loader thread{'s' if threads > 1 else ''}) | {aug / 2:.1f} | {aug:.1f} | |")
    print(f"\nfastest step: {best_name}, {best / baseline:.2f}x the eager fp32 baseline")
    print(f"augmentation: {aug / (2 * best):.1f}x the images/s the fastest step consumes")
    if not args.no_jax:
        jax_best = max(rate for name, rate in results if name.startswith("jax"))
        print(f"jax_impl: fastest jitted step {jax_best / best:.2f}x torch's fastest step")


if __name__ == "__main__":
    main()
