"""VICReg pretraining with PyTorch: `python -m torch_impl.train [--preset cpu] [flags]`.

Writes the run folder (config.json, metrics.jsonl, checkpoint.pt every epoch, summary.json), then
runs the linear probe on CIFAR-10 and, when its data is present, GTSRB.

`torchrun --nproc_per_node=N -m torch_impl.train [flags]` trains data-parallel on N processes
(torch_impl.distributed): --batch-size stays the global batch, and rank 0 writes the run folder.

The loop is shared.loop's, as jax_impl.train's; this module hands it torch_impl's backend.
"""
from __future__ import annotations

from shared.cli import cli_main, command_exit, parse_train_args
from shared.cluster import submitted_to_cluster
from shared.loop import run
from torch_impl.backend import open_backend
from torch_impl.distributed import world_from_env


def main(argv: list[str] | None = None) -> int:
    def body() -> dict | None:
        if submitted_to_cluster(argv, "torch"):
            return None
        cfg, resume = parse_train_args(argv, "torch")
        return run(cfg, resume, "torch", world_from_env(), open_backend)

    return cli_main(body)


if __name__ == "__main__":
    command_exit(main)
