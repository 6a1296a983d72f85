"""Few-shot evaluation on frozen features: PASCAL VOC07 low-shot SVMs, iNat-2018 low-shot linear
classifiers, and a fast N-shot logistic regression, for any checkpoint.

    # VOC07, the paper's numbers (the authors' protocol, the default): --data_path holds VOCdevkit/VOC2007
    python fewshot_eval.py --protocol voc07_svm --pretrained_weights carp_r50.pth --data_path /datasets/voc
    # VOC07, Goyal et al.'s (VISSL) low-shot samples instead: per-class negatives, difficult images ignored
    python fewshot_eval.py --protocol voc07_svm --voc_protocol goyal --pretrained_weights carp_r50.pth --data_path /datasets/voc
    # iNat-2018, the paper's numbers (augmented views through the frozen backbone, the default):
    # --data_path holds train2018.json, val2018.json and the train_val2018/ image tree
    torchrun --nproc_per_node=4 fewshot_eval.py --protocol lowshot_linear --pretrained_weights carp_r50.pth --dataset imagefolder --data_path /datasets/inat2018
    # the fast mode (NOT the authors' protocol): the classifier trained on cached centre-crop features
    python fewshot_eval.py --protocol lowshot_linear --cached_features true --pretrained_weights carp_r50.pth --dataset imagefolder --data_path /imagenet
    python fewshot_eval.py --protocol nshot_logreg --pretrained_weights runs/demo/checkpoint.pth --dataset mnist5k --image_size 32
    # the random-weights baseline, on the features of the same images, saved once and reused
    python fewshot_eval.py --protocol nshot_logreg --pretrained_weights random --arch resnet18 --dataset synthetic --image_size 32 --dump_features feats/random
    python fewshot_eval.py --protocol lowshot_linear --cached_features true --pretrained_weights random --arch resnet18 --load_features feats/random
    torchrun --nproc_per_node=8 fewshot_eval.py --protocol voc07_svm --pretrained_weights carp_r50.pth --data_path /datasets/voc

Protocols (docs/protocols.md), one per --protocol:
- voc07_svm: L2-normalised features of VOC07 trainval (train) and test; one linear SVM per class
  (C = --cost 0.5, fixed, class weight {+1: 2, -1: 1}, squared hinge, L2 penalty); per image and
  class the label is +1 if a non-difficult object of the class is in the image, 0 if only difficult
  ones are, -1 otherwise. Test mAP over the 20 classes, mean and std over --runs draws (default 5)
  per k (default 1 2 4 8 16), and the full-data mAP. Images resized bilinear, as the authors'.
  --voc_protocol authors (default; the authors' evaluations/few-shot/eval_svm_voc.py, where the
  paper's numbers come from): for each k, k positive images of every class are drawn into ONE
  training pool (20 k rows) on which all 20 SVMs train; 0 becomes -1 (a negative) in training and
  in testing. --voc_protocol goyal (Goyal et al. 2019 / VISSL): per class, k positives and 19 k
  negatives (--voc_negatives); difficult images are left out of training and testing.
- lowshot_linear (the iNat-2018 low-shot protocol): keep k train images per class, train a linear
  classifier on the frozen backbone (SGD, momentum 0.9, weight decay 1e-6, lr 0.3 for a global batch
  of 256, 20 epochs, lr x 0.1 at epochs 12 and 18), top-1 / top-5 on the whole val split after every
  epoch, reported for the last and the best epoch (the authors report the best).
  Default (the authors' evaluations/few-shot/evaluate_inat2018.py as their eval_script.sh runs it:
  k = 1, one draw): every epoch trains on new bilinear RandomResizedCrop + flip views of the k-shot
  images, through the backbone kept in eval() mode; val images resized bilinear, centre-cropped.
  --shots 1 2 4 8 16 --runs 5: more k and draws, averaged.
  --cached_features true: the fast mode, on the centre-crop features computed once; NOT the
  authors' protocol, and labelled so in the output and in the JSON ("cached_features": 1).
- nshot_logreg (quick comparisons, ours): L2-normalised features, multinomial logistic regression
  on N images per class, top-1 / top-5 on the whole val split (5 draws of 1 2 4 8 16 by default).

Every metric is reported as mean and std (numpy's, ddof 0) over --runs draws. The draws depend only
on the labels, --seed, k and the run: two checkpoints are compared on the same images.

Classes with fewer than k training images (k positives for VOC) keep all of them; the script says
which. A VOC class without a single positive (or negative) training image in a draw has no SVM, and
a class without a positive test image has no AP: both are left out of the mAP and named.

iNaturalist 2018: torchvision's INaturalist(version='2018') indexes the one train_val2018/ image
tree with no official train/val split, so it is not used. Instead, `--dataset imagefolder` with a
--data_path that holds train2018.json reads the official release as it is: train2018.json and
val2018.json (COCO style: images[].file_name relative to --data_path, annotations[].category_id) are
the train and val splits. An ImageNet-layout folder (train/ and val/ class sub-folders) works too.
"""
import argparse
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

import cli
from cli import HelpFormatter, bool_flag
from data import (VOC_CLASSES, DataError, IndexedImages, build_dataset, dataset_labels, eval_transform,
                  inat2018_datasets, train_transform, voc07_dataset)
from distributed import all_reduce, destroy, init_distributed, is_initialized, is_main_process, rank, world_size
from durable import check_output_file
from features import (add_eval_args, backbone_from_args, check_frozen, extract_features, follow_checkpoint,
                      frozen_features, save_features)
from run_folder import write_json



def is_inat2018_json(args):
    return (args.protocol != "voc07_svm" and args.dataset == "imagefolder" and args.data_path is not None
            and os.path.isfile(os.path.join(args.data_path, "train2018.json")))


def indexed_features(args, device, datasets):
    """frozen_features for IndexedImages datasets: {split: (features (N, D), labels (N, ...))},
    saved to --dump_features in the same files and format, so --load_features reads them back."""
    if is_main_process():
        print(", ".join(f"{len(d)} {split} images" for split, d in datasets.items()) + f" of {args.data_path}")
    backbone = backbone_from_args(args).to(device)
    out = {}
    for split, dataset in datasets.items():
        features, index = extract_features(backbone, dataset, args.batch_size_per_gpu, args.num_workers, device,
                                           main_only=True)  # (None, None) on the other processes
        out[split] = (features, None if index is None else dataset.labels[index])  # the images' label rows, in order
    if args.dump_features:
        save_features(args.dump_features, out)
    return out


class KShotViews(torch.utils.data.Dataset):
    """(view, label) of the k-shot images `kept` of a train dataset whose transform draws a new
    augmented view at every call; labels (N,) are those of the whole dataset."""

    def __init__(self, dataset, kept, labels):
        self.dataset, self.kept, self.labels = dataset, [int(i) for i in kept], labels

    def __len__(self):
        return len(self.kept)

    def __getitem__(self, i):
        index = self.kept[i]
        return self.dataset[index][0], int(self.labels[index])


def augmented_views(args, device):
    """lowshot_linear in the authors' protocol: the frozen backbone and the train split with the
    training augmentation (its views are drawn anew at every epoch), and the val features, computed
    once: the backbone is frozen and the val transform deterministic, so they never change.

    Returns ({'train': (None, labels (N,)), 'val': (features (M, D), labels (M,))}, (backbone, train dataset)).
    Both transforms default to the authors' bilinear (torchvision's default in their Resize(256) and
    RandomResizedCrop(224)): --resize_interpolation, --crop_interpolation.
    """
    views = train_transform(args.image_size, args.crop_interpolation)
    transform = eval_transform(args.image_size, args.resize_interpolation)
    if is_inat2018_json(args):
        datasets = inat2018_datasets(args.data_path, transform, views_transform=views)
    else:
        datasets = {"train": build_dataset(args.dataset, "train", views, args.data_path, args.download,
                                           args.synthetic_images, args.image_size),
                    "val": build_dataset(args.dataset, "val", transform, args.data_path, args.download,
                                         args.synthetic_images, args.image_size)}
    if is_main_process():
        print(", ".join(f"{len(d)} {split} images" for split, d in datasets.items())
              + f" of {args.data_path if is_inat2018_json(args) else args.dataset}")
    backbone = backbone_from_args(args).to(device)
    # Frozen: eval() so that BatchNorm normalises with its stored running statistics and never updates
    # them (in train() mode it would use the statistics of each k-shot batch and overwrite the running
    # ones, even under no_grad), as the authors' script does (model.eval() with --weights freeze).
    backbone.eval()
    backbone.requires_grad_(False)
    val_features, val_labels = extract_features(backbone, datasets["val"], args.batch_size_per_gpu, args.num_workers,
                                                device)  # (M, D), (M,)
    if isinstance(datasets["val"], IndexedImages):  # extract_features returned the image indices
        val_labels = datasets["val"].labels[val_labels]
    train_labels = dataset_labels(datasets["train"])  # (N,)
    return {"train": (None, train_labels), "val": (val_features, val_labels)}, (backbone, datasets["train"])


# ============ VOC07: average precision and per-class linear SVMs ============

def voc_average_precision(scores, labels, method="area"):
    """AP of one class from test scores (M,) and labels (M,) in {+1, 0, -1}; 0 (difficult) images are
    left out of the ranking (the authors' protocol has turned them into -1 before). nan when no
    positive remains.

    Images are ranked by decreasing score (ties keep test-set order); precision and recall are taken
    after each rank. 'area': the area under the precision-recall curve with precision made
    monotone (each precision replaced by the best one at equal or higher recall), summed over the
    recall steps: what the authors' eval_svm_voc.py computes (get_precision_recall, calculate_ap),
    as do Goyal et al.'s benchmark and VISSL. '11point': the mean over recall thresholds 0, 0.1,
    ..., 1 of the best precision at recall >= the threshold, as in the official VOC2007 devkit.
    NOTE(authors' code): they break score ties by reversing numpy's (unstable) argsort; SVM scores
    are real numbers, so ties do not occur in practice.
    """
    keep = labels != 0
    scores, positive = np.asarray(scores, dtype=np.float64)[keep], labels[keep] > 0
    n_positive = positive.sum()
    if n_positive == 0:
        return math.nan
    ranked = positive[np.argsort(-scores, kind="stable")]  # (M',) True where the image is a positive
    true_positives = np.cumsum(ranked)
    precision = true_positives / np.arange(1, len(ranked) + 1)  # (M',)
    recall = true_positives / n_positive  # (M',)
    if method == "11point":
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]))
    best_precision = np.maximum.accumulate(precision[::-1])[::-1]  # (M',) max precision at recall >= here
    # Recall rises by 1 / n_positive exactly at the positives.
    return float(best_precision[ranked].sum() / n_positive)


def voc_svm_scores(train_features, targets, test_features, cost=0.5, seed=0, max_iter=2000):
    """Decision values (M,) of one class's linear SVM trained on features (n, D) with targets (n,)
    in {+1, -1}; features are expected L2-normalised. Returns (scores, converged).

    The SVM of the authors' eval_svm_voc.py (and of Goyal et al.'s benchmark and VISSL): sklearn's
    LinearSVC (liblinear, dual coordinate descent), squared hinge, L2 penalty, class weight 2 for
    positives and 1 for negatives, tol 1e-4, max_iter 2000, one fixed C (0.5): no cross-validation.
    NOTE(authors' code): their random_state is always 0; ours is --seed (0 by default).
    """
    svm = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, loss="squared_hinge", penalty="l2", dual=True,
                    tol=1e-4, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(train_features, targets)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return svm.decision_function(test_features), converged


def difficult_as_negative(labels):
    """labels (N, 20) with 0 ("difficult only") turned into -1. The authors' protocol does this to
    trainval and test alike: such an image is a negative of the class for the SVM and for the AP."""
    return np.where(labels == 0, -1, labels)


def voc_shared_pool(labels, k, rng):
    """The authors' low-shot training pool (voc.py, Voc2007Classification.convert_low_shot): for each
    class in turn, k of its +1 images drawn without replacement, the 20 draws concatenated. Every
    class's SVM trains on this one pool, with the image's own label of that class as target.

    labels: (N, 20). Returns (pool (n,) indices with n = sum over classes of min(k, positives) <= 20 k,
    {class: positives drawn} for the classes with fewer than k positive images).
    An image with several classes is drawn independently by each: it can appear once per class
    that drew it, and then weighs as much in every SVM, as in the authors' code.
    """
    draws, short = [], {}
    for c in range(labels.shape[1]):
        present = np.flatnonzero(labels[:, c] == 1)
        draws.append(rng.choice(present, min(k, len(present)), replace=False))
        if len(present) < k:
            short[c] = len(present)
    return np.concatenate(draws).astype(np.int64), short


def voc_lowshot_sets(labels, k, rng, negatives="sampled"):
    """--voc_protocol goyal: one training set per class for a low-shot draw: [(indices (n_c,), targets
    (n_c,) in {+1, -1})] over the 20 classes, and the classes short of images as {class: (positives,
    negatives) used}.

    labels: (N, 20) trainval labels in {+1, 0, -1}. Per class, k positive images; negatives
    'sampled': (20 - 1) k images with label -1 (the low-shot VOC07 samples of Goyal et al.'s
    benchmark and VISSL's create_voc07_low_shot_samples), 'all': every -1 image. Difficult (0)
    images are never used. A class with fewer images keeps all it has.
    """
    sets, short = [], {}
    n_classes = labels.shape[1]
    for c in range(n_classes):
        present, absent = np.flatnonzero(labels[:, c] == 1), np.flatnonzero(labels[:, c] == -1)
        n_negatives = len(absent) if negatives == "all" else (n_classes - 1) * k
        positives = rng.choice(present, min(k, len(present)), replace=False)
        negatives_drawn = rng.choice(absent, min(n_negatives, len(absent)), replace=False)
        if len(positives) < k or len(negatives_drawn) < n_negatives:
            short[c] = (len(positives), len(negatives_drawn))
        indices = np.concatenate([positives, negatives_drawn])
        sets.append((indices, np.where(np.arange(len(indices)) < len(positives), 1, -1)))
    return sets, short


def voc_full_sets(labels):
    """The full-data training set of each class: every trainval image whose label is +1 or -1. With
    the authors' protocol the labels have gone through difficult_as_negative, so this is every
    image, difficult-only ones as negatives (their `k = 'full'`); with --voc_protocol goyal,
    difficult-only images are left out, as VISSL does."""
    sets = []
    for c in range(labels.shape[1]):
        indices = np.flatnonzero(labels[:, c] != 0)
        sets.append((indices, labels[indices, c]))
    return sets


def voc_mean_ap(scores, labels, method="area"):
    """(mAP in %, AP per class (20,)) of test scores (M, 20) against labels (M, 20) in {+1, 0, -1}.
    A class without scores (nan: no SVM) or without a positive test image has AP nan and is left
    out of the mean (on VOC07 every class has test positives and, in every draw, an SVM)."""
    aps = np.full(labels.shape[1], math.nan)  # (20,)
    for c in range(labels.shape[1]):
        if not np.isnan(scores[:, c]).any():
            aps[c] = voc_average_precision(scores[:, c], labels[:, c], method)
    return (float(100.0 * np.nanmean(aps)) if not np.isnan(aps).all() else math.nan), aps


def voc_svm_test_scores(train_features, train_sets, test_features, args):
    """Test scores (M, 20) of one SVM per class trained on its training set, nan for a class
    whose set lacks positives or negatives, and the number of SVMs that did not converge.

    train_features (N, D), test_features (M, D): L2-normalised."""
    scores, not_converged = np.full((len(test_features), len(train_sets)), math.nan), 0
    for c, (indices, targets) in enumerate(train_sets):
        if len(set(targets.tolist())) < 2:  # an SVM needs positives and negatives
            continue
        scores[:, c], converged = voc_svm_scores(train_features[indices], targets, test_features, args.cost,
                                                 args.seed, args.svm_max_iter)
        not_converged += not converged
    return scores, not_converged


def draw_rng(seed, k, run):
    """The generator of draw `run` for k shots: the same for every checkpoint.
    NOTE(authors' code): they seed Python's `random` once (--seed 0) and take every draw, k after k
    and run after run, from that one stream, so a draw depends on the draws before it; ours depends
    only on (seed, k, run). Same distribution of pools, not the same pools."""
    return np.random.default_rng([seed, k, run])


def voc07_svm(features, args):
    """The voc07_svm protocol on {'trainval': (features (N, D), labels (N, 20)), 'test': ...}:
    test mAP (%) of the low-shot SVMs per k (mean, std and each run) and of the full-data SVMs."""
    train_features, train_labels = features["trainval"]
    test_features, test_labels = features["test"]
    if train_labels.ndim != 2 or train_labels.shape[1] != len(VOC_CLASSES):
        raise DataError(f"the trainval labels have shape {tuple(train_labels.shape)}, not (N, 20): these features "
                        f"were not saved by --protocol voc07_svm")
    # NOTE(authors' code): they divide by (norm + 1e-5) instead; for ResNet features (norms ~ 10) the
    # two differ by under 1e-5 relative.
    train_features = F.normalize(train_features.double(), dim=1).numpy()  # (N, D)
    test_features = F.normalize(test_features.double(), dim=1).numpy()  # (M, D)
    train_labels, test_labels = train_labels.numpy(), test_labels.numpy()  # (N, 20), (M, 20)
    if args.voc_protocol == "authors":
        train_labels, test_labels = difficult_as_negative(train_labels), difficult_as_negative(test_labels)
    results, left_out, not_converged = {}, set(), 0
    for k in args.shots:
        maps = []
        for run in range(args.runs):
            rng = draw_rng(args.seed, k, run)
            if args.voc_protocol == "authors":
                pool, positives = voc_shared_pool(train_labels, k, rng)  # (n,), n <= 20 k
                sets = [(pool, train_labels[pool, c]) for c in range(len(VOC_CLASSES))]  # one pool, 20 SVMs
                negatives = {}
            else:
                sets, short = voc_lowshot_sets(train_labels, k, rng, args.voc_negatives)
                positives = {c: p for c, (p, _) in short.items() if p < k}
                negatives = {c: n for c, (p, n) in short.items() if p > 0 and args.voc_negatives == "sampled"
                             and n < (len(VOC_CLASSES) - 1) * k}
            if run == 0:  # the shortfalls depend only on the labels: say them once per k
                if positives:
                    print(f"k={k}: fewer than {k} positive trainval images, all used: "
                          + ", ".join(f"{VOC_CLASSES[c]} ({p})" for c, p in positives.items()))
                if negatives:
                    print(f"k={k}: fewer than {(len(VOC_CLASSES) - 1) * k} negative trainval images for "
                          f"{len(negatives)} classes, all used")
            scores, n = voc_svm_test_scores(train_features, sets, test_features, args)  # (M, 20)
            mean_ap, aps = voc_mean_ap(scores, test_labels, args.voc_ap)
            maps.append(mean_ap)
            left_out |= set(np.flatnonzero(np.isnan(aps)).tolist())
            not_converged += n
        results[f"map_k{k}_mean"], results[f"map_k{k}_std"] = float(np.mean(maps)), float(np.std(maps))
        results[f"map_k{k}_runs"] = [float(m) for m in maps]
    scores, n = voc_svm_test_scores(train_features, voc_full_sets(train_labels), test_features, args)
    results["map_full"], aps = voc_mean_ap(scores, test_labels, args.voc_ap)
    results.update({f"ap_full_{name}": 100.0 * float(ap) for name, ap in zip(VOC_CLASSES, aps)})
    left_out |= set(np.flatnonzero(np.isnan(aps)).tolist())
    not_converged += n
    if left_out:
        print("left out of the mAP (no positive or no negative training image, or no positive test image): "
              + ", ".join(VOC_CLASSES[c] for c in sorted(left_out)))
    if not_converged:
        print(f"{not_converged} SVMs did not converge in --svm_max_iter {args.svm_max_iter} iterations")
    return results


# ============ k images per class, linear classifiers ============

def sample_kshot(labels, k, rng, n_classes=None):
    """Indices (sorted) of k images per class drawn without replacement, and {class: images used}
    for the classes that have fewer than k images (all of them are kept, possibly none).

    labels: (N,) integer class of each image. Depends only on labels, k and the generator's state.
    """
    labels = np.asarray(labels)
    n_classes = n_classes or int(labels.max()) + 1
    order = np.argsort(labels, kind="stable")  # images grouped by class, in dataset order within a class
    counts = np.bincount(labels, minlength=n_classes)  # (C,)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen, short = [], {}
    for c in range(n_classes):
        members = order[starts[c]:starts[c] + counts[c]]
        if counts[c] <= k:
            chosen.append(members)
            if counts[c] < k:
                short[c] = int(counts[c])
        else:
            chosen.append(rng.choice(members, k, replace=False))
    return np.sort(np.concatenate(chosen)), short


def torch_seed(rng):
    """A torch generator seeded from a draw's numpy generator (weight init and batch order)."""
    return torch.Generator().manual_seed(int(rng.integers(2 ** 62)))


@torch.no_grad()
def topk_accuracy(weight, bias, features, labels, chunk_size=4096):
    """Top-1 and top-5 accuracy (in %) of the linear classifier features @ weight.T + bias; top-5
    is over min(5, C) classes."""
    hits = torch.zeros(2)
    for start in range(0, len(labels), chunk_size):
        logits = features[start:start + chunk_size] @ weight.T + bias  # (c, C)
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (c, 5)
        correct = ranked == labels[start:start + chunk_size, None]  # (c, 5)
        hits += torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum()]).float().cpu()
    return (100.0 * hits / len(labels)).tolist()


def lr_per_epoch(lr, epochs, milestones, gamma):
    """(epochs,) learning rate of each epoch: lr, times gamma after each milestone epoch reached."""
    return np.array([lr * gamma ** sum(epoch >= m for m in milestones) for epoch in range(epochs)])


def train_linear(epoch_batches, dim, n_classes, args, generator, evaluate, device, distributed=False):
    """nn.Linear(D, C) trained by SGD (momentum, weight decay, lr x --lr_gamma at each of
    --lr_milestones), weights N(0, 0.01) and a zero bias, as the authors' evaluate_inat2018.py does.

    epoch_batches(epoch) yields the (features (b, D), labels (b,)) of one epoch; evaluate(weight,
    bias) gives the val (top-1, top-5) after each epoch. distributed: every process holds its share
    of each global batch, and the gradients are averaged over the processes, as DDP does, so every
    process keeps the same classifier. Returns [(top-1, top-5)] per epoch.
    """
    linear = torch.nn.Linear(dim, n_classes)
    torch.nn.init.normal_(linear.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(linear.bias)
    linear = linear.to(device)
    optimizer = torch.optim.SGD(linear.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    history = []
    for epoch, lr in enumerate(lr_per_epoch(args.lr, args.epochs, args.lr_milestones, args.lr_gamma)):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for features, labels in epoch_batches(epoch):
            loss = F.cross_entropy(linear(features), labels)  # logits (b, C)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if distributed:
                for parameter in linear.parameters():
                    all_reduce(parameter.grad)
                    parameter.grad /= world_size()
            optimizer.step()
        history.append(evaluate(linear.weight.detach(), linear.bias.detach()))
    return history


def cached_batches(features, labels, batch_size, generator):
    """epoch_batches of the fast mode: the cached features (n, D) of the k-shot images in a new
    random order each epoch, on one process."""
    def batches(epoch):
        order = torch.randperm(len(labels), generator=generator).to(features.device)  # (n,)
        for batch in order.split(batch_size):
            yield features[batch], labels[batch]
    return batches


def view_batches(backbone, views, batch_size, seed, device, num_workers=0):
    """epoch_batches of the authors' protocol: at every epoch, new augmented views of the k-shot
    images (`views`, a KShotViews) through the frozen backbone, in eval() mode and under no_grad.

    Under torchrun, a DistributedSampler seeded alike on every process deals each process its share
    (batch_size / processes per step, the authors' split of the global batch of 256); in one
    process it is a seeded shuffle. The views are seeded per epoch and process.
    """
    n_processes, process = world_size(), rank()
    sampler = torch.utils.data.DistributedSampler(views, num_replicas=n_processes, rank=process, shuffle=True,
                                                  seed=seed)
    loader = torch.utils.data.DataLoader(views, sampler=sampler, batch_size=batch_size // n_processes,
                                         num_workers=num_workers, pin_memory=str(device).startswith("cuda"))

    def batches(epoch):
        sampler.set_epoch(epoch)
        torch.manual_seed(seed + 1000 * epoch + process)  # the crops and flips (DataLoader workers seed from it)
        backbone.eval()
        for images, labels in loader:
            with torch.no_grad():
                features = backbone(images.to(device, non_blocking=True)).float()  # (b, D)
            yield features, labels.to(device, non_blocking=True)
    return batches


def last_and_best(history):
    """[(top-1, top-5)] per epoch -> (top-1, top-5) of the last epoch, then the best top-1 and the
    best top-5 over the epochs, each maximised on its own as the authors' script does (best_acc1 and
    best_acc5 can come from two epochs). The best epoch is chosen on the val split: optimistic."""
    history = np.asarray(history)  # (epochs, 2)
    return [*history[-1], *history.max(axis=0)]


def fit_logreg(features, labels, n_classes, c=1.0, max_iter=1000):
    """Multinomial logistic regression, the objective of sklearn's LogisticRegression(C=c) divided
    by c n: mean cross-entropy + ||W||^2 / (2 c n) (bias not penalised), minimised by full-batch
    L-BFGS in torch so that it runs on the GPU. Returns (weight (C, D), bias (C,))."""
    n, dim = features.shape
    weight = torch.zeros(n_classes, dim, dtype=features.dtype, device=features.device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=features.dtype, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + weight.pow(2).sum() / (2 * c * n)
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach(), bias.detach()


def kshot_classifiers(features, args, device, views=None):
    """lowshot_linear and nshot_logreg: top-1 / top-5 on the val split of classifiers trained on k
    train images per class, mean and std over --runs draws.

    features: {'train': (features (N, D), labels (N,)), 'val': (features (M, D), labels (M,))}.
    views: None (cached features), or (frozen backbone, train dataset with the training
    augmentation) for lowshot_linear in the authors' protocol; features['train'] is then (None,
    labels). With views, every process of a torchrun launch runs this together.
    lowshot_linear reports the last epoch (top1_*, top5_*) and the best (best_top1_*, best_top5_*).
    """
    train_features, train_labels = features["train"]
    val_features, val_labels = features["val"]
    if train_labels.ndim != 1:
        raise DataError(f"the train labels have shape {tuple(train_labels.shape)}, not (N,): these features were "
                        f"saved by --protocol voc07_svm; use --protocol voc07_svm with them")
    n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    # lowshot_linear trains on the raw features, as the linear probe does; the quick logistic
    # regression works on L2-normalised ones, so that one --logreg_c suits every backbone.
    if args.protocol == "nshot_logreg":
        train_features, val_features = F.normalize(train_features, dim=1), F.normalize(val_features, dim=1)
    if views is None:
        train_features, train_labels = train_features.float().to(device), train_labels.to(device)  # (N, D), (N,)
    else:
        backbone, train_set = views
        reference = {name: value.clone() for name, value in backbone.state_dict().items()}
    val_features, val_labels = val_features.float().to(device), val_labels.to(device)  # (M, D), (M,)
    labels = train_labels.cpu().numpy()  # (N,) the draws are made on the CPU, the same on every process

    def evaluate(weight, bias):
        return topk_accuracy(weight, bias, val_features, val_labels)

    results = {} if args.protocol == "nshot_logreg" else {"cached_features": float(views is None)}
    for k in args.shots:
        accuracies = []  # (runs, 2 or 4): top-1, top-5 of the last epoch (, best top-1, best top-5)
        for run in range(args.runs):
            # NOTE(authors' code): evaluate_inat2018.py makes one draw per launch (their eval_script.sh:
            # --k 1) with Python's `random` unseeded, in each process on its own: under torchrun every
            # process draws other k-shot images and the DistributedSampler indexes into each process's
            # own draw, so over the epochs their classifier sees up to k x processes images per class.
            # Here the draw is seeded and the same on every process; by default one draw of k = 1, as
            # theirs, and --shots / --runs for more (mean and std over the draws).
            rng = draw_rng(args.seed, k, run)
            kept, short = sample_kshot(labels, k, rng, n_classes)  # (n,)
            if short and run == 0 and is_main_process():
                listed = ", ".join(f"class {c}: {n}" for c, n in list(short.items())[:10])
                print(f"k={k}: {len(short)} of {n_classes} classes have fewer than {k} train images; all of "
                      f"their images are used ({listed}{', ...' if len(short) > 10 else ''})")
            if args.protocol == "nshot_logreg":
                kept = torch.from_numpy(kept).to(device)
                weight, bias = fit_logreg(train_features[kept], train_labels[kept], n_classes, args.logreg_c,
                                          args.logreg_max_iter)
                accuracies.append(evaluate(weight, bias))
                continue
            generator = torch_seed(rng)  # the classifier's initialisation (and the cached batches' order)
            if views is None:
                kept = torch.from_numpy(kept).to(device)
                batches = cached_batches(train_features[kept], train_labels[kept], args.linear_batch_size, generator)
            else:
                batches = view_batches(backbone, KShotViews(train_set, kept, train_labels), args.linear_batch_size,
                                       int(rng.integers(2 ** 31)), device, args.num_workers)
            history = train_linear(batches, val_features.shape[1], n_classes, args, generator, evaluate, device,
                                   distributed=views is not None and is_initialized())
            accuracies.append(last_and_best(history))
            if views is not None:
                check_frozen(backbone, reference, "low-shot training")
        accuracies = np.array(accuracies)  # (runs, 2 or 4)
        names = ("top1", "top5") if args.protocol == "nshot_logreg" else ("top1", "top5", "best_top1", "best_top5")
        for i, name in enumerate(names):
            results[f"{name}_k{k}_mean"] = float(accuracies[:, i].mean())
            results[f"{name}_k{k}_std"] = float(accuracies[:, i].std())
            results[f"{name}_k{k}_runs"] = accuracies[:, i].tolist()
    return results


# ============ command line ============

LOWSHOT_MODES = {
    False: "the authors' protocol: new RandomResizedCrop + flip views through the frozen backbone every epoch",
    True: "FAST MODE (--cached_features true): cached centre-crop features, NOT the authors' protocol",
}


# What each protocol runs when its flags are left out. voc07_svm: the authors' eval_svm_voc.py (5
# draws of k = 1, 2, 4, 8, 16 positives per class). lowshot_linear: their eval_script.sh, which runs
# evaluate_inat2018.py once with --k 1 (one draw; whether the paper's table used other k we could not
# check, docs/protocols.md, *Each protocol, exactly*). Both resize with their Resize(256), torchvision's bilinear.
# nshot_logreg is ours: the k and draws of VOC07, and the bicubic resize of DINO's k-NN.
PROTOCOL_DEFAULTS = {
    "voc07_svm": {"shots": [1, 2, 4, 8, 16], "runs": 5, "resize_interpolation": "bilinear"},
    "lowshot_linear": {"shots": [1], "runs": 1, "resize_interpolation": "bilinear"},
    "nshot_logreg": {"shots": [1, 2, 4, 8, 16], "runs": 5, "resize_interpolation": "bicubic"},
}


def get_args(argv=None):
    parser = argparse.ArgumentParser("Few-shot evaluation on frozen features: VOC07 SVMs, low-shot linear, "
                                     "N-shot logistic regression", formatter_class=HelpFormatter)
    g = parser.add_argument_group("protocol")
    g.add_argument("--protocol", required=True, choices=["voc07_svm", "lowshot_linear", "nshot_logreg"],
                   help="voc07_svm: per-class linear SVMs on PASCAL VOC07, read from --data_path (the folder "
                        "that holds VOCdevkit/VOC2007; --dataset is ignored), test mAP. lowshot_linear: the iNat-2018 "
                        "low-shot linear classifier on --dataset (with --dataset imagefolder, a --data_path that "
                        "holds train2018.json and val2018.json is read as the official iNat-2018 release). "
                        "nshot_logreg: fast logistic regression on L2-normalised features of --dataset")
    g.add_argument("--shots", type=int, nargs="+", default=None,
                   help="k: training images per class (positive images per class for voc07_svm). Default: the "
                        "protocol's, " + "; ".join(f"{' '.join(map(str, d['shots']))} for {p}"
                                                   for p, d in PROTOCOL_DEFAULTS.items()))
    g.add_argument("--runs", type=int, default=None,
                   help="random draws of the k-shot training images per k. Default: the protocol's, "
                        + "; ".join(f"{d['runs']} for {p}" for p, d in PROTOCOL_DEFAULTS.items()))
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the draws (and the classifiers, and the augmented views): keep it fixed to compare "
                        "checkpoints on the same images")
    g.add_argument("--output_json", default=None,
                   help="write the metrics (in %%) as a flat JSON object: map_k{k}_mean/_std/_runs, map_full and "
                        "ap_full_<class> for voc07_svm; top1_k{k}_* and top5_k{k}_* (last epoch), best_top1_k{k}_* "
                        "and best_top5_k{k}_* (best epoch) and cached_features (1 in the fast mode, 0 in the "
                        "authors' protocol) for lowshot_linear; top1_k{k}_* and top5_k{k}_* for nshot_logreg")
    add_eval_args(parser, resize_interpolation=None)  # the protocol's: PROTOCOL_DEFAULTS
    g = parser.add_argument_group("voc07_svm")
    g.add_argument("--voc_protocol", default="authors", choices=["authors", "goyal"],
                   help="authors (default, the paper's numbers): for each draw, k positive images of every class "
                        "in ONE training pool (at most 20 k images) shared by the 20 SVMs; 'difficult only' labels "
                        "are negatives in training and in testing. goyal: Goyal et al.'s / VISSL's low-shot "
                        "samples, per class k positives and --voc_negatives negatives; difficult images are left "
                        "out of training and testing. Both: fixed --cost, no cross-validation")
    g.add_argument("--voc_negatives", default=None, choices=["sampled", "all"],
                   help="--voc_protocol goyal only: negatives of a low-shot SVM: 'sampled' (default), 19 k "
                        "images without the class (Goyal et al.'s samples), or 'all' images without the class")
    g.add_argument("--cost", type=float, default=0.5,
                   help="C of every linear SVM, fixed (0.5, the authors'; they do not cross-validate it)")
    g.add_argument("--voc_ap", default="area", choices=["area", "11point"],
                   help="AP: area under the monotone precision-recall curve (the authors', Goyal et al.'s and "
                        "VISSL's) or the 11-point interpolated AP of the VOC2007 devkit")
    g.add_argument("--svm_max_iter", type=int, default=2000, help="liblinear iterations per SVM (the authors: 2000)")
    g = parser.add_argument_group("lowshot_linear")
    g.add_argument("--cached_features", type=bool_flag, default=None,
                   help="false (default): the authors' protocol, every epoch trains on new RandomResizedCrop + "
                        "flip views of the k-shot images through the frozen backbone (eval() mode); the backbone "
                        "runs on epochs x k x classes images per draw, torchrun shares the work. true: the fast "
                        "mode, on the centre-crop features computed once (and --dump_features / --load_features), "
                        "labelled in the output and the JSON; NOT the authors' protocol, for quick comparisons")
    g.add_argument("--epochs", type=int, default=20, help="passes over the k-shot training images (the authors: 20)")
    g.add_argument("--lr", type=float, default=0.3,
                   help="SGD learning rate (the authors: 0.3 for the batch of 256, not scaled with the batch)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (the authors: 0.9)")
    g.add_argument("--weight_decay", type=float, default=1e-6, help="SGD weight decay (the authors: 1e-6)")
    g.add_argument("--lr_milestones", type=int, nargs="*", default=[12, 18],
                   help="epochs at which the learning rate is multiplied by --lr_gamma (the authors: 12 18)")
    g.add_argument("--lr_gamma", type=float, default=0.1, help="learning-rate factor at each milestone")
    g.add_argument("--crop_interpolation", default="bilinear", choices=["bilinear", "bicubic"],
                   help="kernel of the RandomResizedCrop views of the authors' protocol: bilinear, torchvision's "
                        "default, as in their script")
    g.add_argument("--linear_batch_size", type=int, default=256,
                   help="images per SGD step over all processes (the authors: 256); under torchrun each process "
                        "takes linear_batch_size / processes, so it must be a multiple of the process count")
    g = parser.add_argument_group("nshot_logreg")
    g.add_argument("--logreg_c", type=float, default=1.0,
                   help="inverse L2 strength, as sklearn's LogisticRegression(C): larger fits the few images harder")
    g.add_argument("--logreg_max_iter", type=int, default=1000, help="L-BFGS iterations per draw")
    args = parser.parse_args(argv)
    for name, default in PROTOCOL_DEFAULTS[args.protocol].items():  # the flags left out: the protocol's
        if getattr(args, name) is None:
            setattr(args, name, list(default) if isinstance(default, list) else default)
    # VOC07 reads its own layout from --data_path: only the other protocols take the checkpoint's dataset.
    follow_checkpoint(args, follow_dataset=args.protocol != "voc07_svm")
    if min(args.shots) < 1 or args.runs < 1:
        parser.error(f"--shots {args.shots} must be >= 1 and --runs {args.runs} >= 1")
    if args.cost <= 0 or args.logreg_c <= 0 or args.svm_max_iter < 1 or args.logreg_max_iter < 1:
        parser.error("--cost, --logreg_c, --svm_max_iter and --logreg_max_iter must be positive")
    if args.epochs < 1 or args.lr <= 0 or args.linear_batch_size < 1:
        parser.error(f"--epochs {args.epochs}, --lr {args.lr} and --linear_batch_size {args.linear_batch_size} "
                     f"must be positive")
    if args.voc_negatives is not None and not (args.protocol == "voc07_svm" and args.voc_protocol == "goyal"):
        parser.error(f"--voc_negatives {args.voc_negatives} applies to --protocol voc07_svm --voc_protocol goyal "
                     f"only (the authors' protocol trains every SVM on the shared pool, without per-class "
                     f"negatives): drop it, or add --voc_protocol goyal")
    if args.voc_negatives is None:
        args.voc_negatives = "sampled"
    if args.cached_features is not None and args.protocol != "lowshot_linear":
        parser.error(f"--cached_features {str(args.cached_features).lower()} applies to --protocol lowshot_linear "
                     f"only ({args.protocol} always works on the centre-crop features): drop it")
    if args.protocol == "lowshot_linear":
        args.cached_features = bool(args.cached_features)
        if not args.cached_features and (args.dump_features or args.load_features):
            parser.error("--dump_features and --load_features apply to --cached_features true only with --protocol "
                         "lowshot_linear: the authors' protocol runs the backbone on new augmented views every epoch")
        world_size = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; the process group does not exist yet
        if not args.cached_features and args.linear_batch_size % world_size:
            parser.error(f"--linear_batch_size {args.linear_batch_size} is not a multiple of the {world_size} "
                         f"processes (WORLD_SIZE): each takes an equal share of every batch; pass a multiple of "
                         f"{world_size} (the authors: 256)")
    return args


def print_table(results, args):
    if args.protocol == "voc07_svm":
        protocol = ("the authors' protocol: one shared pool, difficult = negative" if args.voc_protocol == "authors"
                    else f"Goyal et al.'s protocol: {args.voc_negatives} negatives per class, difficult ignored")
        print(f"VOC07 linear SVMs ({protocol}; C={args.cost}, AP {args.voc_ap}) of {args.pretrained_weights}: "
              f"test mAP (%) over {args.runs} draws")
        print(f"{'k':>5} {'mean':>7} {'std':>6}")
        for k in args.shots:
            print(f"{k:>5} {results[f'map_k{k}_mean']:>7.2f} {results[f'map_k{k}_std']:>6.2f}")
        print(f"{'full':>5} {results['map_full']:>7.2f}")
        return
    data = args.load_features or (args.data_path if is_inat2018_json(args) else args.dataset)
    print(f"{args.protocol} of {args.pretrained_weights} on {data}: val accuracy (%) over {args.runs} draws")
    if args.protocol == "nshot_logreg":
        print(f"{'k':>5} {'top-1':>7} {'std':>6} {'top-5':>7} {'std':>6}")
        for k in args.shots:
            print(f"{k:>5} {results[f'top1_k{k}_mean']:>7.2f} {results[f'top1_k{k}_std']:>6.2f} "
                  f"{results[f'top5_k{k}_mean']:>7.2f} {results[f'top5_k{k}_std']:>6.2f}")
        return
    print(LOWSHOT_MODES[args.cached_features])
    print(f"{'':>5} {'last epoch':^29} {'best epoch (as the authors)':^29}")
    print(f"{'k':>5}" + f" {'top-1':>7} {'std':>6} {'top-5':>7} {'std':>6}" * 2)
    for k in args.shots:
        print(f"{k:>5}" + "".join(f" {results[f'{name}_k{k}_mean']:>7.2f} {results[f'{name}_k{k}_std']:>6.2f}"
                                  for name in ("top1", "top5", "best_top1", "best_top5")))
    if args.cached_features:
        print(LOWSHOT_MODES[True])


def main(argv=None):
    args = get_args(argv)
    check_output_file(args.output_json)  # before any image is read
    _, _, device = init_distributed()  # rank and process count: is_main_process(), view_batches
    augmented = args.protocol == "lowshot_linear" and not args.cached_features
    # ============ extracting features ... ============
    splits = ("trainval", "test") if args.protocol == "voc07_svm" else ("train", "val")
    views, results = None, None
    if augmented:
        features, views = augmented_views(args, device)
    elif args.load_features or not (args.protocol == "voc07_svm" or is_inat2018_json(args)):
        features = frozen_features(args, device, splits, main_only=True)  # the classifiers fit on rank 0 alone
    elif args.protocol == "voc07_svm":
        transform = eval_transform(args.image_size, args.resize_interpolation)
        features = indexed_features(args, device, {split: voc07_dataset(args.data_path, split, transform, args.download)
                                                   for split in splits})
    else:
        features = indexed_features(args, device, inat2018_datasets(
            args.data_path, eval_transform(args.image_size, args.resize_interpolation)))
    # ============ training the few-shot classifiers ... ============
    if augmented:  # every process trains, on its share of each batch of views
        results = kshot_classifiers(features, args, device, views)
    elif is_main_process():  # on cached features: one process is enough
        results = voc07_svm(features, args) if args.protocol == "voc07_svm" else kshot_classifiers(features, args,
                                                                                                    device)
    # ============ reporting ... ============
    if is_main_process():
        print_table(results, args)
        if args.output_json:
            write_json(results, args.output_json)
    destroy()
    return results


if __name__ == "__main__":
    cli.run(main)
