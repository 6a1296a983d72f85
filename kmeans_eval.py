"""k-means clustering of frozen features (paper Table 2), for any checkpoint.

    python kmeans_eval.py --pretrained_weights runs/demo/checkpoint.pth --dataset mnist5k --image_size 32
    python kmeans_eval.py --pretrained_weights random --arch resnet18 --dataset synthetic --image_size 32
    # the paper's ImageNet numbers: fit on SimCLR's 10 % image list, assign the 50,000 val images
    torchrun --nproc_per_node=8 kmeans_eval.py --pretrained_weights carp_r50.pth --dataset imagefolder \
        --data_path /imagenet --train_subset 10percent.txt --dump_features runs/carp_r50_features_10pc

(10percent.txt: google-research/simclr, imagenet_subsets/10percent.txt, 128,116 file names such as
n01440764_10026.JPEG, one per line; the README's *Evaluation* has the command that fetches it.)

Protocol (docs/protocols.md): teacher-backbone features of the train and val
splits (evaluation transform: short side resized bilinear, as the authors' Resize(256), then centre
crop), standardised with the train split's per-dimension mean and standard deviation, then spherical
k-means on the train split with k = number of classes (GTSRB: k = 100, the authors' run, not its 43
classes), 100 iterations and 10 restarts (the restart with the best objective is kept). Every val
image goes to its nearest centroid, and the val clusters are scored against the val labels: NMI,
adjusted mutual information (AMI), adjusted Rand index (ARI), the Fowlkes-Mallows score (FMS),
homogeneity, completeness and V-measure (the scores of the authors' script), and clustering accuracy
with the best one-to-one cluster-to-class matching (Hungarian algorithm), all x100.
On ImageNet the "train split" is a subset: the authors' kmeans_eval_imagenet.py (--label-subset,
default "10") replaces the train images by SimCLR's 10 % list (utils.imagenet_subset_samples) and
assigns the whole val split. --train_subset FILE does the same with a local copy of the list,
--train_fraction 0.1 draws a seeded 10 % of any dataset instead (not class-balanced, so not the
authors' images). The selection happens before feature extraction. Without either flag the whole
train split is fitted, and on an ImageNet-size split (FULL_IMAGENET_IMAGES) the script says that
this is not the paper's protocol and where the list comes from.
NOTE(authors' code): they run faiss.Kmeans(spherical=True, niter=100, nredo=10) on the
standardised features, which does not L2-normalise the points (a centroid is the normalised mean
of the raw standardised vectors, so long vectors weigh more; the assignment by inner product with
unit centroids is the same as by cosine), starts from random points rather than k-means++, trains
on at most 256 x k sampled points (256,000 for ImageNet: the 128,116 images of the 10 % list are
all used, as here), and splits a large cluster to refill an empty one. Here every point is
normalised, all train points are used, and empty clusters are re-seeded as explained in
update_centroids. Accuracy is not in their script; their FMS, homogeneity, completeness and
V-measure are sklearn's, as here.

Features are extracted by all processes of a torchrun launch; the clustering runs on the main
process, on the GPU when there is one.
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn import metrics

import cli
from cli import HelpFormatter
from data import DataError
from distributed import destroy, init_distributed, is_main_process
from durable import check_output_file
from features import add_eval_args, follow_checkpoint, frozen_features
from run_folder import write_json


# k where the authors' run does not use the number of classes: their GTSRB clustering asks for 100
# clusters of its 43 classes (the accuracy then counts the 57 unmatched clusters as wrong).
AUTHORS_CLUSTERS = {"gtsrb": 100}
# The scores, in the order of the table and the JSON (all x100).
METRICS = ("nmi", "ami", "ari", "fms", "homogeneity", "completeness", "v_measure", "acc")
# A train split at least this large, fitted whole, is taken for ImageNet's 1,281,167 images: the paper
# fits on SimCLR's 10 % list there, and the script says so (full_imagenet_note).
FULL_IMAGENET_IMAGES = 1_000_000


def get_args(argv=None):
    parser = argparse.ArgumentParser("Spherical k-means clustering of frozen features", formatter_class=HelpFormatter)
    add_eval_args(parser, resize_interpolation="bilinear")  # the authors' Resize(256): torchvision's bilinear
    g = parser.add_argument_group("k-means")
    g.add_argument("--n_clusters", type=int, default=None,
                   help="k; default: the number of classes of the train split (the paper), except where the "
                        "authors chose another k: " + ", ".join(f"{k} for --dataset {name}"
                                                                for name, k in AUTHORS_CLUSTERS.items()))
    g.add_argument("--n_iter", type=int, default=100,
                   help="maximum Lloyd iterations per restart (paper: 100); a restart stops earlier when no "
                        "assignment changes")
    g.add_argument("--n_init", type=int, default=10,
                   help="restarts from different k-means++ initialisations; the best objective is kept (paper: 10)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the k-means++ initialisations and the images drawn by --train_fraction")
    g.add_argument("--train_subset", default=None, metavar="FILE",
                   help="fit on these train images only: a text file with one image per line, a bare file name "
                        "(n01440764_10026.JPEG) or a path relative to the train folder "
                        "(n01440764/n01440764_10026.JPEG). "
                        "The paper's ImageNet numbers fit on SimCLR's imagenet_subsets/10percent.txt (the "
                        "authors' script downloads it). Needs a folder of image files (--dataset imagefolder); every "
                        "line must name one image of it. Default: the whole train split")
    g.add_argument("--train_fraction", type=float, default=None,
                   help="fit on a random fraction of the train split, e.g. 0.1: round(fraction x N) images drawn "
                        "without replacement by a generator seeded with --seed, the same in every process and "
                        "every run. Any dataset; not class-balanced, so not the authors' images (for those use "
                        "--train_subset). Default: the whole train split")
    g.add_argument("--output_json", default=None, help=f"write {{{', '.join(METRICS)}}} of the val split as a "
                                                       f"flat JSON object here")
    args = follow_checkpoint(parser.parse_args(argv))
    if args.n_clusters is None:
        args.n_clusters = AUTHORS_CLUSTERS.get(args.dataset)  # None: the number of classes, known once read
    if args.n_clusters is not None and args.n_clusters < 1:
        parser.error(f"--n_clusters {args.n_clusters} must be at least 1 (default: the number of classes)")
    if args.n_iter < 1:
        parser.error(f"--n_iter {args.n_iter} must be at least 1 (paper: 100)")
    if args.n_init < 1:
        parser.error(f"--n_init {args.n_init} must be at least 1 (paper: 10)")
    if args.train_subset is not None and args.train_fraction is not None:
        parser.error(f"--train_subset {args.train_subset} and --train_fraction {args.train_fraction} both select "
                     f"train images; pass one of them")
    if args.train_fraction is not None and not 0 < args.train_fraction <= 1:
        parser.error(f"--train_fraction {args.train_fraction} must be in (0, 1] (0.1 for a 10 % subset)")
    if args.train_subset is not None and not os.path.isfile(args.train_subset):
        parser.error(f"--train_subset {args.train_subset} does not exist; pass a text file with one train image "
                     f"per line (e.g. SimCLR's imagenet_subsets/10percent.txt)")
    selection = args.train_subset if args.train_subset is not None else args.train_fraction
    if selection is not None and args.load_features:
        parser.error(f"--load_features {args.load_features} reads the train features as they were dumped, so "
                     f"--train_{'subset' if args.train_subset else 'fraction'} {selection} cannot apply: dump them "
                     f"with the selection flag (the dump then holds only the selected images) and load them without")
    return args


# ============ selecting the train images to fit on ============

def subset_from_file(dataset, path):
    """Sorted indices of the images of `dataset`, a folder of image files (torchvision ImageFolder:
    `root` and `samples`), named by the lines of the text file `path`.

    A line is a bare file name, matched against the file names of the dataset's images (it must
    name exactly one), or a path relative to the train folder. Blank lines are skipped and a
    repeated line selects its image once. Any line that names no image is an error: a partial copy
    of ImageNet would otherwise fit on other images than the paper's without a word."""
    if not (hasattr(dataset, "samples") and hasattr(dataset, "root")):
        raise DataError(f"--train_subset {path} names image files, but this train split ({type(dataset).__name__}) "
                        f"is not a folder of image files; use --dataset imagefolder, or --train_fraction")
    by_path, by_name = {}, {}  # 'class/image.JPEG' -> index; 'image.JPEG' -> [indices]
    for index, (file, _) in enumerate(dataset.samples):
        relative = os.path.relpath(file, dataset.root).replace(os.sep, "/")
        by_path[relative] = index
        by_name.setdefault(relative.rsplit("/", 1)[-1], []).append(index)
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    selected, unmatched = set(), []
    for line in lines:
        key = os.path.normpath(line).replace(os.sep, "/")
        if "/" in key:
            matches = [by_path[key]] if key in by_path else []
        else:
            matches = by_name.get(key, [])
        if len(matches) > 1:
            examples = ", ".join(os.path.relpath(dataset.samples[i][0], dataset.root) for i in matches[:3])
            raise DataError(f"--train_subset {path}: {line!r} names {len(matches)} images of {dataset.root} "
                            f"({examples}); write it as a path relative to that folder")
        if not matches:
            unmatched.append(line)
        selected.update(matches)
    if unmatched:
        raise DataError(f"--train_subset {path}: {len(unmatched)} of {len(lines)} lines name no image of "
                        f"{dataset.root} ({len(dataset.samples)} images), e.g. {', '.join(unmatched[:3])}; check "
                        f"--data_path, or that the file lists this dataset's train images")
    return sorted(selected)


def random_fraction(n, fraction, seed):
    """Sorted indices of round(fraction x n) of n images drawn without replacement. The generator is a
    CPU torch.Generator seeded with `seed` and nothing else, so every process of a launch and every
    run draws the same images."""
    size = round(fraction * n)
    if size < 1:
        raise DataError(f"--train_fraction {fraction} of {n} train images selects no image; raise it to at "
                        f"least {1 / n:.3g}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    return order[:size].sort().values.tolist()


def full_imagenet_note(n_train, args):
    """The note printed when k-means is fitted on a whole ImageNet-size train split (n_train images,
    no --train_subset or --train_fraction), or None: the paper's ImageNet numbers fit on SimCLR's
    10 % list, so such a fit is another protocol (and ten times the features)."""
    if n_train < FULL_IMAGENET_IMAGES or args.train_subset is not None or args.train_fraction is not None:
        return None
    return (f"NOTE: k-means fitted on all {n_train} train images: NOT the paper's protocol, which fits on "
            f"SimCLR's 10 % image list (google-research/simclr, imagenet_subsets/10percent.txt, 128,116 images; "
            f"the README's *Evaluation* has the command that fetches it) and assigns every val image. Pass "
            f"--train_subset 10percent.txt for the paper's numbers")


def train_selection(args):
    """{'train': function(dataset) -> indices} for frozen_features, or None to use the whole train split."""
    if args.train_subset is not None:
        return {"train": lambda dataset: subset_from_file(dataset, args.train_subset)}
    if args.train_fraction is not None:
        return {"train": lambda dataset: random_fraction(len(dataset), args.train_fraction, args.seed)}
    return None


# ============ spherical k-means ============

def standardize(train_features, val_features, chunk_size=65536):
    """Both splits standardised with the train split's per-dimension mean and std, returned in
    float32, the population std as sklearn's StandardScaler in the authors' script. A dimension that
    is constant on the train split (std 0, e.g. a channel that is 0 after the last ReLU for every
    image) is only centred: dividing by 0 would give NaN or huge values.

    Memory: ImageNet's 1.28 M x 2048 float32 features are 10.5 GB; a float64 copy would be 21 GB,
    and (x - mean) / std in float64 several of them. So the statistics are float64 accumulators of
    shape (D,) filled chunk by chunk (float64 so the sums stay exact for millions of images; two
    passes, mean then squared deviations, so the variance does not cancel catastrophically), and
    each chunk is standardised in float64 and written to a float32 output: the largest float64
    tensor is one chunk (chunk_size, D)."""
    n, dim = train_features.shape
    total = torch.zeros(dim, dtype=torch.float64, device=train_features.device)  # (D,)
    for chunk in train_features.split(chunk_size):
        total += chunk.sum(dim=0, dtype=torch.float64)
    mean = total / n  # (D,)
    squares = torch.zeros_like(total)  # (D,)
    for chunk in train_features.split(chunk_size):
        squares += (chunk.double() - mean).square().sum(dim=0)  # over (c, D)
    std = (squares / n).sqrt()  # (D,)
    std = torch.where(std > 0, std, torch.ones_like(std))

    def apply(features):
        out = torch.empty(features.shape, dtype=torch.float32, device=features.device)  # (N, D)
        for rows, chunk in zip(out.split(chunk_size), features.split(chunk_size)):
            rows.copy_((chunk.double() - mean) / std)  # (c, D)
        return out

    return apply(train_features), apply(val_features)


def nearest_centroid(x, centroids, chunk_size=65536):
    """(similarity (N,), assignment (N,)): the highest cosine similarity of every unit row of x
    (N, D) to the unit centroids (k, D), and which centroid gives it. Chunked so memory stays
    O(chunk_size * k) for any N."""
    similarity, assignment = [], []
    for chunk in x.split(chunk_size):
        best = (chunk @ centroids.T).max(dim=1)  # over (c, k)
        similarity.append(best.values)
        assignment.append(best.indices)
    return torch.cat(similarity), torch.cat(assignment)


def kmeans_plus_plus(x, k, generator):
    """k initial centroids (k, D) drawn among the unit rows of x (N, D) by k-means++: each next one
    with probability proportional to its squared distance to the nearest centroid drawn so far,
    ||x - c||^2 = 2 - 2 cos, i.e. proportional to 1 - cos. The random numbers come from the CPU
    `generator` and the sampling runs on x's device (inverse CDF), so a seed gives the same draws
    on CPU and GPU."""
    n = len(x)
    first = torch.randint(n, (), generator=generator)
    centroids = [x[first]]  # k tensors (D,)
    closest = x @ x[first]  # (N,): cosine to the nearest centroid drawn so far
    for _ in range(1, k):
        weight = (1 - closest).clamp_min(0).double()  # (N,)
        # Every point already a centroid (fewer distinct points than k): draw uniformly.
        weight = torch.where(weight.sum() > 0, weight, torch.ones_like(weight))
        cdf = weight.cumsum(0)  # (N,)
        u = torch.rand((), generator=generator, dtype=torch.float64).to(x.device)
        index = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_max(n - 1)
        centroids.append(x[index])
        closest = torch.maximum(closest, x @ x[index])
    return torch.stack(centroids)  # (k, D)


def update_centroids(x, assignment, similarity, k):
    """Spherical k-means update: every centroid becomes the normalised mean of its points (k, D).

    An empty cluster would have no direction. It is re-seeded with the point farthest from its own
    centroid (the lowest similarity), the next empty one with the next-farthest point, and so on;
    that point joins it at the next assignment, which raises the objective, as re-seeding with a
    random point need not. NOTE: on the GPU, index_add_ adds in a nondeterministic order, so
    repeated runs can differ in the last bits there (exactly repeatable on the CPU).
    """
    sums = torch.zeros(k, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, assignment, x)  # (k, D)
    centroids = F.normalize(sums, dim=1)  # (k, D)
    empty = torch.bincount(assignment, minlength=k) == 0  # (k,)
    n_empty = int(empty.sum())
    if n_empty:
        farthest = similarity.topk(n_empty, largest=False).indices  # (n_empty,)
        centroids[empty] = x[farthest]
    return centroids


def spherical_kmeans(features, k, n_iter=100, n_init=10, generator=None):
    """Spherical k-means of features (N, D): (centroids (k, D), assignments (N,), objective).

    Rows are L2-normalised; a point belongs to the centroid of highest cosine similarity; a
    centroid is the normalised mean of its points. The objective, maximised, is the sum over points
    of the cosine similarity to their centroid. Each of the n_init restarts starts from a k-means++
    draw of `generator` (a seeded torch.Generator on the CPU) and runs at most n_iter iterations
    (centroid update, then assignment), stopping early when no assignment changes. The restart
    with the highest objective is returned, its assignments being those of its final centroids.
    """
    if not 1 <= k <= len(features):
        raise DataError(f"cannot make {k} clusters of {len(features)} points; use 1 <= --n_clusters <= {len(features)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    x = F.normalize(features.float(), dim=1)  # (N, D)
    best = None
    for _ in range(n_init):
        centroids = kmeans_plus_plus(x, k, generator)  # (k, D)
        similarity, assignment = nearest_centroid(x, centroids)  # (N,), (N,)
        for _ in range(n_iter):
            centroids = update_centroids(x, assignment, similarity, k)
            similarity, new_assignment = nearest_centroid(x, centroids)
            converged = torch.equal(new_assignment, assignment)
            assignment = new_assignment
            if converged:
                break
        objective = similarity.double().sum().item()
        if best is None or objective > best[2]:
            best = (centroids, assignment, objective)
    return best


# ============ scores ============

def as_numpy(labels):
    return labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)


def cluster_accuracy(pred, labels):
    """Clustering accuracy (%): the fraction of points whose cluster is matched to their class by
    the best one-to-one matching of clusters to classes (Hungarian algorithm on the
    cluster x class counts). With more clusters than classes the unmatched clusters count as
    wrong, with fewer the unmatched classes do: no two clusters may claim the same class."""
    _, pred = np.unique(as_numpy(pred), return_inverse=True)  # cluster ids -> 0..n_clusters-1
    _, labels = np.unique(as_numpy(labels), return_inverse=True)  # class ids -> 0..n_classes-1
    counts = np.zeros((pred.max() + 1, labels.max() + 1), dtype=np.int64)  # (clusters, classes)
    np.add.at(counts, (pred, labels), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return 100.0 * float(counts[rows, cols].sum()) / len(labels)


def clustering_metrics(pred, labels):
    """{nmi, ami, ari, fms, homogeneity, completeness, v_measure, acc} (x100) of cluster assignments
    `pred` against class `labels`. NMI and AMI use sklearn's default arithmetic normalisation, with
    which NMI equals the V-measure (the harmonic mean of homogeneity, each cluster holding one class,
    and completeness, each class in one cluster); AMI and ARI are 0 in expectation for a random
    clustering, NMI is not. FMS: the geometric mean of pair precision and pair recall."""
    pred, labels = as_numpy(pred), as_numpy(labels)
    homogeneity, completeness, v_measure = metrics.homogeneity_completeness_v_measure(labels, pred)
    scores = {"nmi": metrics.normalized_mutual_info_score(labels, pred),
              "ami": metrics.adjusted_mutual_info_score(labels, pred),
              "ari": metrics.adjusted_rand_score(labels, pred),
              "fms": metrics.fowlkes_mallows_score(labels, pred),
              "homogeneity": homogeneity, "completeness": completeness, "v_measure": v_measure}
    return {**{name: 100.0 * float(value) for name, value in scores.items()}, "acc": cluster_accuracy(pred, labels)}


def main(argv=None):
    args = get_args(argv)
    check_output_file(args.output_json)  # before any image is read
    rank, world_size, device = init_distributed()
    # ============ extracting features ... ============
    features = frozen_features(args, device, subsets=train_selection(args), main_only=True)  # clustered on rank 0
    results = None
    if is_main_process():
        # ============ standardising with the train split ... ============
        train_features, train_labels = features["train"]  # (N, D), (N,)
        val_features, val_labels = features["val"]  # (M, D), (M,)
        train_features, val_features = standardize(train_features.to(device), val_features.to(device))
        k = args.n_clusters or len(train_labels.unique())
        note = full_imagenet_note(len(train_labels), args)
        if note:  # before the long clustering, and again under the table
            print(note)

        # ============ clustering the train split ... ============
        generator = torch.Generator().manual_seed(args.seed)
        centroids, train_assignment, objective = spherical_kmeans(train_features, k, args.n_iter, args.n_init,
                                                                  generator)
        _, val_assignment = nearest_centroid(F.normalize(val_features, dim=1), centroids)  # (M,)

        # ============ scoring ... ============
        source = (f"the features in {args.load_features}" if args.load_features
                  else f"{args.pretrained_weights} on {args.dataset}")
        results = clustering_metrics(val_assignment, val_labels)
        train_results = clustering_metrics(train_assignment, train_labels)
        selection = (f" (the images listed in {args.train_subset})" if args.train_subset is not None else
                     f" (a random {args.train_fraction:g} of the split, seed {args.seed})"
                     if args.train_fraction is not None else "")
        chosen = f", the authors' k for {args.dataset}" if AUTHORS_CLUSTERS.get(args.dataset) == k else ""
        print(f"spherical k-means (k={k}{chosen}, best of {args.n_init} restarts, objective {objective:.1f} = "
              f"{objective / len(train_labels):.4f} mean cosine) of {source}: "
              f"fit on {len(train_labels)} train images{selection}, {len(val_labels)} val images assigned")
        print(f"{'metric':>12} {'val':>7} {'(train)':>8}")
        for name in METRICS:
            print(f"{name.upper():>12} {results[name]:>7.2f} {train_results[name]:>8.2f}")
        if note:
            print(note)
        if args.output_json:
            write_json(results, args.output_json)
    destroy()
    return results


if __name__ == "__main__":
    cli.run(main)
