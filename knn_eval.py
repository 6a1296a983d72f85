"""Weighted k-NN classification on frozen features (the DINO protocol), for any checkpoint.

    python knn_eval.py --pretrained_weights runs/demo/checkpoint.pth --dataset mnist5k --image_size 32
    python knn_eval.py --pretrained_weights random --arch resnet18 --small_image_stem true --dataset synthetic --image_size 32
    torchrun --nproc_per_node=8 knn_eval.py --pretrained_weights carp_r50.pth --dataset imagefolder --data_path /imagenet

Protocol (../shared/docs/eval-protocols.md): L2-normalised teacher-backbone features of the train
split form the memory bank; each test image takes its k most similar train images (cosine
similarity s), each votes for its own class with weight exp(s / T), and the classes are ranked by
their summed votes. pretrain.py uses the same functions for its online k-NN monitor.
"""
import argparse
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import DataError
from features import (HelpFormatter, add_eval_args, follow_checkpoint, frozen_features, init_distributed,
                      is_main_process, write_json)


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, nb_knn=(10, 20, 100, 200),
                 temperature=0.07, chunk_size=256):
    """Weighted k-NN top-1 and top-5 accuracy (in %) for each k: {"top1_k20": ..., "top5_k20": ...}.

    train_features (N, D), test_features (M, D): raw features; they are L2-normalised here.
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


def get_args(argv=None):
    parser = argparse.ArgumentParser("Weighted k-NN evaluation on frozen features", formatter_class=HelpFormatter)
    add_eval_args(parser)
    g = parser.add_argument_group("k-NN")
    g.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200],
                   help="numbers of neighbours k (20 is usually best)")
    g.add_argument("--temperature", type=float, default=0.07, help="T of the exp(s / T) vote weights")
    g.add_argument("--output_json", default=None, help="write the metrics as a flat JSON object here")
    args = follow_checkpoint(parser.parse_args(argv))
    if min(args.nb_knn) < 1 or args.temperature <= 0:
        parser.error(f"--nb_knn {args.nb_knn} must be >= 1 and --temperature {args.temperature} > 0")
    return args


def main(argv=None):
    args = get_args(argv)
    rank, world_size, device = init_distributed()
    # ============ extracting features ... ============
    features = frozen_features(args, device)
    # ============ classifying ... ============
    results = None  # on rank 0 only
    if is_main_process():
        results = knn_classify(*features["train"], *features["val"], args.nb_knn, args.temperature)
        print(f"weighted k-NN (T={args.temperature}) of {args.pretrained_weights} on {args.dataset}")
        print(f"{'k':>5} {'top-1':>7} {'top-5':>7}")
        for k in args.nb_knn:
            print(f"{k:>5} {results[f'top1_k{k}']:>7.2f} {results[f'top5_k{k}']:>7.2f}")
        if args.output_json:
            write_json(results, args.output_json)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
