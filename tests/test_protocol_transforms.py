"""Each evaluation resizes its images with its protocol's kernel: bilinear in the authors' k-means,
VOC07 and iNat scripts (torchvision's Resize(256) default), bicubic in DINO's k-NN and in the linear
probe's val images; the classifiers' RandomResizedCrop views are bilinear (the authors' and DINO's).

Every check runs the script's own pipeline on patterned images (a checkerboard over two gradients:
the two kernels give different pixels there, where a flat image would hide the difference) through
a "backbone" that flattens the image, so the features ARE the evaluation views: they must equal the
views of the protocol's kernel and differ from the other kernel's.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import features
import fewshot_eval
import kmeans_eval
import knn_eval
import linear_eval
from data import eval_transform, load_image

SIZE = 14  # short side resized to round(14 / 0.875) = 16, then a 14 x 14 centre crop


def patterned_image(path, seed):
    """A 24 x 20 RGB image: red and blue gradients (offset by `seed`) under a one-pixel checkerboard
    in green. Resized to a short side of 16, bilinear and bicubic differ by several grey levels."""
    y, x = np.indices((20, 24))
    pixels = np.stack([(10 * x + 7 * seed) % 256, 255 * ((x + y) % 2), (12 * y + 5 * seed) % 256], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


class PixelBackbone(torch.nn.Module):
    """The evaluation view, flattened: (B, 3, S, S) -> (B, 3 S S)."""

    embed_dim = 3 * SIZE * SIZE

    def forward(self, images):
        return images.flatten(1)


def use_pixel_backbone(monkeypatch, module):
    monkeypatch.setattr(module, "backbone_from_args", lambda *args, **kwargs: PixelBackbone())


def views(paths, kernel):
    """(N, 3 S S): the evaluation views of the image files with `kernel`, flattened."""
    return torch.stack([eval_transform(SIZE, kernel)(load_image(path)).flatten() for path in paths])


def saved_features(path):
    """The features a --dump_features file holds."""
    return torch.load(path, weights_only=True)["features"]


def assert_resized_with(found, paths, kernel):
    """`found` holds the `kernel` views of `paths`, not those of the other kernel."""
    other = {"bilinear": "bicubic", "bicubic": "bilinear"}[kernel]
    torch.testing.assert_close(found, views(paths, kernel), atol=1e-5, rtol=0)
    assert (found - views(paths, other)).abs().max() > 0.05  # the kernels differ by > 1/100 of the pixel range


def test_the_two_kernels_differ_on_the_pattern(tmp_path):
    """The test image tells the kernels apart: their views differ by several grey levels (0.05 in
    normalised units is 3 of 255), which a flat-colour image would not show."""
    path = patterned_image(tmp_path / "a.png", 0)
    assert (views([path], "bilinear") - views([path], "bicubic")).abs().max() > 0.05


@pytest.fixture
def image_folder(tmp_path):
    """train/ and val/ of 2 classes, 2 patterned images each: (root, train paths, val paths) in the
    order of ImageFolder (class, then file name)."""
    paths = {split: [patterned_image(tmp_path / "data" / split / c / f"{i}.png", seed=10 * s + 3 * j + i)
                     for j, c in enumerate("ab") for i in range(2)]
             for s, split in enumerate(("train", "val"))}
    return tmp_path / "data", paths["train"], paths["val"]


FOLDER = ["--pretrained_weights", "random", "--dataset", "imagefolder", "--image_size", str(SIZE), "--num_workers", "0"]


def test_knn_resizes_bicubic_as_dino(image_folder, tmp_path, monkeypatch):
    """knn_eval.py: DINO's eval_knn.py resizes with interpolation=3, bicubic."""
    root, train, val = image_folder
    use_pixel_backbone(monkeypatch, features)
    knn_eval.main(FOLDER + ["--data_path", str(root), "--nb_knn", "1", "--dump_features", str(tmp_path / "f")])
    for split, paths in (("train", train), ("val", val)):
        assert_resized_with(saved_features(tmp_path / "f" / f"{split}_features.pth"), paths, "bicubic")


@pytest.mark.parametrize("flags, kernel", [([], "bilinear"), (["--resize_interpolation", "bicubic"], "bicubic")])
def test_kmeans_resizes_bilinear_as_the_authors(image_folder, tmp_path, monkeypatch, flags, kernel):
    """kmeans_eval.py: the authors' Resize(256) is torchvision's bilinear (the default);
    --resize_interpolation bicubic is the other kernel."""
    root, train, val = image_folder
    use_pixel_backbone(monkeypatch, features)
    kmeans_eval.main(FOLDER + ["--data_path", str(root), "--n_init", "1", "--dump_features", str(tmp_path / "f")]
                     + flags)
    for split, paths in (("train", train), ("val", val)):
        assert_resized_with(saved_features(tmp_path / "f" / f"{split}_features.pth"), paths, kernel)


def test_linear_probe_val_is_bicubic_and_its_crops_bilinear(image_folder, tmp_path, monkeypatch):
    """linear_eval.py (the paper's protocol): val images resized bicubic, as DINO's eval_linear.py;
    the train views are RandomResizedCrop with torchvision's default bilinear kernel."""
    root, _, val = image_folder
    use_pixel_backbone(monkeypatch, linear_eval)
    extracted, crops = [], []
    original_extract, original_crops = linear_eval.extract_features, linear_eval.train_transform

    def recording_extract(*args, **kwargs):  # the val features: the probe's only extraction
        extracted.append(original_extract(*args, **kwargs))
        return extracted[-1]

    def recording_crops(*args):
        crops.append(args)
        return original_crops(*args)

    monkeypatch.setattr(linear_eval, "extract_features", recording_extract)
    monkeypatch.setattr(linear_eval, "train_transform", recording_crops)
    linear_eval.main(FOLDER + ["--data_path", str(root), "--epochs", "1", "--optimizer", "sgd",
                               "--output_dir", str(tmp_path / "out")])
    assert len(extracted) == 1 and crops == [(SIZE, "bilinear")]
    assert_resized_with(extracted[0][0], val, "bicubic")


def write_voc(root, split, image_ids, seed):
    """A VOC2007 split in torchvision's VOCDetection layout: patterned JPEGs, one cat per image."""
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image_id in enumerate(image_ids):
        paths.append(patterned_image(voc / "JPEGImages" / f"{image_id}.jpg", seed + i))
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><object><name>cat</name><difficult>0</difficult>"
            f"</object></annotation>")
    (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in image_ids))
    return paths


def test_voc07_resizes_bilinear_as_the_authors(tmp_path, monkeypatch):
    """fewshot_eval.py --protocol voc07_svm: the authors' eval_svm_voc.py features come from
    Resize(256), bilinear; the test images too."""
    trainval = write_voc(tmp_path / "voc", "trainval", ["000001", "000002"], seed=0)
    test = write_voc(tmp_path / "voc", "test", ["000003"], seed=5)
    use_pixel_backbone(monkeypatch, fewshot_eval)
    fewshot_eval.main(["--protocol", "voc07_svm", "--pretrained_weights", "random", "--data_path",
                       str(tmp_path / "voc"), "--image_size", str(SIZE), "--num_workers", "0", "--shots", "1",
                       "--runs", "1", "--dump_features", str(tmp_path / "f")])
    assert_resized_with(saved_features(tmp_path / "f" / "trainval_features.pth"), trainval, "bilinear")
    assert_resized_with(saved_features(tmp_path / "f" / "test_features.pth"), test, "bilinear")


def write_inat2018(root):
    """The iNat-2018 json release with patterned images: 2 train and 2 val images of species 7 and 9."""
    paths = {}
    for s, split in enumerate(("train", "val")):
        images, annotations, paths[split] = [], [], []
        for i, category in enumerate((7, 9)):
            file_name = f"train_val2018/Plantae/{category}/{split}{i}.png"
            paths[split].append(patterned_image(root / file_name, seed=10 * s + i))
            images.append({"id": 100 * s + i, "file_name": file_name})
            annotations.append({"id": 100 * s + i, "image_id": 100 * s + i, "category_id": category})
        (root / f"{split}2018.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return paths


@pytest.mark.parametrize("cached", [False, True])
def test_inat_lowshot_val_resizes_bilinear_as_the_authors(tmp_path, monkeypatch, cached):
    """fewshot_eval.py --protocol lowshot_linear on the iNat-2018 json: the authors'
    evaluate_inat2018.py resizes val images with Resize(256), bilinear, and crops the k-shot views
    with RandomResizedCrop(224), bilinear; the fast mode's cached features use the same resize."""
    paths = write_inat2018(tmp_path)
    use_pixel_backbone(monkeypatch, fewshot_eval)
    crops, original_crops = [], fewshot_eval.train_transform

    def recording_crops(*args):
        crops.append(args)
        return original_crops(*args)

    monkeypatch.setattr(fewshot_eval, "train_transform", recording_crops)
    argv = ["--protocol", "lowshot_linear", "--pretrained_weights", "random", "--dataset", "imagefolder",
            "--data_path", str(tmp_path), "--image_size", str(SIZE), "--num_workers", "0"]
    if cached:
        fewshot_eval.main(argv + ["--cached_features", "true", "--epochs", "1", "--dump_features", str(tmp_path / "f")])
        found = {split: saved_features(tmp_path / "f" / f"{split}_features.pth") for split in paths}
        assert_resized_with(found["train"], paths["train"], "bilinear")
    else:
        found, _ = fewshot_eval.augmented_views(fewshot_eval.get_args(argv), "cpu")
        found = {split: features for split, (features, _) in found.items()}
        assert crops == [(SIZE, "bilinear")]
    assert_resized_with(found["val"], paths["val"], "bilinear")


def test_resize_defaults_of_every_protocol():
    """The --resize_interpolation each script defaults to: bicubic for k-NN, the linear probe and our
    nshot_logreg; bilinear for k-means, VOC07 and iNat low-shot."""
    base = ["--pretrained_weights", "random"]
    assert knn_eval.get_args(base).resize_interpolation == "bicubic"
    assert linear_eval.get_args(base).resize_interpolation == "bicubic"
    assert kmeans_eval.get_args(base).resize_interpolation == "bilinear"
    found = {p: fewshot_eval.get_args(base + ["--protocol", p]).resize_interpolation
             for p in ("voc07_svm", "lowshot_linear", "nshot_logreg")}
    assert found == {"voc07_svm": "bilinear", "lowshot_linear": "bilinear", "nshot_logreg": "bicubic"}
