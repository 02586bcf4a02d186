"""Linear probe of a frozen backbone: `python -m torch_impl.probe --run RUN_DIR --dataset cifar10|gtsrb`.

Writes RUN_DIR/probe_<dataset>.json (probe_<dataset>_random_init.json with --random-init) and
prints one line with the top-1 accuracy.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from shared.config import Config, parse_probe_args
from shared.data import CIFAR10_MEAN, CIFAR10_STD, NUM_CLASSES, load_split
from shared.linear_probe import (normalize_images, probe_batches, probe_lr, probe_record,
                                 report_probe, standardize)
from shared.training import cli_main, gtsrb_available
from torch_impl.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_model_state
from torch_impl.model import VICReg
from torch_impl.runtime import autocast_dtype, memory_format, pick_device, to_channels_last


@torch.no_grad()
def extract_features(backbone: nn.Module, images: np.ndarray, cfg: Config, desc: str,
                     batch_size: int = 500) -> np.ndarray:
    """uint8 [N, 32, 32, 3] -> float32 features [N, F] of the backbone in eval mode."""
    device = next(backbone.parameters()).device
    amp = autocast_dtype(cfg.precision, device)
    backbone.eval()
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False,
                      file=sys.stderr, mininterval=1.0):
        x = normalize_images(images[start:start + batch_size], CIFAR10_MEAN, CIFAR10_STD)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            chunks.append(backbone(to_channels_last(x, device)).float().cpu().numpy())
    return np.concatenate(chunks)


def train_linear(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
                 cfg: Config) -> np.ndarray:
    """Fit a linear classifier on standardised features [N, F]; return test logits [M, C] float32."""
    torch.manual_seed(cfg.seed)
    train_x, test_x = standardize(train_x, test_x)
    classifier = nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=cfg.probe_lr, momentum=0.9,
                                weight_decay=cfg.probe_wd)
    features, labels = torch.from_numpy(train_x), torch.from_numpy(train_y.astype(np.int64))
    batches_per_epoch = len(probe_batches(len(train_x), cfg.probe_batch_size, cfg.seed, 0))
    total, step = cfg.probe_epochs * batches_per_epoch, 0
    for epoch in range(cfg.probe_epochs):
        for index in probe_batches(len(train_x), cfg.probe_batch_size, cfg.seed, epoch):
            for group in optimizer.param_groups:
                group["lr"] = probe_lr(step, total, cfg.probe_lr)
            idx = torch.from_numpy(index)
            loss = nn.functional.cross_entropy(classifier(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        return classifier(torch.from_numpy(test_x)).numpy()


def probe(cfg: Config, run_dir: Path, dataset: str, backbone: nn.Module, random_init: bool,
          checkpoint_epoch: int | None) -> dict:
    """Run the protocol on `dataset`, write probe_<dataset>[_random_init].json, return its dict."""
    started = time.perf_counter()
    x_train, y_train = load_split(dataset, cfg.data_dir, "train", download=cfg.download)
    x_test, y_test = load_split(dataset, cfg.data_dir, "test", download=cfg.download)
    f_train = extract_features(backbone, x_train, cfg, f"{dataset} train features")
    f_test = extract_features(backbone, x_test, cfg, f"{dataset} test features")
    logits = train_linear(f_train, y_train, f_test, NUM_CLASSES[dataset], cfg)
    result = probe_record("torch", dataset, logits, len(y_train), y_test, f_train.shape[1], cfg,
                          random_init, checkpoint_epoch, time.perf_counter() - started)
    report_probe(result, run_dir, cfg)
    return result


def probe_after_training(cfg: Config, run_dir: Path, backbone: nn.Module) -> dict:
    """The probes that end a training run: CIFAR-10, and GTSRB when its data is there."""
    results = {"cifar10": probe(cfg, run_dir, "cifar10", backbone, False, cfg.epochs)["top1"]}
    if gtsrb_available(cfg):
        results["gtsrb"] = probe(cfg, run_dir, "gtsrb", backbone, False, cfg.epochs)["top1"]
    else:
        print(f"GTSRB probe skipped: no {Path(cfg.data_dir) / 'gtsrb'} (pass --download)")
    return results


def load_backbone(cfg: Config, run_dir: Path, random_init: bool) -> tuple[nn.Module, int | None]:
    """The run's backbone with trained weights, or freshly initialised from cfg.seed."""
    torch.manual_seed(cfg.seed)
    model = VICReg(cfg.arch, cfg.width, cfg.mlp_dims())
    epoch = None
    if not random_init:
        path = run_dir / CHECKPOINT_FILE
        state = load_checkpoint(path)
        load_model_state(model, state["model"], path,
                         f"{cfg.arch} width {cfg.width} expander {cfg.mlp} (from config.json)")
        epoch = state["epoch"]
    return model.backbone.to(pick_device(), memory_format=memory_format(cfg.width)), epoch


def main(argv: list[str] | None = None) -> int:
    def body():
        cfg, args = parse_probe_args(argv, "torch")
        backbone, epoch = load_backbone(cfg, Path(args.run), args.random_init)
        probe(cfg, Path(args.run), args.dataset, backbone, args.random_init, epoch)
    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())
