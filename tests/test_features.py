"""features.py: checkpoint loading (ours, the authors', other methods' layouts, 'random'), safe
unpickling, feature extraction in dataset order, and the feature cache.

Every layout test starts from one torchvision ResNet-18 state dict, writes it in a method's key
layout, and checks that load_backbone gives back exactly the same weights.
"""
import argparse
import types

import pytest
import torch
import torchvision

import backbones
import features
import knn
import model
from data import DataError, SyntheticImages, eval_transform


@pytest.fixture(scope="module")
def reference():
    """A ResNet-18 backbone with non-default weights and BN statistics, and its state dict."""
    torch.manual_seed(0)
    backbone = backbones.build_backbone("resnet18")
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


def test_missing_keys_are_an_error_or_printed_when_allowed(tmp_path, reference, capsys):
    """A partial backbone (no layer4: 95 of ResNet-18's 120 tensors) is refused, naming the counts;
    with allow_partial (--allow_partial_load true) it loads what it has and lists what is missing."""
    partial = {k: v for k, v in reference.items() if not k.startswith("layer4")}
    path = str(tmp_path / "partial.pth")
    torch.save(partial, path)
    with pytest.raises(DataError, match="fills 95 of the 120 tensors of a resnet18"):
        features.load_backbone(path, "resnet18", model_format="torchvision")
    features.load_backbone(path, "resnet18", model_format="torchvision", allow_partial=True)
    out = capsys.readouterr().out
    assert "missing keys: ['layer4.0.conv1.weight'" in out


def test_random_weights_warn_that_they_are_the_baseline():
    with pytest.warns(UserWarning, match="randomly initialised resnet18"):
        backbone = features.load_backbone("random", "resnet18")
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 512)


# ---------------------------------------------------------------- any ResNet a user brings ---------
# Each file below is written with the key names of a project's public code (the module attribute
# names its training script saves), holding the reference backbone; with the default flags it must
# give exactly the features and k-NN accuracies of the same weights saved as a plain torchvision
# state dict.

def perturbed(state_dict, seed):
    """Other weights of the same shapes: a momentum copy, a second network."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=generator) * 0.01 if v.is_floating_point() else v
            for k, v in state_dict.items()}


def with_classifier(state_dict, n_classes=10):
    """The state dict of a full torchvision ResNet-18 (fc included) holding `state_dict`."""
    return {**state_dict, "fc.weight": torch.randn(n_classes, 512), "fc.bias": torch.randn(n_classes)}


def as_children_sequential(state_dict):
    """What `nn.Sequential(*list(resnet.children())[:-1]).state_dict()` gives for a torchvision ResNet
    holding `state_dict` (lightly's examples; SeLa v1's `features`): built with that very call."""
    resnet = torchvision.models.resnet18(num_classes=10)
    resnet.load_state_dict(with_classifier(state_dict))
    return torch.nn.Sequential(*list(resnet.children())[:-1]).state_dict()


def as_resnet_generator_sequential(state_dict):
    """lightly's ResNetGenerator('resnet-18') wrapped as nn.Sequential(*list(resnet.children())[:-1]):
    its children are conv1, bn1, layer1-4 and linear (lightly/models/resnet.py), so the keys are
    0.* (conv1), 1.* (bn1), 2.*-5.* (layer1-4), and each block's downsample branch is `shortcut`."""
    index = {"conv1": "0", "bn1": "1", "layer1": "2", "layer2": "3", "layer3": "4", "layer4": "5"}
    return {index[k.split(".")[0]] + k[k.index("."):].replace(".downsample.", ".shortcut."): v
            for k, v in state_dict.items()}


def head(prefix, dims=(512, 16, 8)):
    """A projector / predictor MLP (Linear, BatchNorm1d, ReLU, Linear) under `prefix`."""
    bn = {"weight": torch.ones(dims[1]), "bias": torch.zeros(dims[1]), "running_mean": torch.zeros(dims[1]),
          "running_var": torch.ones(dims[1]), "num_batches_tracked": torch.tensor(7)}
    return {f"{prefix}0.weight": torch.randn(dims[1], dims[0]), f"{prefix}0.bias": torch.zeros(dims[1]),
            **{f"{prefix}1.{k}": v for k, v in bn.items()},
            f"{prefix}3.weight": torch.randn(dims[2], dims[1]), f"{prefix}3.bias": torch.zeros(dims[2])}


def seed_system_layouts(sd, small_sd):
    """{system: (checkpoint, the reference state dict it holds)}. sd: an ImageNet-stem ResNet-18;
    small_sd: a small-image-stem one (lightly's ResNetGenerator has that stem)."""
    ema, small_ema = perturbed(sd, 1), perturbed(small_sd, 1)
    optimizer = {"state": {0: {"momentum_buffer": torch.randn(64, 3, 7, 7)}}, "param_groups": [{"lr": 0.1}]}
    lightning = {"epoch": 199, "global_step": 1000, "pytorch-lightning_version": "2.1.0",
                 "optimizer_states": [optimizer], "lr_schedulers": [{"last_epoch": 199}]}
    return {
        # CoKe (idstcv/CoKe, MoCo-v3 code base): model.state_dict() of CoKe(base_encoder) under DDP: the
        # torchvision encoder with its fc replaced by a projection MLP, a predictor, the cluster
        # assignments and the centres of each clustering head; no momentum encoder.
        "coke": ({"epoch": 800, "arch": "resnet50", "optimizer": optimizer, "state_dict": {
            **prefixed(sd, "module.encoder."), **head("module.encoder.fc.", (512, 16, 8)),
            **head("module.predictor.", (8, 16, 8)),
            "module.assign_labels": torch.zeros(3, 100, dtype=torch.long),
            **{f"module.{name}_{i}": torch.randn(8, 30) for name in ("pre_center", "cur_center") for i in range(3)},
            **{f"module.{name}_{i}": torch.zeros(30) for name in ("dual", "counter") for i in range(3)}}}, sd),
        # solo-learn (BaseMomentumMethod, here BYOL) saved by Lightning: backbone (fc = Identity), projector,
        # the online linear classifier, predictor, and the momentum backbone and projector.
        "solo-learn": ({**lightning, "state_dict": {
            **prefixed(sd, "backbone."), **head("projector."), "classifier.weight": torch.randn(10, 512),
            "classifier.bias": torch.zeros(10), **head("predictor.", (8, 16, 8)),
            **prefixed(ema, "momentum_backbone."), **head("momentum_projector.")}}, sd),
        # a LightningModule holding `self.model = torchvision.models.resnet18()` and a timm-style EMA copy
        "lightning": ({**lightning, "state_dict": {**prefixed(with_classifier(sd), "model."),
                                                   **prefixed(with_classifier(ema), "model_ema.module.")}}, sd),
        # lightly's SMoG example (examples/pytorch/smog.py): backbone = nn.Sequential(*list(resnet.children())[:-1])
        # of a torchvision ResNet-18, its momentum copy, the heads and the group features; model.state_dict().
        "lightly-smog": ({**prefixed(as_children_sequential(sd), "backbone."),
                          **head("projection_head.layers."), **head("prediction_head.layers.", (8, 16, 8)),
                          **prefixed(as_children_sequential(ema), "backbone_momentum."),
                          **head("projection_head_momentum.layers."),
                          "smog.group_features": torch.randn(300, 8)}, sd),
        # lightly's Lightning SMoG example (examples/pytorch_lightning/smog.py): the same module around a
        # ResNetGenerator('resnet-18'), saved by Lightning.
        "lightly-smog-resnet-generator": ({**lightning, "state_dict": {
            **prefixed(as_resnet_generator_sequential(small_sd), "backbone."), **head("projection_head.layers."),
            **prefixed(as_resnet_generator_sequential(small_ema), "backbone_momentum.")}}, small_sd),
        # SeLa v1 (yukimasano/self-label) training checkpoint of models/resnetv1.py under DataParallel:
        # features = Sequential(conv, bn, relu, maxpool, layer1-4, avgpool), one top_layer per head, labels L.
        "selav1": ({"epoch": 280, "arch": "resnetv1", "optimizer": optimizer, "L": torch.zeros(10, 100),
                    "state_dict": {**prefixed(as_children_sequential(sd), "module.features."),
                                   **{f"module.top_layer{i}.{p}": torch.randn(30, 512) if p == "weight"
                                      else torch.zeros(30) for i in range(10) for p in ("weight", "bias")}}}, sd),
        # SeLa v1's Aug++ releases (resnet50-10x3k_pp.pth): torchvision names with a 3000-way fc, labels L
        "selav1-aug++": ({"state_dict": with_classifier(sd, 3000), "L": torch.zeros(10, 100)}, sd),
    }


@pytest.fixture(scope="module")
def small_reference():
    """A small-image-stem ResNet-18 (3x3 conv1, no max-pool) with non-default weights."""
    torch.manual_seed(2)
    backbone = backbones.build_backbone("resnet18", small_image_stem=True)
    return perturbed(backbone.state_dict(), 3)


@pytest.fixture(scope="module")
def seed_systems(reference, small_reference):
    return seed_system_layouts(reference, small_reference)


def features_and_knn(backbone):
    """Features of 32 fixed 16-pixel images and the k-NN accuracies of the last 8 against the first 24."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 3, 16, 16, generator=generator), torch.randint(0, 4, (32,), generator=generator)
    with torch.no_grad():
        feats = backbone.eval()(images)  # (32, 512)
    return feats, knn.knn_classify(feats[:24], labels[:24], feats[24:], labels[24:], nb_knn=(1, 5))


@pytest.fixture(scope="module")
def plain_file_results(reference, small_reference, tmp_path_factory):
    """{stem: (conv1 kernel, features, k-NN)} of each reference saved as a plain torchvision state dict."""
    results = {}
    for stem, weights in (("imagenet", reference), ("small", small_reference)):
        path = str(tmp_path_factory.mktemp("plain") / "plain.pth")
        torch.save(weights, path)
        backbone = features.load_backbone(path, "resnet18")
        results[stem] = (backbone.conv1.kernel_size, *features_and_knn(backbone))
    return results


@pytest.mark.parametrize("system", ["coke", "solo-learn", "lightning", "lightly-smog", "lightly-smog-resnet-generator",
                                    "selav1", "selav1-aug++"])
def test_a_seed_system_or_library_checkpoint_gives_the_knn_of_the_plain_torchvision_file(
        tmp_path, small_reference, seed_systems, plain_file_results, system, capsys):
    """With the default flags (--model_format auto, --checkpoint_key teacher) every tensor, every
    feature and every k-NN accuracy equal those of the same weights saved as a torchvision state
    dict (the small-image stem for lightly's ResNetGenerator, whose conv1 is 3x3); the online
    network is read, not the momentum copy that sits beside it."""
    checkpoint, weights = seed_systems[system]
    torch.save(checkpoint, tmp_path / f"{system}.pth")
    loaded = features.load_backbone(str(tmp_path / f"{system}.pth"), "resnet18")
    assert capsys.readouterr().out.startswith(f"loaded {len(weights)}/{len(weights)} backbone tensors")
    assert all(torch.equal(value, weights[key]) for key, value in loaded.state_dict().items())
    kernel, plain_features, plain_knn = plain_file_results["small" if weights is small_reference else "imagenet"]
    assert loaded.conv1.kernel_size == kernel == ((3, 3) if weights is small_reference else (7, 7))
    loaded_features, loaded_knn = features_and_knn(loaded)
    assert torch.equal(loaded_features, plain_features) and loaded_knn == plain_knn


def test_the_loader_says_which_backbone_it_took_and_which_it_left(tmp_path, seed_systems, capsys):
    """solo-learn's file: the online backbone is taken and named, its momentum copy named as left."""
    torch.save(seed_systems["solo-learn"][0], tmp_path / "solo.pth")
    features.load_backbone(str(tmp_path / "solo.pth"), "resnet18")
    out = capsys.readouterr().out
    assert f"loaded 120/120 backbone tensors of {tmp_path / 'solo.pth'} from 'state_dict.backbone.*'" in out
    assert "not taken: 'state_dict.momentum_backbone.*' (a momentum copy); --checkpoint_key picks another" in out


@pytest.mark.parametrize("key", ["momentum_backbone", "state_dict.momentum_backbone", "state_dict.momentum_backbone.*"])
def test_checkpoint_key_picks_the_momentum_copy_by_entry_or_prefix(tmp_path, reference, seed_systems, key):
    """--checkpoint_key momentum_backbone (one entry of the path) or the path itself reads the EMA
    backbone: every tensor is the momentum copy's (perturbed(reference, 1)), none the online one's."""
    torch.save(seed_systems["solo-learn"][0], tmp_path / "solo.pth")
    loaded = features.load_backbone(str(tmp_path / "solo.pth"), "resnet18", checkpoint_key=key).state_dict()
    ema = perturbed(reference, 1)
    assert all(torch.equal(value, ema[k]) for k, value in loaded.items())


def test_an_online_encoder_is_never_mixed_with_its_momentum_encoder(tmp_path, reference):
    """MoCo-v3's code base with the encoder named `encoder` (CoKe's name): {'state_dict':
    {'module.encoder.*', 'module.momentum_encoder.*'}} with different weights; the momentum copy is
    the complete one and the online encoder lacks layer4: the online encoder is refused as partial
    (not completed with the momentum encoder's layer4), and with --allow_partial_load its tensors
    alone are loaded (layer4 left random), not one of the momentum encoder's."""
    online = {k: v for k, v in reference.items() if not k.startswith("layer4.")}
    torch.save({"state_dict": {**prefixed(online, "module.encoder."),
                               **prefixed(perturbed(reference, 1), "module.momentum_encoder.")}}, tmp_path / "m.pth")
    with pytest.raises(DataError, match="fills 95 of the 120 tensors of a resnet18 from 'state_dict.module.encoder.*'"):
        features.load_backbone(str(tmp_path / "m.pth"), "resnet18")
    torch.manual_seed(5)
    loaded = features.load_backbone(str(tmp_path / "m.pth"), "resnet18", allow_partial=True).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in online.items())
    ema = perturbed(reference, 1)
    assert not any(torch.equal(loaded[k], ema[k]) for k in reference if k.startswith("layer4.") and k.endswith("weight"))


@pytest.mark.parametrize("copy", ["momentum_encoder", "encoder_k", "momentum_backbone", "backbone_momentum",
                                  "model_ema", "target_encoder"])
def test_a_momentum_copy_is_taken_only_when_named(tmp_path, reference, copy):
    """{'online': R18, copy: other weights}: the path's words (momentum, ema, target, k) mark the copy,
    so the default reads 'online'; --checkpoint_key with the copy's name reads the copy."""
    other = perturbed(reference, 6)
    torch.save({"online": reference, copy: other}, tmp_path / "m.pth")
    for key, expected in (("teacher", reference), (copy, other)):
        loaded = features.load_backbone(str(tmp_path / "m.pth"), "resnet18", checkpoint_key=key).state_dict()
        assert all(torch.equal(value, expected[k]) for k, value in loaded.items()), key


def test_the_most_complete_of_two_backbones_is_taken(tmp_path, reference, capsys):
    """A file with the full ResNet-18 under 'encoder' and a copy without layer4 under 'backbone' (a
    truncated export): all 120 tensors of 'encoder' load, not 90 of 'backbone'."""
    partial = {k: v for k, v in perturbed(reference, 7).items() if not k.startswith("layer4.")}
    torch.save({"backbone": partial, "encoder": reference}, tmp_path / "two.pth")
    loaded = features.load_backbone(str(tmp_path / "two.pth"), "resnet18").state_dict()
    assert all(torch.equal(value, reference[k]) for k, value in loaded.items())
    assert "loaded 120/120 backbone tensors" in capsys.readouterr().out
    assert len(partial) == 90


def test_two_different_backbones_and_no_rule_to_choose_are_refused_in_one_line(tmp_path, reference):
    """{'model_a': R18, 'model_b': other R18 weights}: neither is a teacher or a momentum copy, so the
    loader refuses, naming both and the flag; --checkpoint_key model_b then reads model_b."""
    path = tmp_path / "two.pth"
    other = perturbed(reference, 4)
    torch.save({"model_a": reference, "model_b": other}, path)
    with pytest.raises(DataError) as error:
        features.load_backbone(str(path), "resnet18")
    message = str(error.value)
    assert "\n" not in message
    assert "holds 2 different resnet18 backbones" in message and "'model_a.*', 'model_b.*'" in message
    assert "--checkpoint_key" in message
    loaded = features.load_backbone(str(path), "resnet18", checkpoint_key="model_b").state_dict()
    assert all(torch.equal(value, other[k]) for k, value in loaded.items())


def test_a_checkpoint_key_that_names_no_backbone_is_an_error_listing_them(tmp_path, reference):
    path = tmp_path / "moco.pth"
    torch.save(layouts(reference)["mocov3"], path)
    with pytest.raises(DataError, match=r"--checkpoint_key student names none of the resnet18 backbones in .*: "
                                        r"'state_dict.module.base_encoder.\*', 'state_dict.module.momentum_encoder.\*'"):
        features.load_backbone(str(path), "resnet18", checkpoint_key="student")


def preact_resnet_keys(prefix, widths=(8, 16, 32, 64), expansion=4):
    """The state dict of SeLa v1's PreActResNet (models/resnetv2.py, the ICLR release) with one block
    per stage and 1/8 of its widths: features = Sequential(conv 7x7, max-pool, 4 stages, pool); each
    PreActBottleneck holds bn1 (its input's channels), conv1, bn2, conv2, bn3, conv3 and a
    conv-only shortcut."""
    def bn(name, c):
        return {f"{name}.weight": torch.ones(c), f"{name}.bias": torch.zeros(c), f"{name}.running_mean": torch.zeros(c),
                f"{name}.running_var": torch.ones(c), f"{name}.num_batches_tracked": torch.tensor(0)}
    keys, in_planes = {f"{prefix}0.weight": torch.randn(widths[0], 3, 7, 7)}, widths[0]
    for stage, planes in enumerate(widths):
        block = f"{prefix}{stage + 2}.0"
        keys.update({**bn(f"{block}.bn1", in_planes), f"{block}.conv1.weight": torch.randn(planes, in_planes, 1, 1),
                     **bn(f"{block}.bn2", planes), f"{block}.conv2.weight": torch.randn(planes, planes, 3, 3),
                     **bn(f"{block}.bn3", planes), f"{block}.conv3.weight": torch.randn(expansion * planes, planes, 1, 1),
                     f"{block}.shortcut.0.weight": torch.randn(expansion * planes, in_planes, 1, 1)})
        in_planes = expansion * planes
    return keys


def test_a_pre_activation_resnet_is_refused_saying_why(tmp_path):
    """SeLa v1's pre-activation ResNet: its second stage's first bn1 (features.3.0.bn1) has 32 channels,
    the input of a conv1 that gives 16; one line names that key and says no torchvision ResNet computes it."""
    path = tmp_path / "resnet-10x3k.pth"
    torch.save({**preact_resnet_keys("features."), **{f"top_layer{i}.weight": torch.randn(30, 256) for i in range(10)}},
               path)
    with pytest.raises(DataError, match=r"holds a pre-activation ResNet \(features.3.0.bn1.weight normalises its block's "
                                        r"input.*SeLa v1's models/resnetv2.py.*no torchvision ResNet computes"):
        features.load_backbone(str(path), "resnet18")


def test_a_vit_with_a_batchnorm_projector_is_not_a_resnet(tmp_path):
    """A ViT (DINO's key names) whose projector's Linear and BatchNorm sit at Sequential indices 0 and 1
    (names a 'conv1' and a 'bn1' could be read from): still no ResNet-18 in it, said in one line."""
    vit = {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
           "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "blocks.0.norm1.weight": torch.ones(8),
           "blocks.0.attn.qkv.weight": torch.zeros(24, 8), "norm.weight": torch.ones(8)}
    path = tmp_path / "vit.pth"
    torch.save({"teacher": {**prefixed(vit, "backbone."), **head("head.projector.", (8, 64, 8))}}, path)
    with pytest.raises(DataError) as error:
        features.load_backbone(str(path), "resnet18")
    assert str(error.value).startswith(f"no resnet18 backbone weight found in {path}") and "\n" not in str(error.value)


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


@pytest.mark.parametrize("image_size", [12, 20])
def test_image_size_flag_is_the_size_the_backbone_sees(monkeypatch, image_size):
    """--image_size N: every image of both splits reaches the backbone as an N x N centre crop (the
    short side resized to N / 0.875 first), 10 train and 2 val synthetic images here."""
    parser = features.add_eval_args(argparse.ArgumentParser())
    args = features.follow_checkpoint(parser.parse_args(
        ["--pretrained_weights", "random", "--dataset", "synthetic", "--synthetic_images", "10",
         "--image_size", str(image_size), "--num_workers", "0", "--batch_size_per_gpu", "4"]))
    shapes = []

    class Recording(Constant):
        def forward(self, x):
            shapes.append(tuple(x.shape[1:]))
            return super().forward(x)

    monkeypatch.setattr(features, "backbone_from_args", lambda args: Recording())
    out = features.frozen_features(args, "cpu")
    assert (len(out["train"][0]), len(out["val"][0])) == (10, 2)
    assert set(shapes) == {(3, image_size, image_size)} and len(shapes) == 3 + 1  # batches of 4: 4 4 2, then 2


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
        torch.save(backbones.build_backbone("resnet18", small_image_stem=small).state_dict(), path)
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
                   "--out_dim", "32", "--block_size", "8", "--hidden_dim", "16", "--bottleneck_dim", "8",
                   "--batch_size_per_gpu", "4", "--num_workers", "0", "--epochs", "1", "--output_dir", str(run)])
    path = str(run / "checkpoint.pth")
    if layout != "current":
        in_the_layout_before_the_renames(path)
    args = knn_eval.get_args(["--pretrained_weights", path])  # the data flags follow the checkpoint
    assert (args.dataset, args.image_size, args.synthetic_images) == ("synthetic", 16, 16)
    teacher = torch.load(path, weights_only=True)["teacher"]
    backbone = features.load_backbone(path, arch="resnet50")
    assert isinstance(backbone, backbones.SmallCNN)
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
