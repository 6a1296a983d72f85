"""hubconf.py: torch.hub.load(REPO, entry, source="local", weights=PATH) gives the backbone the
evaluation scripts read from PATH (the teacher of a pretrain.py checkpoint), in eval() mode, whose
forward is the pooled features (B, D); without weights, the randomly initialised network of the
evaluations' `--pretrained_weights random` baseline."""
from pathlib import Path

import pytest
import torch
import torchvision

import features
import hubconf
import pretrain
from cli import DataError
from test_pretrain import TINY

ROOT = Path(__file__).resolve().parents[1]


def hub(entry, **kwargs):
    return torch.hub.load(str(ROOT), entry, source="local", **kwargs)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A pretrain.py checkpoint of the demo's network (the SmallCNN), from a 4-step run on 16 synthetic images."""
    folder = tmp_path_factory.mktemp("run")
    pretrain.main(TINY + ["--arch", "small_cnn", "--epochs", "1", "--output_dir", str(folder)])
    return folder / "checkpoint.pth"


def backbone_of(state_dict):
    return {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}


def test_the_hub_gives_the_teacher_backbone_of_a_checkpoint_in_eval_mode(demo_checkpoint):
    """Every tensor of the loaded network equals the checkpoint's teacher backbone (not the student's,
    which an EMA teacher differs from); the network is in eval() mode; its forward gives (B, 256)."""
    checkpoint = torch.load(demo_checkpoint, weights_only=True)
    teacher, student = backbone_of(checkpoint["teacher"]), backbone_of(checkpoint["student"])
    backbone = hub("carp_small_cnn", weights=demo_checkpoint)
    loaded = backbone.state_dict()
    assert loaded.keys() == teacher.keys()
    assert all(torch.equal(loaded[k], teacher[k]) for k in teacher)
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    assert not backbone.training
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 256)
    by_student = hub("carp_small_cnn", weights=str(demo_checkpoint), checkpoint_key="student", verbose=False)
    assert all(torch.equal(by_student.state_dict()[k], student[k]) for k in student)
    by_arch = hub("carp_backbone", weights=demo_checkpoint, verbose=False)  # arch=None: the checkpoint's
    assert all(torch.equal(by_arch.state_dict()[k], teacher[k]) for k in teacher)


def test_without_weights_the_hub_gives_the_random_baseline_network():
    """No weights: the network of `--pretrained_weights random` (seed 0), in eval() mode; a ResNet-50
    gives the pooled 2048 numbers the evaluations use, the SmallCNN 256."""
    resnet = hub("carp_resnet50")
    assert not resnet.training
    with pytest.warns(UserWarning, match="randomly initialised resnet50"):  # the scripts' warning; the hub's is silent
        baseline = features.load_backbone("random", "resnet50", verbose=False)
    assert all(torch.equal(v, baseline.state_dict()[k]) for k, v in resnet.state_dict().items())
    with torch.no_grad():
        assert resnet(torch.randn(2, 3, 64, 64)).shape == (2, 2048)
        assert hub("carp_small_cnn")(torch.randn(2, 3, 32, 32)).shape == (2, 256)


def test_the_hub_reads_another_methods_checkpoint_as_the_evaluations_do(tmp_path):
    """A plain torchvision state dict (DINO's torch.hub ResNet-50 layout), here a ResNet-18's: every
    backbone tensor equals the file's, the classifier fc left out."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    backbone = hub("carp_backbone", arch="resnet18", weights=tmp_path / "resnet18.pth", verbose=False)
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items())
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_a_bad_weights_file_is_one_line_that_names_it(tmp_path, demo_checkpoint):
    """A missing file, a file that is not a checkpoint, and a checkpoint of another architecture
    than the entry point's: each a DataError of one line naming the file and what to pass."""
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    for path, message in ((tmp_path / "missing.pth", "does not exist"), (tmp_path / "notes.pth", "not a readable"),
                          (demo_checkpoint, "holds a small_cnn backbone, not a resnet50")):
        with pytest.raises(DataError) as error:
            hub("carp_resnet50", weights=path)
        assert message in str(error.value) and str(path) in str(error.value) and "weights=" in str(error.value)
        assert "\n" not in str(error.value)
    assert hubconf.dependencies == ["torch", "torchvision"]
