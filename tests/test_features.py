"""features.py: checkpoint loading (ours, the authors', other methods' layouts, 'random'), safe
unpickling, feature extraction in dataset order, and the feature cache.

Every layout test starts from one torchvision ResNet-18 state dict, writes it in a method's key
layout, and checks that load_backbone gives back exactly the same weights.
"""
import argparse
import types

import pytest
import torch

import features
import model
from data import DataError, SyntheticImages, eval_transform


@pytest.fixture(scope="module")
def reference():
    """A ResNet-18 backbone with non-default weights and BN statistics, and its state dict."""
    torch.manual_seed(0)
    backbone = model.build_backbone("resnet18")
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, b in backbone.named_buffers():
            if b.dtype.is_floating_point:
                b.add_(torch.rand_like(b))
    return backbone.state_dict()


def prefixed(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


def extra_head(prefix):
    """Tensors a method stores next to its backbone (projector, prototypes, queue): must be ignored."""
    return {prefix + "0.weight": torch.randn(8, 4), prefix + "0.bias": torch.randn(8)}


def layouts(sd):
    """{model_format: checkpoint} of the same backbone `sd`, in each method's release layout."""
    fc = {"fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}  # a classifier/projector to drop
    carp = {**prefixed(sd, "backbone."), **extra_head("head.mlp.")}
    return {
        "carp": {"teacher": carp, "student": prefixed(carp, "module."), "epoch": 3,
                 "args": {"arch": "resnet18", "small_image_stem": False}},
        "dino": {"teacher": carp, "student": prefixed(carp, "module."), "epoch": 100},
        "torchvision": {**sd, **fc},
        "swav": {**prefixed(sd, "module."), **extra_head("module.projection_head."),
                 "module.prototypes.weight": torch.randn(30, 4)},
        "deepclusterv2": {"state_dict": {**prefixed(sd, "module."), **extra_head("module.projection_head.")},
                          "epoch": 800},
        "selav2": {**prefixed(sd, "module."), **extra_head("module.projection_head.")},
        "mocov3": {"state_dict": {**prefixed({**sd, **fc}, "module.base_encoder."),
                                  **prefixed(sd, "module.momentum_encoder."),
                                  **extra_head("module.predictor.")}, "arch": "resnet50"},
        "pclv2": {"state_dict": {**prefixed({**sd, **fc}, "module.encoder_q."), **prefixed(sd, "module.encoder_k."),
                                 "module.queue": torch.randn(4, 16)}},
        "barlowtwins": {"model": {**prefixed(sd, "module.backbone."), **extra_head("module.projector.")},
                        "epoch": 1000},
        "vicreg": {"model": {**prefixed(sd, "module.backbone."), **extra_head("module.projector.")}},
        "infomin": {"model": {**prefixed(sd, "module.encoder."), **extra_head("module.head.")},
                    "model_ema": {**prefixed(sd, "module.encoder.")}},
        "obow": {"network": dict(sd)},
    }


def test_every_model_format_is_covered_by_a_layout_test(reference):
    assert set(layouts(reference)) == set(features.MODEL_FORMATS)


@pytest.mark.parametrize("model_format", list(features.MODEL_FORMATS))
def test_each_checkpoint_layout_loads_identical_backbone_weights(tmp_path, reference, model_format, capsys):
    """Explicit --model_format and 'auto' both give back every tensor of the reference backbone."""
    path = str(tmp_path / f"{model_format}.pth")
    torch.save(layouts(reference)[model_format], path)
    for fmt in (model_format, "auto"):
        torch.manual_seed(1)  # another random init: equality below comes from the file
        backbone = features.load_backbone(path, "resnet18", model_format=fmt)
        loaded = backbone.state_dict()
        assert set(loaded) == set(reference)
        for key, value in reference.items():
            assert torch.equal(loaded[key], value), (fmt, key)
        out = capsys.readouterr().out
        assert f"loaded {len(reference)}/{len(reference)} backbone tensors" in out
        assert "missing keys" not in out


def test_auto_detection_names_the_layout_it_used(tmp_path, reference, capsys):
    """MoCo-v3's base encoder is chosen (not its momentum encoder or a plain-dict reading)."""
    path = str(tmp_path / "moco.pth")
    torch.save(layouts(reference)["mocov3"], path)
    features.load_backbone(path, "resnet18")
    assert "(format mocov3)" in capsys.readouterr().out


def test_student_key_reads_the_ddp_prefixed_student(tmp_path, reference):
    """--checkpoint_key student: 'module.backbone.*' of our checkpoints, prefix stripped."""
    ckpt = layouts(reference)["carp"]
    ckpt["student"] = prefixed({**prefixed({k: v + 1 if v.is_floating_point() else v for k, v in reference.items()},
                                           "backbone.")}, "module.")
    path = str(tmp_path / "ckpt.pth")
    torch.save(ckpt, path)
    backbone = features.load_backbone(path, checkpoint_key="student")
    assert torch.equal(backbone.conv1.weight, reference["conv1.weight"] + 1)


def test_saved_args_override_the_architecture_flags(tmp_path, reference):
    """Our checkpoints store arch in args: --arch resnet50 is overridden by the saved resnet18."""
    path = str(tmp_path / "ckpt.pth")
    torch.save(layouts(reference)["carp"], path)
    assert features.load_backbone(path, arch="resnet50").embed_dim == 512


def test_authors_namespace_args_are_allow_listed(tmp_path, reference):
    """The authors pickle an argparse.Namespace under 'args': it loads with weights_only, arch used."""
    ckpt = layouts(reference)["carp"]
    ckpt["args"] = argparse.Namespace(arch="resnet18", out_dim=65536)
    path = str(tmp_path / "authors.pth")
    torch.save(ckpt, path)
    backbone = features.load_backbone(path, arch="resnet50")
    assert torch.equal(backbone.conv1.weight, reference["conv1.weight"])


def test_a_checkpoint_with_an_arbitrary_pickled_object_is_refused(tmp_path, reference):
    """weights_only: any class other than argparse.Namespace is never unpickled."""
    ckpt = layouts(reference)["carp"]
    ckpt["args"] = types.SimpleNamespace(arch="resnet18")
    path = str(tmp_path / "evil.pth")
    torch.save(ckpt, path)
    with pytest.raises(DataError, match=r"holds Python objects \(such as types.SimpleNamespace\) that torch.load.weights_only=True. does not"):
        features.load_backbone(path, arch="resnet18")


def test_a_checkpoint_with_no_backbone_weight_is_an_error(tmp_path):
    """Nothing of a ResNet-18 in the file: a DataError listing the file's keys, never silent random weights."""
    path = str(tmp_path / "other.pth")
    torch.save({"state_dict": {"encoder.layers.0.attn.weight": torch.zeros(3)}}, path)
    with pytest.raises(DataError, match="no resnet18 backbone weight.*state_dict"):
        features.load_backbone(path, "resnet18")


def test_wrong_checkpoint_key_is_an_error_that_names_it(tmp_path, reference):
    """A checkpoint with only 'student' asked for its 'teacher': the message names the key."""
    path = str(tmp_path / "student_only.pth")
    torch.save({"student": prefixed(reference, "backbone.")}, path)
    with pytest.raises(DataError, match="'teacher'"):
        features.load_backbone(path, "resnet18", model_format="carp")


def test_missing_file_and_unknown_format_are_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        features.load_backbone(str(tmp_path / "nope.pth"), "resnet18")
    torch.save({}, tmp_path / "x.pth")
    with pytest.raises(DataError, match="unknown --model_format 'simclr'"):
        features.load_backbone(str(tmp_path / "x.pth"), "resnet18", model_format="simclr")


def test_missing_keys_are_printed(tmp_path, reference, capsys):
    """A partial backbone loads what it has and lists what is missing."""
    partial = {k: v for k, v in reference.items() if not k.startswith("layer4")}
    path = str(tmp_path / "partial.pth")
    torch.save(partial, path)
    features.load_backbone(path, "resnet18", model_format="torchvision")
    out = capsys.readouterr().out
    assert "missing keys: ['layer4.0.conv1.weight'" in out


def test_random_weights_warn_that_they_are_the_baseline():
    with pytest.warns(UserWarning, match="randomly initialised resnet18"):
        backbone = features.load_backbone("random", "resnet18")
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 512)


# ---------------------------------------------------------------- extraction and cache --------------

class Constant(torch.nn.Module):
    """A 'backbone' whose feature is the image's mean pixel: rows can be checked one by one."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None].repeat(1, 3)  # (b, 3)


def test_extract_features_puts_every_image_in_its_own_row():
    """An odd-sized dataset and batch size: row i is image i's feature and label i's label."""
    dataset = SyntheticImages("val", 13, 16, transform=eval_transform(16))
    feats, labels = features.extract_features(Constant(), dataset, batch_size=4, num_workers=0, progress=False)
    assert feats.shape == (13, 3) and labels.shape == (13,)
    for i in [0, 5, 12]:
        image, label = dataset[i]
        assert torch.allclose(feats[i], image.mean().repeat(3)) and labels[i] == label


def test_dump_then_load_features_round_trips(tmp_path):
    """--dump_features writes train/val features; --load_features reads them without a backbone."""
    parser = features.add_eval_args(argparse.ArgumentParser())
    args = features.follow_checkpoint(parser.parse_args(
        ["--pretrained_weights", "random", "--arch", "resnet18", "--dataset", "synthetic", "--image_size", "16",
         "--num_workers", "0", "--dump_features", str(tmp_path)]))
    with pytest.warns(UserWarning):
        first = features.frozen_features(args, "cpu", splits=("val",))
    args.load_features, args.pretrained_weights = str(tmp_path), "/nonexistent.pth"  # never read
    second = features.frozen_features(args, "cpu", splits=("val",))
    assert torch.equal(first["val"][0], second["val"][0]) and torch.equal(first["val"][1], second["val"][1])
    args.load_features = str(tmp_path / "empty")
    with pytest.raises(DataError, match="--dump_features"):
        features.frozen_features(args, "cpu", splits=("val",))


def test_weights_of_another_architecture_are_an_error_naming_the_shapes(tmp_path, reference):
    """A ResNet-18 file read as a small-stem ResNet-18: conv1 is 7x7 in the file, 3x3 in the model."""
    path = str(tmp_path / "r18.pth")
    torch.save(reference, path)
    with pytest.raises(DataError, match=r"conv1.weight \(64, 3, 7, 7\) in the file, \(64, 3, 3, 3\)"):
        features.load_backbone(path, "resnet18", small_image_stem=True)


def test_auto_stem_follows_the_first_conv_of_the_file_then_the_image_size(tmp_path):
    """small_image_stem 'auto' (the flag's default): a file without args whose conv1 is 3x3 loads
    into the small-image stem at any image size, a 7x7 one into the ImageNet stem; 'random' takes
    the small-image stem for images of at most 64 pixels."""
    torch.manual_seed(0)
    for small in (True, False):
        path = str(tmp_path / f"small{small}.pth")
        torch.save(model.build_backbone("resnet18", small_image_stem=small).state_dict(), path)
        for image_size in (32, 224):
            backbone = features.load_backbone(path, "resnet18", image_size=image_size)
            assert backbone.conv1.kernel_size == ((3, 3) if small else (7, 7))
    with pytest.warns(UserWarning, match="small_image_stem=True"):
        assert features.load_backbone("random", "resnet18", image_size=32).conv1.kernel_size == (3, 3)
    with pytest.warns(UserWarning, match="small_image_stem=False"):
        assert features.load_backbone("random", "resnet18", image_size=96).conv1.kernel_size == (7, 7)


def test_random_baseline_is_the_same_network_in_every_process_and_run():
    """'random' is seeded: two loads (two torchrun processes, two runs) give identical weights,
    and the caller's random stream is left untouched."""
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    with pytest.warns(UserWarning):
        a = features.load_backbone("random", "resnet18")
        b = features.load_backbone("random", "resnet18")
    assert torch.rand(1) == expected_next
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("layout", ["current", "before the renames"])
def test_a_small_cnn_checkpoint_round_trips_through_every_evaluation_script(tmp_path, monkeypatch, capsys, layout):
    """pretrain.py --arch small_cnn stores the architecture in the checkpoint's args: load_backbone
    rebuilds a SmallCNN with exactly the teacher's backbone weights whatever --arch says (all 24
    tensors: 4 convs, 4 BatchNorms of 5), and every evaluation script runs on it; so does a
    checkpoint in the layout pretrain.py wrote before the method-first release."""
    import fewshot_eval
    import kmeans_eval
    import knn_eval
    import linear_eval
    import pretrain
    import retrieval_eval
    from test_pretrain import in_the_layout_before_the_renames
    from test_retrieval_eval import make_copydays

    run = tmp_path / "run"
    pretrain.main(["--dataset", "synthetic", "--synthetic_images", "16", "--arch", "small_cnn", "--global_crops_size",
                   "16", "--local_crops_size", "8", "--local_crops_number", "1", "--batched_views", "true",
                   "--out_dim", "32", "--partition_size", "8", "--hidden_dim", "16", "--bottleneck_dim", "8",
                   "--batch_size_per_gpu", "4", "--num_workers", "0", "--epochs", "1", "--output_dir", str(run)])
    path = str(run / "checkpoint.pth")
    if layout != "current":
        in_the_layout_before_the_renames(path)
    args = knn_eval.get_args(["--pretrained_weights", path])  # the data flags follow the checkpoint
    assert (args.dataset, args.image_size, args.synthetic_images) == ("synthetic", 16, 16)
    teacher = torch.load(path, weights_only=True)["teacher"]
    backbone = features.load_backbone(path, arch="resnet50")
    assert isinstance(backbone, model.SmallCNN)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, teacher[f"backbone.{key}"]), key
    assert "loaded 24/24 backbone tensors" in capsys.readouterr().out

    common = ["--pretrained_weights", path, "--dataset", "synthetic", "--synthetic_images", "20", "--image_size", "16",
              "--num_workers", "0"]
    monkeypatch.setattr("sys.argv", ["knn_eval.py", *common, "--nb_knn", "5"])
    knn_eval.main()
    kmeans_eval.main(common + ["--n_init", "1"])
    linear_eval.main(common + ["--cached_features", "true", "--optimizer", "sgd", "--epochs", "1",
                               "--output_dir", str(tmp_path / "linear")])
    fewshot_eval.main(common + ["--protocol", "nshot_logreg", "--shots", "1", "--runs", "1"])
    make_copydays(tmp_path / "copydays")
    retrieval_eval.main(["--pretrained_weights", path, "--dataset", "copydays", "--data_path", str(tmp_path),
                         "--image_size", "16", "--num_workers", "0"])
    out = capsys.readouterr().out
    assert out.count("loaded 24/24 backbone tensors") == 5, out


def test_subsets_are_selected_before_extraction_and_refused_on_loaded_features(tmp_path, monkeypatch):
    """subsets={'train': rows 1, 4, 6}: the backbone sees 3 of the 10 synthetic train images (k-means
    on 10 % of ImageNet must not extract the other 90 %), their features are those of the full
    split's rows 1, 4, 6, and the dump holds only them; features read with --load_features cannot
    be subset again."""
    parser = features.add_eval_args(argparse.ArgumentParser())
    args = parser.parse_args(["--pretrained_weights", "random", "--arch", "small_cnn", "--dataset", "synthetic",
                              "--synthetic_images", "10", "--image_size", "16", "--num_workers", "0"])
    sizes, extract = [], features.extract_features

    def recording_extract_features(backbone, dataset, *rest, **kwargs):
        sizes.append(len(dataset))
        return extract(backbone, dataset, *rest, **kwargs)

    monkeypatch.setattr(features, "extract_features", recording_extract_features)
    with pytest.warns(UserWarning):
        full = features.frozen_features(args, "cpu", splits=("train",))["train"]
        args.dump_features = str(tmp_path)
        subset = features.frozen_features(args, "cpu", splits=("train",), subsets={"train": lambda d: [1, 4, 6]})
    assert sizes == [10, 3]
    assert torch.allclose(subset["train"][0], full[0][[1, 4, 6]], atol=1e-6)
    assert torch.equal(subset["train"][1], full[1][[1, 4, 6]])
    assert torch.load(features.features_file(str(tmp_path), "train"), weights_only=True)["features"].shape[0] == 3
    args.load_features = str(tmp_path)
    with pytest.raises(DataError, match="cannot select train images among the features in"):
        features.frozen_features(args, "cpu", splits=("train",), subsets={"train": lambda d: [0]})
