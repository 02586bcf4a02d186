"""Groups 1 and 2: the VICReg loss, each term and the total, and its gradients wrt both batches."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_impl.loss import vicreg_loss as jax_vicreg_loss
from parity_tests.compare import ParityReport
from parity_tests.conftest import DTYPES, jax_precision, torch_dtype
from shared.loss_inputs import LOSS_VARIANTS
from torch_impl.loss import vicreg_loss as torch_vicreg_loss

# (N, D): two embeddings, one dimension, N < D (rank-deficient covariance), N > D, the largest.
SHAPES = [(2, 1), (2, 2048), (3, 5), (16, 64), (64, 16), (128, 2048), (512, 1), (512, 256),
          (512, 2048)]
TERMS = ("invariance", "variance", "covariance")


def embeddings(n: int, d: int, constant_columns: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 [n, d] batches whose column scales span 0.1 to 3, so the variance hinge
    relu(1 - std) is active on some columns and not on others; with constant_columns, every third
    column of z_a is constant (std = sqrt(eps), the hinge at its maximum)."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.1, 3.0, d)
    z_a = rng.normal(size=(n, d)) * scales + rng.normal(size=d)
    z_b = z_a + 0.5 * rng.normal(size=(n, d)) * scales
    if constant_columns:
        z_a[:, ::3] = rng.normal(size=(1, len(range(0, d, 3))))
    return z_a, z_b


def coefficients(case: int, random: bool) -> dict:
    """The paper's lambda, mu, nu: the defaults 25, 25, 1, or random ones drawn from (0.01, 50)."""
    if not random:
        return dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0)
    draw = np.random.default_rng([case, 7]).uniform(0.01, 50.0, 3)
    return dict(sim_coeff=float(draw[0]), std_coeff=float(draw[1]), cov_coeff=float(draw[2]))


# Every shape with each variant; the constant-column and random-coefficient cases on a few shapes.
SPECIAL_SHAPES = [(3, 5), (64, 16), (128, 2048)]
CASES = ([(n, d, variant, False, False) for n, d in SHAPES for variant in LOSS_VARIANTS]
         + [(n, d, variant, True, False) for n, d in SPECIAL_SHAPES for variant in LOSS_VARIANTS]
         + [(n, d, variant, False, True) for n, d in SPECIAL_SHAPES for variant in LOSS_VARIANTS])


def case_id(case) -> str:
    n, d, variant, constant, random_coeffs = case
    return (f"N{n}-D{d}-{variant}" + ("-constcols" if constant else "")
            + ("-randcoef" if random_coeffs else ""))


@functools.cache
def jax_loss_and_grads(variant: str):
    """jit(value_and_grad) of jax_impl's loss for `variant`, coefficients as traced arguments, so a
    shape and dtype compile once for all coefficient draws."""

    def loss(z_a, z_b, coeffs):
        return jax_vicreg_loss(z_a, z_b, sim_coeff=coeffs[0], std_coeff=coeffs[1],
                               cov_coeff=coeffs[2], variant=variant)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def both_losses(z_a: np.ndarray, z_b: np.ndarray, dtype: str, variant: str, coeffs: dict):
    """((torch loss, terms, dL/dz_a, dL/dz_b), (jax ...)) on the same numbers in `dtype`."""
    ta = torch.tensor(z_a, dtype=torch_dtype(dtype), requires_grad=True)
    tb = torch.tensor(z_b, dtype=torch_dtype(dtype), requires_grad=True)
    t_loss, t_terms = torch_vicreg_loss(ta, tb, variant=variant, **coeffs)
    t_loss.backward()
    ja, jb = jnp.asarray(z_a.astype(dtype)), jnp.asarray(z_b.astype(dtype))
    values = jnp.asarray([coeffs["sim_coeff"], coeffs["std_coeff"], coeffs["cov_coeff"]], dtype)
    (j_loss, j_terms), (ga, gb) = jax_loss_and_grads(variant)(ja, jb, values)
    assert j_loss.dtype == jnp.dtype(dtype) and t_loss.dtype == torch_dtype(dtype)
    return (t_loss, t_terms, ta.grad, tb.grad), (j_loss, j_terms, ga, gb)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_terms_and_gradients_agree(case, parity):
    n, d, variant, constant, random_coeffs = case
    z_a, z_b = (z.astype(np.float32) for z in embeddings(n, d, constant, seed=n * 10007 + d))
    coeffs = coefficients(n * 10007 + d, random_coeffs)
    results = {}
    for dtype in DTYPES:
        with jax_precision(dtype):
            results[dtype] = both_losses(z_a.astype(dtype), z_b.astype(dtype), dtype, variant,
                                         coeffs)
    (t64, j64), (t32, j32) = results["float64"], results["float32"]
    label = case_id(case)
    parity.check("loss", f"{label} loss", t64[0], j64[0], t32[0], j32[0])
    for term in TERMS:
        parity.check("loss", f"{label} {term}", t64[1][term], j64[1][term], t32[1][term],
                     j32[1][term])
    columns = np.ones(d, bool)
    if constant and variant == "no-eps":
        # eps = 0: sqrt(Var) has no derivative at Var = 0, so on z_a's constant columns each side
        # returns what its rounding of Var gives (torch: +-inf where its Var is exactly 0; JAX:
        # large finite values where its mean rounds off). Compare where the derivative exists.
        columns[::3] = False
    parity.check("loss_grad", f"{label} dL/dz_a", t64[2][:, columns], j64[2][:, columns],
                 t32[2][:, columns], j32[2][:, columns])
    parity.check("loss_grad", f"{label} dL/dz_b", t64[3], j64[3], t32[3], j32[3])


def test_a_parity_failure_names_the_tensor_index_and_both_values():
    parity = ParityReport()  # its own report: these made-up differences are not measurements
    torch_value = np.array([[1.0, 2.0], [3.0, 4.0]])
    jax_value = torch_value.copy()
    jax_value[1, 0] = 3.5
    with pytest.raises(AssertionError,
                       match=r"dL/dz_a\[1, 0\] in float64: torch 3\.0 vs jax 3\.5 \(largest "
                             r"difference relative to max\|torch\| = 0\.125"):
        parity.check_float64("loss_grad", "dL/dz_a", torch_value, jax_value, tol=1e-3)
    jax_value[1, 0] = np.nan
    with pytest.raises(AssertionError,
                       match=r"dL/dz_a\[1, 0\] in float64: torch 3\.0 vs jax nan \(non-finite"):
        parity.check_float64("loss_grad", "dL/dz_a", torch_value, jax_value, tol=1e-3)


def test_the_float32_bound_passes_two_roundings_and_fails_a_precision_loss():
    parity = ParityReport()  # its own report: these made-up differences are not measurements
    rng = np.random.default_rng(3)
    exact = rng.normal(size=1000)
    torch32 = exact.astype(np.float32)
    # another float32 evaluation: a few ulps off the exact value before rounding
    jax32 = (exact * (1 + rng.uniform(-4, 4, exact.size) * 2.0 ** -24)).astype(np.float32)
    parity.check_float32("loss", "two float32 roundings", torch32, jax32, exact)
    jax_bf16 = torch.from_numpy(exact).to(torch.bfloat16).double().numpy()  # 8 bits of mantissa
    with pytest.raises(AssertionError,
                       match=r"bf16\[\d+\] in float32: .*distance from float64: torch "
                             r"[0-9.e-]+, jax [0-9.e-]+"):
        parity.check_float32("loss", "bf16", torch32, jax_bf16, exact)
