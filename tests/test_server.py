"""`splitc serve`: the KServe v2 server on 127.0.0.1, its answers, its refusals (4xx with a JSON
error, never a crash or 5xx), a fuzz run, a concurrent load run, and graceful shutdown of the real
CLI process on SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from splitc.runtime import Bundle, SplitSession
from splitc.runtime.v2protocol import HEADER_LENGTH, decode_response, encode_request

from tests.serving import TOKEN, auth, build_bundle, error_of, request, running_server


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    return Bundle.open(build_bundle(tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def server(bundle):
    with running_server(bundle, 1, max_body=1 << 20) as running:
        yield running


@pytest.fixture(scope="module")
def boundary(bundle) -> dict[str, np.ndarray]:
    """The tensors crossing the cut for one input, and what the model answers for them."""
    session = SplitSession(bundle)
    x = np.load(bundle.path.parent / "x.npy")
    env = session.run_partition(0, session.bind_inputs([x]))
    expected = session.run([x])
    return {"env": env, "expected": expected}


def _infer_path(app) -> str:
    return f"/v2/models/{app.name}/infer"


def test_health_and_metadata(server, bundle):
    app, httpd, _ = server
    assert request(httpd.port, "GET", "/v2/health/live")[0] == 200
    status, _, data = request(httpd.port, "GET", "/v2/health/ready")
    assert status == 200 and json.loads(data) == {"ready": True}
    assert request(httpd.port, "GET", f"/v2/models/{app.name}/ready")[0] == 200
    assert "binary_tensor_data" in json.loads(request(httpd.port, "GET", "/v2")[2])["extensions"]
    status, _, data = request(httpd.port, "GET", f"/v2/models/{app.name}", headers=auth())
    meta = json.loads(data)
    assert status == 200 and meta["name"] == app.name
    assert meta["parameters"]["model_sha256"] == bundle.manifest.model["sha256"]
    assert meta["parameters"]["first_partition"] == 1
    boundary = bundle.manifest.boundaries[0]
    assert meta["inputs"] == [{"name": t.name, "datatype": "FP32", "shape": list(t.shape)} for t in boundary]
    assert [o["name"] for o in meta["outputs"]] == [t.name for t in bundle.manifest.outputs]
    # Metadata reveals the model: it needs the token too.
    assert request(httpd.port, "GET", f"/v2/models/{app.name}")[0] == 401


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_the_in_process_session(server, boundary, binary):
    app, httpd, _ = server
    body, headers = encode_request(boundary["env"], binary=binary, binary_outputs=binary, request_id="r1")
    status, got_headers, data = request(httpd.port, "POST", _infer_path(app), body, auth(headers))
    assert status == 200, data[:300]
    assert (HEADER_LENGTH.lower() in got_headers) == binary
    outputs, header = decode_response(data, got_headers.get(HEADER_LENGTH.lower()))
    assert header["id"] == "r1" and header["model_name"] == app.name
    for name, expected in boundary["expected"].items():
        np.testing.assert_allclose(outputs[name], expected, rtol=1e-5, atol=1e-6)


def _bad_requests(app, env):
    name, array = next(iter(env.items()))
    good, headers = encode_request(env)
    head_len = int(headers[HEADER_LENGTH])
    head = json.loads(good[:head_len])

    def with_head(mutate):
        h = json.loads(json.dumps(head))
        mutate(h)
        raw = json.dumps(h).encode()
        return raw + good[head_len:], {HEADER_LENGTH: str(len(raw))}

    cases = {
        "malformed JSON": (b"{not json", {}, 400, "malformed"),
        "JSON not an object": (b"[1, 2]", {}, 400, "object"),
        "no inputs": (b"{}", {}, 400, "inputs"),
        "wrong tensor name": (*with_head(lambda h: h["inputs"][0].update(name="nope")), 400, "not an input"),
        "wrong shape": (*with_head(lambda h: h["inputs"][0].update(shape=[1, 2, 3])), 400, "shape"),
        "wrong datatype": (*with_head(lambda h: h["inputs"][0].update(datatype="FP16")), 400, "datatype"),
        "unknown datatype": (*with_head(lambda h: h["inputs"][0].update(datatype="COMPLEX")), 400, "not supported"),
        "missing input": (b'{"inputs": []}', {}, 400, "missing"),
        "short binary": (good[:-10], headers, 400, "ends before"),
        "extra binary": (good + b"xx", headers, 400, "no tensor claims"),
        "header length too big": (good, {HEADER_LENGTH: str(len(good) + 5)}, 400, HEADER_LENGTH),
        "header length not a number": (good, {HEADER_LENGTH: "abc"}, 400, HEADER_LENGTH),
        "JSON data of wrong length": (json.dumps({"inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32", "data": [1.0, 2.0]}]}).encode(), {}, 400, "elements"),
        "JSON data of strings": (json.dumps({"inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32", "data": ["a"] * array.size}]}).encode(), {}, 400, "numbers"),
        "unknown output": (*with_head(lambda h: h.update(outputs=[{"name": "zzz"}])), 400, "not an output"),
    }
    return cases


def test_bad_requests_get_4xx_with_a_json_error_and_the_server_keeps_serving(server, boundary):
    app, httpd, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", httpd.port, timeout=10)
    for label, (body, headers, code, words) in _bad_requests(app, boundary["env"]).items():
        status, _, data = request(httpd.port, "POST", _infer_path(app), body, auth(headers), conn=conn)
        assert status == code, (label, status, data[:200])
        assert words in error_of(data), (label, error_of(data))
    good, headers = encode_request(boundary["env"])
    # Token and routing refusals.
    assert request(httpd.port, "POST", _infer_path(app), good, headers)[0] == 401
    wrong = dict(headers, Authorization="Bearer " + "x" * len(TOKEN))
    status, _, data = request(httpd.port, "POST", _infer_path(app), good, wrong)
    assert status == 401 and "token" in error_of(data)
    assert request(httpd.port, "POST", "/v2/models/other/infer", good, auth(headers))[0] == 404
    assert request(httpd.port, "POST", f"/v2/models/{app.name}/versions/7/infer", good, auth(headers))[0] == 404
    assert request(httpd.port, "GET", _infer_path(app), headers=auth())[0] == 405
    assert request(httpd.port, "GET", "/nothing")[0] == 404
    # Oversized body: refused from Content-Length, before reading it.
    status, _, data = request(httpd.port, "POST", _infer_path(app), b"0" * (app.max_body + 1), auth())
    assert status == 413 and "limit" in error_of(data)
    # After all that, the same keep-alive connection still gets answers.
    status, _, data = request(httpd.port, "POST", _infer_path(app), good, auth(headers), conn=conn)
    assert status == 200
    conn.close()
    assert app.stats["errors_5xx"] == 0


def _mutate(rng: random.Random, good: bytes, head_len: int) -> tuple[bytes, dict]:
    head = bytearray(good[:head_len])
    tail = good[head_len:]
    choice = rng.randrange(8)
    headers = {HEADER_LENGTH: str(head_len)}
    if choice == 0:  # flip bytes in the JSON header
        for _ in range(rng.randint(1, 4)):
            head[rng.randrange(len(head))] = rng.randrange(256)
        return bytes(head) + tail, headers
    if choice == 1:  # truncate anywhere
        cut = rng.randrange(len(good))
        return good[:cut], headers if rng.random() < 0.5 else {}
    if choice == 2:  # random header length
        return good, {HEADER_LENGTH: rng.choice([str(rng.randrange(-5, len(good) + 5)), "", "1e3", " 7", "0x10"])}
    if choice == 3:  # random garbage
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200))), headers if rng.random() < 0.5 else {}
    if choice == 4:  # structurally odd but valid JSON header
        value = rng.choice([None, 1, -1, 2**70, "x", [], {}, [[[]]], 1.5, True, [1, "a"], {"a": [1]}])
        key = rng.choice(["name", "shape", "datatype", "parameters", "data"])
        entry = {"name": "t", "shape": [1], "datatype": "FP32", "data": [1.0]}
        entry[key] = value
        top = rng.choice([{"inputs": [entry]}, {"inputs": entry}, {"inputs": [entry], "outputs": value},
                          {"inputs": [entry], "parameters": value}, {"inputs": [entry], "id": value}])
        return json.dumps(top).encode(), {}
    if choice == 5:  # a valid request with random binary payload (may well be answered 200)
        return bytes(head) + bytes(rng.randrange(256) for _ in range(32)) + tail[32:], headers
    if choice == 6:  # deep nesting
        depth = rng.choice([10, 100, 5000])
        return (b'{"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": ' + b"[" * depth + b"1" + b"]" * depth + b"}]}"), {}
    # change one number in the header
    text = bytes(head).decode("latin-1")
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    i = rng.choice(digits)
    text = text[:i] + str(rng.choice([0, 9, 99999999999])) + text[i + 1:]
    raw = text.encode("latin-1")
    return raw + tail, {HEADER_LENGTH: str(len(raw))}


def test_fuzz_thousands_of_malformed_requests(bundle, boundary):
    # Its own server: requests still in flight from earlier tests must not be counted as fuzz.
    with running_server(bundle, 1, max_body=1 << 20) as own:
        _fuzz(*own[:2], boundary)


def _fuzz(app, httpd, boundary):
    good, headers = encode_request(boundary["env"])
    head_len = int(headers[HEADER_LENGTH])
    rng = random.Random(1234)
    count, statuses = 2000, {}
    conn = http.client.HTTPConnection("127.0.0.1", httpd.port, timeout=10)
    before = dict(app.stats)
    for _ in range(count):
        body, extra = _mutate(rng, good, head_len)
        try:
            status, _, data = request(httpd.port, "POST", _infer_path(app), body, auth(extra), conn=conn)
        except (ConnectionError, http.client.HTTPException) as exc:
            pytest.fail(f"server dropped the connection on a fuzzed request: {exc}")
        statuses[status] = statuses.get(status, 0) + 1
        assert status == 200 or 400 <= status < 500, (status, data[:200])
        if status != 200:
            error_of(data)
    conn.close()
    assert app.stats["errors_5xx"] == 0
    assert sum(statuses.values()) == count and statuses.get(400, 0) > count // 2
    assert app.stats["requests"] - before["requests"] == count
    print(f"\nfuzz: {count} requests, statuses {dict(sorted(statuses.items()))}")
    assert request(httpd.port, "POST", _infer_path(app), good, auth(headers))[0] == 200


def test_load_many_concurrent_clients(server, boundary):
    app, httpd, _ = server
    good, headers = encode_request(boundary["env"])
    threads, seconds = 16, 3.0
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", httpd.port, timeout=30)
        mine = []
        try:
            while time.monotonic() < stop:
                tick = time.perf_counter()
                try:
                    status, got, data = request(httpd.port, "POST", _infer_path(app), good, auth(headers), conn=conn)
                    if status != 200:
                        raise RuntimeError(f"{status}: {data[:100]!r}")
                    outputs, _ = decode_response(data, got.get(HEADER_LENGTH.lower()))
                    np.testing.assert_allclose(outputs["addmm"] if "addmm" in outputs else next(iter(outputs.values())),
                                               next(iter(boundary["expected"].values())), rtol=1e-5, atol=1e-6)
                except Exception as exc:  # noqa: BLE001 - counted, not raised: the test reports them all
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", httpd.port, timeout=30)
                mine.append(time.perf_counter() - tick)
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1e3
    print(f"\nload: {threads} threads, {len(lat)} requests in {elapsed:.1f} s = {len(lat) / elapsed:.0f} req/s, "
          f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, errors {len(errors)}")
    assert errors == [], errors[:5]
    assert len(lat) >= threads
    assert app.stats["errors_5xx"] == 0


def test_bad_construction_is_refused(bundle):
    from splitc.runtime.server import PartitionServer

    from splitc.core.errors import InputError

    with pytest.raises(InputError, match="out of range"):
        PartitionServer(bundle, 5, token=TOKEN)
    with pytest.raises(InputError, match="empty"):
        PartitionServer(bundle, 1, token="  ")


def test_cli_serve_drains_in_flight_requests_on_sigterm(bundle, boundary, tmp_path):
    token_file = tmp_path / "secret"
    token_file.write_text(TOKEN + "\n")
    code = "import sys; from splitc.cli.serve import serve; serve(sys.argv[1:], standalone_mode=True)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(bundle.path), "--partition", "1", "--port", "0",
                             "--token-file", str(token_file)], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stderr.readline()
        assert "serving" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split()[0]
        port = int(url.split(":")[2].split("/")[0])
        name = url.rstrip(";").rsplit("/", 1)[1]
        good, headers = encode_request(boundary["env"])
        # An in-flight request: headers and half the body sent, then SIGTERM, then the rest.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", f"/v2/models/{name}/infer")
        for key, value in auth({**headers, "Content-Length": str(len(good))}).items():
            conn.putheader(key, value)
        conn.endheaders()
        conn.send(good[: len(good) // 2])
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting
            request(port, "GET", "/v2/health/live")
        conn.send(good[len(good) // 2:])
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200 and response.getheader("Connection") == "close"
        outputs, _ = decode_response(data, response.getheader(HEADER_LENGTH))
        np.testing.assert_allclose(next(iter(outputs.values())), next(iter(boundary["expected"].values())), rtol=1e-5, atol=1e-6)
        assert proc.wait(timeout=20) == 0
        assert "stopped: 1 inferences" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_refuses_without_token(bundle, tmp_path):
    from click.testing import CliRunner

    from splitc.cli.serve import serve

    env = {k: v for k, v in os.environ.items() if k != "SPLITC_TOKEN"}
    result = CliRunner(env={"SPLITC_TOKEN": ""}).invoke(serve, [str(bundle.path), "--port", "0"], env=env)
    assert result.exit_code != 0 and "--token-file" in str(result.exception)
    (tmp_path / "short").write_text("abc")
    result = CliRunner().invoke(serve, [str(bundle.path), "--token-file", str(tmp_path / "short")])
    assert "at least 16" in str(result.exception)
