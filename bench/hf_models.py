"""Hugging Face ResNets built from configs (random init, no hub) with trained-like batch-norm
statistics, so activations stay O(1) and comparisons are not vacuous. Shared by the benchmarks."""

from __future__ import annotations

import torch


class Logits(torch.nn.Module):
    """An HF image classifier returning its logits tensor only (export-friendly)."""

    def __init__(self, inner):
        super().__init__()
        self.resnet, self.classifier = inner.resnet, inner.classifier

    def forward(self, x):
        return self.classifier(self.resnet(x).pooler_output)


def hf_resnet(depths, hidden_sizes, layer_type: str, bn_weight: tuple[float, float], seed: int = 0) -> torch.nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=64, hidden_sizes=list(hidden_sizes), depths=list(depths), layer_type=layer_type, num_labels=1000)
    torch.manual_seed(seed)
    model = ResNetForImageClassification(config).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(1.0, 2.0)
            module.weight.data.uniform_(*bn_weight)
    return Logits(model).eval()


def resnet18() -> torch.nn.Module:
    return hf_resnet([2, 2, 2, 2], [64, 128, 256, 512], "basic", (0.3, 0.6))


def resnet50() -> torch.nn.Module:
    return hf_resnet([3, 4, 6, 3], [256, 512, 1024, 2048], "bottleneck", (0.2, 0.5))
