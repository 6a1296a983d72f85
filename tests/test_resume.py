"""Preemptible training: a run killed at any point (kill -9, SIGTERM, a lost torchrun worker) and run
again with the same command ends with exactly the weights of a run that was never stopped.

What makes it exact: checkpoint.pth every --checkpoint_every_steps optimizer steps (written
atomically and durably), views seeded by (seed, epoch, image) wherever they are drawn, partitions
seeded by step, and a sampler that resumes within an epoch without reading the images of the steps
already taken. Runs are tiny (a SmallCNN on 32 synthetic 16-pixel images, 8 steps an epoch).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import pretrain

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "synthetic", "--synthetic_images", "32", "--arch", "small_cnn", "--global_crops_size", "16",
         "--local_crops_size", "8", "--local_crops_number", "1", "--out_dim", "32", "--block_size", "8",
         "--hidden_dim", "16", "--bottleneck_dim", "8", "--batch_size_per_gpu", "4", "--momentum_teacher", "0.9",
         "--log_every", "1", "--checkpoint_every_steps", "1", "--epochs", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CARP_DEVICE": "cpu"}  # bit for bit on the CPU, 2 processes included


@pytest.fixture(autouse=True)
def one_thread():
    """Runs in this process use the one thread of the commands the tests start (ENV): a convolution
    split over another number of threads sums in another order. (conftest.py restores the count.)"""
    torch.set_num_threads(1)


def straight_run(out, *extra):
    pretrain.main(SMALL + ["--num_workers", "0", "--output_dir", str(out), *extra])
    return torch.load(out / "checkpoint.pth", weights_only=True)


def assert_same_weights(a, b):
    for network in ("student", "teacher"):
        for key, value in a[network].items():
            assert torch.equal(b[network][key], value), (network, key)


def steps_logged(out):
    log = out / "log.jsonl"
    return sum('"step"' in line and '"event"' not in line for line in log.read_text().splitlines()) if log.exists() else 0


STARTED = []  # every process group a test starts, killed when the test ends (tidy_processes)


@pytest.fixture(autouse=True)
def tidy_processes():
    """A test that fails or times out must not leave training processes behind."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start(command, out, after_steps):
    """Start `command` and return the process once log.jsonl shows `after_steps` optimizer steps."""
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    STARTED.append(process)
    deadline = time.time() + 120
    while steps_logged(out) < after_steps and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return process


# ---------------------------------------------------------------- the views ---------------------

def test_an_images_views_depend_on_seed_epoch_and_index_only():
    """PretrainingImages draws image i's views in epoch e from data.view_seed(seed, e, i): asked again,
    in any order, they are the same; another epoch or image gives other views. The batched views
    of an image are the same whatever else is in its batch."""
    dataset = data.build_dataset("synthetic", "pretrain", synthetic_images=8, synthetic_size=16)
    augmentation = data.MultiCropAugmentation((0.2, 1.0), (0.05, 0.2), local_crops_number=1, global_crops_size=16, local_crops_size=8)
    images = data.PretrainingImages(dataset, seed=3, augmentation=augmentation)
    first, _, _ = images[(1, 5)]
    images[(0, 2)]
    again, seed, bad = images[(1, 5)]
    assert all(torch.equal(u, v) for u, v in zip(first, again)) and bad == 0
    assert seed == data.view_seed(3, 1, 5) != data.view_seed(3, 2, 5) != data.view_seed(3, 1, 6)
    assert not torch.equal(images[(2, 5)][0][0], first[0]) and not torch.equal(images[(1, 6)][0][0], first[0])

    batched = data.BatchedMultiCrop((0.2, 1.0), (0.05, 0.2), local_crops_number=1, global_crops_size=16,
                                   local_crops_size=8)
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    seeds = torch.tensor([data.view_seed(3, 0, i) for i in range(3)])
    together = batched(x, seeds)
    alone = batched(x[2:], seeds[2:])
    assert all(torch.allclose(t[2], a[0], atol=1e-6) for t, a in zip(together, alone))


def test_the_number_of_workers_does_not_change_the_run(tmp_path):
    """The views no longer depend on which worker drew them: 0 or 2 DataLoader workers train the same
    network, bit for bit."""
    none = straight_run(tmp_path / "w0", "--epochs", "1")
    pretrain.main(SMALL + ["--epochs", "1", "--num_workers", "2", "--output_dir", str(tmp_path / "w2")])
    assert_same_weights(none, torch.load(tmp_path / "w2" / "checkpoint.pth", weights_only=True))


def test_the_knn_monitor_does_not_change_the_run(tmp_path):
    """--knn_every 1 measures the teacher before training and after each epoch; the weights at the end
    are those of the same run with --knn_every 0 (the monitor draws on a fork of the random state)."""
    assert_same_weights(straight_run(tmp_path / "off", "--knn_every", "0"),
                        straight_run(tmp_path / "on", "--knn_every", "1"))


# ---------------------------------------------------------------- kill -9 -----------------------

@pytest.mark.parametrize("workers, batched, kill_after", [(0, "false", 3), (2, "false", 9), (0, "true", 6),
                                                          (2, "true", 12)],
                         ids=["0 workers", "2 workers", "batched views", "batched views, 2 workers"])
def test_kill_9_mid_epoch_then_the_same_command_ends_as_the_straight_run(tmp_path, workers, batched, kill_after):
    """kill -9 (no handler runs) once the log shows `kill_after` of the 16 steps, then the same command:
    it resumes from the last step checkpoint and ends with the straight run's weights, bit for bit."""
    straight = straight_run(tmp_path / "straight", "--batched_views", batched)
    out = tmp_path / "killed"
    command = [sys.executable, "pretrain.py", *SMALL, "--batched_views", batched, "--num_workers", str(workers),
               "--output_dir", str(out)]
    process = start(command, out, kill_after)
    os.killpg(process.pid, signal.SIGKILL)  # the training process and its DataLoader workers
    process.wait()
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["step"]
    assert 0 < saved < 16, saved  # stopped part-way, with a step checkpoint
    rerun = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"step {saved}" in rerun.stdout
    assert_same_weights(straight, torch.load(out / "checkpoint.pth", weights_only=True))


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    """A kill while checkpoint.pth is written leaves the previous file and a half-written .tmp (the
    write goes to the .tmp and is renamed when whole): the next run resumes from the previous file
    (here the end of epoch 1) and ends as the straight run, with the same epoch summary."""
    straight = straight_run(tmp_path / "straight", "--saveckp_freq", "1")
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes((tmp_path / "straight" / "checkpoint0001.pth").read_bytes())
    (out / "checkpoint.pth.tmp").write_bytes(b"PK\x03\x04 cut short")
    pretrain.main(SMALL + ["--num_workers", "0", "--output_dir", str(out)])
    assert_same_weights(straight, torch.load(out / "checkpoint.pth", weights_only=True))
    summaries = [json.loads(line) for path in (tmp_path / "straight", out)
                 for line in (path / "log.jsonl").read_text().splitlines() if '"epoch_summary"' in line]
    assert [s["epoch"] for s in summaries] == [0, 1, 1] and summaries[1]["loss"] == summaries[2]["loss"]


def test_a_resume_within_an_epoch_logs_what_the_straight_run_logs(tmp_path):
    """The epoch's statistics so far travel in the step checkpoint: after a resume at step 11, the
    log lines of steps 12-16 and the epoch summary equal the straight run's."""
    straight_run(tmp_path / "straight")
    out = tmp_path / "resumed"
    command = [sys.executable, "pretrain.py", *SMALL, "--num_workers", "0", "--output_dir", str(out)]
    process = start(command, out, 11)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=True)

    def last_lines(path):  # the lines of the last 4 steps and the last epoch summary, without times
        records = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
        keep = [r for r in records if r.get("step", 0) > 12 or r.get("epoch_summary") and r["epoch"] == 1][-5:]
        return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in keep]
    assert last_lines(out) == last_lines(tmp_path / "straight")


def test_resuming_within_an_epoch_with_other_steps_per_epoch_is_refused(tmp_path):
    """A step within an epoch means another image with another batch size: refused, naming both."""
    out = tmp_path / "run"
    command = [sys.executable, "pretrain.py", *SMALL, "--num_workers", "0", "--output_dir", str(out)]
    process = start(command, out, 3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with pytest.raises(data.DataError, match="within an epoch of 8 optimizer steps, this run makes 4"):
        pretrain.main(SMALL + ["--num_workers", "0", "--output_dir", str(out), "--batch_size_per_gpu", "8"])


# ---------------------------------------------------------------- SIGTERM, SIGUSR1 --------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_finishes_the_step_writes_it_and_exits_75(tmp_path, signum):
    """The signals schedulers send before a kill: the run finishes its optimizer step, writes the
    checkpoint at that step, logs the event, says so in one line and exits with 75; the same command
    then ends as the straight run. With 2 workers, who ignore the signal and leave it to the run."""
    straight = straight_run(tmp_path / "straight")
    out = tmp_path / "run"
    command = [sys.executable, "pretrain.py", *SMALL, "--num_workers", "2", "--output_dir", str(out)]
    process = start(command, out, 5)
    os.killpg(process.pid, signum)  # as a scheduler does: the whole process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-2000:]
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == (f"stopped by {signal.Signals(signum).name} after optimizer step {checkpoint['step']}; "
                         f"{out / 'checkpoint.pth'} holds it; run the same command to resume")
    event = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert event["event"] == "stopped" and event["step"] == checkpoint["step"]
    subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=True)
    assert_same_weights(straight, torch.load(out / "checkpoint.pth", weights_only=True))


# ---------------------------------------------------------------- torchrun ----------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, *extra, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--max_restarts", str(restarts), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
            "pretrain.py", *SMALL, "--num_workers", "0", "--output_dir", str(out), *extra]


def test_torchrun_sigterm_stops_every_process_at_the_same_step_and_resumes_exactly(tmp_path):
    """SIGTERM to a torchrun job of 2 processes (torchrun passes it on): both finish the same step and
    the checkpoint holds that step; the same command ends as the straight 2-process run."""
    straight = tmp_path / "straight"
    subprocess.run(torchrun(straight), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=True)
    out = tmp_path / "run"
    process = start(torchrun(out), out, 3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert 0 < saved["step"] < 8 and len(saved["rng"]) == 2, stderr[-2000:]
    # Both processes stopped after the same step (torchrun itself then ends with its own error code).
    assert stderr.count(f"stopped by SIGTERM after optimizer step {saved['step']}; ") == 2, stderr[-3000:]
    assert process.returncode != 0
    rerun = subprocess.run(torchrun(out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_weights(torch.load(straight / "checkpoint.pth", weights_only=True),
                        torch.load(out / "checkpoint.pth", weights_only=True))


def test_torchrun_restarts_a_group_that_lost_a_worker_and_it_resumes_by_itself(tmp_path):
    """torchrun --max_restarts 1: kill -9 of one worker mid-epoch makes torchrun restart both; the
    restarted group resumes from the last step checkpoint and ends as the straight run."""
    straight = tmp_path / "straight"
    subprocess.run(torchrun(straight), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=True)
    out = tmp_path / "run"
    process = start(torchrun(out, restarts=1), out, 4)
    workers = subprocess.run(["pgrep", "-f", f"pretrain.py.*{out}"], capture_output=True, text=True).stdout.split()
    workers = [int(pid) for pid in workers if int(pid) != process.pid]
    assert workers, "no worker found"
    os.kill(max(workers), signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    events = [json.loads(line).get("event") for line in (out / "log.jsonl").read_text().splitlines()]
    assert "resume" in events
    assert_same_weights(torch.load(straight / "checkpoint.pth", weights_only=True),
                        torch.load(out / "checkpoint.pth", weights_only=True))


# ---------------------------------------------------------------- a bad image -------------------

def test_a_bad_image_is_skipped_and_counted_with_skip_bad_images(tmp_path):
    """--skip_bad_images true: the run trains on, the next image of the folder in the bad one's
    place, and log.jsonl counts it (bad_images: 2 epochs x 1 image)."""
    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (20, 20), (30 * i, 0, 100 if cls == "b" else 0)).save(root / cls / f"{i}.png")
    (root / "b" / "3.png").write_bytes(b"not an image")
    args = ["--dataset", "imagefolder", "--data_path", str(root)] + SMALL[4:]  # SMALL[:4]: the synthetic data
    with pytest.warns(UserWarning, match="3.png"):
        pretrain.main(args + ["--num_workers", "0", "--output_dir", str(tmp_path / "run"), "--skip_bad_images", "true"])
    summaries = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
                 if '"epoch_summary"' in line]
    assert [s.get("bad_images") for s in summaries] == [1, 1]
