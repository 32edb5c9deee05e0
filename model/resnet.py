"""ResNet-18 and ResNet-50 backbones without the classifier: image [B, 3, H, W] -> pooled features [B, feature_dim].

Architecture of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), in torchvision's variant
("ResNet v1.5": a Bottleneck downsamples in its 3x3 conv, not its first 1x1 conv) and with torchvision's module
names, so that at width 64 with the standard stem `state_dict()` has exactly the keys and shapes of
`torchvision.models.resnet18()` / `resnet50()` minus `fc.*` (checked against a fixture in tests/test_model.py;
`model/export.py` adds the fc back).

Two options change the shapes, and then torchvision can no longer load the weights:
- `small_stem`: for 32 px images, conv1 is 3x3 stride 1 and there is no max-pool (He et al., Sec. 4.2, CIFAR),
  so layer1 sees 32x32 instead of 8x8.
- `width`: channels of the stem and of layer1's 3x3 convs (64 in the paper); every stage scales with it, so
  `feature_dim` = 8 * width * block expansion (512 * width / 64 for ResNet-18, 2048 * width / 64 for ResNet-50).

Initialisation follows torchvision: convs Kaiming-normal with fan_out, BatchNorm weight 1 and bias 0, and
optionally (`zero_init_residual`, Goyal et al. 2017, "Accurate, Large Minibatch SGD") the last BN of every residual
branch starts at 0 so each block starts as the identity.
"""
import torch
from torch import nn


def conv_bn(in_channels, out_channels, kernel_size, stride=1):
    """Bias-free conv ('same' padding for odd kernels) and the BatchNorm after it; the bias is redundant with BN's."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
    return conv, nn.BatchNorm2d(out_channels)


def shortcut_projection(in_channels, out_channels, stride):
    """1x1 strided conv + BN when the block changes shape (He et al. option B), else None for the plain identity.

    A Sequential, so its keys are torchvision's `downsample.0.*` (conv) and `downsample.1.*` (BN).
    """
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride))


class BasicBlock(nn.Module):
    """Two 3x3 convs; `stride` on the first. [B, in_channels, H, W] -> [B, planes, H / stride, W / stride]."""

    expansion = 1

    def __init__(self, in_channels, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, planes, 3, stride)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut_projection(in_channels, planes * self.expansion, stride)

    def last_bn(self):
        return self.bn2

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 with `stride`, 1x1 expand by 4. [B, in_channels, H, W] -> [B, 4 * planes, H / s, W / s]."""

    expansion = 4

    def __init__(self, in_channels, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, planes, 1)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = conv_bn(planes, planes * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut_projection(in_channels, planes * self.expansion, stride)

    def last_bn(self):
        return self.bn3

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem, four stages of residual blocks, global average pool. [B, 3, H, W] -> [B, feature_dim]."""

    def __init__(self, block, blocks_per_stage, small_stem=False, width=64, zero_init_residual=False):
        super().__init__()
        if not (isinstance(width, int) and width > 0):
            raise ValueError(f"width must be a positive int, got {width!r}")
        if small_stem:
            self.conv1, self.bn1 = conv_bn(3, width, 3)
            self.maxpool = nn.Identity()
        else:
            self.conv1, self.bn1 = conv_bn(3, width, 7, stride=2)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        in_channels = width
        for stage, num_blocks in enumerate(blocks_per_stage):
            planes = width * 2**stage  # stages double the channels and (after the first) halve the resolution
            strides = [1 if stage == 0 else 2] + [1] * (num_blocks - 1)
            blocks = []
            for stride in strides:
                blocks.append(block(in_channels, planes, stride))
                in_channels = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_channels
        self.initialize(zero_init_residual)

    def initialize(self, zero_init_residual):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_bn().weight)

    def forward(self, images):  # [B, 3, H, W], contiguous or channels_last
        # The convolutions run in the layout of their input: channels_last is the fast one for cuDNN (tensor cores)
        # and oneDNN alike, so every caller (training, raw init, kNN, linear evaluation) gets it (model/encoder.py).
        images = images.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, feature_dim, H / 32, W / 32] (/ 8 small stem)
        # torch.flatten, not .view: it copies when the strides forbid a view, as channels_last tensors may.
        return torch.flatten(self.avgpool(x), 1)  # [B, feature_dim]


def resnet18(small_stem=False, width=64, zero_init_residual=False):
    """ResNet-18 backbone: BasicBlocks [2, 2, 2, 2], feature_dim = 512 * width / 64."""
    return ResNet(BasicBlock, [2, 2, 2, 2], small_stem, width, zero_init_residual)


def resnet50(small_stem=False, width=64, zero_init_residual=False):
    """ResNet-50 backbone: Bottlenecks [3, 4, 6, 3], feature_dim = 2048 * width / 64."""
    return ResNet(Bottleneck, [3, 4, 6, 3], small_stem, width, zero_init_residual)


BACKBONES = {"resnet18": resnet18, "resnet50": resnet50}


def build_backbone(name, small_stem=False, width=64, zero_init_residual=False):
    """Backbone by name (a key of BACKBONES), for a `--arch` flag."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](small_stem=small_stem, width=width, zero_init_residual=zero_init_residual)
