"""`splitc verify`: run every artifact of a bundle and compare it with the torch reference.

Per partition, the artifact runs on the reference tensors that enter it (so a mismatch is pinned to
one partition); then the artifacts run chained, each on what the previous one produced, and the
final outputs are compared with torch's (relative error and top-1 agreement). An aarch64 device's
artifact (TVM's library, or an ONNX model for ONNX Runtime) runs in that runtime's aarch64 build
under qemu-user when the emulation toolchain is provisioned; otherwise its host twin runs and the
report says so. A deferred TensorRT engine is reported as skipped, never as passed.

Imports only the runtime and the stdlib: verification needs no torch.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from splitc.core.errors import SplitcError, first_line
from splitc.runtime.executors import can_run_here, host_arch, load_executor, runtime_record
from splitc.core.manifest import ROLE_DEPLOY, ROLE_HOST_TWIN, ROLE_PORTABLE, Artifact, PartitionSpec
from splitc.runtime.session import Bundle, softmax_max

Batch = list[list[np.ndarray]]
BatchRunner = Callable[[Batch], Batch]


@dataclass
class Check:
    name: str
    partition: int | None      # None for the end-to-end check
    target: str
    artifact: str | None
    mode: str                  # native | emulated | host-twin | portable | not-run
    status: str                # pass | fail | skip
    rtol: float = 0.0
    max_rel_err: float = 0.0
    max_abs_err: float = 0.0
    top1: float | None = None
    min_top1: float | None = None
    samples: int = 0
    note: str = ""
    seconds: float = 0.0


@dataclass
class VerifyReport:
    bundle: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "ok": self.ok, "seconds": round(self.seconds, 3), "checks": [asdict(c) for c in self.checks]}

    def to_junit(self) -> str:
        root = ET.Element("testsuites", name="splitc")
        suite = ET.SubElement(
            root,
            "testsuite",
            name="splitc.drivers.verify",
            tests=str(len(self.checks)),
            failures=str(len(self.failures)),
            skipped=str(sum(c.status == "skip" for c in self.checks)),
            time=f"{self.seconds:.3f}",
        )
        for check in self.checks:
            case = ET.SubElement(suite, "testcase", classname=f"splitc.drivers.verify.{Path(self.bundle).name}", name=check.name, time=f"{check.seconds:.3f}")
            detail = _describe(check)
            if check.status == "fail":
                ET.SubElement(case, "failure", message=check.note or detail).text = detail
            elif check.status == "skip":
                ET.SubElement(case, "skipped", message=check.note)
            ET.SubElement(case, "system-out").text = detail
        return ET.tostring(root, encoding="unicode", xml_declaration=True)


def _describe(check: Check) -> str:
    text = f"mode={check.mode} samples={check.samples} max_rel_err={check.max_rel_err:.3g} (rtol {check.rtol:g}) max_abs_err={check.max_abs_err:.3g}"
    if check.top1 is not None:
        text += f" top1={check.top1:.3f} (min {check.min_top1:g})"
    return text + (f"; {check.note}" if check.note else "")


@dataclass
class Runner:
    run: BatchRunner
    mode: str
    artifact: Artifact
    rtol: float
    note: str = ""


def choose_runner(bundle: Bundle, partition: PartitionSpec, *, emulate: bool = True) -> Runner:
    """The most faithful way to run a partition's deploy artifact on this host: natively when it is
    this host's code, under qemu when it is a device's (an ONNX model deployed to an aarch64 target
    runs in the aarch64 ONNX Runtime), else a substitute named in the note."""
    target = bundle.manifest.targets[partition.index]
    verify_cfg = target.get("verify", {})
    rtol = float(verify_cfg.get("rtol", 1e-4))
    deploy = partition.artifact(ROLE_DEPLOY)
    device_arch = (deploy.arch if deploy is not None else None) or target.get("arch") or host_arch()
    reason = ""
    from splitc.backends.emulation import can_emulate, find_aarch64_toolchain

    if deploy is not None and device_arch != host_arch() and can_emulate(deploy, device_arch):
        toolchain = find_aarch64_toolchain(runtime=deploy.runtime) if emulate else None
        if toolchain is not None:
            return Runner(_emulated(bundle, deploy, toolchain), "emulated", deploy, rtol,
                          f"aarch64 {deploy.runtime} runtime run under qemu-user")
        reason = ("emulation disabled" if not emulate
                  else f"no aarch64 emulation of {deploy.runtime} (run `splitc toolchain aarch64`)")
        reason = f"{deploy.path} not run on its device's runtime: {reason}; checked it on this host's instead"
    elif deploy is not None and can_run_here(deploy):
        if runtime_record(deploy.runtime).gpu:  # a GPU engine's kernels differ more from torch's
            rtol = float(verify_cfg.get("engine_rtol", rtol))
        return Runner(_native(bundle, deploy), "native", deploy, rtol)
    elif deploy is None and partition.engine.get("status") == "deferred":
        reason = "TensorRT engine deferred; checked the TensorRT-ready ONNX with ONNX Runtime"
    elif deploy is not None:
        reason = f"{deploy.path} cannot run on this host; checked a substitute"
    # An ISA-neutral deploy artifact (ONNX) is its own host twin.
    substitutes = ((ROLE_HOST_TWIN, "host-twin"), (ROLE_DEPLOY, "host-twin"), (ROLE_PORTABLE, "portable"))
    for role, mode in substitutes:
        artifact = partition.artifact(role)
        if artifact is not None and can_run_here(artifact):
            return Runner(_native(bundle, artifact), mode, artifact, rtol, reason)
    raise SplitcError(f"partition {partition.index} ({partition.target}) has no artifact this host can run or emulate")


def _native(bundle: Bundle, artifact: Artifact) -> BatchRunner:
    executor = load_executor(artifact, bundle.file(artifact))
    return lambda batch: [executor(sample) for sample in batch]


def _emulated(bundle: Bundle, artifact: Artifact, toolchain) -> BatchRunner:
    """One qemu process per batch: starting the emulated interpreter costs seconds, a sample does not."""
    import splitc.runtime
    from splitc.backends.emulation import EMULATION_WORKERS

    worker = Path(splitc.runtime.__file__).resolve().parent / EMULATION_WORKERS[artifact.runtime]
    library = bundle.file(artifact)

    def run(batch: Batch) -> Batch:
        with tempfile.TemporaryDirectory(prefix="splitc-emu-") as tmp:
            inputs, outputs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
            np.savez(inputs, **{f"s{i}__{j}": x for i, sample in enumerate(batch) for j, x in enumerate(sample)})
            done = subprocess.run(
                toolchain.command(worker, str(library), str(inputs), str(outputs)),
                env=toolchain.environment(), capture_output=True, text=True, timeout=900,
            )
            if done.returncode != 0:
                raise SplitcError(f"emulated run of {artifact.path} failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
            with np.load(outputs) as data:
                count = 1 + max(int(k.split("__")[1]) for k in data.files) if data.files else 0
                return [[data[f"s{i}__{k}"] for k in range(count)] for i in range(len(batch))]

    return run


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """‖got − expected‖₂ / ‖expected‖₂: scale-free, and not fooled by tiny outputs the way an
    absolute tolerance is (‖expected‖ = 0 falls back to the absolute error)."""
    diff = float(np.linalg.norm((got.astype(np.float64) - expected.astype(np.float64)).ravel()))
    scale = float(np.linalg.norm(expected.astype(np.float64).ravel()))
    return diff / scale if scale > 0 else diff


def top1_agreement(got: np.ndarray, expected: np.ndarray) -> float | None:
    """Share of rows whose argmax over the last axis agrees; None when that is not a class axis."""
    if expected.ndim < 2 or expected.shape[-1] < 2 or not np.issubdtype(expected.dtype, np.floating):
        return None
    return float(np.mean(np.argmax(got, axis=-1) == np.argmax(expected, axis=-1)))


def _compare(check: Check, got: Sequence[Sequence[np.ndarray]], expected: Sequence[Sequence[np.ndarray]], with_top1: bool) -> Check:
    rel, abs_err, agree = 0.0, 0.0, []
    for got_sample, ref_sample in zip(got, expected):
        if len(got_sample) != len(ref_sample):
            check.status, check.note = "fail", f"returned {len(got_sample)} tensors, expected {len(ref_sample)}"
            return check
        for g, r in zip(got_sample, ref_sample):
            if g.shape != r.shape:
                check.status, check.note = "fail", f"returned shape {list(g.shape)}, expected {list(r.shape)}"
                return check
            rel = max(rel, relative_error(g, r))
            abs_err = max(abs_err, float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64)))) if g.size else 0.0)
            if with_top1 and (t := top1_agreement(g, r)) is not None:
                agree.append(t)
    check.max_rel_err, check.max_abs_err = rel, abs_err
    check.top1 = float(np.mean(agree)) if agree else None
    ok = rel <= check.rtol and (check.top1 is None or check.min_top1 is None or check.top1 >= check.min_top1)
    check.status = "pass" if ok else "fail"
    return check


# An exit decision may flip between torch and an artifact only when torch's confidence is this close
# to the threshold (float reassociation moves the softmax by ~1e-6); anywhere else a flip is a bug.
_EXIT_MARGIN = 1e-4


def _exit_checks(manifest, chained: list[dict[str, np.ndarray]], reference: dict[str, np.ndarray], count: int) -> list[Check]:
    """Per exit head: the chained artifacts take the same exit decisions as torch on every sample."""
    checks = []
    for head in manifest.exits:
        target = manifest.partitions[head.partition].target
        flips = 0
        for i, env in enumerate(chained):
            want = softmax_max(reference[f"s{i}/{head.output.name}"])
            got = softmax_max(env[head.output.name])
            if (want >= head.threshold) != (got >= head.threshold) and abs(want - head.threshold) > _EXIT_MARGIN:
                flips += 1
        taken = sum(softmax_max(reference[f"s{i}/{head.output.name}"]) >= head.threshold for i in range(count))
        checks.append(Check(f"exit {head.index} decisions (threshold {head.threshold:.3f})", head.partition, target, None, "chained",
                            "pass" if flips == 0 else "fail", samples=count,
                            note=f"{taken}/{count} reference samples exit here; {flips} decision(s) differ from torch"))
    return checks


def _dynamic_sizes(manifest, reference: dict[str, np.ndarray], count: int) -> str:
    """The sizes each dynamic dimension took in the reference samples, e.g. `s77 in {1, 2}`."""
    seen: dict[str, set[int]] = {}
    for spec in manifest.inputs:
        for dim in spec.dynamic:
            seen.setdefault(dim.name, set()).update(int(reference[f"s{i}/{spec.name}"].shape[dim.axis]) for i in range(count))
    return ", ".join(f"{name} in {{{', '.join(map(str, sorted(sizes)))}}}" for name, sizes in seen.items())


def verify_bundle(path: str | Path, *, emulate: bool = True, log: Callable[[str], None] = lambda _: None) -> VerifyReport:
    started = time.perf_counter()
    bundle = Bundle.open(path)  # refuses a tampered bundle before running anything
    manifest = bundle.manifest
    if manifest.decoder is not None:  # stateful halves: checked over generation steps
        from splitc.drivers.decoder import verify_decoder
        return verify_decoder(path, log)
    reference = bundle.reference()
    count = int(manifest.reference.get("samples", 0))
    report = VerifyReport(str(path))
    chained: list[dict[str, np.ndarray]] = [{t.name: reference[f"s{i}/{t.name}"] for t in manifest.inputs} for i in range(count)]
    chain_broken = ""
    end_rtol = 0.0
    for partition in manifest.partitions:
        tick = time.perf_counter()
        name = f"p{partition.index} {partition.target} ({partition.backend})"
        try:
            runner = choose_runner(bundle, partition, emulate=emulate)
        except SplitcError as exc:
            report.checks.append(Check(name, partition.index, partition.target, None, "not-run", "fail", note=str(exc)))
            chain_broken = chain_broken or f"partition {partition.index} could not run"
            continue
        log(f"verifying partition {partition.index} on {partition.target}: {runner.artifact.path} ({runner.mode})")
        end_rtol += runner.rtol
        isolated = [[reference[f"s{i}/{t.name}"] for t in partition.inputs] for i in range(count)]
        expected = [[reference[f"s{i}/{t.name}"] for t in partition.outputs] for i in range(count)]
        check = Check(name, partition.index, partition.target, runner.artifact.path, runner.mode, "fail",
                      rtol=runner.rtol, samples=count, note=runner.note)
        try:
            batch = isolated if chain_broken else isolated + [[env[t.name] for t in partition.inputs] for env in chained]
            results = runner.run(batch)
        except Exception as exc:  # a backend crash is a verification failure, reported, not a traceback
            check.note = f"running {runner.artifact.path} failed: {first_line(exc)}"
            check.seconds = time.perf_counter() - tick
            report.checks.append(check)
            chain_broken = chain_broken or f"partition {partition.index} failed to run"
            continue
        note = check.note
        _compare(check, results[:count], expected, with_top1=False)
        if note and check.note != note:
            check.note = f"{note}; {check.note}"
        check.seconds = time.perf_counter() - tick
        report.checks.append(check)
        if not chain_broken:
            for env, outputs in zip(chained, results[count:]):
                env.update({t.name: v for t, v in zip(partition.outputs, outputs)})
        if partition.engine.get("status") == "deferred":
            report.checks.append(Check(f"p{partition.index} {partition.target} TensorRT engine", partition.index, partition.target,
                                       None, "not-run", "skip", note="engine deferred: build it with `splitc build-engine` on a GPU host, then verify there"))

    min_top1 = min((float(t.get("verify", {}).get("min_top1", 1.0)) for t in manifest.targets), default=1.0)
    end = Check("end-to-end (chained artifacts vs torch)", None, ",".join(t["name"] for t in manifest.targets), None,
                "chained", "fail", rtol=end_rtol, min_top1=min_top1, samples=count)
    if chain_broken:
        end.note = f"not run: {chain_broken}"
    else:
        got = [[env[t.name] for t in manifest.outputs] for env in chained]
        want = [[reference[f"s{i}/{t.name}"] for t in manifest.outputs] for i in range(count)]
        _compare(end, got, want, with_top1=True)
        sizes = _dynamic_sizes(manifest, reference, count)
        if sizes:
            end.note = "; ".join(filter(None, [end.note, f"at {sizes}"]))
    report.checks.append(end)
    if not chain_broken:
        report.checks.extend(_exit_checks(manifest, chained, reference, count))
    report.seconds = time.perf_counter() - started
    return report
