"""What the two VICReg loss twins (torch_impl.loss, jax_impl.loss) share: the variants' variance
terms and the input checks.

The checks depend on shapes and settings only, so the JAX twin runs them while tracing and both
raise the same message for the same mistake.
"""
from __future__ import annotations

from shared.errors import UserError

# variant -> (weight of v(Z) + v(Z'), eps inside the square root):
#   solo-learn  v(Z) + v(Z')        solo-learn's variance_loss (its VICReg default, mu = 25)
#   official    (v(Z) + v(Z')) / 2  facebookresearch/vicreg's main_vicreg.py
#   no-eps      v(Z) + v(Z'), eps 0 solo-learn's without the eps (the seed course's)
VARIANCE_FORMS = {"solo-learn": (1.0, True), "official": (0.5, True), "no-eps": (1.0, False)}
LOSS_VARIANTS = tuple(VARIANCE_FORMS)
# Former names of variants, still read (flags, config.json of earlier runs, the Python API).
RENAMED_VARIANTS = {"homework": "no-eps"}


def loss_variant(name: str) -> str:
    """A variant's name as LOSS_VARIANTS spells it (a former name read as its new one)."""
    return RENAMED_VARIANTS.get(name, name)


def check_loss_inputs(variant: str, shape_a: tuple[int, ...],
                      shape_b: tuple[int, ...]) -> tuple[float, bool]:
    """The variance term's form of `variant`, VARIANCE_FORMS[variant]; UserError unless the
    variant is known and the embeddings are two [N, D] with N >= 2."""
    variant = loss_variant(variant)
    if variant not in LOSS_VARIANTS:
        raise UserError(f"unknown loss variant {variant!r}; choose one of: "
                        f"{', '.join(LOSS_VARIANTS)}")
    if len(shape_a) != 2 or tuple(shape_a) != tuple(shape_b):
        raise UserError(f"embeddings must be two [N, D] batches of one shape, got "
                        f"{tuple(shape_a)} and {tuple(shape_b)}")
    if shape_a[0] < 2:
        raise UserError("VICReg needs at least 2 embeddings per batch: the variance and "
                        "covariance terms are estimated across the batch (N - 1 = 0)")
    return VARIANCE_FORMS[variant]
