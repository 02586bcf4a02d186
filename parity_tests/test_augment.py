"""Group 9: the views computed on a device (torch_impl.augment, jax_impl.augment) against the numpy
pipeline (shared.augment, itself tested against torchvision), op by op and whole, on the same drawn
parameters: random ones and the edge cases (full-image and 1-pixel crops, jitter at its identity and
at its extremes, every jitter order, blur at both ends of its sigma range)."""
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_impl import augment as JA
from parity_tests.tolerances import AUGMENT
from shared import augment as A
from shared import augment_ops as O
from torch_impl import augment as TA

N, H, W = 12, 32, 32
DEFAULT_PARAMS = A.AugmentParams()
NUMPY_OPS = {"brightness": O.adjust_brightness, "contrast": O.adjust_contrast,
             "saturation": O.adjust_saturation, "hue": O.adjust_hue}
TORCH_OPS = dict(zip(NUMPY_OPS, TA.JITTER_OPS))
JAX_OPS = dict(zip(NUMPY_OPS, JA.JITTER_OPS))


def pixels(seed: int, n: int = N) -> np.ndarray:
    """uint8 [n, 32, 32, 3] with the awkward cases of colour maths: a grey image, runs of black,
    white and pure-red pixels, channels tied in value."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    images[1] = images[1, ..., :1]
    images[2, 0] = 0
    images[2, 1] = 255
    images[2, 2] = (255, 0, 0)
    images[3, :, :, 1] = images[3, :, :, 0]
    return images


def floats(seed: int) -> np.ndarray:
    return pixels(seed).astype(np.float32) / np.float32(255)


def check(name: str, reference: np.ndarray, torch_value, jax_value) -> None:
    """Both device results within AUGMENT of the numpy reference, elementwise."""
    reference = np.asarray(reference, np.float64)
    for side, value in (("torch", torch_value), ("jax", jax_value)):
        value = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, np.float64)
        assert value.shape == reference.shape, f"{name} {side}: {value.shape} vs {reference.shape}"
        gap = np.abs(value - reference)
        index = np.unravel_index(int(gap.argmax()), gap.shape)
        assert gap.max() <= AUGMENT, (f"{name}: {side} {value[index]!r} vs numpy "
                                      f"{reference[index]!r} "
                                      f"at {list(index)} (tolerance {AUGMENT:g})")


def on_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def view_with(seed: int, params: A.AugmentParams = DEFAULT_PARAMS, **fields) -> A.ViewParams:
    """Random draws for N images, with the given fields replaced (e.g. crop boxes)."""
    view = A.sample_view_params(np.random.default_rng(seed), N, H, W, params)
    return dataclasses.replace(view, **{k: np.asarray(v) for k, v in fields.items()})


BOXES = {
    "random": {},
    "full image": dict(top=[0] * N, left=[0] * N, height=[H] * N, width=[W] * N),
    "1-pixel and edge crops": dict(top=[0, 31, 0, 31, 5, 0, 30, 16, 0, 1, 2, 3],
                                   left=[0, 31, 31, 0, 0, 7, 0, 16, 30, 1, 2, 3],
                                   height=[1, 1, 1, 1, 1, 32, 2, 16, 32, 31, 30, 29],
                                   width=[1, 1, 1, 1, 32, 1, 32, 16, 2, 31, 30, 29]),
}


@pytest.mark.parametrize("boxes", BOXES)
def test_resized_crop(boxes):
    x = floats(1)
    view = view_with(2, **BOXES[boxes])
    p = A.pixel_params(view, A.AugmentParams())
    reference = O.resized_crop(x, view.top, view.left, view.height, view.width, 32)
    check(f"resized_crop {boxes}", reference,
          TA.resized_crop(on_torch(x), TA.device_params(p, device="cpu")),
          jax.jit(JA.resized_crop)(x, JA.device_params(p)))


def factors_for(op: str, case: str, seed: int) -> np.ndarray:
    """float32 [N]: the op's identity, its extremes (ColorJitter at full default strength, and
    brightness/contrast/saturation down to 0), or random factors."""
    rng = np.random.default_rng(seed)
    if case == "identity":
        return np.full(N, 0.0 if op == "hue" else 1.0, np.float32)
    if case == "extremes":
        values = [-0.5, 0.5, -0.1, 0.1] if op == "hue" else [0.0, 1.4, 0.6, 2.0]
        return np.resize(np.asarray(values, np.float32), N)
    return (rng.uniform(-0.5, 0.5, N) if op == "hue" else rng.uniform(0, 2, N)).astype(np.float32)


@pytest.mark.parametrize("case", ["random", "identity", "extremes"])
@pytest.mark.parametrize("op", NUMPY_OPS)
def test_jitter_op(op, case):
    x = floats(3)
    factors = factors_for(op, case, seed=4)
    check(f"{op} {case}", NUMPY_OPS[op](x, factors), TORCH_OPS[op](on_torch(x), on_torch(factors)),
          jax.jit(JAX_OPS[op])(x, factors))


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))), ids=str)
def test_colour_jitter_in_every_op_order(order):
    x = floats(5)
    jitter = dataclasses.replace(view_with(6).jitter,
                                 order=np.tile(np.asarray(order, np.int64), (N, 1)),
                                 apply=np.arange(N) % 4 != 3)  # one image in four left alone
    schedule, factors = A.jitter_schedule(jitter), A.jitter_factors(jitter)
    check(f"colour jitter, order {order}", O.color_jitter(x, schedule, factors),
          TA.color_jitter(on_torch(x), on_torch(schedule), on_torch(factors)),
          jax.jit(JA.color_jitter)(x, schedule, factors))


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("sigmas", ["random", "smallest", "largest"])
def test_gaussian_blur(kernel_size, sigmas):
    x = floats(7)
    sigma = {"random": np.random.default_rng(8).uniform(0.1, 2.0, N),
             "smallest": np.full(N, 0.1), "largest": np.full(N, 2.0)}[sigmas].astype(np.float32)
    kernels = O.gaussian_kernels(sigma, kernel_size)
    check(f"blur {kernel_size} {sigmas}", O.gaussian_blur(x, sigma, kernel_size),
          TA.gaussian_blur(on_torch(x), on_torch(kernels)), jax.jit(JA.gaussian_blur)(x, kernels))


def test_grayscale_solarize_and_normalize():
    x = floats(9)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    check("grayscale", O.rgb_to_grayscale(x), TA.rgb_to_grayscale(on_torch(x)),
          jax.jit(JA.rgb_to_grayscale)(x))
    everything = np.ones(N, bool)
    check("solarize", O.solarize(x, everything), TA.solarize(on_torch(x)), jax.jit(JA.solarize)(x))
    check("normalize", O.normalize(x, mean, std), TA.normalize(on_torch(x), mean, std),
          jax.jit(JA.normalize, static_argnums=(1, 2))(x, mean, std))


PIPELINES = {
    "default": A.AugmentParams(),
    "homework (blur, solarize)": A.AugmentParams(blur_p=0.5, solarize_p=0.2),
    "every op on every image": A.AugmentParams(flip_p=1, jitter_p=1, gray_p=1, blur_p=1,
                                               solarize_p=1, blur_kernel=5),
    "nothing but the crop": A.AugmentParams(flip_p=0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0),
    "tiny crops, strong jitter": A.AugmentParams(crop_scale=(0.01, 0.02), brightness=1.0,
                                                 contrast=1.0, saturation=1.0, hue=0.5),
}


@functools.cache
def jax_views(params: A.AugmentParams):
    return jax.jit(lambda images, p: JA.apply_view(images, p, params))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_whole_views_equal_the_numpy_pipeline(pipeline):
    params = PIPELINES[pipeline]
    images = pixels(10)
    for step in range(3):
        reference = A.make_views(images, params, seed=11, epoch=2, step=step)
        drawn = A.draw_views(N, H, W, params, seed=11, epoch=2, step=step)
        for view, ref, p in zip("ab", reference, drawn):
            torch_view = TA.apply_view(on_torch(images), TA.device_params(p, device="cpu"), params)
            assert torch_view.is_contiguous(memory_format=torch.channels_last)
            check(f"{pipeline}, step {step} view {view}", ref,
                  torch_view.permute(0, 2, 3, 1), jax_views(params)(images, JA.device_params(p)))


@pytest.mark.parametrize("source, size", [(96, 96), (32, 48)],
                         ids=["96px images to 96px views", "32px images to 48px views"])
def test_views_of_any_size_equal_the_numpy_pipeline(source, size):
    params = dataclasses.replace(PIPELINES["every op on every image"], size=size)
    images = np.repeat(np.repeat(pixels(13), source // 32, axis=1), source // 32, axis=2)
    reference = A.make_views(images, params, seed=3, epoch=0, step=0)
    drawn = A.draw_views(N, source, source, params, seed=3, epoch=0, step=0)
    for view, ref, p in zip("ab", reference, drawn):
        assert ref.shape == (N, size, size, 3)
        torch_view = TA.apply_view(on_torch(images), TA.device_params(p, device="cpu"), params)
        check(f"{source}px to {size}px view {view}", ref, torch_view.permute(0, 2, 3, 1),
              jax_views(params)(images, JA.device_params(p)))


def test_a_process_applying_its_rows_gets_its_rows_of_the_batch():
    params = PIPELINES["every op on every image"]
    images = pixels(12)
    whole = A.draw_views(N, H, W, params, seed=0, epoch=0, step=0)
    rows = slice(4, 8)
    part = A.draw_views(N, H, W, params, seed=0, epoch=0, step=0, rows=rows)
    for p_whole, p_part in zip(whole, part):
        full = TA.apply_view(on_torch(images), TA.device_params(p_whole, device="cpu"), params)
        mine = TA.apply_view(on_torch(images[rows]), TA.device_params(p_part, device="cpu"), params)
        assert torch.equal(full[rows], mine)
        assert jnp.array_equal(jax_views(params)(images, JA.device_params(p_whole))[rows],
                               jax_views(params)(images[rows], JA.device_params(p_part)))


def inductor_vectorises_with_avx512() -> bool:
    """Whether torch.compile's CPU code uses AVX-512 here (its AVX2 and scalar code for the whole
    view is wrong in torch 2.14: docs/parity.md)."""
    from torch._inductor import cpu_vec_isa
    return str(cpu_vec_isa.pick_vec_isa()).startswith("avx512")


@pytest.mark.skipif(not inductor_vectorises_with_avx512(),
                    reason="torch.compile's AVX2 and scalar CPU code for the whole view is wrong "
                           "(docs/parity.md); the trainer compiles the views on a GPU only")
def test_views_through_torch_compile_equal_the_numpy_pipeline():
    """On a GPU the trainer compiles the views: torch.compile fuses their element-wise kernels and
    may reorder float32 arithmetic. Inductor's CPU code shows the result stays within bounds."""
    params = PIPELINES["every op on every image"]
    images = pixels(13)
    compiled = torch.compile(lambda x, p: TA.apply_view(x, p, params), dynamic=False)
    for step in range(2):
        reference = A.make_views(images, params, seed=5, epoch=0, step=step)
        drawn = A.draw_views(N, H, W, params, seed=5, epoch=0, step=step)
        for view, ref, p in zip("ab", reference, drawn):
            torch_view = compiled(on_torch(images), TA.device_params(p, device="cpu"))
            check(f"compiled, step {step} view {view}", ref, torch_view.permute(0, 2, 3, 1),
                  jax_views(params)(images, JA.device_params(p)))
