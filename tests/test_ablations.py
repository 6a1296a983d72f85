"""The ablation flags of pretrain.py (docs/experiments.md, *What each part buys*): each one changes
what the run computes, and at its default the run is the method's."""
import json
import math
import re
from pathlib import Path

import pytest
import torch

import loss
import pretrain
import run_folder
from run_folder import current_names
from test_pretrain import TINY, run_main

ABLATION_FLAGS = ("fixed_partition", "uniformity_weight", "momentum_teacher_end")
# The page whose commands (the ablations, the longer runs) the tests below check.
EXPERIMENTS = Path(__file__).resolve().parents[1] / "docs" / "experiments.md"


def changed_training_flags(argv, base_argv):
    """The training flags (run_folder.training_flags) whose values differ between two command lines."""
    args, base = (current_names(run_folder.training_flags(pretrain.get_args(a)[1])) for a in (argv, base_argv))
    return {k for k in set(args) | set(base) if args.get(k) != base.get(k)}


def run(tmp_path, *extra):
    """One epoch of the tiny run: its checkpoint and the interval lines of its log."""
    checkpoint = run_main(tmp_path, "--epochs", "1", *extra)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    return checkpoint, [r for r in records if "step" in r]


def record_partitions(monkeypatch):
    """Every partition the training loop hands to the loss, in order."""
    seen = []

    def recording_loss(student_logits, teacher_logits, partition, **kwargs):
        seen.append(partition.clone())
        return loss.carp_loss(student_logits, teacher_logits, partition, **kwargs)
    monkeypatch.setattr(pretrain, "carp_loss", recording_loss)
    return seen


def test_fixed_partition_keeps_the_first_steps_partition(tmp_path, monkeypatch):
    """--fixed_partition true: every step of the run uses the partition of step 0; by default each
    of the 4 steps draws its own."""
    seen = record_partitions(monkeypatch)
    run(tmp_path / "fixed", "--fixed_partition", "true")
    first = loss.partition_for_step(32, 8, seed=0, forward_pass=0)
    assert len(seen) == 4 and all(torch.equal(p.cpu(), first) for p in seen)

    seen.clear()
    run(tmp_path / "random")
    assert len(seen) == 4 and torch.equal(seen[0].cpu(), first)
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_uniformity_weight_scales_the_uniformity_term_in_the_loss_and_its_gradient(weight):
    """forward_backward with --uniformity_weight w backpropagates L_c + w L_H: the student's gradients
    equal those of carp_objective's terms combined by hand, and differ from the method's (w = 1)."""
    torch.manual_seed(0)
    args = pretrain.get_args(TINY)[1]
    pretrain.check_args(None, args)
    student, teacher = pretrain.carp_network(args), pretrain.carp_network(args)
    pretrain.start_teacher(student, teacher)
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]
    partition = loss.partition_for_step(32, 8, seed=0, forward_pass=0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def gradients(weight, by_hand=False):
        student.zero_grad(set_to_none=True)
        if by_hand:
            consistency, uniformity = loss.carp_objective(student(views), teacher(views[:2]).detach(), partition)
            (consistency + weight * uniformity).backward()
        else:
            _, total, consistency, uniformity = pretrain.forward_backward(
                student, teacher, views, partition, torch.autocast("cpu", enabled=False), scaler,
                uniformity_weight=weight)
            assert total.item() == pytest.approx(consistency.item() + weight * uniformity.item(), rel=1e-6)
        return [p.grad.clone() for p in student.parameters() if p.grad is not None]

    weighted, expected, method = gradients(weight), gradients(weight, by_hand=True), gradients(1.0)
    for got, want in zip(weighted, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(got, other, rtol=1e-3, atol=1e-7) for got, other in zip(weighted, method))


def test_uniformity_weight_is_in_the_logged_loss(tmp_path):
    """The log's loss is consistency + w uniformity at --uniformity_weight 0."""
    _, steps = run(tmp_path, "--uniformity_weight", "0")
    for r in steps:
        assert r["loss"] == pytest.approx(r["consistency"], rel=1e-6) and r["uniformity"] > 0


def test_no_ema_makes_the_teacher_the_student(tmp_path):
    """--momentum_teacher 0 --momentum_teacher_end 0: after every step the teacher is a copy of the
    student (the log's momentum is 0 throughout); by default the teacher lags (m rises 0.9 -> 1)."""
    checkpoint, steps = run(tmp_path / "no_ema", "--momentum_teacher", "0", "--momentum_teacher_end", "0")
    assert all(r["momentum"] == 0 for r in steps)
    for key, value in checkpoint["student"].items():
        if value.is_floating_point() and "running" not in key:  # BN running statistics are each network's own
            assert torch.equal(checkpoint["teacher"][key], value), key

    _, steps = run(tmp_path / "ema")
    assert steps[0]["momentum"] >= 0.9 and steps[-1]["momentum"] > steps[0]["momentum"]


def test_momentum_teacher_end_sets_where_the_cosine_ends(tmp_path):
    """A constant momentum (start = end = 0.95) stays 0.95 at every step."""
    _, steps = run(tmp_path, "--momentum_teacher", "0.95", "--momentum_teacher_end", "0.95")
    assert [r["momentum"] for r in steps] == pytest.approx([0.95] * len(steps))


# A run that collapses within 32 steps without the uniformity term: the SmallCNN, 64 images of 16 px
# in batches of 16 with 2 local views, K = 64 in blocks of 16, AdamW at a high learning rate.
COLLAPSING = ["--dataset", "synthetic", "--synthetic_images", "64", "--arch", "small_cnn", "--hidden_dim", "32",
              "--bottleneck_dim", "16", "--global_crops_size", "16", "--local_crops_size", "8", "--local_crops_number",
              "2", "--batched_views", "true", "--out_dim", "64", "--block_size", "16", "--batch_size_per_gpu", "16",
              "--num_workers", "0", "--optimizer", "adamw", "--lr", "0.2", "--min_lr", "1e-6", "--weight_decay", "0.04",
              "--weight_decay_end", "0.04", "--momentum_teacher", "0.9", "--log_every", "2", "--epochs", "8"]


def collapse_run(tmp_path, capsys, *extra):
    """(log lines with a step, collapse events, the warnings printed) of the COLLAPSING run."""
    pretrain.main(COLLAPSING + ["--output_dir", str(tmp_path), *extra])
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: collapse" in line]
    return [r for r in records if "step" in r and "loss" in r], [r for r in records if r.get("event") == "collapse"], warnings


def test_a_run_without_the_uniformity_term_warns_once_that_it_collapses(tmp_path, capsys):
    """--uniformity_weight 0: the normalised block entropy falls below loss.COLLAPSE_THRESHOLD
    (0.5); the first log line below it is followed by one `collapse` event and one warning line naming
    the step, and the run goes on (no second warning while it stays below)."""
    lines, events, warnings = collapse_run(tmp_path, capsys, "--uniformity_weight", "0")
    fractions = [r["normalised_block_entropy"] for r in lines]
    assert fractions[0] > 0.9 and min(fractions) < 0.3  # starts spread, ends on a few prototypes
    first = next(i for i, f in enumerate(fractions) if f < 0.5)
    assert len(events) == 1 and events[0]["step"] == lines[first]["step"] and events[0]["threshold"] == 0.5
    assert len(warnings) == 1 and f"at optimizer step {lines[first]['step']}:" in warnings[0]
    for r in lines:  # block_entropy / log N_B, N_B = 16
        assert r["normalised_block_entropy"] == pytest.approx(r["block_entropy"] / math.log(16))


@pytest.mark.parametrize("extra", [[], "PAPER"], ids=["the method", "the paper's objective and optimizer"])
def test_the_method_does_not_warn_of_a_collapse(tmp_path, capsys, extra):
    """The same run with the uniformity term (the method), and with the paper's recipe in place of the
    small run's (LARS at lr 0.45, K = 65536 in blocks of 512, teacher momentum 0.99), keeps its
    blocks' marginals near uniform (above 0.9 of their maximum entropy) and never warns."""
    if extra == "PAPER":
        extra = ["--optimizer", "lars", "--lr", "0.45", "--min_lr", "0.0048", "--weight_decay", "1e-6",
                 "--weight_decay_end", "1e-6", "--momentum_teacher", "0.99", "--out_dim", "65536", "--block_size", "512"]
    lines, events, warnings = collapse_run(tmp_path, capsys, *extra)
    assert min(r["normalised_block_entropy"] for r in lines) > 0.9
    assert events == [] and warnings == []


def test_ablation_flags_default_to_the_method_and_keep_default_run_folders():
    """At their defaults the flags are the method's (a fresh partition every step, lambda 1, m -> 1) and
    leave the name of a default run folder as it was before they existed; changed, they name another."""
    _, args = pretrain.get_args([])
    assert (args.fixed_partition, args.uniformity_weight, args.momentum_teacher_end) == (False, 1.0, 1.0)
    flags = run_folder.training_flags(args)
    assert not set(ABLATION_FLAGS) & set(flags)
    # The default folders' names since before the ablation flags and the --block_size rename:
    before = "7bd19953"
    assert args.output_dir == f"runs/imagefolder_resnet50_{before}" and run_folder.flags_digest(flags) == before
    # Runs of the 45-epoch CPU recipe keep the folder they resume in; the demo's recipe names its own.
    old_demo = pretrain.get_args(["--recipe", "cpu_small_45ep", "--dataset", "mnist5k"])[1]
    assert old_demo.output_dir == "runs/mnist5k_small_cnn_43f67548"
    demo = pretrain.get_args(["--recipe", "cpu_small", "--dataset", "mnist5k"])[1]
    assert demo.output_dir == "runs/mnist5k_small_cnn_bb4552ce"
    for flag, value in (("fixed_partition", "true"), ("uniformity_weight", "0"), ("momentum_teacher_end", "0.99")):
        _, changed = pretrain.get_args([f"--{flag}", value])
        assert run_folder.flags_digest(run_folder.training_flags(changed)) != before, flag


def test_the_readme_ablation_commands_change_only_their_rows_flags():
    """Every `ablate DATASET ROW SEED FLAGS` line of docs/experiments.md parses, and its training flags
    differ from the method row's (the 45-epoch CPU recipe at 10 epochs) exactly in the flags the line gives."""
    lines = re.findall(r"^  ablate \$dataset (\w+) \$seed ?(.*)$", EXPERIMENTS.read_text(), flags=re.MULTILINE)
    assert len(lines) == 10 and lines[0] == ("method", "")
    base = ["--recipe", "cpu_small_45ep", "--dataset", "mnist5k", "--epochs", "10", "--seed", "0"]
    for row, flags in lines[1:]:
        given = {flag.lstrip("-") for flag in flags.split() if flag.startswith("--")}
        assert changed_training_flags(base + flags.split(), base) == given, row


def test_the_readme_longer_runs_are_the_demo_recipe_with_only_more_epochs():
    """The loop of longer runs in docs/experiments.md parses for each of its epochs; each run's
    training flags are those of the 45-epoch CPU recipe on its dataset but for --epochs (none at 45), and its
    10-epoch runs are the `method` rows of the ablations (seed 0), whose numbers it reuses."""
    loop = re.search(r"^for epochs in ([\d ]+); do\n(.*?)^done$", EXPERIMENTS.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert loop and loop.group(1).split() == ["10", "45", "90", "180"]
    commands = [line.split("pretrain.py", 1)[1] for line in loop.group(2).replace("\\\n", " ").splitlines()]
    recipes = [["--recipe", "cpu_small_45ep", "--dataset", "mnist5k"],
               ["--recipe", "cpu_small_45ep", "--dataset", "imagefolder", "--data_path", "data/photo_patches"]]
    assert len(commands) == 2
    for epochs in loop.group(1).split():
        for command, recipe in zip(commands, recipes):
            argv = command.replace("${epochs}", epochs).replace("$epochs", epochs).split()
            assert changed_training_flags(argv, recipe) == (set() if epochs == "45" else {"epochs"}), (epochs, command)
            method_row = recipe + ["--epochs", "10", "--seed", "0"]
            assert (not changed_training_flags(argv, method_row)) == (epochs == "10"), (epochs, command)


def test_the_readme_no_teacher_runs_at_45_epochs_change_only_the_momentum():
    """The two no-teacher runs at 45 epochs in docs/experiments.md are the 45-epoch CPU recipe on their
    datasets with the teacher's momentum at 0 and nothing else changed."""
    commands = [line.split("pretrain.py", 1)[1].split("#")[0].split()
                for line in EXPERIMENTS.read_text().replace("\\\n", " ").splitlines()
                if line.startswith("python pretrain.py") and "_45_epochs_no_teacher" in line]
    assert len(commands) == 2
    for argv in commands:
        args = run_folder.training_flags(pretrain.get_args(argv)[1])
        recipe = ["--recipe", "cpu_small_45ep", "--dataset", args["dataset"]] + (
            ["--data_path", args["data_path"]] if args.get("data_path") else [])
        assert changed_training_flags(argv, recipe) == {"momentum_teacher", "momentum_teacher_end"}, argv
        assert args["momentum_teacher"] == args["momentum_teacher_end"] == 0


def test_the_sweep_commands_are_the_45_epoch_recipe_in_bf16_at_70_epochs_and_its_last_row_is_the_demo_recipe():
    """docs/experiments.md's sweep of the CPU recipe: the function's command is cpu_small_45ep on each
    dataset with only --use_bf16 auto and --epochs 70 changed (and the seed); every `sweep DATASET ROW
    SEED FLAGS` line changes the teacher's momentum, and only its own flags among the teacher's momentum
    and the learning rate's (--lr, --min_lr); and the row the sweep picked is exactly --recipe cpu_small."""
    text = EXPERIMENTS.read_text()
    command = re.search(r"^sweep\(\) \{.*?^  python pretrain\.py (.*?)$", text, flags=re.MULTILINE | re.DOTALL).group(1)
    recipes = {"mnist5k": ["--dataset", "mnist5k"],
               "photo_patches": ["--dataset", "imagefolder", "--data_path", "data/photo_patches"]}
    lines = re.findall(r"^  sweep \$dataset (\w+) \$seed (.*)$", text, flags=re.MULTILINE)
    assert len(lines) == 9 and lines[0] == ("m099_1", "--momentum_teacher 0.99")  # cpu_small_45ep's own schedule first
    assert lines[-1][0] == "flat_lr004"
    for dataset, data in recipes.items():
        for seed in ("0", "1"):
            argv = (command.replace('"runs/sweep/$dataset/${row}_seed$seed"', "runs/x")
                    .replace("$data", " ".join(data)).replace('"$seed"', seed).replace('"$@"', "")).split()
            recipe = ["--recipe", "cpu_small_45ep", *data]
            assert changed_training_flags(argv, recipe) == {"use_bf16", "epochs"} | ({"seed"} if seed == "1" else set())
            assert changed_training_flags(argv + lines[0][1].split(), argv) == set()  # 0.99 -> 1: cpu_small_45ep's
            for row, flags in lines[1:]:
                changed = changed_training_flags(argv + flags.split(), argv)
                given = {flag.lstrip("-") for flag in flags.split() if flag.startswith("--")}
                assert changed & {"momentum_teacher", "momentum_teacher_end"}, row
                assert changed <= {"momentum_teacher", "momentum_teacher_end", "lr", "min_lr"} and changed <= given, row
                assert given - changed <= {"momentum_teacher"}, row  # 0.99 given again is no change
            picked = argv + lines[-1][1].split()
            demo = ["--recipe", "cpu_small", *data, "--seed", seed]
            assert changed_training_flags(picked, demo) == set(), (dataset, seed)
