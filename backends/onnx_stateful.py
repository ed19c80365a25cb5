"""ONNX export of a module whose inputs have dynamic dimensions (a decoder half: T new positions,
S past positions), for ONNX Runtime. One graph serves prefill (T = prompt length), decode (T = 1)
and draft verification (T = n), from any past length S, so the runtime needs one artifact per half.

ONNX Runtime rather than TVM: untuned TVM is 56-163x slower on matmul-heavy decoders
(../shared/TOOLCHAIN.md), and dynamic shapes would need TVM's symbolic-shape pipeline.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from splitc.backends.base import CompiledArtifact
from splitc.backends.onnx import OPSET
from splitc.core.errors import BackendError, first_line
from splitc.core.manifest import ROLE_DEPLOY, RUNTIME_ONNXRUNTIME


def export_dynamic(module: nn.Module, args: tuple[torch.Tensor, ...], dynamic: Sequence[Mapping[int, torch.export.Dim]],
                   input_names: Sequence[str], output_names: Sequence[str], path: Path,
                   options: Mapping | None = None) -> CompiledArtifact:
    """torch.export `module` on example `args` with `dynamic` axes per input, then write it as one
    ONNX file at `path` with the given tensor names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            program = torch.export.export(module, args, dynamic_shapes=tuple(dict(d) for d in dynamic))
        with contextlib.redirect_stdout(io.StringIO()):
            onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=OPSET, input_names=list(input_names),
                                             output_names=list(output_names), verbose=False)
            onnx_program.save(str(path))
    except Exception as exc:
        raise BackendError(f"ONNX export of {type(module).__name__} failed: {first_line(exc)}") from exc
    return CompiledArtifact(path, RUNTIME_ONNXRUNTIME, ROLE_DEPLOY, None, {"opset": OPSET, **dict(options or {})})
