"""Linear probe of a frozen backbone:
`python -m jax_impl.probe --run RUN_DIR [--dataset NAME] [--protocol linear|knn]`.

The twin of torch_impl.probe (same protocol, through shared.linear_probe): writes
RUN_DIR/probe_<dataset>.json (probe_<dataset>_random_init.json with --random-init; ..._jax.json for
a run trained by torch_impl) and prints one line with the top-1 accuracy.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jax_impl.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_model_state
from jax_impl.model import (
    ResNet,
    backbone_of,
    backbone_variables,
    build_model,
    init_variables,
    torch_uniform,
)
from jax_impl.optim import set_lr
from jax_impl.runtime import compute_dtype, pick_device, use_compilation_cache
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


@functools.partial(jax.jit, static_argnums=0)
def _eval_features(backbone: ResNet, variables: dict, x: jax.Array) -> jax.Array:
    return backbone.apply(variables, x, train=False)


def extract_features(backbone: ResNet, variables: dict, images: np.ndarray, desc: str,
                     batch_size: int = 500) -> np.ndarray:
    """uint8 [N, S, S, 3] -> float32 features [N, F] of the backbone in eval mode."""
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False,
                      file=sys.stderr, mininterval=1.0):
        x = normalize_images(images[start:start + batch_size], CIFAR10_MEAN, CIFAR10_STD)
        rows = len(x)
        # Eval-mode rows are independent, so padding the last chunk costs nothing but
        # saves a compile.
        x = np.pad(x, ((0, batch_size - rows), (0, 0), (0, 0), (0, 0)))
        chunks.append(np.asarray(_eval_features(backbone, variables, x))[:rows])
    return np.concatenate(chunks)


def _classifier_step(classifier: nn.Dense, optimizer: optax.GradientTransformation):
    """jit(step)(params, opt_state, x [B, F], y int [B], lr) -> (params, opt_state): one SGD step on
    CE."""

    def loss(params, x, y):
        logits = classifier.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, opt_state, x, y, lr):
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, set_lr(opt_state, lr), params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step)


def train_linear(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
                 cfg: Config) -> np.ndarray:
    """Fit a linear classifier on standardised features [N, F]; return test logits [M, C]
    float32."""
    train_x, test_x = standardize(train_x, test_x)
    dim = train_x.shape[1]
    classifier = nn.Dense(num_classes, kernel_init=torch_uniform(), bias_init=torch_uniform(dim))
    params = classifier.init(jax.random.key(cfg.seed), jnp.zeros((1, dim)))["params"]
    # torch.optim.SGD(momentum=0.9, weight_decay=wd): g' = g + wd * p; b = 0.9 b + g'; p -= lr * b
    optimizer = optax.inject_hyperparams(lambda learning_rate: optax.chain(
        optax.add_decayed_weights(cfg.probe_wd), optax.sgd(learning_rate, momentum=0.9)))(
        learning_rate=cfg.probe_lr)
    opt_state = optimizer.init(params)
    step_fn = _classifier_step(classifier, optimizer)
    features, labels = jnp.asarray(train_x), jnp.asarray(train_y.astype(np.int32))
    batches_per_epoch = len(probe_batches(len(train_x), cfg.probe_batch_size, cfg.seed, 0))
    total, step = cfg.probe_epochs * batches_per_epoch, 0
    for epoch in range(cfg.probe_epochs):
        for index in probe_batches(len(train_x), cfg.probe_batch_size, cfg.seed, epoch):
            params, opt_state = step_fn(params, opt_state, features[index], labels[index],
                                        probe_lr(step, total, cfg.probe_lr))
            step += 1
    return np.asarray(classifier.apply({"params": params}, jnp.asarray(test_x)), np.float32)


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_votes(unit_bank: jax.Array, labels: jax.Array, queries: jax.Array, temperature: float,
               num_classes: int, k: int) -> jax.Array:
    unit = queries / jnp.maximum(jnp.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    similarity = jnp.matmul(unit, unit_bank.T, precision=jax.lax.Precision.HIGHEST)
    order = jnp.argsort(-similarity, axis=1, stable=True)[:, :k]
    weights = jnp.exp(jnp.take_along_axis(similarity, order, axis=1) / temperature)
    rows = jnp.arange(len(queries))[:, None]
    votes = jnp.zeros((len(queries), num_classes), weights.dtype).at[rows, labels[order]].add(
        weights)
    return jnp.argmax(votes, axis=1)


def knn_predict(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, num_classes: int,
                k: int, temperature: float, batch_size: int = 1024) -> np.ndarray:
    """Weighted kNN (lightly's benchmark protocol) in the features' dtype: bank [N, F], labels
    int [N], queries [M, F] -> predicted labels int64 [M].

    s_ij = <q_i / |q_i|, b_j / |b_j|>; the k largest s_ij of query i (equal ones in bank order)
    vote exp(s_ij / T) for their label; the class with the largest sum wins (ties: the lower).
    """
    check_knn(k, temperature, len(bank))
    bank = jnp.asarray(bank)
    unit_bank = bank / jnp.maximum(jnp.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    labels = jnp.asarray(bank_labels.astype(np.int32))
    predictions = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        rows = len(chunk)
        # a last chunk padded to the full size saves a compilation; its extra rows are dropped
        padded = np.pad(chunk, ((0, batch_size - rows), (0, 0))) if len(queries) > batch_size \
            else chunk
        votes = _knn_votes(unit_bank, labels, jnp.asarray(padded), temperature, num_classes, k)
        predictions.append(np.asarray(votes, np.int64)[:rows])
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def features_of(backbone: ResNet, variables: dict) -> Features:
    """The frozen backbone as the protocol's feature extractor."""
    return lambda images, desc: extract_features(backbone, variables, images, desc)


def backbone_to_probe(cfg: Config, run_dir: Path,
                      random_init: bool) -> tuple[tuple[ResNet, dict], float | None]:
    """The backbone a probe measures, (module, variables): the run's trained one, or (random_init)
    one freshly drawn from cfg.seed; and the epochs it trained (runio.trained_epochs; None at
    random init)."""
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(), cfg.last_width,
                        dtype=compute_dtype(cfg.precision, pick_device()))
    if random_init:
        return (backbone_of(model), backbone_variables(init_variables(model, cfg.seed))), None
    path = run_dir / CHECKPOINT_FILE
    stored = load_checkpoint(path)
    variables = load_model_state(model, stored, path,
                                 cfg.stored_model_description())
    return (backbone_of(model), backbone_variables(variables)), trained_epochs(stored)


def main(argv: list[str] | None = None) -> int:
    def load(cfg: Config, run_dir: Path, random_init: bool) -> tuple[Features, float | None]:
        use_compilation_cache(cfg.jax_cache)
        (backbone, variables), epoch = backbone_to_probe(cfg, run_dir, random_init)
        return features_of(backbone, variables), epoch

    return probe_main(argv, "jax", load, train_linear, knn_predict)


if __name__ == "__main__":
    command_exit(main)
