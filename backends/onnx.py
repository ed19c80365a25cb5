"""ONNX export of a partition (shared by the ONNX Runtime and TensorRT backends), and the ONNX
Runtime backend itself: the portable path that runs on any CPU."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from pathlib import Path

import torch
import torch.fx as fx

from splitc.backends.base import CompiledArtifact, CompiledPartition
from splitc.backends.export import PartitionProgram, export_partition
from splitc.core.errors import BackendError, first_line
from splitc.core.manifest import sha256_file
from splitc.passes.dynamic import FIXED_DIMS
from splitc.passes.partition import Partition
from splitc.core.manifest import ROLE_DEPLOY, RUNTIME_ONNXRUNTIME

OPSET = 18


@functools.cache
def _onnx_registry():
    try:
        from torch.onnx._internal.exporter import _registration  # private, but the exporter's own table
    except ImportError:
        return None
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    return _registration.ONNXRegistry.from_torchlib()


@functools.cache
def _exporter_decompositions() -> frozenset:
    """Operators the exporter decomposes before translating (e.g. squeeze.dims into squeeze.dim):
    the exporter's own table, built as it builds it."""
    try:
        from torch.onnx._internal.exporter import _decomp
    except ImportError:
        return frozenset()
    registry = _onnx_registry()
    return frozenset(_decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry))))


def onnx_supports(node: fx.Node) -> bool:
    """Whether torch's ONNX exporter takes the node: a torchlib function, or a decomposition the
    exporter applies first."""
    registry = _onnx_registry()
    if registry is None or not isinstance(node.target, torch._ops.OpOverload):
        return True  # cannot tell before exporting; the export itself will name what fails
    return registry.is_registered(node.target) or node.target in _exporter_decompositions()


def export_onnx(partition: Partition, path: Path) -> Path:
    """Write the partition as a single-file ONNX model whose inputs/outputs carry the tensor names."""
    return write_onnx(partition, path)[0]


def write_onnx(partition: Partition, path: Path) -> tuple[Path, PartitionProgram]:
    """Write the partition as a single-file ONNX model whose inputs/outputs carry the tensor names;
    dynamic dimensions become ONNX dynamic axes named by their symbol."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    exported = export_partition(partition, "onnx")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                exported.program,
                (),
                dynamo=True,
                opset_version=OPSET,
                input_names=[t.name for t in partition.inputs],
                output_names=[t.name for t in partition.outputs],
                verbose=False,
            )
            program.save(str(path), external_data=_weight_bytes(partition) > EXTERNAL_DATA_BYTES)
    except Exception as exc:
        raise BackendError(f"ONNX export of partition {partition.index} for {partition.target.name} failed: {first_line(exc)}") from exc
    return path, exported


# Weights above this go to an external data file (`model.onnx.data`): serialising them into the
# protobuf holds about three copies of them at once, and a protobuf cannot exceed 2 GB anyway.
EXTERNAL_DATA_BYTES = 64 * 2**20


def _weight_bytes(partition: Partition) -> int:
    return sum(t.numel() * t.element_size() for t in (*partition.module.parameters(), *partition.module.buffers()))


def external_data(path: Path) -> dict:
    """The artifact option that records the ONNX model's external data file (name, sha256, size)
    so the bundle check covers it too; empty when the weights are inside the model file."""
    data = path.with_name(path.name + ".data")
    if not data.is_file():
        return {}
    return {"external_data": {"path": data.name, "sha256": sha256_file(data), "size": data.stat().st_size}}


class OnnxRuntimeBackend:
    id = "onnxruntime"

    def supports(self, node: fx.Node) -> bool:
        return onnx_supports(node)

    def compile(self, partition: Partition, workdir: Path) -> CompiledPartition:
        path, exported = write_onnx(partition, workdir / "model.onnx")
        options = {"opset": OPSET, **partition.target.options_for(self.id), **({FIXED_DIMS: exported.fixed} if exported.fixed else {}),
                   **external_data(path)}
        return CompiledPartition([CompiledArtifact(path, RUNTIME_ONNXRUNTIME, ROLE_DEPLOY, None, options)], notes=exported.notes)
