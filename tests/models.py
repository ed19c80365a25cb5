"""Small deterministic test models for splitc's tests.

Every factory seeds its own initialisation, returns a module in eval mode, and keeps activations
O(1): random-init models can otherwise give outputs so small (or so uniform) that a numerical
comparison passes vacuously (../shared/TOOLCHAIN.md). Batch norms get explicit, non-trivial running
statistics so folding or mis-ordering them changes the result.

Each factory has an `example_inputs()` attribute returning deterministic inputs of the right shapes,
and `SHAPES[name]` gives the `--input-shape` strings a CLI call would use.

Usable as `tests.models:resnet_like` etc. from the splitc frontend.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ZOO",
    "SHAPES",
    "depthwise_bn",
    "hf_resnet",
    "multi_io",
    "rel_err",
    "resnet_like",
    "save_pt2",
    "transformer_block",
]


# --------------------------------------------------------------------------------------- helpers


def _init(module: nn.Module, seed: int) -> nn.Module:
    """Seeded, variance-preserving init; BN gets non-trivial affine params and running stats."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=generator))
                m.bias.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))  # in [0.5, 1.5)
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator))
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
    return module.eval()


def _randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _with_inputs(factory, make_inputs):
    factory.example_inputs = make_inputs
    return factory


def rel_err(got, expected) -> float:
    """Relative L2 error of `got` (tensor or numpy array) against `expected`; refuses a reference so
    small that any answer would pass."""
    got, expected = (torch.as_tensor(v).detach().cpu().double() for v in (got, expected))
    assert got.shape == expected.shape, f"shape {tuple(got.shape)} != {tuple(expected.shape)}"
    scale = float(expected.norm())
    assert scale > 1e-3, f"degenerate reference output (norm {scale}); the test model needs O(1) activations"
    return float((got - expected).norm()) / scale


def save_pt2(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path) -> Path:
    """Export `module` on `inputs` and write the program with torch.export.save."""
    path = Path(path)
    with torch.no_grad():
        program = torch.export.export(module.eval(), tuple(inputs))
    torch.export.save(program, str(path))
    return path


# --------------------------------------------------------------------------------------- resnet_like


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetLike(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8)              # identity shortcut
        self.layer2 = BasicBlock(8, 16, stride=2)   # 1x1 conv + BN downsampling shortcut
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_like() -> nn.Module:
    return _init(ResNetLike(), seed=1)


_with_inputs(resnet_like, lambda: (_randn((1, 3, 32, 32), 101),))


# --------------------------------------------------------------------------------------- depthwise_bn


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class DepthwiseBN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.block = InvertedResidual(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.block(self.stem(x))), 1))


def depthwise_bn() -> nn.Module:
    return _init(DepthwiseBN(), seed=2)


_with_inputs(depthwise_bn, lambda: (_randn((1, 3, 32, 32), 102),))


# --------------------------------------------------------------------------------------- multi_io


class MultiIO(nn.Module):
    """image -> conv features -> logits (early) ; vector joins only at the late embedding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, 5)
        self.vec_proj = nn.Linear(8, 8)
        self.embed = nn.Linear(16, 6)

    def forward(self, image, vector):
        h = torch.relu(self.conv(image))
        h = torch.relu(self.conv2(h))
        feat = torch.flatten(self.pool(h), 1)
        logits = self.classifier(feat)                 # produced early
        v = torch.tanh(self.vec_proj(vector))          # `vector` is read only here, late
        embedding = self.embed(torch.cat([feat, v], dim=1))
        return logits, embedding


def multi_io() -> nn.Module:
    return _init(MultiIO(), seed=3)


_with_inputs(multi_io, lambda: (_randn((1, 3, 16, 16), 103), _randn((1, 8), 203)))


# --------------------------------------------------------------------------------------- transformer


class TransformerBlock(nn.Module):
    def __init__(self, vocab: int = 100, d_model: int = 32, heads: int = 4, seq: int = 12, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(1, seq, d_model))
        self.encoder = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(h.mean(dim=1))


def transformer_block() -> nn.Module:
    model = TransformerBlock()
    _init(model, seed=4)
    with torch.no_grad():
        model.pos.copy_(0.1 * _randn(model.pos.shape, 44))
        # MultiheadAttention keeps its projections as raw parameters: give them the same scale.
        attn = model.encoder.self_attn
        d = attn.embed_dim
        attn.in_proj_weight.copy_(_randn(attn.in_proj_weight.shape, 45) / math.sqrt(d))
        attn.in_proj_bias.copy_(0.1 * _randn(attn.in_proj_bias.shape, 46))
    return model.eval()


_with_inputs(
    transformer_block,
    lambda: (torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(104), dtype=torch.int64),),
)


# --------------------------------------------------------------------------------------- hf_resnet


class LogitsOnly(nn.Module):
    """A Hugging Face model whose forward returns the logits tensor only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
        layer_type="basic", hidden_act="relu", num_labels=10,
    )
    torch.manual_seed(5)  # HF's own init draws from the global generator; _init overwrites it anyway
    model = ResNetForImageClassification(config)
    return LogitsOnly(_init(model, seed=5)).eval()


_with_inputs(hf_resnet, lambda: (_randn((1, 3, 32, 32), 105),))


# --------------------------------------------------------------------------------------- registry

ZOO = {
    "resnet_like": resnet_like,
    "depthwise_bn": depthwise_bn,
    "multi_io": multi_io,
    "transformer_block": transformer_block,
    "hf_resnet": hf_resnet,
}

SHAPES = {
    "resnet_like": ["1,3,32,32"],
    "depthwise_bn": ["1,3,32,32"],
    "multi_io": ["1,3,16,16;1,8"],
    "transformer_block": ["1,12:int64"],
    "hf_resnet": ["1,3,32,32"],
}
