"""Run an ONNX model with ONNX Runtime on a batch of samples (standalone script).

Usage: python ort_worker.py MODEL.onnx INPUTS.npz OUTPUTS.npz [THREADS]

The same npz protocol as tvm_worker.py (beside this file, imported from there): INPUTS.npz holds
``s{i}__{j}``, the j-th input of sample i in the model's input order; OUTPUTS.npz receives
``s{i}__{k}``. Runs on the device (or under qemu-aarch64) where only the standard library, numpy
and onnxruntime are installed, so it must not import splitc. On any error it prints one line to
stderr and exits with status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tvm_worker import WorkerError, _group_samples, _one_line, _save_npz_atomically

_USAGE = "usage: python ort_worker.py MODEL.onnx INPUTS.npz OUTPUTS.npz [THREADS]"


def run(model_path: str, inputs_path: str, outputs_path: str, threads: int = 0) -> None:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    with np.load(inputs_path, allow_pickle=False) as archive:
        samples = _group_samples(list(archive.files))
        inputs = {key: archive[key] for keys in samples.values() for key in keys}

    results = {}
    for sample, keys in samples.items():
        if len(keys) != len(names):
            raise WorkerError(f"sample {sample} has {len(keys)} inputs; the model takes {len(names)} ({', '.join(names)})")
        outputs = session.run(None, {name: np.ascontiguousarray(inputs[key]) for name, key in zip(names, keys)})
        for position, array in enumerate(outputs):
            results[f"s{sample}__{position}"] = array
    _save_npz_atomically(outputs_path, results)


def main(argv: Sequence[str]) -> int:
    if len(argv) not in (3, 4):
        print(f"ort_worker: {_USAGE}", file=sys.stderr)
        return 1
    try:
        run(*argv[:3], threads=int(argv[3]) if len(argv) == 4 else 0)
    except Exception as error:  # report every failure the same way: one line, exit 1
        print(_one_line(error).replace("tvm_worker:", "ort_worker:", 1), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
