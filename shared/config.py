"""Every training setting in one dataclass, the named presets, and the one argparse builder.

Both trainers (`python -m torch_impl.train`, `python -m jax_impl.train`) build their command line
here, so a flag means the same thing in both frameworks, and `config.json` in a run folder holds
the same settings under the dataclass's field names (flag `--base-lr` is field `base_lr`).

Precedence: dataclass default (solo-learn's CIFAR-10 recipe) < preset < flags given on the command
line. With `--resume`, the run folder's `config.json` replaces the defaults and the preset, so only
the flags given again override it (for example a larger `--epochs`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from shared.archs import BLOCKS, stem_for
from shared.errors import UserError
from shared.loss_inputs import LOSS_VARIANTS, RENAMED_VARIANTS
from shared.machine import JAX_CACHE_ENV, auto_workers, default_data_dir, jax_cache_dir

ARCHS = tuple(BLOCKS)
OPTIMIZERS = ("lars", "adam")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULE_UNITS = ("step", "epoch")
AUGMENT_PLACES = ("auto", "host", "device")
BAD_IMAGE_ACTIONS = ("skip", "error")
BUDGET_SCOPES = ("training", "job")
# The datasets by name (shared.data reads them); "folder:PATH" names a folder of images.
DATASET_NAMES = ("cifar10", "cifar100", "stl10", "gtsrb")
FOLDER_PREFIX = "folder:"
# Each named dataset's own image side in pixels, and a folder's unless --image-size says otherwise.
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "gtsrb": 32}
FOLDER_SIZE = 32
MAX_IMAGE_SIZE = 1024

PRESETS: dict[str, dict] = {
    # solo-learn's CIFAR-10 recipe: the dataclass defaults.
    "default": {},
    # The seed course's settings.
    "homework": dict(
        batch_size=512, epochs=100, optimizer="adam", base_lr=2e-4, lr_scaling=False, wd=1e-6,
        warmup_epochs=0.0, final_lr_ratio=0.0, schedule_unit="epoch", blur_p=0.5, blur_kernel=3,
        solarize_p=0.2, loss_variant="no-eps"),
    # A narrow ResNet-18 trained for what 19 minutes leave once both probes' projected time is
    # kept for them, on whatever CPU runs it: within 20 minutes end to end on 2 cores
    # (docs/results/cpu_recipe.md has the settings tried).
    "cpu": dict(
        width=16, last_width=256, mlp="1024-1024-1024", epochs=100, time_budget="19m",
        budget_scope="job", batch_size=128,
        optimizer="lars", base_lr=0.6, lr_scaling=True, wd=1e-4, crop_min_scale=0.35,
        warmup_epochs=0.25, final_lr_ratio=0.01, probe_epochs=50, monitor_every=1.0,
        monitor_bank=5_000),
    # Seconds, for tests: a tiny network on a tiny subset, probed on a small subset.
    "smoke": dict(
        width=8, mlp="32-32", epochs=1, batch_size=16, subset=64, optimizer="lars",
        warmup_epochs=0.0, log_every=1, probe_epochs=5, probe_batch_size=32, probe_subset=500,
        precision="fp32", monitor_every=1.0, monitor_bank=128, monitor_test=64, monitor_k=20),
}

# What a setting shapes, which decides how the tools treat it:
#   BACKBONE     the untrained network (the random-init baseline depends on it); fixed once trained
#   PRETRAINING  what is learned, nothing else; fixed once trained
#   PROBE        the linear probe's protocol; may change on --resume, and between probes
#   RUN          where and how the run executes, not what it learns; may change on --resume
BACKBONE, PRETRAINING, PROBE, RUN = "backbone", "pretraining", "probe", "run"
# What a kNN monitor point is measured with: RUN and PROBE settings, yet fixed on --resume once
# the run monitors, so that config.json describes its earlier points too.
MONITOR_MEASURE = ("monitor_bank", "monitor_test", "monitor_k", "monitor_temperature")
# GTSRB has 43 classes, so a stratified probe subset needs at least that many images; CIFAR-10's
# 50,000 training images are the most any probe has.
MIN_PROBE_SUBSET, MAX_PROBE_SUBSET = 43, 50_000
DATA_DIR_HOLDS = ("folder holding the datasets (cifar-10-batches-py/, cifar-100-python/, "
                  "stl10_binary/, gtsrb/) and vicreg_cache/, where folders and resized datasets "
                  "are decoded once")
MAX_MONITOR_TEST = 10_000  # CIFAR-10's test split
# Bounds beyond which a value is a slip of the keyboard, not a setting.
MAX_EPOCHS, MAX_PROBE_EPOCHS, MAX_WORKERS, MAX_PROBE_LR = 100_000, 10_000, 64, 10.0


@dataclass(frozen=True)
class Range:
    """A condition a setting's value must meet, and how an error states it."""

    holds: Callable[[float], bool]
    says: str


POSITIVE = Range(lambda v: v > 0, "must be positive")
NON_NEGATIVE = Range(lambda v: v >= 0, "must be 0 or more")
PROBABILITY = Range(lambda v: 0 <= v <= 1, "must be a probability in [0, 1]")


_DURATION = re.compile(r"^(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?$")


def dataset_name_ok(name: str) -> bool:
    """Whether `name` names a dataset: one of DATASET_NAMES, or folder:PATH with a PATH."""
    return name in DATASET_NAMES or (name.startswith(FOLDER_PREFIX)
                                     and bool(name[len(FOLDER_PREFIX):].strip()))


def native_size(name: str) -> int:
    """The image side a dataset is read at unless --image-size says otherwise."""
    return NATIVE_SIZE.get(name, FOLDER_SIZE)


def parse_duration(text: str, flag_name: str = "--time-budget") -> float:
    """"90s" -> 90.0, "15m" -> 900.0, "2h" -> 7200.0, "1h30m" -> 5400.0; UserError naming
    `flag_name` otherwise (including zero)."""
    match = _DURATION.match(str(text).strip().lower())
    if not match or not any(match.groups()):
        raise UserError(f"{flag_name} {text}: expected a positive duration like 90s, 15m, 2h "
                        "or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if not 0 < total < math.inf:
        raise UserError(f"{flag_name} {text}: must be more than zero")
    return total


def duration_ok(text: str) -> bool:
    """Whether parse_duration accepts `text`."""
    try:
        parse_duration(text)
    except UserError:
        return False
    return True


def setting(default, help: str, role: str, *, choices: tuple = (), check: Range | None = None,
            sweep_owned: str = "", factory: Callable[[], object] | None = None,
            renamed: dict | None = None, absent=None, default_text: str = ""):
    """A Config field with everything the tools need to know about it: its --help text, its
    choices (and former names of them, still read: renamed), the range it must lie in, its role
    (BACKBONE, PRETRAINING, PROBE or RUN), when a sweep sets it itself, what to use instead, for a
    setting added later, the value that keeps a run whose config.json lacks it as it was
    (absent; None: the default), and how --help states a default that depends on other settings
    (default_text)."""
    metadata = {"help": help, "role": role, "choices": tuple(choices), "check": check,
                "sweep_owned": sweep_owned, "renamed": dict(renamed or {}), "absent": absent,
                "default_text": default_text}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class Config:
    """All settings of a pretraining run (and of the probe that ends it)."""

    # model
    arch: str = setting("resnet18", "backbone: " + ", ".join(ARCHS), BACKBONE, choices=ARCHS)
    width: int = setting(64, "channels of the first stage (64 is the standard ResNet; smaller is "
                         "faster)", BACKBONE, check=POSITIVE)
    last_width: int = setting(0, "channels of the last stage, the backbone's feature size with "
                              "basic blocks (0: 8 x --width, the standard ResNet's doubling; "
                              "its feature maps are the smallest, so a wider last stage enlarges "
                              "the probes' feature for the least time)", BACKBONE,
                              check=NON_NEGATIVE)
    mlp: str = setting("2048-2048-2048", "expander layer widths, e.g. 2048-2048-2048 "
                       "(Linear+BN+ReLU, last Linear without bias)", BACKBONE)
    # data
    dataset: str = setting("cifar10", "what to pretrain on: cifar10, cifar100, stl10 (its "
                           "100,000 unlabelled and 5,000 training images), gtsrb, or folder:PATH "
                           "(every image under PATH in any tree, or PATH/train/ and "
                           "PATH/unlabeled/ when it has a train/; a folder with train/<class>/ "
                           "and test/<class>/ (or val/) is also probed and monitored). The run "
                           "probes it when it has labels, then GTSRB when present",
                           PRETRAINING, check=Range(dataset_name_ok, "expected one of "
                                                    f"{', '.join(DATASET_NAMES)} or folder:PATH"))
    image_size: int = setting(32, "side of the square images in pixels: the data is resized to "
                              "it, the random crop outputs it, and the stem follows it (up to 64: "
                              "CIFAR's 3x3 stride-1 convolution, no max-pool; above: ImageNet's "
                              "7x7 stride-2 convolution and max-pool)", BACKBONE,
                              check=Range(lambda v: 8 <= v <= MAX_IMAGE_SIZE,
                                          f"must lie in [8, {MAX_IMAGE_SIZE}]"),
                              default_text="the dataset's: 32 for CIFAR-10, CIFAR-100, GTSRB "
                                           "and a folder, 96 for STL-10")
    bad_images: str = setting("skip", "an image file of a folder that cannot be read: skip it "
                              "(counted and named in one line) or error", RUN,
                              choices=BAD_IMAGE_ACTIONS)
    data_dir: str = setting(None, f"{DATA_DIR_HOLDS} (env VICREG_DATA_DIR, else ./data)", RUN,
                            sweep_owned="use --data-dir",
                            factory=lambda: str(default_data_dir()))
    download: bool = setting(False, "download missing datasets through torchvision's "
                             "downloaders (md5-checked)", RUN)
    subset: int = setting(0, "train on a stratified, seeded subset of this many images "
                          "(0 = all)", PRETRAINING, check=NON_NEGATIVE)
    # optimisation
    epochs: float = setting(1000.0, "pretraining length in epochs; a fraction ends the last "
                            "epoch early (with --time-budget: the most it may use; with "
                            "--resume: at least the run's, more extends it)", PRETRAINING,
                            check=Range(lambda v: 0 < v <= MAX_EPOCHS,
                                        f"must lie in (0, {MAX_EPOCHS:,}]"))
    time_budget: str = setting("", "train for this much wall time, e.g. 90s, 15m, 2h: the step "
                               "rate is measured first, then --epochs is set to the steps that "
                               "fit (at most --epochs; written to config.json) and warmup and "
                               "cosine span exactly that; empty: train --epochs",
                               PRETRAINING, check=Range(lambda v: v == "" or duration_ok(v),
                                                        "expected a positive duration like 90s, "
                                                        "15m, 2h or 1h30m"))
    budget_scope: str = setting("training", "what --time-budget covers: training (the probes "
                                "come after it), or job: the whole command, start-up, training "
                                "and the linear probes, whose time is projected before training "
                                "(their images counted and loaded, a sample embedded, a few "
                                "classifier steps timed) and kept from training's",
                                PRETRAINING, choices=BUDGET_SCOPES)
    batch_size: int = setting(256, "images per view per step (the global batch)", PRETRAINING,
                              check=Range(lambda v: v >= 2, "VICReg needs at least 2 images "
                                          "per batch (the variance and covariance terms are "
                                          "computed across the batch)"))
    optimizer: str = setting("lars", "optimizer: " + ", ".join(OPTIMIZERS), PRETRAINING,
                             choices=OPTIMIZERS)
    base_lr: float = setting(0.3, "base learning rate (scaled by batch_size/256 when lr scaling "
                             "is on)", PRETRAINING, check=POSITIVE)
    lr_scaling: bool = setting(True, "scale the learning rate by batch_size/256", PRETRAINING)
    wd: float = setting(1e-4, "weight decay (LARS: biases and norm parameters excluded)",
                        PRETRAINING, check=NON_NEGATIVE)
    momentum: float = setting(0.9, "LARS momentum", PRETRAINING,
                              check=Range(lambda v: 0 <= v < 1, "must lie in [0, 1)"))
    lars_eta: float = setting(0.02, "LARS trust coefficient eta", PRETRAINING, check=POSITIVE)
    warmup_epochs: float = setting(10.0, "linear warmup length in epochs (may be fractional; at "
                                   "most --epochs)", PRETRAINING, check=NON_NEGATIVE)
    final_lr_ratio: float = setting(0.001, "cosine schedule ends at this fraction of the peak "
                                    "learning rate", PRETRAINING,
                                    check=Range(lambda v: 0 <= v <= 1, "must lie in [0, 1]"))
    schedule_unit: str = setting("step", "update the learning rate every step or every epoch",
                                 PRETRAINING, choices=SCHEDULE_UNITS)
    # loss
    sim_coeff: float = setting(25.0, "weight of the invariance term (lambda)", PRETRAINING,
                               check=NON_NEGATIVE)
    std_coeff: float = setting(25.0, "weight of the variance term (mu)", PRETRAINING,
                               check=NON_NEGATIVE)
    cov_coeff: float = setting(1.0, "weight of the covariance term (nu)", PRETRAINING,
                               check=NON_NEGATIVE)
    loss_variant: str = setting("solo-learn", "variance term: solo-learn (mu [v(Z) + v(Z')], "
                                "solo-learn's), official (mu [v(Z) + v(Z')] / 2, "
                                "facebookresearch/vicreg's) or no-eps (solo-learn's without eps "
                                "in the square root, the seed course's; formerly homework)",
                                PRETRAINING, choices=LOSS_VARIANTS, renamed=RENAMED_VARIANTS)
    # augmentation
    crop_min_scale: float = setting(0.2, "smallest area fraction of the random "
                                    "resized crop", PRETRAINING,
                                    check=Range(lambda v: 0 < v <= 1, "must lie in (0, 1]"))
    flip_p: float = setting(0.5, "horizontal flip probability", PRETRAINING,
                            check=PROBABILITY)
    jitter_p: float = setting(0.8, "colour jitter probability", PRETRAINING,
                              check=PROBABILITY)
    brightness: float = setting(0.4, "colour jitter brightness strength",
                                PRETRAINING, check=NON_NEGATIVE)
    contrast: float = setting(0.4, "colour jitter contrast strength", PRETRAINING,
                              check=NON_NEGATIVE)
    saturation: float = setting(0.2, "colour jitter saturation strength",
                                PRETRAINING, check=NON_NEGATIVE)
    hue: float = setting(0.1, "colour jitter hue strength", PRETRAINING,
                         check=Range(lambda v: 0 <= v <= 0.5, "must lie in [0, 0.5]"))
    gray_p: float = setting(0.2, "grayscale probability", PRETRAINING,
                            check=PROBABILITY)
    blur_p: float = setting(0.0, "Gaussian blur probability", PRETRAINING,
                            check=PROBABILITY)
    blur_kernel: int = setting(3, "Gaussian blur kernel size (odd, smaller than "
                               "twice --image-size, which reflect padding needs)", PRETRAINING,
                               check=Range(lambda v: 0 < v and v % 2 == 1,
                                           "must be a positive odd number"))
    solarize_p: float = setting(0.1, "solarize probability", PRETRAINING,
                                check=PROBABILITY)
    # run
    seed: int = setting(0, "seed of initialisation, data order and augmentation", BACKBONE,
                        check=NON_NEGATIVE)
    out: str = setting("", "run folder (config.json, metrics.jsonl, checkpoint, summary.json); "
                       "default runs/<framework>-<preset>", RUN,
                       sweep_owned="the sweep names each run folder under SWEEP_DIR/runs/")
    preset: str = setting("default", "named settings: " + ", ".join(PRESETS) + " (flags given "
                          "override the preset)", PRETRAINING, sweep_owned="use --preset")
    precision: str = setting("auto", "auto (bf16 where the CPU or GPU supports it), bf16 or "
                             "fp32; the loss is always computed in float32", BACKBONE,
                             choices=PRECISIONS)
    workers: int = setting(0, f"loader threads, at most {MAX_WORKERS} (0 = auto: half the CPU "
                           "cores, 1 to 8)", RUN,
                           check=Range(lambda v: 0 <= v <= MAX_WORKERS,
                                       f"must lie in [0, {MAX_WORKERS}]"))
    augment_on: str = setting("auto", "where the views are computed: host (numpy, in the loader "
                              "threads), device (on the trainer's GPU or CPU, from parameters "
                              "drawn on the host: the same views), or auto (device on a GPU, "
                              "host on a CPU)", RUN, choices=AUGMENT_PLACES)
    compile: bool = setting(False, "torch.compile the forward pass and loss of the train step "
                            "(on a GPU the views computed there are always compiled); jax always "
                            "jit-compiles", RUN)
    jax_cache: bool = setting(True, "jax_impl: keep what XLA compiles (the step, the features, "
                              "the probe) in a persistent compilation cache on this machine, so "
                              "that a later run of the same shapes starts without compiling; "
                              f"env {JAX_CACHE_ENV} names another folder, or off (jax's own "
                              "JAX_COMPILATION_CACHE_DIR wins); torch_impl ignores it", RUN,
                              default_text="on, in "
                              f"{jax_cache_dir() or f'no folder: {JAX_CACHE_ENV} is off'}")
    log_every: int = setting(20, "write a metrics.jsonl line every this many steps", RUN,
                             check=POSITIVE)
    tensorboard: bool = setting(False, "also write the curves as TensorBoard events into "
                                "RUN/tensorboard/ (needs pip install -e \".[tensorboard]\"; view "
                                "them with tensorboard --logdir RUN/tensorboard)", RUN)
    sync_bn: bool = setting(True, "batch-norm statistics over the global batch when training on "
                            "several processes (torch_impl: SyncBatchNorm; no effect with one "
                            "process); jax_impl always normalises over the global batch",
                            PRETRAINING)
    # the kNN monitor (and the kNN probe's protocol)
    monitor_every: float = setting(5.0, "kNN monitor: every this many epochs (fractions allowed; "
                                   "a time-budgeted run's points fall in the epochs that fit) "
                                   "and at the end of training, classify the first "
                                   "--monitor-test test images by weighted kNN among the first "
                                   "--monitor-bank training images (features of the frozen "
                                   "backbone); 0 turns it off", RUN, check=NON_NEGATIVE,
                                   absent=0.0)
    monitor_bank: int = setting(10_000, "kNN monitor: its labelled bank, the first this many "
                                "training images of the run's dataset in dataset order (of the "
                                "whole set, whatever --subset)", RUN,
                                check=Range(lambda v: 0 < v <= MAX_PROBE_SUBSET,
                                            f"must lie in [1, {MAX_PROBE_SUBSET:,}]"))
    monitor_test: int = setting(10_000, "kNN monitor: it classifies the first this many test "
                                "images of the run's dataset", RUN,
                                check=Range(lambda v: 0 < v <= MAX_MONITOR_TEST,
                                            f"must lie in [1, {MAX_MONITOR_TEST:,}]"))
    monitor_k: int = setting(200, "kNN monitor and --protocol knn: the k most similar bank "
                             "images vote", PROBE, check=POSITIVE)
    monitor_temperature: float = setting(0.1, "kNN monitor and --protocol knn: a neighbour's "
                                         "vote weighs exp(cosine similarity / T)", PROBE,
                                         check=POSITIVE)
    # probe
    probe: bool = setting(True, "run the linear probe after training: on the run's dataset "
                          "when it has labels, and on GTSRB when present", RUN,
                          sweep_owned="every sweep run is probed")
    probe_epochs: int = setting(100, "linear probe epochs", PROBE,
                                check=Range(lambda v: 0 < v <= MAX_PROBE_EPOCHS,
                                            f"must lie in [1, {MAX_PROBE_EPOCHS:,}]"))
    probe_lr: float = setting(0.1, "linear probe peak learning rate (SGD, cosine; the "
                              "classifier reads standardised features, so 0.01 to 1 is the "
                              "useful range)", PROBE,
                              check=Range(lambda v: 0 < v <= MAX_PROBE_LR,
                                          f"must lie in (0, {MAX_PROBE_LR:g}]"))
    probe_wd: float = setting(0.0, "linear probe weight decay", PROBE, check=NON_NEGATIVE)
    probe_batch_size: int = setting(256, "linear probe batch size", PROBE, check=POSITIVE)
    probe_subset: int = setting(0, "probe on a stratified subset of this many train and as many "
                                "test images (0 = all; a split with fewer is probed whole)", PROBE,
                                check=Range(lambda v: v == 0 or MIN_PROBE_SUBSET <= v
                                            <= MAX_PROBE_SUBSET,
                                            f"must be 0 (all) or from {MIN_PROBE_SUBSET} (one "
                                            "image of each GTSRB class) to "
                                            f"{MAX_PROBE_SUBSET:,} (CIFAR-10's training split)"))

    def mlp_dims(self) -> list[int]:
        """The expander spec as layer widths, e.g. "2048-2048-2048" -> [2048, 2048, 2048]."""
        return parse_mlp(self.mlp)

    def stem(self) -> str:
        """The backbone's first layers for this run's image size (shared.archs.stem_for)."""
        return stem_for(self.image_size)

    def model_description(self) -> str:
        """How messages name the network: "resnet18 width 64 expander 2048-2048-2048"."""
        return f"{self.backbone_description()} expander {self.mlp}"

    def backbone_description(self) -> str:
        """How messages name the backbone: "resnet18 width 64", with "last stage 256" after it
        when --last-width sets it."""
        last = f" last stage {self.last_width}" if self.last_width else ""
        return f"{self.arch} width {self.width}{last}"

    def stored_model_description(self) -> str:
        """model_description() of a run's stored settings, as errors about its files name it."""
        return f"{self.model_description()} (from config.json)"

    def loader_workers(self) -> int:
        """Augmentation threads: --workers, or the automatic choice when it is 0."""
        return self.workers or auto_workers()

    def time_budget_s(self) -> float | None:
        """--time-budget in seconds, None without one."""
        return parse_duration(self.time_budget) if self.time_budget else None

    def peak_lr(self) -> float:
        """lr = base_lr x batch_size / 256 with linear scaling (the official rule), else base_lr."""
        return self.base_lr * self.batch_size / 256 if self.lr_scaling else self.base_lr

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def settings_with_role(*roles: str) -> list[str]:
    """The names of the Config fields whose role is one of `roles`, in declaration order."""
    return [f.name for f in fields(Config) if f.metadata["role"] in roles]


def sweep_owned() -> dict[str, str]:
    """Settings a sweep sets itself -> what to use instead of sweeping them."""
    return {f.name: f.metadata["sweep_owned"] for f in fields(Config) if f.metadata["sweep_owned"]}


def setting_types() -> dict[str, type]:
    """Config field name -> the Python type its value has (bool, int, float or str)."""
    defaults = Config()
    return {f.name: type(getattr(defaults, f.name)) for f in fields(Config)}


def flag(name: str) -> str:
    """A setting's command-line flag: base_lr -> --base-lr."""
    return "--" + name.replace("_", "-")


def parse_mlp(spec: str) -> list[int]:
    """"2048-2048-2048" -> [2048, 2048, 2048]; a malformed spec raises UserError."""
    parts = str(spec).split("-")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"malformed expander spec --mlp {spec!r}: expected positive integers "
                        "joined by '-', e.g. 2048-2048-2048")
    return [int(p) for p in parts]


def make_config(overrides: dict, base: Config | None = None) -> Config:
    """Preset values, then `overrides`, on top of `base` (default: the dataclass defaults)."""
    preset = overrides.get("preset", base.preset if base else "default")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values = dataclasses.asdict(base) if base else dataclasses.asdict(Config())
    if base is None:
        values.update(PRESETS[preset])
    values.update(overrides)
    if base is None and "image_size" not in {**PRESETS[preset], **overrides}:
        values["image_size"] = native_size(values["dataset"])
    if isinstance(values["dataset"], str) and dataset_name_ok(values["dataset"]):
        values["dataset"] = absolute_dataset(values["dataset"])
    unknown = set(values) - {f.name for f in fields(Config)}
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(sorted(unknown))}; "
                        f"valid: {', '.join(f.name for f in fields(Config))}")
    return validate(Config(**{name: current_name(name, value) for name, value in values.items()}))


def absolute_dataset(name: str) -> str:
    """folder:PATH with PATH made absolute (so a run resumes, and a sweep runs, from any folder);
    any other name as it is."""
    if not name.startswith(FOLDER_PREFIX):
        return name
    return FOLDER_PREFIX + str(Path(name[len(FOLDER_PREFIX):].strip()).expanduser().absolute())


def current_name(name: str, value):
    """A setting's value with a former name of a choice read as its current one."""
    renamed = {f.name: f.metadata["renamed"] for f in fields(Config)}[name]
    return renamed.get(value, value) if isinstance(value, str) else value


def _check_type(name: str, value, kind: type) -> None:
    """UserError unless `value` has the setting's type (an int is a valid float)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if type(value) is not kind:
        noun = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
        raise UserError(f"{flag(name)} takes {noun}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Check every setting a user can get wrong; raise UserError naming the flag and the fix."""
    types = setting_types()
    for f in fields(Config):
        value = getattr(cfg, f.name)
        _check_type(f.name, value, types[f.name])
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag(f.name)} {value}: must be a finite number")
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise UserError(f"unknown {f.name} {value!r}; choose one of: {', '.join(choices)}")
        check = f.metadata["check"]
        if check is not None and not check.holds(value):
            raise UserError(f"{flag(f.name)} {value}: {check.says}")
    cfg.mlp_dims()
    if cfg.blur_kernel >= 2 * cfg.image_size:
        raise UserError(f"--blur-kernel {cfg.blur_kernel}: must be smaller than twice the "
                        f"{cfg.image_size}-pixel image (--image-size), which reflect padding "
                        "needs")
    if cfg.monitor_every and cfg.monitor_k > cfg.monitor_bank:
        raise UserError(f"--monitor-k {cfg.monitor_k} is larger than the kNN monitor's bank "
                        f"(--monitor-bank {cfg.monitor_bank}); give fewer neighbours or a "
                        "larger bank")
    if cfg.warmup_epochs > cfg.epochs:
        raise UserError(f"--warmup-epochs {cfg.warmup_epochs:g} is longer than the run "
                        f"(--epochs {cfg.epochs:g}); the warmup must end within it")
    return cfg


def default_out(framework: str, preset: str) -> str:
    return str(Path("runs") / f"{framework}-{preset}")
