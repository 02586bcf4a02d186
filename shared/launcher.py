"""How runs are launched, as the flags say: here (--launcher local, --parallel N for a sweep) or as
SLURM jobs (--launcher slurm and its resources), checked into one LauncherSettings. The jobs
themselves are shared.cluster's.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from shared.config import parse_duration
from shared.errors import UserError

LAUNCHERS = ("local", "slurm")
DEFAULT_TIMEOUT = "24h"
CPUS_PER_GPU = 10  # the official VICReg launcher's
_SLURM_ONLY = ("partition", "gpus_per_node", "nodes", "cpus_per_task", "timeout", "account",
               "slurm_params", "wait")


@dataclass(frozen=True)
class LauncherSettings:
    """Where runs execute: kind "local" (parallel runs at a time) or "slurm" (the job's
    resources: per node, gpus_per_node GPUs driven by one task of cpus_per_task CPUs)."""

    kind: str = "local"
    parallel: int = 1
    partition: str | None = None
    gpus_per_node: int = 1
    nodes: int = 1
    cpus_per_task: int = CPUS_PER_GPU
    timeout_min: int = int(parse_duration(DEFAULT_TIMEOUT) // 60)
    account: str | None = None
    slurm_params: tuple[tuple[str, str], ...] = ()
    wait: bool = False

    @property
    def processes(self) -> int:
        """The data-parallel parts of a run's training: torch processes or JAX devices."""
        return max(self.gpus_per_node, 1) * self.nodes


def add_launcher_arguments(parser: argparse.ArgumentParser, sweep: bool) -> None:
    """The --launcher flags, for shared.sweep (sweep=True: --parallel too) and the trainers."""
    what = "each run" if sweep else "the run"
    group = parser.add_argument_group(
        "where it runs", f"--launcher slurm submits {what} as a SLURM job through submitit "
                         "(pip install -e \".[cluster]\"), requeued from its checkpoint when "
                         "preempted or out of time; the job ids go to jobs.json")
    group.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local: this machine (default); slurm: one SLURM job "
                            + ("a run, submitted as a job array" if sweep else "for the run"))
    if sweep:
        group.add_argument("--parallel", type=int, metavar="N",
                           help="--launcher local: runs at a time (default 1), each given a GPU "
                                "of its own when the machine has GPUs (CUDA_VISIBLE_DEVICES)")
    group.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    group.add_argument("--gpus-per-node", type=int, metavar="G",
                       help="GPUs a job takes on each node (default 1; 0 for a CPU job); with "
                            "several, torch trains through torchrun, one process a GPU, and JAX "
                            "on all of them from one process")
    group.add_argument("--nodes", type=int, metavar="N",
                       help="nodes a job spans (default 1); --batch-size stays the global batch")
    group.add_argument("--cpus-per-task", type=int, metavar="C",
                       help=f"CPUs of each node's task (default {CPUS_PER_GPU} a GPU)")
    group.add_argument("--timeout", metavar="DURATION",
                       help=f"a job's time limit, e.g. 90m, 24h (default {DEFAULT_TIMEOUT}); at "
                            "the limit the job checkpoints and requeues itself")
    group.add_argument("--account", help="SLURM account to charge")
    group.add_argument("--slurm", action="append", dest="slurm_params", metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. --slurm constraint=a100 --slurm "
                            "mem=64G (repeatable)")
    group.add_argument("--wait", action="store_true",
                       help="stay until every submitted job has ended, showing each run's state "
                            "as it changes")


LAUNCHER_DESTS = ("launcher", "parallel", *_SLURM_ONLY)


def launcher_settings(args: argparse.Namespace) -> LauncherSettings:
    """The launcher the parsed flags ask for; UserError for flags that do not go together."""
    given = {name: getattr(args, name, None) for name in _SLURM_ONLY}
    given = {name: value for name, value in given.items()
             if value is not None and value is not False}  # 0 is a given (bad) count
    parallel = getattr(args, "parallel", None)
    if args.launcher == "local":
        if given:
            raise UserError(f"{flag_of(next(iter(given)))} is for --launcher slurm")
        if parallel is not None and parallel < 1:
            raise UserError(f"--parallel {parallel}: must be 1 or more")
        return LauncherSettings("local", parallel or 1)
    if parallel is not None:
        raise UserError("--parallel is for --launcher local (SLURM starts every job it can)")
    settings = LauncherSettings("slurm", partition=given.get("partition"),
                                account=given.get("account"), wait=given.get("wait", False))
    gpus = given.get("gpus_per_node", settings.gpus_per_node)
    nodes = given.get("nodes", settings.nodes)
    cpus = given.get("cpus_per_task", CPUS_PER_GPU * max(gpus, 1))
    for name, value, least in (("gpus_per_node", gpus, 0), ("nodes", nodes, 1),
                               ("cpus_per_task", cpus, 1)):
        if value < least:
            raise UserError(f"{flag_of(name)} {value}: must be {least} or more")
    timeout_min = max(1, round(parse_duration(given.get("timeout", DEFAULT_TIMEOUT),
                                              "--timeout") / 60))
    return LauncherSettings("slurm", 1, settings.partition, gpus, nodes, cpus, timeout_min,
                            settings.account, parse_slurm_params(given.get("slurm_params", [])),
                            settings.wait)


def flag_of(dest: str) -> str:
    return "--slurm" if dest == "slurm_params" else "--" + dest.replace("_", "-")


def parse_slurm_params(texts: list[str]) -> tuple[tuple[str, str], ...]:
    """["constraint=a100", "mem=64G"] -> (("constraint", "a100"), ("mem", "64G"))."""
    params = []
    for text in texts:
        key, sep, value = text.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not value.strip():
            raise UserError(f"--slurm {text!r}: expected KEY=VALUE, an sbatch option and its "
                            "value, e.g. constraint=a100")
        params.append((key, value.strip()))
    return tuple(params)
