"""Move a run's weights between frameworks: `python -m interop.convert RUN_DIR --to flax|torch`.

Reads one framework's checkpoint, maps its weights (interop.mapping) and writes the other's, so
that either framework's probe, trainer or load_backbone can use them. The mapping is exact both
ways (tests/test_interop.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from interop.weights import flax_variables, torch_network
from jax_impl import checkpoint as jax_checkpoint
from jax_impl.optim import build_optimizer as build_jax_optimizer
from shared.cli import UserErrorParser, cli_main, command_exit
from shared.config import Config
from shared.errors import UserError
from shared.runio import (
    CHECKPOINT_FILES,
    CONFIG_FILE,
    atomic_write_bytes,
    load_run_config,
    make_folder,
    record_checkpoint,
    run_folder_lock,
)
from torch_impl import checkpoint as torch_checkpoint
from torch_impl.optim import build_optimizer as build_torch_optimizer

# --to's choices -> the framework whose checkpoint is written
TARGETS = {"flax": "jax", "torch": "torch"}
PROGRESS = ("epoch", "global_step", "train_time_s", "metrics_bytes", "elapsed_s", "config")
_NOTE = ("Only the weights convert (parameters and BatchNorm statistics, plus epoch and progress "
         "counters); the optimizer state does not: the target holds a freshly initialised "
         "optimizer (zero LARS momentum / Adam moments), so a --resume from it restarts them.")


def progress_of(stored: dict) -> dict:
    """A checkpoint's progress entries (epoch, counters, settings), which a conversion keeps."""
    return {k: stored[k] for k in PROGRESS if k in stored}


def torch_to_flax(source: Path, target: Path, cfg: Config) -> tuple[int, int]:
    """Write `target` (checkpoint.msgpack) from the torch checkpoint `source`; returns its epoch
    and global step."""
    variables, stored = flax_variables(source, cfg)
    jax_checkpoint.save_checkpoint(target, {
        **variables, "opt_state": build_jax_optimizer(cfg).init(variables["params"]),
        **progress_of(stored)})
    return int(stored["epoch"]), int(stored["global_step"])


def flax_to_torch(source: Path, target: Path, cfg: Config) -> tuple[int, int]:
    """Write `target` (checkpoint.pt) from the JAX checkpoint `source`; returns its epoch and
    global step."""
    model, stored = torch_network(source, cfg)
    optimizer = build_torch_optimizer(cfg, model=model)
    torch_checkpoint.save_checkpoint(target, {"model": model.state_dict(),
                                              "optimizer": optimizer.state_dict(),
                                              **progress_of(stored)})
    return int(stored["epoch"]), int(stored["global_step"])


def convert(run_dir: Path, to: str, out: Path | None = None, force: bool = False) -> Path:
    """Convert RUN_DIR's checkpoint into the `to` format ("flax" or "torch") in `out` (default
    RUN_DIR).

    Refuses to overwrite an existing target checkpoint (or a different config.json) unless `force`;
    copies config.json so that `out` is a run folder the other framework's probe accepts.
    """
    run_dir, out = Path(run_dir), Path(out or run_dir)
    other = next(name for name in TARGETS if name != to)
    source = run_dir / CHECKPOINT_FILES[TARGETS[other]]
    target = out / CHECKPOINT_FILES[TARGETS[to]]
    if not source.is_file() and (run_dir / target.name).is_file():
        raise UserError(f"{run_dir} holds a {to} checkpoint ({target.name}) and no {other} one: "
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
    with run_folder_lock(out, "python -m interop.convert"):
        epoch, step = (torch_to_flax if to == "flax" else flax_to_torch)(source, target, cfg)
        if out_config != run_dir / CONFIG_FILE:
            atomic_write_bytes(out_config, config_bytes)
        for folder, written in ((run_dir, TARGETS[other]), (out, TARGETS[to])):
            record_checkpoint(folder, written, step)
    print(f"converted {source} ({other}, epoch {epoch}) -> {target} ({to}); optimizer state not "
          "converted", flush=True)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="python -m interop.convert",
        description="Convert a run folder's weights between PyTorch (checkpoint.pt) and Flax/JAX "
                    "(checkpoint.msgpack), so either framework's probe or trainer can use them. "
                    + _NOTE)
    parser.add_argument("run", metavar="RUN_DIR", help="run folder holding config.json and the "
                        "checkpoint to convert")
    parser.add_argument("--to", required=True, choices=tuple(TARGETS),
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
    command_exit(main)
