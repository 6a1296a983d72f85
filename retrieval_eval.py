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

Protocols (../shared/docs/eval-protocols.md). Revisited Oxford / Paris: every database image and
query is thumbnailed so that its longer side is at most --imsize (512, aspect kept), the backbone's
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
import pickle
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from data import DataError, default_num_workers, load_image, to_normalized_tensor
from features import HelpFormatter, add_model_args, bool_flag, load_backbone, write_json

REVISITED = ("roxford5k", "rparis6k")
MULTISCALE = (1.0, 1 / math.sqrt(2), 0.5)  # DINO's and the revisitop/cirtorch scales
KAPPAS = (1, 5, 10)  # the k of mean precision at k
COPYDAYS_TOP_K = 20  # Copydays AP is computed on each query's top 20 (DINO and the authors)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


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
    g.add_argument("--imsize", type=int, default=None,
                   help="roxford5k / rparis6k: longer side of the thumbnails (aspect kept, never enlarged), "
                        "default 512: the authors' eval_scripts.sh passes --imsize 512 (their script's own "
                        "default, like DINO's, is 224). copydays: images are resized to imsize x imsize, default "
                        "320 (DINO and the authors)")
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
    g.add_argument("--num_workers", type=int, default=default_num_workers(cap=4),
                   help="data-loading processes (default: this machine's cores shared among the processes "
                        "torchrun starts on it, at most 4)")
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
    # Defaults that depend on --dataset: each protocol's own, as the authors ran it (see the --help texts).
    copydays = args.dataset == "copydays"
    if args.dataset in REVISITED and args.ap_top_k is not None:
        parser.error(f"--ap_top_k {args.ap_top_k} belongs to --dataset copydays; revisitop's AP ranks the whole "
                     f"database: drop the flag")
    if args.imsize is None:
        args.imsize = 320 if copydays else 512
    if args.multiscale is None:
        args.multiscale = not copydays
    if args.ap_top_k is None and copydays:
        args.ap_top_k = COPYDAYS_TOP_K
    if args.imsize < 1 or args.batch_size_per_gpu < 1 or args.num_workers < 0:
        parser.error(f"--imsize {args.imsize} and --batch_size_per_gpu {args.batch_size_per_gpu} must be >= 1 "
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

class ImageList(torch.utils.data.Dataset):
    """(image (3, H, W), index) for a list of files.

    imsize: with square=False the image is thumbnailed so that its longer side is at most imsize
    (aspect kept, never enlarged: revisitop / DINO); with square=True it is resized to imsize x imsize
    (the Copydays protocol). boxes: optional (x1, y1, x2, y2) per image, cropped before resizing,
    in the pixel coordinates of the original file (the revisitop query boxes).
    """

    def __init__(self, paths, imsize, square=False, boxes=None):
        self.paths, self.imsize, self.square, self.boxes = paths, imsize, square, boxes
        self.to_tensor = to_normalized_tensor()

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        image = load_image(self.paths[index])
        if self.boxes is not None:
            x1, y1, x2, y2 = (int(round(float(v))) for v in self.boxes[index])
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, image.width), min(y2, image.height)
            if x2 <= x1 or y2 <= y1:
                raise DataError(f"the query box {list(self.boxes[index])} of {self.paths[index]} is empty inside "
                                f"its {image.width}x{image.height} image; check the gnd file or drop --crop_query_bbox")
            image = image.crop((x1, y1, x2, y2))
        if self.square:
            image = image.resize((self.imsize, self.imsize), Image.Resampling.BICUBIC)
        else:
            image.thumbnail((self.imsize, self.imsize), Image.Resampling.LANCZOS)
        return image

    def __getitem__(self, index):
        return self.to_tensor(self.load(index)), index


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
def extract_features(backbone, dataset, batch_size=32, num_workers=4, device="cpu", scales=(1.0,),
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


def image_files(folder, flag):
    """Sorted image files under `folder` (sub-folders included)."""
    if not os.path.isdir(folder):
        raise DataError(f"{flag} {folder} is not a folder; pass a folder of .jpg / .png images")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise DataError(f"{flag} {folder} holds no .jpg / .png images")
    return paths


# ============ Revisited Oxford / Paris: the revisitop layout ============

class GroundTruthUnpickler(pickle.Unpickler):
    """Unpickler for the revisitop gnd files: plain lists, dicts, strings and numbers, and numpy arrays
    should the file hold some. Any other class is refused, since unpickling can run code."""

    allowed = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise DataError(f"the ground-truth file holds a {module}.{name} object; a revisitop gnd file holds "
                            f"only lists, dicts and numbers, so it is refused")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def read_revisited(data_path, name, crop_query_bbox=False):
    """(database paths, query paths, gnd, query boxes or None) of the revisitop layout
    <data_path>/<name>/gnd_<name>.pkl and <data_path>/<name>/jpg/<image>.jpg, checked."""
    gnd_path = os.path.join(data_path, name, f"gnd_{name}.pkl")
    if not os.path.isfile(gnd_path):
        raise DataError(f"ground-truth file {gnd_path} does not exist. --data_path should hold {name}/gnd_{name}.pkl "
                        f"and {name}/jpg/; revisitop's python/download.py (download_datasets) prepares them")
    with open(gnd_path, "rb") as f:
        try:
            cfg = GroundTruthUnpickler(f, encoding="latin1").load()  # latin1: pickles written by Python 2
        except (pickle.UnpicklingError, EOFError) as e:
            raise DataError(f"cannot read the ground-truth file {gnd_path}: {e}") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise DataError(f"{gnd_path} should be a dict with imlist, qimlist and gnd (revisitop layout); "
                        f"it has {sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__}")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise DataError(f"{gnd_path} has {len(qimlist)} queries in qimlist but {len(gnd)} gnd entries")
    needed = ("easy", "hard", "junk") + (("bbx",) if crop_query_bbox else ())
    for q, g in enumerate(gnd):
        missing = [key for key in needed if key not in g]
        if missing:
            raise DataError(f"gnd entry {q} (query {qimlist[q]}) of {gnd_path} has no {', '.join(missing)}")
        for key in ("easy", "hard", "junk"):
            bad = [i for i in np.asarray(g[key], dtype=np.int64).ravel() if not 0 <= i < len(imlist)]
            if bad:
                raise DataError(f"gnd entry {q} (query {qimlist[q]}) of {gnd_path}: {key} index {bad[0]} is outside "
                                f"the {len(imlist)} database images")
    folder = os.path.join(data_path, name, "jpg")
    database = [os.path.join(folder, f"{image}.jpg") for image in imlist]
    queries = [os.path.join(folder, f"{image}.jpg") for image in qimlist]
    missing = [p for p in database + queries if not os.path.isfile(p)]
    if missing:
        raise DataError(f"image {missing[0]} named in {gnd_path} does not exist ({len(missing)} missing in all); "
                        f"the images of {name} belong in {folder}/")
    gnd = [{key: np.asarray(g[key], dtype=np.int64).ravel() for key in ("easy", "hard", "junk")} for g in gnd]
    boxes = [list(g["bbx"]) for g in cfg["gnd"]] if crop_query_bbox else None
    return database, queries, gnd, boxes


def evaluate_revisited(args, device):
    # ============ reading the ground truth ... ============
    database, queries, gnd, boxes = read_revisited(args.data_path, args.dataset, args.crop_query_bbox)
    scales = MULTISCALE if args.multiscale else (1.0,)
    query_mode = ("cropped to their box (--crop_query_bbox true, the official revisitop protocol)"
                  if args.crop_query_bbox else "full images (--crop_query_bbox false, as DINO and the authors)")
    print(f"{args.dataset}: {len(queries)} queries, {len(database)} database images, longer side <= {args.imsize}, "
          f"{'scales 1, 1/sqrt(2), 1/2' if args.multiscale else 'single scale'}; queries: {query_mode}")

    # ============ extracting features ... ============
    backbone = frozen_backbone(args, device)
    extract = lambda dataset, desc: F.normalize(extract_features(  # noqa: E731
        backbone, dataset, args.batch_size_per_gpu, args.num_workers, device, scales, desc), dim=1)
    database_features = extract(ImageList(database, args.imsize), "database")  # (N, D)
    query_features = extract(ImageList(queries, args.imsize, boxes=boxes), "queries")  # (Q, D)

    # ============ ranking and scoring ... ============
    results = revisited_metrics(rank_database(query_features, database_features), gnd)
    fmt = lambda v: "    n/a" if v is None else f"{v:7.2f}"  # noqa: E731
    print(f"{'':8}{'mAP':>7}{'mP@1':>7}{'mP@5':>7}{'mP@10':>7}  skipped queries (no positive)")
    for protocol, suffix in (("medium", ""), ("hard", "_hard")):
        print(f"{protocol:8}{fmt(results[f'map_{protocol}'])}"
              + "".join(fmt(results[f"mp@{k}{suffix}"]) for k in KAPPAS) + f"  {results[f'skipped_{protocol}']}")
    results.update(crop_query_bbox=float(args.crop_query_bbox), imsize=args.imsize, multiscale=float(args.multiscale))
    return results


# ============ Copydays ============

JPEG_QUALITIES = (3, 5, 8, 10, 15, 20, 30, 50, 75)
CROP_PERCENTS = (10, 15, 20, 30, 40, 50, 60, 70, 80)


def copydays_blocks(root):
    """{block: sorted image paths} for the blocks found in the Copydays folder `root`: original,
    strong, then jpegqual/<quality> and crops/<percent> in numeric order. original/ and strong/
    are required; a missing standard jpegqual/crops block is reported."""
    blocks = {}
    for block in ("original", "strong"):
        folder = os.path.join(root, block)
        if not os.path.isdir(folder):
            raise DataError(f"Copydays folder {folder} does not exist; --data_path should hold original/, strong/, "
                            f"jpegqual/<quality>/ and crops/<percent>/ (the INRIA release)")
        blocks[block] = image_files(folder, "--data_path")
    for family, standard in (("jpegqual", JPEG_QUALITIES), ("crops", CROP_PERCENTS)):
        family_folder = os.path.join(root, family)
        found = sorted(os.listdir(family_folder), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s)) \
            if os.path.isdir(family_folder) else []
        for sub in found:
            if os.path.isdir(os.path.join(family_folder, sub)):
                blocks[f"{family}/{sub}"] = image_files(os.path.join(family_folder, sub), "--data_path")
        absent = [str(v) for v in standard if f"{family}/{v}" not in blocks]
        if absent:
            warnings.warn(f"Copydays blocks {family}/{{{','.join(absent)}}} not found in {root}: not evaluated")
    return blocks


def copydays_group(path):
    """The original an image derives from. Copydays images are named by 6-digit ids whose first 4
    digits are the original's: original/200000.jpg is edited into strong/200001.jpg, strong/200002.jpg,
    ...; jpegqual/*/ and crops/*/ reuse the original's own name. (DINO matches 'strong' queries by this
    prefix and the other blocks by sorted order, which is the same when names are the originals'.)"""
    stem = os.path.splitext(os.path.basename(path))[0]
    if len(stem) != 6 or not stem.isdigit():
        raise DataError(f"Copydays image {path} is not named by a 6-digit id such as 200000.jpg; "
                        f"the first 4 digits are needed to find its original")
    return stem[:4]


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
          f"{len(distractors)} distractors, {args.imsize}x{args.imsize} images, "
          f"{'scales 1, 1/sqrt(2), 1/2' if args.multiscale else 'single scale'}, "
          f"{f'PCA whitening learned on {len(whitening)} images' if whitening else 'no whitening'}, {ap_range}")

    # ============ extracting features ... ============
    backbone = frozen_backbone(args, device)
    extract = lambda paths, desc: extract_features(  # noqa: E731
        backbone, ImageList(paths, args.imsize, square=True), args.batch_size_per_gpu, args.num_workers, device,
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
    results.update(n_database=len(database_features), imsize=args.imsize, multiscale=float(args.multiscale),
                   whitening=float(bool(args.whitening_path)), ap_top_k=args.ap_top_k)
    return results


def frozen_backbone(args, device):
    """The backbone of --pretrained_weights in eval() mode on `device`; its features are never trained."""
    backbone = load_backbone(args.pretrained_weights, args.arch, args.small_image_stem, args.checkpoint_key,
                             args.model_format, image_size=args.imsize)
    return backbone.to(device).eval().requires_grad_(False)


def main(argv=None):
    args = get_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DataError("retrieval_eval.py runs in one process; launch it with python, not torchrun")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the data is read and checked before the (possibly large) checkpoint is loaded
    results = (evaluate_copydays if args.dataset == "copydays" else evaluate_revisited)(args, device)
    # ============ writing the results ... ============
    if args.output_json:
        write_json(results, args.output_json)
    return results


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
