"""Datasets and image transforms shared by pretrain.py and the evaluation scripts.

- `build_dataset(name, split, ...)`: one table of datasets by name, for pretraining ('pretrain'
  split) and for labelled evaluation ('train' and 'val' splits).
- `MultiCropAugmentation`: the paper's 2 global + M local views of an image.
- `eval_transform`: resize the short side to size / 0.875, centre-crop, normalise.
- `SyntheticImages`: a deterministic, procedurally generated labelled image dataset that needs no
  download (quick demo, tests).
"""
import math
import os

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(Exception):
    """Data that cannot be used as given; the message says what was expected and how to fix it."""


# ============ transforms ============

def to_normalized_tensor():
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size=224):
    """Evaluation view: short side to image_size / 0.875 (256 for 224), bicubic, centre crop."""
    return v2.Compose([
        v2.Resize(int(round(image_size / 0.875)), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        to_normalized_tensor(),
    ])


def blur_kernel_size(crop_size):
    """Odd Gaussian-blur kernel of ~10% of the crop (23 px at 224, as in SimCLR), at least 3.
    NOTE(authors' code): PIL's GaussianBlur has no kernel size; sigma in 0.1-2.0 is the same."""
    return max(3, int(0.1 * crop_size) // 2 * 2 + 1)


class MultiCropAugmentation:
    """The paper's views of one image: 2 global crops and `local_crops_number` local crops.

    All views: bicubic RandomResizedCrop, horizontal flip p 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1)
    p 0.8, grayscale p 0.2, then Gaussian blur (sigma 0.1-2.0) and solarisation that differ per
    view: global view 1 blur p 1.0; global view 2 blur p 0.1 and solarise p 0.2; local views blur
    p 0.5. Returns a list of 2 + M normalised float tensors (3, H, W), global views first.
    """

    def __init__(self, global_crops_scale=(0.2, 1.0), local_crops_scale=(0.05, 0.2), local_crops_number=6,
                 global_crops_size=224, local_crops_size=96):
        def view(size, scale, blur_p, solarize_p=0.0):
            return v2.Compose([
                v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=blur_p),
                v2.RandomSolarize(threshold=128, p=solarize_p),
                to_normalized_tensor(),
            ])

        self.global_view1 = view(global_crops_size, global_crops_scale, blur_p=1.0)
        self.global_view2 = view(global_crops_size, global_crops_scale, blur_p=0.1, solarize_p=0.2)
        self.local_view = view(local_crops_size, local_crops_scale, blur_p=0.5)
        self.local_crops_number = local_crops_number

    def __call__(self, image):
        views = [self.global_view1(image), self.global_view2(image)]
        views += [self.local_view(image) for _ in range(self.local_crops_number)]
        return views


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


# ============ the table of datasets ============

def load_image(path):
    """RGB image from a file; a file that cannot be read raises an error that names it."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}. Remove or replace the file.") from None


def image_folder(root, split, transform):
    """ImageNet layout: root/train/<class>/<image> and root/val/<class>/<image>. For pretraining,
    root may also be a plain folder of class sub-folders (labels are then unused)."""
    folder = os.path.join(root, "train" if split == "pretrain" else split)
    if split == "pretrain" and not os.path.isdir(folder):
        folder = root
    if not os.path.isdir(folder):
        raise DataError(f"image folder {folder} does not exist; --data_path should hold train/ and val/ "
                        f"folders of class sub-folders (the ImageNet layout)")
    try:
        return torchvision.datasets.ImageFolder(folder, transform=transform, loader=load_image)
    except FileNotFoundError as e:
        raise DataError(f"no images in {folder}: {e}. Expected {folder}/<class name>/<image>.jpg") from None


def torchvision_dataset(cls, splits, **fixed):
    """Builder for a torchvision dataset class; `splits` maps our split name to the constructor's
    keyword arguments, `fixed` holds the ones every split shares."""
    def build(root, split, transform, download):
        if root is None:
            raise DataError(f"{cls.__name__} needs --data_path, the folder that holds (or will hold) its files")
        try:
            return cls(root, transform=transform, download=download, **splits[split], **fixed)
        except (RuntimeError, FileNotFoundError) as e:
            how = ("Pass --download to fetch it there" if not download
                   else "Download it by hand as the torchvision documentation of the class explains")
            raise DataError(f"{cls.__name__} not found in {root} ({e}). {how}, or point --data_path to the "
                            f"folder that holds it.") from None
    return build


def splits(train, val):
    """Split keywords of the torchvision classes that take split='...': pretraining reads the train split."""
    return {"pretrain": {"split": train}, "train": {"split": train}, "val": {"split": val}}


DATASETS = {
    "imagefolder": lambda root, split, transform, download: image_folder(root, split, transform),
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
