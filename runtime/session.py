"""Open a bundle and chain its partitions in process.

The runtime keeps an environment of named tensors: it starts with the model inputs; each partition
takes the tensors it declares as inputs and adds the ones it declares as outputs; after partition k
only the tensors of boundary k survive, which is exactly what a networked runtime would send.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from splitc.runtime.executors import Executor, can_run_here, load_executor
from splitc.core.manifest import (
    ROLE_DEPLOY,
    ROLE_HOST_TWIN,
    ROLE_PORTABLE,
    Artifact,
    ExitSpec,
    Manifest,
    PartitionSpec,
    TensorSpec,
    check_bundle,
    check_file,
    read_manifest,
)

from splitc.core.errors import BundleError, InputError
from splitc.runtime.structure import flat_by_name, unflatten

# What to run for a partition on this host, best first: the artifact the target itself runs, then
# the same code built for this ISA, then the portable ONNX form.
HOST_PREFERENCE = (ROLE_DEPLOY, ROLE_HOST_TWIN, ROLE_PORTABLE)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Read the manifest and check every file's hash; raise BundleError on any mismatch."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle {root} does not exist; compile one with `splitc compile ... -o {root}`")
        manifest = read_manifest(root)
        check_bundle(root, manifest)
        return cls(root, manifest)

    def file(self, artifact: Artifact) -> Path:
        return check_file(self.path, artifact.path, artifact.sha256)

    def reference(self) -> dict[str, np.ndarray]:
        ref = self.manifest.reference
        if not ref:
            raise BundleError(f"bundle {self.path} carries no reference data; recompile it")
        with np.load(check_file(self.path, ref["path"], ref["sha256"]), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def host_artifact(partition: PartitionSpec) -> Artifact:
    """The artifact this host would run for a partition (see HOST_PREFERENCE)."""
    for role in HOST_PREFERENCE:
        artifact = partition.artifact(role)
        if artifact is not None and can_run_here(artifact):
            return artifact
    raise BundleError(
        f"partition {partition.index} ({partition.target}) has no artifact this host can run "
        f"({', '.join(a.path for a in partition.artifacts)}); run it on its target"
    )


def check_inputs(specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse missing, misshapen or mistyped tensors before anything runs. A dynamic axis takes any
    size in its range, the same size wherever its symbol appears."""
    sizes: dict[str, tuple[int, str]] = {}  # symbol -> (size, the input that set it)
    for spec in specs:
        if spec.name not in arrays:
            raise InputError(f"{where}: input {spec.name!r} is missing (expected {spec.dtype}{list(spec.shape)})")
        array = arrays[spec.name]
        _check_shape(spec, tuple(array.shape), sizes, where)
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(f"{where}: input {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}; cast it first")


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], sizes: dict[str, tuple[int, str]], where: str) -> None:
    dynamic = {dim.axis: dim for dim in spec.dynamic}
    expected = [dynamic[i].name if i in dynamic else n for i, n in enumerate(spec.shape)]
    if len(shape) != len(spec.shape) or any(n != spec.shape[i] for i, n in enumerate(shape) if i not in dynamic):
        fixed = "; the bundle was compiled for fixed shapes, recompile for this one" if not dynamic else ""
        raise InputError(f"{where}: input {spec.name!r} has shape {list(shape)}, expected {expected}{fixed}".replace("'", ""))
    for axis, dim in dynamic.items():
        size = shape[axis]
        if not dim.allows(size):
            raise InputError(f"{where}: input {spec.name!r} has size {size} on axis {axis}, outside {dim.describe()} it was compiled for")
        seen = sizes.setdefault(dim.name, (size, spec.name))
        if seen[0] != size:
            raise InputError(f"{where}: input {spec.name!r} has {dim.name}={size} on axis {axis}, but {seen[1]!r} has {dim.name}={seen[0]}")


def generated_inputs(manifest: Manifest) -> dict[str, dict]:
    """Model inputs the runtime draws itself (noise layers), by name, with their distribution."""
    return dict(manifest.model.get("generated_inputs") or {})


def secure_normal(shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 samples from the operating system's CSPRNG (Box-Muller over
    os.urandom): noise that defends the sent activations must not be predictable to an attacker,
    which a seeded PRNG is."""
    count = int(np.prod(shape, dtype=np.int64))
    pairs = (count + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = (raw[0] >> np.uint64(11)).astype(np.float64) * 2.0**-53 + 2.0**-54  # in (0, 1)
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    normal = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:count]
    return normal.astype(np.float32).reshape(shape)


def bind_model_inputs(manifest: Manifest, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Name, check and complete the caller's inputs: positional or by name; generated inputs (noise)
    are drawn here unless the caller supplies them (verification supplies seeded ones)."""
    generated = generated_inputs(manifest)
    specs = manifest.inputs
    user_specs = [s for s in specs if s.name not in generated]
    inputs = flat_by_name(inputs, [s.name for s in specs], [s.path for s in specs], manifest.model.get("signature"))
    if not isinstance(inputs, Mapping):
        inputs = list(inputs)
        if len(inputs) != len(user_specs):
            raise InputError(f"model takes {len(user_specs)} input(s) ({', '.join(s.name for s in user_specs)}), got {len(inputs)}")
        inputs = {spec.name: array for spec, array in zip(user_specs, inputs)}
    unknown = sorted(set(inputs) - {s.name for s in specs})
    if unknown:
        raise InputError(f"unknown input(s) {', '.join(unknown)}; the model takes {', '.join(s.name for s in user_specs)}")
    bound = dict(inputs)
    for spec in specs:
        if spec.name in generated and spec.name not in bound:
            bound[spec.name] = secure_normal(spec.shape).astype(spec.dtype)
    check_inputs(specs, bound, "model")
    return bound


class SplitSession:
    """Runs a bundle's partitions one after another on this host."""

    def __init__(self, bundle: Bundle, executors: Mapping[int, Executor] | None = None):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.artifacts: dict[int, Artifact] = {}
        self._executors: dict[int, Executor] = dict(executors or {})
        for partition in self.manifest.partitions:
            if partition.index not in self._executors:
                artifact = host_artifact(partition)
                self.artifacts[partition.index] = artifact
                self._executors[partition.index] = load_executor(artifact, bundle.file(artifact))

    def bind_inputs(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return bind_model_inputs(self.manifest, inputs)

    def execute(self, index: int, env: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run partition `index` on `env`; return `env` plus everything the partition produced."""
        partition = self.manifest.partitions[index]
        check_inputs(partition.inputs, env, f"partition {index}")
        outputs = self._executors[index]([env[t.name] for t in partition.inputs])
        if len(outputs) != len(partition.outputs):
            raise BundleError(f"partition {index} returned {len(outputs)} tensors, its manifest declares {len(partition.outputs)}")
        merged = dict(env)
        merged.update({spec.name: array for spec, array in zip(partition.outputs, outputs)})
        return merged

    def boundary(self, index: int, env: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tensors that leave partition `index`: boundary `index`, or the model outputs."""
        keep = self.manifest.boundaries[index] if index < len(self.manifest.boundaries) else self.manifest.outputs
        return {t.name: env[t.name] for t in keep}

    def run_partition(self, index: int, env: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run partition `index` on `env` and return the tensors of the boundary after it."""
        return self.boundary(index, self.execute(index, env))

    def infer(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray], *, exits: bool = True) -> Answer:
        """Chain the partitions; with `exits`, stop at the first exit head confident enough."""
        env = self.bind_inputs(inputs)
        for partition in self.manifest.partitions:
            produced = self.execute(partition.index, env)
            taken = confident_exit(self.manifest, partition.index, produced) if exits else None
            if taken is not None:
                return exit_answer(self.manifest, taken, produced, partition.index + 1)
            env = self.boundary(partition.index, produced)
        return Answer({t.name: env[t.name] for t in self.manifest.outputs}, len(self.manifest.partitions))

    def run(self, inputs, *, exits: bool = True, structured: bool = False):
        """The model's outputs for `inputs` (flat names, paths such as `d.img`, or the model's own
        nested structure): a dict by flat name, or with `structured` in the structure the model
        returned (a dict, tuple, ... of arrays)."""
        outputs = self.infer(inputs, exits=exits).outputs
        return structured_outputs(self.manifest, outputs) if structured else outputs


def structured_outputs(manifest: Manifest, outputs: Mapping[str, np.ndarray]):
    """Flat outputs (by name) in the structure the model returned; a bundle without a recorded
    structure gives a tuple in output order."""
    signature = manifest.model.get("signature")
    if not signature:
        return tuple(outputs[t.name] for t in manifest.outputs)
    return unflatten(signature["outputs"], lambda i: outputs[manifest.outputs[i].name])


@dataclass(frozen=True)
class Answer:
    outputs: dict[str, np.ndarray]
    partitions_run: int
    exit: int | None = None          # index of the exit head that answered; None: the final classifier
    confidence: float | None = None  # that head's softmax maximum


def softmax_max(logits: np.ndarray) -> float:
    """The softmax's largest probability over the last axis (the worst over a batch)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return float((1.0 / np.exp(z).sum(axis=-1)).min())


def confident_exit(manifest: Manifest, partition: int, env: Mapping[str, np.ndarray]) -> tuple[ExitSpec, float] | None:
    """The first exit head computed by `partition` whose confidence reaches its threshold. None in
    the last partition: the final classifier is already computed there, an exit would save nothing."""
    if partition >= len(manifest.partitions) - 1:
        return None
    for spec in manifest.exits:
        if spec.partition == partition and spec.output.name in env:
            confidence = softmax_max(env[spec.output.name])
            if confidence >= spec.threshold:
                return spec, confidence
    return None


def exit_answer(manifest: Manifest, taken: tuple[ExitSpec, float], env: Mapping[str, np.ndarray], partitions_run: int) -> Answer:
    spec, confidence = taken
    outputs = {t.name: env[spec.output.name] if t.name == spec.replaces else None for t in manifest.outputs}
    missing = [name for name, value in outputs.items() if value is None]
    if missing:  # the compiler only adds exits to single-output classifiers; a hand-edited manifest could differ
        raise BundleError(f"exit {spec.index} answers {spec.replaces!r} but the model also returns {', '.join(missing)}; recompile the bundle")
    return Answer(outputs, partitions_run, spec.index, confidence)
