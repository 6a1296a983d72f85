"""knn_eval.py: the weighted k-NN protocol (DINO): L2-normalised features, top-k cosine
neighbours, exp(s / T) votes, top-1 / top-5, chunked over test images."""
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import knn_eval
from knn import knn_classify

ROOT = Path(__file__).resolve().parents[1]


def blobs(n_per_class, n_classes, dim, spread, generator):
    """Gaussian clusters around random unit centres: (n * C, dim) features and (n * C,) labels."""
    centres = F.normalize(torch.randn(n_classes, dim, generator=generator), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def brute_force(train_f, train_l, test_f, k, T, n_classes):
    """float64 reference, one test image at a time: the 5 best classes by summed exp(s/T) votes (-1: no vote)."""
    train_f = F.normalize(train_f.double(), dim=1)
    ranked = []
    for x in F.normalize(test_f.double(), dim=1):
        s = train_f @ x  # (N,)
        top = s.argsort(descending=True)[:k]
        votes = torch.zeros(n_classes, dtype=torch.float64)
        for j in top:
            votes[train_l[j]] += torch.exp(s[j] / T)
        order = votes.argsort(descending=True)[:5]
        ranked.append(torch.where(votes[order] > 0, order, -1))  # classes without a vote are no prediction
    return torch.stack(ranked)  # (M, 5)


def unit(cos):
    """A 2-d unit feature at cosine `cos` from the test direction (1, 0)."""
    return [cos, math.sqrt(1 - cos ** 2)]


def test_well_separated_classes_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    train_f, train_l = blobs(20, 5, 16, 0.05, g)
    test_f, test_l = blobs(10, 5, 16, 0.05, g.manual_seed(0))
    results = knn_classify(train_f, train_l, test_f + 0.01, test_l, nb_knn=[1, 10, 20], temperature=0.07)
    assert all(results[f"top1_k{k}"] == 100.0 for k in [1, 10, 20])
    assert all(results[f"top5_k{k}"] == 100.0 for k in [1, 10, 20])


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    """One test image, 5 neighbours: 2 of class 0 at cosine 0.9, 3 of class 1 at cosine 0.5. With
    T = 0.07 the votes are 2 e^(0.9/0.07) > 3 e^(0.5/0.07): class 0 wins; with T = 10 they are
    2 e^0.09 < 3 e^0.05: class 1 wins; with k = 2 only class 0 votes. Exact top-1 of 100 or 0."""
    train_f = torch.tensor([unit(0.9), unit(0.9), unit(0.5), unit(0.5), unit(0.5)])
    train_l = torch.tensor([0, 0, 1, 1, 1])
    test_f, test_l = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert 2 * math.exp(0.9 / 0.07) > 3 * math.exp(0.5 / 0.07) and 2 * math.exp(0.09) < 3 * math.exp(0.05)
    assert knn_classify(train_f, train_l, test_f, test_l, nb_knn=[5], temperature=0.07)["top1_k5"] == 100.0
    assert knn_classify(train_f, train_l, test_f, test_l, nb_knn=[5], temperature=10.0)["top1_k5"] == 0.0
    assert knn_classify(train_f, train_l, test_f, torch.tensor([1]), nb_knn=[5], temperature=10.0)["top1_k5"] == 100.0
    assert knn_classify(train_f, train_l, test_f, torch.tensor([1]), nb_knn=[2], temperature=10.0)["top1_k2"] == 0.0


def test_accuracy_is_the_share_of_test_images_classified_right():
    """4 test images, each a copy of one train image of its class except the last, which copies an
    image of another class: k = 1 gives exactly 75 % top-1, and top-5 75 % (one class voted)."""
    train_f, train_l = torch.eye(4), torch.tensor([0, 1, 2, 3])
    test_f, test_l = torch.eye(4)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 3])
    results = knn_classify(train_f, train_l, test_f, test_l, nb_knn=[1], temperature=0.07)
    assert results["top1_k1"] == 75.0 and results["top5_k1"] == 75.0


def test_top5_is_a_hit_at_rank_5_and_a_miss_at_rank_6():
    """7 classes, one train image each at cosine 0.9, 0.8, ..., 0.3 from the test direction, so the
    summed votes rank the classes 0, 1, ..., 6. Four test images along that direction, labelled 0, 1,
    4 and 5: their class ranks 1st, 2nd, 5th and 6th, so top-1 is 1/4 = 25 % and top-5 3/4 = 75 %
    (a top-2 or top-4 would give 50 %, a top-6 100 %). k = 5 and 7 vote the same 5 best classes
    (75 %); with k = 4 only classes 0-3 get a vote and the 5th-ranked label 4 misses: 50 %."""
    train_f = torch.tensor([unit(0.9 - 0.1 * c) for c in range(7)])  # (7, 2)
    train_l = torch.arange(7)
    test_f, test_l = torch.tensor([[1.0, 0.0]] * 4), torch.tensor([0, 1, 4, 5])
    results = knn_classify(train_f, train_l, test_f, test_l, nb_knn=[4, 5, 7], temperature=0.07)
    assert results == pytest.approx({"top1_k4": 25.0, "top5_k4": 50.0, "top1_k5": 25.0, "top5_k5": 75.0,
                                     "top1_k7": 25.0, "top5_k7": 75.0})


def test_each_k_takes_exactly_its_k_nearest_neighbours():
    """Neighbours by decreasing cosine: class 0 at 0.9, class 1 at 0.8 and 0.7, class 2 at 0.6, 0.5
    and 0.4. With T = 100 each vote is ~1 (exp(s / T) within 1 % of 1), so the most frequent class
    among the k nearest wins: k = 1 -> class 0, k = 3 -> class 1 (2 votes), k = 6 -> class 2 (3
    votes); k = 2 ties 1 - 1 and class 0 wins on e^(0.9/100) > e^(0.8/100). The test image scores
    100 % top-1 under the label of the winner and 0 % under the two others."""
    train_f = torch.tensor([unit(c) for c in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)])
    train_l = torch.tensor([0, 1, 1, 2, 2, 2])
    test_f = torch.tensor([[1.0, 0.0]])
    winners = {}
    for k in (1, 2, 3, 6):
        right = [knn_classify(train_f, train_l, test_f, torch.tensor([label]), nb_knn=[k], temperature=100.0)
                 [f"top1_k{k}"] == 100.0 for label in range(3)]
        assert sum(right) == 1, k
        winners[k] = right.index(True)
    assert winners == {1: 0, 2: 0, 3: 1, 6: 2}


def test_random_labels_give_chance_accuracy():
    """10 classes, labels independent of the features: top-1 near 10%, top-5 near 50%."""
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_l, test_l = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    results = knn_classify(train_f, train_l, test_f, test_l, nb_knn=[20], temperature=0.07)
    assert 6 < results["top1_k20"] < 14
    assert 44 < results["top5_k20"] < 56


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_matches_a_float64_brute_force_reference_for_any_chunk_size(chunk_size):
    """Same top-1 and top-5 as the one-image-at-a-time float64 computation, whatever the chunking."""
    g = torch.Generator().manual_seed(1)
    train_f, train_l = blobs(30, 6, 8, 0.6, g)
    test_f, test_l = blobs(9, 6, 8, 0.6, g)
    results = knn_classify(train_f, train_l, test_f, test_l, nb_knn=[5, 20], temperature=0.1, chunk_size=chunk_size)
    for k in [5, 20]:
        ranked = brute_force(train_f, train_l, test_f, k, 0.1, 6)
        assert results[f"top1_k{k}"] == pytest.approx(100 * (ranked[:, 0] == test_l).double().mean().item())
        assert results[f"top5_k{k}"] == pytest.approx(100 * (ranked == test_l[:, None]).any(1).double().mean().item())


def test_k_larger_than_the_memory_bank_and_tiny_test_sets_work():
    """3 train images, k = 200, 2 test images (the DINO script crashes below 100 test images)."""
    train_f, train_l = torch.eye(3), torch.tensor([0, 1, 2])
    results = knn_classify(train_f, train_l, torch.eye(3)[:2] + 0.1, torch.tensor([0, 1]), nb_knn=[200])
    assert results["top1_k200"] == 100.0


def test_script_runs_end_to_end_and_writes_the_json(tmp_path):
    """Random ResNet-18 on the synthetic set: a table on stdout, and in the JSON the k-NN of the
    features it extracted (saved with --dump_features), with T = 0.07 for k = 10 and 20."""
    out = tmp_path / "knn.json"
    run = subprocess.run([sys.executable, "knn_eval.py", "--pretrained_weights", "random", "--arch", "resnet18",
                          "--dataset", "synthetic", "--image_size", "16", "--nb_knn", "10", "20",
                          "--num_workers", "0", "--output_json", str(out), "--dump_features", str(tmp_path / "f")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    saved = [torch.load(tmp_path / "f" / f"{split}_features.pth", weights_only=True).values()
             for split in ("train", "val")]
    assert results == pytest.approx(knn_classify(*saved[0], *saved[1], nb_knn=[10, 20], temperature=0.07))
    assert "top-1" in run.stdout and f"{results['top1_k20']:>7.2f}" in run.stdout


def save_features(folder, train, val):
    """(features, labels) of the train and val splits in the --dump_features layout."""
    folder.mkdir()
    for split, (feats, labels) in (("train", train), ("val", val)):
        torch.save({"features": feats, "labels": labels}, folder / f"{split}_features.pth")


@pytest.mark.parametrize("flags, top1, top5", [
    ([], {10: 200 / 3, 20: 200 / 3, 100: 200 / 3, 200: 200 / 3}, {10: 100.0, 20: 100.0, 100: 100.0, 200: 100.0}),
    (["--temperature", "10"], {10: 100 / 3, 20: 100 / 3, 100: 100 / 3, 200: 100 / 3},
     {10: 100.0, 20: 100.0, 100: 100.0, 200: 100.0}),
    (["--temperature", "10", "--nb_knn", "2", "5"], {2: 200 / 3, 5: 100 / 3}, {2: 200 / 3, 5: 100.0}),
], ids=["defaults", "temperature_10", "temperature_10_k_2_5"])
def test_temperature_and_k_flags_reach_the_classifier(tmp_path, flags, top1, top5):
    """knn_eval.py on saved features: 2 train images of class 0 at cosine 0.9 from the val direction,
    3 of class 1 at cosine 0.5; val images along it labelled 0, 0, 1. T = 0.07 (default): class 0
    wins, 2 e^(0.9/0.07) > 3 e^(0.5/0.07): top-1 2/3. --temperature 10: class 1 wins,
    2 e^0.09 < 3 e^0.05: top-1 1/3 (every default k takes all 5 images; top-5 100 %, both classes
    voted). --nb_knn 2 5: at k = 2 only the two class-0 images vote (top-1 and top-5 2/3, class 1
    got no vote), at k = 5 all five (1/3 and 100 %), and only these two k are reported. The numbers
    are knn_classify's with the same T and k."""
    train = (torch.tensor([unit(0.9), unit(0.9), unit(0.5), unit(0.5), unit(0.5)]), torch.tensor([0, 0, 1, 1, 1]))
    val = (torch.tensor([[1.0, 0.0]] * 3), torch.tensor([0, 0, 1]))
    save_features(tmp_path / "f", train, val)
    results = knn_eval.main(["--pretrained_weights", "random", "--load_features", str(tmp_path / "f"), *flags])
    expected = {**{f"top1_k{k}": v for k, v in top1.items()}, **{f"top5_k{k}": v for k, v in top5.items()}}
    assert results == pytest.approx(expected)
    args = knn_eval.get_args(["--pretrained_weights", "random", *flags])
    assert results == pytest.approx(knn_classify(*train, *val, nb_knn=args.nb_knn, temperature=args.temperature))


def test_defaults_are_dinos_k_list_and_temperature():
    """knn_eval.py by default: k = 10, 20, 100, 200 and T = 0.07 (DINO's eval_knn.py, the authors'),
    and knn_classify's own defaults are the same."""
    args = knn_eval.get_args(["--pretrained_weights", "random"])
    assert (args.nb_knn, args.temperature) == ([10, 20, 100, 200], 0.07)
    defaults = inspect.signature(knn_classify).parameters
    assert (tuple(defaults["nb_knn"].default), defaults["temperature"].default) == ((10, 20, 100, 200), 0.07)


def test_bad_flags_give_a_message_not_a_traceback():
    run = subprocess.run([sys.executable, "knn_eval.py", "--pretrained_weights", "/no/such/file.pth",
                          "--dataset", "synthetic", "--num_workers", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "error: checkpoint /no/such/file.pth does not exist" in run.stderr and "Traceback" not in run.stderr


def test_top5_counts_only_classes_that_received_a_vote():
    """k = 1 gives one prediction: a wrong nearest neighbour is a top-5 miss, even with 3 classes."""
    train_f, train_l = torch.eye(3), torch.tensor([0, 1, 2])
    results = knn_classify(train_f, train_l, torch.tensor([[1.0, 0.1, 0.0]]), torch.tensor([2]), nb_knn=[1, 3])
    assert results["top1_k1"] == 0.0 and results["top5_k1"] == 0.0
    assert results["top5_k3"] == 100.0  # with k = 3 every class is voted for


def test_torchrun_two_processes_extract_the_same_features_as_one(tmp_path):
    """`torchrun --nproc_per_node=2 knn_eval.py`: 45 train / 9 val images do not split evenly, the
    sampler pads the shards, and still every row holds its own image's feature: the gathered
    features and the metrics equal those of one process."""
    import os
    flags = ["--pretrained_weights", "random", "--arch", "resnet18", "--dataset", "synthetic",
             "--synthetic_images", "45", "--image_size", "16", "--nb_knn", "5", "--num_workers", "0",
             "--batch_size_per_gpu", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CARP_DEVICE": "cpu"}  # 2 processes on the CPU: a device that exists
    runs = {}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2"])):
        out = tmp_path / name
        run = subprocess.run([*launcher, "knn_eval.py", *flags, "--dump_features", str(out),
                              "--output_json", str(out / "knn.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = out
    for split in ("train", "val"):
        one = torch.load(runs["one"] / f"{split}_features.pth", weights_only=True)
        two = torch.load(runs["two"] / f"{split}_features.pth", weights_only=True)
        assert torch.equal(one["labels"], two["labels"])
        assert torch.allclose(one["features"], two["features"], atol=1e-5)
    assert json.loads((runs["one"] / "knn.json").read_text()) == json.loads((runs["two"] / "knn.json").read_text())
