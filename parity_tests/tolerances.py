"""Every parity tolerance, in one place, with the reason for its size.

Differences are measured relative to the tensor's scale: max|a - b| / max(max|reference|, scale,
TINY). Elementwise relative errors would blow up on entries that are zero on one side by
cancellation (a centred embedding, a gradient through an inactive hinge), which says nothing about
whether the two programs compute the same function.

float64 (torch .double(), JAX with x64 enabled) proves that the two frameworks compute the same
formulas: both evaluate them with different summation orders, so they differ by a few ulps
(2.2e-16) times the growth of rounding along the computation (a reduction of n terms loses up to
~log2(n) ulps, a ResNet forward chains ~20 of them, BatchNorm divides by a batch standard
deviation). The bounds below sit a factor 10-1000 above that, so no CPU's choice of kernels comes
near them; the test report prints what was measured.

float32 has no fixed bound, because its rounding depends on the machine: oneDNN and XLA pick
different blockings, vector widths and summation orders for AVX2, AVX-512 and AMX, so a constant
tuned on one CPU fails on another. Each float32 comparison instead measures, in the same test, how
far each framework's float32 result lies from the float64 result (torch's, which both frameworks
agree on to the float64 bounds above), and requires

    |torch32 - jax32| <= FLOAT32_SPREAD x min(err_torch, err_jax) + FLOAT32_FLOOR

where err_x = |x32 - torch64|. The two results always lie within err_torch + err_jax of each other
(triangle inequality), so this bound is met exactly when neither framework is more than about
FLOAT32_SPREAD times further from the exact answer than the other: both are float32 evaluations of
the same function, whatever rounding the CPU gives them. It fails when one side loses precision
the other keeps (a bf16 or TF32 matmul, a cast through float16, a cancellation one side avoids), or
computes something else.

That holds for results that are continuous functions of the inputs: forward passes, the loss and
its gradient wrt the embeddings, BatchNorm statistics. Results computed from a ReLU network's
derivative (parameter gradients, optimizer state, weights after steps, and so a whole trajectory)
jump where a pre-activation sits at 0, and float32 rounding decides on which side of such a kink
each framework lands (parity_tests/kinks.py). For them the bound adds KINK_ALLOWANCE x the kink
allowance measured in the same test: how far the float64 result moves when every ReLU input that
float32 could have moved across 0 takes its other branch. In a chaotic regime (20 float32 LARS
steps at batch 16 carry a 1e-7 difference to ~0.5 of a weight's scale) that allowance grows with
the trajectory's own sensitivity, measured rather than assumed.
"""
TINY = 1e-30

# group -> bound on the float64 difference, relative to the tensor's scale
FLOAT64 = {
    # 1. Loss terms: a handful of reductions over N*D and D*D entries (D up to 2048).
    "loss": 1e-13,
    # 2. d loss / d z: the same reductions once more, through the covariance matrix.
    "loss_grad": 1e-12,
    # 3. Forward passes: ~20 conv + BN layers; BN renormalises each, so errors do not compound much.
    "forward": 1e-11,
    # 4. Gradients of the objective wrt every parameter: backprop through the same ~20 (ResNet-50:
    #    ~50) layers, with BN's backward dividing by the batch std of small batches.
    "param_grad": 1e-9,
    # 5. One optimizer step (params and state); LARS divides by gradient norms, Adam by sqrt(v).
    "optimizer_step": 1e-9,
    # 6. 20 training steps: the loss at each step, and every weight.
    "trajectory": 1e-7,
    "trajectory_weights": 1e-7,
    # 7. Frozen features (a forward in eval mode) feeding the probe.
    "probe_features": 1e-11,
}

# float32: how many times further from the float64 result one framework may lie than the other.
# Summation orders differ (XLA:CPU vectorises a reduction across 8-16 accumulators, oneDNN blocks a
# convolution by its ISA's vector width), so the two errors of one tensor differ by a small factor;
# the README's parity table gives the largest ratio measured. A precision loss is a factor of
# 1e3-1e4 (bf16 keeps 8 bits of mantissa, float32 24).
FLOAT32_SPREAD = 30.0
# float32: a difference this small passes whatever the measured errors, since a result that
# happens to round to the float64 value (error 0) leaves nothing to multiply: 64 ulps of float32
# (2^-23 each) relative to the tensor's scale, about one rounding per layer of a ResNet-50.
FLOAT32_FLOOR = 64 * 2.0 ** -23

# Results downstream of a ReLU derivative: the kink allowance counts once for each framework, since
# each may land on the other side of different kinks.
KINK_ALLOWANCE = 2.0
# A ReLU input counts as within float32's reach of its kink when it lies within this many times
# the largest distance either framework's float32 run moved that call's inputs from its float64
# run (relative to the call's largest input): the measured reach is the largest move of any one
# call, and the elements of other calls move by comparable amounts, not by the same ones.
KINK_REACH = 4.0

# 9. The views a device computes (torch_impl.augment, jax_impl.augment) against the numpy pipeline,
#    elementwise, in the units of the pixels ([0, 1] before normalisation, ~[-2, 2] after). Every op
#    runs the numpy op's float32 operations in the same order, so most values are equal to the bit;
#    what differs is the order of the sums in a mean (contrast's mean grey level) and XLA fusing a
#    multiply and an add into one rounding, a few ulps of 1.0 (1.2e-7 each) that a jitter chain can
#    move across a clamp, and that normalisation divides by std ~0.25.
AUGMENT = 3e-5
# A training run on views computed on the device against one on views computed on the host, same
# seed: the relative difference of the logged losses over 8 Adam steps at lr 1e-4. The first loss
# differs only by the views' AUGMENT-sized rounding (~1e-7 relative); each step then moves the
# weights by updates computed from slightly different gradients, and that difference grows with
# every step (float32 training amplifies differences, see "chaotic" above): a gentle schedule keeps
# 8 steps of it well under 1e-3, while a real difference in the views (a wrong crop, an op skipped)
# moves the very first loss by more than that.
AUGMENTED_TRAINING = 1e-3

# 7. Linear-probe top-1, in percentage points: the two probes start from differently drawn
#    classifiers (torch's generator vs a JAX key), so only the optimum they converge to is shared.
PROBE_TOP1_POINTS = 0.5
