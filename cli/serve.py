"""CLI commands for split deployment: `splitc serve`, `splitc export-triton`, and the `--remote`
path of `splitc run` (registered by cli/__init__.py):

    from splitc.cli.serve import serve, export_triton_command, remote_options, run_remote
    cli.add_command(serve)
    cli.add_command(export_triton_command)       # named "export-triton"
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from splitc.core.errors import InputError


def read_token(token_file: str | None) -> str | None:
    """The shared secret from a file (or $SPLITC_TOKEN when no file is given)."""
    if token_file is None:
        token = os.environ.get("SPLITC_TOKEN")
        return token.strip() if token and token.strip() else None
    path = Path(token_file)
    if not path.is_file():
        raise InputError(f"token file {path} does not exist; write a secret to it (e.g. `openssl rand -hex 32 > {path}`)")
    token = path.read_text().strip()
    if not token:
        raise InputError(f"token file {path} is empty; write a secret to it (e.g. `openssl rand -hex 32 > {path}`)")
    if len(token) < 16:
        raise InputError(f"the token in {path} is {len(token)} characters; use at least 16 (e.g. `openssl rand -hex 32`)")
    return token


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--partition", "-p", type=int, default=None, help="First partition served (default: 1, the cloud side of a 2-tier bundle).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all interfaces).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free port).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Shared secret required as 'Authorization: Bearer <token>' (or $SPLITC_TOKEN).")
@click.option("--no-auth", is_flag=True, help="Serve without a token (only on a trusted network).")
@click.option("--name", help="Model name in URLs (default: the bundle's model name).")
@click.option("--max-body-mb", default=64.0, show_default=True, type=click.FloatRange(0.001, 4096), help="Largest request body accepted.")
@click.option("--drain-timeout", default=30.0, show_default=True, type=float, help="Seconds to let in-flight requests finish on SIGTERM.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None, help="Also serve KServe v2 gRPC on this port (0: any free port).")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Requests computed at once (default: the cores).")
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="Threads per computation (0: the cores divided among the workers).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="Requests waiting for a worker before the server answers 503 + Retry-After.")
@click.option("--max-batch", default=1, show_default=True, type=click.IntRange(1, 1024),
              help="Dynamic batching: run up to this many queued requests as one batch (partitions with a batch dimension only).")
@click.option("--max-delay-ms", default=2.0, show_default=True, type=click.FloatRange(0, 1000), help="Longest a request waits for a batch to fill.")
@click.option("--inline-below-ms", default=0.5, show_default=True, type=click.FloatRange(0, 1000),
              help="A partition computing faster than this runs on the protocol thread instead of a worker (0: always a worker).")
@click.option("--engine", type=click.Choice(["splitc", "triton", "ray"]), default="splitc", show_default=True,
              help="triton: export the partitions for Triton's Python backend and run the tritonserver nvidia-pytriton bundles "
                   "(the token is then on tritonserver's command line, visible to other users of the host). "
                   "ray: a Ray Serve deployment of --replicas replicas (needs ray[serve] in this environment).")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, 1024), help="--engine ray: replicas of the deployment.")
@click.option("--address", default=None, help="--engine ray: join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one.")
@click.option("--autoscaling", default=None, help="--engine ray: Ray Serve autoscaling_config as JSON (replaces --replicas).")
@click.option("--max-ongoing-requests", default=None, type=click.IntRange(1, 100000), help="--engine ray: per replica.")
@click.option("--triton-python", type=click.Path(dir_okay=False), default=None,
              help="--engine triton: the python of the environment made by scripts/setup_triton.sh (or $SPLITC_TRITON_PYTHON).")
@click.option("--verbose", "-v", is_flag=True, help="Log every request to stderr.")
@click.option("--session-ttl", default=300.0, show_default=True, type=click.FloatRange(min=1), help="Decoders: seconds an idle session lives.")
@click.option("--max-sessions", default=64, show_default=True, type=click.IntRange(1), help="Decoders: most sessions held (LRU evicted).")
def serve(bundle, partition, host, port, token_file, no_auth, name, max_body_mb, drain_timeout, grpc_port, workers, threads,
          max_queue, max_batch, max_delay_ms, inline_below_ms, engine, triton_python, replicas, address, autoscaling,
          max_ongoing_requests, verbose, session_ttl, max_sessions):
    """Serve BUNDLE's partitions from --partition to the end over KServe v2 (Triton-compatible) HTTP
    and, with --grpc-port, gRPC. Prometheus metrics at /metrics. A decoder bundle's cloud half is
    served behind sessions (/v2/models/<name>/sessions).

    A variant directory (`compile --variants`) serves every variant's cloud part, each as model
    <name>-v<k>, on this one server."""
    import logging

    from splitc.runtime import Bundle
    from splitc.runtime.executors import available_cpus
    from splitc.runtime.server import PartitionServer, variant_servers
    from splitc.runtime.variant_index import is_variant_dir

    token = read_token(token_file)
    if token is None and not no_auth:
        raise InputError("serve needs --token-file (or $SPLITC_TOKEN) so only your clients can infer; pass --no-auth to serve without one")
    if token is not None and no_auth:
        raise InputError("--no-auth and a token contradict each other; drop one")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if engine == "triton":
        _serve_triton(bundle, partition, name, host, port, grpc_port, triton_python, token, instances=workers or 1)
        return
    if engine == "ray":
        _serve_ray(bundle, partition, host, port, token, replicas, address, autoscaling, max_ongoing_requests,
                   threads=threads or 1, max_queue=max_queue, inline_below_ms=inline_below_ms, max_body=int(max_body_mb * (1 << 20)))
        return
    if is_variant_dir(bundle):
        if partition is not None or name:
            raise InputError("a variant directory serves each variant from its first cloud partition, named <model>-v<k> "
                             "as its variants.json says (what the adaptive runtime asks for); drop --partition and --name")
    pool = {"workers": workers or available_cpus(), "threads": threads}
    scheduling = {"grpc_port": grpc_port, "max_queue": max_queue, "max_batch": max_batch, "max_delay_ms": max_delay_ms,
                  "inline_below_ms": inline_below_ms}
    from splitc.cli.decoder import is_decoder_bundle, serve_decoder

    if is_variant_dir(bundle):
        apps = variant_servers(bundle, token=token, max_body=int(max_body_mb * (1 << 20)), **pool)
    elif is_decoder_bundle(bundle):  # the cloud half of a split decoder, behind sessions
        serve_decoder(bundle, token=token, name=name, max_body=int(max_body_mb * (1 << 20)), host=host, port=port,
                      drain_timeout=drain_timeout, ttl_s=session_ttl, max_sessions=max_sessions)
        return
    else:
        opened = Bundle.open(bundle)
        if partition is None:
            partition = 1 if len(opened.manifest.partitions) > 1 else 0
        apps = [PartitionServer(opened, partition, token=token, model_name=name, max_body=int(max_body_mb * (1 << 20)), **pool)]
    _serve_apps(apps, host, port, token, drain_timeout, scheduling)


def _serve_apps(apps, host, port, token, drain_timeout, scheduling) -> None:
    from splitc.runtime.server import make_http_server, serve_until_signalled

    stack = make_http_server(apps, host, port, **scheduling)
    url = f"http://{host}:{stack.port}"

    def ready() -> None:
        grpc = f", gRPC on port {stack.grpc_port}" if stack.grpc_port else ""
        batching = [a.name for a in apps if stack.served.batching[a.name]]
        if scheduling["max_batch"] > 1:
            click.echo(f"dynamic batching (up to {scheduling['max_batch']}): {', '.join(batching) or 'no model has a batch dimension'}", err=True)
        if len(apps) == 1:
            app = apps[0]
            served = ", ".join(str(p.index) for p in app.manifest.partitions[app.first:])
            click.echo(f"serving {app.name} (partitions {served}, model sha256 {app.sha256[:12]}…) at {url}/v2/models/{app.name}"
                       f"{grpc}{'' if token else ' WITHOUT a token'}; SIGTERM or Ctrl-C to stop", err=True)
            return
        for app in apps:
            served = ", ".join(str(p.index) for p in app.manifest.partitions[app.first:])
            click.echo(f"  {app.name}: partitions {served} at {url}/v2/models/{app.name}", err=True)
        click.echo(f"serving {len(apps)} variant model(s) (model sha256 {apps[0].sha256[:12]}…) at {url}{grpc}"
                   f"{'' if token else ' WITHOUT a token'}; SIGTERM or Ctrl-C to stop", err=True)

    finished = serve_until_signalled(stack, drain_timeout=drain_timeout, on_ready=ready)
    infer = sum(a.stats["infer"] for a in apps)
    refused = sum(a.stats["errors_4xx"] for a in apps)
    failed = sum(a.stats["errors_5xx"] for a in apps)
    click.echo(f"stopped: {infer} inferences, {refused} refused (4xx), {failed} failed (5xx)"
               f"{'' if finished else '; some requests were still running at the drain timeout'}", err=True)


def _serve_ray(bundle, partition, host, port, token, replicas, address, autoscaling, max_ongoing_requests, **replica) -> None:
    import json
    import signal
    import threading

    from splitc.drivers.ray_serve import run_ray_serve, stop_ray_serve
    from splitc.runtime import Bundle

    try:
        scaling = json.loads(autoscaling) if autoscaling else None
    except ValueError as exc:
        raise InputError(f"--autoscaling is not JSON ({exc}); e.g. '{{\"min_replicas\": 1, \"max_replicas\": 4}}'") from None
    opened = Bundle.open(bundle)
    first = partition if partition is not None else (1 if len(opened.manifest.partitions) > 1 else 0)
    stop = threading.Event()
    previous = {}
    try:
        seconds = run_ray_serve(opened.path, first, replicas=replicas, address=address, host=host, port=port, token=token,
                                autoscaling=scaling, max_ongoing_requests=max_ongoing_requests, **replica)
        # After ray.init, which installs handlers of its own: SIGTERM must shut Serve down, not kill this process.
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        click.echo(f"serving on Ray Serve ({scaling or f'{replicas} replica(s)'}, up in {seconds:.1f} s) at http://{host}:{port}"
                   f"{'' if token else ' WITHOUT a token'}; SIGTERM or Ctrl-C to stop", err=True)
        while not stop.wait(0.5):
            pass
    finally:
        stop_ray_serve()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("stopped: Ray Serve shut down", err=True)


def _serve_triton(bundle, partition, name, host, port, grpc_port, triton_python, token, instances) -> None:
    """Export the served partitions for Triton's Python backend into a temporary repository and run
    tritonserver on it until SIGTERM or SIGINT."""
    import signal
    import tempfile
    import threading

    from splitc.drivers.triton import export_triton
    from splitc.drivers.triton_server import find_tritonserver, start_tritonserver, stop_tritonserver, wait_until_ready

    if host not in ("127.0.0.1", "0.0.0.0", "localhost"):
        raise InputError("--engine triton listens on every interface (tritonserver has no bind address); use --host 0.0.0.0 or 127.0.0.1")
    if port == 0:
        raise InputError("--engine triton needs a fixed --port")
    install = find_tritonserver(triton_python)
    with tempfile.TemporaryDirectory(prefix="splitc-triton-") as work:
        model_dir = export_triton(bundle, Path(work) / "repo", partition=partition, name=name, fmt="python", instances=instances)
        grpc = grpc_port if grpc_port else port + 1
        proc = start_tritonserver(Path(work) / "repo", install, http_port=port, grpc_port=grpc, workdir=Path(work) / "run",
                                  log_path=Path(work) / "tritonserver.log", token=token)
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                wait_until_ready(proc, f"http://127.0.0.1:{port}", timeout=300)
            except Exception:
                click.echo((Path(work) / "tritonserver.log").read_text()[-3000:], err=True)
                raise
            click.echo(f"serving {model_dir.name} on tritonserver at http://{host}:{port}/v2/models/{model_dir.name}, gRPC on port {grpc}"
                       f"{'' if token else ' WITHOUT a token'}; SIGTERM or Ctrl-C to stop", err=True)
            while not stop.wait(0.5) and proc.poll() is None:
                pass
        finally:
            code = stop_tritonserver(proc)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        click.echo(f"stopped: tritonserver exited with {code}", err=True)


@click.command("export-triton")
@click.argument("bundle", type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Triton model repository directory.")
@click.option("--partition", "-p", type=int, default=None,
              help="Partition to export (default: the last, the cloud tier; --format python: the first served, default 1).")
@click.option("--name", help="Model name (default: the bundle's model name).")
@click.option("--format", "fmt", type=click.Choice(["auto", "onnx", "plan", "python"]), default="auto", show_default=True,
              help="auto: the TensorRT engine when built, else ONNX. python: Triton's Python backend runs the splitc runtime "
                   "(any partition range; for a Triton without the ONNX Runtime backend, such as PyTriton's).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64), help="Triton instance_group count.")
def export_triton_command(bundle, output, partition, name, fmt, instances):
    """Write the cloud partition of BUNDLE as a Triton model repository (config.pbtxt + model)."""
    from splitc.drivers.triton import export_triton

    model_dir = export_triton(bundle, output, partition=partition, name=name, fmt=fmt, instances=instances)
    click.echo(f"wrote {model_dir} (tritonserver --model-repository {Path(output).resolve()})")


def remote_options(func):
    """Options `splitc run` adds for --remote."""
    func = click.option("--no-fallback", is_flag=True, help="With --remote: fail instead of running the whole model here when the server is unreachable.")(func)
    func = click.option("--retries", default=3, show_default=True, type=click.IntRange(0, 20), help="With --remote: retries after a network failure or 5xx.")(func)
    func = click.option("--timeout", "remote_timeout", default=10.0, show_default=True, type=click.FloatRange(0.01, 3600), help="With --remote: seconds allowed for the network, retries included.")(func)
    func = click.option("--model-name", help="With --remote: the model name on the server (default: the bundle's).")(func)
    func = click.option("--token-file", type=click.Path(dir_okay=False), help="With --remote: the server's shared secret (or $SPLITC_TOKEN).")(func)
    func = click.option("--remote", help="Run the device partitions here and the rest on this KServe v2 server, e.g. http://cloud:8000.")(func)
    return func


def run_remote(bundle_path, feed, remote, *, token_file=None, model_name=None, remote_timeout=10.0, retries=3, no_fallback=False,
               echo=click.echo):
    """What `splitc run --remote` does: returns the RemoteResult (an AdaptiveResult for a variant
    directory); prints where the answer came from."""
    from splitc.runtime import Bundle
    from splitc.runtime.variant_index import is_variant_dir
    from splitc.runtime.remote import RemoteSession

    if is_variant_dir(bundle_path):
        return _run_adaptive(bundle_path, feed, remote, token_file=token_file, model_name=model_name, remote_timeout=remote_timeout,
                             retries=retries, no_fallback=no_fallback, echo=echo)

    session = RemoteSession(Bundle.open(bundle_path), remote, token=read_token(token_file), model_name=model_name,
                            timeout=remote_timeout, retries=retries, fallback=not no_fallback)
    try:
        result = session.infer(feed)
    finally:
        session.close()
    t = result.timings
    line = (f"answer from {result.source}: local {t.get('local_ms', 0):.1f} ms, network {t.get('remote_ms', 0):.1f} ms, "
            f"total {t.get('total_ms', 0):.1f} ms, {result.bytes_sent} B sent in {result.attempts} attempt(s)")
    if result.exit is not None:
        line += f"; exit head {result.exit} answered (confidence {result.confidence:.3f})"
    if result.error:
        line += f" (server unreachable: {result.error})"
    echo(line)
    return result


def _run_adaptive(path, feed, remote, *, token_file, model_name, remote_timeout, retries, no_fallback, echo):
    from splitc.runtime.adaptive import AdaptiveSession

    if model_name:
        raise InputError("--model-name does not apply to a variant directory (each variant is served as <model>-v<k>); drop it")
    # One request: no background prober; the start-up probe and profile pick the variant.
    with AdaptiveSession(path, remote, token=read_token(token_file), timeout=remote_timeout, retries=retries,
                         fallback=not no_fallback, background=False) as session:
        result = session.infer(feed)
    t = result.timings
    line = (f"answer from variant v{result.variant} ({result.source}): local {t.get('local_ms', 0):.1f} ms, "
            f"network {t.get('remote_ms', 0):.1f} ms, total {t.get('total_ms', 0):.1f} ms, {result.bytes_sent} B sent; "
            f"link estimate {session.estimator.bandwidth_mbit:.3g} Mbit/s, RTT {session.estimator.rtt_ms:.3g} ms")
    if result.error:
        line += f" (server unreachable: {result.error})"
    echo(line)
    return result


__all__ = ["export_triton_command", "read_token", "remote_options", "run_remote", "serve"]
