"""Throughput of the train step, of each trainer's real path, and of the augmentation, as one table.

    python bench/throughput.py --preset cpu [--batch-size 256] [--steps 5] [--rows GROUPS]
                               [--compile] [--no-jax]

Rows, each in image pairs per second (both views of a pair counted once) and as a ratio to the
baseline measured in the same run:
  - the torch train step alone on fixed views (two views forward + VICReg loss + backward +
    optimizer step): eager fp32 NCHW (the baseline), channels_last fp32, channels_last bf16
    autocast; with --compile, eager against torch.compile (default mode, and reduce-overhead,
    which replays CUDA graphs) at the trainer's precision;
  - jax_impl's jitted step alone: XLA's convolution and im2col, fp32 and bf16 compute;
  - each trainer's own step as it trains by default on this device (its precision, layout and
    convolution), alone on fixed views, then end to end: fed by the loader with the views computed
    on the host (numpy, in the loader threads), and with the views computed on the device from the
    loader's drawn parameters (--augment-on host / device);
  - the augmentation alone: numpy in the loader threads, and each framework on its device.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.augment import draw_views, make_views, view_params  # noqa: E402
from shared.backend import World  # noqa: E402
from shared.cli import plural  # noqa: E402
from shared.config import PRESETS, Config, make_config  # noqa: E402
from shared.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from shared.loader import epoch_batches  # noqa: E402
from torch_impl import augment as torch_augment  # noqa: E402
from torch_impl import step as torch_step  # noqa: E402
from torch_impl.model import build_model, init_variables  # noqa: E402
from torch_impl.optim import build_optimizer  # noqa: E402
from torch_impl.runtime import compute_dtype, pick_device  # noqa: E402


def time_calls(call: Callable[[], object], steps: int, sync: Callable[[object], None]) -> float:
    """Seconds per call of `call` after two warm-up calls; sync(result) waits for the device."""
    for _ in range(2):
        sync(call())
    start = time.perf_counter()
    for _ in range(steps):
        result = call()
    sync(result)
    return (time.perf_counter() - start) / steps


def torch_sync(device: torch.device) -> Callable[[object], None]:
    return (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)


def jax_sync(result) -> None:
    import jax
    jax.block_until_ready(result)


def random_views(cfg: Config, shape: tuple) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(cfg.batch_size, *shape)).astype(np.float32) for _ in range(2)]


def random_images(cfg: Config, steps: int) -> np.ndarray:
    """uint8 [B (steps + 3), 32, 32, 3]: enough for the warm-up and timed steps of one epoch."""
    return np.random.default_rng(0).integers(0, 256, (cfg.batch_size * (steps + 3), 32, 32, 3),
                                             dtype=np.uint8)


def torch_bench_state(cfg: Config, device, layout) -> tuple[torch_step.TrainState,
                                                              list[torch.Tensor]]:
    """A fresh torch_impl train state on `device` in `layout`, and two fixed random views
    (float32 [B, 3, 32, 32]) in that layout."""
    model = init_variables(build_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(),
                                       cfg.last_width), 0)
    model = model.to(device, memory_format=layout)
    state = torch_step.TrainState(model, build_optimizer(cfg, model=model))
    views = [torch.from_numpy(v).to(device).contiguous(memory_format=layout)
             for v in random_views(cfg, (3, 32, 32))]
    return state, views


def torch_step_rate(cfg: Config, device, layout, dtype, compile_mode: str | bool,
                    steps: int) -> float:
    """The torch train step alone on fixed random views in `layout`, computing in `dtype`;
    compile_mode: False (eager) or a torch.compile mode."""
    state, views = torch_bench_state(cfg, device, layout)
    loss_fn = (torch.compile(torch_step.step_loss, mode=compile_mode) if compile_mode
               else torch_step.step_loss)

    def step():
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done
        return torch_step.train_step(state, *views, 0.01, cfg=cfg, dtype=dtype,
                                     loss_fn=loss_fn)[1]
    return cfg.batch_size / time_calls(step, steps, torch_sync(device))


@dataclass
class JaxBench:
    """jax_impl's model, optimizer and jitted step, two fixed random NHWC views (float32
    [B, 32, 32, 3]) and the state the step trains (the step donates it, so `step` keeps the new
    one)."""

    model: Any
    optimizer: Any
    step_fn: Callable
    views: list
    state: Any

    @classmethod
    def build(cls, cfg: Config, bf16: bool, conv_impl: str | None = None) -> JaxBench:
        import jax.numpy as jnp

        from jax_impl.model import build_model as build_jax_model
        from jax_impl.optim import build_optimizer as build_jax_optimizer
        from jax_impl.step import initial_state, make_train_step

        model = build_jax_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(), cfg.last_width,
                                dtype=jnp.bfloat16 if bf16 else jnp.float32, conv_impl=conv_impl)
        optimizer = build_jax_optimizer(cfg)
        return cls(model, optimizer, make_train_step(cfg, model=model, optimizer=optimizer),
                   [jnp.asarray(v) for v in random_views(cfg, (32, 32, 3))],
                   initial_state(cfg, model=model, optimizer=optimizer))

    def step(self):
        """One train step on the views; its loss terms."""
        self.state, terms = self.step_fn(self.state, *self.views, 0.01)
        return terms


def jax_step_rate(cfg: Config, bf16: bool, conv_impl: str | None, steps: int) -> float:
    """jax_impl's jitted train step alone on fixed random NHWC views."""
    bench = JaxBench.build(cfg, bf16, conv_impl)
    return cfg.batch_size / time_calls(bench.step, steps, jax_sync)


def trainer_backend(framework: str, cfg: Config, images: np.ndarray):
    """(the trainer's Backend, a fresh state) as `python -m {framework}_impl.train` builds them for
    cfg on this machine's default device."""
    backend_module = importlib.import_module(f"{framework}_impl.backend")
    runtime = importlib.import_module(f"{framework}_impl.runtime")
    augment = view_params(cfg, CIFAR10_MEAN, CIFAR10_STD)
    backend = backend_module.Backend(cfg, World(), images, augment, runtime.pick_device())
    return backend, backend.initial_state()


def trainer_rate(framework: str, cfg: Config, augment_on: str | None, steps: int) -> float:
    """The trainer's own step on fixed views (augment_on None), or its epoch loop's work end to
    end: loader, views (on the host or the device), step."""
    cfg = dataclasses.replace(cfg, augment_on=augment_on or "host")
    images = random_images(cfg, steps)
    backend, state = trainer_backend(framework, cfg, images)
    holder = [state]
    if augment_on is None:
        fixed = next(epoch_batches(images, view_params(cfg, CIFAR10_MEAN, CIFAR10_STD),
                                   batch_size=cfg.batch_size, seed=0, epoch=0))
        inputs = backend.step_inputs(fixed)

        def step():
            holder[0], terms = backend.step_fn(holder[0], *inputs, 0.01)
            return terms
    else:
        batches = epoch_batches(images, view_params(cfg, CIFAR10_MEAN, CIFAR10_STD),
                                batch_size=cfg.batch_size, seed=0, epoch=0,
                                workers=cfg.loader_workers(), on_device=backend.on_device)

        def step():
            holder[0], terms = backend.train_step(holder[0], next(batches), 0.01)
            return terms
    return cfg.batch_size / time_calls(step, steps, backend.wait)


def numpy_augment_rate(cfg: Config, steps: int) -> float:
    """Image pairs per second the loader's threads deliver, views computed on the host."""
    images = random_images(cfg, steps)
    params = view_params(cfg, CIFAR10_MEAN, CIFAR10_STD)
    make_views(images[:cfg.batch_size], params, 0, 0, 0)
    start = time.perf_counter()
    for count, _ in enumerate(epoch_batches(images, params, batch_size=cfg.batch_size, seed=0,
                                            epoch=0,
                                            workers=cfg.loader_workers()), start=1):
        if count == steps:
            break
    return cfg.batch_size * steps / (time.perf_counter() - start)


def device_augment_rate(framework: str, cfg: Config, steps: int) -> float:
    """Image pairs per second of one framework's apply_view on its device (both views), from
    parameters drawn ahead."""
    params = view_params(cfg, CIFAR10_MEAN, CIFAR10_STD)
    images = random_images(cfg, 0)[:cfg.batch_size]
    drawn = draw_views(cfg.batch_size, 32, 32, params, 0, 0, 0)
    if framework == "torch":
        device = pick_device()
        pixels = torch.from_numpy(images).to(device)
        views = [torch_augment.device_params(p, device=device) for p in drawn]
        return cfg.batch_size / time_calls(
            lambda: [torch_augment.apply_view(pixels, p, params) for p in views], steps,
            torch_sync(device))
    import jax

    from jax_impl import augment as jax_augment
    apply = jax.jit(lambda x, a, b: (jax_augment.apply_view(x, a, params),
                                     jax_augment.apply_view(x, b, params)))
    pixels = jax.numpy.asarray(images)
    views = [jax_augment.device_params(p) for p in drawn]
    return cfg.batch_size / time_calls(lambda: apply(pixels, *views), steps, jax_sync)


def row_groups(cfg: Config, steps: int, jax_rows: bool) -> dict[str, list[tuple[str, Callable]]]:
    """The rows, by group: name -> [(row name, measure() -> pairs/s)]."""
    device = pick_device()
    cl, nchw = torch.channels_last, torch.contiguous_format
    fp32, bf16 = torch.float32, torch.bfloat16
    trainer_dtype = compute_dtype(cfg.precision, device)
    frameworks = ["torch", "jax"] if jax_rows else ["torch"]
    groups = {
        "steps": [
            ("torch eager fp32 NCHW (baseline)",
             lambda: torch_step_rate(cfg, device, nchw, fp32, False, steps)),
            ("torch channels_last fp32",
             lambda: torch_step_rate(cfg, device, cl, fp32, False, steps)),
            ("torch channels_last bf16 autocast",
             lambda: torch_step_rate(cfg, device, cl, bf16, False, steps))],
        "compile": [
            ("torch channels_last, trainer precision, eager",
             lambda: torch_step_rate(cfg, device, cl, trainer_dtype, False, steps)),
            ("torch channels_last, trainer precision, torch.compile",
             lambda: torch_step_rate(cfg, device, cl, trainer_dtype, "default", steps)),
            ("torch channels_last, trainer precision, torch.compile reduce-overhead "
             "(CUDA graphs)",
             lambda: torch_step_rate(cfg, device, cl, trainer_dtype, "reduce-overhead", steps))],
        "jax": [] if not jax_rows else [
            ("jax jit fp32, lax conv", lambda: jax_step_rate(cfg, False, "lax", steps)),
            ("jax jit fp32, im2col conv", lambda: jax_step_rate(cfg, False, "im2col", steps)),
            ("jax jit bf16 compute, lax conv", lambda: jax_step_rate(cfg, True, "lax", steps)),
            ("jax jit bf16 compute, im2col conv",
             lambda: jax_step_rate(cfg, True, "im2col", steps))],
        "trainers": [row for fw in frameworks for row in (
            (f"{fw}_impl.train step alone (its default path)",
             lambda fw=fw: trainer_rate(fw, cfg, None, steps)),
            (f"{fw}_impl.train end to end, views on the host",
             lambda fw=fw: trainer_rate(fw, cfg, "host", steps)),
            (f"{fw}_impl.train end to end, views on the device",
             lambda fw=fw: trainer_rate(fw, cfg, "device", steps)))],
        "augment": [(f"augmentation alone: numpy, {plural(cfg.loader_workers(), 'loader thread')}",
                     lambda: numpy_augment_rate(cfg, steps))] + [
            (f"augmentation alone: {fw}_impl.augment on the device",
             lambda fw=fw: device_augment_rate(fw, cfg, steps)) for fw in frameworks],
    }
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--last-width", type=int, default=None,
                        help="the last stage's channels (the trainers' --last-width)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--rows", default="steps,jax,trainers,augment",
                        help="groups of rows, comma-separated: steps (the torch step's layouts "
                             "and precisions), compile (eager against torch.compile, slow to "
                             "compile), jax (jax_impl's step), trainers (each trainer alone and "
                             "end to end, views on the host and on the device), augment (the "
                             "augmentation alone)")
    parser.add_argument("--compile", action="store_true", help="add the compile rows")
    parser.add_argument("--no-jax", action="store_true", help="skip the jax_impl rows")
    args = parser.parse_args()
    overrides = {"preset": args.preset}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.last_width is not None:
        overrides["last_width"] = args.last_width
    cfg = make_config(overrides)
    groups = row_groups(cfg, args.steps, not args.no_jax)
    chosen = args.rows.split(",") + (["compile"] if args.compile else [])
    unknown = set(chosen) - set(groups)
    if unknown:
        parser.error(f"unknown row group(s) {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(groups)}")
    device = pick_device()
    print(f"# {cfg.model_description()}, batch {cfg.batch_size}, "
          f"{cfg.optimizer}, device {device} ({torch.get_num_threads()} threads), torch "
          f"{torch.__version__}, {plural(cfg.loader_workers(), 'loader thread')}", flush=True)
    results = []
    for group in groups:
        if group not in chosen:
            continue
        for name, measure in groups[group]:
            try:
                results.append((name, measure()))
            except Exception as error:  # one row that cannot run here must not hide the others
                print(f"| {name} | failed: {type(error).__name__}: "
                      f"{str(error).strip().splitlines()[-1][:160]} | | |", flush=True)
                continue
            if len(results) == 1:
                print(f"\n| path | pairs/s | images/s | vs {name} |\n|---|---:|---:|---:|")
            rate = results[-1][1]
            ratio = "" if name.startswith("augmentation") else f"{rate / results[0][1]:.2f}x"
            print(f"| {name} | {rate:.1f} | {2 * rate:.1f} | {ratio} |", flush=True)
    rate = dict(results)
    for fw in ("torch", "jax"):
        alone = rate.get(f"{fw}_impl.train step alone (its default path)")
        if alone:
            host = rate[f"{fw}_impl.train end to end, views on the host"]
            on_device = rate[f"{fw}_impl.train end to end, views on the device"]
            print(f"{fw}_impl.train end to end / step alone: host {host / alone:.2f}x, device "
                  f"{on_device / alone:.2f}x (device against host: {on_device / host:.2f}x)")


if __name__ == "__main__":
    main()
