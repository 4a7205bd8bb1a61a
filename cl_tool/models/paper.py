"""The two architectures of Kutalev & Lapina (2021): a fully connected net and a small CNN."""

from __future__ import annotations

import math

import torch
from torch import nn

from cl_tool.errors import UsageError
from cl_tool.models import register_model


def _parse_sizes(sizes) -> list[int]:
    if isinstance(sizes, str):
        sizes = [s for s in sizes.replace(";", ",").split(",") if s.strip()]
    out = [int(s) for s in sizes]
    if any(v < 1 for v in out):
        raise ValueError(f"widths must be positive integers, got {','.join(map(str, out))}")
    return out


class MLP(nn.Module):
    """Fully connected net with leaky ReLU between layers; input images are flattened."""

    def __init__(self, sizes: list[int], negative_slope: float = 0.01):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.LeakyReLU(negative_slope))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("mlp")
def mlp(input_shape, num_classes, sizes="784,300,150,10", negative_slope: float = 0.01):
    """``sizes`` lists every layer width, input and output included (the paper: 784,300,150,10).

    The first size must equal C*H*W and the last the number of classes.
    """
    sizes = _parse_sizes(sizes)
    d_in = math.prod(input_shape)
    if len(sizes) < 2:
        raise UsageError("$arch_arg sizes= needs at least two widths (input and output), e.g. sizes=784,300,150,10.")
    if sizes[0] != d_in:
        raise UsageError(
            f"mlp sizes start with {sizes[0]} but the input shape {'x'.join(map(str, input_shape))} has {d_in} values; make them agree."
        )
    if sizes[-1] != num_classes:
        raise UsageError(f"mlp sizes end with {sizes[-1]} but $num_classes is {num_classes}; make them agree.")
    return MLP(sizes, float(negative_slope))


class PaperCNN(nn.Module):
    """conv 64@5x5 → BN → max-pool 2 → conv 128@3x3 → BN → conv 256@3x3 → BN → linear; leaky ReLU."""

    def __init__(self, input_shape, num_classes: int, widths=(64, 128, 256), negative_slope: float = 0.01):
        super().__init__()
        c, h, w = input_shape
        w1, w2, w3 = widths
        act = lambda: nn.LeakyReLU(negative_slope)
        self.features = nn.Sequential(
            nn.Conv2d(c, w1, 5),
            nn.BatchNorm2d(w1),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 3),
            nn.BatchNorm2d(w2),
            act(),
            nn.Conv2d(w2, w3, 3),
            nn.BatchNorm2d(w3),
            act(),
        )
        self.features.eval()  # the size probe must not move the BatchNorm running statistics
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, c, h, w)).numel()
        self.features.train()
        self.classifier = nn.Linear(n_flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("cnn")
def cnn(input_shape, num_classes, widths="64,128,256", negative_slope: float = 0.01):
    """``widths``: channels of the three conv layers (the paper: 64,128,256)."""
    widths = _parse_sizes(widths)
    if len(widths) != 3:
        raise UsageError("$arch_arg widths= needs three channel counts, e.g. widths=64,128,256.")
    c, h, w = input_shape
    if h < 12 or w < 12:
        raise UsageError(f"cnn needs images of at least 12x12 pixels, the input shape is {h}x{w}.")
    return PaperCNN(input_shape, num_classes, tuple(widths), float(negative_slope))
