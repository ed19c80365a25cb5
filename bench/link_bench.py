"""Benchmark skeleton: end-to-end latency of a split bundle over loopback through a user-space link
emulator (one-way delay + bandwidth cap in a TCP relay), edge client -> `splitc serve`.
Prints p50/p95; asserts nothing.

    python bench/link_bench.py model.splitc --rtt-ms 30 --mbit 20 --requests 50 [--partition 1]

Skeleton: the relay delays each forwarded chunk by rtt/2 and paces it at the link rate, which models
propagation and serialisation but not loss, jitter or TCP's own slow start over a real path.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import numpy as np
from splitc.runtime import Bundle
from splitc.runtime.remote import RemoteSession
from splitc.runtime.server import PartitionServer, make_http_server, serve_in_thread


def _pipe(src: socket.socket, dst: socket.socket, delay_s: float, bytes_per_s: float) -> None:
    try:
        while chunk := src.recv(1 << 16):
            time.sleep(delay_s + len(chunk) / bytes_per_s)  # simplification: per-chunk, not pipelined
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def start_relay(upstream_port: int, rtt_ms: float, mbit: float) -> int:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def accept() -> None:
        while True:
            client, _ = listener.accept()
            server = socket.create_connection(("127.0.0.1", upstream_port))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pipe, args=(a, b, rtt_ms / 2000, mbit * 1e6 / 8), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--partition", type=int, default=1)
    parser.add_argument("--rtt-ms", type=float, default=30.0)
    parser.add_argument("--mbit", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()

    bundle = Bundle.open(args.bundle)
    token = "bench-token-0123456789"
    httpd = make_http_server(PartitionServer(bundle, args.partition, token=token), "127.0.0.1", 0)
    serve_in_thread(httpd)
    port = start_relay(httpd.port, args.rtt_ms, args.mbit)
    remote = RemoteSession(bundle, f"http://127.0.0.1:{port}", token=token, timeout=60, fallback=False)
    rng = np.random.default_rng(0)
    feed = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in bundle.manifest.inputs}
    remote.infer(feed)  # warm-up: loads the local partitions, fetches metadata
    totals, network = [], []
    for _ in range(args.requests):
        result = remote.infer(feed)
        totals.append(result.timings["total_ms"])
        network.append(result.timings["remote_ms"])
    sent = result.bytes_sent
    print(f"{args.requests} requests, {sent} B per request, link {args.mbit:g} Mbit/s / {args.rtt_ms:g} ms RTT (emulated)")
    for label, values in (("end-to-end", totals), ("network + server", network)):
        print(f"  {label:17s} p50 {np.percentile(values, 50):8.2f} ms   p95 {np.percentile(values, 95):8.2f} ms")
    print(f"  analytic floor    {args.rtt_ms + sent * 8 / (args.mbit * 1e3):8.2f} ms (RTT + upload serialisation)")
    httpd.drain(5)


if __name__ == "__main__":
    main()
