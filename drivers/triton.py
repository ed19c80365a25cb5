"""Export a bundle's cloud partition as a Triton Inference Server model repository.

    triton-repo/
      <name>/config.pbtxt       inputs = the boundary tensors, outputs = the model outputs, fixed dims
      <name>/1/model.onnx       platform onnxruntime_onnx   (or model.plan, platform tensorrt_plan,
                                                              when the bundle holds a built engine)
      <name>/1/model.py         --format python: Triton's Python backend runs the partitions with
      <name>/1/bundle/          the splitc runtime (a copy of the bundle);
                                for a Triton without the ONNX Runtime backend (PyTriton's bundled
                                tritonserver), and for any partition range, as `splitc serve` does.
                                The Python environment Triton's stub runs in needs splitc (the base
                                install) and the partitions' backend runtime (onnxruntime).

The config carries the bundle's model sha256 as a model parameter, so `splitc run --remote` (which
reads it from Triton's /v2/models/<name>/config) refuses a Triton serving another model. Triton
speaks the same KServe v2 protocol as `splitc serve`; the edge client is the same.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from splitc.backends.registry import backend_record
from splitc.core.errors import BundleError, InputError
from splitc.core.manifest import (
    ROLE_DEPLOY,
    ROLE_PORTABLE,
    RUNTIME_ONNXRUNTIME,
    RUNTIME_TENSORRT,
    PartitionSpec,
    TensorSpec,
)
from splitc.runtime.session import Bundle
from splitc.runtime.v2protocol import SHA_PARAMETER, model_name_for, v2_datatype

CONFIG_NAME = "config.pbtxt"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor_block(spec: TensorSpec) -> str:
    dims = ", ".join(str(int(d)) for d in spec.shape) if spec.shape else ""
    # A scalar has no dims in Triton; reshape it from [1] as Triton's docs recommend.
    extra = "\n    reshape: { shape: [ ] }" if not spec.shape else ""
    dims = dims or "1"
    return (f"  {{\n    name: {_quote(spec.name)}\n    data_type: TYPE_{v2_datatype(spec.dtype)}\n"
            f"    dims: [ {dims} ]{extra}\n  }}")


def config_pbtxt(name: str, platform: str, partition: PartitionSpec, outputs: tuple[TensorSpec, ...], sha256: str,
                 kind: str, instances: int = 1, inputs: tuple[TensorSpec, ...] | None = None) -> str:
    """`platform` "python" writes `backend: "python"` (the Python backend has no platform)."""
    inputs = ",\n".join(_tensor_block(t) for t in (partition.inputs if inputs is None else inputs))
    outs = ",\n".join(_tensor_block(t) for t in outputs)
    engine = 'backend: "python"' if platform == "python" else f"platform: {_quote(platform)}"
    return (
        f"# Written by `splitc export-triton`: partition {partition.index} ({partition.target}) of the bundle.\n"
        f"name: {_quote(name)}\n"
        f"{engine}\n"
        "max_batch_size: 0\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outs}\n]\n"
        f"instance_group [\n  {{\n    count: {int(instances)}\n    kind: {kind}\n  }}\n]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        f"parameters {{\n  key: {_quote(SHA_PARAMETER)}\n  value: {{ string_value: {_quote(sha256)} }}\n}}\n"
        f"parameters {{\n  key: \"splitc_partition\"\n  value: {{ string_value: \"{partition.index}\" }}\n}}\n"
    )


PYTHON_MODEL = '''"""Triton Python-backend model written by `splitc export-triton --format python`: runs partitions
{first}.. of the bundle in ./bundle with the splitc runtime (splitc.runtime.server.PartitionServer,
the logic `splitc serve` runs), one request at a time per model instance."""

from pathlib import Path

import triton_python_backend_utils as pb_utils

FIRST_PARTITION = {first}


class TritonPythonModel:
    def initialize(self, args):
        from splitc.runtime import Bundle
        from splitc.runtime.server import PartitionServer

        bundle = Bundle.open(Path(args["model_repository"]) / args["model_version"] / "bundle")
        self.server = PartitionServer(bundle, FIRST_PARTITION)

    def execute(self, requests):
        from splitc.core.errors import SplitcError
        from splitc.runtime.session import check_inputs

        responses = []
        for request in requests:
            try:
                arrays = {{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.server.input_specs}}
                check_inputs(self.server.inputs, arrays, "the request")
                computed = self.server.compute(arrays)
                tensors = [pb_utils.Tensor(t.name, computed.outputs[t.name]) for t in self.server.outputs]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except SplitcError as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
'''


def _check_servable(bundle: Bundle, index: int) -> PartitionSpec:
    manifest = bundle.manifest
    count = len(manifest.partitions)
    if not 0 <= index < count:
        raise InputError(f"--partition {index} is out of range: the bundle has partitions 0..{count - 1}")
    if index != count - 1:
        raise InputError(
            f"partition {index} is not the last one ({count - 1}); Triton serves the cloud part as one model, "
            f"export --partition {count - 1} or serve partitions {index}..{count - 1} with `splitc serve`"
        )
    partition = manifest.partitions[index]
    sent = manifest.inputs if index == 0 else manifest.boundaries[index - 1]
    if {t.name for t in sent} != {t.name for t in partition.inputs}:
        raise BundleError(
            f"the cut before partition {index} carries {', '.join(t.name for t in sent)}, but the partition reads "
            f"{', '.join(t.name for t in partition.inputs)}; a Triton model cannot pass tensors through, use `splitc serve`"
        )
    produced = {t.name for t in partition.outputs}
    missing = [t.name for t in manifest.outputs if t.name not in produced]
    if missing:
        raise BundleError(f"model output(s) {', '.join(missing)} are computed before partition {index}; use `splitc serve` for this bundle")
    return partition


def _check_onnx_names(path: Path, partition: PartitionSpec, outputs: tuple[TensorSpec, ...]) -> None:
    """The ONNX graph's input/output names must be the config's (Triton matches by name)."""
    try:
        import onnx
    except ImportError:
        return
    graph = onnx.load(str(path), load_external_data=False).graph
    have_in, have_out = [i.name for i in graph.input], [o.name for o in graph.output]
    initializers = {i.name for i in graph.initializer}
    have_in = [n for n in have_in if n not in initializers]
    want_in, want_out = [t.name for t in partition.inputs], [t.name for t in outputs]
    if sorted(have_in) != sorted(want_in) or not set(want_out) <= set(have_out):
        raise BundleError(f"{path.name} has inputs {have_in} and outputs {have_out}, the manifest says {want_in} -> {want_out}; recompile the bundle")


def _python_model(bundle: Bundle, index: int | None) -> tuple[int, PartitionSpec, tuple[TensorSpec, ...]]:
    """The first partition a Python-backend model serves (default: the cloud side, 1), its spec,
    and the tensors it receives."""
    manifest = bundle.manifest
    count = len(manifest.partitions)
    first = (1 if count > 1 else 0) if index is None else index
    if not 0 <= first < count:
        raise InputError(f"--partition {first} is out of range: the bundle has partitions 0..{count - 1}")
    received = manifest.inputs if first == 0 else manifest.boundaries[first - 1]
    return first, manifest.partitions[first], received


def export_triton(bundle_path: str | Path, out: str | Path, *, partition: int | None = None, name: str | None = None,
                  fmt: str = "auto", instances: int = 1) -> Path:
    """Write (or replace) `<out>/<name>/` and return that model directory."""
    bundle = Bundle.open(bundle_path)
    manifest = bundle.manifest
    model = model_name_for(name or str(manifest.model.get("name") or "model"))
    if fmt == "python":
        first, spec, received = _python_model(bundle, partition)
        text = config_pbtxt(model, "python", spec, manifest.outputs, str(manifest.model.get("sha256", "")), "KIND_CPU",
                            instances, inputs=received)

        def fill(staging: Path) -> None:
            (staging / "1" / "model.py").write_text(PYTHON_MODEL.format(first=first))
            # The whole bundle: opening one checks that every artifact is there and intact.
            shutil.copytree(bundle.path, staging / "1" / "bundle")

        return _write_model(Path(out), model, text, fill)
    index = len(manifest.partitions) - 1 if partition is None else partition
    spec = _check_servable(bundle, index)
    engine = next((a for a in spec.artifacts if a.runtime == RUNTIME_TENSORRT and a.role == ROLE_DEPLOY), None)
    onnx_artifact = next((a for role in (ROLE_DEPLOY, ROLE_PORTABLE) for a in spec.artifacts
                          if a.role == role and a.runtime == RUNTIME_ONNXRUNTIME), None)
    if fmt not in ("auto", "onnx", "plan"):
        raise InputError(f"--format {fmt!r}: use auto, onnx, plan or python")
    if fmt == "plan" and engine is None:
        raise BundleError(f"partition {index} has no built TensorRT engine ({spec.engine.get('status', 'none')}); run `splitc build-engine` on the GPU host first")
    use_engine = engine is not None and fmt != "onnx"
    if not use_engine and onnx_artifact is None:
        raise BundleError(
            f"partition {index} ({spec.target}, {spec.backend}) has no ONNX or TensorRT artifact for Triton; "
            "compile the cloud tier for an onnxruntime or tensorrt target (cloud-cpu, a100, h100)"
        )
    artifact = engine if use_engine else onnx_artifact
    source = bundle.file(artifact)
    if not use_engine:
        _check_onnx_names(source, spec, manifest.outputs)
    platform, filename = ("tensorrt_plan", "model.plan") if use_engine else ("onnxruntime_onnx", "model.onnx")
    # A partition compiled for a GPU backend stays on the GPU even while its engine is deferred.
    kind = "KIND_GPU" if use_engine or backend_record(spec.backend).runtime_record.gpu else "KIND_CPU"
    text = config_pbtxt(model, platform, spec, manifest.outputs, str(manifest.model.get("sha256", "")), kind, instances)

    def fill(staging: Path) -> None:
        shutil.copyfile(source, staging / "1" / filename)
        if not use_engine and (data := artifact.options.get("external_data")):  # weights the ONNX file points to
            shutil.copyfile(source.parent / data["path"], staging / "1" / data["path"])

    return _write_model(Path(out), model, text, fill)


def _write_model(root: Path, model: str, config: str, fill) -> Path:
    """Write `<root>/<model>/` through a staging directory: config.pbtxt, version 1 filled by
    `fill(staging)`. A failure leaves the previous model directory (or nothing) in place."""
    if root.exists() and not root.is_dir():
        raise InputError(f"{root} exists and is not a directory; choose another -o")
    root.mkdir(parents=True, exist_ok=True)
    target = root / model
    if target.exists() and not (target / CONFIG_NAME).is_file():
        raise InputError(f"{target} exists and is not a Triton model directory; choose another -o or --name")
    staging = Path(tempfile.mkdtemp(prefix=f".{model}.", suffix=".staging", dir=root))
    try:
        (staging / "1").mkdir()
        fill(staging)
        (staging / CONFIG_NAME).write_text(config)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
