"""Load a model from what the user has and export it with torch.export.

Three sources, checked in this order:
  * a `.pt2` file written by `torch.export.save` (self-contained, the default);
  * `package.module:callable`, a factory returning an nn.Module (inputs from --input-shape or
    --example-input);
  * a pickled nn.Module (`.pt`/`.pth`), only with trust_pickle=True: unpickling runs code.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from splitc.core.errors import InputError, ModelLoadError, SplitcError, first_line
from splitc.runtime.arrays import read_arrays

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl")
_DTYPES = {
    "float32": torch.float32, "f32": torch.float32, "float16": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "i64": torch.int64, "int32": torch.int32,
    "i32": torch.int32, "bool": torch.bool, "uint8": torch.uint8,
}


@dataclass
class LoadedModel:
    program: torch.export.ExportedProgram  # as exported, before decomposition
    name: str
    source: str
    sha256: str
    example_inputs: tuple[torch.Tensor, ...] | None  # what the user gave, if anything


def parse_input_shapes(specs: Sequence[str]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """`1,3,224,224` or `1,128:int64`; several inputs as several options or separated by `;`."""
    parsed = []
    for spec in (s for group in specs for s in group.split(";") if s.strip()):
        shape_text, _, dtype_text = spec.strip().partition(":")
        dtype_text = dtype_text or "float32"
        if dtype_text not in _DTYPES:
            raise InputError(f"input shape {spec!r} names dtype {dtype_text!r}; use one of {', '.join(sorted(_DTYPES))}")
        try:
            shape = tuple(int(d) for d in re.split(r"[,x]", shape_text.strip()))
        except ValueError:
            raise InputError(f"input shape {spec!r} is not a list of integers; write it as 1,3,224,224 (optionally :int64)") from None
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"input shape {spec!r} needs positive dimensions, such as 1,3,224,224")
        parsed.append((shape, _DTYPES[dtype_text]))
    return parsed


def read_example_inputs(path: str | Path) -> tuple[torch.Tensor, ...]:
    """A `.npy` (one input) or `.npz` (inputs in stored order)."""
    return tuple(torch.from_numpy(array) for _, array in read_arrays(path, "example input"))


def load_model(
    source: str,
    *,
    input_shapes: Sequence[str] = (),
    example_input: str | Path | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    path = Path(source)
    examples = read_example_inputs(example_input) if example_input else None
    if path.suffix == ".pt2" or (path.is_file() and path.suffix not in _PICKLE_SUFFIXES):
        if not path.is_file():
            raise ModelLoadError(f"model file {source} does not exist")
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise ModelLoadError(
                f"cannot read {source} as a torch.export program ({first_line(exc)}); write it with torch.export.save"
            ) from exc
        return LoadedModel(program, path.stem, str(path), _sha256(path.read_bytes()), examples)
    if path.suffix in _PICKLE_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"model file {source} does not exist")
        if not trust_pickle:
            raise ModelLoadError(
                f"{source} is a pickle, and unpickling runs whatever code it contains; "
                "pass --trust-pickle if you trust its author, or save a torch.export program (.pt2) instead"
            )
        try:
            module = torch.load(str(path), weights_only=False, map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"cannot unpickle {source} ({first_line(exc)})") from exc
        if not isinstance(module, torch.nn.Module):
            raise ModelLoadError(f"{source} holds a {type(module).__name__}, not an nn.Module; save the whole module, or a .pt2 program")
        inputs = _inputs_for(source, input_shapes, examples)
        return LoadedModel(_export(module, inputs, source), path.stem, str(path), _sha256(path.read_bytes()), examples)
    if _FACTORY.match(source):
        module = _call_factory(source)
        inputs = _inputs_for(source, input_shapes, examples)
        program = module if isinstance(module, torch.export.ExportedProgram) else _export(module, inputs, source)
        # Weights and lifted constants as raw bytes (a view as uint8 works for every dtype, bf16 included).
        tensors = [*program.state_dict.values(), *(c for c in program.constants.values() if isinstance(c, torch.Tensor))]
        digest = _sha256(b"".join(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors) + source.encode())
        return LoadedModel(program, source.split(":")[1], source, digest, examples)
    raise ModelLoadError(
        f"model {source!r} does not exist; pass a .pt2 file from torch.export.save, a package.module:factory, "
        "or a pickled module with --trust-pickle"
    )


def is_reference(text: str) -> bool:
    """Whether `text` has the `package.module:attribute` form."""
    return bool(_FACTORY.match(text))


def resolve_reference(source: str, error: type[SplitcError] = ModelLoadError):
    """The object a `package.module:attribute` names (the user's project directory importable)."""
    module_name, _, attr = source.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # factories usually live in the user's project
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        raise error(f"cannot import {module_name} for {source} ({first_line(exc)}); check the module path and PYTHONPATH") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{module_name} has no attribute {attr!r}; check the name after ':' in {source}")
        obj = getattr(obj, part)
    return obj


def _call_factory(source: str):
    obj = resolve_reference(source)
    if isinstance(obj, (torch.nn.Module, torch.export.ExportedProgram)):
        return obj
    if not callable(obj):
        raise ModelLoadError(f"{source} is neither a callable nor a module")
    try:
        built = obj()
    except Exception as exc:
        raise ModelLoadError(f"factory {source} failed: {first_line(exc)}") from exc
    if not isinstance(built, (torch.nn.Module, torch.export.ExportedProgram)):
        raise ModelLoadError(f"factory {source} returned a {type(built).__name__}; it must return an nn.Module")
    return built


def _inputs_for(source: str, input_shapes: Sequence[str], examples) -> tuple[torch.Tensor, ...]:
    if examples is not None:
        return examples
    shapes = parse_input_shapes(input_shapes)
    if not shapes:
        raise InputError(f"{source} is not an exported program, so splitc needs its inputs: pass --input-shape 1,3,224,224 or --example-input x.npy")
    generator = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(shape, generator=generator).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
        for shape, dtype in shapes
    )


def _export(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], source: str) -> torch.export.ExportedProgram:
    module = module.eval()
    try:
        with torch.no_grad():
            return torch.export.export(module, inputs)
    except Exception as exc:
        raise ModelLoadError(f"torch.export failed on {source}: {first_line(exc)}") from exc




def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
