"""Depthwise convolutions scheduled by splitc (backends/tvm/depthwise.py): which functions it takes, and
that the scheduled code computes what torch computes."""
from __future__ import annotations

import numpy as np
import torch
from splitc.backends.tvm import prepare, target_keys
from torch import nn

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "host"}


class Depthwise(nn.Module):
    """MobileNet-like depthwise layers: stride 1 with bias and ReLU6 (24 channels: one vector per
    tile), TF-style asymmetric padding with stride 2, an odd width with a channel multiplier of 2
    and no epilogue, and a 1x1 convolution (not depthwise: left to the search)."""

    def __init__(self):
        super().__init__()
        self.dw1 = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.dw2 = nn.Conv2d(24, 24, 3, stride=2, groups=24, bias=False)
        self.dw3 = nn.Conv2d(24, 48, 3, padding=1, groups=24, bias=False)
        self.pw = nn.Conv2d(48, 16, 1)

    def forward(self, x):
        x = torch.clamp(self.dw1(x), 0, 6)
        x = self.dw2(self.pad(x))
        return self.pw(self.dw3(x))


def test_depthwise_functions_are_scheduled_and_match_torch():
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model = Depthwise().eval()
    x = torch.randn(1, 24, 14, 14)
    with torch.no_grad():
        expected = model(x).numpy()
        program = torch.export.export(model, (x,))
    target = target_keys.resolve_target(X86)
    prepared = prepare.prepare(from_exported_program(program, keep_params_as_input=False), target, True)
    scheduled = sorted(gv.name_hint for gv, f in prepared.functions.items()
                       if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get("tirx.is_scheduled"))
    assert len(scheduled) == 3 and all("conv2d" in name for name in scheduled), scheduled
    tasks = [t.task_name for t in prepare.extract_tasks(prepared, target)]
    assert not any(name in tasks for name in scheduled) and any("conv2d" in name for name in tasks), tasks

    vm = relax.VirtualMachine(tvm.compile(prepared, target=tvm.target.Target(target)), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))
    got = (got[0] if not hasattr(got, "numpy") else got).numpy()
    assert got.shape == expected.shape == (1, 16, 7, 7)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
