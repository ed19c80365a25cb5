"""Load a model from what the user has and export it with torch.export.

Sources:
  * a model file, whatever its name, read by its content (frontend/formats.py): a torch.export
    archive; TorchScript (converted; inputs from --input-shape or --example-input); a GGUF file or a
    Hugging Face folder (frontend/hf.py); a pickled nn.Module only with trust_pickle=True (unpickling
    runs code). A state_dict alone is refused with the spelling that supplies its architecture;
  * `package.module:callable`, a factory returning an nn.Module (inputs from --input-shape or
    --example-input), with `weights` a state_dict file loaded into it (weights_only, memory-mapped).
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
from splitc.core.manifest import sha256_file
from splitc.frontend.formats import (
    Kind,
    convert_torchscript,
    load_export,
    load_weights,
    quiet,
    safe_content,
    sniff,
    state_dict_in,
    unpickle_module,
)
from splitc.runtime.arrays import read_arrays

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
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
    weights: str | Path | None = None,
    task: str | None = None,
    verbose: bool = False,
) -> LoadedModel:
    """Load `source` by what it is (see frontend/formats.py), never by its file name."""
    examples = read_example_inputs(example_input) if example_input else None
    path = Path(source)
    if _FACTORY.match(source) and not path.exists():
        return _from_factory(source, weights, input_shapes, examples, verbose)
    if weights is not None:
        raise InputError(f"--weights loads a state_dict into a factory's module; name the architecture instead of {source}: "
                         f"splitc compile pkg.module:Net --weights {weights}")
    if not path.exists():
        raise ModelLoadError(
            f"model {source!r} does not exist; pass a torch.export archive, TorchScript, a package.module:factory "
            "(with --weights for a state_dict), a GGUF file or a Hugging Face folder"
        )
    with quiet(verbose):
        kind = sniff(path)
        if kind is Kind.EXPORT:
            program = load_export(path)
        elif kind is Kind.TORCHSCRIPT:
            inputs = _inputs_for(source, input_shapes, examples, what="TorchScript has no input shapes")
            program = convert_torchscript(path, inputs)
        elif kind in (Kind.HF_FOLDER, Kind.GGUF):
            return _from_hugging_face(path, kind, task, input_shapes, examples)
        elif kind is Kind.SAFETENSORS or state_dict_in(content := safe_content(path)) is not None:
            raise ModelLoadError(
                f"{source} holds weights only (a state_dict), not the architecture; name the module that takes them: "
                f"splitc compile pkg.module:Net --weights {source}"
            )
        elif content is not None:
            raise ModelLoadError(f"{source} holds a {type(content).__name__} without a model in it; pass a saved model or its weights")
        elif not trust_pickle:
            raise ModelLoadError(
                f"{source} is a pickled Python object, and unpickling runs whatever code it contains; pass --trust-pickle "
                "if you trust its author, or save a torch.export archive (torch.export.save) instead"
            )
        else:
            module = unpickle_module(path)
            program = _export(module, _inputs_for(source, input_shapes, examples), source)
    return LoadedModel(program, path.stem, str(path), sha256_file(path), examples)


def _from_factory(source: str, weights, input_shapes: Sequence[str], examples, verbose: bool) -> LoadedModel:
    module = _call_factory(source)
    if weights is not None:
        if not isinstance(module, torch.nn.Module):
            raise InputError(f"{source} returned an ExportedProgram, which carries its own weights; drop --weights")
        with quiet(verbose):
            _load_state_dict(module, Path(weights))
    inputs = _inputs_for(source, input_shapes, examples)
    program = module if isinstance(module, torch.export.ExportedProgram) else _export(module, inputs, source)
    return LoadedModel(program, source.split(":")[1], source, _program_digest(program, source), examples)


def _from_hugging_face(path: Path, kind: Kind, task: str | None, input_shapes: Sequence[str], examples) -> LoadedModel:
    from splitc.frontend.hf import export_hf_model

    program, inputs, digest = export_hf_model(path, kind, task, input_shapes, examples)
    return LoadedModel(program, path.stem if kind is Kind.GGUF else path.name, str(path), digest, inputs)


def _load_state_dict(module: torch.nn.Module, path: Path) -> None:
    """Load a state_dict file into `module`, naming the keys that do not fit."""
    if not path.exists():
        raise ModelLoadError(f"--weights {path} does not exist")
    state = load_weights(path)
    try:
        # assign: the module takes the loaded (memory-mapped) tensors instead of copying them in.
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches: torch's first line only names the module
        details = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelLoadError(f"--weights {path} does not fit the module: {details[1] if len(details) > 1 else first_line(exc)}") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing {_few(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_few(result.unexpected_keys)}")
    if problems:
        raise ModelLoadError(f"--weights {path} does not fit the module: {'; '.join(problems)}")


def _few(keys: Sequence[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _program_digest(program: torch.export.ExportedProgram, source: str) -> str:
    """sha256 of the weights and lifted constants as raw bytes (a uint8 view works for every dtype,
    bf16 included), tensor by tensor so a big model is never copied whole."""
    digest = hashlib.sha256()
    tensors = [*program.state_dict.values(), *(c for c in program.constants.values() if isinstance(c, torch.Tensor))]
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    digest.update(source.encode())
    return digest.hexdigest()


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


def _inputs_for(source: str, input_shapes: Sequence[str], examples, what: str = "") -> tuple[torch.Tensor, ...]:
    if examples is not None:
        return examples
    shapes = parse_input_shapes(input_shapes)
    if not shapes:
        why = what or "it is not an exported program"
        raise InputError(f"{source}: {why}, so splitc needs its inputs: pass --input-shape 1,3,224,224 or --example-input x.npy")
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

