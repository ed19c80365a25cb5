"""What a model file is, told from its content (never its name), and how each kind is read.

The kinds splitc reads:
  * EXPORT       a torch.export archive (`torch.export.save`: a zip with `archive_format`), any suffix;
  * TORCHSCRIPT  `torch.jit.save` (a zip with `constants.pkl` and `code/`), converted to an
                 ExportedProgram by torch's TorchScript-to-export converter;
  * TORCH_SAVE   `torch.save` (zip with `data.pkl`, or the legacy raw pickle): a state_dict when it
                 loads with `weights_only=True`, otherwise a pickled object (trusted loads only);
  * SAFETENSORS  a `.safetensors` weight file (weights only);
  * GGUF         a llama.cpp GGUF file (read by transformers);
  * HF_FOLDER    a directory with `config.json` (a local Hugging Face model).

Every failure is a ModelLoadError with one line. Torch's own warnings and log records are held
back while a file is read (`quiet`), so a bad file prints splitc's line and nothing before it.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from splitc.core.errors import ModelLoadError, first_line


class Kind(enum.Enum):
    EXPORT = "torch.export archive"
    TORCHSCRIPT = "TorchScript archive"
    TORCH_SAVE = "torch.save file"
    SAFETENSORS = "safetensors file"
    GGUF = "GGUF file"
    HF_FOLDER = "Hugging Face model folder"


_PICKLE_PROTO = b"\x80"  # every pickle protocol >= 2 starts with PROTO (legacy torch.save too)
_GGUF_MAGIC = b"GGUF"
_ZIP_MAGIC = b"PK\x03\x04"


def sniff(path: Path) -> Kind:
    """The kind of model file at `path`, from its bytes; ModelLoadError when it is none of them."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return Kind.HF_FOLDER
        raise ModelLoadError(f"{path} is a directory without config.json; pass a model file, or a Hugging Face model folder")
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); the save that wrote it did not finish")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        return _sniff_zip(path)
    if head.startswith(_GGUF_MAGIC):
        return Kind.GGUF
    if _looks_like_safetensors(head, size):
        return Kind.SAFETENSORS
    if head.startswith(_PICKLE_PROTO):
        return Kind.TORCH_SAVE
    raise ModelLoadError(
        f"{path} is not a model file splitc reads (it starts with {head[:8]!r}); pass a torch.export archive, "
        "TorchScript, a state_dict with --weights, a GGUF file, or a Hugging Face folder"
    )


def _sniff_zip(path: Path) -> Kind:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path} is a truncated or corrupt zip archive ({first_line(exc)}); save the model again") from exc
    # Entries sit under one top-level folder whose name is the file's stem at save time.
    tails = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in tails or any(t.startswith("models/") for t in tails):
        return Kind.EXPORT
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return Kind.TORCHSCRIPT
    if "data.pkl" in tails:
        return Kind.TORCH_SAVE
    raise ModelLoadError(f"{path} is a zip archive but not a PyTorch model (no torch.export, TorchScript or torch.save entries)")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object."""
    if len(head) < 10:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length < size and head[8:9] == b"{"


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Hold back Python warnings, torch's log records and stray prints while a file is read: the user
    gets splitc's own line, not a library's traceback first. `verbose` lets everything through."""
    if verbose:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


# ------------------------------------------------------------------------------ readers per kind


def load_export(path: Path) -> torch.export.ExportedProgram:
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path} as a torch.export archive ({first_line(exc)}); write it with torch.export.save") from exc


def convert_torchscript(path: Path, example_inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """TorchScript -> ExportedProgram with torch's converter; a failure names the TorchScript op."""
    from torch._export.converter import TS2EPConverter

    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path} as TorchScript ({first_line(exc)})") from exc
    try:
        converted = TS2EPConverter(scripted.eval(), example_inputs).convert()
        # The converter marks every axis Dim.AUTO; TorchScript records no shape intent, so the
        # program is taken at the example's shapes, as a trace would run it.
        return torch.export.export(converted.module(), example_inputs)
    except Exception as exc:
        op = re.search(r"\b((?:aten|prim|quantized|[a-z_]+)::[\w.]+)", str(exc))
        what = f"op {op.group(1)}" if op else first_line(exc)
        raise ModelLoadError(
            f"converting TorchScript {path} to torch.export failed at {what}; export the model with torch.export instead"
        ) from exc


def load_weights(path: Path, kind: Kind | None = None) -> dict[str, torch.Tensor]:
    """A state_dict from a torch.save file (weights_only, memory-mapped) or a safetensors file."""
    kind = kind or sniff(path)
    if kind is Kind.SAFETENSORS:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"cannot read weights from {path} ({first_line(exc)})") from exc
    if kind is not Kind.TORCH_SAVE:
        raise ModelLoadError(f"--weights {path} is a {kind.value}, not a state_dict; save the weights with torch.save(model.state_dict(), ...)")
    try:
        loaded = _torch_load_weights(path)
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not a plain state_dict: it holds Python objects that only unpickling can rebuild ({first_line(exc)}); "
            "save model.state_dict() instead"
        ) from exc
    state = state_dict_in(loaded)
    if state is None:
        raise ModelLoadError(f"{path} holds a {type(loaded).__name__}, not a state_dict of tensors; save model.state_dict()")
    return state


def _torch_load_weights(path: Path):
    # mmap: a big checkpoint's tensors stay in the page cache instead of being copied in; the
    # legacy (non-zip) format cannot be mapped.
    mmap = zipfile.is_zipfile(path)
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)


def state_dict_in(obj) -> dict[str, torch.Tensor] | None:
    """The state_dict in what torch.load returned: itself, or a checkpoint's `state_dict`/`model` entry."""
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = state_dict_in(obj.get(key))
            if inner is not None:
                return inner
    return None


def safe_content(path: Path):
    """What a torch.save file holds when it loads with weights_only (tensors, containers and plain
    values: nothing runs); None when it needs full unpickling."""
    try:
        return _torch_load_weights(path)
    except Exception:
        return None


def unpickle_module(path: Path) -> torch.nn.Module:
    """A pickled nn.Module; the caller has checked that the user trusts the file."""
    try:
        module = torch.load(str(path), weights_only=False, map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot unpickle {path} ({first_line(exc)})") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{path} holds a {type(module).__name__}, not an nn.Module; save the whole module, or a torch.export archive")
    return module

