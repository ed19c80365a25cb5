"""What crosses a decoder's cut, as bytes: hidden-state rows in float32, or quantized to int8 or
int4 (symmetric, one float32 scale per group of GROUP values of a row: decoder hidden states have a
few outlier channels, and one scale per row left int4 agreeing with fp32 on under half of SmolLM2's
next tokens). numpy only; the device encodes, the cloud decodes, and the bench measures what each
scheme costs in bytes and next-token agreement."""

from __future__ import annotations

import numpy as np

from splitc.core.errors import InputError

SCHEMES = ("fp32", "int8", "int4")
_LEVELS = {"int8": 127, "int4": 7}
GROUP = 32


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise InputError(f"cut encoding {scheme!r} is unknown; use one of {', '.join(SCHEMES)}")
    return scheme


def _groups(width: int) -> int:
    return -(-width // GROUP)


def encode(rows: np.ndarray, scheme: str) -> bytes:
    """Rows [T, H] float32 -> bytes: fp32 as is; intN as T x ceil(H / GROUP) float32 scales, then
    the codes (int4: two per byte, low nibble first, offset by 8)."""
    check_scheme(scheme)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if scheme == "fp32":
        return rows.tobytes()
    count, width = rows.shape
    levels = _LEVELS[scheme]
    padded = np.zeros((count, _groups(width) * GROUP), np.float32)
    padded[:, :width] = rows
    grouped = padded.reshape(count, -1, GROUP)
    scale = np.abs(grouped).max(axis=2) / levels
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(grouped / scale[:, :, None]), -levels, levels).astype(np.int8).reshape(count, -1)[:, :width]
    if scheme == "int4":
        nibbles = (codes.astype(np.int16) + 8).astype(np.uint8)
        if width % 2:
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
    groups = _groups(width)
    scale = np.frombuffer(data[:4 * rows * groups], dtype=np.float32).reshape(rows, groups)
    packed = np.frombuffer(data[4 * rows * groups:], dtype=np.uint8 if scheme == "int4" else np.int8).reshape(rows, -1)
    if scheme == "int4":
        nibbles = np.empty((rows, packed.shape[1] * 2), dtype=np.int16)
        nibbles[:, 0::2] = packed & 0x0F
        nibbles[:, 1::2] = packed >> 4
        codes = (nibbles[:, :width] - 8).astype(np.float32)
    else:
        codes = packed.astype(np.float32)
    return codes * np.repeat(scale, GROUP, axis=1)[:, :width]


def encoded_size(rows: int, width: int, scheme: str) -> int:
    if scheme == "fp32":
        return 4 * rows * width
    per_row = width if scheme == "int8" else (width + 1) // 2
    return rows * (4 * _groups(width) + per_row)


def round_trip(rows: np.ndarray, scheme: str) -> np.ndarray:
    """What the cloud receives for `rows` [T, H] under `scheme` (for in-process runs)."""
    if scheme == "fp32":
        return rows
    return decode(encode(rows, scheme), rows.shape[0], rows.shape[1], scheme)
