"""Every training setting in one dataclass, the named presets, and the one argparse builder.

Both trainers (`python -m torch_impl.train`, `python -m jax_impl.train`) build their command line
here, so a flag means the same thing in both frameworks, and `config.json` in a run folder holds
the same settings under the dataclass's field names (flag `--base-lr` is field `base_lr`).

Precedence: dataclass default (solo-learn's CIFAR-10 recipe) < preset < flags given on the command
line. With `--resume`, the run folder's `config.json` replaces the defaults and the preset, so only
the flags given again override it (for example a larger `--epochs`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

from shared.archs import BLOCKS
from shared.augment import AugmentParams
from shared.data import default_data_dir
from shared.errors import UserError
from shared.loader import auto_workers

ARCHS = tuple(BLOCKS)
OPTIMIZERS = ("lars", "adam")
LOSS_VARIANTS = ("official", "homework")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULE_UNITS = ("step", "epoch")
PROBE_DATASETS = ("cifar10", "gtsrb")
# the augmentation defaults live in AugmentParams; Config exposes them as flags
_VIEWS = AugmentParams()


@dataclass
class Config:
    """All settings of a pretraining run (and of the probe that ends it)."""

    # model
    arch: str = "resnet18"
    width: int = 64
    mlp: str = "2048-2048-2048"
    # data
    data_dir: str = dataclasses.field(default_factory=lambda: str(default_data_dir()))
    download: bool = False
    subset: int = 0
    # optimisation
    epochs: int = 1000
    batch_size: int = 256
    optimizer: str = "lars"
    base_lr: float = 0.3
    lr_scaling: bool = True
    wd: float = 1e-4
    momentum: float = 0.9
    lars_eta: float = 0.02
    warmup_epochs: float = 10.0
    final_lr_ratio: float = 0.001
    schedule_unit: str = "step"
    # loss
    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0
    loss_variant: str = "official"
    # augmentation
    crop_min_scale: float = _VIEWS.crop_scale[0]
    flip_p: float = _VIEWS.flip_p
    jitter_p: float = _VIEWS.jitter_p
    brightness: float = _VIEWS.brightness
    contrast: float = _VIEWS.contrast
    saturation: float = _VIEWS.saturation
    hue: float = _VIEWS.hue
    gray_p: float = _VIEWS.gray_p
    blur_p: float = _VIEWS.blur_p
    blur_kernel: int = _VIEWS.blur_kernel
    solarize_p: float = _VIEWS.solarize_p
    # run
    seed: int = 0
    out: str = ""
    preset: str = "default"
    precision: str = "auto"
    workers: int = 0
    compile: bool = False
    log_every: int = 20
    sync_bn: bool = True
    # probe
    probe: bool = True
    probe_epochs: int = 100
    probe_lr: float = 0.1
    probe_wd: float = 0.0
    probe_batch_size: int = 256

    def augment_params(self, mean: tuple, std: tuple) -> AugmentParams:
        """The view pipeline's parameters, normalising with the pretraining data's mean and std."""
        return AugmentParams(
            crop_scale=(self.crop_min_scale, 1.0), flip_p=self.flip_p, jitter_p=self.jitter_p,
            brightness=self.brightness, contrast=self.contrast, saturation=self.saturation,
            hue=self.hue, gray_p=self.gray_p, blur_p=self.blur_p, blur_kernel=self.blur_kernel,
            solarize_p=self.solarize_p, mean=tuple(mean), std=tuple(std))

    def mlp_dims(self) -> list[int]:
        """The expander spec as layer widths, e.g. "2048-2048-2048" -> [2048, 2048, 2048]."""
        return parse_mlp(self.mlp)

    def loader_workers(self) -> int:
        """Augmentation threads: --workers, or the automatic choice when it is 0."""
        return self.workers or auto_workers()

    def peak_lr(self) -> float:
        """lr = base_lr x batch_size / 256 with linear scaling (the official rule), else base_lr."""
        return self.base_lr * self.batch_size / 256 if self.lr_scaling else self.base_lr

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


PRESETS: dict[str, dict] = {
    # solo-learn's CIFAR-10 recipe: the dataclass defaults.
    "default": {},
    # The seed course's settings.
    "homework": dict(
        batch_size=512, epochs=100, optimizer="adam", base_lr=2e-4, lr_scaling=False, wd=1e-6,
        warmup_epochs=0.0, final_lr_ratio=0.0, schedule_unit="epoch", blur_p=0.5, blur_kernel=3,
        solarize_p=0.2, loss_variant="homework"),
    # A narrow ResNet-18 that learns measurable features on a 2-core CPU in under 20 minutes.
    # On 2 AVX2 cores (fp32, ~150 pairs/s): 3 epochs over a 40,000-image stratified subset, ~13 min.
    "cpu": dict(
        width=16, mlp="1024-1024-1024", epochs=3, subset=40000, batch_size=256, optimizer="adam",
        base_lr=1e-3, lr_scaling=False, wd=1e-6, warmup_epochs=0.25, final_lr_ratio=0.01,
        probe_epochs=50),
    # Seconds, for tests: a tiny network on a tiny subset.
    "smoke": dict(
        width=8, mlp="32-32", epochs=1, batch_size=16, subset=64, optimizer="lars",
        warmup_epochs=0.0, log_every=1, probe_epochs=5, probe_batch_size=32, precision="fp32"),
}

_HELP = {
    "arch": "backbone: " + ", ".join(ARCHS),
    "width": "channels of the first stage (64 is the standard ResNet; smaller is faster)",
    "mlp": "expander layer widths, e.g. 2048-2048-2048 (Linear+BN+ReLU, last Linear without bias)",
    "data_dir": "folder holding cifar-10-batches-py/ and gtsrb/ (env VICREG_DATA_DIR, else ./data)",
    "download": "download missing datasets through torchvision's downloaders (md5-checked)",
    "subset": "train on a stratified, seeded subset of this many images (0 = all)",
    "epochs": "pretraining epochs",
    "batch_size": "images per view per step (the global batch)",
    "optimizer": "optimizer: " + ", ".join(OPTIMIZERS),
    "base_lr": "base learning rate (scaled by batch_size/256 when lr scaling is on)",
    "lr_scaling": "scale the learning rate by batch_size/256",
    "wd": "weight decay (LARS: biases and norm parameters excluded)",
    "momentum": "LARS momentum",
    "lars_eta": "LARS trust coefficient eta",
    "warmup_epochs": "linear warmup length in epochs (may be fractional)",
    "final_lr_ratio": "cosine schedule ends at this fraction of the peak learning rate",
    "schedule_unit": "update the learning rate every step or every epoch",
    "sim_coeff": "weight of the invariance term (lambda)",
    "std_coeff": "weight of the variance term (mu)",
    "cov_coeff": "weight of the covariance term (nu)",
    "loss_variant": "official (facebookresearch/vicreg) or homework (the seed course's)",
    "crop_min_scale": "smallest area fraction of the random resized crop",
    "flip_p": "horizontal flip probability",
    "jitter_p": "colour jitter probability",
    "brightness": "colour jitter brightness strength",
    "contrast": "colour jitter contrast strength",
    "saturation": "colour jitter saturation strength",
    "hue": "colour jitter hue strength",
    "gray_p": "grayscale probability",
    "blur_p": "Gaussian blur probability",
    "blur_kernel": "Gaussian blur kernel size (odd)",
    "solarize_p": "solarize probability",
    "seed": "seed of initialisation, data order and augmentation",
    "out": "run folder (config.json, metrics.jsonl, checkpoint, summary.json); "
           "default runs/<framework>-<preset>",
    "preset": "named settings: " + ", ".join(PRESETS) + " (flags given override the preset)",
    "precision": "auto (bf16 where the CPU or GPU supports it), bf16 or fp32; "
                 "the loss is always computed in float32",
    "workers": "augmentation threads (0 = auto: half the CPU cores, 1 to 8)",
    "compile": "compile the train step (torch.compile); jax always jit-compiles",
    "log_every": "write a metrics.jsonl line every this many steps",
    "sync_bn": "batch-norm statistics over the global batch when training on several processes "
               "(torch_impl: SyncBatchNorm; no effect with one process); jax_impl always "
               "normalises over the global batch",
    "probe": "run the linear probe (CIFAR-10, and GTSRB when present) after training",
    "probe_epochs": "linear probe epochs",
    "probe_lr": "linear probe peak learning rate (SGD, cosine)",
    "probe_wd": "linear probe weight decay",
    "probe_batch_size": "linear probe batch size",
}

_CHOICES = {"arch": ARCHS, "optimizer": OPTIMIZERS, "loss_variant": LOSS_VARIANTS,
            "precision": PRECISIONS, "schedule_unit": SCHEDULE_UNITS}


class UserErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line, exit 2) instead of exiting."""

    def error(self, message):
        raise UserError(message)


def parse_mlp(spec: str) -> list[int]:
    """"2048-2048-2048" -> [2048, 2048, 2048]; a malformed spec raises UserError."""
    parts = str(spec).split("-")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"malformed expander spec --mlp {spec!r}: expected positive integers "
                        "joined by '-', e.g. 2048-2048-2048")
    return [int(p) for p in parts]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser, defaults: Config) -> None:
    for f in fields(Config):
        default = getattr(defaults, f.name)
        help_text = f"{_HELP[f.name]} (default: {default})"
        if f.type == "bool" or isinstance(default, bool):
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            kind = type(default)
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, default=argparse.SUPPRESS,
                                choices=_CHOICES.get(f.name), metavar=f.name.upper(),
                                help=help_text)


def build_train_parser(framework: str) -> argparse.ArgumentParser:
    """The pretraining command line shared by torch_impl.train and jax_impl.train."""
    parser = UserErrorParser(
        prog=f"python -m {framework}_impl.train",
        description="Pretrain a ResNet with VICReg on CIFAR-10, then measure a linear probe on "
                    "CIFAR-10 and GTSRB. Defaults are solo-learn's CIFAR recipe (ResNet-18, "
                    "2048-2048-2048 expander, LARS, 1000 epochs); `--preset cpu` trains in "
                    "minutes on a laptop CPU.",
        epilog="presets (flags given override them): " + "; ".join(
            f"{name}: " + (", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults")
            for name, values in PRESETS.items()))
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint "
                             f"({'checkpoint.pt' if framework == 'torch' else 'checkpoint.msgpack'})")
    _add_config_flags(parser, Config())
    return parser


def make_config(overrides: dict, base: Config | None = None) -> Config:
    """Preset values, then `overrides`, on top of `base` (default: the dataclass defaults)."""
    preset = overrides.get("preset", base.preset if base else "default")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values = dataclasses.asdict(base) if base else dataclasses.asdict(Config())
    if base is None:
        values.update(PRESETS[preset])
    values.update(overrides)
    unknown = set(values) - {f.name for f in fields(Config)}
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(sorted(unknown))}; "
                        f"valid: {', '.join(f.name for f in fields(Config))}")
    return validate(Config(**values))


def validate(cfg: Config) -> Config:
    """Check every setting a user can get wrong; raise UserError with the fix."""
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise UserError(f"unknown {name} {getattr(cfg, name)!r}; choose one of: "
                            f"{', '.join(choices)}")
    cfg.mlp_dims()
    if cfg.batch_size < 2:
        raise UserError(f"--batch-size {cfg.batch_size}: VICReg needs at least 2 images per batch "
                        "(the variance and covariance terms are computed across the batch)")
    if cfg.width < 1 or cfg.epochs < 1 or cfg.subset < 0:
        raise UserError("--width and --epochs must be positive and --subset non-negative")
    if cfg.blur_kernel < 1 or cfg.blur_kernel % 2 == 0:
        raise UserError(f"--blur-kernel {cfg.blur_kernel}: must be a positive odd number")
    if cfg.workers < 0:
        raise UserError(f"--workers {cfg.workers}: must be 0 (auto) or positive")
    if cfg.log_every < 1 or cfg.probe_epochs < 1 or cfg.probe_batch_size < 1:
        raise UserError("--log-every, --probe-epochs and --probe-batch-size must be positive")
    return cfg


def default_out(framework: str, preset: str) -> str:
    return str(Path("runs") / f"{framework}-{preset}")


def load_run_config(run_dir: Path) -> Config:
    """The Config stored in RUN_DIR/config.json; UserError if missing or malformed."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"no run folder at {run_dir}: {path} is missing "
                        "(train first, or pass the folder given as --out)")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} does not hold a settings object")
    return make_config(values, base=Config())


def parse_train_args(argv: list[str] | None, framework: str) -> tuple[Config, bool]:
    """Parse the trainer's command line into (config, resume)."""
    args = vars(build_train_parser(framework).parse_args(argv))
    resume = args.pop("resume")
    out = args.get("out") or ""
    if resume:
        if not out:
            raise UserError("--resume needs --out RUN_DIR, the run folder to continue")
        stored = load_run_config(Path(out))
        cfg = make_config(args, base=stored)
        _check_same_model(stored, cfg, Path(out))
        return cfg, True
    cfg = make_config(args)
    if not cfg.out:
        cfg.out = default_out(framework, cfg.preset)
    return cfg, False


def _check_same_model(stored: Config, cfg: Config, run_dir: Path) -> None:
    for name in ("arch", "width", "mlp"):
        if getattr(stored, name) != getattr(cfg, name):
            raise UserError(f"run folder {run_dir} holds a {stored.arch} (width {stored.width}, "
                            f"expander {stored.mlp}); it cannot resume as {name}="
                            f"{getattr(cfg, name)!r}")


def build_probe_parser(framework: str) -> argparse.ArgumentParser:
    """The linear-probe command line shared by torch_impl.probe and jax_impl.probe."""
    parser = UserErrorParser(
        prog=f"python -m {framework}_impl.probe",
        description="Linear probe: extract features of the frozen backbone (eval-mode BN) for the "
                    "un-augmented train and test images once, train a linear classifier on them "
                    "(SGD, cosine) and report top-1 on the test split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by the trainer")
    parser.add_argument("--dataset", default="cifar10", choices=PROBE_DATASETS,
                        help="dataset to probe on")
    parser.add_argument("--random-init", action="store_true",
                        help="probe an untrained backbone of the run's architecture (baseline)")
    for name in ("data_dir", "download", "probe_epochs", "probe_lr", "probe_wd",
                 "probe_batch_size", "precision"):
        flag = _flag(name)
        default = getattr(Config(), name)
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=_HELP[name])
        else:
            parser.add_argument(flag, dest=name, type=type(default), default=argparse.SUPPRESS,
                                choices=_CHOICES.get(name), help=_HELP[name] + " (default: the "
                                "run's setting)")
    return parser


def parse_probe_args(argv: list[str] | None, framework: str) -> tuple[Config, argparse.Namespace]:
    """Parse the probe's command line into (the run's config with probe overrides, the args)."""
    args = build_probe_parser(framework).parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("run", "dataset", "random_init")}
    cfg = make_config(overrides, base=load_run_config(Path(args.run)))
    return cfg, args
