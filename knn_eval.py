"""Weighted k-NN classification on frozen features (the DINO protocol), for any checkpoint.

    python knn_eval.py --pretrained_weights runs/demo/checkpoint.pth --dataset synthetic --image_size 32
    python knn_eval.py --pretrained_weights random --arch resnet18 --small_image_stem true --dataset synthetic --image_size 32
    torchrun --nproc_per_node=8 knn_eval.py --pretrained_weights carp_r50.pth --dataset imagefolder --data_path /imagenet

Protocol (../shared/docs/eval-protocols.md): L2-normalised teacher-backbone features of the train
split form the memory bank; each test image takes its k most similar train images (cosine
similarity s), each votes for its own class with weight exp(s / T), and the classes are ranked by
their summed votes. pretrain.py uses the same functions for its online k-NN monitor.
"""
import argparse
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError, build_dataset, eval_transform
from model import load_backbone


def bool_flag(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class WithIndex(torch.utils.data.Dataset):
    """(image, label, index) so that every feature lands in the row of its image."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label, index


@torch.no_grad()
def extract_features(backbone, dataset, batch_size=128, num_workers=4, device="cpu", progress=True):
    """Features (N, D) and labels (N,) of every image of `dataset`, in dataset order, on the CPU.

    Under a process group each process computes a shard and the shards are all-gathered; the
    DistributedSampler pads the last shard with repeated images, which simply land in their own
    rows again. The backbone is used in eval() mode (BatchNorm running statistics).
    """
    distributed = dist.is_available() and dist.is_initialized()
    sampler = (torch.utils.data.DistributedSampler(dataset, shuffle=False) if distributed
               else torch.utils.data.SequentialSampler(dataset))
    loader = torch.utils.data.DataLoader(WithIndex(dataset), batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, pin_memory=str(device).startswith("cuda"))
    was_training = backbone.training
    backbone.eval()
    features, labels = None, torch.zeros(len(dataset), dtype=torch.long)
    show = progress and (not distributed or dist.get_rank() == 0)
    for images, targets, index in tqdm(loader, desc="features", disable=not show, leave=False):
        feats = backbone(images.to(device, non_blocking=True)).float()  # (b, D)
        index, targets = index.to(device), targets.to(device)
        if distributed:  # every rank runs the same number of equal-sized batches
            feats, index, targets = (torch.cat(all_gather(t)) for t in (feats, index, targets))
        if features is None:
            features = torch.zeros(len(dataset), feats.shape[1])
        features[index.cpu()] = feats.cpu()
        labels[index.cpu()] = targets.cpu()
    backbone.train(was_training)
    return features, labels


def all_gather(tensor):
    tensors = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(tensors, tensor.contiguous())
    return tensors


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
            ranked = votes.topk(min(5, n_classes), dim=1).indices  # (c, 5)
            hits = ranked == targets[:, None]  # (c, 5)
            correct[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).float()
    n = len(test_labels)
    results = {}
    for k in nb_knn:
        results[f"top1_k{k}"] = 100.0 * correct[k][0].item() / n
        results[f"top5_k{k}"] = 100.0 * correct[k][1].item() / n
    return results


def get_args():
    parser = argparse.ArgumentParser("Weighted k-NN evaluation on frozen features")
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_weights", required=True,
                   help="checkpoint written by pretrain.py, or 'random' for a randomly initialised backbone")
    g.add_argument("--checkpoint_key", default="teacher", help="'teacher' (the paper) or 'student'")
    g.add_argument("--arch", default="resnet50", help="torchvision ResNet; read from our checkpoints' args")
    g.add_argument("--small_image_stem", type=bool_flag, default=False, help="3x3 stem for 32x32 data")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="imagefolder", help="imagefolder, cifar10, cifar100, stl10, synthetic")
    g.add_argument("--data_path", default=None, help="imagefolder: folder with train/ and val/")
    g.add_argument("--download", action="store_true", help="download a torchvision dataset into --data_path")
    g.add_argument("--image_size", type=int, default=224, help="centre crop size (224; 32 for CIFAR-sized data)")
    g.add_argument("--batch_size_per_gpu", type=int, default=128)
    g.add_argument("--num_workers", type=int, default=4)
    g = parser.add_argument_group("k-NN")
    g.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200], help="numbers of neighbours")
    g.add_argument("--temperature", type=float, default=0.07, help="T of the exp(s / T) vote weights")
    g.add_argument("--output_json", default=None, help="write the metrics as a flat JSON object here")
    return parser.parse_args()


def main():
    args = get_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # ============ preparing data ... ============
    transform = eval_transform(args.image_size)
    train_set = build_dataset(args.dataset, "train", transform, args.data_path, args.download)
    val_set = build_dataset(args.dataset, "val", transform, args.data_path, args.download)
    print(f"{args.dataset}: {len(train_set)} train and {len(val_set)} val images")
    # ============ building the backbone ... ============
    backbone = load_backbone(args.pretrained_weights, args.arch, args.small_image_stem, args.checkpoint_key).to(device)
    # ============ extracting features and classifying ... ============
    train_features, train_labels = extract_features(backbone, train_set, args.batch_size_per_gpu, args.num_workers, device)
    val_features, val_labels = extract_features(backbone, val_set, args.batch_size_per_gpu, args.num_workers, device)
    results = knn_classify(train_features, train_labels, val_features, val_labels, args.nb_knn, args.temperature)
    print(f"weighted k-NN (T={args.temperature}) of {args.pretrained_weights} on {args.dataset}")
    print(f"{'k':>5} {'top-1':>7} {'top-5':>7}")
    for k in args.nb_knn:
        print(f"{k:>5} {results[f'top1_k{k}']:>7.2f} {results[f'top5_k{k}']:>7.2f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"error: {e}")
