"""Replica-kill run against a Ray Serve deployment (`splitc serve --engine ray --replicas 2`):
edge clients (RemoteSession: device partitions here, one retry policy for connection errors, 5xx
and 503) send for --seconds; after a third of it one replica process is killed with SIGKILL.
Prints requests sent, answered, retried (more than one attempt), failed, and answered wrongly
(compared with the local chain), and the replica processes before and after (Ray restarts one).

    splitc serve m.splitc --engine ray --replicas 2 --no-auth --port 8000 &     # an env with .[ray]
    python bench/replica_kill.py http://127.0.0.1:8000 m.splitc --input x.npy [--clients 8] [--seconds 24]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import threading
import time

import numpy as np

REPLICA = "ServeReplica:splitc"  # the process title Ray gives the deployment's replicas


def replicas() -> list[int]:
    found = subprocess.run(["pgrep", "-f", REPLICA], capture_output=True, text=True, check=False).stdout.split()
    return [int(p) for p in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("bundle")
    parser.add_argument("--input", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=24.0)
    parser.add_argument("--token", default=None)
    args = parser.parse_args()

    from splitc.runtime import Bundle, SplitSession
    from splitc.runtime.remote import RemoteSession

    bundle = Bundle.open(args.bundle)
    x = np.load(args.input)
    feed = {bundle.manifest.inputs[0].name: x}
    expected = SplitSession(bundle).run([x])
    counts = dict.fromkeys(("sent", "answered", "retried", "failed", "wrong"), 0)
    lock = threading.Lock()
    stop = time.monotonic() + args.seconds

    def client() -> None:
        session = RemoteSession(bundle, args.url, token=args.token, timeout=30, retries=3, fallback=False)
        while time.monotonic() < stop:
            try:
                result = session.infer(feed)
            except Exception as exc:  # noqa: BLE001 - a failed request is what this run counts
                with lock:
                    counts["sent"] += 1
                    counts["failed"] += 1
                print(f"failed: {str(exc)[:200]}", flush=True)
                continue
            right = all(np.allclose(result.outputs[k], v, rtol=1e-4, atol=1e-5) for k, v in expected.items())
            with lock:
                counts["sent"] += 1
                counts["answered"] += 1
                counts["retried"] += result.attempts > 1
                counts["wrong"] += not right
        session.close()

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    time.sleep(args.seconds / 3)
    before = replicas()
    if before:
        os.kill(before[0], signal.SIGKILL)
    for thread in threads:
        thread.join()
    print(f"replicas before {before}, killed {before[:1]}, after {replicas()}")
    print(counts)


if __name__ == "__main__":
    main()
