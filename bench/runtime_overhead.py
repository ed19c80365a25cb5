"""Runtime overhead per request on loopback: end-to-end time minus (local compute + server compute
+ transfer), for RemoteSession and AdaptiveSession. Prints figures; asserts nothing.

    python bench/runtime_overhead.py [--model tiny|small_resnet] [--requests 500] [--rounds 3] [--profile]

The model (a tiny CNN, or the example small ResNet) is compiled into a temporary directory twice:
as a split bundle (x86 with TVM -> cloud-cpu with ONNX Runtime) for RemoteSession, and as a
variant directory (`compile_variants`, K=2, for a device rated slow so one variant offloads) for
AdaptiveSession, pinned to its networked variant. A real server (runtime/server.py) serves both
from a separate process, as in a deployment: a server thread in the client's process would share
its GIL, and each GIL hand-off (up to the 5 ms switch interval) would be measured as overhead.

What counts as compute is the backend call itself: every executor (client and server) is wrapped
with a timer, so input checks, bookkeeping, (de)serialisation, HTTP, and waking threads all count
as overhead. What counts as transfer is a raw TCP exchange of the same request and response sizes
with an echo process over loopback (the floor any protocol pays on this host). Reported per
request: the median wall overhead, and the CPU time spent outside compute by the client thread and
the server's handler thread (steadier than wall time on a busy host, where waiting for a core
counts as wall overhead). With --profile, cProfile's top entries of the client path.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing
import pstats
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKEN = "bench-token-0123456789abcdef"

SLOW_DEVICE = """
name = "slow-x86"
description = "bench device: this host's CPU through TVM, rated slow so that a networked variant is chosen"
tier = "edge"
arch = "x86_64"
[compute]
sustained_gflops = 0.02
memory_bandwidth_gbs = 0.1
memory_gb = 1.0
[backend]
name = "tvm"
target = { kind = "llvm", mtriple = "x86_64-linux-gnu" }
[verify]
rtol = 1e-4
"""


def build(root: Path, model_name: str) -> tuple[Path, Path]:
    """A split bundle (x86 TVM -> cloud-cpu ONNX Runtime) for RemoteSession and a variant
    directory (device-only + a networked variant) for AdaptiveSession, of the same model."""
    import torch
    from splitc.frontend import import_model
    from splitc.targets import load_link, load_target, load_targets
    from torch import nn

    from splitc.drivers.compiler import compile_model

    from splitc.passes.contract import CompileOptions
    from splitc.drivers.variants import compile_variants

    torch.manual_seed(0)
    if model_name == "tiny":
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
        x, cut = torch.randn(1, 3, 32, 32), "relu"
    else:
        from examples.small_resnet import build as build_small_resnet

        model, x, cut = build_small_resnet(), torch.randn(1, 3, 64, 64), "layer2"
    torch.export.save(torch.export.export(model, (x,)), root / f"{model_name}.pt2")
    _, graph = import_model(root / f"{model_name}.pt2")
    split = root / f"{model_name}.splitc"
    compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), cut=cut, link=load_link("wifi"), samples=1), split)
    (root / "slow-x86.toml").write_text(SLOW_DEVICE)
    variants = root / f"{model_name}.variants"
    compile_variants(graph, CompileOptions([load_target(str(root / "slow-x86.toml")), load_target("cloud-cpu")], load_link("wifi"),
                                           samples=1), variants, 2)
    return split, variants


class Timed:
    """Wraps an executor; adds its wall time (sink[0]) and the CPU time of the calling thread
    (sink[1]) to a shared accumulator, in ms."""

    def __init__(self, run, sink: list[float]):
        self.run, self.sink = run, sink

    def __call__(self, inputs):
        tick, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.run(inputs)
        finally:
            self.sink[0] += (time.perf_counter() - tick) * 1e3
            self.sink[1] += (time.thread_time() - cpu) * 1e3


def wrap_remote(remote, sink: list[float]) -> None:
    remote.run_local(0, remote.split, remote.bind_inputs(_feed(remote.manifest)))  # loads the executors
    for index, run in list(remote._executors.items()):
        remote._executors[index] = Timed(run, sink)
    remote._session = None  # rebuilt with the wrapped executors on the next call


def _feed(manifest) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in manifest.inputs}


# ----------------------------------------------------------------------------- server process


def server_process(conn, bundle_path: str, variant_dir: str | None, server_module: str | None) -> None:
    """Serve the split bundle (and the variants) until told to stop; answer 'read' with the
    compute and handler CPU accumulated since the last 'reset'. `server_module`: a path to load
    the server from instead of splitc.runtime.server (to time another version of it)."""
    if server_module:
        import importlib.util

        spec = importlib.util.spec_from_file_location("splitc.runtime.server_under_test", server_module)
        server = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = server
        spec.loader.exec_module(server)
    else:
        from splitc.runtime import server
    from splitc.runtime import Bundle

    apps = [server.PartitionServer(Bundle.open(bundle_path), 1, token=TOKEN)]
    if variant_dir:
        apps += server.variant_servers(variant_dir, token=TOKEN)
    compute = [0.0, 0.0]
    handler = [0.0, 0]
    for app in apps:
        for index, run in list(app.session._executors.items()):
            if index >= app.first:
                app.session._executors[index] = Timed(run, compute)
    if hasattr(server, "_Handler"):  # the hand-written server of earlier revisions: its handler thread's CPU
        handle = server._Handler.handle_one_request

        def timed(self):
            cpu = time.thread_time()
            try:
                handle(self)
            finally:
                handler[0] += (time.thread_time() - cpu) * 1e3

        server._Handler.handle_one_request = timed
    count = [0]
    for app in apps:
        infer = app.infer

        def counted(body, header_length, infer=infer):
            count[0] += 1
            return infer(body, header_length)

        app.infer = counted
    httpd = server.make_http_server(apps if len(apps) > 1 else apps[0], "127.0.0.1", 0)
    server.serve_in_thread(httpd)
    conn.send(httpd.port)
    while True:
        command = conn.recv()
        if command == "reset":
            compute[:] = [0.0, 0.0]
            handler[0], count[0] = 0.0, 0
            conn.send(True)
        elif command == "read":
            conn.send({"compute_ms": compute[0], "compute_cpu_ms": compute[1], "handler_cpu_ms": handler[0], "requests": count[0]})
        else:
            httpd.drain(2)
            conn.send(True)
            return


def echo_process(conn, up: int, down: int) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    conn.send(listener.getsockname()[1])
    client, _ = listener.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reply = b"r" * down
    with client:
        while True:
            got = 0
            while got < up:
                chunk = client.recv(1 << 20)
                if not chunk:
                    return
                got += len(chunk)
            client.sendall(reply)


def raw_transfer_ms(up: int, down: int, count: int = 500) -> float:
    """Median time of a raw loopback exchange with another process: `up` bytes out, `down` back."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=echo_process, args=(child, up, down), daemon=True)
    proc.start()
    client = socket.create_connection(("127.0.0.1", parent.recv()))
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"q" * up
    times = []
    for _ in range(count + 50):
        tick = time.perf_counter()
        client.sendall(payload)
        got = 0
        while got < down:
            got += len(client.recv(1 << 20))
        times.append((time.perf_counter() - tick) * 1e3)
    client.close()
    proc.join(5)
    return statistics.median(times[50:])


class Server:
    def __init__(self, bundle: Path, variant_dir: Path | None = None, server_module: str | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=server_process, args=(child, str(bundle), str(variant_dir) if variant_dir else None, server_module),
                                daemon=True)
        self.proc.start()
        if not self.conn.poll(300):
            raise SystemExit("runtime_overhead: the server process did not start (see its traceback above)")
        self.port = self.conn.recv()
        self.url = f"http://127.0.0.1:{self.port}"

    def call(self, command: str):
        self.conn.send(command)
        if not self.conn.poll(60):
            raise SystemExit("runtime_overhead: the server process stopped answering")
        return self.conn.recv()

    def stop(self) -> None:
        self.call("stop")
        self.proc.join(5)


def measure(name: str, infer, local: list[float], server: Server, requests: int, transfer_ms: float) -> dict[str, float]:
    """Per request: wall overhead = total - local compute - server compute - raw transfer; CPU
    overhead = client thread CPU outside compute + server handler CPU outside compute."""
    for _ in range(30):  # warm-up: connections, executors, caches
        infer()
    server.call("reset")
    rows = []
    for _ in range(requests):
        local[:] = [0.0, 0.0]
        tick, cpu = time.perf_counter(), time.thread_time()
        infer()
        total, client_cpu = (time.perf_counter() - tick) * 1e3, (time.thread_time() - cpu) * 1e3
        rows.append((total, local[0], client_cpu - local[1]))
    stats = server.call("read")
    n = max(stats["requests"], 1)
    server_ms = stats["compute_ms"] / n
    server_cpu = (stats["handler_cpu_ms"] - stats["compute_cpu_ms"]) / n
    totals, locals_, client_cpus = (list(c) for c in zip(*rows))
    overheads = [t - l - server_ms - transfer_ms for t, l in zip(totals, locals_)]
    result = {"total": statistics.median(totals), "local": statistics.median(locals_), "server": server_ms,
              "overhead": statistics.median(overheads), "overhead_mean": statistics.fmean(overheads),
              "cpu_overhead": statistics.median(client_cpus) + server_cpu, "client_cpu": statistics.median(client_cpus),
              "server_cpu": server_cpu}
    print(f"{name:16s} total {result['total']:7.3f} ms = local compute {result['local']:6.3f} + server compute {server_ms:6.3f} "
          f"+ transfer {transfer_ms:6.3f} + overhead {result['overhead']:6.3f} (median; mean {result['overhead_mean']:6.3f}); "
          f"CPU outside compute: client {result['client_cpu']:6.3f} + server {server_cpu:6.3f} = {result['cpu_overhead']:6.3f} ms")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="Alternate the two sessions this many times (the host's load drifts).")
    parser.add_argument("--model", choices=["tiny", "small_resnet"], default="tiny")
    parser.add_argument("--profile", action="store_true", help="Print cProfile's top client-side entries.")
    args = parser.parse_args()

    from splitc.runtime import Bundle
    from splitc.runtime.adaptive import AdaptiveSession
    from splitc.runtime.variant_index import read_variants
    from splitc.runtime.remote import RemoteSession

    with tempfile.TemporaryDirectory() as tmp:
        split_path, variant_dir = build(Path(tmp), args.model)
        server = Server(split_path, variant_dir)
        bundle = Bundle.open(split_path)
        feed = _feed(bundle.manifest)
        local = [0.0, 0.0]

        remote = RemoteSession(bundle, server.url, token=TOKEN)
        first = remote.infer(feed)
        wrap_remote(remote, local)
        remote_transfer = raw_transfer_ms(first.bytes_sent + 200, first.bytes_received + 150)  # + HTTP head lines
        print(f"{args.model}: request {first.bytes_sent} B, response {first.bytes_received} B; "
              f"raw loopback exchange of those sizes {remote_transfer:.3f} ms")

        index = read_variants(variant_dir)
        networked = next(v for v in index.variants if not v.device_only)
        # Pinned to the networked variant (patience never reached): the figure is the per-request
        # cost of the adaptive bookkeeping on top of RemoteSession, with no switch in the way.
        adaptive = AdaptiveSession(variant_dir, server.url, token=TOKEN, initial=networked.index, background=False, patience=10**9)
        first = adaptive.infer(feed)
        if networked.first_remote:
            wrap_remote(adaptive.sessions[networked.index], local)
        adaptive_transfer = raw_transfer_ms(first.bytes_sent + 200, first.bytes_received + 150)
        print(f"variant v{networked.index} ({' -> '.join(p for p in networked.placement if p)}): request {first.bytes_sent} B; "
              f"raw loopback exchange {adaptive_transfer:.3f} ms")
        results: dict[str, list[dict]] = {"RemoteSession": [], "AdaptiveSession": []}
        for _ in range(args.rounds):
            results["RemoteSession"].append(measure("RemoteSession", lambda: remote.infer(feed), local, server, args.requests, remote_transfer))
            results["AdaptiveSession"].append(measure("AdaptiveSession", lambda: adaptive.infer(feed), local, server, args.requests, adaptive_transfer))
        for name, rows in results.items():
            print(f"{name}: overhead median of rounds {statistics.median(r['overhead'] for r in rows):.3f} ms wall, "
                  f"{statistics.median(r['cpu_overhead'] for r in rows):.3f} ms CPU")

        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.requests):
                remote.infer(feed)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            print(text.getvalue())
        adaptive.close()
        remote.close()
        server.stop()


if __name__ == "__main__":
    main()
