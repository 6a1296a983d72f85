"""plot_log.py: the series it reads from log.jsonl (resumes, repeated steps, the k-NN baseline), the
PNG it writes, and a one-line message for every kind of bad input."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import loss
import plot_log

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOG_8 = math.log(8)


def interval(step, epoch, loss, used, grad_norm=1.0, **extra):
    """An interval line as pretrain.py writes it, with consistency = loss - 0.5 and uniformity 0.5."""
    return {"loss": loss, "consistency": loss - 0.5, "uniformity": 0.5, "prototypes_used": used,
            "block_entropy": LOG_8 - 0.5, "epoch": epoch, "step": step, "lr": 0.01 * step, "wd": 0.04,
            "momentum": 0.9, "grad_norm": grad_norm, "images_per_s": 100.0, "time": "2025-01-01T00:00:00+0000",
            **extra}


def summary(epoch, loss, used, knn):
    return {"epoch_summary": True, "loss": loss, "consistency": loss - 0.5, "uniformity": 0.5, "prototypes_used": used,
            "block_entropy": LOG_8 - 0.5, "epoch": epoch, "knn_top1": knn}


# Two epochs of 4 steps, logged every 2 steps. The first run is killed in epoch 1 after logging step 6;
# the resume (from the checkpoint of epoch 0, step 4) redoes step 6 with another loss.
RECORDS = [
    {"epoch": -1, "knn_top1": 10.0, "knn_top1_pixels": 30.0, "time": "2025-01-01T00:00:00+0000"},
    interval(2, 0, 4.0, 20),
    {k: v for k, v in interval(4, 0, 3.5, 24).items() if k not in ("grad_norm", "time")},  # an older log's line
    summary(0, 3.75, 24, 20.0),
    interval(6, 1, 3.0, 25),
    {"event": "interrupted", "epoch": 1, "where": "epoch 1, after optimizer step 7"},
    {"event": "resume", "epoch": 1, "step": 4},
    interval(6, 1, 2.5, 26),
    interval(8, 1, 2.0, 30, grad_norm=None, a_key_from_the_future=1),
    summary(1, 2.25, 30, 25.0),
]


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    settings = {"args": {"out_dim": 32, "partition_size": 8, "dataset": "synthetic", "arch": "resnet18"}}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    return tmp_path


def run_script(*argv):
    """Run plot_log.py as a user would; returns the finished process (stdout and stderr captured)."""
    return subprocess.run([sys.executable, "plot_log.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_a_repeated_step_keeps_the_later_line_and_resumes_are_marked(run_dir):
    """Step 6, logged by the killed run and again after the resume, keeps the resumed run's loss 2.5;
    the resume sits at step 4 / epoch 1; the epoch -1 line is the baseline, not a point of the curve."""
    series = plot_log.read_log(run_dir / "log.jsonl")
    assert series["step"] == [2, 4, 6, 8]
    assert series["loss"] == [4.0, 3.5, 2.5, 2.0]
    assert series["consistency"] == [3.5, 3.0, 2.0, 1.5]
    assert series["prototypes_used"] == [20, 24, 26, 30]
    assert series["lr"] == [0.02, 0.04, 0.06, 0.08]
    assert series["resume_step"] == [4] and series["resume_epoch"] == [1]
    assert series["knn_epoch"] == [0, 1] and series["knn_top1"] == [20.0, 25.0]
    assert series["knn_top1_init"] == 10.0 and series["knn_top1_pixels"] == 30.0


def test_missing_and_null_values_read_as_nan(run_dir):
    """An older line without grad_norm and a null grad_norm (fp16 overflow) are NaN; the others are kept."""
    grad_norm = plot_log.read_log(run_dir / "log.jsonl")["grad_norm"]
    assert grad_norm[0] == 1.0 and grad_norm[2] == 1.0
    assert math.isnan(grad_norm[1]) and math.isnan(grad_norm[3])


def test_main_writes_a_png_and_prints_its_path_and_the_last_values(run_dir, tmp_path, capsys):
    """main() writes a PNG (its signature, no leftover .tmp) and prints its path, then the last values."""
    out = tmp_path / "figures" / "curves.png"
    plot_log.main([str(run_dir), "--output", str(out)])
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 10_000
    assert not list(out.parent.glob("*.tmp"))
    path, last = capsys.readouterr().out.splitlines()
    assert path == str(out)
    assert last == ("last: step 8, loss 2.0000, k-NN top-1 25.00% after epoch 1 (random init 10.00%), "
                    "prototypes used 30 of 32")


def test_without_settings_json_the_plot_still_works(run_dir, capsys):
    """No settings.json (an older run): RUN_DIR/curves.png is written and the summary has no "of K"."""
    (run_dir / "settings.json").unlink()
    plot_log.main([str(run_dir)])
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert capsys.readouterr().out.splitlines()[-1].endswith("prototypes used 30")


def test_matplotlib_is_imported_only_to_draw(run_dir, monkeypatch):
    """`import plot_log` does not import matplotlib; without it, drawing stops with the pip command."""
    check = subprocess.run([sys.executable, "-c", "import sys, plot_log; print('matplotlib' in sys.modules)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "False", check.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(plot_log.PlotError, match=r"^plot_log.py needs matplotlib: pip install matplotlib$"):
        plot_log.main([str(run_dir)])


def test_bad_input_gets_a_one_line_message_and_no_traceback(tmp_path):
    """A missing folder, a folder without log.jsonl, an empty log and a malformed line (named with its
    number) each exit with code 1 and one `error:` line."""
    missing = tmp_path / "no_such_run"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty_log").mkdir()
    (tmp_path / "empty_log" / "log.jsonl").write_text("")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text(json.dumps(interval(2, 0, 4.0, 20)) + "\n" + '{"loss": 3.\n')
    cases = [(missing, f"error: {missing} is not a folder"),
             (tmp_path / "empty", f"error: {tmp_path / 'empty' / 'log.jsonl'} not found"),
             (tmp_path / "empty_log", f"error: {tmp_path / 'empty_log' / 'log.jsonl'} holds no training step yet"),
             (tmp_path / "bad", f"error: {tmp_path / 'bad' / 'log.jsonl'} line 2 is not valid JSON")]
    for folder, message in cases:
        result = run_script(folder)
        assert result.returncode == 1, result
        assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_a_real_pretraining_run_plots_end_to_end(tmp_path, capsys):
    """A 2-epoch run of pretrain.py (16 images, batch 4: 4 steps an epoch, a line every 2) plots: steps
    2, 4, 6, 8, the k-NN after each epoch, the random-init and raw-pixel baselines, K = 32."""
    import pretrain

    pretrain.main(["--dataset", "synthetic", "--synthetic_images", "16", "--arch", "resnet18",
                   "--global_crops_size", "16", "--local_crops_size", "8", "--local_crops_number", "1",
                   "--out_dim", "32", "--block_size", "8", "--batch_size_per_gpu", "4", "--num_workers", "0",
                   "--momentum_teacher", "0.9", "--log_every", "2", "--epochs", "2", "--knn_every", "1",
                   "--output_dir", str(tmp_path)])
    series = plot_log.read_log(tmp_path / "log.jsonl")
    assert series["step"] == [2, 4, 6, 8] and series["knn_epoch"] == [0, 1]
    assert series["knn_top1_init"] is not None and series["knn_top1_pixels"] is not None
    assert all(b + e == pytest.approx(LOG_8) for b, e in zip(series["block_entropy"], series["uniformity"]))
    capsys.readouterr()
    plot_log.main([str(tmp_path)])
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    path, last = capsys.readouterr().out.splitlines()
    assert path == str(tmp_path / "curves.png")
    assert last.startswith("last: step 8, loss ") and " of 32" in last


def test_run_labels_name_each_run_by_its_folder_and_the_flags_it_does_not_share():
    """The method's run (the flags most runs share) is labelled by its folder only; the others add what
    differs from the majority value, lists as the command line writes them; output_dir never counts."""
    method = {"block_size": 64, "seed": 0, "global_crops_scale": [0.4, 1.0], "fixed_partition": False,
              "momentum_teacher_end": 1.0, "output_dir": "runs/a"}
    flags = [method, {**method, "block_size": 8, "output_dir": "runs/b"},
             {**method, "seed": 1, "global_crops_scale": [0.2, 1.0], "output_dir": "runs/c"},
             {**method, "fixed_partition": True, "momentum_teacher_end": 0.0, "output_dir": "runs/d"},
             {**method, "output_dir": "runs/e"}]
    labels = plot_log.run_labels(["runs/method", "runs/block_8/", "runs/seed1", "runs/ablated", "runs/again"], flags)
    assert labels == ["method", "block_8: --block_size 8", "seed1: --global_crops_scale 0.2 1 --seed 1",
                      "ablated: --fixed_partition true --momentum_teacher_end 0", "again"]


def test_several_runs_draw_one_figure_in_their_common_folder(run_dir, tmp_path, capsys):
    """Two run folders: compare.png in the folder that holds both, then one summary line per run,
    labelled; block entropy and prototypes used are drawn as fractions of log N_B and K."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.jsonl").write_text((run_dir / "log.jsonl").read_text())
    (other / "settings.json").write_text(json.dumps({"args": {"out_dim": 64, "block_size": 8}}))
    plot_log.main([str(run_dir), str(other)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "compare.png")  # run_dir is tmp_path: the folder that holds both
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_SIGNATURE
    # A tie (one run each with K 32 and 64): the first run's value counts as the common one.
    assert lines[1].startswith(f"{run_dir.name}: last: step 8") and lines[1].endswith("of 32")
    assert lines[2].startswith("other: --out_dim 64: last: step 8") and lines[2].endswith("of 64")
    series, flags = plot_log.read_run(str(other))
    entropy, used = plot_log.fractions(series, flags)
    assert entropy == pytest.approx([(LOG_8 - 0.5) / LOG_8] * 4) and used == [20 / 64, 24 / 64, 26 / 64, 30 / 64]


def test_knn_against_minutes_reads_the_time_of_each_line(tmp_path, run_dir, capsys):
    """--knn_x minutes: each k-NN at the minutes from the baseline's line (training starts) to its
    epoch summary, on one run's figure and on several runs'; a log without those times, or with a
    time in another format, gets a one-line message."""
    timed = tmp_path / "timed"
    timed.mkdir()
    records = [{"epoch": -1, "knn_top1": 10.0, "time": "2025-01-01T00:00:30+0000"}, interval(2, 0, 4.0, 20),
               {**summary(0, 4.0, 20, 20.0), "time": "2025-01-01T00:02:00+0000"}, interval(4, 1, 3.0, 22),
               {**summary(1, 3.0, 22, 30.0), "time": "2025-01-01T01:03:30+0100"}]  # in its own zone: 00:03:30 UTC
    (timed / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    series, _ = plot_log.read_run(str(timed))
    assert series["knn_minutes"] == [1.5, 3.0]
    assert plot_log.knn_x(series, "minutes") == [1.5, 3.0] and plot_log.knn_x(series, "epochs") == [1, 2]
    plot_log.main([str(timed), "--knn_x", "minutes"])
    assert (timed / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    plot_log.main([str(timed), str(timed), "--knn_x", "minutes", "--output", str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG_SIGNATURE
    capsys.readouterr()

    result = run_script(run_dir, "--knn_x", "minutes")  # RECORDS' summaries carry no time
    assert result.returncode == 1 and result.stderr == (f"error: {run_dir}/log.jsonl has no time on its k-NN lines: "
                                                         f"plot it with --knn_x epochs\n")
    records[2]["time"] = "yesterday"
    (timed / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_script(timed, "--knn_x", "epochs")
    assert result.returncode == 1 and result.stderr.startswith(
        f"error: {timed / 'log.jsonl'}: the time 'yesterday' of the line of epoch 0 is not YYYY-MM-DDTHH:MM:SS+ZZZZ"
    ) and result.stderr.count("\n") == 1, result.stderr


def test_the_collapse_threshold_is_drawn_where_the_run_warns(run_dir, tmp_path, monkeypatch):
    """The block entropy panels draw loss.COLLAPSE_THRESHOLD, below which pretrain.py warns: at
    0.5 log 8 = 1.04 nats on one run's figure, at 0.5 on the comparison's fractions."""
    levels = {}

    def threshold_lines(plt, fig, path, dpi):
        block = next(ax for ax in fig.axes if "block entropy" in ax.get_title())
        levels[path] = [line.get_ydata()[0] for line in block.get_lines() if line.get_linestyle() == "-."]
        plt.close(fig)

    monkeypatch.setattr(plot_log, "save_png", threshold_lines)
    series, flags = plot_log.read_run(str(run_dir))
    plot_log.draw(series, flags, "t", "one.png")
    plot_log.draw_runs([("a", series, flags), ("b", series, flags)], "compare.png")
    assert levels["one.png"] == pytest.approx([0.5 * LOG_8]) and levels["compare.png"] == pytest.approx([0.5])
    assert loss.COLLAPSE_THRESHOLD == 0.5


def test_a_resume_is_marked_on_every_panel_and_on_the_knn_panel_only_against_epochs(run_dir, monkeypatch):
    """The resume of RECORDS is a dotted line on each of the five panels, the k-NN panel included
    (at the epoch it logs); against minutes the k-NN panel has none (the log gives no minute for it)."""
    dotted = {}

    def count_dotted(plt, fig, path, dpi):
        dotted[path] = [sum(line.get_linestyle() == ":" for line in ax.get_lines()) for ax in fig.axes[:5]]
        plt.close(fig)

    monkeypatch.setattr(plot_log, "save_png", count_dotted)
    series, flags = plot_log.read_run(str(run_dir))
    plot_log.draw(series, flags, "t", "epochs.png", "epochs")
    plot_log.draw(series, flags, "t", "minutes.png", "minutes")
    assert dotted == {"epochs.png": [1, 1, 1, 1, 1], "minutes.png": [1, 0, 1, 1, 1]}  # loss, knn, used, block, lr
