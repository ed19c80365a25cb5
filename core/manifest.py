"""The bundle format: the contract between the compiler and every runtime that loads its output.

A bundle is a directory:

    model.splitc/
      manifest.json        this schema (versioned)
      p0/...               artifacts of partition 0 (one or more files per partition)
      p1/...
      reference.npz        reference inputs, boundary tensors and outputs computed by torch

Readers refuse a schema version they do not know and any artifact whose sha256 differs from the one
recorded, so a device never runs code it was not given. Numpy and the stdlib only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitc.core.errors import BundleError

FORMAT = "splitc-bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REFERENCE_NAME = "reference.npz"
# The index of a variant directory (K bundles of one model, `--variants K`); its format is read in
# runtime/variant_index.py. Named here so the bundle writer can tell a variant directory without
# importing the runtime.
VARIANTS_NAME = "variants.json"

# Artifact roles: what a file is for.
ROLE_DEPLOY = "deploy"        # what the target itself runs
ROLE_HOST_TWIN = "host-twin"  # the same partition compiled for the build host's ISA, for checks
ROLE_PORTABLE = "portable"    # an ONNX form of the partition (input to TensorRT, runnable by ONNX Runtime)

# Runtime ids: which backend runtime loads an artifact.
RUNTIME_TVM = "tvm"
RUNTIME_ONNXRUNTIME = "onnxruntime"
RUNTIME_TENSORRT = "tensorrt"


# numpy has no bfloat16; its size is all the runtime needs to know without ml_dtypes.
_EXTRA_ITEMSIZE = {"bfloat16": 2}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    path: str = ""  # a model input/output's place in the model's structure: `d.img`, `extra`, `aux.0`
    # Axes whose size varies at run time; `shape` holds the size compiled and verified first.
    dynamic: tuple[DynamicDim, ...] = ()

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether `shape` has this tensor's rank and fixed sizes (a dynamic axis takes any size here;
        its range is the session's to check)."""
        dynamic = {d.axis for d in self.dynamic}
        return len(shape) == len(self.shape) and all(n == self.shape[i] for i, n in enumerate(shape) if i not in dynamic)

    def described(self) -> str:
        """dtype[shape] with '?' on the dynamic axes, for messages."""
        dynamic = {d.axis for d in self.dynamic}
        return f"{self.dtype}[{', '.join('?' if i in dynamic else str(n) for i, n in enumerate(self.shape))}]"

    @property
    def nbytes(self) -> int:
        itemsize = _EXTRA_ITEMSIZE.get(self.dtype) or np.dtype(self.dtype).itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, **({"path": self.path} if self.path else {}),
                **({"dynamic": [d.to_json() for d in self.dynamic]} if self.dynamic else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]), str(data.get("path") or ""),
                   tuple(DynamicDim.from_json(d) for d in data.get("dynamic") or ()))


@dataclass(frozen=True)
class DynamicDim:
    """One axis of a tensor whose size is the export's symbol `name`, anywhere in [min, max]
    (max None: unbounded). Every axis with the same name takes the same size in one call."""

    axis: int
    name: str
    min: int
    max: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DynamicDim:
        return cls(int(data["axis"]), str(data["name"]), int(data["min"]), None if data.get("max") is None else int(data["max"]))

    def allows(self, size: int) -> bool:
        return size >= self.min and (self.max is None or size <= self.max)

    def describe(self) -> str:
        return f"{self.name} in [{self.min}, {'∞' if self.max is None else self.max}]"


@dataclass(frozen=True)
class Artifact:
    path: str      # relative to the bundle root
    sha256: str
    size: int
    runtime: str   # RUNTIME_*
    role: str      # ROLE_*
    arch: str | None = None  # ISA for native code ("aarch64", "x86_64"); None for portable formats
    options: dict[str, Any] = field(default_factory=dict)  # what it was compiled with

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artifact:
        return cls(
            path=str(data["path"]),
            sha256=str(data["sha256"]),
            size=int(data["size"]),
            runtime=str(data["runtime"]),
            role=str(data["role"]),
            arch=data.get("arch"),
            options=dict(data.get("options") or {}),
        )


@dataclass(frozen=True)
class PartitionSpec:
    index: int
    target: str
    backend: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    artifacts: tuple[Artifact, ...]
    nodes: tuple[str, ...] = ()        # graph nodes placed here, in order
    flops: int = 0
    engine: dict[str, Any] = field(default_factory=dict)  # backend-specific build status (TensorRT)
    choice: dict[str, Any] = field(default_factory=dict)  # why this backend: candidates and their figures

    def artifact(self, role: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.role == role), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "target": self.target,
            "backend": self.backend,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "artifacts": [a.to_json() for a in self.artifacts],
            "nodes": list(self.nodes),
            "flops": self.flops,
            "engine": self.engine,
            **({"choice": self.choice} if self.choice else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartitionSpec:
        return cls(
            index=int(data["index"]),
            target=str(data["target"]),
            backend=str(data["backend"]),
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            artifacts=tuple(Artifact.from_json(a) for a in data["artifacts"]),
            nodes=tuple(data.get("nodes") or ()),
            flops=int(data.get("flops") or 0),
            engine=dict(data.get("engine") or {}),
            choice=dict(data.get("choice") or {}),
        )


@dataclass(frozen=True)
class ExitSpec:
    """An early-exit head: after partition `partition` runs, if the softmax maximum of `output`
    reaches `threshold`, its answer stands in for `replaces` and later partitions do not run."""

    index: int
    partition: int
    output: TensorSpec       # the head's logits, produced by `partition`, never sent on
    replaces: str            # the model output (final classifier logits) it answers for
    threshold: float
    exit_rate: float = 0.0   # share of held-out calibration inputs it answered
    at: str = ""             # graph node the head reads
    kind: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "output": self.output.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExitSpec:
        threshold = float(data["threshold"])
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"exit threshold {threshold} is not a softmax confidence in [0, 1]")
        return cls(index=int(data["index"]), partition=int(data["partition"]), output=TensorSpec.from_json(data["output"]),
                   replaces=str(data["replaces"]), threshold=threshold, exit_rate=float(data.get("exit_rate") or 0.0),
                   at=str(data.get("at") or ""), kind=str(data.get("kind") or ""))


@dataclass(frozen=True)
class StateSpec:
    """One state tensor a stateful partition declares: the runtime allocates it per session at its
    full shape and hands the artifact the prefix of the positions filled so far (axis
    `position_axis`); the artifact returns the new rows, which the runtime writes after them."""

    name: str
    shape: tuple[int, ...]   # full size, the position axis at its maximum length
    dtype: str
    position_axis: int = 0
    input: str = ""          # the artifact input that receives the filled prefix
    output: str = ""         # the artifact output holding the new rows

    @property
    def max_len(self) -> int:
        return self.shape[self.position_axis]

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.name, self.shape, self.dtype).nbytes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StateSpec:
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]),
                   int(data.get("position_axis", 0)), str(data.get("input", "")), str(data.get("output", "")))


@dataclass(frozen=True)
class BundleFile:
    """A file of the bundle that is not an artifact (tokenizer files), hash-checked like one."""

    path: str
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BundleFile:
        return cls(str(data["path"]), str(data["sha256"]))


@dataclass(frozen=True)
class DecoderSpec:
    """A decoder LM split after `device_layers` layers. Partition 0 maps token ids [1, T] and its
    state to hidden states [1, T, hidden]; partition 1 maps those and its state to the logits of the
    last position. Dimensions named in `dynamic` are -1 in the partitions' tensor specs."""

    family: str
    layers: int
    device_layers: int
    hidden: int
    vocab: int
    max_len: int
    state: tuple[tuple[StateSpec, ...], ...]  # per partition
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    tokenizer: tuple[BundleFile, ...] = ()    # tokenizer.json first
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token for the template
    dynamic: dict[str, str] = field(default_factory=dict)         # dimension name -> what it counts

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "state": [[s.to_json() for s in p] for p in self.state],
                "eos_ids": list(self.eos_ids), "tokenizer": [f.to_json() for f in self.tokenizer]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecoderSpec:
        return cls(
            family=str(data["family"]), layers=int(data["layers"]), device_layers=int(data["device_layers"]),
            hidden=int(data["hidden"]), vocab=int(data["vocab"]), max_len=int(data["max_len"]),
            state=tuple(tuple(StateSpec.from_json(s) for s in p) for p in data["state"]),
            eos_ids=tuple(int(i) for i in data.get("eos_ids") or ()),
            bos_id=None if data.get("bos_id") is None else int(data["bos_id"]),
            tokenizer=tuple(BundleFile.from_json(f) for f in data.get("tokenizer") or ()),
            chat_template=data.get("chat_template"),
            special_tokens=dict(data.get("special_tokens") or {}),
            dynamic=dict(data.get("dynamic") or {}),
        )


@dataclass(frozen=True)
class Manifest:
    model: dict[str, Any]              # name, sha256 of the source, source description
    inputs: tuple[TensorSpec, ...]     # model inputs, in call order
    outputs: tuple[TensorSpec, ...]    # model outputs, in return order
    targets: tuple[dict[str, Any], ...]  # one per tier: name, backend, arch, tolerances
    partitions: tuple[PartitionSpec, ...]
    boundaries: tuple[tuple[TensorSpec, ...], ...]  # tensors crossing cut k (between tier k and k+1)
    plan: dict[str, Any]
    reference: dict[str, Any]          # path, sha256, samples
    exits: tuple[ExitSpec, ...] = ()   # early-exit heads, in the order the runtime checks them
    decoder: DecoderSpec | None = None  # a split decoder LM: stateful partitions, generation
    splitc_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "splitc_version": self.splitc_version,
            "model": self.model,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "targets": list(self.targets),
            "plan": self.plan,
            "boundaries": [[t.to_json() for t in b] for b in self.boundaries],
            "partitions": [p.to_json() for p in self.partitions],
            "exits": [e.to_json() for e in self.exits],
            "reference": self.reference,
            **({"decoder": self.decoder.to_json()} if self.decoder else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise BundleError("manifest.json is not a splitc bundle manifest; point at a directory made by `splitc compile`")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema version {version!r} is not supported by this runtime (it reads {SCHEMA_VERSION}); "
                "recompile the bundle with a matching splitc"
            )
        try:
            return cls(
                model=dict(data["model"]),
                inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
                targets=tuple(dict(t) for t in data["targets"]),
                partitions=tuple(PartitionSpec.from_json(p) for p in data["partitions"]),
                boundaries=tuple(tuple(TensorSpec.from_json(t) for t in b) for b in data["boundaries"]),
                plan=dict(data.get("plan") or {}),
                reference=dict(data.get("reference") or {}),
                exits=tuple(ExitSpec.from_json(e) for e in data.get("exits") or ()),
                decoder=DecoderSpec.from_json(data["decoder"]) if data.get("decoder") else None,
                splitc_version=str(data.get("splitc_version", "")),
                schema_version=int(version),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest.json is malformed ({type(exc).__name__}: {exc}); recompile the bundle") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a splitc bundle (no {MANIFEST_NAME}); pass the directory `splitc compile -o` wrote")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} cannot be read as JSON ({exc}); the bundle is corrupt, recompile it") from exc
    return Manifest.from_json(data)


def check_file(bundle_dir: Path, rel_path: str, sha256: str) -> Path:
    """Return the absolute path of a bundle file after checking it is there and unchanged."""
    path = (Path(bundle_dir) / rel_path).resolve()
    root = Path(bundle_dir).resolve()
    if root not in path.parents:
        raise BundleError(f"manifest names {rel_path!r}, which lies outside the bundle; the bundle was tampered with")
    if not path.is_file():
        raise BundleError(f"bundle file {rel_path} is missing; recompile the bundle")
    actual = sha256_file(path)
    if actual != sha256:
        raise BundleError(
            f"bundle file {rel_path} has sha256 {actual[:12]}…, the manifest says {sha256[:12]}…; "
            "it was modified after compilation, refusing to run it"
        )
    return path


def check_bundle(bundle_dir: Path, manifest: Manifest) -> None:
    """Check every artifact and the reference data against their recorded hashes."""
    for partition in manifest.partitions:
        for artifact in partition.artifacts:
            check_file(bundle_dir, artifact.path, artifact.sha256)
            extra = artifact.options.get("external_data")  # an ONNX model's weights beside it
            if extra:
                check_file(bundle_dir, str(Path(artifact.path).parent / extra["path"]), extra["sha256"])
    if manifest.reference:
        check_file(bundle_dir, manifest.reference["path"], manifest.reference["sha256"])
    for extra in manifest.decoder.tokenizer if manifest.decoder else ():
        check_file(bundle_dir, extra.path, extra.sha256)
