"""Image classifiers of BGmD's experiments, in plain torch: ``logits = f_theta(x)`` for ``x`` (B, C, H, W).

Acharya et al. (AISTATS 2022), Section 7; used in the chapters "What BGmD's memory remembers" and
"Robust training experiments".

* :class:`LeNet`: the authors' "LeNet-style CNN with 1.16M parameters" (their released code:
  conv 1->64 5x5, max-pool, ReLU, conv 64->64 5x5, max-pool, ReLU, fc 1024->1024, ReLU,
  dropout 0.5, fc 1024->10): 1,163,978 parameters on 28x28 images.
* :class:`TinyCNN`: a "super tiny d = 412 parameter CNN" (their Fig. 8). The paper does not give
  its layers and the released code does not contain it; ours has exactly 412 parameters: conv
  1->5 5x5, ReLU, conv 5->2 3x3, ReLU, adaptive average pool to 3x3, fc 18->10. The adaptive
  pool makes it work unchanged on 8x8 digits and 28x28 MNIST.
* :func:`resnet18`: the CIFAR-10 ResNet-18 (3x3 stem, no initial max-pool; He et al. 2016 as
  adapted for 32x32 images), 11,173,962 parameters: the paper's "18-layer wide ResNet with
  11.2M parameters".
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LeNet", "TinyCNN", "ResNet18", "resnet18", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """``d``: the number of trainable scalars of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _conv_out(size: int, kernel: int) -> int:
    return size - kernel + 1


class LeNet(nn.Module):
    """The authors' LeNet (1,163,978 parameters on 1x28x28 inputs with 10 classes)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 dropout: float = 0.5) -> None:
        super().__init__()
        side = _conv_out(_conv_out(image_size, 5) // 2, 5) // 2
        if side < 1:
            raise ValueError(f"LeNet needs images of side >= 16, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 64, 5)
        self.conv2 = nn.Conv2d(64, 64, 5)
        self.fc1 = nn.Linear(64 * side * side, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = self.dropout(F.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


class TinyCNN(nn.Module):
    """A 412-parameter CNN (1 input channel, 10 classes) for any image side >= 3.

    conv 1->5 5x5 (130), ReLU, conv 5->2 3x3 (92), ReLU, adaptive average pool to 3x3, fc 18->10
    (190); "same" padding, so 8x8 digits and 28x28 MNIST give the same 18 features.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 5, 5, padding=2)
        self.conv2 = nn.Conv2d(5, 2, 3, padding=1)
        self.fc = nn.Linear(18, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 3).flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (CIFAR-10): 11,173,962 parameters with 3 channels, 10 classes."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers: List[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(x.mean(dim=(-2, -1)))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet18:
    """The CIFAR ResNet-18 (see :class:`ResNet18`)."""
    return ResNet18(in_channels=in_channels, num_classes=num_classes)
