"""linear_eval.py: the linear probe on a frozen backbone. The classifier learns separable features,
the backbone (weights and BatchNorm statistics) never changes, checkpoints load with
weights_only=True and a run resumes exactly, the fast mode says it is not the paper's protocol,
and bad flags are refused by name.

The end-to-end runs use ResNet-18 on 16x16 synthetic images, shrunk to 40 train / 8 val images.
"""
import json
import warnings

import pytest
import torch

import backbones
import features
import linear_eval
import optim
from data import DataError

TINY = ["--arch", "resnet18", "--dataset", "synthetic", "--synthetic_images", "40", "--image_size", "16",
        "--num_workers", "0", "--batch_size_per_gpu", "8"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (the test machine's cores are shared, and spinning OpenMP threads make
    tiny convolutions ~50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def weights_file(tmp_path):
    """A ResNet-18 state dict (torchvision layout) whose BatchNorm statistics are not the defaults
    0 / 1, so that any update of them by a forward pass in train() mode shows."""
    torch.manual_seed(0)
    backbone = backbones.build_backbone("resnet18")
    with torch.no_grad():
        for name, buffer in backbone.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    path = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), path)
    return str(path)


def run(tmp_path, weights, *extra):
    return linear_eval.main(["--pretrained_weights", weights, *TINY, "--output_dir", str(tmp_path / "out"), *extra])


def save_blobs(folder, n_per_class, seed):
    """4 Gaussian blobs in 16 dimensions: class c centred at 4 e_c, noise std 0.5, saved in the
    --dump_features layout. The classes are linearly separable with a margin of ~8 std."""
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(exist_ok=True)
    for split, n in (("train", n_per_class), ("val", n_per_class // 2)):
        labels = torch.arange(4).repeat(n)  # (4n,)
        feats = 4.0 * torch.eye(16)[labels] + 0.5 * torch.randn(len(labels), 16, generator=generator)  # (4n, 16)
        torch.save({"features": feats, "labels": labels}, features.features_file(str(folder), split))


@pytest.mark.parametrize("optimizer, batch_size, epochs", [("sgd", 16, 10), ("lars", 10, 50)])
def test_probe_separates_gaussian_blobs(tmp_path, optimizer, batch_size, epochs, capsys):
    """On 4 well-separated blobs (cached features) the classifier reaches 100% top-1 with either
    optimizer. LARS gets 1000 steps (200 points / 10 x 50 epochs): it moves the weight by ~1% of
    its norm per step, so ~100 steps leave it mostly at its random initialisation."""
    save_blobs(tmp_path / "blobs", 50, seed=0)
    results = run(tmp_path, "random", "--cached_features", "true", "--load_features", str(tmp_path / "blobs"),
                  "--optimizer", optimizer, "--epochs", str(epochs), "--batch_size_per_gpu", str(batch_size),
                  "--gradient_accumulation_steps", "1")
    assert results["top1"] == 100.0 and results["best_top1"] == 100.0 and results["top5"] == 100.0
    assert "nn.Linear(16, 4)" in capsys.readouterr().out


def test_top5_is_a_hit_at_rank_5_and_a_miss_at_rank_6():
    """An identity nn.Linear(7, 7), so the features are the logits: 4 val images scoring the classes
    6, 5, 4, ..., 0, labelled 0, 1, 4 and 5, rank their class 1st, 2nd, 5th and 6th. Top-1 1/4 = 25 %,
    top-5 3/4 = 75 % (a top-2 or top-4 would give 50 %, a top-6 100 %), also over chunks of 3 images."""
    linear = torch.nn.Linear(7, 7)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(7))
        linear.bias.zero_()
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]] * 4)  # (4, 7)
    assert linear_eval.evaluate(linear, logits, torch.tensor([0, 1, 4, 5]), "cpu") == [25.0, 75.0]
    assert linear_eval.evaluate(linear, logits, torch.tensor([0, 1, 4, 5]), "cpu", chunk_size=3) == [25.0, 75.0]


# 8 train features (D = 3) of 7 classes, and their labels; class 0 has two images.
HAND_FEATURES = torch.tensor([[1.0, 0, 2], [0, 1, 1], [2, 1, 0], [1, 2, 1], [0, 2, 2], [2, 0, 1], [1, 1, 2], [2, 2, 0]])
HAND_LABELS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])


def save_hand_features(folder):
    """HAND_FEATURES as the train split; val: the same 8 images, plus the first one labelled 1."""
    folder.mkdir()
    val = (torch.cat([HAND_FEATURES, HAND_FEATURES[:1]]), torch.cat([HAND_LABELS, torch.tensor([1])]))
    for split, (feats, labels) in (("train", (HAND_FEATURES, HAND_LABELS)), ("val", val)):
        torch.save({"features": feats, "labels": labels}, features.features_file(str(folder), split))
    return val


def cross_entropy_gradients(weight, bias, x, labels):
    """Gradients of the mean cross-entropy of softmax(x W^T + b): ((P - Y)^T x / n, mean of P - Y)."""
    probabilities = torch.softmax(x @ weight.T + bias, dim=1)  # (n, C)
    error = probabilities - torch.eye(weight.shape[0], dtype=x.dtype)[labels]  # (n, C): P - Y
    return error.T @ x / len(x), error.mean(dim=0)


def test_sgd_flags_give_the_steps_computed_by_hand(tmp_path):
    """--optimizer sgd --lr 25.6 --momentum 0.5 --weight_decay 0.1 --epochs 2 --batch_size_per_gpu 8
    --seed 3 on the 8 cached HAND_FEATURES: one batch, so one optimizer step per epoch; the peak lr
    is 25.6 x 8 / 256 = 0.8 (the linear scaling rule) and the cosine to 0 over the 2 steps gives 0.8
    then 0.4. From the classifier initialised under --seed 3 (W0, b0 = 0), by hand: gradient g of the
    mean cross-entropy plus 0.1 W for the weight (the bias is not decayed), momentum buffer v1 = g1,
    v2 = 0.5 v1 + g2, parameter minus lr x v. The val images, ranked by that classifier, put their
    class 1st, 5th, 2nd, 2nd, 2nd, 2nd, 2nd, 1st, 6th: top-1 2/9 = 22.2 %, top-5 8/9 = 88.9 %."""
    val_features, val_labels = save_hand_features(tmp_path / "f")
    results = run(tmp_path, "random", "--cached_features", "true", "--load_features", str(tmp_path / "f"),
                  "--optimizer", "sgd", "--lr", "25.6", "--momentum", "0.5", "--weight_decay", "0.1", "--epochs", "2",
                  "--batch_size_per_gpu", "8", "--seed", "3")
    torch.manual_seed(3)
    initial = linear_eval.build_linear(3, 7)
    weight, bias = initial.weight.detach().double(), initial.bias.detach().double()
    x = HAND_FEATURES.double()
    velocity = None
    for lr in (0.8, 0.4):
        grad_weight, grad_bias = cross_entropy_gradients(weight, bias, x, HAND_LABELS)
        gradient = (grad_weight + 0.1 * weight, grad_bias)
        velocity = gradient if velocity is None else tuple(0.5 * v + g for v, g in zip(velocity, gradient))
        weight, bias = weight - lr * velocity[0], bias - lr * velocity[1]
    trained = checkpoint_weights(tmp_path)
    torch.testing.assert_close(trained["weight"].double(), weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(trained["bias"].double(), bias, atol=1e-5, rtol=0)
    logits = val_features.double() @ weight.T + bias  # (9, 7)
    rank = 1 + (logits > logits.gather(1, val_labels[:, None])).sum(dim=1)  # (9,): 1 = the best class
    assert rank.tolist() == [1, 5, 2, 2, 2, 2, 2, 1, 6]
    assert results["top1"] == pytest.approx(200 / 9) and results["top5"] == pytest.approx(800 / 9)


def test_lars_flags_give_the_steps_computed_by_hand(tmp_path):
    """--optimizer lars --lr 2 --momentum 0.5 --weight_decay 0.1 --epochs 2 on the 8 cached
    HAND_FEATURES, one batch of 8: the lr is 2 then 1 (LARS's lr is not scaled with the batch; cosine
    over 2 steps). By hand for the weight: d = g + 0.1 W, rescaled by the trust ratio
    0.001 ||W|| / ||d||, into the momentum buffer v1 = d1, v2 = 0.5 v1 + d2, W minus lr x v; the bias
    takes plain momentum SGD on its gradient, without decay or rescaling."""
    save_hand_features(tmp_path / "f")
    with pytest.warns(UserWarning, match="LARS at lr 2 with a global batch of 8"):
        run(tmp_path, "random", "--cached_features", "true", "--load_features", str(tmp_path / "f"),
            "--optimizer", "lars", "--lr", "2", "--momentum", "0.5", "--weight_decay", "0.1", "--epochs", "2",
            "--gradient_accumulation_steps", "1")
    torch.manual_seed(0)
    initial = linear_eval.build_linear(3, 7)
    weight, bias = initial.weight.detach().double(), initial.bias.detach().double()
    velocity = None
    for lr in (2.0, 1.0):
        grad_weight, grad_bias = cross_entropy_gradients(weight, bias, HAND_FEATURES.double(), HAND_LABELS)
        d = grad_weight + 0.1 * weight
        step = (0.001 * weight.norm() / d.norm() * d, grad_bias)
        velocity = step if velocity is None else tuple(0.5 * v + s for v, s in zip(velocity, step))
        weight, bias = weight - lr * velocity[0], bias - lr * velocity[1]
    trained = checkpoint_weights(tmp_path)
    torch.testing.assert_close(trained["weight"].double(), weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(trained["bias"].double(), bias, atol=1e-6, rtol=0)


def test_val_freq_evaluates_every_nth_epoch_and_the_last(tmp_path):
    """--epochs 5 --val_freq 2: val top-1 in the log after epochs 2, 4 and 5 only."""
    save_blobs(tmp_path / "blobs", 10, seed=6)
    run(tmp_path, "random", "--cached_features", "true", "--load_features", str(tmp_path / "blobs"),
        "--optimizer", "sgd", "--epochs", "5", "--val_freq", "2")
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert [r["epoch"] for r in log if "top1" in r] == [2, 4, 5] and len(log) == 5


def test_cached_mode_is_labelled_not_the_papers_protocol(tmp_path, capsys):
    """The fast mode prints that it is not the paper's protocol and marks its JSON; the full protocol does neither."""
    save_blobs(tmp_path / "blobs", 10, seed=1)
    run(tmp_path / "fast", "random", "--cached_features", "true", "--load_features", str(tmp_path / "blobs"),
        "--epochs", "1", "--output_json", str(tmp_path / "fast.json"))
    assert "cached-features protocol (no augmentation): not the paper's protocol" in capsys.readouterr().out
    assert json.load(open(tmp_path / "fast.json"))["cached_features"] == 1
    run(tmp_path / "full", "random", "--epochs", "1", "--output_json", str(tmp_path / "full.json"))
    assert "not the paper's protocol" not in capsys.readouterr().out
    assert json.load(open(tmp_path / "full.json"))["cached_features"] == 0


def test_full_protocol_leaves_the_backbone_unchanged_and_writes_a_safe_checkpoint(tmp_path, weights_file,
                                                                                    monkeypatch):
    """After 2 epochs of the paper's protocol every backbone weight and BatchNorm buffer equals the
    file's; linear_checkpoint.pth loads with weights_only=True (classifier 512 -> 10, optimizer,
    epoch 2, best, 2 history rows, args as a dict); the JSON holds the four accuracies."""
    used = []

    def recording_load_backbone(*args, **kwargs):
        used.append(features.backbone_from_args(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(linear_eval, "backbone_from_args", recording_load_backbone)
    run(tmp_path, weights_file, "--epochs", "2", "--output_json", str(tmp_path / "linear.json"))
    saved = torch.load(weights_file, weights_only=True)
    after = used[0].state_dict()
    assert after.keys() == saved.keys() and any("running_var" in k for k in saved)
    for key, value in saved.items():
        assert torch.equal(after[key].cpu(), value), key

    checkpoint = torch.load(tmp_path / "out" / "linear_checkpoint.pth", weights_only=True)
    assert checkpoint["linear"]["weight"].shape == (10, 512) and checkpoint["epoch"] == 2
    assert len(checkpoint["history"]) == 2 and isinstance(checkpoint["args"], dict)
    assert {"optimizer", "best"} <= set(checkpoint) and checkpoint["args"]["lr"] == 1.0
    results = json.load(open(tmp_path / "linear.json"))
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2]
    # top1 / top5: the last epoch's val numbers; best_*: those of the epoch with the best val top-1
    best = max(log, key=lambda r: r["top1"])
    assert (results["top1"], results["top5"]) == (log[-1]["top1"], log[-1]["top5"])
    assert (results["best_top1"], results["best_top5"]) == (best["top1"], best["top5"])


def test_a_backbone_left_in_train_mode_is_caught(tmp_path, weights_file, monkeypatch):
    """The guard can fail: a backbone whose eval() is ignored updates its BatchNorm statistics, and
    the run stops after the first epoch naming them, before any checkpoint is written."""
    def stubborn_load_backbone(*args, **kwargs):
        backbone = features.backbone_from_args(*args, **kwargs)
        backbone.train = lambda mode=True: backbone  # eval() calls train(False): ignored
        return backbone

    monkeypatch.setattr(linear_eval, "backbone_from_args", stubborn_load_backbone)
    with pytest.raises(RuntimeError, match="backbone changed.*running_"):
        run(tmp_path, weights_file, "--epochs", "1")
    assert not (tmp_path / "out" / "linear_checkpoint.pth").exists()


def test_a_killed_run_resumes_exactly_and_a_finished_run_only_reports(tmp_path, monkeypatch, capsys):
    """Killed during epoch 2 of 2, the same command resumes at epoch 1 (one more epoch trained, not
    two) and ends with the classifier of an uninterrupted run; run again, it trains nothing and
    reports the same numbers."""
    straight = run(tmp_path / "straight", "random", "--epochs", "2")
    weights = torch.load(tmp_path / "straight" / "out" / "linear_checkpoint.pth", weights_only=True)["linear"]

    calls = []
    original = linear_eval.train_one_epoch

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(linear_eval, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", "random", "--epochs", "2")
    path = tmp_path / "resumed" / "out" / "linear_checkpoint.pth"
    assert torch.load(path, weights_only=True)["epoch"] == 1
    capsys.readouterr()
    resumed = run(tmp_path / "resumed", "random", "--epochs", "2")
    assert "resuming at epoch 1" in capsys.readouterr().out and len(calls) == 3  # 1 + killed + 1 resumed
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["epoch"] == 2 and [r["epoch"] for r in checkpoint["history"]] == [1, 2]
    for key, value in weights.items():
        assert torch.allclose(checkpoint["linear"][key], value, atol=1e-6), key
    assert resumed == pytest.approx(straight)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(linear_eval, "train_one_epoch", must_not_train)
    again = run(tmp_path / "resumed", "random", "--epochs", "2")
    assert "finished: re-reporting" in capsys.readouterr().out and again == resumed


def test_resuming_with_another_learning_rate_is_refused(tmp_path):
    """A checkpoint trained with --lr 1.0 is not continued with --lr 0.5: the flag is named."""
    save_blobs(tmp_path / "blobs", 10, seed=2)
    cached = ["--cached_features", "true", "--load_features", str(tmp_path / "blobs"), "--epochs", "1"]
    run(tmp_path, "random", *cached)
    with pytest.raises(DataError, match=r"--lr 1.0 \(now 0.5\)"):
        run(tmp_path, "random", *cached, "--lr", "0.5")


def test_learning_rate_defaults_and_batch_scaling():
    """LARS: lr 1.0, not scaled by the batch, momentum 0.9, no weight decay, 100 epochs (the
    authors); SGD: 0.3 x global batch / 256 (DINO)."""
    lars = linear_eval.get_args(["--pretrained_weights", "random"])
    sgd = linear_eval.get_args(["--pretrained_weights", "random", "--optimizer", "sgd"])
    assert (lars.optimizer, lars.lr, sgd.lr) == ("lars", 1.0, 0.3)
    assert (lars.momentum, lars.weight_decay, lars.epochs) == (0.9, 0.0, 100)
    assert linear_eval.peak_lr(lars, 2048) == 1.0 and linear_eval.peak_lr(lars, 64) == 1.0
    assert linear_eval.peak_lr(sgd, 512) == pytest.approx(0.6) and linear_eval.peak_lr(sgd, 64) == pytest.approx(0.075)


def test_classifier_init_and_lars_groups():
    """nn.Linear(512, 1000): weights N(0, 0.01), bias 0; LARS adapts and decays the weight only."""
    torch.manual_seed(0)
    linear = linear_eval.build_linear(512, 1000)
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.01) and abs(linear.weight.mean().item()) < 1e-4
    assert torch.equal(linear.bias, torch.zeros(1000))
    args = linear_eval.get_args(["--pretrained_weights", "random", "--weight_decay", "1e-4"])
    optimizer = optim.build_optimizer(args.optimizer, linear, args.momentum, args.weight_decay)
    weight_group, bias_group = optimizer.param_groups
    assert weight_group["params"] == [linear.weight] and not weight_group["lars_exclude"]
    assert weight_group["weight_decay"] == 1e-4 and weight_group["momentum"] == 0.9
    assert bias_group["params"] == [linear.bias] and bias_group["lars_exclude"] and bias_group["weight_decay"] == 0


def test_cached_batches_are_dealt_out_like_distributed_sampler():
    """10 features over 3 processes, batches of 2: each process gets 4 indices (10 padded to 12) in
    batches of 2, 2; together they cover all 10; every epoch reshuffles, the same on every process."""
    shards = [linear_eval.feature_batches(10, 2, seed=0, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert [[len(b) for b in s] for s in shards] == [[2, 2]] * 3
    assert set(torch.cat([torch.cat(s) for s in shards]).tolist()) == set(range(10))
    epoch0 = torch.cat(linear_eval.feature_batches(10, 10, seed=0, epoch=0))
    assert sorted(epoch0.tolist()) == list(range(10))
    assert not torch.equal(epoch0, torch.cat(linear_eval.feature_batches(10, 10, seed=0, epoch=1)))
    assert torch.equal(epoch0, torch.cat(linear_eval.feature_batches(10, 10, seed=0, epoch=0)))


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs 0 must be at least 1"),
    (["--lr", "0"], "--lr 0.0 must be > 0"),
    (["--lr", "-0.1"], "--lr -0.1 must be > 0"),
    (["--val_freq", "0"], "--val_freq 0 must be at least 1"),
    (["--optimizer", "adam"], "invalid choice: 'adam'"),
    (["--load_features", "x"], "apply to --cached_features only"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0 must be at least 1"),
])
def test_bad_flags_are_refused_by_name(flags, message, capsys):
    """Each bad flag stops argument parsing with a message naming the value."""
    with pytest.raises(SystemExit):
        linear_eval.get_args(["--pretrained_weights", "random", *flags])
    assert message in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path):
    """An empty --data_path raises DataError naming the folder (the script prints `error: ...`)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="does not exist"):
        linear_eval.main(["--pretrained_weights", "random", "--arch", "resnet18", "--dataset", "imagefolder",
                          "--data_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path)])


# ============ gradient accumulation: the paper's global batch of 2048 on fewer GPUs ============

def checkpoint_weights(folder):
    return torch.load(folder / "out" / "linear_checkpoint.pth", weights_only=True)["linear"]


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_accumulating_4_batches_of_10_equals_batches_of_40(tmp_path, optimizer, capsys):
    """88 cached features, 2 epochs: 4 accumulated batches of 10 (9 batches, steps on 40, 40, 8
    images) end with the classifier of batches of 40 (3 batches), the same images in the same
    order: one optimizer step per group on its mean gradient, the cosine indexed by optimizer
    steps (3 per epoch), and the SGD lr scaled by the global batch 40 = 1 x 10 x 4. Batches of 10
    without accumulation (9 steps) end elsewhere, so the comparison can fail."""
    save_blobs(tmp_path / "blobs", 22, seed=3)
    cached = ["--cached_features", "true", "--load_features", str(tmp_path / "blobs"), "--epochs", "2",
              "--optimizer", optimizer]
    run(tmp_path / "big", "random", *cached, "--batch_size_per_gpu", "40", "--gradient_accumulation_steps", "1")
    capsys.readouterr()
    run(tmp_path / "accumulated", "random", *cached, "--batch_size_per_gpu", "10",
        "--gradient_accumulation_steps", "4")
    printed = capsys.readouterr().out
    assert "global batch 40 = 1 process x 10 x 4 accumulation steps" in printed
    assert "of 3 optimizer steps (9 batches)" in printed
    big, accumulated = checkpoint_weights(tmp_path / "big"), checkpoint_weights(tmp_path / "accumulated")
    for key in big:
        assert torch.allclose(accumulated[key], big[key], atol=1e-6), key
    run(tmp_path / "small", "random", *cached, "--batch_size_per_gpu", "10",  # 9 steps on 10: another classifier
        "--gradient_accumulation_steps", "1")
    assert not torch.allclose(checkpoint_weights(tmp_path / "small")["weight"], big["weight"], atol=1e-4)


def test_augmented_protocol_accumulates_like_the_bigger_batch(tmp_path):
    """The paper's path (augmented images through the frozen ResNet-18), 40 synthetic images, SGD:
    2 steps on 4 accumulated batches of 5 give the classifier of 2 steps on batches of 20; the
    sampler order and the augmentations do not depend on the batch size."""
    flags = ["--epochs", "1", "--optimizer", "sgd"]
    run(tmp_path / "big", "random", *flags, "--batch_size_per_gpu", "20")
    run(tmp_path / "accumulated", "random", *flags, "--batch_size_per_gpu", "5", "--gradient_accumulation_steps", "4")
    big, accumulated = checkpoint_weights(tmp_path / "big"), checkpoint_weights(tmp_path / "accumulated")
    for key in big:
        assert torch.allclose(accumulated[key], big[key], atol=1e-5), key


def test_optimizer_steps_per_epoch_is_the_ceiling_and_the_schedule_counts_them():
    """ceil(batches / N): 9 batches with N = 4 make 3 steps (4 + 4 + 1 batches), the authors'
    ImageNet run (2503 batches per GPU, N = 4) and 1 GPU x 128 x 16 (10010 batches) both 626.
    train_one_epoch reads the learning rate at schedule[first_step + optimizer step]."""
    assert linear_eval.optimizer_steps_per_epoch(9, 4) == 3
    assert linear_eval.optimizer_steps_per_epoch(8, 4) == 2
    assert linear_eval.optimizer_steps_per_epoch(1, 16) == 1
    assert linear_eval.optimizer_steps_per_epoch(2503, 4) == linear_eval.optimizer_steps_per_epoch(10010, 16) == 626
    linear = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.0)
    used = []
    original_step = optimizer.step
    optimizer.step = lambda: (used.append(optimizer.param_groups[0]["lr"]), original_step())
    batches = [(torch.randn(3, 2), torch.tensor([0, 1, 0])) for _ in range(9)]
    schedule = [0.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    linear_eval.train_one_epoch(linear, optimizer, batches, schedule, 3, "cpu", accumulation_steps=4)
    assert used == [0.125, 0.0625, 0.03125]


def test_resuming_with_another_accumulation_is_refused(tmp_path, capsys):
    """A run with 2 accumulation steps is not continued with 4 (another global batch and schedule);
    a checkpoint written before the flag existed counts as 1 step and still resumes."""
    save_blobs(tmp_path / "blobs", 10, seed=4)
    cached = ["--cached_features", "true", "--load_features", str(tmp_path / "blobs"), "--epochs", "1"]
    run(tmp_path, "random", *cached, "--gradient_accumulation_steps", "2")
    with pytest.raises(DataError, match=r"--gradient_accumulation_steps 2 \(now 4\)"):
        run(tmp_path, "random", *cached, "--gradient_accumulation_steps", "4")
    path = tmp_path / "out" / "linear_checkpoint.pth"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["args"]["gradient_accumulation_steps"]
    torch.save(checkpoint, path)
    capsys.readouterr()
    run(tmp_path, "random", *cached, "--gradient_accumulation_steps", "1")
    assert "finished: re-reporting" in capsys.readouterr().out


def test_default_global_batch_is_the_papers_2048():
    """With LARS and no batch flag, the accumulation steps are derived so that processes x
    --batch_size_per_gpu x steps = 2048: 1 x 128 x 16, 8 x 128 x 2, 8 x 256 x 1 (WORLD_SIZE, as
    torchrun sets it); --global_batch 512 gives 4 steps of 128; SGD accumulates nothing by default
    (its lr scales with the batch instead)."""
    def batch(*flags):
        args = linear_eval.get_args(["--pretrained_weights", "random", *flags])
        return args.global_batch, args.gradient_accumulation_steps

    assert batch() == (2048, 16) and linear_eval.get_args(["--pretrained_weights", "random"]).batch_size_per_gpu == 128
    assert batch("--global_batch", "512") == (512, 4)
    assert batch("--gradient_accumulation_steps", "4") == (512, 4)
    assert batch("--optimizer", "sgd") == (128, 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORLD_SIZE", "8")
        assert batch() == (2048, 2) and batch("--batch_size_per_gpu", "256") == (2048, 1)


@pytest.mark.parametrize("flags, message", [
    (["--batch_size_per_gpu", "100"], "--global_batch 2048 is not a multiple of 1 process x --batch_size_per_gpu "
                                      "100 = 100"),
    (["--global_batch", "1024", "--gradient_accumulation_steps", "4"], "--global_batch 1024 and "
                                                                       "--gradient_accumulation_steps 4 disagree"),
    (["--global_batch", "64"], "--global_batch 64 is not a multiple"),
])
def test_a_global_batch_that_cannot_be_made_is_refused_by_name(flags, message, capsys):
    """2048 images do not split into batches of 100; the two batch flags must agree; a global batch
    smaller than one forward pass cannot be accumulated."""
    with pytest.raises(SystemExit):
        linear_eval.get_args(["--pretrained_weights", "random", *flags])
    assert message in capsys.readouterr().err


def test_lars_at_another_global_batch_warns(tmp_path):
    """LARS's lr 1.0 is tuned for 2048 and not rescaled: a probe at a global batch of 8 (one process
    x 8 x 1) warns that it is not the paper's protocol; at the default 2048 (8 x 256) it does not."""
    save_blobs(tmp_path / "blobs", 10, seed=5)
    cached = ["--cached_features", "true", "--load_features", str(tmp_path / "blobs"), "--epochs", "1"]
    with pytest.warns(UserWarning, match="LARS at lr 1 with a global batch of 8, not the paper's 2048"):
        run(tmp_path / "small", "random", *cached, "--gradient_accumulation_steps", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tmp_path / "paper", "random", *cached)
    assert not [w for w in caught if "LARS at lr" in str(w.message)]
