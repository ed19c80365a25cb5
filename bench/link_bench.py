"""Link benchmark: end-to-end latency and bytes per request of a split ResNet over an emulated,
changing uplink, for edge-only, cloud-only, static splits and adaptive; then the server under load.
A script, not a test: it prints figures and asserts nothing. Linux, as root (network namespaces, tc).

    sudo python bench/link_bench.py                          # trace wifi,4g,3g,wifi, 20 s per phase
    sudo python bench/link_bench.py --phase-s 5              # quick run (~2-3 min once compiled)
    sudo python bench/link_bench.py --preset 4g --duration-s 30
    sudo python bench/link_bench.py --modes cloud,splits --no-load --cuts resnet.encoder.stages.2

Set-up (bench/netemu.py): the edge client and the server run in two network namespaces joined by a
veth pair; `tc tbf` shapes each direction at the phase's rate, a relay in the edge namespace adds
the phase's RTT in user space (this kernel has no netem), and a driver thread switches rate and RTT
at each phase boundary. Every mode runs its own pass over the same trace, from t=0: one closed-loop
client (next request as soon as the last answers) in the edge namespace, a real `splitc serve` in
the cloud namespace, real compiled bundles (ONNX Runtime on both sides; untuned TVM on x86 is ~100x
slower than ONNX Runtime here, which would measure the missing tuning, not the link).

Device compute is this x86 host's CPU (ONNX Runtime, one thread), NOT a Raspberry Pi's. By default
it is slowed to the repo's rpi4 target model: each device partition call is padded with a sleep to
factor x its host time (measured by the parent before the runs; see DeviceClock), factor =
rpi4's modelled whole-model latency / this host's measured one (`--device-slowdown 1` turns it off;
a number sets it). The edge/cloud target files the planner and the variant compiler see are written
with these measured figures, so their model matches what is emulated. The cloud is this host too
(ONNX Runtime, 1 thread: 2 ran slower on this shared 2-core machine); both sides share its cores,
and so do other users of the machine.

Reported per mode and per phase: p50/p95/mean latency (a request belongs to the phase its
midpoint falls in), body bytes sent/received and wire bytes (tc
counters: TCP/IP headers, probes and adaptive's background uploads included) per request.
"mean (phase-weighted)" averages the per-phase means weighted by phase length: the expected latency
of a request arriving at a random time. A closed-loop client issues more requests in fast phases,
so the plain mean over requests favours whoever is fast where it is already fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netemu

HERE = Path(__file__).resolve()
DEFAULT_CUTS = "resnet.embedder,resnet.encoder.stages.1,resnet.encoder.stages.2"
TOKEN = "link-bench-" + os.urandom(12).hex()


# =========================================================================================== client
# Runs inside the edge namespace (`python bench/link_bench.py --_client spec.json`): numpy + the
# splitc runtime only, no torch.


class DeviceClock:
    """Wraps every executor this process loads (all of them are device partitions) so that each
    call takes `factor` x that partition's host time: it runs the partition, then sleeps for the
    rest. The host time is the parent's calibration (fastest of 9 rounds, all partitions timed
    round-robin in one pass: `calibrated`, keyed by artifact path), or else
    the median of 3 runs at the executor's first call. A load spike on the shared host thus
    lengthens a call by the spike, not by the spike x factor. Accumulates host and device ms."""

    def __init__(self, factor: float, calibrated: dict[str, float] | None = None):
        self.factor = factor
        self.calibrated = calibrated or {}
        self.host_ms = 0.0
        self.device_ms = 0.0

    def reset(self) -> None:
        self.host_ms = self.device_ms = 0.0

    def install(self) -> None:
        from splitc.runtime import executors

        original = executors.load_executor
        clock = self

        def load_executor(artifact, path):
            run = original(artifact, path)
            known = clock.calibrated.get(str(Path(path).resolve()))
            base: list[float] = [known / 1e3] if known else []

            def slowed(inputs):
                tick = time.perf_counter()
                if clock.factor > 1 and not base:
                    times = []
                    for _ in range(3):
                        t = time.perf_counter()
                        out = run(inputs)
                        times.append(time.perf_counter() - t)
                    base.append(float(np.median(times)))
                else:
                    out = run(inputs)
                host = time.perf_counter() - tick
                device = max(host, base[0] * clock.factor) if base else host
                if device > host:
                    time.sleep(device - host)
                clock.host_ms += (base[0] if base else host) * 1e3
                clock.device_ms += device * 1e3
                return out

            return slowed

        for name, module in list(sys.modules.items()):
            if name.startswith("splitc") and getattr(module, "load_executor", None) is original:
                module.load_executor = load_executor


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-12))


def client_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    kind = spec["kind"]
    from splitc.runtime import Bundle, SplitSession
    from splitc.runtime.remote import RemoteSession

    adaptive_mod = None
    if kind == "adaptive":
        import splitc.runtime.adaptive as adaptive_mod
    clock = DeviceClock(spec["slowdown"], spec.get("device_host_ms"))
    clock.install()

    x = np.load(spec["input"])
    ref = np.load(spec["reference"]).astype(np.float64)
    if kind == "edge":
        session = SplitSession(Bundle.open(spec["bundle"]))
        name = session.manifest.inputs[0].name
    elif kind == "remote":
        bundle = Bundle.open(spec["bundle"])
        session = RemoteSession(bundle, spec["url"], token=spec["token"], split=spec["split"], timeout=spec["timeout"], fallback=False)
        name = bundle.manifest.inputs[0].name
    else:
        session = adaptive_mod.AdaptiveSession(spec["bundle"], spec["url"], token=spec["token"], timeout=spec["timeout"])
        name = None

    def once() -> dict:
        clock.reset()
        feed = {name: x} if name else [x]
        tick = time.perf_counter()
        if kind == "edge":
            outputs, extra = session.run(feed), {"source": "edge"}
        else:
            result = session.infer(feed)
            outputs = result.outputs
            extra = {"source": result.source, "up": int(getattr(result, "bytes_sent", 0) or 0),
                     "down": int(getattr(result, "bytes_received", 0) or 0),
                     "timings": {k: round(float(v), 3) for k, v in (getattr(result, "timings", None) or {}).items()}}
            if kind == "adaptive":
                extra["variant"] = f"v{result.variant}"
                extra["predicted_ms"] = _number(getattr(result, "predicted_ms", None))
                est = getattr(session, "estimator", None)
                extra["est_mbit"] = _number(getattr(est, "bandwidth_mbit", None))
                extra["est_rtt_ms"] = _number(getattr(est, "rtt_ms", None))
        latency = (time.perf_counter() - tick) * 1e3
        out = next(iter(outputs.values())) if isinstance(outputs, dict) else outputs[0]
        return {"ms": round(latency, 3), "device_ms": round(clock.device_ms, 3), "host_device_ms": round(clock.host_ms, 3),
                "err": _rel_err(np.asarray(out), ref), **extra}

    for _ in range(spec["warmup"]):
        once()
    print("READY", flush=True)
    line = sys.stdin.readline().split()
    t0 = float(line[1]) if len(line) == 2 else time.monotonic()
    time.sleep(max(0.0, t0 - time.monotonic()))
    records = []
    while time.monotonic() - t0 < spec["duration"] and len(records) < spec["max_requests"]:
        start = time.monotonic() - t0
        try:
            rec = once()
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal: the table counts errors
            rec = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            time.sleep(0.2)
        rec["start"], rec["end"] = round(start, 4), round(time.monotonic() - t0, 4)
        records.append(rec)
    switches = [_jsonable(s) for s in getattr(session, "switches", []) or []]
    if hasattr(session, "close"):
        session.close()
    Path(spec["out"]).write_text(json.dumps({"records": records, "switches": switches}))


def _number(value):
    try:
        return None if value is None else round(float(value), 3)
    except (TypeError, ValueError):
        return None


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        if hasattr(value, "__dict__"):
            return {k: _jsonable(v) for k, v in vars(value).items()}
        return repr(value)


def load_main(spec_path: str) -> None:
    """Load generator (edge namespace, unshaped link): N threads, each with its own keep-alive
    connection, POST a precomputed request for a bounded time."""
    import http.client

    from splitc.runtime import Bundle, SplitSession
    from splitc.runtime.v2protocol import encode_request, model_name_for

    spec = json.loads(Path(spec_path).read_text())
    bundle = Bundle.open(spec["bundle"])
    manifest = bundle.manifest
    first = spec["split"]
    env = {manifest.inputs[0].name: np.load(spec["input"])}
    if first > 0:
        session = SplitSession(bundle)
        for index in range(first):
            env = session.run_partition(index, env)
    body, headers = encode_request(env, [t.name for t in manifest.outputs])
    headers = {**headers, "Authorization": f"Bearer {spec['token']}"}
    path = f"/v2/models/{model_name_for(str(manifest.model.get('name') or 'model'))}/infer"
    latencies, errors, lock = [], [0], threading.Lock()
    start_gate = threading.Event()
    deadline = [0.0]

    def worker() -> None:
        conn = None
        start_gate.wait()
        while time.monotonic() < deadline[0]:
            tick = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(spec["host"], spec["port"], timeout=60)
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn = None
            with lock:
                if ok:
                    latencies.append((time.perf_counter() - tick) * 1e3)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(spec["clients"])]
    for t in threads:
        t.start()
    began = time.monotonic()
    deadline[0] = began + spec["duration"]
    start_gate.set()
    for t in threads:
        t.join(spec["duration"] + 120)
    elapsed = time.monotonic() - began
    Path(spec["out"]).write_text(json.dumps({"latencies": latencies, "errors": errors[0], "elapsed": elapsed, "body_bytes": len(body)}))


# =========================================================================================== parent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_trace(text: str, phase_s: float) -> list[netemu.Phase]:
    from splitc.targets import load_link

    phases = []
    for item in text.split(","):
        name, _, seconds = item.strip().partition(":")
        link = load_link(name)
        phases.append(netemu.Phase(name, link.mbit_s, link.rtt_ms, float(seconds) if seconds else phase_s))
    return phases


TARGET_TOML = """# Written by bench/link_bench.py: {what}
name = "{name}"
description = "{description}"
tier = "{tier}"
arch = "x86_64"

[compute]
sustained_gflops = {gflops:.4f}
memory_bandwidth_gbs = 1000.0
memory_gb = 16.0
{price}
[backend]
name = "onnxruntime"
intra_op_threads = {threads}
"""


def write_targets(work: Path, edge_gflops: float, cloud_gflops: float, note: str) -> tuple[Path, Path]:
    edge, cloud = work / "edge-host.toml", work / "cloud-host.toml"
    edge.write_text(TARGET_TOML.format(what=f"the emulated device, {note}", name="edge-host", tier="edge", threads=1, gflops=edge_gflops,
                                       description="this x86 host, 1 thread, ONNX Runtime, timed as the emulated device", price=""))
    cloud.write_text(TARGET_TOML.format(what=f"the 'cloud' (this host), {note}", name="cloud-host", tier="cloud", threads=1, gflops=cloud_gflops,
                                        description="this x86 host, ONNX Runtime (1 thread) as the cloud",
                                        price="\n[price]\nvm_usd_per_hour = 0.357\nsource = \"as cloud-cpu.toml\"\ndate = \"2024\"\n"))
    return edge, cloud


class Builder:
    """Model, reference, calibration and compiled bundles, cached in the work directory."""

    def __init__(self, work: Path, rebuild: bool):
        self.work = work
        if rebuild and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)

    def model(self) -> None:
        import torch
        from hf_models import resnet18

        pt2 = self.work / "resnet18.pt2"
        self.input_path, self.ref_path = self.work / "input.npy", self.work / "reference.npy"
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        if not pt2.exists():
            module = resnet18()
            with torch.no_grad():
                np.save(self.ref_path, module(x).numpy())
                torch.export.save(torch.export.export(module, (x,)), str(pt2))
            np.save(self.input_path, x.numpy())
        from splitc.frontend import import_model
        from splitc.passes.cuts import CutAnalysis

        _, self.graph = import_model(pt2)
        self.analysis = CutAnalysis(self.graph)
        self.pt2 = pt2

    def compile(self, name: str, targets: list[Path], cut=None, quantize: str | None = None, link=None) -> Path:
        from splitc.targets import load_link, load_target

        from splitc.drivers.compiler import compile_model

        from splitc.passes.contract import CompileOptions

        out = self.work / f"{name}.splitc"
        if (out / "manifest.json").exists():
            return out
        tick = time.perf_counter()
        log(f"compiling {out.name} ...")
        compile_model(self.graph, CompileOptions([load_target(str(t)) for t in targets], cut=cut if cut is not None else "auto", link=link or load_link("4g"), samples=2, quantize=quantize), out)
        log(f"  {out.name} compiled in {time.perf_counter() - tick:.0f} s")
        return out


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tick) * 1e3)
    return float(np.median(times))


def calibrate(builder: Builder, edge_bundle: Path, cloud_bundle: Path, slowdown_arg: str) -> dict:
    """Measure both sides here; derive the slowdown and the target figures the planner uses."""
    from splitc.passes.cost_model import compute_ms
    from splitc.runtime import Bundle, SplitSession
    from splitc.targets import load_target

    x = np.load(builder.input_path)
    edge = SplitSession(Bundle.open(edge_bundle))
    cloud = SplitSession(Bundle.open(cloud_bundle))
    name = edge.manifest.inputs[0].name
    edge_ms = median_ms(lambda: edge.run({name: x}))
    cloud_ms = median_ms(lambda: cloud.run({name: x}))
    rpi4_ms = float(compute_ms(builder.analysis.order, load_target("rpi4")).sum())
    if slowdown_arg == "rpi4":
        factor, how = max(1.0, rpi4_ms / edge_ms), f"rpi4's modelled {rpi4_ms:.0f} ms / this host's {edge_ms:.1f} ms"
    else:
        factor, how = max(1.0, float(slowdown_arg)), "--device-slowdown"
    flops = builder.graph.total_flops
    return {"host_edge_ms": round(edge_ms, 2), "host_cloud_ms": round(cloud_ms, 2), "rpi4_model_ms": round(rpi4_ms, 1),
            "device_slowdown": round(factor, 3), "slowdown_from": how, "device_ms": round(edge_ms * factor, 1),
            "edge_gflops": flops / (edge_ms * factor * 1e6), "cloud_gflops": flops / (cloud_ms * 1e6)}


def device_partition_times(bundles: list[Path], input_path: Path, rounds: int = 9) -> dict[str, float]:
    """Host ms of every edge-host partition 0 in `bundles` (bundle or variant directories), keyed
    by artifact path: what DeviceClock scales. Measured round-robin (one run of each per round) and
    summarised by the fastest round: on a shared host the minimum is the steadiest estimate of the
    compute itself, and a change in load shifts all partitions alike. Identical artifacts (by
    sha256: edge-only and a device-only variant) are timed once and share the figure."""
    import hashlib

    from splitc.runtime import Bundle
    from splitc.runtime.executors import load_executor
    from splitc.runtime.session import host_artifact

    paths = []
    for path in bundles:
        variants = (Path(path) / "variants.json").exists()
        paths += sorted(p.parent for p in Path(path).glob("*/manifest.json")) if variants else [Path(path)]
    x = np.load(input_path)
    runs, digest_of = {}, {}
    for path in paths:
        bundle = Bundle.open(path)
        partition = bundle.manifest.partitions[0]
        if partition.target == "edge-host":
            artifact = host_artifact(partition)
            file = bundle.file(artifact)
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            digest_of[str(file.resolve())] = digest
            if digest not in runs:
                runs[digest] = load_executor(artifact, file)
    samples: dict[str, list[float]] = {digest: [] for digest in runs}
    for run in runs.values():
        run([x])
    for _ in range(rounds):
        for digest, run in runs.items():
            tick = time.perf_counter()
            run([x])
            samples[digest].append((time.perf_counter() - tick) * 1e3)
    return {path: round(min(samples[digest]), 3) for path, digest in digest_of.items()}


def planner_choice(builder: Builder, targets: list[Path], link, quantize: str | None) -> tuple[str, int | None, float, int]:
    """The latency-optimal placement the planner picks on `link`: ("edge"|"cloud"|"split", position,
    estimated ms, bytes it prices as sent)."""
    from splitc.passes.money import Workload
    from splitc.passes.planner import active_tiers, plan_placements
    from splitc.targets import load_target

    chain = [load_target(str(t)) for t in targets]
    plans = plan_placements(builder.analysis, chain, link, Workload(10), quantize_bits={"int8": 8, "int4": 4}.get(quantize or ""))
    plan = plans.plans[plans.chosen]
    active, cuts = active_tiers(plan.placement, plan.cuts)
    sent = int(plan.transfers[0]["bytes"]) if plan.transfers else 0
    if active == [0]:
        return "edge", None, plan.latency_ms, sent
    if active == [1]:
        return "cloud", None, plan.latency_ms, sent
    return "split", builder.analysis.resolve(cuts[0]), plan.latency_ms, sent


def pct(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


class Mode:
    def __init__(self, name: str, kind: str, bundle: Path, split: int = 0, note: str = "", static: bool = True):
        self.name, self.kind, self.bundle, self.split, self.note, self.static = name, kind, bundle, split, note, static
        self.port: int | None = None
        self.records: list[dict] = []
        self.switches: list = []
        self.wire = (0, 0)


def start_servers(testbed: netemu.Testbed, modes: list[Mode], work: Path) -> list[tuple[subprocess.Popen, Path, Mode]]:
    token_file = work / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    servers, port = [], 8001
    for mode in modes:
        if mode.kind == "edge":
            continue
        mode.port = port
        argv = [sys.executable, "-m", "splitc.cli", "serve", str(mode.bundle), "--host", testbed.cloud_ip, "--port", str(port),
                "--token-file", str(token_file)]
        if mode.kind == "remote":
            argv += ["--partition", str(mode.split)]
        logfile = work / f"server-{port}.log"
        with open(logfile, "w") as handle:  # the child keeps its own copy of the descriptor
            servers.append((testbed.popen(testbed.cloud_ns, argv, stdout=handle, stderr=subprocess.STDOUT), logfile, mode))
        port += 1
    deadline = time.monotonic() + 180
    for proc, logfile, mode in servers:
        while "serving" not in logfile.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = logfile.read_text().strip().splitlines()[-3:]
                raise netemu.NetemError(f"server for {mode.name} did not start: {' | '.join(tail)}")
            time.sleep(0.2)
    return servers


def run_client(testbed: netemu.Testbed, relay: netemu.Relay | None, mode: Mode, phases: list[netemu.Phase], args, builder: Builder,
               calib: dict, down_factor: float) -> list[dict]:
    work = builder.work
    duration = sum(p.seconds for p in phases)
    spec = {"kind": mode.kind, "bundle": str(mode.bundle), "split": mode.split, "token": TOKEN, "timeout": args.timeout,
            "url": f"http://127.0.0.1:{mode.port + 1000}" if mode.port else None, "input": str(builder.input_path),
            "reference": str(builder.ref_path), "slowdown": calib["device_slowdown"], "warmup": args.warmup,
            "device_host_ms": calib.get("device_host_ms", {}),
            "duration": duration, "max_requests": args.edge_requests if mode.kind == "edge" else 10**9,
            "out": str(work / f"client-{mode.name}.json")}
    spec_path = work / f"client-{mode.name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    driver = netemu.TraceDriver(testbed, relay, phases, 0.0, down_factor)
    driver.apply(phases[0])
    errlog = work / f"client-{mode.name}.log"
    with open(errlog, "w") as handle:  # the child keeps its own copy of the descriptor
        proc = testbed.popen(testbed.edge_ns, [sys.executable, str(HERE), "--_client", str(spec_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=handle, text=True, bufsize=1)
    try:
        line = proc.stdout.readline()
        if line.strip() != "READY":
            raise netemu.NetemError(f"client for {mode.name} failed during warm-up; see {errlog}: "
                                    f"{' | '.join(errlog.read_text().strip().splitlines()[-2:])}")
        before = testbed.wire_bytes()
        driver.t0 = time.monotonic() + 0.05
        driver.start()
        proc.stdin.write(f"GO {driver.t0}\n")
        proc.stdin.flush()
        try:
            proc.wait(duration + args.timeout + 120)
        except subprocess.TimeoutExpired:
            raise netemu.NetemError(f"client for {mode.name} still running {duration + args.timeout + 120:.0f} s after it started; see {errlog}") from None
        after = testbed.wire_bytes()
        mode.wire = (after[0] - before[0], after[1] - before[1])
    finally:
        driver.stop.set()
        netemu.stop_process(proc)
        testbed.forget(proc)
    if proc.returncode != 0 or not Path(spec["out"]).exists():
        raise netemu.NetemError(f"client for {mode.name} exited {proc.returncode}; see {errlog}")
    result = json.loads(Path(spec["out"]).read_text())
    mode.records, mode.switches = result["records"], result["switches"]
    mode.applied = driver.applied
    return mode.records


def run_load(testbed: netemu.Testbed, mode: Mode, args, builder: Builder) -> dict:
    testbed.unshape()
    spec = {"bundle": str(mode.bundle), "split": mode.split, "token": TOKEN, "host": testbed.cloud_ip, "port": mode.port,
            "input": str(builder.input_path), "clients": args.load_clients, "duration": args.load_s,
            "out": str(builder.work / "load.json")}
    spec_path = builder.work / "load.spec.json"
    spec_path.write_text(json.dumps(spec))
    errlog = builder.work / "load.log"
    with open(errlog, "w") as handle:
        proc = testbed.popen(testbed.edge_ns, [sys.executable, str(HERE), "--_load", str(spec_path)], stdout=handle, stderr=subprocess.STDOUT)
        proc.wait(args.load_s + 300)
        testbed.forget(proc)
    if proc.returncode != 0:
        raise netemu.NetemError(f"load generator exited {proc.returncode}; see {errlog}")
    data = json.loads(Path(spec["out"]).read_text())
    lat = data["latencies"]
    return {"mode": mode.name, "clients": args.load_clients, "seconds": round(data["elapsed"], 2), "completed": len(lat),
            "errors": data["errors"], "throughput_rps": round(len(lat) / data["elapsed"], 2), "p50_ms": round(pct(lat, 50), 2),
            "p99_ms": round(pct(lat, 99), 2), "request_bytes": data["body_bytes"]}


# ------------------------------------------------------------------------------------ reporting


def summarise(mode: Mode, phases: list[netemu.Phase]) -> dict:
    ok = [r for r in mode.records if "error" not in r]
    bounds = np.cumsum([0.0] + [p.seconds for p in phases])
    per_phase = []
    for k, phase in enumerate(phases):
        rows = ok if mode.kind == "edge" else [r for r in ok if bounds[k] <= (r["start"] + r["end"]) / 2 < bounds[k + 1]]
        lat = [r["ms"] for r in rows]
        entry = {"phase": f"{k + 1}:{phase.name}", "n": len(lat), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
                 "mean_ms": float(np.mean(lat)) if lat else float("nan")}
        if mode.kind == "adaptive":
            variants: dict[str, int] = {}
            for r in rows:
                variants[r.get("variant", "?")] = variants.get(r.get("variant", "?"), 0) + 1
            entry["variants"] = variants
        per_phase.append(entry)
    lat = [r["ms"] for r in ok]
    weights = [p.seconds for p, e in zip(phases, per_phase) if e["n"]]
    means = [e["mean_ms"] for e in per_phase if e["n"]]
    n = max(len(ok), 1)
    return {
        "mode": mode.name, "note": mode.note, "static": mode.static, "n": len(ok), "errors": len(mode.records) - len(ok),
        "fallbacks": sum(1 for r in ok if r.get("source") == "local-fallback"),
        "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "mean_ms": float(np.mean(lat)) if lat else float("nan"),
        "phase_weighted_mean_ms": float(np.average(means, weights=weights)) if means else float("nan"),
        "device_ms_mean": float(np.mean([r["device_ms"] for r in ok])) if ok else float("nan"),
        "body_up_B": sum(r.get("up", 0) for r in ok) / n, "body_down_B": sum(r.get("down", 0) for r in ok) / n,
        "wire_up_B": mode.wire[0] / n, "wire_down_B": mode.wire[1] / n,
        "max_rel_err": max((r["err"] for r in ok), default=float("nan")),
        "phases": per_phase, "switches": len(mode.switches),
    }


def fmt(v, digits=0):
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:,.{digits}f}"


def print_report(summaries: list[dict], phases: list[netemu.Phase], calib: dict, load: dict | None, header: str) -> dict:
    print()
    print(header)
    print(f"device compute: this x86 host (ONNX Runtime, 1 thread, {calib['host_edge_ms']} ms whole model), x{calib['device_slowdown']:.1f} "
          f"slowdown ({calib['slowdown_from']}) -> emulated device {calib['device_ms']} ms; NOT a Raspberry Pi. "
          f"cloud: this host, ONNX Runtime, {calib['host_cloud_ms']} ms whole model")
    print()
    cols = f"{'mode':28s} {'n':>4s} {'err':>3s} {'p50 ms':>8s} {'p95 ms':>8s} {'mean ms':>8s} {'phase-wtd':>9s} {'device ms':>9s} {'up B/req':>9s} {'down B/req':>10s} {'wire up B':>9s} {'rel err':>8s}"
    print(cols)
    print("-" * len(cols))
    for s in summaries:
        print(f"{s['mode'][:28]:28s} {s['n']:4d} {s['errors']:3d} {fmt(s['p50_ms']):>8s} {fmt(s['p95_ms']):>8s} {fmt(s['mean_ms']):>8s} "
              f"{fmt(s['phase_weighted_mean_ms']):>9s} {fmt(s['device_ms_mean']):>9s} {fmt(s['body_up_B']):>9s} {fmt(s['body_down_B']):>10s} "
              f"{fmt(s['wire_up_B']):>9s} {s['max_rel_err']:8.1e}")
    if len(phases) > 1:
        print()
        print("per phase: p50 / p95 / mean ms (n)" + "".join(f" | {k + 1}:{p.name} {p.mbit:g} Mbit/s {p.rtt_ms:g} ms {p.seconds:g} s" for k, p in enumerate(phases)))
        for s in summaries:
            cells = [f"{fmt(e['p50_ms'])}/{fmt(e['p95_ms'])}/{fmt(e['mean_ms'])} ({e['n']})" for e in s["phases"]]
            print(f"  {s['mode'][:28]:28s} " + " | ".join(f"{c:>24s}" for c in cells))
            if any("variants" in e for e in s["phases"]):
                print(f"  {'  variants used':28s} " + " | ".join(f"{json.dumps(e.get('variants', {})):>24s}" for e in s["phases"]))
    verdict: dict = {}
    static = [s for s in summaries if s["static"] and s["n"]]
    adaptive = next((s for s in summaries if not s["static"] and s["n"]), None)
    print()
    if static:
        key = "phase_weighted_mean_ms" if len(phases) > 1 else "mean_ms"
        best = min(static, key=lambda s: s[key])
        verdict["best_static"] = best["mode"]
        print(f"best static ({'phase-weighted mean' if len(phases) > 1 else 'mean'}): {best['mode']} {fmt(best[key])} ms")
        if len(phases) > 1:
            oracle = np.average([min(s["phases"][k]["mean_ms"] for s in static if s["phases"][k]["n"]) for k in range(len(phases))],
                                weights=[p.seconds for p in phases])
            verdict["per_phase_oracle_ms"] = float(oracle)
            print(f"per-phase oracle over the static modes (best static mode in each phase): {fmt(oracle)} ms")
        if adaptive:
            gain = 1 - adaptive[key] / best[key]
            gain_req = 1 - adaptive["mean_ms"] / min(s["mean_ms"] for s in static)
            verdict.update(adaptive_ms=adaptive[key], adaptive_vs_best_static=gain, adaptive_vs_best_static_request_mean=gain_req)
            def word(g):
                return f"{abs(g) * 100:.1f}% {'lower' if g >= 0 else 'HIGHER'}"

            print(f"adaptive: {fmt(adaptive[key])} ms = {word(gain)} than the best static (goal: >= 25% lower); "
                  f"plain mean over requests: {word(gain_req)} than the best static's; {adaptive['switches']} switches")
        else:
            print("adaptive: not measured")
        by_name = {s["mode"]: s for s in static}
        ends = [by_name[n] for n in ("edge-only", "cloud-only") if n in by_name]
        splits = [s for s in static if s["mode"] not in ("edge-only", "cloud-only")]
        if ends and splits:
            worse = max(ends, key=lambda s: s[key])
            chosen = next((s for s in splits if "planner" in s["note"]), None) or min(splits, key=lambda s: s[key])
            best_split = min(splits, key=lambda s: s[key])
            verdict.update(worse_end=worse["mode"], chosen_split=chosen["mode"], chosen_vs_worse_end=worse[key] / chosen[key])
            print(f"split {chosen['mode']}{' (planner)' if 'planner' in chosen['note'] else ''}: {fmt(chosen[key])} ms = "
                  f"{worse[key] / chosen[key]:.2f}x faster than the worse of edge-only/cloud-only ({worse['mode']} {fmt(worse[key])} ms; goal >= 2x)"
                  + (f"; best measured split {best_split['mode']} {worse[key] / best_split[key]:.2f}x" if best_split is not chosen else ""))
    if load:
        print()
        print(f"load test ({load['mode']} server, {load['clients']} concurrent clients, {load['seconds']} s, unshaped veth, "
              f"{load['request_bytes']:,} B requests): {load['throughput_rps']} req/s, p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, "
              f"{load['errors']} errors ({load['completed']} completed)")
    return verdict


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="wifi,4g,3g,wifi", help="link presets in order, NAME[:SECONDS] (targets/links.toml)")
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds per trace phase without their own")
    parser.add_argument("--preset", help="a fixed link preset instead of the trace (e.g. 4g)")
    parser.add_argument("--duration-s", type=float, default=30.0, help="with --preset: seconds per mode")
    parser.add_argument("--modes", default="edge,cloud,splits,planner,adaptive", help="subset of edge,cloud,splits,planner,adaptive")
    parser.add_argument("--cuts", default=DEFAULT_CUTS, help="static split points (module paths or node names)")
    parser.add_argument("--quantize", choices=["none", "int8"], default="int8", help="what the split bundles send at the cut")
    parser.add_argument("--device-slowdown", default="rpi4", help="'rpi4' (match rpi4's modelled latency), or a factor; 1 = none")
    parser.add_argument("--variants", type=int, default=4, help="variants compiled for adaptive")
    parser.add_argument("--down-factor", type=float, default=1.0, help="downlink rate = uplink rate x this")
    parser.add_argument("--edge-requests", type=int, default=10, help="requests for edge-only (it does not use the link)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request network timeout (s)")
    parser.add_argument("--load-s", type=float, default=15.0)
    parser.add_argument("--load-clients", type=int, default=16)
    parser.add_argument("--no-load", action="store_true")
    parser.add_argument("--workdir", default="/tmp/splitc-link-bench", help="compiled bundles are cached here")
    parser.add_argument("--rebuild", action="store_true", help="recompile everything")
    parser.add_argument("--json", dest="json_path", help="report file (default: WORKDIR/link_bench[-PRESET].json)")
    parser.add_argument("--_client", help=argparse.SUPPRESS)
    parser.add_argument("--_load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._client or args._load:
        try:
            return client_main(args._client) if args._client else load_main(args._load)
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
            sys.exit(130)
    try:
        netemu.preflight()
    except netemu.NetemError as exc:
        sys.exit(f"link_bench: {exc}")
    if args.device_slowdown != "rpi4":
        try:
            float(args.device_slowdown)
        except ValueError:
            sys.exit(f"link_bench: --device-slowdown {args.device_slowdown!r} is neither 'rpi4' nor a number")
    wanted = {m.strip() for m in args.modes.split(",") if m.strip()}
    unknown = wanted - {"edge", "cloud", "splits", "planner", "adaptive"}
    if unknown:
        sys.exit(f"link_bench: unknown mode(s) {', '.join(sorted(unknown))}; choose from edge,cloud,splits,planner,adaptive")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's pytree deprecation notes, once per load
    testbed = netemu.Testbed()
    servers: list = []
    try:
        report = run(args, wanted, testbed, servers)
    except netemu.NetemError as exc:
        sys.exit(f"link_bench: {exc}")
    except KeyboardInterrupt:
        testbed.down()
        print("link_bench: interrupted; namespaces and processes removed", file=sys.stderr)
        sys.exit(130)
    finally:
        testbed.down()
    return report


def run(args, wanted: set[str], testbed: netemu.Testbed, servers: list) -> dict:
    from splitc.targets import Link, load_link

    started = time.time()
    if args.preset:
        link = load_link(args.preset)
        phases = [netemu.Phase(args.preset, link.mbit_s, link.rtt_ms, args.duration_s)]
    else:
        phases = parse_trace(args.trace, args.phase_s)
    total = sum(p.seconds for p in phases)
    average = Link("trace-average", sum(p.mbit * p.seconds for p in phases) / total, sum(p.rtt_ms * p.seconds for p in phases) / total)
    plan_link = load_link(args.preset) if args.preset else average
    quantize = None if args.quantize == "none" else args.quantize

    builder = Builder(Path(args.workdir), args.rebuild)
    builder.model()
    flops = builder.graph.total_flops
    edge_t, cloud_t = write_targets(builder.work, 7.0, 200.0, "provisional figures")
    edge_bundle = builder.compile("edge-only", [edge_t])
    cloud_bundle = builder.compile("cloud-only", [cloud_t])
    calib = calibrate(builder, edge_bundle, cloud_bundle, args.device_slowdown)
    edge_t, cloud_t = write_targets(builder.work, calib["edge_gflops"], calib["cloud_gflops"],
                                    f"figures measured on this host, device x{calib['device_slowdown']:.2f}")
    log(f"device: {calib['host_edge_ms']} ms here x {calib['device_slowdown']:.2f} ({calib['slowdown_from']}) = {calib['device_ms']} ms; "
        f"cloud: {calib['host_cloud_ms']} ms; model {flops / 1e9:.2f} GFLOP")

    modes: list[Mode] = []
    if "edge" in wanted:
        modes.append(Mode("edge-only", "edge", edge_bundle, note="whole model on the device; link unused"))
    if "cloud" in wanted:
        modes.append(Mode("cloud-only", "remote", cloud_bundle, split=0, note="input sent, server runs everything"))
    q = f"-{quantize}" if quantize else ""
    split_positions: dict[int, Mode] = {}
    if "splits" in wanted:
        for cut in [c.strip() for c in args.cuts.split(",") if c.strip()]:
            position = builder.analysis.resolve(cut)
            node = builder.analysis.order[position].name
            label = cut.removeprefix("resnet.encoder.").removeprefix("resnet.")
            bundle = builder.compile(f"split-{node}{q}", [edge_t, cloud_t], cut=[node], quantize=quantize)
            split_positions[position] = Mode(f"split@{label}{q}", "remote", bundle, split=1, note=f"cut after {node}")
            modes.append(split_positions[position])
    planner_note = None
    if "planner" in wanted:
        choice, position, estimate_ms, priced = planner_choice(builder, [edge_t, cloud_t], plan_link, quantize)
        where = f"{plan_link.name} ({plan_link.mbit_s:.2f} Mbit/s, {plan_link.rtt_ms:.0f} ms)"
        estimate = f"estimated {estimate_ms:.0f} ms, {priced:,} B sent"
        if choice == "split":
            node = builder.analysis.order[position].name
            if position in split_positions:
                split_positions[position].note += f"; planner's choice for {where}"
            else:
                bundle = builder.compile(f"split-{node}{q}", [edge_t, cloud_t], cut=[node], quantize=quantize)
                modes.append(Mode(f"split@{node}{q}", "remote", bundle, split=1, note=f"cut after {node}; planner's choice for {where}"))
            planner_note = f"planner's choice for {where}: cut after {node} ({estimate})"
        else:
            planner_note = f"planner's choice for {where}: {choice}-only ({estimate})"
            if choice == "cloud" and quantize:
                planner_note += (f"; note: with quantize_bits the planner prices the raw model input at {quantize} too, "
                                 f"but a cloud-only bundle sends it as float32 ({sum(t.nbytes for t in builder.graph.inputs):,} B)")
            for m in modes:
                if m.name == f"{choice}-only":
                    m.note += f"; planner's choice for {where}"
        log(planner_note)
    adaptive_missing = None
    if "adaptive" in wanted:
        adaptive_missing = add_adaptive(builder, modes, [edge_t, cloud_t], phases, average, args, quantize)
        if adaptive_missing:
            log(f"adaptive: skipped ({adaptive_missing})")

    # The device partitions, timed together; in rpi4 mode the factor is re-derived from this pass
    # (edge-only's time in it), so every device partition is scaled from the same measurement.
    times = device_partition_times([edge_bundle] + [m.bundle for m in modes if m.kind != "remote" or m.split > 0], builder.input_path)
    whole = times[str(next(iter(Path(edge_bundle).glob("p0/*.onnx"))).resolve())]
    if args.device_slowdown == "rpi4":
        calib["device_slowdown"] = round(max(1.0, calib["rpi4_model_ms"] / whole), 3)
        calib["slowdown_from"] = f"rpi4's modelled {calib['rpi4_model_ms']:.0f} ms / this host's {whole:.1f} ms"
    calib.update(host_edge_ms=whole, device_ms=round(whole * calib["device_slowdown"], 1), device_host_ms=times)
    log(f"device partitions here (ms; emulated device x{calib['device_slowdown']:.1f}): "
        + ", ".join(f"{Path(k).relative_to(builder.work.resolve())} {v:.1f}" for k, v in times.items()))
    log(f"setting up namespaces {testbed.edge_ns} / {testbed.cloud_ns} ...")
    testbed.up()
    servers.extend(start_servers(testbed, modes, builder.work))
    maps = {m.port + 1000: (testbed.cloud_ip, m.port) for m in modes if m.port}
    relay = netemu.Relay(testbed, maps, phases[0].rtt_ms) if maps else None
    for mode in modes:
        log(f"{mode.name}: {f'{args.edge_requests} requests' if mode.kind == 'edge' else f'{total:g} s'} ...")
        run_client(testbed, relay, mode, phases, args, builder, calib, args.down_factor)
        bad = [r for r in mode.records if "error" in r]
        log(f"  {len(mode.records) - len(bad)} ok, {len(bad)} errors" + (f" (first: {bad[0]['error']})" if bad else ""))
    load = None
    if not args.no_load:
        key = "phase_weighted_mean_ms" if len(phases) > 1 else "mean_ms"
        measured = {m.name: summarise(m, phases)[key] for m in modes}
        splits = [m for m in modes if m.name.startswith("split@") and np.isfinite(measured[m.name])]
        target = min(splits, key=lambda m: measured[m.name]) if splits else next((m for m in modes if m.kind == "remote" and m.static), None)
        if target:
            log(f"load test: {args.load_clients} clients for {args.load_s:g} s against the {target.name} server ...")
            load = run_load(testbed, target, args, builder)
    server_stats = {}
    for proc, logfile, mode in servers:
        netemu.stop_process(proc)
        last = [line for line in logfile.read_text().splitlines() if line.startswith("stopped:")]
        server_stats[mode.name] = last[-1] if last else None

    summaries = [summarise(m, phases) for m in modes]
    trace_text = " -> ".join(f"{p.name} {p.mbit:g} Mbit/s/{p.rtt_ms:g} ms for {p.seconds:g} s" for p in phases)
    header = (f"HF ResNet-18, 1x3x224x224 float32, {flops / 1e9:.2f} GFLOP; split bundles send {quantize or 'float32'} at the cut; "
              f"link: {trace_text} (tc tbf + user-space RTT; downlink x{args.down_factor:g})")
    verdict = print_report(summaries, phases, calib, load, header)
    if planner_note:
        print(planner_note)
    if adaptive_missing:
        print(f"adaptive: not measured ({adaptive_missing})")
    report = {"header": header, "phases": [p.__dict__ for p in phases], "calibration": calib, "modes": summaries,
              "trace_applied": {m.name: getattr(m, "applied", []) for m in modes}, "load_test": load, "verdict": verdict,
              "server_stats": server_stats, "planner": planner_note, "adaptive_missing": adaptive_missing,
              "requests": {m.name: m.records for m in modes}, "switches": {m.name: m.switches for m in modes if m.switches},
              "wall_s": round(time.time() - started, 1), "loadavg_at_end": os.getloadavg()}
    out = Path(args.json_path or builder.work / f"link_bench{'-' + args.preset if args.preset else ''}.json")
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nJSON: {out}; wall {report['wall_s']:.0f} s")
    return report


def add_adaptive(builder: Builder, modes: list[Mode], targets: list[Path], phases, average, args, quantize) -> str | None:
    """Compile (or reuse) the variant directory and add the adaptive mode; the reason when it cannot."""
    try:
        import splitc.runtime.adaptive  # noqa: F401

        from splitc import variants as variants_mod
    except ImportError as exc:
        return f"splitc.drivers.variants / splitc.runtime.adaptive not importable: {exc}"
    from splitc.targets import load_target

    out = builder.work / f"variants-k{args.variants}{'-' + quantize if quantize else ''}-{average.mbit_s:.3g}mbit-{average.rtt_ms:.3g}ms"
    if not (out / "variants.json").exists():
        from splitc.passes.contract import CompileOptions

        options = CompileOptions([load_target(str(t)) for t in targets], average, samples=2, quantize=quantize or None)
        tick = time.perf_counter()
        log(f"compiling {args.variants} variants into {out.name} ...")
        variants_mod.compile_variants(builder.graph, options, out, args.variants, log=log)
        log(f"  variants compiled in {time.perf_counter() - tick:.0f} s")
    modes.append(Mode("adaptive", "adaptive", out, note="AdaptiveSession over the variant directory", static=False))
    return None


if __name__ == "__main__":
    main()
