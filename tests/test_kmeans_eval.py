"""kmeans_eval.py: spherical k-means (restarts, determinism, empty clusters), the train-split
standardisation, the clustering scores (NMI, AMI, ARI, Hungarian accuracy), and a run end to end."""
import json

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
    assert scores == pytest.approx({"nmi": 100.0, "ami": 100.0, "ari": 100.0, "acc": 100.0})
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


def test_end_to_end_on_synthetic_prints_the_four_metrics(tmp_path, capsys):
    """A random ResNet-18 on 40 train / 8 val synthetic images: k defaults to the 10 classes, the
    four val metrics are printed and written as a flat JSON of numbers in [-100, 100]."""
    output = tmp_path / "kmeans.json"
    kmeans_eval.main(["--pretrained_weights", "random", "--arch", "resnet18", "--dataset", "synthetic",
                      "--synthetic_images", "40", "--image_size", "16", "--num_workers", "0", "--n_init", "2", "--output_json", str(output)])
    printed = capsys.readouterr().out
    assert "k=10" in printed and all(name in printed for name in ("NMI", "AMI", "ARI", "ACC"))
    results = json.load(open(output))
    assert set(results) == {"nmi", "ami", "ari", "acc"} and all(-100 <= v <= 100 for v in results.values())


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
