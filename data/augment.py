"""Per-image transforms as pieces of a DALI graph; each runs on the device its input lives on (CPU or GPU).

Pretraining view, the MoCo v2 recipe (Chen et al. 2020, "Improved Baselines with Momentum Contrastive
Learning"), itself SimCLR's (Chen et al., ICML 2020) plus blur, as used by Liu et al. (AAAI 2021):
  1. random resized crop: area U(min_scale, 1) of the image (0.2 by default), aspect ratio U(3/4, 4/3);
  2. horizontal flip, p = 0.5, when `flip` is on (applied while normalizing; it commutes with the colour and blur
     steps). Off for data whose mirror image is another thing, such as digits: a mirrored 2 is not a 2;
  3. colour jitter, p = 0.8: brightness, contrast and saturation factors U(0.6, 1.4), hue shift U(-36, 36)
     degrees (torchvision's hue=0.1 is a tenth of a turn; DALI's hue is in degrees);
  4. grayscale, p = 0.2 (saturation 0);
  5. Gaussian blur, p = 0.5: sigma U(0.1, 2) pixels, window about a tenth of the image side (SimCLR), unless
     `blur` is off (SimCLR leaves it out on 32-pixel CIFAR-10; on the built-in 32-pixel digits it helps);
  6. normalize with the ImageNet mean and std to float32 CHW.
Two departures from torchvision: the jitter is one colour twist in a fixed order rather than the four
factors in random order, and DALI's contrast pivots on mid-grey rather than on the image mean.

Evaluation view: resize the shorter side to round(image_size / crop_ratio), center crop image_size, normalize
(crop_ratio 0.875: 256 -> 224 on ImageNet; 1.0 for 32x32 images). Linear-evaluation training view: random
resized crop with area U(0.08, 1), flip (when `flip` is on), normalize (the standard supervised ImageNet recipe).

The random choices with a probability are `if`s on a per-sample coin: the pipeline must be defined with
`enable_conditionals=True`, and DALI then runs each branch only on the samples that take it. DALI's autograph
rewrites every function such a pipeline calls, at each process's first build; the pieces without a coin are
`do_not_convert`, left as they are, which saves much of that build's CPU time.
"""
from nvidia.dali import fn, types
from nvidia.dali.pipeline import do_not_convert

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]  # of 0..255 pixels, RGB
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
ASPECT_RATIO_RANGE = [3 / 4, 4 / 3]
LINEAR_MIN_SCALE = 0.08
JITTER_PROBABILITY = 0.8
JITTER_FACTOR_RANGE = [0.6, 1.4]  # 1 -+ 0.4 for brightness, contrast and saturation
HUE_SHIFT_DEGREES = 36.0
GRAYSCALE_PROBABILITY = 0.2
BLUR_PROBABILITY = 0.5
BLUR_SIGMA_RANGE = [0.1, 2.0]
BLUR_WINDOW_FRACTION = 0.1


def pretrain_view(images, image_size, min_scale, flip, blur=True):
    """One independently augmented pretraining view of each decoded HWC uint8 image -> [3, S, S] float."""
    views = random_crop(images, image_size, min_scale)
    if fn.random.coin_flip(probability=JITTER_PROBABILITY):
        views = fn.color_twist(
            views,
            brightness=fn.random.uniform(range=JITTER_FACTOR_RANGE),
            contrast=fn.random.uniform(range=JITTER_FACTOR_RANGE),
            saturation=fn.random.uniform(range=JITTER_FACTOR_RANGE),
            hue=fn.random.uniform(range=[-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES]),
        )
    if fn.random.coin_flip(probability=GRAYSCALE_PROBABILITY):
        views = fn.color_twist(views, saturation=0.0)
    if blur:  # a Python choice made when the graph is built; the coin below is DALI's, per sample
        views = random_blur(views, image_size)
    return normalize(views, mirror=random_mirror(flip))


def random_blur(views, image_size):
    """Gaussian blur of each view with probability BLUR_PROBABILITY."""
    if fn.random.coin_flip(probability=BLUR_PROBABILITY):
        views = fn.gaussian_blur(views, sigma=fn.random.uniform(range=BLUR_SIGMA_RANGE),
                                 window_size=blur_window(image_size))
    return views


@do_not_convert
def linear_train_view(images, image_size, flip):
    """Random resized crop (area 0.08..1) and, if `flip`, a random flip of each decoded image -> [3, S, S] float."""
    return normalize(random_crop(images, image_size, LINEAR_MIN_SCALE), mirror=random_mirror(flip))


@do_not_convert
def center_view(images, image_size, crop_ratio):
    """Deterministic view: shorter side to round(S / crop_ratio), center crop S x S -> [3, S, S] float."""
    resized = fn.resize(images, resize_shorter=round(image_size / crop_ratio))
    return normalize(resized, crop=(image_size, image_size))


@do_not_convert
def random_crop(images, image_size, min_scale):
    return fn.random_resized_crop(images, size=[image_size, image_size], random_area=[min_scale, 1.0],
                                  random_aspect_ratio=ASPECT_RATIO_RANGE)


@do_not_convert
def random_mirror(flip):
    """A per-sample coin (mirror with p = 0.5) if `flip`, else 0 (never mirror)."""
    return fn.random.coin_flip() if flip else 0


@do_not_convert
def blur_window(image_size):
    """Odd window of about BLUR_WINDOW_FRACTION of the side, at least 3: 5 at 32 pixels, 23 at 224."""
    return max(3, 2 * round(BLUR_WINDOW_FRACTION * image_size / 2) + 1)


@do_not_convert
def normalize(images, mirror=0, crop=None):
    """HWC uint8 -> CHW float32 standardized with the ImageNet statistics, optionally flipped or center-cropped."""
    return fn.crop_mirror_normalize(images, crop=crop, mirror=mirror, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                    dtype=types.FLOAT, output_layout="CHW")
