"""Group 7: the probes. Frozen features agree; the same features give the same linear-probe top-1
and the same kNN predictions."""
import jax
import numpy as np
import torch

from jax_impl.model import backbone_of, backbone_variables
from jax_impl.probe import extract_features as jax_extract_features
from jax_impl.probe import knn_predict as jax_knn_predict
from jax_impl.probe import train_linear as jax_train_linear
from parity_tests.conftest import DTYPES, jax_precision
from parity_tests.models import jax_twin, nchw, torch_vicreg
from parity_tests.tolerances import PROBE_TOP1_POINTS
from shared.config import make_config
from shared.data import CIFAR10_MEAN, CIFAR10_STD
from shared.linear_probe import normalize_images, top1
from torch_impl.probe import extract_features as torch_extract_features
from torch_impl.probe import knn_predict as torch_knn_predict
from torch_impl.probe import train_linear as torch_train_linear

WIDTH, MLP = 8, [32, 16]


def frozen_features(dtype: str, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(torch, jax) eval-mode backbone features of the same weights and pixels in `dtype`: in
    float32 through the probes' own extraction from uint8 images, in float64 (which the probes do
    not compute) as the eval forward of the same normalised images."""
    torch_model = torch_vicreg("resnet18", WIDTH, MLP, dtype, seed=41)
    with jax_precision(dtype):
        model, variables = jax_twin(torch_model, "resnet18", WIDTH, MLP, dtype)
        backbone, backbone_vars = backbone_of(model), backbone_variables(variables)
        if dtype == "float32":
            cfg = make_config({"preset": "smoke", "width": WIDTH})
            return (torch_extract_features(torch_model.backbone, pixels, cfg, "torch",
                                           batch_size=40),
                    jax_extract_features(backbone, backbone_vars, pixels, "jax", batch_size=40))
        x = normalize_images(pixels, CIFAR10_MEAN, CIFAR10_STD).astype(dtype)
        j_features = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(backbone_vars, x)
    with torch.no_grad():
        t_features = torch_model.backbone.eval()(nchw(x, dtype))
    return t_features.numpy(), np.asarray(j_features)


def test_frozen_features_agree(parity):
    pixels = np.random.default_rng(42).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    (t64, j64), (t32, j32) = (frozen_features(dtype, pixels) for dtype in DTYPES)
    parity.check("probe_features", "backbone features in eval mode", t64, j64, t32, j32)


def blobs(num_train: int, num_test: int, classes: int = 10, dim: int = 64):
    """Gaussian class clusters that overlap enough for a linear probe to reach ~80%, not 100%."""
    rng = np.random.default_rng(43)
    centres = rng.normal(size=(classes, dim)) * 0.45
    labels = rng.integers(0, classes, num_train + num_test)
    features = (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
    return features[:num_train], labels[:num_train], features[num_train:], labels[num_train:]


def test_same_features_give_the_same_probe_top1(parity):
    cfg = make_config({"probe_epochs": 30})
    train_x, train_y, test_x, test_y = blobs(4000, 2000)
    t_top1 = 100 * top1(torch_train_linear(train_x, train_y, test_x, 10, cfg), test_y)
    j_top1 = 100 * top1(jax_train_linear(train_x, train_y, test_x, 10, cfg), test_y)
    assert 50 < t_top1 < 95, f"the blobs should be neither trivial nor hopeless: {t_top1:.2f}%"
    parity.record("probe_top1_points", f"torch {t_top1:.2f}% vs jax {j_top1:.2f}%",
                  abs(t_top1 - j_top1))
    assert abs(t_top1 - j_top1) <= PROBE_TOP1_POINTS, (
        f"probe top-1 parts: torch {t_top1:.2f}% vs jax {j_top1:.2f}% "
        f"(more than {PROBE_TOP1_POINTS} points apart)")


def test_same_features_give_the_same_knn_predictions():
    """The kNN monitor's and the kNN probe's classifier: identical predictions from identical
    features, at the monitor's defaults (k 200, T 0.1) and at k = 1."""
    train_x, train_y, test_x, _ = blobs(3000, 1000)
    for k, temperature in ((200, 0.1), (1, 0.1), (20, 0.5)):
        t_labels = torch_knn_predict(train_x, train_y, test_x, 10, k, temperature)
        j_labels = jax_knn_predict(train_x, train_y, test_x, 10, k, temperature)
        np.testing.assert_array_equal(t_labels, j_labels, err_msg=f"k {k}, T {temperature}")
