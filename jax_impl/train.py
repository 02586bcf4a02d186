"""VICReg pretraining with JAX: `python -m jax_impl.train [--preset cpu] [flags]`.

The twin of torch_impl.train: the same flags, batches and run folder (config.json, metrics.jsonl,
checkpoint.msgpack every epoch, summary.json), then the linear probe on CIFAR-10 and, when its data
is present, GTSRB. The train step is one jax.jit-compiled pure function (jax_impl.step).

It trains data-parallel over every device jax sees (jax_impl.distributed): the batch sharded over
them, the state replicated; several processes join one job through jax.distributed. --batch-size
stays the global batch, and process 0 writes the run folder.

The loop is shared.loop's, as torch_impl.train's; this module hands it jax_impl's backend.
"""
from __future__ import annotations

from jax_impl.backend import open_backend
from jax_impl.distributed import world_from_env
from jax_impl.runtime import use_compilation_cache
from shared.cli import cli_main, command_exit, parse_train_args
from shared.cluster import submitted_to_cluster
from shared.loop import run


def main(argv: list[str] | None = None) -> int:
    def body() -> dict | None:
        if submitted_to_cluster(argv, "jax"):
            return None
        cfg, resume = parse_train_args(argv, "jax")
        use_compilation_cache(cfg.jax_cache)
        return run(cfg, resume, "jax", world_from_env(), open_backend)

    return cli_main(body)


if __name__ == "__main__":
    command_exit(main)
