"""fewshot_eval.py: VOC07 labels from the real on-disk layout, VOC AP, the k-shot draws, the three
protocols on toy features, and each protocol end to end on generated data."""
import argparse
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

import fewshot_eval
from data import DataError
from fewshot_eval import (VOC_CLASSES, fit_logreg, inat2018_datasets, kshot_classifiers, lr_per_epoch,
                          sample_kshot, voc07_dataset, voc07_svm, voc_average_precision, voc_full_sets,
                          voc_lowshot_sets, voc_mean_ap, voc_svm_test_scores)


# ============ generated data in the real layouts ============

def write_voc(root, split, images):
    """VOCdevkit/VOC2007 in torchvision's VOCDetection layout. images: {id: [(class, difficult), ...]};
    each image is a 24x20 JPEG whose colour encodes its first class."""
    voc = root / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    for image_id, objects in images.items():
        level = 40 + 9 * VOC_CLASSES.index(objects[0][0]) if objects and objects[0][0] in VOC_CLASSES else 0
        Image.new("RGB", (24, 20), (level, 255 - level, level)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        xml_objects = "".join(
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
            for name, difficult in objects)
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>24</width><height>20</height><depth>3</depth></size>{xml_objects}</annotation>")
    with open(voc / "ImageSets" / "Main" / f"{split}.txt", "w") as f:
        f.write("".join(f"{image_id}\n" for image_id in images))


def write_inat2018(root, category_of_train, category_of_val):
    """The official iNat-2018 release: {train,val}2018.json (COCO style) and the train_val2018/ tree."""
    for split, categories in (("train", category_of_train), ("val", category_of_val)):
        images, annotations = [], []
        for i, category in enumerate(categories):
            image_id = 1000 * (split == "val") + i
            file_name = f"train_val2018/Plantae/{category}/{split}{i}.jpg"
            (root / file_name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), (30 * category % 256, 0, 0)).save(root / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": 20, "height": 20})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": category})
        categories_list = [{"id": c, "name": f"species{c}"} for c in sorted(set(category_of_train))]
        with open(root / f"{split}2018.json", "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories_list}, f)


def voc_row(**labels):
    row = np.full(20, -1)
    for name, value in labels.items():
        row[VOC_CLASSES.index(name)] = value
    return row


def args_of(**overrides):
    """The protocol flags at their defaults, as get_args would give them."""
    args = dict(protocol="voc07_svm", shots=[1, 2, 4, 8, 16], runs=5, seed=0, cost=0.5, voc_negatives="sampled",
                voc_ap="area", svm_max_iter=2000, epochs=20, lr=0.3, momentum=0.9, weight_decay=1e-6,
                lr_milestones=[12, 18], lr_gamma=0.1, linear_batch_size=256, logreg_c=1.0, logreg_max_iter=1000)
    args.update(overrides)
    return argparse.Namespace(**args)


# ============ VOC07 labels ============

def test_voc_labels_are_plus_one_zero_minus_one_from_the_xml_difficult_flags(tmp_path):
    """+1: a non-difficult object of the class; 0: only difficult ones; -1: none, read from the
    real layout (ImageSets/Main/<split>.txt, Annotations/<id>.xml) in the split file's order."""
    write_voc(tmp_path, "trainval", {
        "000005": [("dog", 0), ("person", 1)],
        "000002": [("cat", 1), ("cat", 0)],  # one non-difficult cat is enough for +1
        "000009": [("car", 1), ("car", 1), ("bus", 0)],  # only difficult cars: 0
    })
    dataset = voc07_dataset(str(tmp_path), "trainval", transform=lambda image: image)
    expected = np.stack([voc_row(dog=1, person=0), voc_row(cat=1), voc_row(car=0, bus=1)])
    np.testing.assert_array_equal(dataset.labels.numpy(), expected)
    assert [os.path.basename(f) for f in dataset.files] == ["000005.jpg", "000002.jpg", "000009.jpg"]
    image, index = dataset[2]  # the label rows are looked up by index after feature extraction
    assert index == 2 and image.size == (24, 20)


def test_voc_missing_layout_and_unknown_class_are_data_errors(tmp_path):
    """A folder without VOCdevkit/VOC2007 or with a class name outside the 20 gives a DataError
    that names what was expected."""
    with pytest.raises(DataError, match="VOCdevkit/VOC2007"):
        voc07_dataset(str(tmp_path), "test", transform=None)
    write_voc(tmp_path, "test", {"000001": [("unicorn", 0)]})
    with pytest.raises(DataError, match="unicorn"):
        voc07_dataset(str(tmp_path), "test", transform=None)


# ============ VOC AP ============

def test_voc_ap_area_and_11point_by_hand():
    """Ranked labels +, -, +, (difficult), -, +: precision at the 3 positives 1, 2/3, 3/5, so the
    area AP is (1 + 2/3 + 3/5) / 3 = 34/45 and the 11-point AP (4 x 1 + 3 x 2/3 + 4 x 3/5) / 11 = 8.4/11;
    the difficult image is left out of the ranking."""
    scores = np.array([0.4, 0.9, 0.6, 0.8, 0.7, 0.5])
    labels = np.array([1, 1, 0, -1, 1, -1])  # by decreasing score: +, -, +, 0, -, +
    assert voc_average_precision(scores, labels, "area") == pytest.approx(34 / 45)
    assert voc_average_precision(scores, labels, "11point") == pytest.approx(8.4 / 11)


def test_voc_ap_uses_the_best_precision_at_higher_recall():
    """Ranked -, +, +: precisions 1/2 and 2/3 at the positives; the monotone envelope raises the
    first to 2/3, so AP = 2/3 (not 7/12). A difficult image ranked first changes nothing."""
    assert voc_average_precision(np.array([3.0, 2.0, 1.0]), np.array([-1, 1, 1])) == pytest.approx(2 / 3)
    assert voc_average_precision(np.array([9.0, 3.0, 2.0, 1.0]), np.array([0, -1, 1, 1])) == pytest.approx(2 / 3)
    assert voc_average_precision(np.array([1.0, 2.0]), np.array([1, -1]), "area") == pytest.approx(1 / 2)
    assert math.isnan(voc_average_precision(np.array([1.0, 2.0]), np.array([0, -1])))


def separable_voc(n_per_class=6, classes=(0, 3, 7), dim=32, seed=0):
    """L2-normalised features (N, dim) and labels (N, 20): image of class c is e_c + small noise, +1
    for c and -1 for the 19 other classes (plus one difficult label per class)."""
    rng = np.random.default_rng(seed)
    labels = np.full((n_per_class * len(classes), 20), -1)
    features = rng.normal(0, 0.05, size=(len(labels), dim))
    for i, c in enumerate(np.repeat(classes, n_per_class)):
        labels[i, c] = 1
        features[i, c] += 1.0
    for c in classes:  # the first image of each class is marked difficult for the next class
        labels[classes.index(c) * n_per_class, (c + 1) % 20] = 0
    return features / np.linalg.norm(features, axis=1, keepdims=True), labels


def test_voc_svms_give_perfect_map_on_separable_features():
    """Classes carried by one feature dimension each: full-data and 1-shot SVMs rank every positive
    first, mAP 100 over the classes with positives; the 17 classes without any are left out (nan)."""
    train_features, train_labels = separable_voc(seed=0)
    test_features, test_labels = separable_voc(seed=1)
    args = args_of()
    scores, not_converged = voc_svm_test_scores(train_features, voc_full_sets(train_labels), test_features, args)
    mean_ap, aps = voc_mean_ap(scores, test_labels)
    assert mean_ap == pytest.approx(100.0) and not_converged == 0
    assert np.isnan(aps).sum() == 17 and np.nansum(aps) == pytest.approx(3.0)
    sets, _ = voc_lowshot_sets(train_labels, 1, np.random.default_rng(0))
    scores, _ = voc_svm_test_scores(train_features, sets, test_features, args)
    assert voc_mean_ap(scores, test_labels)[0] == pytest.approx(100.0)


def test_voc_map_is_the_mean_ap_over_classes_with_positives_by_hand():
    """Class 0 ranked +, + (AP 1), class 1 ranked -, + (AP 1/2), class 2 without an SVM (nan
    scores), the 17 others without positives: mAP = (1 + 1/2) / 2 = 75%."""
    labels = np.full((2, 20), -1)
    labels[:, 0] = 1
    labels[1, 1], labels[0, 2] = 1, 1
    scores = np.zeros((2, 20))
    scores[:, 1] = [2.0, 1.0]
    scores[:, 2] = math.nan
    mean_ap, aps = voc_mean_ap(scores, labels)
    assert mean_ap == pytest.approx(75.0)
    assert aps[:2].tolist() == [1.0, 0.5] and np.isnan(aps[2:]).all()


def test_voc_lowshot_sets_draw_k_positives_and_19k_negatives():
    """Per class: k positives (+1 images), (20 - 1) k negatives (-1 images), never a difficult
    image; a class with fewer positives keeps all it has and is reported; same seed, same sets."""
    labels = np.full((60, 20), -1)
    labels[:5, 0] = 1  # class 0: 5 positives, 3 difficult-only images
    labels[5:8, 0] = 0
    labels[10, 1] = 1  # class 1: a single positive
    sets, short = voc_lowshot_sets(labels, 2, np.random.default_rng(7))
    indices, targets = sets[0]
    assert (targets == 1).sum() == 2 and (targets == -1).sum() == 38
    assert (labels[indices, 0] == targets).all() and len(set(indices.tolist())) == 40
    indices, targets = sets[1]
    assert indices[targets == 1].tolist() == [10] and (targets == -1).sum() == 38
    assert short[1] == (1, 38) and short[5] == (0, 38) and 0 not in short  # classes 2-19 have no positive
    again, _ = voc_lowshot_sets(labels, 2, np.random.default_rng(7))
    assert all((a[0] == b[0]).all() for a, b in zip(sets, again))
    # 'all': every -1 image of the class is a negative (60 - 5 - 3 = 52 for class 0)
    all_sets, _ = voc_lowshot_sets(labels, 2, np.random.default_rng(7), negatives="all")
    assert (all_sets[0][1] == -1).sum() == 52
    # k larger than the 52 negatives of class 0 / 19: all 52 are used and reported
    _, short = voc_lowshot_sets(labels, 3, np.random.default_rng(7))
    assert short[0] == (3, 52)


def test_voc07_svm_reports_every_k_and_the_full_data_map():
    """voc07_svm: map_k{k}_mean/_std over --runs draws and map_full, 100 on separable features."""
    train_features, train_labels = separable_voc(seed=0)
    test_features, test_labels = separable_voc(seed=1)
    features = {"trainval": (torch.tensor(train_features), torch.tensor(train_labels)),
                "test": (torch.tensor(test_features), torch.tensor(test_labels))}
    results = voc07_svm(features, args_of(shots=[1, 2], runs=3))
    for key in ("map_k1_mean", "map_k2_mean", "map_full"):
        assert results[key] == pytest.approx(100.0)
    assert results["map_k1_std"] == pytest.approx(0.0) and len(results["map_k2_runs"]) == 3


# ============ k-shot draws ============

def test_kshot_draws_are_seeded_and_have_k_per_class():
    """k images per class, min(k, images) for small classes (reported, all kept, also none), the
    same indices for the same (seed, k, run) and other indices for another run."""
    labels = np.array([0] * 10 + [1] * 2 + [3] * 12)  # class 2 has no image
    kept, short = sample_kshot(labels, 3, fewshot_eval.draw_rng(0, 3, 0))
    assert np.bincount(labels[kept], minlength=4).tolist() == [3, 2, 0, 3]
    assert short == {1: 2, 2: 0}
    assert kept.tolist() == sorted(set(kept.tolist()))
    again, _ = sample_kshot(labels, 3, fewshot_eval.draw_rng(0, 3, 0))
    np.testing.assert_array_equal(kept, again)
    other_runs = [sample_kshot(labels, 3, fewshot_eval.draw_rng(0, 3, run))[0] for run in range(1, 4)]
    assert any(not np.array_equal(kept, other) for other in other_runs)


def test_lr_steps_down_at_the_milestones():
    """lr 0.3 for epochs 0-11, 0.03 for 12-17, 0.003 for 18-19 (20 epochs, milestones 12 and 18)."""
    lrs = lr_per_epoch(0.3, 20, [12, 18], 0.1)
    np.testing.assert_allclose(lrs, [0.3] * 12 + [0.03] * 6 + [0.003] * 2)


def separable_classes(n_per_class, n_classes=4, dim=16, seed=0):
    """Features e_c * 3 + noise for class c, labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)  # (N,)
    features = 0.1 * torch.randn(len(labels), dim, generator=g)
    features[torch.arange(len(labels)), labels] += 3.0
    return features, labels


@pytest.mark.parametrize("protocol", ["lowshot_linear", "nshot_logreg"])
def test_kshot_classifiers_are_perfect_on_separable_features(protocol):
    """Both classifiers reach 100% top-1 and top-5 on separable classes from 1 and 4 images per
    class, for every draw (std 0); a class with fewer than k images is used whole."""
    features, labels = separable_classes(5, seed=0)
    features = {"train": (features[:-2], labels[:-2]), "val": separable_classes(10, seed=1)}  # class 3: 3 images
    results = kshot_classifiers(features, args_of(protocol=protocol, shots=[1, 4], runs=2), "cpu")
    for k in (1, 4):  # k = 4: 4 images of classes 0-2, the 3 of class 3
        assert results[f"top1_k{k}_mean"] == pytest.approx(100.0) and results[f"top1_k{k}_std"] == 0.0
        assert results[f"top5_k{k}_mean"] == pytest.approx(100.0)


def test_logreg_matches_sklearn_logistic_regression():
    """fit_logreg minimises sklearn's LogisticRegression(C) objective: same probabilities."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (40,), generator=g)
    weight, bias = fit_logreg(features, labels, 3, c=0.5)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(features.numpy(), labels.numpy())
    probabilities = torch.softmax(features @ weight.T + bias, dim=1).numpy()
    np.testing.assert_allclose(probabilities, reference.predict_proba(features.numpy()), atol=1e-4)


# ============ end to end ============

def test_voc07_svm_end_to_end_on_the_voc_layout_then_from_saved_features(tmp_path, capsys):
    """--protocol voc07_svm on a generated VOC07 folder with a random ResNet-18: the JSON has
    map_k{k}_mean/_std and map_full; --load_features gives the same numbers without the images,
    and classes without positives are named as left out of the mAP."""
    objects = [[("cat", 0)], [("dog", 0)], [("cat", 0), ("dog", 1)], [("dog", 0)], [("cat", 1)], [("bird", 0)]]
    write_voc(tmp_path / "voc", "trainval", {f"{i:06d}": o for i, o in enumerate(objects)})
    write_voc(tmp_path / "voc", "test", {f"{i:06d}": o for i, o in enumerate(objects[::-1], start=100)})
    common = ["--protocol", "voc07_svm", "--pretrained_weights", "random", "--arch", "resnet18",
              "--image_size", "16", "--num_workers", "0", "--shots", "1", "2", "--runs", "2"]
    fewshot_eval.main(common + ["--data_path", str(tmp_path / "voc"), "--dump_features", str(tmp_path / "f"),
                                "--output_json", str(tmp_path / "a.json")])
    assert "left out of the mAP" in capsys.readouterr().out
    saved = torch.load(tmp_path / "f" / "trainval_features.pth", weights_only=True)
    assert saved["features"].shape == (6, 512) and saved["labels"].shape == (6, 20)
    assert saved["labels"][2, VOC_CLASSES.index("dog")] == 0
    fewshot_eval.main(common + ["--load_features", str(tmp_path / "f"), "--output_json", str(tmp_path / "b.json")])
    first, second = json.load(open(tmp_path / "a.json")), json.load(open(tmp_path / "b.json"))
    assert {"map_k1_mean", "map_k1_std", "map_k2_mean", "map_k2_std", "map_full"} <= set(first)
    assert first == second
    assert 0 <= first["map_full"] <= 100 and first["ap_full_aeroplane"] is None


def test_lowshot_linear_end_to_end_on_the_inat2018_json_release(tmp_path, capsys):
    """--dataset imagefolder with train2018.json in --data_path reads the official iNat-2018 json:
    category ids 2, 5, 9 become classes 0, 1, 2; the run prints top-1/top-5 and writes them."""
    write_inat2018(tmp_path, category_of_train=[5, 9, 2, 5, 9, 9], category_of_val=[2, 5, 9, 9])
    datasets = inat2018_datasets(str(tmp_path), transform=lambda image: image)
    assert datasets["train"].labels.tolist() == [1, 2, 0, 1, 2, 2] and datasets["val"].labels.tolist() == [0, 1, 2, 2]
    fewshot_eval.main(["--protocol", "lowshot_linear", "--pretrained_weights", "random", "--arch", "resnet18",
                       "--dataset", "imagefolder", "--data_path", str(tmp_path), "--image_size", "16",
                       "--num_workers", "0", "--shots", "1", "2", "--runs", "2", "--epochs", "2",
                       "--output_json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert "k=2: 1 of 3 classes have fewer than 2 train images" in out  # class 0 (id 2) has one image
    results = json.load(open(tmp_path / "out.json"))
    for k in (1, 2):
        assert {f"top1_k{k}_mean", f"top1_k{k}_std", f"top5_k{k}_mean", f"top5_k{k}_std"} <= set(results)
        assert results[f"top5_k{k}_mean"] == 100.0  # 3 classes: every class is in the top 5
        assert results[f"top1_k{k}_mean"] in {0.0, 12.5, 25.0, 37.5, 50.0, 62.5, 75.0, 87.5, 100.0}


def test_nshot_logreg_from_saved_features_and_bad_input(tmp_path):
    """nshot_logreg reads --load_features (train/val files) and is perfect on separable features;
    VOC features given to a classification protocol, and --shots 0, are refused clearly."""
    os.makedirs(tmp_path / "f")
    for split, seed in (("train", 0), ("val", 1)):
        features, labels = separable_classes(4, seed=seed)
        torch.save({"features": features, "labels": labels}, tmp_path / "f" / f"{split}_features.pth")
    argv = ["--protocol", "nshot_logreg", "--pretrained_weights", "random", "--load_features", str(tmp_path / "f"),
            "--shots", "1", "3", "--runs", "2", "--output_json", str(tmp_path / "out.json")]
    fewshot_eval.main(argv)
    results = json.load(open(tmp_path / "out.json"))
    assert results["top1_k1_mean"] == 100.0 and results["top1_k3_std"] == 0.0
    with pytest.raises(SystemExit):
        fewshot_eval.get_args(argv[:-4] + ["--shots", "0"])
    torch.save({"features": features, "labels": torch.ones(16, 20)}, tmp_path / "f" / "train_features.pth")
    with pytest.raises(DataError, match="voc07_svm"):
        fewshot_eval.main(argv)
