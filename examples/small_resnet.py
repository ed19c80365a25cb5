"""A small ResNet-style image classifier: the example model of the README's main job.

Residual blocks (skip connections cross cuts), batch norm with non-trivial running statistics, and
weights scaled so activations stay O(1): a comparison on degenerate outputs would pass vacuously.

    python examples/small_resnet.py out/        # writes out/small_resnet.pt2 and out/x.npy
    splitc compile examples.small_resnet:build --input-shape 1,3,64,64 ...   # or use the factory
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    model = SmallResNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # as if trained: running stats away from 0/1
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.0)
            module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.export.save(torch.export.export(model, (x,)), out / "small_resnet.pt2")
    np.save(out / "x.npy", x.numpy())
    print(f"wrote {out / 'small_resnet.pt2'} and {out / 'x.npy'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out")
