"""fewshot_eval.py: VOC07 labels from the real on-disk layout, VOC AP, the k-shot draws, the three
protocols on toy features, the authors' VOC07 protocol (one shared pool, difficult = negative, fixed C)
against Goyal et al.'s, the authors' low-shot linear protocol (augmented views through the frozen
backbone, also under two processes) against the labelled fast mode, and each protocol end to end on
generated data."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

import fewshot_eval
from data import VOC_CLASSES, DataError, inat2018_datasets, train_transform, voc07_dataset
from fewshot_eval import (difficult_as_negative, fit_logreg, kshot_classifiers, last_and_best, lr_per_epoch,
                          sample_kshot, voc07_svm, voc_average_precision, voc_full_sets, voc_lowshot_sets, voc_mean_ap,
                          voc_shared_pool, voc_svm_test_scores)


# ============ generated data in the real layouts ============

def write_voc(root, split, images):
    """VOCdevkit/VOC2007 in torchvision's VOCDetection layout. images: {id: [(class, difficult), ...]};
    each image is a flat 24x20 JPEG whose red and green encode its first class and whose blue its
    position in the split, so that no two images of a split are alike."""
    voc = root / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    for position, (image_id, objects) in enumerate(images.items()):
        level = 40 + 9 * VOC_CLASSES.index(objects[0][0]) if objects and objects[0][0] in VOC_CLASSES else 0
        blue = 20 * (position % 12 + 1)
        Image.new("RGB", (24, 20), (level, 255 - level, blue)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        xml_objects = "".join(
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
            for name, difficult in objects)
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>24</width><height>20</height><depth>3</depth></size>{xml_objects}</annotation>")
    with open(voc / "ImageSets" / "Main" / f"{split}.txt", "w") as f:
        f.write("".join(f"{image_id}\n" for image_id in images))


def category_colour(category):
    """A flat RGB colour per iNat category id: bits 0, 1, 2 of the id switch red, green, blue on
    (2: green, 5: magenta, 9: red)."""
    return tuple(255 * ((category >> bit) & 1) for bit in range(3))


def write_inat2018(root, category_of_train, category_of_val):
    """The official iNat-2018 release: {train,val}2018.json (COCO style) and the train_val2018/ tree;
    every image is flat, in the colour of its category (category_colour)."""
    for split, categories in (("train", category_of_train), ("val", category_of_val)):
        images, annotations = [], []
        for i, category in enumerate(categories):
            image_id = 1000 * (split == "val") + i
            file_name = f"train_val2018/Plantae/{category}/{split}{i}.jpg"
            (root / file_name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), category_colour(category)).save(root / file_name)
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


def args_of(protocol="voc07_svm", **overrides):
    """The protocol flags at get_args's defaults, with `overrides`."""
    args = fewshot_eval.get_args(["--protocol", protocol, "--pretrained_weights", "random"])
    for name, value in overrides.items():
        assert hasattr(args, name), name
        setattr(args, name, value)
    return args


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
    """Classes carried by one feature dimension each: full-data and 1-shot SVMs (Goyal et al.'s
    per-class sets and the authors' shared pool) rank every positive first, mAP 100 over the classes
    with positives; the 17 classes without any are left out (nan)."""
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
    pool, _ = voc_shared_pool(train_labels, 1, np.random.default_rng(0))  # 3 images, one per class
    scores, _ = voc_svm_test_scores(train_features, [(pool, difficult_as_negative(train_labels)[pool, c])
                                                     for c in range(20)], test_features, args)
    assert len(pool) == 3 and voc_mean_ap(scores, test_labels)[0] == pytest.approx(100.0)


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


def test_goyal_voc_lowshot_sets_draw_k_positives_and_19k_negatives():
    """--voc_protocol goyal, per class: k positives (+1 images), (20 - 1) k negatives (-1 images),
    never a difficult image; a class with fewer positives keeps all it has and is reported; same
    seed, same sets."""
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


@pytest.mark.parametrize("voc_protocol", ["authors", "goyal"])
def test_voc07_svm_reports_every_k_and_the_full_data_map(voc_protocol):
    """voc07_svm: map_k{k}_mean/_std over --runs draws and map_full, 100 on separable features,
    in both protocols."""
    train_features, train_labels = separable_voc(seed=0)
    test_features, test_labels = separable_voc(seed=1)
    features = {"trainval": (torch.tensor(train_features), torch.tensor(train_labels)),
                "test": (torch.tensor(test_features), torch.tensor(test_labels))}
    results = voc07_svm(features, args_of(shots=[1, 2], runs=3, voc_protocol=voc_protocol))
    for key in ("map_k1_mean", "map_k2_mean", "map_full"):
        assert results[key] == pytest.approx(100.0)
    assert results["map_k1_std"] == pytest.approx(0.0) and len(results["map_k2_runs"]) == 3


# ============ VOC07: the authors' protocol (default) against Goyal et al.'s ============

def pool_labels():
    """(10, 20) trainval labels: aeroplane in images 0 and 2, bicycle in 2 and 5 and only difficult
    in 7, bird in 7; no other class anywhere."""
    labels = np.full((10, 20), -1)
    labels[[0, 2], VOC_CLASSES.index("aeroplane")] = 1
    labels[[2, 5], VOC_CLASSES.index("bicycle")] = 1
    labels[7, VOC_CLASSES.index("bicycle")] = 0
    labels[7, VOC_CLASSES.index("bird")] = 1
    return labels


def test_voc_protocol_defaults_are_the_authors():
    """By default voc07_svm is the authors' protocol: shared pool, C = 0.5, the area AP, 2000 liblinear
    iterations, 5 draws of k = 1 2 4 8 16, bilinear resize; Goyal et al.'s is --voc_protocol goyal,
    whose negatives default to 'sampled'. nshot_logreg (ours) draws the same k 5 times."""
    args = args_of()
    assert (args.voc_protocol, args.cost, args.voc_ap, args.svm_max_iter) == ("authors", 0.5, "area", 2000)
    assert (args.shots, args.runs, args.resize_interpolation) == ([1, 2, 4, 8, 16], 5, "bilinear")
    assert (args_of("nshot_logreg").shots, args_of("nshot_logreg").runs) == ([1, 2, 4, 8, 16], 5)
    assert args_of(voc_protocol="goyal").voc_negatives == "sampled"


def test_authors_pool_holds_k_positives_of_every_class_and_keeps_repeats():
    """The authors' pool for k = 2: aeroplane draws its 2 images {0, 2}, bicycle its 2 {2, 5}, bird its
    1 {7}: 5 rows <= 20 k, image 2 twice (drawn by two classes, as in their convert_low_shot); bird
    and the 17 absent classes are short. For k = 1: 3 rows, one per class with positives."""
    labels = pool_labels()
    pool, short = voc_shared_pool(labels, 2, np.random.default_rng(3))
    assert sorted(pool.tolist()) == [0, 2, 2, 5, 7] and len(pool) <= 20 * 2
    assert short[VOC_CLASSES.index("bird")] == 1 and len(short) == 18
    pool, _ = voc_shared_pool(labels, 1, np.random.default_rng(3))
    assert len(pool) == 3 and pool[2] == 7 and pool[0] in (0, 2) and pool[1] in (2, 5)
    again, _ = voc_shared_pool(labels, 1, np.random.default_rng(3))
    np.testing.assert_array_equal(pool, again)


def test_difficult_is_a_negative_in_authors_training_and_left_out_by_goyal():
    """Image 7 is difficult-only for bicycle. Authors: it is a bicycle negative (-1) in the shared pool
    and in the full-data set (all 10 images). Goyal: never in bicycle's low-shot set, and the full-data
    set has 9 images."""
    labels = pool_labels()
    bicycle = VOC_CLASSES.index("bicycle")
    authors_labels = difficult_as_negative(labels)
    pool, _ = voc_shared_pool(authors_labels, 2, np.random.default_rng(0))
    targets = dict(zip(pool.tolist(), authors_labels[pool, bicycle].tolist()))
    assert targets == {0: -1, 2: 1, 5: 1, 7: -1}
    indices, targets = voc_full_sets(authors_labels)[bicycle]
    assert len(indices) == 10 and targets[indices.tolist().index(7)] == -1
    sets, _ = voc_lowshot_sets(labels, 2, np.random.default_rng(0))
    assert 7 not in sets[bicycle][0].tolist()
    assert 7 not in voc_full_sets(labels)[bicycle][0].tolist() and len(voc_full_sets(labels)[bicycle][0]) == 9


def test_voc_ap_counts_a_difficult_test_image_as_a_negative_in_the_authors_protocol():
    """Ranked +, difficult, +: authors (difficult = -1) AP = (1 + 2/3) / 2 = 5/6; Goyal (ignored) AP = 1."""
    scores, labels = np.array([3.0, 2.0, 1.0]), np.array([1, 0, 1])
    assert voc_average_precision(scores, difficult_as_negative(labels[None])[0]) == pytest.approx(5 / 6)
    assert voc_average_precision(scores, labels) == pytest.approx(1.0)


def voc_features_with_a_difficult_test_image():
    """separable_voc trainval (aeroplane, boat, car); test: one positive per class, e_c + 0.5 e_31
    (normalised), and image 3 = e_0 exactly, difficult-only for aeroplane: every aeroplane SVM scores it
    above the aeroplane positive."""
    train_features, train_labels = separable_voc(seed=0)
    test_features, test_labels = np.zeros((4, 32)), np.full((4, 20), -1)
    for i, c in enumerate((0, 3, 7)):
        test_features[i, c], test_features[i, 31], test_labels[i, c] = 1.0, 0.5, 1
    test_features[3, 0], test_labels[3, 0] = 1.0, 0
    return {"trainval": (torch.tensor(train_features), torch.tensor(train_labels)),
            "test": (torch.tensor(test_features), torch.tensor(test_labels))}


def test_voc07_svm_difficult_test_image_lowers_the_authors_map_only():
    """Aeroplane test ranking: difficult image, then the positive. Authors: AP 1/2 for aeroplane, 1 for
    boat and car, mAP (1/2 + 1 + 1) / 3 = 83.33 at every k and for the full data; goyal: 100."""
    features = voc_features_with_a_difficult_test_image()
    authors = voc07_svm(features, args_of(shots=[1, 2], runs=2))
    goyal = voc07_svm(features, args_of(shots=[1, 2], runs=2, voc_protocol="goyal"))
    for key in ("map_k1_mean", "map_k2_mean", "map_full"):
        assert authors[key] == pytest.approx(250 / 3) and goyal[key] == pytest.approx(100.0)
    assert authors["ap_full_aeroplane"] == pytest.approx(50.0) and authors["ap_full_boat"] == pytest.approx(100.0)


def save_split_features(folder, splits):
    """{split: (features, labels)} in the --dump_features layout."""
    folder.mkdir()
    for split, (feats, labels) in splits.items():
        torch.save({"features": torch.as_tensor(feats), "labels": torch.as_tensor(labels)},
                   folder / f"{split}_features.pth")


def three_level_voc():
    """Trainval: image 0 (feature e0) holds an aeroplane, image 1 (e1) a bicycle. The aeroplane SVM
    (C = 0.5, weight 2 on its positive e0, 1 on its negative e1, liblinear's bias as a constant
    feature 1) solves its 2-variable dual exactly: alpha = (8/13, 7/13), bias 8/13 - 7/13 = 1/13, so it
    scores e0 9/13, a new direction e2 (no weight on it) 1/13, e1 -6/13; the bicycle SVM the same with
    e0 and e1 swapped. Test: A = e0 (aeroplane), F = e2 (bicycle), B = e1 (aeroplane)."""
    train = (np.eye(3)[[0, 1]], np.stack([voc_row(aeroplane=1), voc_row(bicycle=1)]))
    test = (np.eye(3)[[0, 2, 1]], np.stack([voc_row(aeroplane=1), voc_row(bicycle=1), voc_row(aeroplane=1)]))
    return {"trainval": train, "test": test}


@pytest.mark.parametrize("voc_ap, expected", [("area", 100 * (5 / 6 + 1 / 2) / 2),
                                              ("11point", 100 * (28 / 33 + 1 / 2) / 2)], ids=["area", "11point"])
def test_voc07_svm_map_of_every_k_and_runs_by_hand(tmp_path, voc_ap, expected):
    """fewshot_eval.py --protocol voc07_svm on three_level_voc's saved features. Aeroplane ranks the
    test images A (+), F (-), B (+): area AP (1 + 2/3) / 2 = 5/6, 11-point AP (6 x 1 + 5 x 2/3) / 11
    = 28/33; bicycle ranks B (-), F (+), A (-): AP 1/2 either way. The 18 other classes have no
    trainval positive: no SVM, left out. mAP 66.67 (area) or 67.42 (11-point) for the full data and
    for k = 1 and 2 (one positive per class: every draw is the whole trainval), in each of the 3
    runs: mean 66.67, std 0."""
    save_split_features(tmp_path / "f", three_level_voc())
    results = fewshot_eval.main(["--protocol", "voc07_svm", "--pretrained_weights", "random", "--load_features",
                                 str(tmp_path / "f"), "--shots", "1", "2", "--runs", "3", "--voc_ap", voc_ap])
    assert results["map_full"] == pytest.approx(expected)
    assert results["ap_full_aeroplane"] == pytest.approx(100 * (5 / 6 if voc_ap == "area" else 28 / 33))
    assert results["ap_full_bicycle"] == pytest.approx(50.0) and math.isnan(results["ap_full_bird"])
    for k in (1, 2):
        assert results[f"map_k{k}_runs"] == pytest.approx([expected] * 3)
        assert results[f"map_k{k}_mean"] == pytest.approx(expected) and results[f"map_k{k}_std"] == 0.0
    assert {key for key in results if key.startswith("map_k")} == {
        f"map_k{k}_{stat}" for k in (1, 2) for stat in ("mean", "std", "runs")}


def test_voc07_svm_max_iter_reaches_liblinear(tmp_path, capsys):
    """--svm_max_iter 1 stops every SVM of three_level_voc after one pass of liblinear, before its
    tolerance is met: the 2 SVMs of each of the 2 runs of k = 1 and the 2 full-data SVMs, 6 in all,
    are reported; at the default 2000 iterations all converge."""
    save_split_features(tmp_path / "f", three_level_voc())
    argv = ["--protocol", "voc07_svm", "--pretrained_weights", "random", "--load_features", str(tmp_path / "f"),
            "--shots", "1", "--runs", "2"]
    fewshot_eval.main(argv + ["--svm_max_iter", "1"])
    assert "6 SVMs did not converge in --svm_max_iter 1 iterations" in capsys.readouterr().out
    fewshot_eval.main(argv)
    assert "did not converge" not in capsys.readouterr().out


def test_authors_svms_share_one_pool_and_a_fixed_cost(monkeypatch):
    """Every LinearSVC fit, recorded: C = 0.5 each time (no cross-validation: one fit per class and
    draw); in a draw the 3 SVMs (aeroplane, boat, car: the classes with positives) train on the same
    3-row pool, one positive of each class; 2 runs x 3 + 3 full-data fits on the 18 images = 9 fits."""
    fits = []

    class RecordingSVC(fewshot_eval.LinearSVC):
        def fit(self, X, y):
            fits.append((self.C, X.copy(), y.copy()))
            return super().fit(X, y)

    monkeypatch.setattr(fewshot_eval, "LinearSVC", RecordingSVC)
    train_features, train_labels = separable_voc(seed=0)
    features = {"trainval": (torch.tensor(train_features), torch.tensor(train_labels)),
                "test": (torch.tensor(train_features), torch.tensor(train_labels))}
    voc07_svm(features, args_of(shots=[1], runs=2))
    assert len(fits) == 9 and {c for c, _, _ in fits} == {0.5}
    for run in range(2):
        draw = fits[3 * run:3 * run + 3]
        assert all(X.shape == (3, 32) and np.array_equal(X, draw[0][1]) for _, X, _ in draw)
        assert all(sorted(y.tolist()) == [-1, -1, 1] for _, _, y in draw)
    assert all(X.shape == (18, 32) for _, X, _ in fits[6:])


@pytest.mark.parametrize("negatives, rows", [("sampled", [20, 20, 25, 25]), ("all", [25, 25, 25, 25])],
                         ids=["sampled", "all"])
def test_voc_negatives_flag_sets_the_goyal_training_sets(tmp_path, monkeypatch, negatives, rows):
    """--voc_protocol goyal --shots 1 --runs 1 on 25 trainval images: an aeroplane in image 0, a
    bicycle in image 1, nothing in the 23 others. Each class's 1-shot SVM trains on its positive and
    --voc_negatives 'sampled': (20 - 1) x 1 = 19 of its 24 negatives, 20 rows; 'all': the 24, 25
    rows. The full-data SVMs take all 25 images either way."""
    labels = np.stack([voc_row(aeroplane=1), voc_row(bicycle=1)] + [voc_row()] * 23)
    features = np.random.default_rng(0).normal(size=(25, 8))
    save_split_features(tmp_path / "f", {"trainval": (features, labels), "test": (features, labels)})
    fits = []

    class RecordingSVC(fewshot_eval.LinearSVC):
        def fit(self, X, y):
            fits.append(len(y))
            return super().fit(X, y)

    monkeypatch.setattr(fewshot_eval, "LinearSVC", RecordingSVC)
    fewshot_eval.main(["--protocol", "voc07_svm", "--pretrained_weights", "random", "--load_features",
                       str(tmp_path / "f"), "--voc_protocol", "goyal", "--voc_negatives", negatives, "--shots", "1",
                       "--runs", "1"])
    assert fits == rows


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


def test_top5_is_a_hit_at_rank_5_and_a_miss_at_rank_6():
    """Identity classifier (weight I, bias 0), so the features are the logits: 4 val images scoring
    the 7 classes 6, 5, ..., 0, labelled 0, 1, 4 and 5, rank their class 1st, 2nd, 5th and 6th:
    top-1 1/4 = 25 %, top-5 3/4 = 75 % (a top-2 or top-4 would give 50 %, a top-6 100 %), also in
    chunks of 3 images."""
    logits, labels = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]] * 4), torch.tensor([0, 1, 4, 5])
    assert fewshot_eval.topk_accuracy(torch.eye(7), torch.zeros(7), logits, labels) == [25.0, 75.0]
    assert fewshot_eval.topk_accuracy(torch.eye(7), torch.zeros(7), logits, labels, chunk_size=3) == [25.0, 75.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_seed_flag_draws_the_kshot_images(tmp_path, monkeypatch, seed):
    """nshot_logreg --shots 1 --runs 2 --seed S on 4 images of each of 2 classes: the logistic
    regression of run r trains on the images sample_kshot draws with draw_rng(S, 1, r), one per
    class; seeds 0 and 1 draw other images."""
    train = (torch.eye(8), torch.tensor([0, 1] * 4))
    save_split_features(tmp_path / "f", {"train": train, "val": (torch.eye(8)[:2], torch.tensor([0, 1]))})
    trained_on, fit_logreg = [], fewshot_eval.fit_logreg

    def recording_fit_logreg(features, labels, *args):
        trained_on.append(features.argmax(dim=1).tolist())  # row i of the identity is image i
        return fit_logreg(features, labels, *args)

    monkeypatch.setattr(fewshot_eval, "fit_logreg", recording_fit_logreg)
    fewshot_eval.main(["--protocol", "nshot_logreg", "--pretrained_weights", "random", "--load_features",
                       str(tmp_path / "f"), "--shots", "1", "--runs", "2", "--seed", str(seed)])
    draws = [sample_kshot(train[1].numpy(), 1, fewshot_eval.draw_rng(seed, 1, run))[0].tolist() for run in (0, 1)]
    assert trained_on == draws and all(len(images) == 2 for images in draws)
    assert draws != [sample_kshot(train[1].numpy(), 1, fewshot_eval.draw_rng(1 - seed, 1, run))[0].tolist()
                     for run in (0, 1)]


def test_lr_steps_down_at_the_milestones():
    """lr 0.3 for epochs 0-11, 0.03 for 12-17, 0.003 for 18-19 (20 epochs, milestones 12 and 18)."""
    lrs = lr_per_epoch(0.3, 20, [12, 18], 0.1)
    np.testing.assert_allclose(lrs, [0.3] * 12 + [0.03] * 6 + [0.003] * 2)


def test_train_linear_takes_the_sgd_steps_computed_by_hand():
    """Two epochs of one batch, X = [[1, 2], [3, -1]] with classes [0, 1]; lr 0.3, then 0.03 after
    the milestone at epoch 1; momentum 0.9; weight decay 0.5 (large, so that it shows). From the
    initial W0 (N(0, 0.01) from the draw's generator) and b0 = 0, each step by hand:
    P = softmax(X W^T + b) row by row, gradients (P - Y)^T X / 2 and mean(P - Y) plus 0.5 x the
    parameter (the decay, on the bias too: SGD over all the classifier's parameters, as the
    authors'); momentum buffer v1 = g1, v2 = 0.9 v1 + g2; parameter minus lr x v."""
    X = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)  # (n, D)
    Y = torch.eye(2, dtype=torch.float64)  # (n, C): one-hot of classes [0, 1]
    args = args_of(protocol="lowshot_linear", lr=0.3, momentum=0.9, weight_decay=0.5, epochs=2, lr_milestones=[1],
                   lr_gamma=0.1)
    after_epoch = []

    def evaluate(weight, bias):
        after_epoch.append((weight.double().clone(), bias.double().clone()))
        return 0.0, 0.0

    def one_batch(epoch):
        yield X.float(), torch.tensor([0, 1])

    fewshot_eval.train_linear(one_batch, 2, 2, args, torch.Generator().manual_seed(7), evaluate, "cpu")
    W = torch.nn.init.normal_(torch.empty(2, 2), std=0.01, generator=torch.Generator().manual_seed(7)).double()
    b = torch.zeros(2, dtype=torch.float64)
    velocity = None
    for lr, (found_W, found_b) in zip((0.3, 0.03), after_epoch):
        logits = X @ W.T + b  # (n, C)
        P = logits.exp() / logits.exp().sum(dim=1, keepdim=True)  # (n, C)
        gradient = ((P - Y).T @ X / 2 + 0.5 * W, (P - Y).mean(dim=0) + 0.5 * b)
        velocity = gradient if velocity is None else tuple(0.9 * v + g for v, g in zip(velocity, gradient))
        W, b = W - lr * velocity[0], b - lr * velocity[1]
        torch.testing.assert_close(found_W, W, atol=1e-6, rtol=0)
        torch.testing.assert_close(found_b, b, atol=1e-6, rtol=0)
    assert len(after_epoch) == 2


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
    if protocol == "lowshot_linear":  # cached features given: the fast mode, labelled as such
        assert results["cached_features"] == 1.0 and results["best_top1_k4_mean"] == pytest.approx(100.0)


def test_logreg_matches_sklearn_logistic_regression():
    """fit_logreg minimises sklearn's LogisticRegression(C) objective: same probabilities."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (40,), generator=g)
    weight, bias = fit_logreg(features, labels, 3, c=0.5)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(features.numpy(), labels.numpy())
    probabilities = torch.softmax(features @ weight.T + bias, dim=1).numpy()
    np.testing.assert_allclose(probabilities, reference.predict_proba(features.numpy()), atol=1e-4)


@pytest.mark.parametrize("c, top1", [(0.01, 50.0), (100.0, 100.0)], ids=["C_0.01", "C_100"])
def test_logreg_c_flag_reaches_the_logistic_regression(tmp_path, c, top1):
    """nshot_logreg --logreg_c on saved features, k = 3 so that every train image is kept: 3 images of
    class 0 around (1, 0.2) and 1 of class 1 at (0.3, 1); val: 2 of each. At C = 0.01 the weights
    stay near 0 and the unpenalised bias gives class 1 its train share, p ~ 1/4, on every image: all
    val images go to class 0, top-1 50 %; at C = 100 the classes are split: 100 %. The same as
    sklearn's LogisticRegression(C) on the L2-normalised features."""
    train = (torch.tensor([[1, 0.1], [1, 0.3], [1, 0.2], [0.3, 1]]), torch.tensor([0, 0, 0, 1]))
    val = (torch.tensor([[1, 0.2], [0.9, 0.3], [0.5, 1], [0.4, 1]]), torch.tensor([0, 0, 1, 1]))
    save_split_features(tmp_path / "f", {"train": train, "val": val})
    results = fewshot_eval.main(["--protocol", "nshot_logreg", "--pretrained_weights", "random", "--load_features",
                                 str(tmp_path / "f"), "--shots", "3", "--runs", "1", "--logreg_c", str(c)])
    assert results["top1_k3_mean"] == top1
    normalise = lambda x: (x / x.norm(dim=1, keepdim=True)).numpy()  # noqa: E731
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(normalise(train[0]), train[1].numpy())
    assert 100 * (reference.predict(normalise(val[0])) == val[1].numpy()).mean() == top1


def test_lowshot_linear_flags_give_the_sgd_steps_computed_by_hand(tmp_path, monkeypatch):
    """--protocol lowshot_linear --cached_features true on saved features: 4 identical train images
    x = (1, 2) of class 0 (val adds class 1: C = 2), --shots 4 (all kept), --linear_batch_size 2 (2
    steps per epoch, every batch the same), --epochs 2, --lr 0.5 --lr_milestones 1 --lr_gamma 0.2
    (lr 0.5 in epoch 1, 0.1 in epoch 2), --momentum 0.8, --weight_decay 0.1. From the draw's initial
    W0 (N(0, 0.01), its generator seeded 7 here) and b0 = 0, each step by hand: p = softmax(W x + b),
    gradients (p - e0) x^T + 0.1 W and (p - e0) + 0.1 b, v1 = g1, v = 0.8 v + g, parameters minus
    lr x v. The classifier evaluated after each epoch is the one after steps 2 and 4."""
    save_split_features(tmp_path / "f", {"train": (torch.tensor([[1.0, 2.0]] * 4), torch.zeros(4, dtype=torch.long)),
                                         "val": (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), torch.tensor([0, 1]))})
    monkeypatch.setattr(fewshot_eval, "torch_seed", lambda rng: torch.Generator().manual_seed(7))
    evaluated, topk_accuracy = [], fewshot_eval.topk_accuracy

    def recording_topk_accuracy(weight, bias, *args):
        evaluated.append((weight.double().clone(), bias.double().clone()))
        return topk_accuracy(weight, bias, *args)

    monkeypatch.setattr(fewshot_eval, "topk_accuracy", recording_topk_accuracy)
    fewshot_eval.main(["--protocol", "lowshot_linear", "--cached_features", "true", "--pretrained_weights", "random",
                       "--load_features", str(tmp_path / "f"), "--shots", "4", "--runs", "1", "--epochs", "2",
                       "--linear_batch_size", "2", "--lr", "0.5", "--lr_milestones", "1", "--lr_gamma", "0.2",
                       "--momentum", "0.8", "--weight_decay", "0.1"])
    x, target = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    W = torch.nn.init.normal_(torch.empty(2, 2), std=0.01, generator=torch.Generator().manual_seed(7)).double()
    b = torch.zeros(2, dtype=torch.float64)
    velocity, expected = None, []
    for lr in (0.5, 0.5, 0.1, 0.1):
        p = torch.softmax(W @ x + b, dim=0)  # (C,)
        gradient = (torch.outer(p - target, x) + 0.1 * W, p - target + 0.1 * b)
        velocity = gradient if velocity is None else tuple(0.8 * v + g for v, g in zip(velocity, gradient))
        W, b = W - lr * velocity[0], b - lr * velocity[1]
        expected.append((W, b))
    assert len(evaluated) == 2
    for (found_W, found_b), (W, b) in zip(evaluated, expected[1::2]):
        torch.testing.assert_close(found_W, W, atol=1e-6, rtol=0)
        torch.testing.assert_close(found_b, b, atol=1e-6, rtol=0)


# ============ lowshot_linear: the authors' augmented views (default) and the fast mode ============

def test_lowshot_linear_defaults_are_the_authors():
    """lowshot_linear by default: augmented views (--cached_features false), SGD lr 0.3, momentum 0.9,
    weight decay 1e-6, 20 epochs, x 0.1 at 12 and 18, batch 256, as evaluate_inat2018.py with
    --lr-classifier 0.3 --lr-scheduler multistep; one draw of k = 1 (their eval_script.sh: --k 1),
    bilinear crops and val resize (torchvision's default in their transforms)."""
    args = args_of(protocol="lowshot_linear")
    assert args.cached_features is False
    assert (args.shots, args.runs, args.crop_interpolation, args.resize_interpolation) == ([1], 1, "bilinear",
                                                                                           "bilinear")
    assert (args.lr, args.momentum, args.weight_decay, args.epochs, args.lr_milestones, args.lr_gamma,
            args.linear_batch_size) == (0.3, 0.9, 1e-6, 20, [12, 18], 0.1, 256)
    assert fewshot_eval.get_args(["--protocol", "lowshot_linear", "--pretrained_weights", "random",
                                  "--cached_features", "true"]).cached_features is True


@pytest.mark.parametrize("flags, message", [
    (["--protocol", "voc07_svm", "--voc_negatives", "all"], "--voc_negatives all applies to --protocol voc07_svm "
                                                            "--voc_protocol goyal only"),
    (["--protocol", "nshot_logreg", "--cached_features", "true"], "--cached_features true applies to --protocol "
                                                                  "lowshot_linear only"),
    (["--protocol", "lowshot_linear", "--load_features", "f"], "apply to --cached_features true only"),
    (["--protocol", "lowshot_linear", "--cached_features", "maybe"], "expected true or false, got 'maybe'"),
    (["--protocol", "voc07_svm", "--voc_protocol", "vissl"], "invalid choice: 'vissl'"),
])
def test_bad_protocol_flags_are_refused_by_name(flags, message, capsys):
    """A flag that does not apply to the chosen protocol, or a bad value, is a one-line argparse
    error that names the flag and the value."""
    with pytest.raises(SystemExit):
        fewshot_eval.get_args(flags + ["--pretrained_weights", "random"])
    assert message in capsys.readouterr().err


def test_last_and_best_epoch_by_hand():
    """Val (top-1, top-5) after 3 epochs: (10, 50), (30, 40), (20, 45). Last: 20 / 45; best top-1 30
    (epoch 2), best top-5 50 (epoch 1): each maximised on its own, as the authors' best_acc1/5."""
    assert last_and_best([(10.0, 50.0), (30.0, 40.0), (20.0, 45.0)]) == [20.0, 45.0, 30.0, 50.0]


class NoiseImages(torch.utils.data.Dataset):
    """`n` random-noise 24 x 24 RGB images with labels `targets`, under `transform`."""

    def __init__(self, targets, transform, seed=0):
        rng = np.random.default_rng(seed)
        self.images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in targets]
        self.targets, self.transform = list(targets), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.transform(self.images[index]), self.targets[index]


def tiny_backbone():
    """conv, BatchNorm, pool: (B, 3, H, W) -> (B, 4); BatchNorm so that train() mode would move it."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def test_authors_lowshot_runs_the_frozen_backbone_on_new_views_every_epoch():
    """Default lowshot_linear, k = 1 of 2 classes, batch 1, 2 epochs: the backbone runs 2 epochs x 2
    images = 4 times, always in eval() mode, on 16 x 16 crops that differ from one epoch to the next;
    its weights and BatchNorm statistics are unchanged afterwards, although it was handed over in
    train() mode. The JSON labels the mode: cached_features 0."""
    backbone = tiny_backbone().train()
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    calls = []
    backbone.register_forward_hook(lambda module, inputs, output: calls.append((module.training, inputs[0].clone())))
    train_set = NoiseImages([0, 0, 1, 1], train_transform(16))
    val = (torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1]))
    features = {"train": (None, torch.tensor(train_set.targets)), "val": val}
    args = args_of(protocol="lowshot_linear", shots=[1], runs=1, epochs=2, linear_batch_size=1, num_workers=0)
    results = kshot_classifiers(features, args, torch.device("cpu"), views=(backbone, train_set))
    assert len(calls) == 4 and not any(training for training, _ in calls)
    assert all(x.shape == (1, 3, 16, 16) for _, x in calls)
    first_epoch, second_epoch = [x for _, x in calls[:2]], [x for _, x in calls[2:]]
    assert not any(torch.equal(a, b) for a in first_epoch for b in second_epoch)  # new views every epoch
    for name, value in backbone.state_dict().items():  # conv and BN weights, running mean / var, batch count
        assert torch.equal(value, before[name]), name
    assert results["cached_features"] == 0.0
    assert {"top1_k1_mean", "top5_k1_mean", "best_top1_k1_mean", "best_top5_k1_mean"} <= set(results)


def test_a_backbone_that_moves_during_lowshot_training_is_caught(monkeypatch):
    """If anything trains the backbone (here: eval() made a no-op, so BatchNorm updates its running
    statistics on the views), the run stops with an error instead of reporting numbers."""
    backbone = tiny_backbone().train()
    monkeypatch.setattr(backbone, "eval", lambda: backbone)
    train_set = NoiseImages([0, 1], train_transform(16))
    features = {"train": (None, torch.tensor([0, 1])), "val": (torch.randn(2, 4), torch.tensor([0, 1]))}
    args = args_of(protocol="lowshot_linear", shots=[1], runs=1, epochs=1, num_workers=0)
    with pytest.raises(RuntimeError, match="frozen backbone changed"):
        kshot_classifiers(features, args, torch.device("cpu"), views=(backbone, train_set))


# ============ lowshot_linear under torchrun ============

WORLD_SIZE = 2


def _lowshot_worker(rank, port, out_dir):
    """One torchrun-like process (RANK, WORLD_SIZE, ... in the environment) running the default
    lowshot_linear end to end; it records which k-shot images (KShotViews positions) it loaded."""
    from test_distributed import as_torchrun_process
    as_torchrun_process(rank, port)
    seen = []
    get = fewshot_eval.KShotViews.__getitem__
    fewshot_eval.KShotViews.__getitem__ = lambda self, i: (seen.append(i), get(self, i))[1]
    results = fewshot_eval.main(["--protocol", "lowshot_linear", "--pretrained_weights", "random", "--arch",
                                 "small_cnn", "--dataset", "synthetic", "--synthetic_images", "20", "--image_size",
                                 "16", "--num_workers", "0", "--shots", "1", "--runs", "1", "--epochs", "2",
                                 "--linear_batch_size", "4", "--output_json", str(out_dir / "out.json")])
    torch.save({"results": results, "seen": seen}, out_dir / f"rank{rank}.pt")


def test_authors_lowshot_under_two_processes_shares_each_epoch_and_agrees(tmp_path):
    """Two gloo processes, 10 classes x k = 1 = 10 images, global batch 4 (2 per process): in each of
    the 2 epochs each process loads 5 of the 10 views and the two halves are disjoint; both processes
    end with the same numbers (same draw, same averaged gradients), and rank 0 writes the JSON."""
    from test_distributed import run_processes
    run_processes(_lowshot_worker, tmp_path, timeout_s=120)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    for epoch in range(2):
        halves = [set(r["seen"][5 * epoch:5 * epoch + 5]) for r in ranks]
        assert len(halves[0]) == len(halves[1]) == 5 and halves[0] | halves[1] == set(range(10))
    assert all(len(r["seen"]) == 10 for r in ranks)
    assert ranks[0]["results"] == ranks[1]["results"] and ranks[0]["results"]["cached_features"] == 0.0
    assert json.load(open(tmp_path / "out.json"))["top1_k1_mean"] == ranks[0]["results"]["top1_k1_mean"]


def test_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch, capsys):
    """Under torchrun with 3 processes, --linear_batch_size 256 cannot be shared equally: a one-line
    error naming both numbers, before any process group is made."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        fewshot_eval.get_args(["--protocol", "lowshot_linear", "--pretrained_weights", "random"])
    assert "--linear_batch_size 256 is not a multiple of the 3 processes" in capsys.readouterr().err
    args = fewshot_eval.get_args(["--protocol", "lowshot_linear", "--pretrained_weights", "random", "--cached_features",
                                  "true"])  # the fast mode trains on one process
    assert args.linear_batch_size == 256


# ============ end to end ============

def area_ap(scores, labels):
    """VOC AP by its definition, one positive at a time: rank by decreasing score (ties in test-set
    order); at the j-th positive, ranked r_j, the precision is j / r_j; each positive counts the best
    precision at its rank or below, max over i >= j of i / r_i; AP is the mean over the positives."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    precisions = []
    for rank, i in enumerate(order, start=1):
        if labels[i] > 0:
            precisions.append((len(precisions) + 1) / rank)
    return sum(max(precisions[j:]) for j in range(len(precisions))) / len(precisions)


def svm_full_aps(folder, cost):
    """{class: AP in %} of the authors' full-data protocol, computed here with sklearn on the saved
    features: L2-normalised rows, difficult (0) as -1, per class with positives and negatives one
    LinearSVC(C=cost, class weight {+1: 2, -1: 1}, squared hinge, L2), its decision values on test."""
    (train, train_labels), (test, test_labels) = (
        (saved["features"].double().numpy(), saved["labels"].numpy()) for saved in
        (torch.load(folder / f"{split}_features.pth", weights_only=True) for split in ("trainval", "test")))
    train, test = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (train, test))
    train_labels, test_labels = (np.where(labels == 0, -1, labels) for labels in (train_labels, test_labels))
    aps = {}
    for c, name in enumerate(VOC_CLASSES):
        if len(set(train_labels[:, c])) == 2 and (test_labels[:, c] == 1).any():
            svm = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, loss="squared_hinge", penalty="l2", dual=True,
                            tol=1e-4, max_iter=2000, random_state=0).fit(train, train_labels[:, c])
            aps[name] = 100 * area_ap(svm.decision_function(test).tolist(), test_labels[:, c])
    return aps


def test_voc07_svm_end_to_end_on_the_voc_layout_then_from_saved_features(tmp_path, capsys):
    """--protocol voc07_svm on a generated VOC07 folder (6 distinct images; cat, dog and bird have
    positives) with a random ResNet-18: the JSON has map_k{k}_mean/_std and map_full; --load_features
    gives the same numbers without the images, and classes without positives are named as left out
    of the mAP. The full-data APs are those of sklearn's LinearSVC computed here on the saved
    features (svm_full_aps), and map_full their mean; --cost 2 gives those of C = 2, another mAP."""
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
    expected = svm_full_aps(tmp_path / "f", cost=0.5)
    assert set(expected) == {"cat", "dog", "bird"}
    assert {name: first[f"ap_full_{name}"] for name in VOC_CLASSES} == pytest.approx(
        {name: expected.get(name) for name in VOC_CLASSES})
    assert first["map_full"] == pytest.approx(np.mean(list(expected.values())))
    fewshot_eval.main(common + ["--load_features", str(tmp_path / "f"), "--cost", "2",
                                "--output_json", str(tmp_path / "c.json")])
    cost_2 = json.load(open(tmp_path / "c.json"))
    expected_2 = svm_full_aps(tmp_path / "f", cost=2.0)
    assert cost_2["map_full"] == pytest.approx(np.mean(list(expected_2.values())))
    assert cost_2["map_full"] != pytest.approx(first["map_full"])


class MeanColour(torch.nn.Module):
    """A "backbone" whose feature is the mean normalised colour of the view: (B, 3, H, W) -> (B, 3)."""

    def forward(self, images):
        return images.mean(dim=(2, 3))


def test_lowshot_linear_end_to_end_on_the_inat2018_json_release(tmp_path, monkeypatch, capsys):
    """--dataset imagefolder with train2018.json in --data_path reads the official iNat-2018 json:
    category ids 2, 5, 9 become classes 0, 1, 2. Each category has its own flat colour, and the
    backbone returns the mean colour, which every RandomResizedCrop of a flat image keeps: the
    three classes are linearly separable, so the classifier of every draw, trained on the k-shot
    views (k = 1 and 2), must put all 4 val images in their class (100 % top-1, std 0). A label
    mixed up between the json's ids, the train images and the val images would cost 25 points."""
    write_inat2018(tmp_path, category_of_train=[5, 9, 2, 5, 9, 9], category_of_val=[2, 5, 9, 9])
    datasets = inat2018_datasets(str(tmp_path), transform=lambda image: image)
    assert datasets["train"].labels.tolist() == [1, 2, 0, 1, 2, 2] and datasets["val"].labels.tolist() == [0, 1, 2, 2]
    monkeypatch.setattr(fewshot_eval, "backbone_from_args", lambda *args, **kwargs: MeanColour())
    fewshot_eval.main(["--protocol", "lowshot_linear", "--pretrained_weights", "random", "--dataset", "imagefolder",
                       "--data_path", str(tmp_path), "--image_size", "16", "--num_workers", "0", "--shots", "1", "2",
                       "--runs", "2", "--epochs", "5", "--output_json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert "k=2: 1 of 3 classes have fewer than 2 train images" in out  # class 0 (id 2) has one image
    assert "the authors' protocol: new RandomResizedCrop + flip views" in out and "FAST MODE" not in out
    results = json.load(open(tmp_path / "out.json"))
    assert results["cached_features"] == 0
    for k in (1, 2):
        assert results[f"top1_k{k}_runs"] == results[f"best_top1_k{k}_runs"] == [100.0, 100.0]
        assert results[f"top1_k{k}_mean"] == 100.0 and results[f"top1_k{k}_std"] == 0.0


def test_fast_lowshot_mode_is_labelled_in_the_output_and_the_json(tmp_path, capsys):
    """--cached_features true: the table says FAST MODE, not the authors' protocol, and the JSON has
    cached_features 1; the features can be saved and reused, the same numbers come back."""
    common = ["--protocol", "lowshot_linear", "--cached_features", "true", "--pretrained_weights", "random",
              "--arch", "small_cnn", "--dataset", "synthetic", "--synthetic_images", "20", "--image_size", "16",
              "--num_workers", "0", "--shots", "1", "--runs", "2", "--epochs", "2"]
    fewshot_eval.main(common + ["--dump_features", str(tmp_path / "f"), "--output_json", str(tmp_path / "a.json")])
    assert "FAST MODE (--cached_features true): cached centre-crop features, NOT the authors' protocol" in \
        capsys.readouterr().out
    fewshot_eval.main(common + ["--load_features", str(tmp_path / "f"), "--output_json", str(tmp_path / "b.json")])
    first, second = json.load(open(tmp_path / "a.json")), json.load(open(tmp_path / "b.json"))
    assert first["cached_features"] == 1 and first == second


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
