"""The training curves of a pretraining run, as one PNG: see progress or collapse at a glance.

    python plot_log.py runs/demo                          # writes runs/demo/curves.png
    python plot_log.py runs/demo --output demo_curves.png

RUN_DIR is the --output_dir of pretrain.py: its log.jsonl (one JSON object a line) and, when
present, settings.json (K, N_B, dataset and arch for the labels). Panels: the loss and its two
terms; the teacher's k-NN top-1 against the random-init and raw-pixel baselines; prototypes used;
block entropy against its maximum log N_B; learning rate and gradient norm. Resumes are dotted lines.
Needs matplotlib (pip install matplotlib), imported only to draw: reading the log needs nothing.
"""
import argparse
import json
import math
import os

import cli

# The columns of the interval lines (one every --log_every optimizer steps), read against "step".
STEP_KEYS = ("loss", "consistency", "uniformity", "prototypes_used", "block_entropy", "lr", "grad_norm")
# Log keys of older runs: the uniformity term was logged as "entropy" (the authors' name) before.
OLD_KEYS = {"entropy": "uniformity"}


def get_args(argv=None):
    parser = argparse.ArgumentParser("Plot the training curves of a CARP pretraining run")
    parser.add_argument("run_dir", help="the --output_dir of pretrain.py, which holds log.jsonl (and settings.json)")
    parser.add_argument("--output", default=None,
                        help="the PNG to write; default RUN_DIR/curves.png, replaced atomically at each call")
    return parser.parse_args(argv)


class PlotError(cli.UserError):
    """Bad input: main() prints it as one line, without a traceback."""


def read_log(path):
    """log.jsonl as plain series: {key: [...]} for each of STEP_KEYS aligned with "step"; "knn_epoch"
    and "knn_top1" from the epoch summaries; "resume_step" and "resume_epoch" from the resume events;
    "knn_top1_init" and "knn_top1_pixels", the epoch -1 baseline (a number or None); "knn_off", why the
    monitor was off although asked for (None when it was not). Missing values
    (grad_norm null, or a key an older log lacks) are NaN. Unknown keys and kinds of line are ignored."""
    by_step, summaries, baseline = {}, {}, {}
    series = {"resume_step": [], "resume_epoch": [], "knn_off": None}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise PlotError(f"{path} line {number} is not valid JSON ({e}); fix or delete that line") from None
            if not isinstance(record, dict):
                raise PlotError(f"{path} line {number} is not a JSON object; fix or delete that line")
            record = {OLD_KEYS.get(key, key): value for key, value in record.items()}
            # A resumed run redoes the steps after its last checkpoint: the later line of a step (or of
            # an epoch) is the one the run continued from, so it replaces the earlier one.
            if record.get("event") == "resume":
                for key in ("step", "epoch"):
                    if record.get(key) is not None:
                        series[f"resume_{key}"].append(record[key])
            elif record.get("event") == "knn_off":
                series["knn_off"] = record.get("reason", "no labelled splits")
            elif "event" in record:
                continue  # "interrupted": the resume that follows is what shows on the curves
            elif record.get("epoch_summary"):
                summaries[record.get("epoch")] = record
            elif "step" in record:
                by_step[record["step"]] = record
            elif record.get("epoch") == -1:
                baseline = record  # a run restarted from scratch measures it again
    records = [by_step[step] for step in sorted(by_step)]
    series["step"] = [r["step"] for r in records]
    for key in STEP_KEYS:
        series[key] = [math.nan if r.get(key) is None else r[key] for r in records]
    knn = [(epoch, r["knn_top1"]) for epoch, r in sorted(summaries.items()) if r.get("knn_top1") is not None]
    series["knn_epoch"], series["knn_top1"] = [e for e, _ in knn], [k for _, k in knn]
    series["knn_top1_init"], series["knn_top1_pixels"] = baseline.get("knn_top1"), baseline.get("knn_top1_pixels")
    return series


def read_run_flags(run_dir):
    """The flags of the run from settings.json ({} without the file: older runs did not write it)."""
    path = os.path.join(run_dir, "settings.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f).get("args", {})
    except ValueError as e:
        raise PlotError(f"{path} is not valid JSON ({e}); delete it to plot without its labels") from None


def no_knn_reason(series):
    """Why a log has no k-NN curve: the monitor was off (--knn_every 0), or on but the data has no
    labelled splits (the run logged why)."""
    return f"the monitor was off: {series['knn_off']}" if series["knn_off"] else "--knn_every 0"


def summary_line(series, flags):
    """One line of the last values, for the terminal."""
    of_k = f" of {flags['out_dim']}" if "out_dim" in flags else ""
    knn = (f"k-NN top-1 {series['knn_top1'][-1]:.2f}% after epoch {series['knn_epoch'][-1]}" if series["knn_top1"]
           else f"k-NN top-1 not measured ({no_knn_reason(series)})")
    if series["knn_top1_init"] is not None:
        knn += f" (random init {series['knn_top1_init']:.2f}%)"
    return (f"last: step {series['step'][-1]}, loss {series['loss'][-1]:.4f}, {knn}, "
            f"prototypes used {series['prototypes_used'][-1]}{of_k}")


def draw(series, flags, title, path):
    """The five panels into the PNG `path`, written atomically (a reader never sees half a file)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plot_log.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display, so it runs over ssh and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplot_mosaic([["loss", "loss"], ["knn", "used"], ["block", "lr"]], figsize=(12, 11),
                                 layout="constrained")
    fig.suptitle(title)
    steps = series["step"]
    for key, label in (("loss", "loss = consistency + uniformity"), ("consistency", "consistency L_c"),
                       ("uniformity", "uniformity L_H, KL to uniform (0: every prototype of a block used equally)")):
        ax["loss"].plot(steps, series[key], label=label)
    ax["loss"].set(ylabel="nats", title="loss (collapse: consistency falls fast while uniformity climbs)")

    # The log's epochs count from 0: the k-NN of epoch e is measured after e + 1 epochs of training,
    # which puts the random init at 0 and a resume at the epoch number it logs.
    knn = ax["knn"]
    knn.plot([e + 1 for e in series["knn_epoch"]], series["knn_top1"], "o-", label="CARP teacher")
    for key, label, color in (("knn_top1_init", "random init", "C7"), ("knn_top1_pixels", "raw pixels", "C2")):
        if series[key] is not None:
            knn.axhline(series[key], color=color, linestyle="--", label=f"{label} {series[key]:.1f}%")
    if not series["knn_top1"] and series["knn_top1_init"] is None:
        knn.text(0.5, 0.5, f"no k-NN in this log:\n{no_knn_reason(series)}", ha="center", wrap=True,
                 transform=knn.transAxes)
    knn.set(xlabel="epochs trained", ylabel="k-NN top-1 (%)", title="k-NN accuracy of the teacher backbone",
            xlim=(0, None))
    knn.xaxis.get_major_locator().set_params(integer=True)

    K = flags.get("out_dim")
    ax["used"].plot(steps, series["prototypes_used"], label="since the start of the epoch")
    if K:
        ax["used"].axhline(K, color="C7", linestyle="--", label=f"K = {K}")
    ax["used"].set(ylabel="prototypes used" + (f" (of {K})" if K else ""), ylim=(0, None),
                   title="prototypes that were some view's argmax (collapse: a handful)")

    # block_entropy = log N_B - L_H in every line, so the log itself gives N_B when settings.json is absent.
    n_b = flags.get("partition_size")
    log_n_b = math.log(n_b) if n_b else series["block_entropy"][0] + series["uniformity"][0]
    ax["block"].plot(steps, series["block_entropy"], label="mean entropy of a block's batch marginal")
    ax["block"].axhline(log_n_b, color="C7", linestyle="--",
                        label=(f"log N_B = log {n_b}" if n_b else "log N_B") + f" = {log_n_b:.2f}: the maximum")
    # From 0: a healthy run is a line just under the maximum, a collapse a fall towards 0.
    ax["block"].set(ylabel="nats", title="block entropy (collapse: far below log N_B)", ylim=(0, 1.05 * log_n_b))

    ax["lr"].plot(steps, series["lr"], label="learning rate")
    ax["lr"].set(ylabel="learning rate", title="learning rate and gradient norm")
    twin = None
    # Only the measured norms: an interval whose steps all overflowed (fp16) logs null, and NaNs would cut the line.
    measured = [(s, g) for s, g in zip(steps, series["grad_norm"]) if math.isfinite(g)]
    if measured:
        twin = ax["lr"].twinx()  # spikes of the gradient norm span decades: a log scale of its own
        twin.plot(*zip(*measured), color="C3", label="grad_norm (right axis, log)")
        twin.set(yscale="log", ylabel="grad_norm")

    for name in ("loss", "knn", "used", "block", "lr"):
        positions = series["resume_epoch"] if name == "knn" else series["resume_step"]
        for i, x in enumerate(positions):
            ax[name].axvline(x, color="k", linestyle=":", label="resume" if i == 0 else None)
        if name != "knn":
            ax[name].set_xlabel("optimizer step")
        handles, labels = ax[name].get_legend_handles_labels()
        if name == "lr" and twin is not None:  # one legend for both axes
            twin_handles, twin_labels = twin.get_legend_handles_labels()
            handles, labels = handles + twin_handles, labels + twin_labels
        ax[name].legend(handles, labels, fontsize="small")

    tmp = path + ".tmp"
    try:
        fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    args = get_args(argv)
    run_dir = args.run_dir
    if not os.path.isdir(run_dir):
        raise PlotError(f"{run_dir} is not a folder; give the --output_dir of a pretrain.py run")
    log_path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log_path):
        raise PlotError(f"{log_path} not found; give the --output_dir of a pretrain.py run that has started")
    series = read_log(log_path)
    if not series["step"]:
        raise PlotError(f"{log_path} holds no training step yet; plot again after the first --log_every steps")
    flags = read_run_flags(run_dir)
    title = run_dir + (f": {flags.get('dataset')}, {flags.get('arch')}" if flags else "")
    output = args.output or os.path.join(run_dir, "curves.png")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    draw(series, flags, title, output)
    print(output)
    print(summary_line(series, flags))


if __name__ == "__main__":
    cli.run(main)
