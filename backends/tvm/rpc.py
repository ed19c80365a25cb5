"""TVM RPC for tuning: candidates measured on the device.

Measuring on a device goes through TVM RPC (`python -m tvm.exec.rpc_server` at HOST:PORT, or a
tracker with a key); candidates are cross-compiled into shared libraries here (with
$SPLITC_TUNE_CC when set) and loaded by the device itself. The hooks below are handed to
MetaSchedule's RPCRunner and builder by the tuning child (backends/tvm/search.py).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from splitc.core.errors import TargetError, first_line

DIRECT_KEY = "splitc-direct"  # RPCConfig key meaning "connect to the server itself, no tracker"


@dataclass(frozen=True)
class RPCEndpoint:
    host: str
    port: int
    key: str | None = None      # with a key, host:port is a tracker; without, the server itself

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (f" (tracker key {self.key})" if self.key else "")


def parse_rpc_address(rpc: str) -> tuple[str, int]:
    """HOST:PORT of a TVM RPC server (or tracker), as `--rpc` gives it to tune and profile; an IPv6
    host may be bracketed."""
    host, sep, port = rpc.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"--rpc {rpc!r} is not HOST:PORT; give the address of `python -m tvm.exec.rpc_server`, e.g. 192.168.1.20:9090")
    return host.strip("[]"), int(port)


def parse_rpc(rpc: str, key: str | None = None) -> RPCEndpoint:
    host, port = parse_rpc_address(rpc)
    return RPCEndpoint(host, port, key or None)


def check_rpc(endpoint: RPCEndpoint, timeout: float = 10.0) -> None:
    """Refuse early, in one line, when the RPC server (or tracker) cannot be reached."""
    from tvm import rpc

    try:
        if endpoint.key:
            tracker = rpc.connect_tracker(endpoint.host, endpoint.port)
            tracker.request(endpoint.key, session_timeout=timeout).remove("")
        else:
            rpc.connect(endpoint.host, endpoint.port, session_timeout=timeout)
    except Exception as exc:  # TVM raises its own error types
        what = f"tracker at {endpoint.host}:{endpoint.port} (key {endpoint.key})" if endpoint.key else f"server at {endpoint}"
        raise TargetError(f"cannot reach the TVM RPC {what} ({first_line(exc)}); start `python -m tvm.exec.rpc_server "
                          f"--host 0.0.0.0 --port {endpoint.port}` on the device") from exc


def direct_session(config):
    """MetaSchedule RPCRunner session factory for a server without a tracker (runs in its workers)."""
    from tvm import rpc

    return rpc.connect(config.tracker_host, int(config.tracker_port), session_timeout=config.session_timeout_sec)


def alloc_arguments(session, device, args_info, alloc_repeat: int):
    """MetaSchedule RPCRunner argument allocation that fills the inputs here and copies them over,
    instead of calling `tvm.contrib.random.random_fill_for_measure` on the device: a device running
    the TVM runtime library only (what splitc ships to a device) does not have that function."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            if info[0] != "TENSOR":
                raise NotImplementedError(info)
            _, dtype, shape = info
            tensor = tvm.runtime.empty(shape=[int(d) for d in shape], dtype=dtype, device=device)
            try:
                kind = np.dtype(dtype).kind
            except TypeError:  # bfloat16 and other types numpy does not know: left as allocated
                kind = None
            if kind == "f":
                tensor.copyfrom(rng.standard_normal([int(d) for d in shape]).astype(dtype))
            elif kind is not None:
                tensor.copyfrom(np.zeros([int(d) for d in shape], dtype=dtype))  # valid indices, masks
            args.append(tensor)
        repeated.append(args)
    return repeated


def export_shared_library(mod) -> str:
    """MetaSchedule builder export: a shared library the device loads itself (cross-linked with
    $SPLITC_TUNE_CC when set), instead of the default tar that the loading side must link."""
    from tvm.support import cc

    directory = tempfile.mkdtemp(prefix="ms-", dir=os.environ.get("SPLITC_TUNE_TMP") or None)
    path = os.path.join(directory, "tvm_tmp_mod.so")
    compiler = os.environ.get("SPLITC_TUNE_CC")
    if compiler:
        mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    else:
        mod.export_library(path)
    return path
