"""Linear probe of a frozen backbone:
`python -m torch_impl.probe --run RUN_DIR [--dataset NAME] [--protocol linear|knn]`.

Writes RUN_DIR/probe_<dataset>.json (probe_<dataset>_random_init.json with --random-init;
..._torch.json for a run trained by jax_impl) and prints one line with the top-1 accuracy. This
module supplies the protocol's two framework parts, the feature extractor and the classifier
trainer; the rest is shared.linear_probe.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from shared.cli import command_exit
from shared.config import Config
from shared.data import CIFAR10_MEAN, CIFAR10_STD
from shared.linear_probe import (
    Features,
    check_knn,
    normalize_images,
    probe_batches,
    probe_lr,
    probe_main,
    standardize,
)
from shared.runio import trained_epochs
from torch_impl.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_model_state
from torch_impl.model import backbone_of, build_model, init_variables
from torch_impl.runtime import (
    autocast,
    compute_dtype,
    memory_format,
    pick_device,
    to_channels_last,
)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: np.ndarray, cfg: Config, desc: str,
                     batch_size: int = 500) -> np.ndarray:
    """uint8 [N, S, S, 3] -> float32 features [N, F] of the backbone in eval mode (a backbone
    in training, as the kNN monitor finds it, is put back in train mode after)."""
    device = next(backbone.parameters()).device
    dtype = compute_dtype(cfg.precision, device)
    was_training = backbone.training
    backbone.eval()
    chunks = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch",
                          leave=False, file=sys.stderr, mininterval=1.0):
            x = normalize_images(images[start:start + batch_size], CIFAR10_MEAN, CIFAR10_STD)
            with autocast(device, dtype):
                chunks.append(backbone(to_channels_last(x, device)).float().cpu().numpy())
    finally:
        backbone.train(was_training)
    return np.concatenate(chunks)


def train_linear(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
                 cfg: Config) -> np.ndarray:
    """Fit a linear classifier on standardised features [N, F]; return test logits [M, C]
    float32."""
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


@torch.no_grad()
def knn_predict(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, num_classes: int,
                k: int, temperature: float, batch_size: int = 1024) -> np.ndarray:
    """Weighted kNN (lightly's benchmark protocol) in the features' dtype: bank [N, F], labels
    int [N], queries [M, F] -> predicted labels int64 [M].

    s_ij = <q_i / |q_i|, b_j / |b_j|>; the k largest s_ij of query i (equal ones in bank order)
    vote exp(s_ij / T) for their label; the class with the largest sum wins (ties: the lower).
    """
    check_knn(k, temperature, len(bank))
    device = pick_device()
    unit_bank = F.normalize(torch.from_numpy(bank).to(device), dim=1)
    labels = torch.from_numpy(bank_labels.astype(np.int64)).to(device)
    predictions = []
    for start in range(0, len(queries), batch_size):
        unit = F.normalize(torch.from_numpy(queries[start:start + batch_size]).to(device), dim=1)
        similarity, order = torch.sort(unit @ unit_bank.T, dim=1, descending=True, stable=True)
        weights = torch.exp(similarity[:, :k] / temperature)
        votes = torch.zeros(len(unit), num_classes, dtype=weights.dtype, device=device)
        votes.scatter_add_(1, labels[order[:, :k]], weights)
        predictions.append(votes.argmax(dim=1).cpu().numpy())
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def features_of(backbone: nn.Module, cfg: Config) -> Features:
    """The frozen backbone as the protocol's feature extractor."""
    return lambda images, desc: extract_features(backbone, images, cfg, desc)


def backbone_to_probe(cfg: Config, run_dir: Path,
                      random_init: bool) -> tuple[nn.Module, float | None]:
    """The backbone a probe measures: the run's trained one, or (random_init) one freshly drawn
    from cfg.seed; and the epochs it trained (runio.trained_epochs; None at random init)."""
    model = init_variables(build_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(),
                                       cfg.last_width), cfg.seed)
    epoch = None
    if not random_init:
        path = run_dir / CHECKPOINT_FILE
        state = load_checkpoint(path)
        load_model_state(model, state["model"], path,
                         cfg.stored_model_description())
        epoch = trained_epochs(state)
    return backbone_of(model).to(pick_device(), memory_format=memory_format(cfg.width)), epoch


def main(argv: list[str] | None = None) -> int:
    def load(cfg: Config, run_dir: Path, random_init: bool) -> tuple[Features, float | None]:
        backbone, epoch = backbone_to_probe(cfg, run_dir, random_init)
        return features_of(backbone, cfg), epoch

    return probe_main(argv, "torch", load, train_linear, knn_predict)


if __name__ == "__main__":
    command_exit(main)
