"""Image retrieval (Revisited Oxford 5k / Paris 6k) and copy detection (Copydays) on frozen features.

    # the paper's settings, which are the defaults (the authors' evaluations/knn/eval_scripts.sh runs
    # --imsize 512 --multiscale 1): longer side at most 512 px, three scales, full query images
    python retrieval_eval.py --pretrained_weights carp_r50.pth --dataset roxford5k --data_path /data/datasets
    python retrieval_eval.py --pretrained_weights carp_r50.pth --dataset rparis6k --data_path /data/datasets
    # the official revisitop protocol instead: queries cropped to their bounding box
    python retrieval_eval.py --pretrained_weights carp_r50.pth --dataset roxford5k --data_path /data/datasets \
        --crop_query_bbox true
    # Copydays as the authors' eval_scripts.sh runs it: 320 x 320, one scale, AP over the top 20, and no
    # distractors or whitening (it passes neither path); 'strong' is the headline block
    python retrieval_eval.py --pretrained_weights carp_r50.pth --dataset copydays --data_path /data/copydays
    # Copydays as DINO's paper describes it: 10k distractors and 20k (other) whitening images from YFCC100M
    python retrieval_eval.py --pretrained_weights carp_r50.pth --dataset copydays --data_path /data/copydays \
        --distractors_path /data/yfcc_distractors --whitening_path /data/yfcc_whitening
    # the random-weights baseline every table needs
    python retrieval_eval.py --pretrained_weights random --dataset roxford5k --data_path /data/datasets

Protocols (docs/protocols.md). Revisited Oxford / Paris: every database image and
query is thumbnailed so that its longer side is at most --image_size (512, aspect kept), the backbone's
global-average-pooled features at the scales 1, 1/sqrt(2) and 1/2 are averaged and L2-normalised, and
the database is ranked by cosine similarity. mAP Medium counts easy + hard images as positives and
ignores junk; mAP Hard counts hard images and ignores easy + junk; ignored images are removed from
the ranking before AP and precision at k are computed, exactly as revisitop's compute_map.
Copydays: 320 x 320 images at one scale, the 157 originals (plus optional distractors) form the
database, every edited image is a query whose positive is its original, optional PCA whitening is
learned on a separate image set, each query's AP is computed on the first 20 images of its ranking
(DINO and the authors), and the mAP is reported per query block ('strong' is the headline; "block" is
Copydays' own word for a folder of queries, unrelated to CARP's blocks of prototypes).

Data. Revisited Oxford / Paris: the revisitop tools (github.com/filipradenovic/revisitop,
python/download.py: `download_datasets('/data')`) fetch the Oxford and Paris buildings images and the
ground-truth files gnd_roxford5k.pkl / gnd_rparis6k.pkl into /data/datasets/<name>/, which is the
--data_path to pass. Copydays: the INRIA release (lear.inrialpes.fr/~jegou/data.php#copydays),
unpacked so that --data_path holds original/, strong/, jpegqual/<quality>/ and crops/<percent>/.
DINO drew 10k distractors and 20k (other) whitening images from YFCC100M; any folders of images do.

Runs in one process (on the GPU when there is one); launching it with torchrun is refused, since
every process would redo the whole evaluation.
"""
import argparse
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from cli import HelpFormatter, bool_flag, renamed
from data import (DataError, ImageList, copydays_blocks, copydays_group, default_num_workers, image_files,
                  read_revisited)
from distributed import device_type
from durable import check_output_file
from features import add_model_args, backbone_from_args, follow_arch
from run_folder import checkpoint_args, write_json

REVISITED = ("roxford5k", "rparis6k")
MULTISCALE = (1.0, 1 / math.sqrt(2), 0.5)  # DINO's and the revisitop/cirtorch scales
KAPPAS = (1, 5, 10)  # the k of mean precision at k
COPYDAYS_TOP_K = 20  # Copydays AP is computed on each query's top 20 (DINO and the authors)


def get_args(argv=None):
    parser = argparse.ArgumentParser("Image retrieval (Revisited Oxford / Paris) and copy detection (Copydays)",
                                     formatter_class=HelpFormatter)
    add_model_args(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="roxford5k", choices=[*REVISITED, "copydays"],
                   help="roxford5k / rparis6k: --data_path holds <name>/gnd_<name>.pkl and <name>/jpg/ (the "
                        "revisitop layout); copydays: --data_path (or its copydays/ folder) holds original/, "
                        "strong/, jpegqual/*/, crops/*/")
    g.add_argument("--data_path", required=True, help="see --dataset")
    g.add_argument("--image_size", "--imsize", type=int, default=None,
                   help="roxford5k / rparis6k: longer side of the thumbnails (aspect kept, never enlarged), "
                        "default 512: the authors' eval_scripts.sh passes --imsize 512 (their script's own "
                        "default, like DINO's, is 224). copydays: images are resized to image_size x image_size, "
                        "default 320 (DINO and the authors)" + renamed("imsize"))
    g.add_argument("--multiscale", type=bool_flag, default=None,
                   help="true: run the image at scales 1, 1/sqrt(2) and 1/2 (bilinear), average the three raw "
                        "pooled features and L2-normalise the mean (DINO's and the authors' utils.multi_scale: "
                        "a plain mean, no power). Default true for roxford5k / rparis6k (the authors' "
                        "eval_scripts.sh: --multiscale 1), false for copydays (the authors' "
                        "eval_copy_detection.py extracts one scale). false: one scale, 1.75x faster (the smaller "
                        "scales hold 1/2 and 1/4 of the pixels)")
    g.add_argument("--crop_query_bbox", type=bool_flag, default=False,
                   help="roxford5k / rparis6k: crop each query to its ground-truth box (the official revisitop "
                        "protocol). Default false: the full query image, as DINO and the authors do; every "
                        "printed result says which one it used")
    g.add_argument("--batch_size_per_gpu", type=int, default=32,
                   help="images per forward pass; images of different sizes never share a batch")
    g.add_argument("--num_workers", type=int, default=None,
                   help="data-loading processes. Default: the cores this process may use, at most 4")
    g = parser.add_argument_group("copydays")
    g.add_argument("--distractors_path", default=None,
                   help="folder of distractor images added to the database of originals (DINO: 10k YFCC100M "
                        "images); none = the 157 originals alone, as the authors' eval_scripts.sh runs")
    g.add_argument("--whitening_path", default=None,
                   help="folder of images on which the PCA whitening (power 0.5) is learned (DINO: 20k YFCC100M "
                        "images, not the distractors); none = no whitening, as the authors' eval_scripts.sh runs")
    g.add_argument("--ap_top_k", type=int, default=None,
                   help="each query's AP is computed on the first ap_top_k images of its ranking, default 20 "
                        "(DINO's and the authors' eval_copy_detection.py keep similarity.topk(20)): an original "
                        "ranked lower adds nothing, yet the AP still divides by all of the query's originals. "
                        "0: the whole ranking (the textbook AP, never lower)")
    g = parser.add_argument_group("output")
    g.add_argument("--output_json", default=None,
                   help="write the metrics (in %%) as a flat JSON object here: map_medium, map_hard, mp@1, mp@5, "
                        "mp@10 (Medium) and mp@k_hard; map_<block> for copydays")
    args = parser.parse_args(argv)
    if args.num_workers is None:
        args.num_workers = default_num_workers(cap=4)
    # Defaults that depend on --dataset: each protocol's own, as the authors ran it (see the --help texts).
    copydays = args.dataset == "copydays"
    if args.dataset in REVISITED and args.ap_top_k is not None:
        parser.error(f"--ap_top_k {args.ap_top_k} belongs to --dataset copydays; revisitop's AP ranks the whole "
                     f"database: drop the flag")
    if args.image_size is None:
        args.image_size = 320 if copydays else 512
    if args.multiscale is None:
        args.multiscale = not copydays
    if args.ap_top_k is None and copydays:
        args.ap_top_k = COPYDAYS_TOP_K
    if args.image_size < 1 or args.batch_size_per_gpu < 1 or args.num_workers < 0:
        parser.error(f"--image_size {args.image_size} and --batch_size_per_gpu {args.batch_size_per_gpu} must be >= 1 "
                     f"and --num_workers {args.num_workers} >= 0")
    if copydays and args.ap_top_k < 0:
        parser.error(f"--ap_top_k {args.ap_top_k} must be >= 0: 20 as DINO and the authors, 0 for the whole ranking")
    if args.dataset in REVISITED and (args.distractors_path or args.whitening_path):
        parser.error("--distractors_path and --whitening_path belong to --dataset copydays")
    if args.dataset == "copydays" and args.crop_query_bbox:
        parser.error("--crop_query_bbox belongs to roxford5k / rparis6k; Copydays has no query boxes")
    return args


# ============ revisitop metrics ============

def positive_ranks(ranking, positives, ignored):
    """0-based positions of the positives in `ranking` (database indices, best first) once the ignored
    images are taken out of it: what revisitop's compute_map computes by shifting every positive's
    position back by the number of junk images ranked before it. An image listed both as positive
    and as ignored stays a positive."""
    is_positive = np.isin(ranking, positives)  # (N,)
    kept = ranking[is_positive | ~np.isin(ranking, ignored)]
    return np.flatnonzero(np.isin(kept, positives))


def average_precision(ranks, n_positives):
    """Area under the precision-recall curve by the trapezoidal rule (revisitop's compute_ap, and the
    score_ap_from_ranks_1 of the Copydays evaluation).

    ranks: sorted 0-based positions of the retrieved positives; n_positives: all positives of the
    query. Positive i (0-based) at position r adds a trapezoid of width 1 / n_positives between the
    precision just before it, i / r (1 when r = 0), and the precision just after it, (i + 1) / (r + 1).
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    i = np.arange(len(ranks))
    precision_0 = np.where(ranks > 0, i / np.maximum(ranks, 1), 1.0)
    precision_1 = (i + 1) / (ranks + 1)
    return float(((precision_0 + precision_1) / 2).sum() / n_positives)


def precision_at(ranks, kappas=KAPPAS):
    """revisitop's precision at k for each k of `kappas`, from the 0-based positions of the positives.

    With p the 1-based position of the last positive, the cut-off is min(k, p): precision at k is the
    fraction of positives among the first k results, except that a query whose positives are all within
    the first k is measured at its last positive instead, so that having fewer than k positives is not
    penalised. Positions [1, 2] give 1 at k = 5 (the textbook #positives-in-top-k / k would give 2/5).
    We keep revisitop's definition because published mP@k numbers come from its compute_map.
    """
    positions = np.asarray(ranks) + 1  # 1-based
    if len(positions) == 0:
        return np.zeros(len(kappas))
    cutoffs = [min(k, int(positions.max())) for k in kappas]
    return np.array([(positions <= c).sum() / c for c in cutoffs], dtype=np.float64)


def protocol_scores(ranks, positives, ignored, kappas=KAPPAS):
    """mAP, mean precision at each k, and the number of skipped queries for one protocol.

    ranks (Q, N): database indices ranked for each query, best first; positives[q] and ignored[q]:
    database indices. Queries with no positive have no AP; they are skipped (left out of the
    means) and counted. Means are None when every query was skipped.
    """
    aps, precisions, skipped = [], [], 0
    for q in range(len(ranks)):
        if len(positives[q]) == 0:
            skipped += 1
            continue
        found = positive_ranks(ranks[q], positives[q], ignored[q])
        aps.append(average_precision(found, len(positives[q])))
        precisions.append(precision_at(found, kappas))
    if not aps:
        return None, None, skipped
    return float(np.mean(aps)), np.mean(precisions, axis=0), skipped


def revisited_metrics(ranks, gnd, kappas=KAPPAS):
    """Medium and Hard mAP and mP@k (in %) of `ranks` (Q, N) against the revisitop ground truth.

    Medium: positives easy + hard, junk ignored. Hard: positives hard, easy + junk ignored.
    Keys: map_medium, map_hard, mp@k (Medium), mp@k_hard, skipped_medium, skipped_hard.
    """
    protocols = {
        "medium": ([np.concatenate([g["easy"], g["hard"]]) for g in gnd], [np.asarray(g["junk"]) for g in gnd]),
        "hard": ([np.asarray(g["hard"]) for g in gnd], [np.concatenate([g["easy"], g["junk"]]) for g in gnd]),
    }
    results = {}
    for protocol, (positives, ignored) in protocols.items():
        mean_ap, mean_precision, skipped = protocol_scores(ranks, positives, ignored, kappas)
        suffix = "" if protocol == "medium" else "_hard"
        results[f"map_{protocol}"] = None if mean_ap is None else 100 * mean_ap
        for j, k in enumerate(kappas):
            results[f"mp@{k}{suffix}"] = None if mean_precision is None else 100 * float(mean_precision[j])
        results[f"skipped_{protocol}"] = skipped
    return results


def rank_database(query_features, database_features):
    """(Q, N) database indices sorted by decreasing cosine similarity; features are L2-normalised.
    The sort is stable: equal similarities keep database order, so rankings are reproducible."""
    similarity = query_features @ database_features.T  # (Q, N)
    return torch.sort(similarity, dim=1, descending=True, stable=True).indices.numpy()


# ============ images and features ============

def multiscale_features(backbone, images, scales=(1.0,)):
    """Pooled features (B, D) averaged over `scales`: the image batch is resized by each factor
    (bilinear, as DINO and cirtorch) and the backbone's global average pooling accepts any size.

    The raw features are averaged (no power, no per-scale normalisation) and the caller L2-normalises
    the mean: DINO's and the authors' utils.multi_scale, whose own division by 3 and by the norm
    cannot change a cosine ranking.
    NOTE(authors' code): multi_scale divides by the norm of the whole batch, which is the per-image
    norm only because their retrieval script runs one image per batch; we normalise each image.
    """
    total = 0
    for s in scales:
        resized = images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        total = total + backbone(resized).float()  # (B, D)
    return total / len(scales)


@torch.no_grad()
def extract_multiscale_features(backbone, dataset, batch_size=32, num_workers=4, device="cpu", scales=(1.0,),
                     desc="features", progress=True):
    """Raw features (N, D) of every image of `dataset`, in dataset order, on the CPU.

    Images keep their own size, so a batch can only hold images of one size: each loaded image
    waits in the bucket of its (H, W) until the bucket holds batch_size images. Buckets that never
    fill (rare sizes) run at the end, the fullest first whenever more than 4 batches' worth of images
    are waiting, which bounds memory. Images of a rare size thus run alone, as DINO runs every image.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=str(device).startswith("cuda"))
    was_training = backbone.training
    backbone.eval()  # BatchNorm running statistics, never batch statistics
    features = [None] * len(dataset)
    buckets = {}  # (H, W) -> [(index, image (3, H, W)), ...]

    def run(bucket):
        indices, images = zip(*bucket)
        feats = multiscale_features(backbone, torch.stack(images).to(device, non_blocking=True), scales)  # (b, D)
        for index, feat in zip(indices, feats.cpu()):
            features[index] = feat

    for image, index in tqdm(loader, desc=desc, total=len(dataset), disable=not progress, leave=False):
        size = tuple(image.shape[-2:])
        buckets.setdefault(size, []).append((index, image))
        if len(buckets[size]) == batch_size:
            run(buckets.pop(size))
        elif sum(len(b) for b in buckets.values()) > 4 * batch_size:
            run(buckets.pop(max(buckets, key=lambda s: len(buckets[s]))))
    for bucket in buckets.values():
        run(bucket)
    backbone.train(was_training)
    return torch.stack(features)  # (N, D)


def evaluate_revisited(args, device):
    # ============ reading the ground truth ... ============
    database, queries, gnd, boxes = read_revisited(args.data_path, args.dataset, args.crop_query_bbox)
    scales = MULTISCALE if args.multiscale else (1.0,)
    query_mode = ("cropped to their box (--crop_query_bbox true, the official revisitop protocol)"
                  if args.crop_query_bbox else "full images (--crop_query_bbox false, as DINO and the authors)")
    print(f"{args.dataset}: {len(queries)} queries, {len(database)} database images, longer side <= {args.image_size}, "
          f"{'scales 1, 1/sqrt(2), 1/2' if args.multiscale else 'single scale'}; queries: {query_mode}")

    # ============ extracting features ... ============
    backbone = frozen_backbone(args, device)
    extract = lambda dataset, desc: F.normalize(extract_multiscale_features(  # noqa: E731
        backbone, dataset, args.batch_size_per_gpu, args.num_workers, device, scales, desc), dim=1)
    database_features = extract(ImageList(database, args.image_size), "database")  # (N, D)
    query_features = extract(ImageList(queries, args.image_size, boxes=boxes), "queries")  # (Q, D)

    # ============ ranking and scoring ... ============
    results = revisited_metrics(rank_database(query_features, database_features), gnd)
    fmt = lambda v: "    n/a" if v is None else f"{v:7.2f}"  # noqa: E731
    print(f"{'':8}{'mAP':>7}{'mP@1':>7}{'mP@5':>7}{'mP@10':>7}  skipped queries (no positive)")
    for protocol, suffix in (("medium", ""), ("hard", "_hard")):
        print(f"{protocol:8}{fmt(results[f'map_{protocol}'])}"
              + "".join(fmt(results[f"mp@{k}{suffix}"]) for k in KAPPAS) + f"  {results[f'skipped_{protocol}']}")
    results.update(crop_query_bbox=float(args.crop_query_bbox), image_size=args.image_size, multiscale=float(args.multiscale))
    return results


# ============ Copydays ============

def fit_whitening(features, power=0.5, eps=1e-5):
    """PCA whitening (mean (D,), projection (D, D)) learned on `features` (n, D).

    x -> (x - mean) @ V / eigenvalue ** power, with V the eigenvectors of the covariance of the
    features, strongest first; power 0.5 gives unit variance in every direction (full whitening).
    Eigenvalues below eps x the largest are raised to it: with fewer images than dimensions the
    covariance is singular, and dividing by ~0 would blow noise up.
    NOTE(authors' code): their eval_copy_detection.py, DINO's unchanged, takes the eigenvectors of the
    uncentred second moment features.T @ features / n while centring the data by the mean; we use the
    covariance, which is what PCA whitening means. The Copydays run their eval_scripts.sh records
    whitens nothing: it passes no --whitening_path and the default is the placeholder /path/to/....
    """
    features = features.double()
    mean = features.mean(dim=0)  # (D,)
    centred = features - mean  # (n, D)
    covariance = centred.T @ centred / len(features)  # (D, D)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # strongest first
    eigenvalues = eigenvalues.clamp(min=eps * eigenvalues[0].clamp(min=1e-12).item())
    return mean.float(), (eigenvectors / eigenvalues ** power).float()  # (D,), (D, D)


def copydays_scores(query_features, query_groups, database_features, original_groups, top_k=COPYDAYS_TOP_K,
                    chunk_size=256):
    """AP (in %) of each query: the rank of its original(s) among the database (originals first,
    then distractors; a distractor is never a positive), with the trapezoidal AP. Features are
    L2-normalised.

    top_k: the AP is computed on the first top_k images of each ranking, as DINO's and the authors'
    eval_copy_detection.py do (similarity.topk(20), then score_ap_from_ranks_1 with nres = all the
    query's positives): an original ranked below top_k adds nothing, and the AP is still divided by
    the number of the query's originals. top_k 0 (or None): the whole ranking.
    """
    positives = [np.flatnonzero(np.asarray(original_groups) == group) for group in query_groups]
    aps = []
    for start in range(0, len(query_features), chunk_size):
        ranks = rank_database(query_features[start:start + chunk_size], database_features)  # (c, N)
        if top_k:
            ranks = ranks[:, :top_k]  # (c, top_k)
        for q, ranking in enumerate(ranks, start):
            found = positive_ranks(ranking, positives[q], [])
            aps.append(100 * average_precision(found, len(positives[q])))
    return np.array(aps)


def evaluate_copydays(args, device):
    # ============ reading the blocks ... ============
    root = args.data_path
    if not os.path.isdir(os.path.join(root, "original")) and os.path.isdir(os.path.join(root, "copydays", "original")):
        root = os.path.join(root, "copydays")
    blocks = copydays_blocks(root)
    original_groups = [copydays_group(p) for p in blocks["original"]]
    block_groups = {}
    for block, paths in blocks.items():
        block_groups[block] = [copydays_group(p) for p in paths]
        for path, group in zip(paths, block_groups[block]):
            if group not in original_groups:
                raise DataError(f"Copydays query {path} has no original: no original/{group}xx.jpg in {root}")
    distractors = image_files(args.distractors_path, "--distractors_path") if args.distractors_path else []
    whitening = image_files(args.whitening_path, "--whitening_path") if args.whitening_path else []
    scales = MULTISCALE if args.multiscale else (1.0,)
    ap_range = f"AP over the top {args.ap_top_k}" if args.ap_top_k else "AP over the whole ranking (--ap_top_k 0)"
    print(f"copydays: {len(blocks)} query blocks, database of {len(blocks['original'])} originals + "
          f"{len(distractors)} distractors, {args.image_size}x{args.image_size} images, "
          f"{'scales 1, 1/sqrt(2), 1/2' if args.multiscale else 'single scale'}, "
          f"{f'PCA whitening learned on {len(whitening)} images' if whitening else 'no whitening'}, {ap_range}")

    # ============ extracting features ... ============
    backbone = frozen_backbone(args, device)
    extract = lambda paths, desc: extract_multiscale_features(  # noqa: E731
        backbone, ImageList(paths, args.image_size, square=True), args.batch_size_per_gpu, args.num_workers, device,
        scales, desc)
    features = {block: extract(paths, block) for block, paths in blocks.items()}  # raw (n, D) each
    database_features = torch.cat([features["original"]] + ([extract(distractors, "distractors")] if distractors
                                                             else []))  # (N, D)

    # ============ whitening ... ============
    if whitening:
        whitening_features = extract(whitening, "whitening")  # (n, D)
        if len(whitening_features) <= whitening_features.shape[1]:
            warnings.warn(f"whitening learned on {len(whitening_features)} images for {whitening_features.shape[1]}-d "
                          f"features: the covariance is singular and its weakest directions are clamped")
        mean, projection = fit_whitening(whitening_features)
        database_features = (database_features - mean) @ projection  # (N, D)
        features = {block: (f - mean) @ projection for block, f in features.items()}
    database_features = F.normalize(database_features, dim=1)

    # ============ copy detection ... ============
    results = {}
    for block, block_features in features.items():
        aps = copydays_scores(F.normalize(block_features, dim=1), block_groups[block], database_features,
                              original_groups, args.ap_top_k)
        results[f"map_{block.replace('/', '_')}"] = float(aps.mean())
        print(f"{block:12} {len(aps):5} queries  mAP {aps.mean():6.2f}")
    print(f"strong (headline): mAP {results['map_strong']:.2f}")
    results.update(n_database=len(database_features), image_size=args.image_size, multiscale=float(args.multiscale),
                   whitening=float(bool(args.whitening_path)), ap_top_k=args.ap_top_k)
    return results


def frozen_backbone(args, device):
    """The backbone of --pretrained_weights in eval() mode on `device`; its features are never trained."""
    follow_arch(args, checkpoint_args(args.pretrained_weights))  # read now: the data is checked first
    backbone = backbone_from_args(args)
    return backbone.to(device).eval().requires_grad_(False)


def main(argv=None):
    args = get_args(argv)
    check_output_file(args.output_json)  # before any image is read
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DataError("retrieval_eval.py runs in one process; launch it with python, not torchrun")
    device = torch.device(device_type())  # CUDA where a GPU is visible, or as CARP_DEVICE says
    # the data is read and checked before the (possibly large) checkpoint is loaded
    results = (evaluate_copydays if args.dataset == "copydays" else evaluate_revisited)(args, device)
    # ============ writing the results ... ============
    if args.output_json:
        write_json(results, args.output_json)
    return results


if __name__ == "__main__":
    cli.run(main)
