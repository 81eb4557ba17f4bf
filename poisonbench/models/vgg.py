"""VGG-11 with batch normalization, in its CIFAR form.

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015 (configuration A), with batch normalization after every
convolution (Ioffe and Szegedy, 2015).

Which form, and why: the kuangliu/pytorch-cifar form, the VGG of the CIFAR poisoning
code the shortcuts paper compares with and builds on (Unlearnable Examples,
adversarial_poisons). Five max-pools take a 32×32 image to 1×1×512, so the ImageNet
classifier (two 4096-wide layers over a 7×7 map, 120M parameters) would have nothing
spatial left to look at; that code uses a single Linear(512, classes) instead.
Convolutions keep their biases, as there. Global average pooling before the head is
the identity at 32×32 and lets other input sizes work.

A deviation for the shortcuts paper's Table 3: the authors' synthetic-noise code trains
torchvision's ``vgg11`` (the ImageNet form: no BatchNorm, the 4,096-wide classifier).
The CIFAR form with BatchNorm is kept for every table, as written in the table's notes.

Parameters with 10 classes: 9,231,114.
"""
from __future__ import annotations

import torch
from torch import nn

from poisonbench.models.classifier import ImageClassifier, Stats
from poisonbench.models.factory import MODELS
from poisonbench.models.weights import load_weights

# Configuration A of Simonyan and Zisserman: output channels, "M" = 2×2 max-pool.
VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class CifarVGG(nn.Module):
    """3×3 convolutions with BN and ReLU, max-pools, global average pool."""

    def __init__(self, config: tuple[int | str, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


@MODELS.register("vgg11")
def vgg11(num_classes: int, *, mean: Stats = None, std: Stats = None, weights: str | None = None) -> ImageClassifier:
    """VGG-11-BN, CIFAR form: 8 convolutions, 512 features, one linear classifier."""
    backbone = CifarVGG(VGG11)
    model = ImageClassifier(backbone, backbone.feature_dim, num_classes, mean=mean, std=std)
    return load_weights(model, weights) if weights is not None else model
