"""The serving stack around PartitionServer: v2 gRPC (through Triton's own gRPC client), Prometheus
metrics, admission control (503 + Retry-After from a bounded queue), the worker pool and the
dynamic batcher's scheduling, and the per-request fallback for a partition without a batch axis."""

from __future__ import annotations

import http.client
import threading
import time

import numpy as np
import pytest
from splitc.runtime import Bundle, SplitSession
from splitc.runtime.scheduler import Overloaded, Scheduler
from splitc.runtime.server import PartitionServer, ServedModels, make_http_server
from splitc.runtime.v2protocol import HEADER_LENGTH, decode_response, encode_request

from tests.serving import TOKEN, auth, build_bundle, error_of, request


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    # ONNX Runtime on both sides: these tests are about the server, and this compiles fastest.
    return Bundle.open(build_bundle(tmp_path_factory.mktemp("stack"), targets="cloud-cpu,cloud-cpu"))


@pytest.fixture(scope="module")
def boundary(bundle):
    session = SplitSession(bundle)
    x = np.load(bundle.path.parent / "x.npy")
    return session.run_partition(0, session.bind_inputs([x])), session.run([x])


@pytest.fixture(scope="module")
def stack(bundle):
    app = PartitionServer(bundle, 1, token=TOKEN, workers=2)
    stack = make_http_server(app, "127.0.0.1", 0, grpc_port=0, inline_below_ms=0)  # always through the workers
    stack.start()
    yield stack
    stack.drain(5)


def _close(got, expected):
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ gRPC


def test_grpc_infer_through_the_triton_client(stack, bundle, boundary):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    env, expected = boundary
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.grpc_port}")
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(stack.app.name)
    config = client.get_model_config(stack.app.name, headers=headers, as_json=True)["config"]
    assert config["parameters"]["model_sha256"]["string_value"] == bundle.manifest.model["sha256"]
    meta = client.get_model_metadata(stack.app.name, headers=headers, as_json=True)
    assert [i["name"] for i in meta["inputs"]] == list(env)

    inputs = []
    for name, array in env.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(stack.app.name, inputs, headers=headers, request_id="g1")
    _close({name: result.as_numpy(name) for name in expected}, expected)
    assert result.get_response().id == "g1"
    assert result.get_response().parameters["compute_ms"].double_param >= 0

    with pytest.raises(InferenceServerException, match="token"):
        client.infer(stack.app.name, inputs)
    with pytest.raises(InferenceServerException, match="not served"):
        client.infer("other", inputs, headers=headers)
    name, array = next(iter(env.items()))
    bad = grpcclient.InferInput(name, [1, 2, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 2, 3), np.float32))
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer(stack.app.name, [bad, *inputs[1:]], headers=headers)
    client.close()
    assert stack.app.stats["errors_5xx"] == 0


# --------------------------------------------------------------------------------- metrics


def test_prometheus_metrics(stack, boundary):
    env, _ = boundary
    body, headers = encode_request(env)
    path = f"/v2/models/{stack.app.name}/infer"
    for _ in range(3):
        assert request(stack.port, "POST", path, body, auth(headers))[0] == 200
    assert request(stack.port, "POST", path, b"{", auth())[0] == 400
    assert request(stack.port, "GET", "/metrics")[0] == 401
    status, got, data = request(stack.port, "GET", "/metrics", headers=auth())
    assert status == 200 and got["content-type"].startswith("text/plain")
    text = data.decode()

    def value(line_start: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(line_start)]
        assert lines, line_start
        return float(lines[0].rsplit(" ", 1)[1])

    model = stack.app.name
    assert value(f'splitc_requests_total{{code="200",model="{model}",protocol="http"}}') >= 3
    assert value(f'splitc_errors_total{{kind="4xx",model="{model}",protocol="http"}}') >= 1
    assert value(f'splitc_request_seconds_count{{model="{model}",protocol="http"}}') >= 3
    assert value(f'splitc_batch_size_count{{model="{model}"}}') >= 3


# ------------------------------------------------------------------------ admission control


def test_a_full_queue_refuses_at_once_and_runs_what_it_admitted():
    release = threading.Event()

    def slow(x):
        release.wait(10)
        return x * 2

    scheduler = Scheduler(slow, workers=1, max_queue=2)
    first = scheduler.submit(1)
    deadline = time.monotonic() + 5
    while scheduler.queued and time.monotonic() < deadline:  # the worker has taken the first job
        time.sleep(0.01)
    queued = [scheduler.submit(n) for n in (2, 3)]
    with pytest.raises(Overloaded, match="2 requests"):
        scheduler.submit(4)
    release.set()
    assert [f.result(5) for f in (first, *queued)] == [2, 4, 6]
    scheduler.close(5)
    with pytest.raises(Overloaded, match="shutting down"):
        scheduler.submit(5)


def test_the_batcher_runs_queued_requests_together_and_answers_each():
    release = threading.Event()
    batches = []

    def one(x):
        release.wait(10)
        return x + 100

    def many(xs):
        batches.append(list(xs))
        return [x + 100 for x in xs]

    scheduler = Scheduler(one, run_batch=many, workers=1, max_batch=4, max_delay_ms=50, max_queue=16)
    futures = [scheduler.submit(0)]  # blocks the worker, alone (nothing else was queued within the delay)
    time.sleep(0.2)
    futures += [scheduler.submit(n) for n in range(1, 7)]
    release.set()
    assert [f.result(5) for f in futures] == [100 + n for n in range(7)]
    assert sorted(x for b in batches for x in b) == list(range(1, 7)) and max(len(b) for b in batches) == 4
    scheduler.close(5)


def test_a_failing_batch_is_retried_one_by_one():
    scheduler = Scheduler(lambda x: 1 / x, run_batch=lambda xs: [1 / 0], workers=1, max_batch=4, max_delay_ms=100)
    futures = [scheduler.submit(x) for x in (1, 0, 2)]
    assert futures[0].result(5) == 1 and futures[2].result(5) == 0.5
    with pytest.raises(ZeroDivisionError):
        futures[1].result(5)
    scheduler.close(5)


def test_http_sheds_load_with_503_and_retry_after(bundle, boundary):
    env, expected = boundary
    app = PartitionServer(bundle, 1, token=TOKEN, workers=1)
    stack = make_http_server(app, "127.0.0.1", 0, max_queue=1, inline_below_ms=0)
    stack.start()
    body, headers = encode_request(env)
    path = f"/v2/models/{app.name}/infer"
    statuses, lock = [], threading.Lock()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
        for _ in range(10):
            status, got, data = request(stack.port, "POST", path, body, auth(headers), conn=conn)
            if status == 200:
                outputs, _ = decode_response(data, got.get(HEADER_LENGTH.lower()))
                _close(outputs, expected)
            else:
                assert status == 503 and got["retry-after"] == "1" and "capacity" in error_of(data)
            with lock:
                statuses.append(status)
        conn.close()

    try:
        threads = [threading.Thread(target=client) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stack.drain(5)
    assert len(statuses) == 240 and set(statuses) <= {200, 503} and 200 in statuses
    print(f"\nadmission: {statuses.count(200)} answered, {statuses.count(503)} shed of {len(statuses)}")
    assert app.stats["errors_5xx"] == 0


def test_a_partition_without_a_batch_axis_runs_per_request(bundle, boundary):
    env, expected = boundary
    app = PartitionServer(bundle, 1, token=TOKEN)
    assert not app.batchable()  # compiled for batch 1: a batch of two is refused by ONNX Runtime
    served = ServedModels(app, max_batch=8)
    try:
        assert served.batching == {app.name: False}
        _close(served.submit(app, env).result(10).outputs, expected)
    finally:
        served.close(5)


def test_cli_options_reach_the_stack(bundle, tmp_path):
    from click.testing import CliRunner

    from splitc.cli.serve import serve

    (tmp_path / "secret").write_text(TOKEN)
    result = CliRunner().invoke(serve, [str(bundle.path), "--token-file", str(tmp_path / "secret"), "--max-queue", "0"])
    assert result.exit_code != 0 and "--max-queue" in result.output


def test_the_edge_client_retries_a_shed_request_after_retry_after(bundle, boundary):
    """A 503 from admission control is retried by RemoteSession (infer is idempotent) after the
    server's Retry-After: every one of many concurrent clients gets the server's answer."""
    from splitc.runtime.remote import RemoteSession

    _, expected = boundary
    x = np.load(bundle.path.parent / "x.npy")
    app = PartitionServer(bundle, 1, token=TOKEN, workers=1)
    stack = make_http_server(app, "127.0.0.1", 0, max_queue=1, inline_below_ms=0)
    stack.start()
    url = f"http://127.0.0.1:{stack.port}"
    results, errors, lock = [], [], threading.Lock()

    def client():
        # Up to 20 retries: with 12 clients for one queue slot, a client can be shed several times running.
        session = RemoteSession(bundle, url, token=TOKEN, timeout=60, retries=20, fallback=False)
        try:
            for _ in range(3):
                result = session.infer({bundle.manifest.inputs[0].name: x})
                with lock:
                    results.append(result)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            session.close()

    try:
        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stack.drain(5)
    assert errors == [] and len(results) == 36 and all(r.source == "remote" for r in results)
    for r in results:
        _close(r.outputs, expected)
    shed = sum(r.attempts - 1 for r in results)
    print(f"\nclient retries: {shed} retried attempts over {len(results)} requests; {app.stats['infer']} inferences")
    assert shed == app.stats["requests"] - app.stats["infer"] - 12  # every 503 was retried (12 metadata GETs)


# ------------------------------------------------------------------- batching, for real


def _batchable_bundle(directory) -> Bundle:
    """A one-partition bundle whose ONNX model takes any batch size (a MatMul over [N, 16]),
    written by hand: what a partition compiled with a symbolic batch dimension looks like to the
    server. The manifest records the example's batch of 1, as for any bundle."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from splitc.core.bundle import record_artifact, write_manifest
    from splitc.core.manifest import RUNTIME_ONNXRUNTIME, Manifest, PartitionSpec, TensorSpec

    weights = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "batchable",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              initializer=[numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (directory / "p0").mkdir(parents=True)
    onnx.save(model, directory / "p0" / "model.onnx")
    artifact = record_artifact(directory, directory / "p0" / "model.onnx", runtime=RUNTIME_ONNXRUNTIME, role="deploy")
    x, y = TensorSpec("x", (1, 16), "float32"), TensorSpec("y", (1, 8), "float32")
    write_manifest(directory, Manifest(model={"name": "mm", "sha256": "0" * 64}, inputs=(x,), outputs=(y,),
                                       targets=({"name": "cloud-cpu", "backend": "onnxruntime"},),
                                       partitions=(PartitionSpec(0, "cloud-cpu", "onnxruntime", (x,), (y,), (artifact,)),),
                                       boundaries=(), plan={}, reference={}))
    return Bundle.open(directory), weights


def test_a_partition_with_a_batch_axis_is_batched_and_each_request_gets_its_own_row(tmp_path):
    bundle, weights = _batchable_bundle(tmp_path / "mm.splitc")
    app = PartitionServer(bundle, 0, token=TOKEN, workers=1)
    assert app.batchable()
    served = ServedModels(app, max_batch=8, max_delay_ms=20, inline_below_ms=0)
    try:
        assert served.batching == {"mm": True} and not served.inline["mm"]
        rows = np.random.default_rng(1).standard_normal((32, 1, 16)).astype(np.float32)
        futures = [served.submit(app, {"x": row}) for row in rows]
        for row, future in zip(rows, futures, strict=True):
            got = future.result(10).outputs["y"]
            assert got.shape == (1, 8)
            np.testing.assert_allclose(got, row @ weights, rtol=1e-5, atol=1e-5)
        text = served.metrics.exposition().decode()
        count = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith('splitc_batch_size_count{model="mm"}'))
        total = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith('splitc_batch_size_sum{model="mm"}'))
        assert total == 32 and count < 32  # 32 requests in fewer backend calls
    finally:
        served.close(5)
