"""Move a run's weights between frameworks: `python -m jax_impl.convert RUN_DIR --to flax|torch`.

torch's checkpoint.pt holds VICReg.state_dict() (`backbone.layer1.0.conv1.weight`, ...); the flax
variables carry the same names as paths (jax_impl.model), so a key is the path joined with "."
with `kernel` read as `weight`. Conv kernels are HWIO in flax and OIHW in torch, linear kernels
[in, out] and [out, in]; BN statistics and num_batches_tracked map one to one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jax_impl.checkpoint import (
    CHECKPOINT_FILE,
    TORCH_CHECKPOINT_FILE,
    check_variables,
    load_checkpoint,
    save_checkpoint,
)
from jax_impl.model import build_model, variable_shapes
from jax_impl.optim import build_optimizer
from shared.cli import UserErrorParser, cli_main
from shared.config import Config, load_run_config
from shared.errors import UserError
from shared.runio import CONFIG_FILE, atomic_write_bytes, make_folder, run_folder_lock

FORMATS = {"flax": CHECKPOINT_FILE, "torch": TORCH_CHECKPOINT_FILE}
_NOTE = ("Only the weights convert (parameters and BatchNorm statistics, plus epoch and progress "
         "counters); the optimizer state does not: the target holds a freshly initialised "
         "optimizer (zero LARS momentum / Adam moments), so a --resume from it restarts them.")


def torch_name(path: tuple[str, ...]) -> str:
    """Flax variable path (no collection) -> torch key: ("projector", "0", "kernel")
    -> "projector.0.weight"."""
    *modules, leaf = path
    return ".".join([*modules, "weight" if leaf == "kernel" else leaf])


def kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Conv HWIO -> OIHW, linear [in, out] -> [out, in]."""
    return kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T


def kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T


def to_torch_state(variables: dict) -> dict[str, np.ndarray]:
    """{"params", "batch_stats"} -> {torch key: array in torch's layout} (num_batches_tracked
    int64)."""
    state = {}
    for (_, *path), value in flatten_dict(variables).items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            value = kernel_to_torch(value)
        elif path[-1] == "num_batches_tracked":
            value = value.astype(np.int64)
        state[torch_name(tuple(path))] = np.array(value, order="C")  # 0-d stays 0-d
    return state


def from_torch_state(state: dict[str, np.ndarray], expected: dict, source: Path, what: str) -> dict:
    """{torch key: array} -> {"params", "batch_stats"} shaped like `expected` (variable_shapes).

    A missing, extra or reshaped tensor is a one-line UserError naming `what`.
    """
    paths = list(flatten_dict(expected))
    flat = {}
    for (collection, *path) in paths:
        key = torch_name(tuple(path))
        if key not in state:
            raise UserError(f"{source} does not fit {what}: it was written for another "
                            f"architecture (missing {key})")
        value = np.array(state[key])  # a copy: torch tensors' numpy views may change later
        flat[(collection, *path)] = kernel_from_torch(value) if path[-1] == "kernel" else value
    extra = sorted(set(state) - {torch_name(tuple(p)) for _, *p in paths})
    if extra:
        raise UserError(f"{source} does not fit {what}: it was written for another architecture "
                        f"(unexpected {extra[0]}, {len(extra)} in all)")
    return check_variables(unflatten_dict(flat), expected, source, what)


def _describe(cfg: Config) -> str:
    return f"{cfg.model_description()} (from config.json)"


def _progress(state: dict) -> dict:
    return {k: state[k]
            for k in ("epoch", "global_step", "train_time_s", "metrics_bytes", "config")}


def torch_to_flax(source: Path, target: Path, cfg: Config) -> int:
    """Write `target` (checkpoint.msgpack) from the torch checkpoint `source`; returns its epoch."""
    from torch_impl.checkpoint import (
        load_checkpoint as load_torch,  # lazy: only conversion needs torch
    )

    state = load_torch(source)
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims())
    weights = {k: v.detach().cpu().numpy() for k, v in state["model"].items()}
    variables = from_torch_state(weights, variable_shapes(model), source, _describe(cfg))
    save_checkpoint(target, {**variables,
                             "opt_state": build_optimizer(cfg).init(variables["params"]),
                             **_progress(state)})
    return int(state["epoch"])


def flax_to_torch(source: Path, target: Path, cfg: Config) -> int:
    """Write `target` (checkpoint.pt) from the JAX checkpoint `source`; returns its epoch."""
    import torch  # lazy: only conversion needs torch

    from torch_impl.checkpoint import load_model_state
    from torch_impl.checkpoint import save_checkpoint as save_torch
    from torch_impl.model import build_model as build_torch_model
    from torch_impl.optim import build_optimizer as build_torch_optimizer

    state = load_checkpoint(source)
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims())
    variables = check_variables({"params": state["params"], "batch_stats": state["batch_stats"]},
                                variable_shapes(model), source, _describe(cfg))
    torch_model = build_torch_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.seed)
    weights = {k: torch.from_numpy(v) for k, v in to_torch_state(variables).items()}
    load_model_state(torch_model, weights, source, _describe(cfg))
    save_torch(target, {"model": torch_model.state_dict(),
                        "optimizer": build_torch_optimizer(torch_model, cfg).state_dict(),
                        **_progress(state)})
    return int(state["epoch"])


def convert(run_dir: Path, to: str, out: Path | None = None, force: bool = False) -> Path:
    """Convert RUN_DIR's checkpoint into the `to` format ("flax" or "torch") in `out` (default
    RUN_DIR).

    Refuses to overwrite an existing target checkpoint (or a different config.json) unless `force`;
    copies config.json so that `out` is a run folder the other framework's probe accepts.
    """
    run_dir, out = Path(run_dir), Path(out or run_dir)
    other = "torch" if to == "flax" else "flax"
    source, target = run_dir / FORMATS[other], out / FORMATS[to]
    if not source.is_file() and (run_dir / FORMATS[to]).is_file():
        raise UserError(f"{run_dir} holds a {to} checkpoint ({FORMATS[to]}) and no {other} one: "
                        f"nothing to convert --to {to} (did you mean --to {other}?)")
    cfg = load_run_config(run_dir)
    config_bytes = (run_dir / CONFIG_FILE).read_bytes()
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to overwrite it or choose "
                        "another --out")
    out_config = out / CONFIG_FILE
    if out_config.exists() and out_config.read_bytes() != config_bytes and not force:
        raise UserError(f"{out_config} holds other settings than {run_dir / CONFIG_FILE}; "
                        "pass --force to overwrite it or choose another --out")
    make_folder(out, "output folder")
    with run_folder_lock(out, "python -m jax_impl.convert"):
        epoch = (torch_to_flax if to == "flax" else flax_to_torch)(source, target, cfg)
        if out_config != run_dir / CONFIG_FILE:
            atomic_write_bytes(out_config, config_bytes)
    print(f"converted {source} ({other}, epoch {epoch}) -> {target} ({to}); optimizer state not "
          "converted", flush=True)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="python -m jax_impl.convert",
        description="Convert a run folder's weights between PyTorch (checkpoint.pt) and Flax/JAX "
                    "(checkpoint.msgpack), so either framework's probe or trainer can use them. "
                    + _NOTE)
    parser.add_argument("run", metavar="RUN_DIR", help="run folder holding config.json and the "
                        "checkpoint to convert")
    parser.add_argument("--to", required=True, choices=tuple(FORMATS),
                        help="target format: flax (writes checkpoint.msgpack from checkpoint.pt) "
                             "or torch (writes checkpoint.pt from checkpoint.msgpack)")
    parser.add_argument("--out", default=None, help="folder to write the converted checkpoint and "
                        "config.json into (default: RUN_DIR itself)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing target checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body():
        args = build_parser().parse_args(argv)
        convert(Path(args.run), args.to, Path(args.out) if args.out else None, args.force)
    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())
