"""The KServe v2 gRPC protocol (Triton's `inference.GRPCInferenceService`) on grpcio, beside the
REST port: the same models, token, checks and scheduler.

The message classes and the service stub come from tritonclient (`tritonclient.grpc.service_pb2`,
generated from Triton's grpc_service.proto), so a Triton gRPC client talks to this server as to
Triton. Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelConfig (its parameters carry model_sha256) and ModelInfer; the rest answer UNIMPLEMENTED.

Errors map onto gRPC codes: UNAUTHENTICATED (token, sent as `authorization: Bearer <token>`
metadata), NOT_FOUND (model), INVALID_ARGUMENT (a request the REST port answers 4xx),
RESOURCE_EXHAUSTED (admission control: the queue is full, or too many calls at once), INTERNAL.
Tensors go as raw_input_contents / raw_output_contents (little-endian, row-major), or, for inputs,
the typed contents fields; both are checked by the same code as REST bodies (v2protocol).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent import futures

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from splitc.core.errors import InputError, SplitcError
from splitc.runtime.scheduler import Overloaded
from splitc.runtime.server import PartitionServer, ServedModels
from splitc.runtime.v2protocol import (
    COMPUTE_PARAMETER,
    EXIT_PARAMETER,
    EXTENSIONS,
    SHA_PARAMETER,
    ProtocolError,
    decode_tensors,
    numpy_dtype,
    v2_datatype,
)

log = logging.getLogger("splitc.server")

PROTOCOL = "grpc"
# Typed contents field of each v2 datatype (FP16 travels as raw bytes only, as in Triton).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def decode_infer_request(request, app: PartitionServer) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """Input arrays of a ModelInferRequest (checked against the model) and the outputs it asks for."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    entries, blobs = [], []
    for i, tensor in enumerate(request.inputs):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": [int(d) for d in tensor.shape]}
        if raw:
            entry["parameters"] = {"binary_data_size": len(raw[i])}
            blobs.append(raw[i])
        else:
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise ProtocolError(f"input {tensor.name[:60]!r}: {tensor.datatype} data must be sent as raw_input_contents")
            entry["data"] = [bool(v) if tensor.datatype == "BOOL" else v for v in getattr(tensor.contents, field)]
        entries.append(entry)
    arrays = decode_tensors(entries, memoryview(b"".join(blobs)), "inputs", app.input_specs)
    available = [t.name for t in app.outputs]
    wanted = {}
    for output in request.outputs:
        if output.name not in available:
            raise ProtocolError(f"output {output.name[:60]!r} is not an output of this model (it has {', '.join(available)})")
        wanted[output.name] = True
    return arrays, wanted or dict.fromkeys(available, True)


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, served: ServedModels):
        self.served = served

    # ----------------------------------------------------------------------------- plumbing

    def _model(self, name: str) -> PartitionServer:
        app = self.served.apps.get(name)
        if app is None:
            listed = ", ".join(repr(n) for n in self.served.apps)
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"model {name[:80]!r} is not served here (this server serves {listed})")
        return app

    @staticmethod
    def _version(version: str) -> None:
        if version not in ("", "1"):
            raise _Abort(grpc.StatusCode.NOT_FOUND, "only version 1 of the model is served")

    @staticmethod
    def _check_token(app: PartitionServer, context) -> None:
        header = dict(context.invocation_metadata()).get("authorization")
        if not app.authorized(header):
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED,
                         "missing or wrong token: send 'authorization: Bearer <token>' metadata with the server's shared secret")

    def _call(self, context, name: str | None, handler, infer: bool = False):
        started = time.perf_counter()
        app = self.served.app
        code = grpc.StatusCode.OK
        try:
            if name is not None:
                app = self._model(name)
            return handler(app)
        except _Abort as exc:
            code = exc.code
            context.abort(exc.code, str(exc))
        finally:
            app.count("requests")
            if code == grpc.StatusCode.OK and infer:
                app.count("infer")
            elif code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                app.count("errors_4xx")
            elif code == grpc.StatusCode.INTERNAL:
                app.count("errors_5xx")
            seconds = time.perf_counter() - started if infer and code == grpc.StatusCode.OK else None
            self.served.metrics.answered(app.name, PROTOCOL, code.name, seconds)

    # ------------------------------------------------------------------------------ methods

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=not self.served.draining.is_set())

    def ModelReady(self, request, context):
        def ready(app):
            self._version(request.version)
            return service_pb2.ModelReadyResponse(ready=not self.served.draining.is_set())

        return self._call(context, request.name, ready)

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name="splitc", version=self.served.app.manifest.splitc_version,
                                                  extensions=list(EXTENSIONS))

    def ModelMetadata(self, request, context):
        def metadata(app):
            self._version(request.version)
            self._check_token(app, context)
            meta = app.metadata()

            def tensors(items):
                return [service_pb2.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                        for t in items]

            return service_pb2.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                                     inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

        return self._call(context, request.name, metadata)

    def ModelConfig(self, request, context):
        def config(app):
            self._version(request.version)
            self._check_token(app, context)

            def io(spec, cls):
                return cls(name=spec.name, data_type=getattr(model_config_pb2, "TYPE_" + v2_datatype(spec.dtype)), dims=list(spec.shape))

            cfg = model_config_pb2.ModelConfig(
                name=app.name, platform="splitc", max_batch_size=0,
                input=[io(t, model_config_pb2.ModelInput) for t in app.inputs],
                output=[io(t, model_config_pb2.ModelOutput) for t in app.outputs])
            cfg.parameters[SHA_PARAMETER].string_value = app.sha256
            return service_pb2.ModelConfigResponse(config=cfg)

        return self._call(context, request.name, config)

    def ModelInfer(self, request, context):
        def infer(app):
            self._version(request.model_version)
            self._check_token(app, context)
            try:
                arrays, wanted = decode_infer_request(request, app)
            except ProtocolError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            tick = time.perf_counter()
            try:
                if self.served.inline[app.name]:
                    computed = app.compute(arrays)
                else:
                    computed = self.served.submit(app, arrays).result()
            except Overloaded as exc:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is at capacity ({exc}); retry shortly") from None
            except InputError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except SplitcError as exc:
                log.error("inference failed: %s", exc)
                raise _Abort(grpc.StatusCode.INTERNAL, f"inference failed on the server: {exc}") from None
            response = service_pb2.ModelInferResponse(model_name=app.name, model_version="1", id=request.id)
            response.parameters[SHA_PARAMETER].string_param = app.sha256
            response.parameters[COMPUTE_PARAMETER].double_param = round((time.perf_counter() - tick) * 1e3, 4)
            if computed.exit is not None:
                response.parameters[EXIT_PARAMETER].int64_param = computed.exit
            for name in wanted:
                array = np.ascontiguousarray(computed.outputs[name])
                response.outputs.add(name=name, datatype=v2_datatype(array.dtype), shape=list(array.shape))
                response.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
            return response

        return self._call(context, request.model_name, infer, infer=True)


def make_grpc_server(served: ServedModels, host: str, port: int, threads: int = 16) -> tuple[grpc.Server, int]:
    """A grpcio server with the v2 service, not yet started, and the port it bound. Calls beyond
    `threads` + the model's queue are refused with RESOURCE_EXHAUSTED by grpcio itself."""
    queue_room = max(s.max_queue for s in served.schedulers.values())
    limit = max(a.max_body for a in served.apps.values())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="splitc-grpc"),
                         maximum_concurrent_rpcs=threads + queue_room,
                         options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(served), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise InputError(f"cannot listen for gRPC on {address}; choose another --grpc-port or --host")
    return server, bound


# ------------------------------------------------------------------------------ client helpers


def infer_request(model: str, tensors: Mapping[str, np.ndarray], outputs=None, request_id: str = "") -> service_pb2.ModelInferRequest:
    """A ModelInferRequest carrying `tensors` as raw contents."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        request.inputs.add(name=name, datatype=v2_datatype(array.dtype), shape=list(array.shape))
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def outputs_of(response) -> dict[str, np.ndarray]:
    """The arrays of a ModelInferResponse carrying raw output contents."""
    arrays = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        dtype = numpy_dtype(tensor.datatype)
        arrays[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape)).astype(dtype.newbyteorder("="))
    return arrays
