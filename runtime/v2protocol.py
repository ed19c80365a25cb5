"""The KServe v2 / Open Inference Protocol over HTTP/REST: JSON tensors and the binary tensor data
extension, encoded and decoded the same way by splitc's server (runtime/server.py) and its edge
client (runtime/remote.py), so either end can talk to Triton Inference Server instead.

A request or response body is a JSON header, optionally followed by raw tensor bytes. With binary
data the HTTP header `Inference-Header-Content-Length` gives the JSON header's length, each binary
tensor's JSON entry carries `parameters.binary_data_size` instead of `data`, and the bytes follow in
the order of the entries (row-major, little-endian; BOOL one byte per element).

Numpy and the stdlib only: a device imports this without torch or the compiler.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from splitc.core.errors import InputError, RemoteError, SplitcError  # noqa: F401  (RemoteError re-exported)

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
EXTENSIONS = ("binary_tensor_data", "model_configuration")

# Parameters splitc puts in v2 metadata and responses (Triton carries the same in its model config).
SHA_PARAMETER = "model_sha256"      # the bundle's model hash: client and server must serve the same model
COMPUTE_PARAMETER = "compute_ms"    # the server's partition time, for the client's link estimates
EXIT_PARAMETER = "exit"             # the exit head that answered on the server (a middle tier)

# numpy dtype name <-> v2 datatype (the Triton/KServe names). BYTES (strings) is not supported.
_TO_V2 = {
    "bool": "BOOL",
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
_FROM_V2 = {v: k for k, v in _TO_V2.items()}
MAX_RANK = 16


class ProtocolError(InputError):
    """A request or response that breaks the protocol or the model's signature. `status` is the HTTP
    status a server answers with (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def bearer_authorized(header: str | None, token: bytes | None) -> bool:
    """Whether an Authorization header carries the server's shared secret (`token` None: no auth).
    Compared in constant time: a timing difference must not tell how much of a guess was right."""
    if token is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token)


def model_name_for(name: str) -> str:
    """A model name safe in a URL path and as a Triton model directory."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip("._")
    return cleaned or "model"


def v2_datatype(dtype: str | np.dtype) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _TO_V2:
        raise InputError(f"dtype {name} has no KServe v2 datatype (supported: {', '.join(sorted(_TO_V2))})")
    return _TO_V2[name]


def numpy_dtype(datatype: str) -> np.dtype:
    if datatype not in _FROM_V2:
        raise ProtocolError(f"datatype {datatype!r} is not supported (use one of {', '.join(sorted(_FROM_V2))})")
    return np.dtype(_FROM_V2[datatype]).newbyteorder("<")


# ------------------------------------------------------------------------------------ encoding


def _tensor_entry(name: str, array: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    entry: dict[str, Any] = {"name": name, "shape": [int(d) for d in array.shape], "datatype": v2_datatype(array.dtype)}
    if binary:
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    flat = array.reshape(-1)
    if array.dtype.kind == "f" and not np.all(np.isfinite(flat)):
        raise InputError(f"tensor {name!r} holds NaN or infinity, which JSON cannot carry; send it as binary data")
    entry["data"] = flat.tolist()
    return entry, None


def _assemble(header: dict[str, Any], chunks: Sequence[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return head, {"Content-Type": JSON_CONTENT_TYPE}
    return head + b"".join(chunks), {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(head))}


def encode_request(
    tensors: Mapping[str, np.ndarray],
    outputs: Iterable[str] | None = None,
    *,
    binary: bool = True,
    binary_outputs: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and HTTP headers of an infer request carrying `tensors` (binary extension by default)."""
    header: dict[str, Any] = {}
    if request_id:
        header["id"] = request_id
    entries, chunks = [], []
    for name, array in tensors.items():
        entry, raw = _tensor_entry(name, np.asarray(array), binary)
        entries.append(entry)
        if raw is not None:
            chunks.append(raw)
    header["inputs"] = entries
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": bool(binary_outputs)}} for n in outputs]
    else:
        header["parameters"] = {"binary_data_output": bool(binary_outputs)}
    return _assemble(header, chunks)


def encode_response(
    model_name: str,
    outputs: Mapping[str, np.ndarray],
    *,
    binary: bool | Mapping[str, bool] = True,
    model_version: str = "1",
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and HTTP headers of an infer response; `binary` per output name or for all."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id:
        header["id"] = request_id
    if parameters:
        header["parameters"] = dict(parameters)
    entries, chunks = [], []
    for name, array in outputs.items():
        as_binary = binary.get(name, False) if isinstance(binary, Mapping) else binary
        entry, raw = _tensor_entry(name, np.asarray(array), as_binary)
        entries.append(entry)
        if raw is not None:
            chunks.append(raw)
    header["outputs"] = entries
    return _assemble(header, chunks)


def encode_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


# ------------------------------------------------------------------------------------ decoding


def split_body(body: bytes, header_length: str | int | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header of a body and the binary bytes after it."""
    if header_length is None or header_length == "":
        head, rest = body, b""
    else:
        try:
            length = int(header_length)
        except (TypeError, ValueError):
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {str(header_length)[:40]!r}") from None
        if not 0 <= length <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes")
        head, rest = body[:length], body[length:]
    try:
        header = json.loads(bytes(head))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"the JSON header is malformed ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"the JSON header must be an object, got {type(header).__name__}")
    return header, memoryview(rest)


def _shape(entry: dict[str, Any], what: str) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
        raise ProtocolError(f"{what}: 'shape' must be a list of at most {MAX_RANK} non-negative integers, got {str(shape)[:80]}")
    return tuple(shape)


def decode_tensors(entries: Any, binary: memoryview, what: str = "inputs", specs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Turn a list of v2 tensor entries (+ the binary section) into arrays.

    With `specs` (name -> object with .shape and .dtype), every entry is checked against its spec
    before anything is allocated: unknown, missing or duplicate names, wrong datatype or shape."""
    if not isinstance(entries, list):
        raise ProtocolError(f"'{what}' must be a list of tensors")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ProtocolError(f"{what}[{i}] must be an object with name, shape, datatype")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"{what}[{i}] has no 'name'")
        label = f"{what.removesuffix('s')} {name[:60]!r}"
        if name in arrays:
            raise ProtocolError(f"{label} is given twice")
        datatype = entry.get("datatype")
        if not isinstance(datatype, str):
            raise ProtocolError(f"{label} has no 'datatype' (e.g. FP32)")
        dtype = numpy_dtype(datatype)
        shape = _shape(entry, label)
        if specs is not None:
            spec = specs.get(name)
            if spec is None:
                raise ProtocolError(f"{label} is not an input of this model (it takes {', '.join(specs)})")
            expected = v2_datatype(spec.dtype)
            if datatype != expected:
                raise ProtocolError(f"{label} has datatype {datatype}, expected {expected}")
            if not spec.fits(shape):  # a dynamic axis's range is the session's to check
                raise ProtocolError(f"{label} has shape {list(shape)}, expected {spec.described()}")
        count = math.prod(shape)
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"{label}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise ProtocolError(f"{label}: binary_data_size must be a non-negative integer")
            if "data" in entry:
                raise ProtocolError(f"{label} has both 'data' and binary_data_size")
            if size != count * dtype.itemsize:
                raise ProtocolError(f"{label}: binary_data_size is {size}, but {datatype}{list(shape)} needs {count * dtype.itemsize} bytes")
            if offset + size > len(binary):
                raise ProtocolError(f"{label}: the body ends before its {size} bytes of binary data")
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
            if dtype == np.bool_:
                array = array.view(np.uint8)
                if array.size and array.max() > 1:
                    raise ProtocolError(f"{label}: BOOL bytes must be 0 or 1")
                array = array.view(np.bool_)
            arrays[name] = array.astype(dtype.newbyteorder("="), copy=False)
            continue
        if "data" not in entry:
            raise ProtocolError(f"{label} has neither 'data' nor parameters.binary_data_size")
        arrays[name] = _json_data(entry["data"], dtype, shape, count, label)
    if offset != len(binary):
        raise ProtocolError(f"the body carries {len(binary) - offset} bytes of binary data no tensor claims")
    if specs is not None:
        missing = [n for n in specs if n not in arrays]
        if missing:
            raise ProtocolError(f"input(s) {', '.join(missing)} missing; this model takes {', '.join(specs)}")
    return arrays


def _json_data(data: Any, dtype: np.dtype, shape: tuple[int, ...], count: int, label: str) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"{label}: 'data' must be a (flat or nested) list")
    flat = _flatten(data, label)
    if len(flat) != count:
        raise ProtocolError(f"{label}: 'data' has {len(flat)} elements, shape {list(shape)} needs {count}")
    if dtype == np.bool_:
        if not all(type(v) is bool for v in flat):
            raise ProtocolError(f"{label}: BOOL data must be true/false")
    elif dtype.kind in "iu":
        if not all(type(v) is int for v in flat):
            raise ProtocolError(f"{label}: integer data must be JSON integers")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise ProtocolError(f"{label}: a value lies outside the range of {dtype.name}")
    elif not all(type(v) in (int, float) for v in flat):
        raise ProtocolError(f"{label}: floating-point data must be JSON numbers")
    with np.errstate(over="ignore"):
        return np.array(flat, dtype=dtype.newbyteorder("=")).reshape(shape)


def _flatten(data: list, label: str) -> list:
    if not any(isinstance(v, list) for v in data):
        return data
    out: list = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                if len(stack) > MAX_RANK:
                    raise ProtocolError(f"{label}: 'data' is nested deeper than {MAX_RANK}")
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def decode_request(body: bytes, header_length: str | int | None, specs: Mapping[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays of an infer request and its JSON header (for id, outputs, parameters)."""
    header, binary = split_body(body, header_length)
    if "inputs" not in header:
        raise ProtocolError("the request has no 'inputs'")
    return decode_tensors(header["inputs"], binary, "inputs", specs), header


def wanted_outputs(header: Mapping[str, Any], available: Sequence[str]) -> dict[str, bool]:
    """Output name -> binary? as a request asks (all outputs when it names none)."""
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false")
    requested = header.get("outputs")
    if requested is None:
        return {name: default_binary for name in available}
    if not isinstance(requested, list):
        raise ProtocolError("'outputs' must be a list of {name, parameters}")
    wanted: dict[str, bool] = {}
    for i, entry in enumerate(requested):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError(f"outputs[{i}] must be an object with a 'name'")
        name = entry["name"]
        if name not in available:
            raise ProtocolError(f"output {name[:60]!r} is not an output of this model (it has {', '.join(available)})")
        p = entry.get("parameters") or {}
        if not isinstance(p, dict):
            raise ProtocolError(f"outputs[{i}].parameters must be an object")
        flag = p.get("binary_data", default_binary)
        if not isinstance(flag, bool):
            raise ProtocolError(f"outputs[{i}].parameters.binary_data must be true or false")
        wanted[name] = flag
    return wanted


def decode_response(body: bytes, header_length: str | int | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays of an infer response and its JSON header. Raises ProtocolError on a malformed one."""
    header, binary = split_body(body, header_length)
    if "outputs" not in header:
        raise ProtocolError("the response has no 'outputs'")
    return decode_tensors(header["outputs"], binary, "outputs"), header
