"""Weighted k-NN classification on frozen features (the DINO protocol), for any checkpoint.

    python knn_eval.py --pretrained_weights runs/demo/checkpoint.pth --dataset mnist5k --image_size 32
    python knn_eval.py --pretrained_weights random --arch resnet18 --small_image_stem true --dataset synthetic --image_size 32
    torchrun --nproc_per_node=8 knn_eval.py --pretrained_weights carp_r50.pth --dataset imagefolder --data_path /imagenet

Protocol (docs/protocols.md): L2-normalised teacher-backbone features of the train split form
the memory bank; each test image takes its k most similar train images (cosine similarity s), each
votes for its own class with weight exp(s / T), and the classes are ranked by their summed votes
(knn.knn_classify, which pretrain.py's k-NN monitor uses too). Top-1 and top-5 for every k.
"""
import argparse

import cli
from cli import HelpFormatter
from distributed import destroy, init_distributed, is_main_process
from durable import check_output_file
from features import add_eval_args, follow_checkpoint, frozen_features
from knn import knn_classify
from run_folder import write_json


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
    check_output_file(args.output_json)  # before any image is read
    rank, world_size, device = init_distributed()
    # ============ extracting features ... ============
    features = frozen_features(args, device, main_only=True)  # the k-NN runs on rank 0 alone
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
    destroy()
    return results


if __name__ == "__main__":
    cli.run(main)
