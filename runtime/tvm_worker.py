"""Run a compiled TVM Relax library on a batch of samples (standalone script).

Usage: python tvm_worker.py LIB.so INPUTS.npz OUTPUTS.npz

INPUTS.npz holds ``s{i}__{j}``: the j-th positional input of sample i. OUTPUTS.npz receives
``s{i}__{k}``: the k-th output of sample i, with tuple outputs flattened in order.

This file runs on the device (or under qemu-aarch64 emulation) where only the standard library,
numpy and the TVM runtime are installed, so it must not import splitc, torch or tvm.relax.
On any error it prints one line to stderr and exits with status 1.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import Any

_KEY = re.compile(r"s(\d+)__(\d+)")
_USAGE = "usage: python tvm_worker.py LIB.so INPUTS.npz OUTPUTS.npz"


class WorkerError(Exception):
    """A problem with the worker's inputs, reported without a traceback."""


def _group_samples(keys: Sequence[str]) -> dict[int, list[str]]:
    """Map sample index -> its input keys in positional order, checking nothing is missing."""
    samples: dict[int, dict[int, str]] = {}
    for key in keys:
        match = _KEY.fullmatch(key)
        if match is None:
            raise WorkerError(f"unexpected input key {key!r}; expected s<sample>__<position>")
        samples.setdefault(int(match.group(1)), {})[int(match.group(2))] = key
    grouped: dict[int, list[str]] = {}
    for sample, by_position in sorted(samples.items()):
        if sorted(by_position) != list(range(len(by_position))):
            raise WorkerError(
                f"sample {sample} has inputs at positions {sorted(by_position)}; "
                "positions must be 0..n-1"
            )
        grouped[sample] = [by_position[position] for position in range(len(by_position))]
    return grouped


def _flatten(value: Any, out: list[Any]) -> None:
    """Append the arrays in a VM result (a tensor or nested tuples/arrays of them) to ``out``."""
    import numpy as np

    if hasattr(value, "numpy"):  # tvm.runtime.Tensor
        out.append(value.numpy())
    elif isinstance(value, (str, bytes)):
        raise WorkerError(f"model returned a string output {value!r}")
    elif isinstance(value, Sequence):  # tuple, list, tvm_ffi.Array (a collections.abc.Sequence)
        for item in value:
            _flatten(item, out)
    else:  # a scalar (int/float/bool) returned by the VM
        out.append(np.asarray(value))


def _save_npz_atomically(path: str, arrays: dict[str, Any]) -> None:
    """Write the npz next to ``path`` and rename it over, so readers never see a partial file."""
    import numpy as np

    directory, name = os.path.split(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    # os.open with 0o666 honours the umask (mkstemp would leave the result private, 0600).
    handle = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise


def run(lib_path: str, inputs_path: str, outputs_path: str) -> None:
    import numpy as np
    import tvm

    # tvm.runtime.vm works both with the full TVM install and in runtime-only mode
    # (TVM_USE_RUNTIME_LIB=1), where tvm.relax is not importable.
    from tvm.runtime.vm import VirtualMachine

    device = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(lib_path), device)
    main = vm["main"]

    with np.load(inputs_path, allow_pickle=False) as archive:
        samples = _group_samples(list(archive.files))
        inputs = {key: archive[key] for keys in samples.values() for key in keys}

    results: dict[str, Any] = {}
    for sample, keys in samples.items():
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[key]), device) for key in keys]
        outputs: list[Any] = []
        _flatten(main(*args), outputs)
        for position, array in enumerate(outputs):
            results[f"s{sample}__{position}"] = array

    _save_npz_atomically(outputs_path, results)


def _one_line(error: BaseException) -> str:
    # TVM errors span several lines (context, backtrace); a caller logs one line per failure.
    message = " ".join(str(error).split()) or type(error).__name__
    if len(message) > 2000:
        message = message[:2000] + "..."
    return f"tvm_worker: {type(error).__name__}: {message}"


def main(argv: Sequence[str]) -> int:
    if len(argv) != 3:
        print(f"tvm_worker: {_USAGE}", file=sys.stderr)
        return 1
    try:
        run(*argv)
    except Exception as error:  # report every failure the same way: one line, exit 1
        print(_one_line(error), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
