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

from data import DataError, MultiCropAugmentation, SyntheticImages, blur_kernel_size, build_dataset, eval_transform


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
    augment = MultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    views = augment(SyntheticImages("train", n_images=1, image_size=40)[0][0])
    assert len(views) == 2 + 3
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views)


def test_multicrop_without_local_views_gives_two_views():
    """local_crops_number=0: only the 2 global views."""
    augment = MultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=0)
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
