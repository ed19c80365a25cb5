"""`splitc serve --engine ray`: the served partitions as a Ray Serve deployment, scaled out over
replicas (processes, on one host or on every node of a Ray cluster).

    run_ray_serve(bundle, first=1, replicas=2, address=None, host="127.0.0.1", port=8000, token=...)

Each replica is what `splitc serve` runs in one process: a PartitionServer with its scheduler
(admission, workers, inline cheap partitions) behind the same v2 REST routes (runtime/http_app.py),
so clients see the same protocol, token, limits and errors. Ray Serve's proxy spreads requests
over the replicas; `--replicas`, `--autoscaling` (Ray's autoscaling_config as JSON) and
`--max-ongoing-requests` pass through. Ray is not a splitc dependency: it runs from a Python
environment that has `ray[serve]` (ray 2.60 resolves protobuf 7, which tritonclient's gRPC stubs
refuse, so it cannot share the `serve` extra's environment).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from splitc.core.errors import ToolchainError


def _replica_class():
    from ray import serve
    from starlette.responses import Response

    @serve.deployment(name="splitc")
    class SplitcReplica:
        """One replica: the v2 REST app of one `splitc serve` process."""

        def __init__(self, bundle: str, first: int, token: str | None, max_body: int, threads: int, max_queue: int,
                     inline_below_ms: float):
            from splitc.runtime import Bundle
            from splitc.runtime.http_app import create_app
            from splitc.runtime.server import PartitionServer, ServedModels

            app = PartitionServer(Bundle.open(bundle), first, token=token, max_body=max_body, workers=threads, threads=1)
            self.served = ServedModels(app, max_queue=max_queue, inline_below_ms=inline_below_ms)
            self.asgi = create_app(self.served)

        async def __call__(self, request):
            messages: list[dict[str, Any]] = []

            async def send(message):
                messages.append(message)

            await self.asgi(request.scope, request.receive, send)
            start = messages[0]
            body = b"".join(m.get("body", b"") for m in messages[1:])
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])}
            headers.pop("content-length", None)
            return Response(body, status_code=start["status"], headers=headers)

    return SplitcReplica


def run_ray_serve(bundle: str | Path, first: int, *, replicas: int = 1, address: str | None = None, host: str = "127.0.0.1",
                  port: int = 8000, token: str | None = None, max_body: int = 64 << 20, threads: int = 1, max_queue: int = 64,
                  inline_below_ms: float = 0.5, autoscaling: dict | None = None, max_ongoing_requests: int | None = None):
    """Start (or join, with `address`) Ray, and run the deployment with its HTTP proxy on host:port.
    Returns once the replicas are up; stop with `stop_ray_serve()`."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ToolchainError(f"--engine ray needs Ray Serve in this Python environment ({exc}); pip install 'ray[serve]'") from exc
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": threads}}
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    if max_ongoing_requests:
        options["max_ongoing_requests"] = max_ongoing_requests
    deployment = _replica_class().options(**options)
    tick = time.perf_counter()
    serve.run(deployment.bind(str(Path(bundle).resolve()), first, token, max_body, threads, max_queue, inline_below_ms),
              name="splitc", route_prefix="/", blocking=False)
    return time.perf_counter() - tick


def stop_ray_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
