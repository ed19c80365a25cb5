"""scikit-learn's 8x8 digits as model-ready arrays, and a small training loop: the real data the
tests, the quantizer benchmark and the privacy audit train their CNNs on (no download needed)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images (1797, 1, 8, 8) float32 in [0, 1] and labels (1797,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[:, None], data.target


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, steps: int, lr: float = 1e-2,
                     loss=nn.functional.cross_entropy) -> nn.Module:
    """Full-batch Adam for `steps` steps on one thread (tiny ops only spin extra threads on a
    loaded 2-core host); returns the model in eval mode. Seed torch before building the model."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            optimiser.zero_grad()
            loss(model(x), y).backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


class DigitsCNN(nn.Module):
    """Two convolutions and a classifier for 8x8 digits: `width` channels in the first conv, twice
    that in the second; `hidden` > 0 adds a hidden fully connected layer; `log_softmax` ends in
    log-probabilities (for an NLL loss) instead of logits."""

    def __init__(self, width: int = 8, hidden: int = 0, log_softmax: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        features = 2 * width * 4 * 4
        self.fc1 = nn.Linear(features, hidden) if hidden else None
        self.fc2 = nn.Linear(hidden or features, 10)
        self.log_softmax = log_softmax

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.flatten(torch.relu(self.conv2(x)), 1)
        if self.fc1 is not None:
            x = torch.relu(self.fc1(x))
        x = self.fc2(x)
        return torch.log_softmax(x, dim=1) if self.log_softmax else x
