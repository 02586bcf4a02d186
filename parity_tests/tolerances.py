"""Every parity tolerance, in one place, with the reason for its size.

A comparison passes when max|torch - jax| <= tolerance * max(max|torch|, TINY): the largest
difference relative to the tensor's scale. Elementwise relative errors would blow up on entries
that are zero on one side by cancellation (a centred embedding, a gradient through an inactive
hinge), which says nothing about whether the two programs compute the same function.

float64 (torch .double(), JAX with x64 enabled): both sides evaluate the same formulas with
different summation orders, so differences are a few ulps (2.2e-16) times the growth of rounding
along the computation: a reduction of n terms loses up to ~log2(n) ulps, a ResNet forward chains
~20 of them, and BatchNorm divides by a batch standard deviation. The float64 bounds leave about a
factor 10-100 above what was measured (the test report prints the measured values).

float32: the same, with ulp 1.2e-7, and more summation-order noise: XLA and oneDNN tile convolutions
and matmuls differently, and XLA:CPU fuses reductions.
"""
TINY = 1e-30

# (group, dtype) -> tolerance on max|diff| / max|reference|
TOLERANCES = {
    # 1. Loss terms: a handful of reductions over N*D and D*D entries (D up to 2048).
    ("loss", "float64"): 1e-13,
    ("loss", "float32"): 1e-5,
    # 2. d loss / d z: the same reductions once more, through the covariance matrix.
    ("loss_grad", "float64"): 1e-12,
    ("loss_grad", "float32"): 1e-5,
    # 3. Forward passes: ~20 conv + BN layers; BN renormalises each, so errors do not compound much.
    ("forward", "float64"): 1e-11,
    ("forward", "float32"): 1e-4,
    # 4. Gradients of the objective wrt every parameter: backprop through the same ~20 layers, and
    #    BN's backward divides by the batch std of small batches, which amplifies rounding
    #    (measured 1.3e-2 in float32 on ResNet-50's first BN weight, 50 layers from the loss at
    #    width 4 and batch 16, against 2.4e-12 in float64: rounding, not a difference in formulas).
    ("param_grad", "float64"): 1e-9,
    ("param_grad", "float32"): 5e-2,
    # 5. One optimizer step (params and state); LARS divides by gradient norms, Adam by sqrt(v).
    ("optimizer_step", "float64"): 1e-9,
    ("optimizer_step", "float32"): 2e-3,
    # 6. 20 training steps: the loss at each step, and every weight. float64 stays tight. In
    #    float32, training amplifies rounding differences (a chaotic map: LARS at batch 16 turns a
    #    1e-7 difference at step 1 into ~0.5 of a BN bias's scale by step 20, while the float64 runs
    #    agree to 1e-13), so float32 bounds the loss drift (measured 2.0e-2 and 4.0e-2 LARS in two
    #    sessions, 2e-3 Adam; the bound leaves room for that spread) and only
    #    reports the weights' drift, bounded at their own scale: "the same training", not the same
    #    bits.
    ("trajectory", "float64"): 1e-7,
    ("trajectory", "float32"): 1e-1,
    ("trajectory_weights", "float64"): 1e-7,
    ("trajectory_weights", "float32"): 1.0,
    # 7. Frozen features (a forward in eval mode) feeding the probe.
    ("probe_features", "float64"): 1e-11,
    ("probe_features", "float32"): 1e-4,
    # 8. The loader's batches: bytes, so exactly equal.
    ("loader", "uint8"): 0.0,
    ("loader", "float32"): 0.0,
}

# 7. Linear-probe top-1, in percentage points: the two probes start from differently drawn
#    classifiers (torch's generator vs a JAX key), so only the optimum they converge to is shared.
PROBE_TOP1_POINTS = 0.5
