"""The command lines of both trainers and both probes, built once from Config's fields.

A setting's flag, help text, choices and parsing come from its field in shared.config, so a flag
means the same in both frameworks and in a sweep's KEY=VALUE. Every mistake is a UserError: one
line on stderr and exit status 2 (cli_main), Ctrl-C one line and 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from shared.config import (
    DATASET_NAMES,
    PRESETS,
    PROBE,
    Config,
    absolute_dataset,
    dataset_name_ok,
    default_out,
    flag,
    make_config,
    setting_types,
    sweep_owned,
)
from shared.errors import (
    Interrupted,
    UserError,
    check_interrupted,
    kept_interrupts,
    resources_as_user_errors,
)
from shared.launcher import LAUNCHER_DESTS, add_launcher_arguments
from shared.runio import CHECKPOINT_FILES, check_resumable, load_run_config, tool_command


class UserErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line, exit 2) instead of exiting, and
    takes no abbreviated flags (--epoch is not --epochs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(message)


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def parse_setting(name: str, text: str, where: str):
    """The value of setting `name` written as `text` (a flag's argument, a sweep's KEY=VALUE), of
    the setting's type; UserError "<where> takes ..." otherwise. Ranges are validate's."""
    kind = setting_types()[name]
    text = text.strip()
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise UserError(f"{where} takes true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        noun = {int: "an integer", float: "a number"}.get(kind, "a value")
        raise UserError(f"{where} takes {noun}, got {text!r}") from None


def check_setting_name(key: str, where: str) -> str:
    """The Config field named `key` (flag spelling with '-' accepted); UserError otherwise."""
    name = key.strip().replace("-", "_")
    types = setting_types()
    owned = sweep_owned()
    if name in owned:
        raise UserError(f"{where}: {name} cannot be swept ({owned[name]})")
    if name not in types:
        close = difflib.get_close_matches(name, types, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"{where}: unknown setting {key!r}; {hint}settings are config.json's "
                        "field names, listed by `python -m torch_impl.train --help`")
    return name


def parse_assignment(text: str, where: str) -> tuple[str, str]:
    """"KEY=VALUE" -> (setting name, value text)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"{where}: expected KEY=VALUE, got {text!r}")
    return check_setting_name(key, where), value


def setting_flags(settings: dict) -> list[str]:
    """The flags that give `settings`: {"std_coeff": 10.0, "lr_scaling": False} ->
    ["--std-coeff", "10", "--no-lr-scaling"]."""
    flags = []
    for name, value in settings.items():
        if isinstance(value, bool):
            flags.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            flags += [flag(name), format_value(value)]
    return flags


def plural(count: float, noun: str) -> str:
    """"1 epoch", "2.5 epochs", "3 runs": a count and its noun, which takes an s unless 1."""
    return f"{count:g} {noun}{'' if count == 1 else 's'}"


def format_value(value) -> str:
    """A setting value as flags, run names and tables write it: 10.0 -> "10", True -> "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def _add_setting_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, default,
                      default_text: str) -> None:
    help_text = f"{f.metadata['help']} (default: {default_text})"
    if isinstance(default, bool):
        parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=help_text)
    else:
        parser.add_argument(flag(f.name), dest=f.name,
                            type=lambda text: parse_setting(f.name, text, flag(f.name)),
                            default=argparse.SUPPRESS,
                            choices=(*f.metadata["choices"], *f.metadata["renamed"]) or None,
                            metavar=f.name.upper(), help=help_text)


def build_train_parser(framework: str) -> argparse.ArgumentParser:
    """The pretraining command line shared by torch_impl.train and jax_impl.train."""
    parser = UserErrorParser(
        prog=tool_command(framework, "train"),
        description="Pretrain a ResNet with VICReg on CIFAR-10 (or --dataset cifar100, stl10, "
                    "gtsrb, folder:PATH), then measure a linear probe on it and on GTSRB. "
                    "Defaults are solo-learn's CIFAR recipe (ResNet-18, "
                    "2048-2048-2048 expander, LARS, 1000 epochs); `--preset cpu` trains in "
                    "minutes on a laptop CPU.",
        epilog="presets (flags given override them): " + "; ".join(
            f"{name}: " + (", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults")
            for name, values in PRESETS.items()))
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint "
                             f"({CHECKPOINT_FILES[framework]}); only --epochs and a run's "
                             "--time-budget (to extend it), the probe settings and how the run "
                             "executes (--data-dir, --workers, --log-every, --compile, "
                             "--no-probe, --monitor-every) may change, not what its kNN "
                             "monitor points were measured with (--monitor-bank, "
                             "--monitor-test, --monitor-k, --monitor-temperature)")
    defaults = Config()
    for f in fields(Config):
        default = getattr(defaults, f.name)
        _add_setting_flag(parser, f, default, f.metadata["default_text"] or format_value(default))
    add_launcher_arguments(parser, sweep=False)
    return parser


def parse_train_args(argv: list[str] | None, framework: str) -> tuple[Config, bool]:
    """Parse the trainer's command line into (config, resume); the --launcher flags are
    submitted_to_cluster's."""
    args = vars(build_train_parser(framework).parse_args(argv))
    for name in LAUNCHER_DESTS:
        args.pop(name, None)
    resume = args.pop("resume")
    out = args.get("out") or ""
    if resume:
        if not out:
            raise UserError("--resume needs --out RUN_DIR, the run folder to continue")
        stored = load_run_config(Path(out))
        cfg = make_config(args, base=stored)
        check_resumable(stored, cfg, Path(out))
        return cfg, True
    cfg = make_config(args)
    if not cfg.out:
        cfg.out = default_out(framework, cfg.preset)
    return cfg, False


def build_probe_parser(framework: str) -> argparse.ArgumentParser:
    """The linear-probe command line shared by torch_impl.probe and jax_impl.probe."""
    parser = UserErrorParser(
        prog=tool_command(framework, "probe"),
        description="Probe a run's frozen backbone: extract its features (eval-mode BN) of the "
                    "un-augmented train and test images once, then train a linear classifier on "
                    "them (SGD, cosine) or, with --protocol knn, classify the test images by "
                    "weighted kNN among the train images; report top-1 on the test split. "
                    "Writes RUN/probe_<dataset>[_knn].json (a run trained by the other "
                    f"framework: probe_<dataset>[_knn]_{framework}.json).")
    parser.add_argument("--run", required=True, help="run folder written by the trainer")
    parser.add_argument("--dataset", default=None, type=probe_dataset,
                        help=f"dataset to probe on: {', '.join(DATASET_NAMES)} or folder:PATH "
                             "(PATH/train/<class>/... and PATH/test/<class>/..., or val/), read "
                             "at the run's --image-size (default: the run's --dataset when it "
                             "has labels)")
    parser.add_argument("--random-init", action="store_true",
                        help="probe an untrained backbone of the run's architecture (baseline)")
    parser.add_argument("--protocol", default="linear", choices=("linear", "knn"),
                        help="linear (a classifier trained on the frozen features; default) or "
                             "knn (weighted kNN with the training split as the bank, "
                             "--monitor-k neighbours at --monitor-temperature; writes "
                             "probe_<dataset>_knn.json)")
    defaults = Config()
    for f in fields(Config):
        if f.metadata["role"] == PROBE or f.name in ("data_dir", "download", "precision",
                                                     "bad_images", "jax_cache"):
            _add_setting_flag(parser, f, getattr(defaults, f.name), "the run's setting")
    return parser


def probe_dataset(text: str) -> str:
    """--dataset of a probe: a dataset name (folder:PATH made absolute); UserError otherwise."""
    if not dataset_name_ok(text):
        raise UserError(f"--dataset {text!r}: expected one of {', '.join(DATASET_NAMES)} or "
                        "folder:PATH")
    return absolute_dataset(text)


def parse_probe_args(argv: list[str] | None, framework: str) -> tuple[Config, argparse.Namespace]:
    """Parse the probe's command line into (the run's config with probe overrides, the args);
    args.dataset is the run's dataset when none is given."""
    args = build_probe_parser(framework).parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("run", "dataset", "random_init", "protocol")}
    # a probe runs no monitor: its kNN's bank is the probe's training split (check_knn)
    run_cfg = dataclasses.replace(load_run_config(Path(args.run)), monitor_every=0.0)
    cfg = make_config(overrides, base=run_cfg)
    args.dataset = args.dataset or cfg.dataset
    return cfg, args


def cli_main(body: Callable[[], object]) -> int:
    """Run a command's body; a UserError becomes `error: ...` on stderr and exit status 2, Ctrl-C
    `interrupted: ...` and 130."""
    try:
        with kept_interrupts(), resources_as_user_errors():
            body()
            check_interrupted()
    except UserError as exc:
        print(f"{exc.label}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return Interrupted.exit_code
    return 0


def command_exit(main: Callable[[], int]) -> NoReturn:
    """End a command's process with main()'s exit status. After Ctrl-C (130) the process ends at
    once, its output flushed, without the interpreter's shutdown: one that begins while XLA still
    compiles in its own threads can crash (a segmentation fault instead of 130)."""
    code = main()
    if code == Interrupted.exit_code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
