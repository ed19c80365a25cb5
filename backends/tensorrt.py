"""TensorRT backend for cloud GPUs.

Always writes the partition as TensorRT-ready ONNX (kept in the bundle: it is what TensorRT parses,
and ONNX Runtime verifies it on hosts without a GPU). When `tensorrt` imports on a host with a CUDA
device, the engine is built and serialized right away; otherwise the manifest marks it deferred and
`splitc build-engine BUNDLE` builds it later on the GPU host.

Written against TensorRT 10's documented Python API (OnnxParser, IBuilderConfig, memory pools,
build_serialized_network). TensorRT 11 removed the FP16/INT8 builder flags and builds strongly
typed networks, so reduced precision must then already be in the ONNX; this code says so instead of
silently building FP32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.fx as fx

from splitc.backends.base import CompiledArtifact, CompiledPartition
from splitc.backends.onnx import OPSET, external_data, onnx_supports, write_onnx
from splitc.passes.dynamic import FIXED_DIMS, profile_shapes
from splitc.core.errors import BackendError, ToolchainError
from splitc.passes.partition import Partition
from splitc.runtime.executors import tensorrt_usable
from splitc.core.manifest import ROLE_DEPLOY, ROLE_PORTABLE, RUNTIME_ONNXRUNTIME, RUNTIME_TENSORRT

ENGINE_NAME = "model.plan"

# The ONNX operators TensorRT's parser refuses (onnx-tensorrt docs/operators.md, the "N" rows;
# LayerNormalization, listed N for 8.5, is parsed since 8.6). Everything else the exporter emits at
# opset 18 is parsed, so a partition is checked on its exported ONNX graph, not on ATen names.
PARSER_REFUSES = frozenset({
    "Bernoulli", "BitShift", "BlackmanWindow", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "Hardmax", "IsInf", "MatMulInteger", "MaxRoiPool",
    "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
    "OptionalHasElement", "QLinearConv", "QLinearMatMul", "STFT", "SequenceAt", "SequenceConstruct", "SequenceEmpty",
    "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringNormalizer", "TfIdfVectorizer", "Unique",
})
DEFERRED_REASON = "tensorrt is not importable with a CUDA device on the build host"


class TensorRTBackend:
    id = "tensorrt"

    def supports(self, node: fx.Node) -> bool:
        return onnx_supports(node)

    def compile(self, partition: Partition, workdir: Path) -> CompiledPartition:
        onnx_path, exported = write_onnx(partition, workdir / "model.onnx")
        refused = parser_refuses(onnx_path)
        if refused:
            raise BackendError(f"TensorRT's ONNX parser does not take {', '.join(refused)} (partition {partition.index}); "
                               "another backend must run this partition")
        options = dict(partition.target.options_for(self.id))
        if not exported.fixed and (profile := profile_shapes(partition.inputs)):
            options["profile"] = profile  # dynamic axes: the engine takes any size within the profile
        artifacts = [CompiledArtifact(onnx_path, RUNTIME_ONNXRUNTIME, ROLE_PORTABLE, None,
                                      {"opset": OPSET, **({FIXED_DIMS: exported.fixed} if exported.fixed else {}), **external_data(onnx_path)})]
        if not tensorrt_usable():
            return CompiledPartition(
                artifacts,
                engine={"status": "deferred", "reason": DEFERRED_REASON, "options": options},
                notes=[*exported.notes,
                       f"partition {partition.index}: TensorRT engine deferred ({DEFERRED_REASON}); run `splitc build-engine` on the GPU host"],
            )
        plan, info = build_engine(onnx_path, options)
        engine_path = workdir / ENGINE_NAME
        engine_path.write_bytes(plan)
        artifacts.append(CompiledArtifact(engine_path, RUNTIME_TENSORRT, ROLE_DEPLOY, partition.target.arch, info))
        return CompiledPartition(artifacts, engine={"status": "built", **info})


def parser_refuses(onnx_path: Path) -> list[str]:
    """The operators of an ONNX model (subgraphs included) that TensorRT's parser refuses."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found: set[str] = set()

    def walk(graph) -> None:
        for node in graph.node:
            if node.domain in ("", "ai.onnx") and node.op_type in PARSER_REFUSES:
                found.add(node.op_type)
            elif node.domain not in ("", "ai.onnx"):
                found.add(f"{node.domain}::{node.op_type}")  # a custom domain needs a plugin
            for attribute in node.attribute:
                for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    walk(sub)

    walk(model.graph)
    return sorted(found)


def build_engine(onnx_path: Path, options: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Parse ONNX, configure the builder from the target's options, return (serialized plan, info)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ToolchainError(f"cannot import tensorrt ({exc}); build engines on a host with TensorRT and a GPU") from exc

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {Path(onnx_path).name}: {errors[:300]}")

    config = builder.create_builder_config()
    workspace = int(float(options.get("workspace_gb", 4.0)) * (1 << 30))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    precision = str(options.get("precision", "fp32"))
    if precision in ("fp16", "bf16", "int8"):
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise BackendError(
                f"this TensorRT ({trt.__version__}) has no {precision.upper()} builder flag (TensorRT 11 builds strongly typed "
                "networks); set precision = \"fp32\" in the target or compile the partition with reduced precision in the ONNX"
            )
        config.set_flag(flag)
    if options.get("hardware_compatibility") == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS

    # One optimisation profile over the inputs' dynamic axes; static inputs need none.
    if options.get("profile"):
        profile = builder.create_optimization_profile()
        for name, (low, best, high) in options["profile"].items():
            profile.set_shape(name, tuple(low), tuple(best), tuple(high))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {Path(onnx_path).name}; see the TensorRT log above")
    info = {"tensorrt_version": trt.__version__, "precision": precision, "workspace_bytes": workspace, "opset": OPSET}
    return bytes(serialized), info


def build_deferred_engines(bundle_dir: Path, log=lambda _: None) -> list[int]:
    """Build every engine a bundle marks deferred, in place and atomically; return their partitions."""
    from dataclasses import replace

    from splitc.core.bundle import record_artifact, rewritten_bundle, write_manifest
    from splitc.runtime.session import Bundle

    bundle = Bundle.open(bundle_dir)
    deferred = [p for p in bundle.manifest.partitions if p.engine.get("status") == "deferred"]
    if not deferred:
        return []
    if not tensorrt_usable():
        raise ToolchainError(
            "TensorRT cannot build here (tensorrt and cuda-python must import and a CUDA GPU must be visible); "
            "run `splitc build-engine` on the GPU host that will serve the partition"
        )
    with rewritten_bundle(bundle.path) as staging:
        partitions = list(bundle.manifest.partitions)
        for spec in deferred:
            onnx_artifact = spec.artifact(ROLE_PORTABLE)
            log(f"building TensorRT engine for partition {spec.index} ({spec.target})")
            plan, info = build_engine(staging / onnx_artifact.path, spec.engine.get("options", {}))
            engine_path = staging / Path(onnx_artifact.path).parent / ENGINE_NAME
            engine_path.write_bytes(plan)
            target_arch = next((t.get("arch") for t in bundle.manifest.targets if t["name"] == spec.target), None)
            engine = record_artifact(staging, engine_path, runtime=RUNTIME_TENSORRT, role=ROLE_DEPLOY, arch=target_arch, options=info)
            partitions[spec.index] = replace(spec, artifacts=spec.artifacts + (engine,), engine={"status": "built", **info})
        write_manifest(staging, replace(bundle.manifest, partitions=tuple(partitions)))
    return [p.index for p in deferred]
