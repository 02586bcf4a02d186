"""Where a train step's time goes, in each framework: the two views' forward pass (train mode),
forward and backward, and the whole step (the optimizer update added), in fp32 on fixed random
views, as one table.

    python bench/step_parts.py --preset cpu [--batch-size 128] [--steps 5] [--xla-flags FLAGS]

Each part is timed in 3 rounds of --steps calls, the parts taking turns, and keeps its fastest
round. Each row is milliseconds per step for torch_impl (channels_last, the trainer's layout) and
jax_impl (XLA's convolution), the jax/torch ratio, and each part's share of its framework's step;
backward = (forward and backward) - forward. The optimizer update is the step less forward and
backward: a few percent, under what these timings resolve, so it gets no row. The
baseline is torch's time for the same part, measured in the same run. --xla-flags (e.g.
"--xla_cpu_use_onednn=true") is set before jax starts, to compare XLA:CPU's options.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import JaxBench, jax_sync, time_calls, torch_bench_state  # noqa: E402
from shared.config import PRESETS, Config, make_config  # noqa: E402
from torch_impl import step as torch_step  # noqa: E402

PARTS = ("forward", "forward and backward", "whole step")
ROUNDS = 3


def fastest_rounds(parts: list[Callable[[], object]], steps: int,
                   sync: Callable[[object], None]) -> list[float]:
    """Seconds per call of each part: the fastest of ROUNDS rounds of `steps` calls, the parts
    taking turns, so that the machine's drift moves every part alike and the differences
    between parts stay meaningful."""
    rounds = [[time_calls(part, steps, sync) for part in parts] for _ in range(ROUNDS)]
    return [min(times) for times in zip(*rounds, strict=True)]


def torch_parts(cfg: Config, steps: int) -> list[float]:
    """Seconds of each of PARTS for torch_impl's fp32 channels_last step."""
    state, (x_a, x_b) = torch_bench_state(cfg, torch.device("cpu"), torch.channels_last)
    model = state.model

    def forward():
        with torch.no_grad():
            return model(x_a), model(x_b)

    def forward_backward():
        state.optimizer.zero_grad(set_to_none=True)
        loss, _ = torch_step.step_loss(model, x_a, x_b, cfg, torch.float32)
        loss.backward()

    def step():
        torch_step.train_step(state, x_a, x_b, 0.01, cfg=cfg, dtype=torch.float32)

    return fastest_rounds([forward, forward_backward, step], steps, lambda _: None)


def jax_parts(cfg: Config, steps: int) -> list[float]:
    """Seconds of each of PARTS for jax_impl's fp32 jitted step."""
    import jax

    from jax_impl.step import initial_state, step_loss

    bench = JaxBench.build(cfg, bf16=False)
    model, (x_a, x_b) = bench.model, bench.views
    state = initial_state(cfg, model=model, optimizer=bench.optimizer)  # the step donates its own
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    forward = jax.jit(lambda v, a, b: (model.apply(v, a, train=True, mutable=["batch_stats"]),
                                       model.apply(v, b, train=True, mutable=["batch_stats"])))
    grads = jax.jit(jax.grad(lambda p, s, a, b: step_loss(model, p, s, a, b, cfg),
                             has_aux=True))
    return fastest_rounds([lambda: forward(variables, x_a, x_b),
                           lambda: grads(state.params, state.batch_stats, x_a, x_b), bench.step],
                          steps, jax_sync)


def table(torch_s: list[float], jax_s: list[float]) -> str:
    """The markdown table of PARTS, the backward pass and their shares (seconds in, ms out)."""
    def rows(seconds: list[float]) -> list[tuple[str, float]]:
        forward, both, whole = seconds
        return [("forward (two views)", forward), ("backward", both - forward),
                ("forward and backward", both), ("whole step", whole)]

    lines = ["| part | torch ms | share | jax ms | share | jax / torch |",
             "|---|---:|---:|---:|---:|---:|"]
    for (name, t), (_, j) in zip(rows(torch_s), rows(jax_s), strict=True):
        lines.append(f"| {name} | {t * 1e3:.1f} | {t / torch_s[2]:.0%} | {j * 1e3:.1f} | "
                     f"{j / jax_s[2]:.0%} | {j / t:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per part")
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for jax_impl's rows")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    overrides = {"preset": args.preset, "precision": "fp32"}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    cfg = make_config(overrides)
    print(f"{cfg.model_description()}, batch {cfg.batch_size}, fp32, {torch.get_num_threads()} "
          f"threads, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    print(table(torch_parts(cfg, args.steps), jax_parts(cfg, args.steps)))


if __name__ == "__main__":
    main()
