"""Start a real Triton Inference Server on a model repository written by `splitc export-triton`.

    install = find_tritonserver()                      # $SPLITC_TRITON_PYTHON, else .venv-triton/
    server = start_tritonserver(repo, install, http_port=8000, grpc_port=8001, workdir=tmp)
    wait_until_ready(server, "http://127.0.0.1:8000", timeout=120)

The server is the `tritonserver` binary (with its Python backend) that the `nvidia-pytriton` wheel
bundles. Its Python-backend stub embeds a libpython of one minor version and takes the standard
library and site-packages of the first `python3` on PATH, so it runs in a Python environment of
its own: one made from Debian's python3.11 (`scripts/setup_triton.sh`), holding nvidia-pytriton,
onnxruntime and splitc. (From the pyenv 3.11.7 interpreter the stub fails to load a model: its
libpython does not match that standard library; see ../shared/TOOLCHAIN.md.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from splitc.core.errors import ToolchainError

TRITON_PYTHON_ENV = "SPLITC_TRITON_PYTHON"
DEFAULT_VENV = Path(__file__).resolve().parents[1] / ".venv-triton"

_LOCATE = """
import json, sys
from pytriton.triton import TRITONSERVER_DIST_DIR
from pytriton.utils.distribution import get_libs_path, get_stub_path
import onnxruntime, splitc.runtime.server
version = f"{sys.version_info[0]}.{sys.version_info[1]}"
print(json.dumps({"dist": str(TRITONSERVER_DIST_DIR), "libs": str(get_libs_path()), "stub": str(get_stub_path(version)),
                  "bin": sys.prefix + "/bin"}))
"""


@dataclass(frozen=True)
class TritonInstall:
    python: Path   # the interpreter of the environment the Python backend runs in
    dist: Path     # pytriton's tritonserver/ (bin/tritonserver, backends/python/)
    libs: Path     # the shared libraries the binary needs
    stub: Path     # the Python-backend stub for that interpreter's version


def find_tritonserver(python: str | Path | None = None) -> TritonInstall:
    """The tritonserver of the Python environment `python` ($SPLITC_TRITON_PYTHON, else the
    repository's .venv-triton). ToolchainError when there is none, saying how to make one."""
    candidate = Path(python or os.environ.get(TRITON_PYTHON_ENV) or DEFAULT_VENV / "bin" / "python")
    if not candidate.exists():
        raise ToolchainError(f"no Python environment for Triton at {candidate}; run scripts/setup_triton.sh "
                             f"(or point ${TRITON_PYTHON_ENV} at a python with nvidia-pytriton, onnxruntime and splitc)")
    result = subprocess.run([str(candidate), "-c", _LOCATE], capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolchainError(f"{candidate} cannot run Triton's Python backend ({last}); run scripts/setup_triton.sh")
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return TritonInstall(candidate, Path(found["dist"]), Path(found["libs"]), Path(found["stub"]))


def _backends(install: TritonInstall, workdir: Path) -> Path:
    """A backend directory with the Python backend and the stub for this interpreter (the wheel
    ships one stub per Python version beside the backend; Triton looks for it in the backend)."""
    python = workdir / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    shipped = install.dist / "backends" / "python"
    for item in shipped.iterdir():
        if item.is_file() and not (python / item.name).exists():
            (python / item.name).symlink_to(item)
    stub = python / "triton_python_backend_stub"
    if not stub.exists():
        shutil.copy(install.stub, stub)
    return workdir / "backends"


def start_tritonserver(repository: str | Path, install: TritonInstall, *, http_port: int, grpc_port: int,
                       workdir: str | Path, log_path: str | Path | None = None, token: str | None = None) -> subprocess.Popen:
    """Start tritonserver on `repository` (HTTP and gRPC, no metrics port); its log goes to
    `log_path` (default workdir/tritonserver.log).

    With `token`, inference, model metadata and config need `authorization: Bearer <token>`, as
    with `splitc serve` (Triton's restricted APIs; it answers 403 where splitc answers 401), health
    stays open. Triton takes the value on its command line, where other users of the host can
    read it (ps): use it on a host of your own."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = f"{install.python.parent}:{env.get('PATH', '')}"
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH"), str(install.libs)) if p)
    command = [str(install.dist / "bin" / "tritonserver"), "--model-repository", str(Path(repository).resolve()),
               "--backend-directory", str(_backends(install, workdir)), "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--allow-metrics", "false", "--log-verbose", "0"]
    if token:
        restricted = f"inference,model-config,metadata:authorization=Bearer {token.strip()}"
        command += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
    log = open(log_path or workdir / "tritonserver.log", "wb")  # noqa: SIM115 - the child writes it; closed by the caller's process exit
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)


def wait_until_ready(proc: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    """Until GET /v2/health/ready answers 200; ToolchainError when the server exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ToolchainError(f"tritonserver exited with {proc.returncode} before it was ready; see its log")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise ToolchainError(f"tritonserver was not ready within {timeout:g} s; see its log")


def stop_tritonserver(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
