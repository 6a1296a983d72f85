"""The training curves of a pretraining run, as one PNG: see progress or collapse at a glance.

    python plot_log.py runs/demo                          # writes runs/demo/curves.png
    python plot_log.py runs/demo --output demo_curves.png
    python plot_log.py runs/ablations/mnist5k/*_seed0     # several runs on one figure: compare.png in their folder
    python plot_log.py runs/longer/* --knn_x minutes      # k-NN against minutes of training instead of epochs

RUN_DIR is the --output_dir of pretrain.py: its log.jsonl (one JSON object a line) and, when
present, settings.json (K, N_B, dataset and arch for the labels). Panels: the loss and its two
terms; the teacher's k-NN top-1 against the random-init and raw-pixel baselines; prototypes used;
block entropy against its maximum log N_B; learning rate and gradient norm. Resumes are dotted lines.
Several RUN_DIRs: one curve per run on four panels (k-NN, consistency, block entropy and prototypes
used as fractions of their maxima, so runs with other K or N_B compare), each run labelled with its
folder's name and the flags in which it differs from most of the others.
Needs matplotlib (pip install matplotlib), imported only to draw: reading the log needs nothing.
"""
import argparse
import datetime
import json
import math
import os

import cli
from durable import durable_write
from loss import COLLAPSE_THRESHOLD
from run_folder import current_names

# The columns of the interval lines (one every --log_every optimizer steps), read against "step".
STEP_KEYS = ("loss", "consistency", "uniformity", "prototypes_used", "block_entropy", "lr", "grad_norm")
# Log keys of older runs: the uniformity term was logged as "entropy" (the authors' name) before.
OLD_KEYS = {"entropy": "uniformity"}


def get_args(argv=None):
    parser = argparse.ArgumentParser("Plot the training curves of a CARP pretraining run, or compare several")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="the --output_dir of pretrain.py, which holds log.jsonl (and settings.json); several "
                             "to draw them on one figure")
    parser.add_argument("--output", default=None,
                        help="the PNG to write, replaced atomically at each call; default RUN_DIR/curves.png, or for "
                             "several runs compare.png in the folder that holds them all")
    parser.add_argument("--knn_x", default="epochs", choices=("epochs", "minutes"),
                        help="the x axis of the k-NN panel: epochs trained, or minutes of wall-clock time since the "
                             "random init's k-NN, when training starts (k-NN measurements and a resumed run's pause "
                             "included): to compare runs of other lengths or speeds by what they cost")
    return parser.parse_args(argv)


class PlotError(cli.UserError):
    """Bad input: main() prints it as one line, without a traceback."""


def read_log(path):
    """log.jsonl as plain series: {key: [...]} for each of STEP_KEYS aligned with "step"; "knn_epoch"
    and "knn_top1" from the epoch summaries, "knn_minutes" the minutes from the baseline's line to each
    summary (NaN where a line has no time); "resume_step" and "resume_epoch" from the resume events;
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
    knn = [(epoch, r) for epoch, r in sorted(summaries.items()) if r.get("knn_top1") is not None]
    series["knn_epoch"], series["knn_top1"] = [e for e, _ in knn], [r["knn_top1"] for _, r in knn]
    start = read_time(baseline, path)
    series["knn_minutes"] = [(read_time(r, path) - start) / 60 for _, r in knn]
    series["knn_top1_init"], series["knn_top1_pixels"] = baseline.get("knn_top1"), baseline.get("knn_top1_pixels")
    return series


def read_time(record, path):
    """The "time" of a line of the log `path` in seconds since 1970, NaN without one."""
    if not record.get("time"):
        return math.nan
    try:
        return datetime.datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (TypeError, ValueError):
        raise PlotError(f"{path}: the time {record['time']!r} of the line of epoch {record.get('epoch')} is not "
                        f"YYYY-MM-DDTHH:MM:SS+ZZZZ, as pretrain.py writes it; fix or delete that line") from None


def knn_x(series, x):
    """The x of each k-NN measurement: "epochs" trained (the log's epochs count from 0, so the k-NN of
    epoch e is measured after e + 1 epochs of training, which puts the random init at 0 and a resume
    at the epoch number it logs), or "minutes" since training started."""
    return [e + 1 for e in series["knn_epoch"]] if x == "epochs" else series["knn_minutes"]


KNN_X_LABELS = {"epochs": "epochs trained", "minutes": "minutes of training (k-NN measurements included)"}


def read_run_flags(run_dir):
    """The flags of the run from settings.json ({} without the file: older runs did not write it)."""
    path = os.path.join(run_dir, "settings.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return current_names(json.load(f).get("args", {}))
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


def pyplot():
    """matplotlib.pyplot for files only (no display, so it runs over ssh and in CI), imported here so
    that reading a log needs no matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plot_log.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(plt, fig, path, dpi):
    """Write `fig` to the PNG `path` through durable_write (a reader never sees half a file; a write
    that fails leaves the previous figure and one line) and close it."""
    try:
        durable_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def max_block_entropy(series, flags):
    """log N_B, the block entropy of a block used uniformly. block_entropy = log N_B - L_H in every
    line, so the log itself gives it when settings.json is absent."""
    n_b = flags.get("block_size")
    return math.log(n_b) if n_b else series["block_entropy"][0] + series["uniformity"][0]


def draw(series, flags, title, path, x="epochs"):
    """The five panels into the PNG `path`, written atomically; `x`: the k-NN panel's axis (knn_x)."""
    plt = pyplot()

    fig, ax = plt.subplot_mosaic([["loss", "loss"], ["knn", "used"], ["block", "lr"]], figsize=(12, 11),
                                 layout="constrained")
    fig.suptitle(title)
    steps = series["step"]
    for key, label in (("loss", "loss = consistency + uniformity"), ("consistency", "consistency L_c"),
                       ("uniformity", "uniformity L_H, KL to uniform (0: every prototype of a block used equally)")):
        ax["loss"].plot(steps, series[key], label=label)
    ax["loss"].set(ylabel="nats", title="loss (collapse: consistency falls fast while uniformity climbs)")

    knn = ax["knn"]
    knn.plot(knn_x(series, x), series["knn_top1"], "o-", label="CARP teacher")
    for key, label, color in (("knn_top1_init", "random init", "C7"), ("knn_top1_pixels", "raw pixels", "C2")):
        if series[key] is not None:
            knn.axhline(series[key], color=color, linestyle="--", label=f"{label} {series[key]:.1f}%")
    if not series["knn_top1"] and series["knn_top1_init"] is None:
        knn.text(0.5, 0.5, f"no k-NN in this log:\n{no_knn_reason(series)}", ha="center", wrap=True,
                 transform=knn.transAxes)
    knn.set(xlabel=KNN_X_LABELS[x], ylabel="k-NN top-1 (%)", title="k-NN accuracy of the teacher backbone",
            xlim=(0, None))
    if x == "epochs":
        knn.xaxis.get_major_locator().set_params(integer=True)

    K = flags.get("out_dim")
    ax["used"].plot(steps, series["prototypes_used"], label="over each log line's steps")
    if K:
        ax["used"].axhline(K, color="C7", linestyle="--", label=f"K = {K}")
    ax["used"].set(ylabel="prototypes used" + (f" (of {K})" if K else ""), ylim=(0, None),
                   title="prototypes that were some view's argmax (collapse: a handful)")

    n_b = flags.get("block_size")
    log_n_b = max_block_entropy(series, flags)
    ax["block"].plot(steps, series["block_entropy"], label="mean entropy of a block's batch marginal")
    ax["block"].axhline(log_n_b, color="C7", linestyle="--",
                        label=(f"log N_B = log {n_b}" if n_b else "log N_B") + f" = {log_n_b:.2f}: the maximum")
    ax["block"].axhline(COLLAPSE_THRESHOLD * log_n_b, color="C3", linestyle="-.",
                        label=f"{COLLAPSE_THRESHOLD} log N_B: below it the run warns of a collapse")
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
        positions = (series["resume_epoch"] if x == "epochs" else []) if name == "knn" else series["resume_step"]
        for i, position in enumerate(positions):
            ax[name].axvline(position, color="k", linestyle=":", label="resume" if i == 0 else None)
        if name != "knn":
            ax[name].set_xlabel("optimizer step")
        handles, labels = ax[name].get_legend_handles_labels()
        if name == "lr" and twin is not None:  # one legend for both axes
            twin_handles, twin_labels = twin.get_legend_handles_labels()
            handles, labels = handles + twin_handles, labels + twin_labels
        ax[name].legend(handles, labels, fontsize="small")

    save_png(plt, fig, path, dpi=100)


# ============ several runs on one figure ============

# Flags that never tell runs apart in a legend: where the run wrote, and how it was run.
NOT_IN_LABELS = ("output_dir", "num_workers", "log_every", "knn_every", "saveckp_freq", "checkpoint_every_steps")


def run_labels(run_dirs, flags_of_runs):
    """A legend entry per run: the folder's name, then the flags in which the run differs from the value
    most of the runs share, e.g. "block_8_seed0: --block_size 8" (one run of many with 64)."""
    def value(flags, key):
        return json.dumps(flags.get(key))  # lists and None compare and count as text
    keys = sorted({key for flags in flags_of_runs for key in flags} - set(NOT_IN_LABELS))
    common = {}
    for key in keys:
        values = [value(flags, key) for flags in flags_of_runs]
        common[key] = max(values, key=values.count)  # the first of the most frequent values
    def as_typed(v):  # as a command line writes it: true, 0, 0.4 1
        if isinstance(v, list):
            return " ".join(as_typed(x) for x in v)
        return str(v).lower() if isinstance(v, bool) else format(v, "g") if isinstance(v, float) else str(v)
    labels = []
    for run_dir, flags in zip(run_dirs, flags_of_runs):
        own = [f"--{key} {as_typed(flags[key])}" for key in keys if key in flags and value(flags, key) != common[key]]
        labels.append(os.path.basename(os.path.normpath(run_dir)) + (": " + " ".join(own) if own else ""))
    return labels


def fractions(series, flags):
    """Block entropy / log N_B and prototypes used / K: how far each is from its maximum, comparable
    across runs with other N_B and K (the raw numbers when K is unknown)."""
    log_n_b = max_block_entropy(series, flags)
    entropy = [e / log_n_b if log_n_b > 0 else math.nan for e in series["block_entropy"]]
    K = flags.get("out_dim")
    used = [u / K for u in series["prototypes_used"]] if K else series["prototypes_used"]
    return entropy, used


def draw_runs(runs, path, x="epochs"):
    """One curve per (label, series, flags) on four panels, into the PNG `path`, written atomically;
    `x`: the k-NN panel's axis (knn_x)."""
    plt = pyplot()

    fig, ax = plt.subplot_mosaic([["knn", "consistency"], ["block", "used"]], figsize=(12, 9 + 0.2 * len(runs)),
                                 layout="constrained")
    pixels = set()
    for i, (label, series, flags) in enumerate(runs):
        style = dict(color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3], label=label)
        # The k-NN curve starts at the random init (0 epochs or minutes trained) when the run measured it.
        xs, knn = list(knn_x(series, x)), list(series["knn_top1"])
        if series["knn_top1_init"] is not None:
            xs, knn = [0] + xs, [series["knn_top1_init"]] + knn
        if series["knn_top1_pixels"] is not None:
            pixels.add(round(series["knn_top1_pixels"], 2))
        ax["knn"].plot(xs, knn, marker="o", markersize=3, **style)
        ax["consistency"].plot(series["step"], series["consistency"], **style)
        entropy, used = fractions(series, flags)
        ax["block"].plot(series["step"], entropy, **style)
        ax["used"].plot(series["step"], used, **style)
    for value in sorted(pixels):
        ax["knn"].axhline(value, color="k", linestyle="-.", linewidth=0.8, label=f"raw pixels {value:.1f}%")
    ax["knn"].set(xlabel=KNN_X_LABELS[x], ylabel="k-NN top-1 (%)",
                  title="k-NN of the teacher backbone (0: random init)")
    ax["consistency"].set(xlabel="optimizer step", ylabel="nats", title="consistency L_c")
    ax["block"].axhline(COLLAPSE_THRESHOLD, color="C3", linestyle="-.", linewidth=0.8)
    ax["block"].set(xlabel="optimizer step", ylabel="block entropy / log N_B", ylim=(0, 1.02),
                    title=f"block entropy, a fraction of its maximum (collapse: below {COLLAPSE_THRESHOLD})")
    known_k = all(flags.get("out_dim") for _, _, flags in runs)
    ax["used"].set(xlabel="optimizer step", ylabel="prototypes used / K" if known_k else "prototypes used",
                   ylim=(0, 1.02 if known_k else None), title="prototypes that were some view's argmax (each log line's steps)")
    handles, labels = ax["knn"].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize="small")
    save_png(plt, fig, path, dpi=80)


def read_run(run_dir):
    """(series, flags) of one run folder, or a PlotError saying what is missing."""
    if not os.path.isdir(run_dir):
        raise PlotError(f"{run_dir} is not a folder; give the --output_dir of a pretrain.py run")
    log_path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log_path):
        raise PlotError(f"{log_path} not found; give the --output_dir of a pretrain.py run that has started")
    series = read_log(log_path)
    if not series["step"]:
        raise PlotError(f"{log_path} holds no training step yet; plot again after the first --log_every steps")
    return series, read_run_flags(run_dir)


def default_output(run_dirs):
    """RUN_DIR/curves.png for one run; compare.png in the folder that holds several, written as the
    runs were given (relative stays relative)."""
    if len(run_dirs) == 1:
        return os.path.join(run_dirs[0], "curves.png")
    try:
        folder = os.path.commonpath([os.path.normpath(run_dir) for run_dir in run_dirs]) or "."
    except ValueError:  # absolute and relative paths mixed
        folder = os.path.commonpath([os.path.abspath(run_dir) for run_dir in run_dirs])
    return os.path.join(folder, "compare.png")


def main(argv=None):
    args = get_args(argv)
    runs = [read_run(run_dir) for run_dir in args.run_dirs]
    for run_dir, (series, _) in zip(args.run_dirs, runs):
        if args.knn_x == "minutes" and series["knn_top1"] and not any(map(math.isfinite, series["knn_minutes"])):
            raise PlotError(f"{run_dir}/log.jsonl has no time on its k-NN lines: plot it with --knn_x epochs")
    output = args.output or default_output(args.run_dirs)
    if len(runs) == 1:
        (series, flags), run_dir = runs[0], args.run_dirs[0]
        draw(series, flags, run_dir + (f": {flags.get('dataset')}, {flags.get('arch')}" if flags else ""), output,
             args.knn_x)
        print(output)
        print(summary_line(series, flags))
        return
    labels = run_labels(args.run_dirs, [flags for _, flags in runs])
    draw_runs([(label, series, flags) for label, (series, flags) in zip(labels, runs)], output, args.knn_x)
    print(output)
    for label, (series, flags) in zip(labels, runs):
        print(f"{label}: {summary_line(series, flags)}")


if __name__ == "__main__":
    cli.run(main)
