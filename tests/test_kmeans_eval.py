"""kmeans_eval.py: spherical k-means (restarts, determinism, empty clusters), the train-split
standardisation, the clustering scores (NMI, AMI, ARI, FMS, homogeneity, completeness, V-measure,
Hungarian accuracy), main() against numbers derived by hand, the authors' defaults (k = 100 on
GTSRB, the note on a whole ImageNet train split), and a run end to end."""
import json
import math

import numpy as np
import pytest
import torch

import data
import kmeans_eval
from kmeans_eval import cluster_accuracy, clustering_metrics, spherical_kmeans, standardize


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the test machine's cores are shared and spinning threads slow tiny ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def directions(n_per_cluster, k, dim, spread, seed):
    """k clusters of unit-ish directions: centre c is a random direction, points are centre + noise."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, dim, generator=generator), dim=1)  # (k, D)
    labels = torch.arange(k).repeat(n_per_cluster)  # (n k,)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)  # (n k, D)
    return points, labels


def test_well_separated_clusters_are_recovered_exactly():
    """8 tight clusters in 32 dimensions, any point scaling: NMI, AMI, ARI and accuracy are all 100."""
    points, labels = directions(50, 8, 32, spread=0.05, seed=0)
    points = points * torch.rand(len(points), 1) * 10  # spherical: the norm of a point is irrelevant
    _, assignment, objective = spherical_kmeans(points, 8, n_iter=100, n_init=3,
                                                generator=torch.Generator().manual_seed(0))
    scores = clustering_metrics(assignment, labels)
    assert scores == pytest.approx({name: 100.0 for name in kmeans_eval.METRICS})
    # Each point is centre + noise of norm ~ sqrt(32) * 0.05: cosine ~ 1 / sqrt(1 + 32 * 0.05^2) to its centroid.
    assert objective == pytest.approx(400 / (1 + 32 * 0.05 ** 2) ** 0.5, rel=0.02)


def test_random_labels_score_about_zero_ami_and_ari():
    """A clustering independent of the classes: AMI and ARI are 0 in expectation (|x| < 5), while
    the accuracy stays near chance (1/10) and NMI is small but not 0."""
    generator = torch.Generator().manual_seed(0)
    pred, labels = torch.randint(10, (2000,), generator=generator), torch.randint(10, (2000,), generator=generator)
    scores = clustering_metrics(pred, labels)
    assert abs(scores["ami"]) < 5 and abs(scores["ari"]) < 5
    assert 8 < scores["acc"] < 16 and 0 < scores["nmi"] < 5


def test_cluster_accuracy_by_hand():
    """Hungarian matching: a relabelled perfect clustering scores 100; clusters [0 0 0 1 1 2] on
    classes [0 0 1 1 1 1] match 0->0 (2 points) and 1->1 (2 points): 4/6 = 66.67; more clusters
    than classes: the extra cluster is wrong; fewer: the merged class is half wrong."""
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    assert cluster_accuracy(np.array([7, 7, 3, 3, 5, 5, 0]), labels) == 100.0
    assert cluster_accuracy([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]) == pytest.approx(400 / 6)
    assert cluster_accuracy([0, 0, 1, 1, 2, 3], [0, 0, 1, 1, 2, 2]) == pytest.approx(500 / 6)
    assert cluster_accuracy([0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(400 / 6)
    assert cluster_accuracy(torch.tensor([1, 0]), torch.tensor([0, 1])) == 100.0


def test_best_of_restarts_is_the_best_single_run():
    """10 restarts from one generator == 10 single runs drawn in turn from the same generator,
    keeping the highest objective; the single runs differ, so the choice matters."""
    points, _ = directions(30, 10, 3, spread=0.6, seed=1)  # overlapping clusters: many local optima
    generator = torch.Generator().manual_seed(3)
    singles = [spherical_kmeans(points, 10, 100, 1, generator)[2] for _ in range(10)]
    _, _, best = spherical_kmeans(points, 10, 100, 10, torch.Generator().manual_seed(3))
    assert max(singles) > min(singles) + 1e-6
    assert best == pytest.approx(max(singles), abs=1e-9) and best >= singles[0]


def test_each_restart_runs_at_most_n_iter_iterations(monkeypatch):
    """n_iter caps the iterations (centroid update, then assignment) of every restart. The 2 restarts
    on 10 overlapping clusters need more than 5 iterations each to converge (more than 10 updates
    in all at n_iter 100), so n_iter = 1, 3 and 5 make exactly 2, 6 and 10 centroid updates; at
    n_iter 100 a restart stops once no assignment changes, well before 2 x 100 updates."""
    points, _ = directions(30, 10, 3, spread=0.6, seed=1)
    updates, update_centroids = [], kmeans_eval.update_centroids
    monkeypatch.setattr(kmeans_eval, "update_centroids", lambda *args: (updates.append(1), update_centroids(*args))[1])
    counts = {}
    for n_iter in (1, 3, 5, 100):
        updates.clear()
        spherical_kmeans(points, 10, n_iter, 2, torch.Generator().manual_seed(0))
        counts[n_iter] = len(updates)
    assert (counts[1], counts[3], counts[5]) == (2, 6, 10) and 10 < counts[100] < 200


def test_same_seed_same_clustering():
    """The same seed gives identical centroids and assignments; another seed draws other initial centroids."""
    points, _ = directions(30, 10, 3, spread=0.6, seed=2)
    first = spherical_kmeans(points, 10, 100, 2, torch.Generator().manual_seed(5))
    second = spherical_kmeans(points, 10, 100, 2, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2] == second[2]
    initial = kmeans_eval.kmeans_plus_plus(torch.nn.functional.normalize(points, dim=1), 10,
                                           torch.Generator().manual_seed(6))
    assert not torch.equal(initial, kmeans_eval.kmeans_plus_plus(torch.nn.functional.normalize(points, dim=1), 10,
                                                                 torch.Generator().manual_seed(5)))


def test_more_clusters_than_distinct_points_stays_finite():
    """3 distinct points repeated 5 times, k = 4: every point sits on a centroid (objective 15,
    centroids unit and finite), the surplus centroid duplicating a point instead of being NaN."""
    points = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).repeat(5, 1)  # (15, 8)
    centroids, assignment, objective = spherical_kmeans(points, 4, 10, 3, torch.Generator().manual_seed(0))
    assert objective == pytest.approx(15.0)
    assert torch.isfinite(centroids).all() and torch.allclose(centroids.norm(dim=1), torch.ones(4))
    assert len(assignment.unique()) == 3


def test_empty_cluster_is_reseeded_with_the_farthest_point():
    """Centroid 1 owns no point: it becomes the point least similar to its own centroid."""
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    similarity = torch.tensor([1.0, 0.99, 0.2])  # point 2 is far from centroid 0
    centroids = kmeans_eval.update_centroids(x, torch.tensor([0, 0, 0]), similarity, k=2)
    assert torch.allclose(centroids[1], torch.tensor([0.0, 1.0]))
    assert torch.allclose(centroids[0], torch.nn.functional.normalize(x.sum(dim=0), dim=0))


def test_standardisation_uses_train_statistics_and_survives_constant_dimensions():
    """Train columns get mean 0 and std 1 (population std, as sklearn's StandardScaler); val is
    shifted and scaled by the train numbers; a column constant on train (std 0) is only centred."""
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])  # column 0: mean 2, std 1; column 1: constant 5
    val = torch.tensor([[4.0, 7.0]])
    train_z, val_z = standardize(train, val)
    assert torch.equal(train_z, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(val_z, torch.tensor([[2.0, 2.0]]))


def test_end_to_end_on_synthetic_is_the_protocol_on_the_dumped_features(tmp_path, capsys):
    """A random ResNet-18 on 40 train / 8 val synthetic images: k defaults to the 10 classes, every
    metric is printed, and the JSON holds what the protocol gives on the extracted features (dumped
    here): train-standardised, spherical k-means with seed 0 and 2 restarts, val to the nearest
    centroid."""
    output = tmp_path / "kmeans.json"
    kmeans_eval.main(["--pretrained_weights", "random", "--arch", "resnet18", "--dataset", "synthetic",
                      "--synthetic_images", "40", "--image_size", "16", "--num_workers", "0", "--n_init", "2",
                      "--output_json", str(output), "--dump_features", str(tmp_path / "f")])
    printed = capsys.readouterr().out
    assert "k=10," in printed and all(name.upper() in printed for name in kmeans_eval.METRICS)
    train, train_labels = torch.load(tmp_path / "f" / "train_features.pth", weights_only=True).values()
    val, val_labels = torch.load(tmp_path / "f" / "val_features.pth", weights_only=True).values()
    train, val = standardize(train, val)
    centroids, _, _ = spherical_kmeans(train, 10, 100, 2, torch.Generator().manual_seed(0))
    _, assignment = kmeans_eval.nearest_centroid(torch.nn.functional.normalize(val, dim=1), centroids)
    assert json.load(open(output)) == pytest.approx(clustering_metrics(assignment, val_labels))


def entropy(*p):
    return -sum(x * math.log(x) for x in p)


def adjusted_mutual_information(labels, pred):
    """AMI by its formula (Vinh et al. 2010, arithmetic normalisation): (MI - E[MI]) / ((H(classes) +
    H(clusters)) / 2 - E[MI]), E[MI] the mutual information expected when the clusters of the same
    sizes are drawn at random (hypergeometric counts n_ij of class i and cluster j)."""
    n = len(labels)
    table = [[sum(1 for l, p in zip(labels, pred) if (l, p) == (c, k)) for k in sorted(set(pred))]
             for c in sorted(set(labels))]  # (classes, clusters) counts
    a, b = [sum(row) for row in table], [sum(column) for column in zip(*table)]
    mutual = sum(nij / n * math.log(n * nij / (a[i] * b[j]))
                 for i, row in enumerate(table) for j, nij in enumerate(row) if nij)
    f = math.factorial
    expected = sum(nij / n * math.log(n * nij / (ai * bj))
                   * f(ai) * f(bj) * f(n - ai) * f(n - bj)
                   / (f(n) * f(nij) * f(ai - nij) * f(bj - nij) * f(n - ai - bj + nij))
                   for ai in a for bj in b for nij in range(max(1, ai + bj - n), min(ai, bj) + 1))
    mean_entropy = (entropy(*(x / n for x in a)) + entropy(*(x / n for x in b))) / 2
    return (mutual - expected) / (mean_entropy - expected)


def save_features(folder, train, train_labels, val, val_labels):
    folder.mkdir()
    torch.save({"features": train, "labels": train_labels}, folder / "train_features.pth")
    torch.save({"features": val, "labels": val_labels}, folder / "val_features.pth")


def test_main_by_hand_standardises_with_the_train_split(tmp_path, monkeypatch, capsys):
    """Train: (x, +1) for class 0 and (x, -1) for class 1, x = -100, 0, 100. Standardised with the
    train mean (0, 0) and std (81.65, 1), the points are (+-1.22, +-1): the best k = 2 split is
    by class (each cluster's 3 points at cosine 1, 0.632, 0.632 to its centroid: objective
    2 x (1 + 2 / sqrt(2.5)), mean 0.7550; left against right gives 0.615). Val: the train points,
    but the third class-1 point is (100, 3), above the axis: clusters {c0, c0, c0, c1}, {c1, c1}.
    From that table by hand: accuracy 5/6; pairs together in the clustering 7, in the classes 6,
    in both 4 of 15, so ARI = (4 - 7 x 6 / 15) / (6.5 - 2.8) and FMS = 4 / sqrt(7 x 6); homogeneity
    1 - (4/6) H(3/4, 1/4) / H(1/2, 1/2), completeness 1 - (3/6) H(1/3, 2/3) / H(2/3, 1/3) = 1/2, their
    harmonic mean the V-measure, equal to NMI; AMI by its formula (adjusted_mutual_information).
    Without the standardisation the raw points split
    left against right (their objective 0.7453 per point beats the class split's 0.34) and the
    scores fall: the check fails."""
    x = torch.tensor([-100.0, 0.0, 100.0])
    train = torch.cat([torch.stack([x, torch.ones(3)], 1), torch.stack([x, -torch.ones(3)], 1)])  # (6, 2)
    val = train.clone()
    val[5, 1] = 3.0
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    save_features(tmp_path / "f", train, labels, val, labels)
    results = kmeans_eval.main(["--pretrained_weights", "random", "--load_features", str(tmp_path / "f")])
    printed = capsys.readouterr().out
    assert "k=2, best of 10 restarts, objective 4.5 = 0.7550 mean cosine" in printed
    homogeneity = 1 - (4 / 6) * entropy(3 / 4, 1 / 4) / entropy(1 / 2, 1 / 2)
    completeness = 1 - (3 / 6) * entropy(1 / 3, 2 / 3) / entropy(2 / 3, 1 / 3)
    v_measure = 2 * homogeneity * completeness / (homogeneity + completeness)
    expected = {"acc": 500 / 6, "ari": 100 * (4 - 2.8) / (6.5 - 2.8), "fms": 100 * 4 / math.sqrt(42),
                "homogeneity": 100 * homogeneity, "completeness": 50.0, "v_measure": 100 * v_measure,
                "nmi": 100 * v_measure, "ami": 100 * adjusted_mutual_information(labels.tolist(), [0, 0, 0, 0, 1, 1])}
    assert results == pytest.approx(expected)
    monkeypatch.setattr(kmeans_eval, "standardize", lambda train, val: (train, val))
    unstandardised = kmeans_eval.main(["--pretrained_weights", "random", "--load_features", str(tmp_path / "f")])
    assert unstandardised["acc"] == pytest.approx(400 / 6) and unstandardised != pytest.approx(expected)


def test_n_clusters_flag_sets_k_by_hand(tmp_path):
    """Train = val: 2 points at each of 90, 210 and 330 degrees (mean 0, both standard deviations
    sqrt(1/2): standardising only scales them), the first pair class 0, the other four class 1.
    --n_clusters 3 gives each pair its own cluster. By hand from that table: accuracy 4/6 (one of the
    two class-1 clusters is unmatched); homogeneity 1 (every cluster one class); completeness
    1 - (4/6) log 2 / log 3 (class 1 split in two of 3 equal clusters), the V-measure their harmonic
    mean, = NMI; pairs together 3 in the clustering, 1 + 6 = 7 in the classes, 3 in both of 15:
    ARI (3 - 3 x 7 / 15) / ((3 + 7) / 2 - 3 x 7 / 15) = 4/9, FMS 3 / sqrt(3 x 7), AMI 8/13 by its
    formula (adjusted_mutual_information). Left to the
    2 classes, k = 2 would merge two pairs, and no cluster would hold one class only."""
    angles = torch.tensor([90.0, 90, 210, 210, 330, 330]) * math.pi / 180
    points = torch.stack([angles.cos(), angles.sin()], dim=1)  # (6, 2)
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    save_features(tmp_path / "f", points, labels, points, labels)
    results = kmeans_eval.main(["--pretrained_weights", "random", "--load_features", str(tmp_path / "f"),
                                "--n_clusters", "3"])
    completeness = 1 - (4 / 6) * math.log(2) / math.log(3)
    v_measure = 2 * completeness / (1 + completeness)
    expected = {"acc": 400 / 6, "homogeneity": 100.0, "completeness": 100 * completeness,
                "v_measure": 100 * v_measure, "nmi": 100 * v_measure, "ari": 400 / 9, "fms": 100 * 3 / math.sqrt(21),
                "ami": 100 * adjusted_mutual_information(labels.tolist(), [0, 0, 1, 1, 2, 2])}
    assert results == pytest.approx(expected) and expected["ami"] == pytest.approx(800 / 13)


def library_protocol(folder, k, n_iter=100, n_init=10, seed=0):
    """kmeans_eval's protocol on saved features with the library functions called directly:
    standardise with the train split, spherical_kmeans(k, n_iter, n_init, seed), val to the nearest
    centroid, the val scores."""
    train, _ = torch.load(folder / "train_features.pth", weights_only=True).values()
    val, val_labels = torch.load(folder / "val_features.pth", weights_only=True).values()
    train, val = standardize(train, val)
    centroids, _, _ = spherical_kmeans(train, k, n_iter, n_init, torch.Generator().manual_seed(seed))
    _, assignment = kmeans_eval.nearest_centroid(torch.nn.functional.normalize(val, dim=1), centroids)
    return clustering_metrics(assignment, val_labels)


@pytest.mark.parametrize("flag, value, setting", [("--n_init", "1", {"n_init": 1}), ("--n_iter", "1", {"n_iter": 1}),
                                                  ("--seed", "1", {"seed": 1}), ("--n_clusters", "9", {"k": 9})],
                         ids=["n_init_1", "n_iter_1", "seed_1", "n_clusters_9"])
def test_kmeans_flags_reach_spherical_kmeans(tmp_path, flag, value, setting):
    """On 10 overlapping clusters of 3-d directions (many local optima), each flag gives the scores of
    spherical_kmeans called with its value (restarts, iterations, seed, k), and not those of the
    defaults (10 restarts, 100 iterations, seed 0, k = the 10 classes)."""
    train, train_labels = directions(30, 10, 3, spread=0.6, seed=1)
    val, val_labels = directions(5, 10, 3, spread=0.6, seed=2)
    save_features(tmp_path / "f", train, train_labels, val, val_labels)
    results = kmeans_eval.main(["--pretrained_weights", "random", "--load_features", str(tmp_path / "f"), flag, value])
    assert results == pytest.approx(library_protocol(tmp_path / "f", **{"k": 10, **setting}))
    assert results != pytest.approx(library_protocol(tmp_path / "f", k=10))


def test_authors_k_on_gtsrb_is_100():
    """--dataset gtsrb clusters into 100 (the authors' GTSRB run), not its 43 classes; other
    datasets leave k to the number of classes (None until the labels are read); --n_clusters wins.
    Every run: 100 iterations, 10 restarts (the authors' faiss niter and nredo)."""
    base = ["--pretrained_weights", "random", "--dataset"]
    args = kmeans_eval.get_args(base + ["cifar10"])
    assert (args.n_iter, args.n_init) == (100, 10)
    assert kmeans_eval.get_args(base + ["gtsrb"]).n_clusters == 100
    assert kmeans_eval.get_args(base + ["cifar10"]).n_clusters is None
    assert kmeans_eval.get_args(base + ["gtsrb", "--n_clusters", "43"]).n_clusters == 43


def test_a_whole_imagenet_size_train_split_is_flagged_as_not_the_papers_protocol(tmp_path, monkeypatch, capsys):
    """Fitted on a whole train split of at least 1,000,000 images, the run says it is not the
    paper's protocol and names SimCLR's 10 % list; with --train_subset or --train_fraction, or below
    that size, nothing is said. main() prints the note (the threshold lowered to 6 here)."""
    args = kmeans_eval.get_args(["--pretrained_weights", "random"])
    note = kmeans_eval.full_imagenet_note(1_281_167, args)
    assert "all 1281167 train images: NOT the paper's protocol" in note
    assert "google-research/simclr, imagenet_subsets/10percent.txt" in note and "--train_subset" in note
    assert kmeans_eval.full_imagenet_note(999_999, args) is None
    assert kmeans_eval.full_imagenet_note(1_281_167, kmeans_eval.get_args(
        ["--pretrained_weights", "random", "--train_fraction", "0.1"])) is None
    assert kmeans_eval.full_imagenet_note(1_281_167, kmeans_eval.get_args(
        ["--pretrained_weights", "random", "--train_subset", __file__])) is None
    save_features(tmp_path / "f", torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 1]), torch.randn(2, 3),
                  torch.tensor([0, 1]))
    monkeypatch.setattr(kmeans_eval, "FULL_IMAGENET_IMAGES", 6)
    kmeans_eval.main(["--pretrained_weights", "random", "--load_features", str(tmp_path / "f"), "--n_init", "1"])
    assert capsys.readouterr().out.count("all 6 train images: NOT the paper's protocol") == 2


@pytest.mark.parametrize("flags, message", [
    (["--n_clusters", "0"], "--n_clusters 0 must be at least 1"),
    (["--n_init", "0"], "--n_init 0 must be at least 1"),
    (["--n_iter", "-1"], "--n_iter -1"),
])
def test_bad_flags_are_refused_by_name(flags, message, capsys):
    """Each bad flag stops argument parsing with a message naming the value."""
    with pytest.raises(SystemExit):
        kmeans_eval.get_args(["--pretrained_weights", "random", *flags])
    assert message in capsys.readouterr().err


def test_more_clusters_than_points_is_a_clear_error():
    """k = 5 clusters of 4 points cannot be made: DataError naming both numbers."""
    with pytest.raises(data.DataError, match="cannot make 5 clusters of 4 points"):
        spherical_kmeans(torch.randn(4, 3), 5, 10, 1)


# ============ the train images k-means fits on (the authors: SimCLR's 10 % list of ImageNet) ============

def image_folder(root, files):
    """root/train/<class>/<file> and root/val/<class>/<file>: tiny JPEGs, each class a distinct colour."""
    from PIL import Image
    for split in ("train", "val"):
        for relative in files:
            path = root / split / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            shade = 40 if relative.startswith("n01") else 200
            Image.new("RGB", (8, 8), (shade, shade, shade)).save(path, format="JPEG")
    return root


IMAGENET_LIKE = ["n01/n01_1.JPEG", "n01/n01_2.JPEG", "n01/n01_3.JPEG", "n02/n02_1.JPEG", "n02/n02_2.JPEG",
                 "n02/n02_3.JPEG"]


def test_train_subset_file_selects_exactly_the_listed_images(tmp_path):
    """Lines name images by bare file name (SimCLR's list) or by path relative to the train folder;
    blank lines and a repeated line change nothing: n01_2, n02_1 and n02_3 are rows 1, 3 and 5 of
    the ImageFolder (sorted n01_1 n01_2 n01_3 n02_1 n02_2 n02_3)."""
    dataset = data.build_dataset("imagefolder", "train", data_path=str(image_folder(tmp_path / "in", IMAGENET_LIKE)))
    listing = tmp_path / "subset.txt"
    listing.write_text("n02_3.JPEG\n\nn01/n01_2.JPEG\n  n02_1.JPEG  \n./n01/n01_2.JPEG\n")
    assert kmeans_eval.subset_from_file(dataset, str(listing)) == [1, 3, 5]


def test_train_subset_lines_that_name_no_image_are_an_error(tmp_path):
    """2 of 4 lines match no image (a partial copy of ImageNet, a typo): DataError naming the list
    file and the first unmatched lines, rather than a fit on fewer images than the paper's."""
    dataset = data.build_dataset("imagefolder", "train", data_path=str(image_folder(tmp_path / "in", IMAGENET_LIKE)))
    listing = tmp_path / "subset.txt"
    listing.write_text("n01_1.JPEG\nn09_7.JPEG\nn02/n02_1.JPEG\nn01/n01_9.JPEG\n")
    with pytest.raises(data.DataError, match=rf"--train_subset {listing}: 2 of 4 lines name no image of .*6 images\), "
                                             r"e\.g\. n09_7\.JPEG, n01/n01_9\.JPEG"):
        kmeans_eval.subset_from_file(dataset, str(listing))


def test_train_subset_refuses_an_ambiguous_name_and_a_dataset_without_files(tmp_path):
    """A bare name found in two class folders must be written as a path; a dataset that is not a
    folder of image files (here the synthetic images) cannot take a list of file names."""
    root = image_folder(tmp_path / "in", ["n01/same.JPEG", "n02/same.JPEG"])
    dataset = data.build_dataset("imagefolder", "train", data_path=str(root))
    listing = tmp_path / "subset.txt"
    listing.write_text("same.JPEG\n")
    with pytest.raises(data.DataError, match="'same.JPEG' names 2 images .*write it as a path relative"):
        kmeans_eval.subset_from_file(dataset, str(listing))
    listing.write_text("n02/same.JPEG\n")
    assert kmeans_eval.subset_from_file(dataset, str(listing)) == [1]
    with pytest.raises(data.DataError, match="SyntheticImages.*is not a folder of image files.*--train_fraction"):
        kmeans_eval.subset_from_file(data.SyntheticImages("train", 10, 8), str(listing))


def test_train_subset_end_to_end_extracts_only_the_listed_images(tmp_path, monkeypatch, capsys):
    """--train_subset on an ImageNet-like folder: only the 4 listed train images (2 per class) go
    through the backbone, k = their 2 classes, and all 6 val images are assigned."""
    import features
    extracted, extract = [], features.extract_features

    def recording_extract_features(backbone, dataset, *rest, **kwargs):
        extracted.append(len(dataset))
        return extract(backbone, dataset, *rest, **kwargs)

    monkeypatch.setattr(features, "extract_features", recording_extract_features)
    root = image_folder(tmp_path / "in", IMAGENET_LIKE)
    listing = tmp_path / "subset.txt"
    listing.write_text("n01_1.JPEG\nn01_3.JPEG\nn02_2.JPEG\nn02_3.JPEG\n")
    kmeans_eval.main(["--pretrained_weights", "random", "--arch", "small_cnn", "--dataset", "imagefolder",
                      "--data_path", str(root), "--image_size", "8", "--num_workers", "0", "--n_init", "1",
                      "--train_subset", str(listing)])
    assert extracted == [4, 6]  # train (the subset), then val (all of it)
    assert "k=2" in (printed := capsys.readouterr().out)
    assert f"fit on 4 train images (the images listed in {listing}), 6 val images assigned" in printed


def test_train_fraction_is_seeded_reproducible_and_of_the_right_size():
    """round(0.1 x 1000) = 100 distinct sorted indices, and round(0.1 x 1,281,167) = 128,117 for
    ImageNet; the same seed draws the same images whatever the global random state (every process
    of a launch, every run), another seed other images."""
    torch.manual_seed(1)
    first = kmeans_eval.random_fraction(1000, 0.1, seed=0)
    torch.manual_seed(2)
    torch.rand(10)
    assert kmeans_eval.random_fraction(1000, 0.1, seed=0) == first
    assert len(first) == 100 and first == sorted(set(first)) and 0 <= first[0] and first[-1] < 1000
    assert kmeans_eval.random_fraction(1000, 0.1, seed=1) != first
    assert len(kmeans_eval.random_fraction(1_281_167, 0.1, seed=0)) == 128_117
    assert kmeans_eval.random_fraction(7, 1.0, seed=3) == list(range(7))
    with pytest.raises(data.DataError, match="--train_fraction 0.01 of 20 train images selects no image"):
        kmeans_eval.random_fraction(20, 0.01, seed=0)


def test_train_fraction_end_to_end_fits_on_half_the_synthetic_images(capsys):
    """--train_fraction 0.5 of 40 synthetic train images: k-means fits on 20, the 8 val images are
    all assigned."""
    kmeans_eval.main(["--pretrained_weights", "random", "--arch", "small_cnn", "--dataset", "synthetic",
                      "--synthetic_images", "40", "--image_size", "16", "--num_workers", "0", "--n_init", "1",
                      "--train_fraction", "0.5", "--n_clusters", "4"])
    printed = capsys.readouterr().out
    assert "fit on 20 train images (a random 0.5 of the split, seed 0), 8 val images assigned" in printed


@pytest.mark.parametrize("flags, message", [
    (["--train_fraction", "0"], "--train_fraction 0.0 must be in (0, 1]"),
    (["--train_fraction", "1.5"], "--train_fraction 1.5 must be in (0, 1]"),
    (["--train_subset", "/nonexistent/10percent.txt"], "--train_subset /nonexistent/10percent.txt does not exist"),
    (["--train_subset", __file__, "--train_fraction", "0.1"], "pass one of them"),
    (["--train_fraction", "0.1", "--load_features", "feats"], "--train_fraction 0.1 cannot apply"),
])
def test_bad_train_selection_flags_are_refused_by_name(flags, message, capsys):
    """A fraction outside (0, 1], a list file that does not exist, both selections at once, and a
    selection of features that were already extracted stop argument parsing, naming the value."""
    with pytest.raises(SystemExit):
        kmeans_eval.get_args(["--pretrained_weights", "random", *flags])
    assert message in capsys.readouterr().err


# ============ standardisation memory: ImageNet's 1.28 M x 2048 features on one GPU ============

def test_standardize_matches_float64_and_never_holds_a_float64_copy_of_the_features():
    """Columns with means up to 1000 and stds from 0.01 to 3: the result equals the float64
    reference (x - mean) / std to 1e-5, and no float64 tensor larger than one chunk (100 x 8 of
    the 1000 x 8 features) is ever created: every aten op's outputs are recorded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.01, 0.1, 1.0, 3.0, 0.5, 2.0, 0.05, 1.5])  # (D,)
    offset = torch.tensor([1000.0, -500.0, 0.0, 3.0, 250.0, -1.0, 100.0, 7.0])  # (D,)
    train = offset + scale * torch.randn(1000, 8, generator=generator)  # (N, D) float32
    val = offset + scale * torch.randn(300, 8, generator=generator)  # (M, D)
    mean, std = train.double().mean(dim=0), train.double().std(dim=0, correction=0)
    reference = ((train.double() - mean) / std, (val.double() - mean) / std)

    class Float64Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and t.dtype == torch.float64:
                    self.sizes.append(t.numel())
            return out

    with Float64Sizes() as recorder:
        train_z, val_z = standardize(train, val, chunk_size=100)
    assert train_z.dtype == val_z.dtype == torch.float32
    assert torch.allclose(train_z.double(), reference[0], atol=1e-5, rtol=0)
    assert torch.allclose(val_z.double(), reference[1], atol=1e-5, rtol=0)
    assert recorder.sizes and max(recorder.sizes) <= 100 * 8


# ============ under torchrun ============

def _kmeans_worker(rank, port, out_dir):
    """One torchrun-like process of kmeans_eval.py on synthetic images; it records whether it held
    each split's features."""
    from test_distributed import as_torchrun_process
    as_torchrun_process(rank, port)
    held, frozen = {}, kmeans_eval.frozen_features

    def recording(*args, **kwargs):
        out = frozen(*args, **kwargs)
        held.update({split: features is not None for split, (features, _) in out.items()})
        return out

    kmeans_eval.frozen_features = recording
    results = kmeans_eval.main(["--pretrained_weights", "random", "--arch", "small_cnn", "--dataset", "synthetic",
                                "--synthetic_images", "20", "--image_size", "16", "--num_workers", "0",
                                "--n_init", "1", "--output_json", str(out_dir / "kmeans.json")])
    torch.save({"results": results, "held": held}, out_dir / f"rank{rank}.pt")


def test_under_two_processes_only_the_main_one_holds_the_features_and_clusters(tmp_path):
    """Two gloo processes extract their shares of the images; the features are gathered to the main
    process alone, which clusters, scores and writes the JSON; the other holds none and returns None."""
    from test_distributed import run_processes
    run_processes(_kmeans_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert ranks[0]["held"] == {"train": True, "val": True} and ranks[1]["held"] == {"train": False, "val": False}
    assert set(ranks[0]["results"]) >= set(kmeans_eval.METRICS) and ranks[1]["results"] is None
    assert json.loads((tmp_path / "kmeans.json").read_text())["nmi"] == pytest.approx(ranks[0]["results"]["nmi"])
