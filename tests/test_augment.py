"""shared.augment against torchvision (mostly transforms.v2.functional), image by image, on the same
parameters.

Every expected value is computed by torchvision from the same numpy data (CHW tensors), never
by the module.
"""
import numpy as np
import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.functional as F1
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F

from shared import augment as A
from shared import augment_ops as O

N, H, W = 8, 32, 32
GEOMETRY_ATOL = 1e-5  # float32 rounding of the bilinear / blur sums
COLOUR_ATOL = 1 / 255
HUE_ATOL = 2 / 255
PARAMS = A.AugmentParams()


def to_torch(image: np.ndarray) -> torch.Tensor:
    """float32 [H, W, 3] -> float32 tensor [3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def from_torch(image: torch.Tensor) -> np.ndarray:
    """float32 tensor [3, H, W] -> float32 [H, W, 3]."""
    return image.permute(1, 2, 0).numpy()


def torchvision_each(images: np.ndarray, fn) -> np.ndarray:
    """Stack of fn(i, image i as a CHW tensor), back in NHWC."""
    return np.stack([from_torch(fn(i, to_torch(image))) for i, image in enumerate(images)])


def make_float_images(seed: int = 0, n: int = N, h: int = H, w: int = W) -> np.ndarray:
    """float32 [n, h, w, 3] in [0, 1] with the awkward cases of colour maths: half the images
    quantised to k/255 (ties between channels), one grey image, and runs of black, white and
    pure-red pixels."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, h, w, 3), dtype=np.float32)
    images[: n // 2] = rng.integers(0, 256, (n // 2, h, w, 3)).astype(np.float32) / np.float32(255)
    images[1] = images[1, ..., :1]
    images[2, 0] = 0.0
    images[2, 1] = 1.0
    images[2, 2] = (1.0, 0.0, 0.0)
    return images


def planar_backed(images: np.ndarray) -> np.ndarray:
    """The same NHWC values stored channel-planar, the layout the pipeline uses internally."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(images, -1, 1)), 1, -1)


@pytest.fixture
def images() -> np.ndarray:
    return make_float_images()


# --------------------------------------------------------------------------------------------------
# Geometry


BOXES = {
    # top, left, height, width per image: random boxes smaller than the image, with edge cases
    # mixed in
    "smaller": ([0, 5, 17, 30, 0, 10, 3, 24], [0, 9, 2, 31, 22, 10, 0, 0],
                [8, 20, 15, 2, 32, 11, 29, 8], [8, 13, 30, 1, 10, 11, 32, 32]),
    "equal": ([0] * N, [0] * N, [H] * N, [W] * N),
}


@pytest.mark.parametrize("boxes", sorted(BOXES))
@pytest.mark.parametrize("size", [32, 24, 40])
@pytest.mark.parametrize("layout", ["nhwc", "planar"])
def test_resized_crop_matches_torchvision(images, boxes, size, layout):
    top, left, height, width = (np.array(v) for v in BOXES[boxes])
    source = planar_backed(images) if layout == "planar" else images
    out = O.resized_crop(source, top, left, height, width, size)
    expected = torchvision_each(images, lambda i, t: F.resized_crop(
        t, int(top[i]), int(left[i]), int(height[i]), int(width[i]), [size, size], antialias=False))
    assert out.shape == (N, size, size, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=GEOMETRY_ATOL)


def test_resized_crop_of_a_batch_spanning_several_blocks_matches_torchvision():
    images = make_float_images(seed=11, n=150)
    top, left, height, width = A.sample_crop_boxes(np.random.default_rng(12), 150, H, W,
                                                   (0.08, 1.0), (0.5, 2.0))
    expected = torchvision_each(images, lambda i, t: F.resized_crop(
        t, int(top[i]), int(left[i]), int(height[i]), int(width[i]), [W, W], antialias=False))
    np.testing.assert_allclose(O.resized_crop(images, top, left, height, width, W), expected,
                               rtol=0, atol=GEOMETRY_ATOL)


def test_resized_crop_of_the_whole_image_at_its_size_is_exact(images):
    zeros, full = np.zeros(N, dtype=np.int64), np.full(N, H)
    np.testing.assert_array_equal(O.resized_crop(images, zeros, zeros, full, full, H), images)


def test_hflip_matches_torchvision(images):
    """The flip as the views apply it: mirrored, on the images a mask selects."""
    mask = np.array([True, False, True, True, False, False, True, False])
    expected = torchvision_each(images, lambda i, t: F.horizontal_flip(t) if mask[i] else t)
    for layout in (images, planar_backed(images)):
        flipped = layout.copy(order="K")
        O.apply_where(flipped, mask, O.mirrored)
        np.testing.assert_array_equal(flipped, expected)


# --------------------------------------------------------------------------------------------------
# Colour


JITTER_OPS = [
    # (ours, torchvision's, factor range, tolerance); brightness and contrast reach 1.6 so the clamp
    # matters
    (O.adjust_brightness, F.adjust_brightness, (0.0, 1.6), COLOUR_ATOL),
    (O.adjust_contrast, F.adjust_contrast, (0.0, 1.6), COLOUR_ATOL),
    (O.adjust_saturation, F.adjust_saturation, (0.0, 1.6), COLOUR_ATOL),
    (O.adjust_hue, F.adjust_hue, (-0.5, 0.5), HUE_ATOL),
]


@pytest.mark.parametrize("ours, theirs, factor_range, atol", JITTER_OPS,
                         ids=[op.__name__ for op, *_ in JITTER_OPS])
@pytest.mark.parametrize("layout", ["nhwc", "planar"])
def test_jitter_op_matches_torchvision(images, ours, theirs, factor_range, atol, layout):
    factors = np.random.default_rng(1).uniform(*factor_range, N).astype(np.float32)
    factors[0] = factor_range[0]
    source = planar_backed(images) if layout == "planar" else images
    out = ours(source, factors)
    expected = torchvision_each(images, lambda i, t: theirs(t, float(factors[i])))
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=atol)


def test_adjust_hue_agrees_with_torchvision_to_float_rounding(images):
    # Much tighter than the 2/255 contract: the HSV maths is the same as torchvision's up to float32
    # rounding.
    factors = np.linspace(-0.5, 0.5, N).astype(np.float32)
    expected = torchvision_each(images, lambda i, t: F.adjust_hue(t, float(factors[i])))
    np.testing.assert_allclose(O.adjust_hue(images, factors), expected, rtol=0, atol=1e-5)


def test_rgb_to_grayscale_matches_torchvision(images):
    expected = torchvision_each(images, lambda i, t: F.rgb_to_grayscale(t, num_output_channels=3))
    np.testing.assert_allclose(O.rgb_to_grayscale(images), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(O.rgb_to_grayscale(planar_backed(images)), expected, rtol=0,
                               atol=1e-6)


def test_sample_jitter_params_uses_colorjitter_ranges():
    params = A.AugmentParams(brightness=1.5, contrast=0.4, saturation=0.2, hue=0.1)
    jitter = A.sample_jitter_params(np.random.default_rng(0), 4000, params)
    reference = T.ColorJitter(brightness=1.5, contrast=0.4, saturation=0.2, hue=0.1)
    for name in ("brightness", "contrast", "saturation", "hue"):
        low, high = getattr(reference, name)
        values = getattr(jitter, name)
        assert values.dtype == np.float32
        assert (low <= values.min() < low + 0.01 * (high - low)
                and high - 0.01 * (high - low) < values.max() <= high)
    assert np.array_equal(np.sort(jitter.order, axis=1), np.tile(np.arange(4), (4000, 1)))
    first_ops = np.bincount(jitter.order[:, 0], minlength=4)
    assert first_ops.min() > 900  # every op leads about a quarter of the time
    assert 0.77 < jitter.apply.mean() < 0.83


TORCHVISION_JITTER = {A.BRIGHTNESS: ("brightness", F.adjust_brightness),
                      A.CONTRAST: ("contrast", F.adjust_contrast),
                      A.SATURATION: ("saturation", F.adjust_saturation),
                      A.HUE: ("hue", F.adjust_hue)}


def torchvision_jitter(image: torch.Tensor, jitter: A.JitterParams, i: int) -> torch.Tensor:
    """Replay image i's colour jitter with torchvision: its four ops in its own order, with its
    factors."""
    if not jitter.apply[i]:
        return image
    for op_id in jitter.order[i]:
        name, op = TORCHVISION_JITTER[int(op_id)]
        image = op(image, float(getattr(jitter, name)[i]))
    return image


def test_color_jitter_in_random_order_matches_torchvision_replay():
    images = make_float_images(seed=2, n=48)
    jitter = A.sample_jitter_params(np.random.default_rng(3), 48,
                                    A.AugmentParams(jitter_p=0.9, hue=0.5))
    # many different orders exercised
    assert len({tuple(row) for row in jitter.order[jitter.apply]}) > 12
    expected = torchvision_each(images, lambda i, t: torchvision_jitter(t, jitter, i))
    jittered = O.color_jitter(images, A.jitter_schedule(jitter), A.jitter_factors(jitter))
    np.testing.assert_allclose(jittered, expected, rtol=0, atol=HUE_ATOL)
    untouched = ~jitter.apply
    np.testing.assert_array_equal(jittered[untouched], images[untouched])


def test_zero_strength_jitter_is_the_identity(images):
    params = A.AugmentParams(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    jitter = A.sample_jitter_params(np.random.default_rng(0), N, params)
    jittered = O.color_jitter(images, A.jitter_schedule(jitter), A.jitter_factors(jitter))
    np.testing.assert_array_equal(jittered, images)


# --------------------------------------------------------------------------------------------------
# Filters and normalisation


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_gaussian_blur_matches_torchvision(images, kernel_size):
    sigmas = np.random.default_rng(4).uniform(0.1, 2.0, N).astype(np.float32)
    expected = torchvision_each(images, lambda i, t: F.gaussian_blur(
        t, [kernel_size, kernel_size], [float(sigmas[i]), float(sigmas[i])]))
    for source in (images, planar_backed(images)):
        out = O.gaussian_blur(source, sigmas, kernel_size)
        assert out.shape == images.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=0, atol=GEOMETRY_ATOL)


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize_matches_torchvision(images, threshold):
    mask = np.array([True, True, False, True, False, True, False, True])
    expected = torchvision_each(images, lambda i, t: F.solarize(t, threshold) if mask[i] else t)
    np.testing.assert_array_equal(O.solarize(images, mask, threshold), expected)


def test_normalize_matches_torchvision(images):
    expected = torchvision_each(images,
                                lambda i, t: F.normalize(t, list(PARAMS.mean), list(PARAMS.std)))
    for source in (images, planar_backed(images)):
        out = O.normalize(source, PARAMS.mean, PARAMS.std)
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_to_float01_divides_by_255_like_to_tensor():
    images = np.random.default_rng(5).integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    expected = np.stack([from_torch(F1.to_tensor(image)) for image in images])
    np.testing.assert_array_equal(O.to_float01(images), expected)


# --------------------------------------------------------------------------------------------------
# Crop boxes


@pytest.mark.parametrize("h, w", [(32, 32), (24, 40)])
def test_sample_crop_boxes_are_valid_and_within_scale_and_ratio(h, w):
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    top, left, height, width = A.sample_crop_boxes(np.random.default_rng(6), 4000, h, w, scale,
                                                   ratio)
    assert (height > 0).all() and (width > 0).all()
    assert ((top >= 0).all() and (left >= 0).all() and (top + height <= h).all()
            and (left + width <= w).all())
    # w = round(sqrt(area ratio)) and h = round(sqrt(area / ratio)) each move by at most 0.5,
    # so the drawn area and ratio lie in these intervals; they must meet the requested ranges.
    area_low, area_high = (height - 0.5) * (width - 0.5), (height + 0.5) * (width + 0.5)
    assert (area_high >= scale[0] * h * w).all() and (area_low <= scale[1] * h * w).all()
    assert (((width + 0.5) / (height - 0.5) >= ratio[0]).all()
            and ((width - 0.5) / (height + 0.5) <= ratio[1]).all())
    # Top and left are uniform over the free room, so on average they sit in its middle.
    for start, room in ((top, h - height), (left, w - width)):
        assert abs(np.mean(start[room > 0] / room[room > 0]) - 0.5) < 0.03


def test_sample_crop_boxes_distribution_matches_torchvision():
    n, scale, ratio = 3000, (0.2, 1.0), (3 / 4, 4 / 3)
    _, _, height, width = A.sample_crop_boxes(np.random.default_rng(7), n, H, W, scale, ratio)
    torch.manual_seed(0)
    reference = np.array([T1.RandomResizedCrop.get_params(torch.zeros(3, H, W), list(scale),
                                                          list(ratio))
                          for _ in range(n)])
    ref_height, ref_width = reference[:, 2], reference[:, 3]
    ours = {"area": height * width / (H * W), "log ratio": np.log(width / height)}
    theirs = {"area": ref_height * ref_width / (H * W), "log ratio": np.log(ref_width / ref_height)}
    for key in ours:
        sem = np.sqrt((ours[key].var() + theirs[key].var()) / n)
        assert abs(ours[key].mean() - theirs[key].mean()) < 4 * sem, key
        assert abs(ours[key].std() - theirs[key].std()) < 0.05 * theirs[key].std(), key
        np.testing.assert_allclose(np.quantile(ours[key], [0.1, 0.5, 0.9]),
                                   np.quantile(theirs[key], [0.1, 0.5, 0.9]), atol=0.04)


@pytest.mark.parametrize("h, w", [(32, 32), (20, 64), (64, 20), (30, 31)])
def test_sample_crop_boxes_fallback_is_torchvisions_central_crop(h, w):
    scale, ratio = (2.0, 3.0), (3 / 4, 4 / 3)  # every try is larger than the image
    expected = T1.RandomResizedCrop.get_params(torch.zeros(3, h, w), list(scale), list(ratio))
    boxes = A.sample_crop_boxes(np.random.default_rng(8), 16, h, w, scale, ratio)
    for got, want in zip(boxes, expected):
        assert got.tolist() == [want] * 16


def test_sample_crop_boxes_falls_back_per_image_as_often_as_torchvision():
    # Areas of 0.9-1.6 x the image: some images find a box within 10 tries, the others
    # take the whole image.
    n, scale, ratio = 3000, (0.9, 1.6), (3 / 4, 4 / 3)
    boxes = np.stack(A.sample_crop_boxes(np.random.default_rng(9), n, H, W, scale, ratio), axis=1)
    torch.manual_seed(1)
    reference = np.array([T1.RandomResizedCrop.get_params(torch.zeros(3, H, W), list(scale),
                                                          list(ratio))
                          for _ in range(n)])
    whole = [0, 0, H, W]
    ours, theirs = (boxes == whole).all(axis=1).mean(), (reference == whole).all(axis=1).mean()
    assert 0.05 < ours < 0.95
    assert abs(ours - theirs) < 4 * np.sqrt(theirs * (1 - theirs) * 2 / n)


# --------------------------------------------------------------------------------------------------
# The pipeline


def uint8_batch(n: int = N, h: int = H, w: int = W, seed: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h, w, size", [(32, 32, 32), (40, 36, 32), (32, 32, 24)])
def test_make_views_shapes_and_dtypes(h, w, size):
    view_a, view_b = A.make_views(uint8_batch(h=h, w=w), A.AugmentParams(size=size), seed=0,
                                  epoch=0, step=0)
    for view in (view_a, view_b):
        assert (view.shape == (N, size, size, 3) and view.dtype == np.float32
                and view.flags.c_contiguous)
        assert np.isfinite(view).all()


def test_make_views_is_deterministic_in_seed_epoch_step():
    images = uint8_batch(n=16)
    params = A.AugmentParams(blur_p=0.5)
    view_a, view_b = A.make_views(images, params, seed=1, epoch=2, step=3)
    again_a, again_b = A.make_views(images.copy(), params, seed=1, epoch=2, step=3)
    assert view_a.tobytes() == again_a.tobytes() and view_b.tobytes() == again_b.tobytes()
    assert view_a.tobytes() != view_b.tobytes()
    for seed, epoch, step in ((1, 2, 4), (1, 3, 3), (2, 2, 3)):
        other_a, _ = A.make_views(images, params, seed=seed, epoch=epoch, step=step)
        assert other_a.tobytes() != view_a.tobytes()


def test_make_views_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        A.make_views(uint8_batch().astype(np.float32), PARAMS, seed=0, epoch=0, step=0)


def torchvision_view(image: np.ndarray, view: A.ViewParams, params: A.AugmentParams,
                     i: int) -> np.ndarray:
    """Image i of one view, recomputed with torchvision from the view's drawn parameters."""
    t = F1.to_tensor(image)
    t = F.resized_crop(t, int(view.top[i]), int(view.left[i]), int(view.height[i]),
                       int(view.width[i]), [params.size, params.size], antialias=False)
    t = torchvision_jitter(t, view.jitter, i)
    if view.gray[i]:
        t = F.rgb_to_grayscale(t, num_output_channels=3)
    if view.blur[i]:
        sigma = float(view.blur_sigma[i])
        t = F.gaussian_blur(t, [params.blur_kernel, params.blur_kernel], [sigma, sigma])
    if view.solarize[i]:
        t = F.solarize(t, 0.5)
    if view.flip[i]:
        t = F.horizontal_flip(t)
    return from_torch(F.normalize(t, list(params.mean), list(params.std)))


def test_probability_zero_view_is_just_crop_then_normalize():
    params = A.AugmentParams(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    images = uint8_batch(n=16)
    for view_index, out in enumerate(A.make_views(images, params, seed=5, epoch=0, step=2)):
        drawn = A.sample_view_params(A.view_rng(5, 0, 2, view_index), 16, H, W, params)
        expected = np.stack([from_torch(F.normalize(F.resized_crop(
            F1.to_tensor(image), int(drawn.top[i]), int(drawn.left[i]), int(drawn.height[i]),
            int(drawn.width[i]), [params.size, params.size], antialias=False), list(params.mean),
            list(params.std)))
            for i, image in enumerate(images)])
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("params", [
    A.AugmentParams(),
    A.AugmentParams(jitter_p=1.0, gray_p=0.5, blur_p=0.5, blur_kernel=5, solarize_p=0.5, size=24),
], ids=["defaults", "every-op"])
def test_make_views_matches_torchvision_replay_of_its_draws(params):
    images = uint8_batch(n=24)
    seed, epoch, step = 3, 1, 7
    for view_index, out in enumerate(A.make_views(images, params, seed, epoch, step)):
        drawn = A.sample_view_params(A.view_rng(seed, epoch, step, view_index), 24, H, W, params)
        expected = np.stack([torchvision_view(image, drawn, params, i)
                             for i, image in enumerate(images)])
        # the colour tolerance is in [0, 1] units, and normalisation divides it by std
        np.testing.assert_allclose(out, expected, rtol=0, atol=HUE_ATOL / min(params.std))
