"""The backbones f (backbones.py): torchvision ResNets without their classifier, the small-image
stem, and the SmallCNN of the CPU recipe.
"""
import pytest
import torch
import torch.nn as nn

import backbones
import model


def test_resnet18_backbone_returns_512_d_pooled_features():
    """fc is removed: (B, 3, H, W) -> (B, D) with D = embed_dim = 512 for ResNet-18."""
    torch.manual_seed(0)
    backbone = backbones.build_backbone("resnet18")
    assert backbone.embed_dim == 512
    assert isinstance(backbone.fc, nn.Identity)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_small_image_stem_is_a_3x3_stride_1_conv_without_max_pool():
    """small_image_stem: conv1 is 3x3, stride 1, padding 1, no bias; maxpool is Identity; 32x32 works."""
    torch.manual_seed(0)
    backbone = backbones.build_backbone("resnet18", small_image_stem=True)
    conv1 = backbone.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert conv1.in_channels == 3 and conv1.out_channels == 64 and conv1.bias is None
    assert isinstance(backbone.maxpool, nn.Identity)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize("flag, image_size, expected", [("auto", 16, True), ("auto", 64, True), ("auto", 65, False),
                                                         ("auto", 224, False), (True, 224, True), (False, 16, False)])
def test_auto_stem_is_the_small_image_stem_up_to_64_pixels(flag, image_size, expected):
    """--small_image_stem auto: on for images of at most 64 pixels; true / false are kept as given."""
    assert backbones.use_small_image_stem(flag, image_size) is expected


@pytest.mark.parametrize("zero_init_residual, expected", [(True, 0.0), (False, 1.0)])
def test_zero_init_residual_sets_the_last_bn_of_every_block_to_zero(zero_init_residual, expected):
    """zero_init_residual: bn2.weight of all 8 BasicBlocks of ResNet-18 is 0 (every block starts as
    the identity); without it, BN weights start at 1."""
    torch.manual_seed(0)
    backbone = backbones.build_backbone("resnet18", zero_init_residual=zero_init_residual)
    blocks = [block for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
              for block in layer]
    assert len(blocks) == 8
    for block in blocks:
        assert torch.all(block.bn2.weight == expected)


def test_unknown_arch_raises_value_error_naming_it():
    """Only torchvision ResNets and the SmallCNN are backbones; any other name is rejected by name,
    with the choices."""
    with pytest.raises(ValueError, match="vgg16.*small_cnn.*resnet50"):
        backbones.build_backbone("vgg16")


def test_small_cnn_is_four_3x3_stages_pooled_to_256_features():
    """small_cnn: 3x3 convs at 32-64-128-256 channels, strides 1-2-2-2, so (B, 3, 32, 32) reaches
    4 x 4 before the pooling; 3*32*9 + 32*64*9 + 64*128*9 + 128*256*9 = 387,936 conv weights plus
    2 x 480 BatchNorm weights and biases; embed_dim 256; any image size works."""
    backbone = backbones.build_backbone("small_cnn")
    assert backbone.embed_dim == 256
    assert sum(p.numel() for p in backbone.parameters()) == 387_936 + 2 * (32 + 64 + 128 + 256)
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (3, 3), (1, 1)), (64, (3, 3), (2, 2)), (128, (3, 3), (2, 2)), (256, (3, 3), (2, 2))]
    assert backbone.stages(torch.randn(2, 3, 32, 32)).shape == (2, 256, 4, 4)
    for size in (8, 16, 32, 64):
        assert backbone(torch.randn(2, 3, size, size)).shape == (2, 256)


def test_small_cnn_features_are_the_mean_of_the_last_stage():
    """Global average pooling: the features are the spatial mean of the last ReLU's output (>= 0)."""
    backbone = backbones.build_backbone("small_cnn").eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(backbone(x), backbone.stages(x).mean(dim=(2, 3)))
    assert backbone(x).min() >= 0


def test_the_backbones_are_importable_from_model_too():
    """`from model import build_backbone` (beside the head) builds the same backbones."""
    assert model.build_backbone is backbones.build_backbone
    assert model.SmallCNN is backbones.SmallCNN and model.ARCHS is backbones.ARCHS
