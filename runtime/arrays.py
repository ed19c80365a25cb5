"""Reading tensors from .npy/.npz files (numpy only), with the one-line errors users see."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from splitc.core.errors import InputError


def read_arrays(path: str | Path, what: str = "input") -> list[tuple[str | None, np.ndarray]]:
    """[(None, array)] for a .npy, [(key, array), ...] in stored order for a .npz."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"cannot read {path} as .npy/.npz ({exc}); save arrays with numpy.save or numpy.savez") from exc
    if isinstance(loaded, np.ndarray):
        return [(None, np.ascontiguousarray(loaded))]
    with loaded:
        return [(key, np.ascontiguousarray(loaded[key])) for key in loaded.files]
