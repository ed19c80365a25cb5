"""Network emulation for bench/link_bench.py: two network namespaces joined by a veth pair, bandwidth
shaped by the kernel (`tc ... tbf`), round-trip time added in user space by a delaying TCP relay,
and a driver that changes both over time from a trace. Linux, as root.

    edge namespace                                         cloud namespace
    client ──▶ 127.0.0.1:RELAY ─(delay rtt/2)─▶ veth ══tbf══▶ veth ──▶ server (splitc serve)
    client ◀─(delay rtt/2)── relay ◀══════════tbf══════════ veth ◀── server

Bandwidth is tc's job (a token bucket on each veth's egress: edge→cloud is the uplink, cloud→edge
the downlink). The kernel here has no netem, so the relay adds the propagation delay: every chunk it
reads is stamped and released rtt/2 later by a second thread, so a transfer stays pipelined (a
600 kB body pays rtt/2 once, not once per chunk). What this does not model: loss, jitter, and TCP's
slow start over a long-RTT path (the shaped hop itself has ~0 RTT, so TCP fills it at once).

Also runnable as the relay process itself (started inside the edge namespace by the testbed):

    python bench/netemu.py relay --map 127.0.0.1:9001=10.213.0.2:8001 [--map ...] --rtt-ms 10
    # then reads "rtt <ms>" lines on stdin to change the delay; prints "ready" once listening
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

# --------------------------------------------------------------------------------------- errors


class NetemError(Exception):
    """Set-up failure with a one-line reason for the user."""


def preflight() -> None:
    """Raise NetemError (one line) unless this can build namespaces and shape a veth here."""
    if not sys.platform.startswith("linux"):
        raise NetemError(f"needs Linux network namespaces; this is {sys.platform}")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetemError(f"needs {' and '.join(missing)} on PATH (Debian: apt-get install iproute2)")
    if os.geteuid() != 0:
        raise NetemError("needs root to create network namespaces and shape them with tc; run it with sudo")


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetemError(f"`{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['exit ' + str(proc.returncode)]}")
    return proc


# --------------------------------------------------------------------------------------- links


@dataclass(frozen=True)
class Phase:
    name: str
    mbit: float          # uplink, Mbit/s
    rtt_ms: float
    seconds: float


def tbf_args(mbit: float) -> list[str]:
    """tbf parameters for `mbit`: a bucket of ~2 ms at the rate (at least 4 KiB, so a full-size
    frame always fits) so an idle link does not pass a large burst at line rate, and a queue of
    8 MiB, deeper than TCP small queues lets one socket fill, so nothing is dropped."""
    rate_bytes = mbit * 1e6 / 8
    burst = max(4096, int(rate_bytes * 0.002))
    return ["rate", f"{max(1, round(mbit * 1000))}kbit", "burst", str(burst), "limit", str(8 << 20)]


class Testbed:
    """Two namespaces (`edge`, `cloud`) and a veth pair between them; torn down by `down()`, at
    exit, and on SIGTERM/SIGHUP. Names carry this process's id, so concurrent runs do not collide."""

    def __init__(self, subnet: str = "10.213.0"):
        pid = os.getpid()
        self.edge_ns, self.cloud_ns = f"splitc-lb{pid}-edge", f"splitc-lb{pid}-cloud"
        self.edge_if, self.cloud_if = f"lbe{pid}"[:15], f"lbc{pid}"[:15]
        self.edge_ip, self.cloud_ip = f"{subnet}.1", f"{subnet}.2"
        self.processes: list[subprocess.Popen] = []
        self._up = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ lifecycle

    def up(self) -> Testbed:
        preflight()
        _reap_stale()
        atexit.register(self.down)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_interrupt)
        self._up = True
        for ns in (self.edge_ns, self.cloud_ns):
            _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", self.edge_if, "netns", self.edge_ns, "type", "veth", "peer", "name", self.cloud_if, "netns", self.cloud_ns])
        for ns, dev, ip in ((self.edge_ns, self.edge_if, self.edge_ip), (self.cloud_ns, self.cloud_if, self.cloud_ip)):
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return self

    def down(self) -> None:
        with self._lock:
            procs, self.processes = self.processes, []
            for proc in procs:
                stop_process(proc)
            if not self._up:
                return
            self._up = False
            for ns in (self.edge_ns, self.cloud_ns):
                _run(["ip", "netns", "del", ns], check=False)  # deleting a namespace removes its veth end

    # ------------------------------------------------------------------------------ shaping

    def shape(self, up_mbit: float, down_mbit: float | None = None) -> None:
        """Shape edge→cloud at up_mbit and cloud→edge at down_mbit (default: the same)."""
        for ns, dev, mbit in ((self.edge_ns, self.edge_if, up_mbit), (self.cloud_ns, self.cloud_if, down_mbit or up_mbit)):
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", *tbf_args(mbit)])

    def unshape(self) -> None:
        for ns, dev in ((self.edge_ns, self.edge_if), (self.cloud_ns, self.cloud_if)):
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)

    def wire_bytes(self) -> tuple[int, int]:
        """Bytes the two qdiscs have sent so far (IP packets, headers included): (up, down)."""
        totals = []
        for ns, dev in ((self.edge_ns, self.edge_if), (self.cloud_ns, self.cloud_if)):
            proc = _run(["ip", "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev", dev], check=False)
            try:
                totals.append(sum(int(q.get("bytes", 0)) for q in json.loads(proc.stdout or "[]") if q.get("root")))
            except ValueError:
                totals.append(0)
        return totals[0], totals[1]

    # ------------------------------------------------------------------------------ processes

    def popen(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start argv inside namespace `ns` (`ip netns exec` execs it: the pid is the command's)."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)
        with self._lock:
            self.processes.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        with self._lock:
            if proc in self.processes:
                self.processes.remove(proc)


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(2)
    except OSError:
        pass


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _reap_stale() -> None:
    """Delete namespaces left by an earlier run of this benchmark that was killed (its pid is gone)."""
    proc = _run(["ip", "netns", "list"], check=False)
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith("splitc-lb") and "-" in name[len("splitc-lb"):]:
            pid = name[len("splitc-lb"):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                _run(["ip", "netns", "del", name], check=False)


# --------------------------------------------------------------------------------------- relay


class Delay:
    """The one-way delay, changeable while connections are open (applies to bytes read after)."""

    def __init__(self, rtt_ms: float):
        self.one_way_s = rtt_ms / 2000.0


class DelayedPipe:
    """Copy src → dst, releasing each chunk `delay` after it was read (pipelined: a reader thread
    stamps chunks into a queue, a writer thread sends each at its release time)."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: Delay, on_close):
        self.src, self.dst, self.delay, self.on_close = src, dst, delay, on_close
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while chunk := self.src.recv(1 << 16):
                with self.cond:
                    self.queue.append((time.monotonic() + self.delay.one_way_s, chunk))
                    self.cond.notify()
        except OSError:
            pass
        with self.cond:  # EOF (or error) travels with the same delay as data
            self.queue.append((time.monotonic() + self.delay.one_way_s, None))
            self.cond.notify()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue:
                        self.cond.wait()
                    release, chunk = self.queue.popleft()
                pause = release - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                if chunk is None:
                    self.dst.shutdown(socket.SHUT_WR)
                    break
                self.dst.sendall(chunk)
        except OSError:  # the peer went away: drop both sides so the other direction ends too
            for s in (self.src, self.dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.on_close()


def _serve_relay(listen: tuple[str, int], upstream: tuple[str, int], delay: Delay) -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(listen)
    listener.listen(128)

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            closed = [0]
            lock = threading.Lock()

            def on_close(c=client, s=server, closed=closed, lock=lock) -> None:
                with lock:
                    closed[0] += 1
                    if closed[0] == 2:
                        c.close()
                        s.close()

            DelayedPipe(client, server, delay, on_close)
            DelayedPipe(server, client, delay, on_close)

    threading.Thread(target=accept, daemon=True).start()
    return listener


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def relay_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="netemu.py relay")
    parser.add_argument("--map", action="append", required=True, help="LISTEN_HOST:PORT=UPSTREAM_HOST:PORT")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    delay = Delay(args.rtt_ms)
    for item in args.map:
        listen, upstream = item.split("=")
        _serve_relay(_addr(listen), _addr(upstream), delay)
    for sig in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C reaches the whole process group: leave quietly
        signal.signal(sig, lambda *_: os._exit(0))
    print("ready", flush=True)
    for line in sys.stdin:  # control: "rtt <ms>"
        parts = line.split()
        if len(parts) == 2 and parts[0] == "rtt":
            delay.one_way_s = float(parts[1]) / 2000.0
            print(f"rtt {parts[1]}", flush=True)
    os._exit(0)


class Relay:
    """The relay process in the edge namespace; `set_rtt` changes its delay."""

    def __init__(self, testbed: Testbed, maps: dict[int, tuple[str, int]], rtt_ms: float):
        argv = [sys.executable, os.path.abspath(__file__), "relay", "--rtt-ms", str(rtt_ms)]
        for port, (host, up_port) in maps.items():
            argv += ["--map", f"127.0.0.1:{port}={host}:{up_port}"]
        self.proc = testbed.popen(testbed.edge_ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise NetemError(f"the delay relay did not start (said {line.strip()!r})")
        self.rtt_ms = rtt_ms
        self._lock = threading.Lock()

    def set_rtt(self, rtt_ms: float) -> None:
        with self._lock:
            self.proc.stdin.write(f"rtt {rtt_ms}\n")
            self.proc.stdin.flush()
            self.proc.stdout.readline()  # acknowledged: later bytes get the new delay
            self.rtt_ms = rtt_ms


# --------------------------------------------------------------------------------------- trace


class TraceDriver(threading.Thread):
    """Applies each phase's bandwidth (tc) and RTT (relay) at its start time, counted from t0
    (time.monotonic(), which all namespaces share). Records when each change actually landed."""

    def __init__(self, testbed: Testbed, relay: Relay | None, phases: list[Phase], t0: float, down_factor: float = 1.0):
        super().__init__(daemon=True)
        self.testbed, self.relay, self.phases, self.t0, self.down_factor = testbed, relay, phases, t0, down_factor
        self.applied: list[dict] = []
        self.stop = threading.Event()

    def apply(self, phase: Phase) -> None:
        self.testbed.shape(phase.mbit, phase.mbit * self.down_factor)
        if self.relay is not None:
            self.relay.set_rtt(phase.rtt_ms)

    def run(self) -> None:
        start = 0.0
        for k, phase in enumerate(self.phases):
            if k > 0:  # phase 0 is applied before t0 by the caller
                if self.stop.wait(max(0.0, self.t0 + start - time.monotonic())):
                    return
                self.apply(phase)
            self.applied.append({"phase": phase.name, "planned_s": round(start, 3), "applied_s": round(time.monotonic() - self.t0, 3)})
            start += phase.seconds


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        relay_main(sys.argv[2:])
    else:
        sys.exit("usage: python bench/netemu.py relay --map LISTEN=UPSTREAM [--map ...] [--rtt-ms MS]")
