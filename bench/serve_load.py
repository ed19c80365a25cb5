"""Load benchmark of a cloud-tier server on loopback: requests/s, p50/p99 latency and errors at
1/16/64/256 concurrent clients, each sending the boundary tensors in a loop. Prints figures (and
optionally JSON); asserts nothing.

    python bench/serve_load.py --cut stage2 --engine new [--clients 1,16,64,256] [--seconds 6]
    python bench/serve_load.py --cut head --engine old        # the hand-written server of git rev --old-rev
    python bench/serve_load.py --cut head --engine new --protocol grpc
    python bench/serve_load.py --cut head --engine triton     # tritonserver through `splitc export-triton`

The model is the Hugging Face ResNet-18 architecture at 224x224 (bench/hf_models.py, random init),
compiled once into --work (reused by later runs) for two cuts, both partitions on ONNX Runtime:
`stage2` (after resnet.encoder.stages.1: the server runs stages 3-4 + head) and `head` (after
the backbone: the server runs the classifier alone).

The server runs in its own process (as deployed), the load generator in this one: one asyncio loop
with one keep-alive connection per client, HTTP/1.1 through h11 (or grpc.aio for --protocol grpc),
so a few hundred clients cost one thread. Each point is bounded in time (--seconds) and count
(--max-requests). Latency is counted for answered (200) requests; a 503 with Retry-After
(admission control) is counted as `shed` and that client waits the Retry-After, as the edge
client does; anything else is an error. The first answer of each
point is decoded and compared with the local chain, so a server answering garbage fast does not
count. Figures from a shared 2-core machine are noisy: compare runs taken back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TOKEN = "bench-token-0123456789abcdef"
CUTS = {"stage2": "resnet.encoder.stages.1", "head": "resnet"}


# ----------------------------------------------------------------------------------- the model


def build(work: Path, cut: str, dynamic_batch: bool = False) -> Path:
    """The bundle for `cut` under `work` (compiled on the first run, reused after). With
    `dynamic_batch` the export's batch dimension is symbolic, so the cloud partition takes a batch
    and the server's dynamic batcher can run queued requests together."""
    out = work / f"resnet18-{cut}{'-dynbatch' if dynamic_batch else ''}.splitc"
    if (out / "manifest.json").is_file():
        return out
    import torch

    from hf_models import resnet18
    from splitc.drivers.compiler import compile_model
    from splitc.passes.contract import CompileOptions
    from splitc.frontend import import_model
    from splitc.targets import load_link, load_targets

    pt2 = work / f"resnet18{'-dynbatch' if dynamic_batch else ''}.pt2"
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    if not pt2.is_file():
        shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic_batch else None
        example = torch.cat([x, x]) if dynamic_batch else x  # export specialises a size-1 dimension: give it 2
        torch.export.save(torch.export.export(resnet18(), (example,), dynamic_shapes=shapes), pt2)
        np.save(work / "x.npy", x.numpy())
    _, graph = import_model(pt2)
    options = CompileOptions(load_targets("cloud-cpu,cloud-cpu"), cut=CUTS[cut], link=load_link("4g"), samples=1)
    compile_model(graph, options, out, log=lambda m: print(m, file=sys.stderr))
    return out


def boundary_and_answer(bundle_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What the device sends for the bench input, and what the whole chain answers."""
    from splitc.runtime import Bundle, SplitSession

    session = SplitSession(Bundle.open(bundle_path))
    x = np.load(bundle_path.parent / "x.npy")
    env = session.run_partition(0, session.bind_inputs([x]))
    return env, session.run([x])


# ---------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OLD_SERVER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("splitc.runtime.server_old", sys.argv[1])
server = importlib.util.module_from_spec(spec); sys.modules[spec.name] = server; spec.loader.exec_module(server)
from splitc.runtime import Bundle
app = server.PartitionServer(Bundle.open(sys.argv[2]), 1, token=sys.argv[4])
server.serve_until_signalled(server.make_http_server(app, "127.0.0.1", int(sys.argv[3])), drain_timeout=2)
"""


def start_server(engine: str, bundle: Path, port: int, work: Path, args) -> subprocess.Popen:
    token_file = work / "token"
    token_file.write_text(TOKEN)
    if engine == "old":
        old = work / f"server-{args.old_rev}.py"
        old.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.old_rev}:runtime/server.py"],
                                       check=True, capture_output=True).stdout)
        command = [sys.executable, "-c", OLD_SERVER, str(old), str(bundle), str(port), TOKEN]
    elif engine == "triton":  # the real tritonserver of nvidia-pytriton on `splitc export-triton --format python`
        from splitc.drivers.triton import export_triton
        from splitc.drivers.triton_server import find_tritonserver, start_tritonserver

        repo = work / f"triton-{bundle.stem}"
        export_triton(bundle, repo, fmt="python", instances=args.instances)
        return start_tritonserver(repo, find_tritonserver(), http_port=port, grpc_port=args.grpc_port, workdir=work / "triton-run")
    elif engine == "new":
        command = [sys.executable, "-c", "from splitc.cli import main; main()", "serve", str(bundle), "--port", str(port),
                   "--grpc-port", str(args.grpc_port), "--token-file", str(token_file), *args.server_args.split()]
    else:
        raise SystemExit(f"unknown engine {engine}")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def batch_histogram(port: int) -> list[tuple[str, int]]:
    """The server's splitc_batch_size histogram, read from its Prometheus /metrics."""
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith("splitc_batch_size_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((le, int(float(line.rsplit(" ", 1)[1]))))
    return buckets


def wait_ready(port: int, proc: subprocess.Popen, seconds: float = 120.0) -> None:
    import http.client

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:] if proc.stderr else 'see its log'}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- the load generator


class Point:
    """Outcomes of one load point."""

    def __init__(self):
        self.latencies: list[float] = []
        self.shed = 0
        self.errors: dict[str, int] = {}
        self.checked = False

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def _check(point: Point, outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    if point.checked:
        return
    point.checked = True
    for name, want in expected.items():
        if name not in outputs or not np.allclose(outputs[name], want, rtol=1e-3, atol=1e-4):
            point.error("wrong answer")


async def http_client(port: int, path: str, body: bytes, headers: list, expected, stop: float, budget: list, point: Point):
    import h11

    from splitc.runtime.v2protocol import HEADER_LENGTH, decode_response

    reader = writer = None
    conn = None
    while time.monotonic() < stop and budget[0] > 0:
        budget[0] -= 1
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            conn = h11.Connection(h11.CLIENT)
        tick = time.perf_counter()
        try:
            writer.write(conn.send(h11.Request(method="POST", target=path, headers=headers))
                         + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            status, response_headers, chunks = 0, {}, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(1 << 18)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        raise ConnectionResetError("closed by the server")
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            elapsed = time.perf_counter() - tick
            if status == 200:
                point.latencies.append(elapsed)
                if not point.checked:
                    outputs, _ = decode_response(b"".join(chunks), response_headers.get(HEADER_LENGTH.lower()))
                    _check(point, outputs, expected)
            elif status == 503 and "retry-after" in response_headers:
                point.shed += 1
                # As RemoteSession does: wait what the server asks (a client that retries at once
                # only turns shed load into more uploads to read and refuse).
                await asyncio.sleep(min(float(response_headers["retry-after"]), max(0.0, stop - time.monotonic())))
            else:
                point.error(str(status))
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                raise ConnectionResetError("closed")
            conn.start_next_cycle()
        except (OSError, h11.ProtocolError) as exc:
            if not isinstance(exc, ConnectionResetError) or str(exc) != "closed":
                point.error(type(exc).__name__)
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def grpc_client(channel, request, expected, stop: float, budget: list, point: Point):
    import grpc
    from tritonclient.grpc import service_pb2

    from splitc.runtime.grpc_service import outputs_of

    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                response_deserializer=service_pb2.ModelInferResponse.FromString)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    while time.monotonic() < stop and budget[0] > 0:
        budget[0] -= 1
        tick = time.perf_counter()
        try:
            response = await infer(request, metadata=metadata, timeout=60)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                point.shed += 1
                await asyncio.sleep(min(1.0, max(0.0, stop - time.monotonic())))
            else:
                point.error(exc.code().name)
            continue
        point.latencies.append(time.perf_counter() - tick)
        if not point.checked:
            _check(point, outputs_of(response), expected)


async def run_point(args, port: int, clients: int, model: str, env, expected) -> tuple[Point, float]:
    point = Point()
    budget = [args.max_requests]
    stop = time.monotonic() + args.seconds
    started = time.perf_counter()
    if args.protocol == "grpc":
        import grpc

        from splitc.runtime.grpc_service import infer_request

        request = infer_request(model, env)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") for _ in range(min(clients, 16))]
        await asyncio.gather(*(grpc_client(channels[i % len(channels)], request, expected, stop, budget, point) for i in range(clients)))
        for channel in channels:
            await channel.close()
    else:
        from splitc.runtime.v2protocol import encode_request

        body, extra = encode_request(env, list(expected))
        headers = [("host", f"127.0.0.1:{port}"), ("authorization", f"Bearer {TOKEN}"), ("content-length", str(len(body))),
                   *((k.lower(), v) for k, v in extra.items())]
        path = f"/v2/models/{model}/infer"
        await asyncio.gather(*(http_client(port, path, body, headers, expected, stop, budget, point) for _ in range(clients)))
    return point, time.perf_counter() - started


def summary(point: Point, elapsed: float, clients: int) -> dict:
    lat = np.array(point.latencies) * 1e3
    return {
        "clients": clients,
        "answered": len(lat),
        "requests_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "shed_503": point.shed,
        "errors": point.errors,
        "seconds": round(elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cut", choices=sorted(CUTS), default="stage2")
    parser.add_argument("--instances", type=int, default=2, help="--engine triton: model instances (instance_group count)")
    parser.add_argument("--engine", choices=["old", "new", "triton", "external"], default="new",
                        help="external: a server already listening on --port serving --model")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--model", help="model name on the server (default: the bundle's)")
    parser.add_argument("--server-args", default="", help="extra `splitc serve` options for --engine new (e.g. '--workers 2')")
    parser.add_argument("--old-rev", default="e0c226d", help="git revision whose runtime/server.py is --engine old")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "splitc-serve-load"))
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="export with a symbolic batch so the cloud partition takes a batch (for --server-args '--max-batch 8')")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = build(work, args.cut, args.dynamic_batch)
    env, expected = boundary_and_answer(bundle)
    from splitc.runtime import Bundle
    from splitc.runtime.v2protocol import model_name_for

    model = args.model or model_name_for(str(Bundle.open(bundle).manifest.model.get("name") or "model"))
    port = args.port or free_port()
    args.grpc_port = args.grpc_port or free_port()
    proc = None if args.engine == "external" else start_server(args.engine, bundle, port, work, args)
    rows = []
    try:
        if proc is not None:
            wait_ready(port, proc)
        sent = sum(a.nbytes for a in env.values())
        print(f"# {args.engine} server ({args.protocol}), cut {args.cut}: {sent} B sent per request, {args.seconds:g} s per point", flush=True)
        for clients in [int(c) for c in args.clients.split(",")]:
            point, elapsed = asyncio.run(run_point(args, port, clients, model, env, expected))
            row = summary(point, elapsed, clients)
            rows.append(row)
            print(f"{clients:4d} clients: {row['requests_per_s']:8.1f} req/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
                  f"shed(503) {row['shed_503']}  errors {row['errors'] or 0}", flush=True)
        if args.engine == "new":
            histogram = batch_histogram(port)
            if histogram:
                print("batch sizes (requests per backend call, cumulative counts): "
                      + "  ".join(f"<={le}: {count}" for le, count in histogram), flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"engine": args.engine, "protocol": args.protocol, "cut": args.cut,
                                                    "server_args": args.server_args, "points": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
