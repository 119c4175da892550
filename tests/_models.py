"""Small residual CNNs shared by the tests: CPU-sized, with branches and shortcuts for DropBlock."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, plus the shortcut, then ReLU (torchvision's BasicBlock).

    Args:
        cin: input channels.
        cout: output channels.
        stride: stride of the first convolution and of the projection.
        project: always use a 1x1 conv-BN projection shortcut; by default only when the shape changes.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, *, project: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if project or stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class SmallResNet(nn.Sequential):
    """A stem, named stages of :class:`BasicBlock`, global average pooling and a linear head.

    A ``Sequential`` (so TorchScript compiles it) whose children are ``stem``, the stages, ``pool``,
    ``flatten`` and ``fc``.

    Args:
        stages: ``(name, strides)`` per stage, one block per stride; a stride-2 block doubles the width.
        width: channels of the stem.
        num_classes: outputs of the head.
        stem_stride: stride of the stem convolution.
        stem_norm: conv-BN-ReLU stem; ``False`` gives a biased conv and ReLU.
        project: every block gets a projection shortcut (see :class:`BasicBlock`).
    """

    def __init__(self, stages: Sequence[tuple[str, Sequence[int]]] = (("layer3", (2, 1)), ("layer4", (2, 1))),
                 width: int = 8, num_classes: int = 10, *, stem_stride: int = 1, stem_norm: bool = True,
                 project: bool = False) -> None:
        layers: dict[str, nn.Module] = {}
        if stem_norm:
            layers["stem"] = nn.Sequential(nn.Conv2d(3, width, 3, stem_stride, 1, bias=False),
                                           nn.BatchNorm2d(width), nn.ReLU())
        else:
            layers["stem"] = nn.Sequential(nn.Conv2d(3, width, 3, stem_stride, 1), nn.ReLU())
        channels = width
        for name, strides in stages:
            blocks = []
            for stride in strides:
                cout = channels * stride
                blocks.append(BasicBlock(channels, cout, stride, project=project))
                channels = cout
            layers[name] = nn.Sequential(*blocks)
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(channels, num_classes)
        super().__init__(OrderedDict(layers))
