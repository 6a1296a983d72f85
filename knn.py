"""Weighted k-NN classification of frozen features (DINO's protocol): the classifier of knn_eval.py,
and the monitor that pretrain.py runs on its teacher during training with the same classifier, so
the two report the same number for the same checkpoint.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DataError, build_dataset, eval_transform
from distributed import is_main_process
from features import extract_features
from backbones import SMALL_IMAGE_MAX_SIZE


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, nb_knn=(10, 20, 100, 200),
                 temperature=0.07, chunk_size=256):
    """Weighted k-NN top-1 and top-5 accuracy (in %) for each k: {"top1_k20": ..., "top5_k20": ...}.

    train_features (N, D), test_features (M, D): raw features; they are L2-normalised here. Each
    test image takes its k most similar train images (cosine similarity s), each votes for its own
    class with weight exp(s / T), and the classes are ranked by their summed votes.
    The test set is processed in chunks of `chunk_size` images, so memory is O(chunk_size * N).
    """
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_features = F.normalize(train_features.float(), dim=1)  # (N, D)
    test_features = F.normalize(test_features.float(), dim=1)  # (M, D)
    max_k = min(max(nb_knn), len(train_labels))
    correct = {k: torch.zeros(2) for k in nb_knn}  # top-1, top-5 hits
    for start in range(0, len(test_labels), chunk_size):
        features = test_features[start:start + chunk_size]  # (c, D)
        targets = test_labels[start:start + chunk_size]  # (c,)
        similarity, neighbour = (features @ train_features.T).topk(max_k, dim=1)  # (c, k_max) each
        neighbour_labels = train_labels[neighbour]  # (c, k_max)
        weights = (similarity / temperature).exp()  # (c, k_max): exp(s / T)
        for k in nb_knn:
            used = min(k, max_k)  # a memory bank smaller than k votes with all its images
            votes = torch.zeros(len(targets), n_classes)  # (c, C)
            votes.scatter_add_(1, neighbour_labels[:, :used], weights[:, :used])
            top_votes, ranked = votes.topk(min(5, n_classes), dim=1)  # (c, 5) each
            # A class without a vote is not a prediction: top-5 is over min(5, k) voted classes.
            hits = (ranked == targets[:, None]) & (top_votes > 0)  # (c, 5)
            correct[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).float()
    n = len(test_labels)
    results = {}
    for k in nb_knn:
        results[f"top1_k{k}"] = 100.0 * correct[k][0].item() / n
        results[f"top5_k{k}"] = 100.0 * correct[k][1].item() / n
    return results


class KnnMonitor:
    """The k-NN accuracy (top-1, %, k = --nb_knn) of the teacher backbone during pretraining, on the
    labelled train/val splits of pretrain.py's dataset at its --global_crops_size, with
    knn_classify: knn_eval.py's number for the same checkpoint.

    KnnMonitor.create returns None, after one line saying why, when the dataset has no labelled
    splits (a folder of unlabelled images): the run trains on without the monitor."""

    def __init__(self, args, device, train_set, val_set):
        self.args, self.device, self.train_set, self.val_set = args, device, train_set, val_set

    @classmethod
    def create(cls, args, device, log):
        transform = eval_transform(args.global_crops_size)
        try:
            train_set, val_set = (build_dataset(args.dataset, split, transform, args.data_path, False,
                                                args.synthetic_images, args.global_crops_size) for split in ("train", "val"))
        except DataError as e:
            reason = f"--knn_every needs labelled train/ and val/ splits, and {e}"
            log({"event": "knn_off", "reason": reason})
            if is_main_process():
                print(f"k-NN monitor off: {reason}. Training goes on without it.")
            return None
        return cls(args, device, train_set, val_set)

    def accuracy(self, network):
        """The k-NN top-1 on the main process, which alone holds the gathered features (each process
        extracts its share); None on the others, which neither log nor print it."""
        # On a fork of torch's random state (its DataLoaders draw their seeds from it): measuring
        # leaves the state as it was, so --knn_every never changes what a run learns.
        args, device = self.args, self.device
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            train_features, train_labels = extract_features(network, self.train_set, 256, args.num_workers, device,
                                                            progress=False, main_only=True)
            val_features, val_labels = extract_features(network, self.val_set, 256, args.num_workers, device,
                                                        progress=False, main_only=True)
        if not is_main_process():
            return None
        return knn_classify(train_features, train_labels, val_features, val_labels, [args.nb_knn])[f"top1_k{args.nb_knn}"]

    def __call__(self, teacher):
        return self.accuracy(teacher.backbone)

    def baselines(self, teacher, log):
        """The two numbers the trained teacher's is read against, measured before training: the
        randomly initialised teacher's, and the raw pixels' (the features must know more than the
        images themselves; only for images of at most SMALL_IMAGE_MAX_SIZE pixels, whose pixel vectors
        fit in memory: ImageNet's train split at 224 px would need 150,528 floats an image, 770 GB).
        Logged as epoch -1 and printed; returns {knn_top1_init, knn_top1_pixels}."""
        random_init = self(teacher)
        pixels = self.accuracy(nn.Flatten()) if self.args.global_crops_size <= SMALL_IMAGE_MAX_SIZE else None
        log({"epoch": -1, "knn_top1": random_init, "knn_top1_pixels": pixels})
        if is_main_process():
            print(f"k-NN top-1 (k={self.args.nb_knn}) of the randomly initialised teacher: {random_init:.2f}%; of the "
                  f"raw pixels: " + (f"{pixels:.2f}%" if pixels is not None else f"not measured (images over "
                                                                              f"{SMALL_IMAGE_MAX_SIZE} px)"))
        return {"knn_top1_init": random_init, "knn_top1_pixels": pixels}
