"""What crosses a decoder's cut, as bytes: hidden-state rows in float32, or quantized per row to
int8 or int4 (symmetric, one float32 scale per row). numpy only; the device encodes, the cloud
decodes, and the bench measures what each scheme costs in bytes and next-token agreement."""

from __future__ import annotations

import numpy as np

from splitc.core.errors import InputError

SCHEMES = ("fp32", "int8", "int4")
_LEVELS = {"int8": 127, "int4": 7}


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise InputError(f"cut encoding {scheme!r} is unknown; use one of {', '.join(SCHEMES)}")
    return scheme


def encode(rows: np.ndarray, scheme: str) -> bytes:
    """Rows [T, H] float32 -> bytes: fp32 as is; intN as T float32 scales, then the codes (int4:
    two per byte, low nibble first, offset by 8)."""
    check_scheme(scheme)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if scheme == "fp32":
        return rows.tobytes()
    levels = _LEVELS[scheme]
    scale = np.abs(rows).max(axis=1) / levels
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(rows / scale[:, None]), -levels, levels).astype(np.int8)
    if scheme == "int4":
        nibbles = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(len(rows), -1)
        if nibbles.shape[1] % 2:
            nibbles = np.pad(nibbles, ((0, 0), (0, 1)), constant_values=8)
        codes = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)
    return scale.astype(np.float32).tobytes() + codes.tobytes()


def decode(data: bytes, rows: int, width: int, scheme: str) -> np.ndarray:
    """Bytes from `encode` -> rows [rows, width] float32; refuses a payload of the wrong size."""
    check_scheme(scheme)
    expected = encoded_size(rows, width, scheme)
    if len(data) != expected:
        raise InputError(f"hidden-state payload is {len(data)} bytes; {rows} rows of {width} in {scheme} take {expected}")
    if scheme == "fp32":
        return np.frombuffer(data, dtype=np.float32).reshape(rows, width).copy()
    scale = np.frombuffer(data[:4 * rows], dtype=np.float32)
    packed = np.frombuffer(data[4 * rows:], dtype=np.uint8 if scheme == "int4" else np.int8).reshape(rows, -1)
    if scheme == "int4":
        nibbles = np.empty((rows, packed.shape[1] * 2), dtype=np.int16)
        nibbles[:, 0::2] = packed & 0x0F
        nibbles[:, 1::2] = packed >> 4
        codes = (nibbles[:, :width] - 8).astype(np.float32)
    else:
        codes = packed.astype(np.float32)
    return codes * scale[:, None]


def encoded_size(rows: int, width: int, scheme: str) -> int:
    if scheme == "fp32":
        return 4 * rows * width
    per_row = width if scheme == "int8" else (width + 1) // 2
    return rows * (4 + per_row)


def round_trip(rows: np.ndarray, scheme: str) -> np.ndarray:
    """What the cloud receives for `rows` [T, H] under `scheme` (for in-process runs)."""
    if scheme == "fp32":
        return rows
    return decode(encode(rows, scheme), rows.shape[0], rows.shape[1], scheme)
