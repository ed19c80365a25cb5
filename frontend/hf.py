"""Local Hugging Face models: a folder with `config.json` and safetensors weights, or a GGUF file
(dequantised by transformers' GGUF loader, which needs the `gguf` and `accelerate` packages).
Nothing is downloaded: `local_files_only` everywhere.

`load_hf_model` gives the module (and its tokenizer, when the folder or GGUF file has one) for any
caller, such as the decoder split; `export_hf_model` is what `splitc compile ./folder --task ...`
exports: the task's logits for example inputs drawn from the config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from splitc.core.errors import InputError, ModelLoadError, first_line
from splitc.frontend.formats import Kind

TASKS = {
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
}
# The head an architecture name ends with, for a folder given without --task.
_HEADS = {"ForImageClassification": "image-classification", "ForSequenceClassification": "text-classification",
          "ForCausalLM": "causal-lm"}
_TEXT_LENGTH = 16  # tokens in the example input of a text model


def load_hf_model(path: str | Path, task: str | None = None, gguf_file: str | None = None) -> tuple[torch.nn.Module, Any]:
    """A local Hugging Face model in eval mode, float32, and its tokenizer (None without one).

    `path`: a folder with config.json, or a .gguf file (then `gguf_file` is taken from it), or a
    folder holding `gguf_file`. `task`: one of TASKS; by default read from the config's
    architecture (a GGUF file: causal-lm)."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError("loading a Hugging Face model needs transformers: pip install 'splitc[hf]'") from exc
    folder, gguf_file = _locate(Path(path), gguf_file)
    task = task or ("causal-lm" if gguf_file else _task_from_config(folder))
    if task not in TASKS:
        raise InputError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    auto = getattr(transformers, TASKS[task])
    options: dict[str, Any] = {"local_files_only": True, **({"gguf_file": gguf_file} if gguf_file else {})}
    if gguf_file:
        _require("gguf", "accelerate")
    try:
        model = auto.from_pretrained(str(folder), dtype=torch.float32, **options)
    except Exception as exc:
        raise ModelLoadError(f"transformers cannot load {path} as {task} ({first_line(exc)})") from exc
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **options)
    except Exception:  # a vision model, or a folder saved without its tokenizer
        tokenizer = None
    return model.eval(), tokenizer


def export_hf_model(path: Path, kind: Kind, task: str | None, input_shapes: Sequence[str], examples):
    """(ExportedProgram of the task's logits, the example inputs, sha256 of the files read)."""
    from splitc.frontend.loader import _export, _inputs_for

    model, _ = load_hf_model(path, task, path.name if kind is Kind.GGUF else None)
    config = model.config
    if examples is None and not input_shapes:
        examples = _example_inputs(config, task or _task_of(model))
    inputs = _inputs_for(str(path), input_shapes, examples)
    if inputs and not inputs[0].is_floating_point() and getattr(config, "vocab_size", None):
        inputs = (inputs[0].clamp(0, config.vocab_size - 1), *inputs[1:])
    return _export(Logits(model), inputs, str(path)), inputs, _digest(path)


class Logits(torch.nn.Module):
    """The model's logits alone: its ModelOutput (and, for a decoder, its cache) left out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        options = {"use_cache": False} if getattr(self.model.config, "use_cache", None) is not None else {}
        return self.model(*inputs, **options).logits


def _locate(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    if path.is_file():
        return path.parent, path.name
    if gguf_file is None and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
    return path, gguf_file


def _task_from_config(folder: Path) -> str:
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}/config.json cannot be read ({first_line(exc)})") from exc
    for name in architectures:
        for head, task in _HEADS.items():
            if name.endswith(head):
                return task
    raise InputError(f"{folder}: config.json names no head splitc knows ({', '.join(architectures) or 'none'}); pass --task "
                     + "|".join(TASKS))


def _task_of(model: torch.nn.Module) -> str:
    name = type(model).__name__
    return next((task for head, task in _HEADS.items() if name.endswith(head)), "causal-lm")


def _example_inputs(config, task: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    if task == "image-classification":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else 224
        return (torch.randn(1, getattr(config, "num_channels", 3), size, size, generator=generator),)
    return (torch.randint(0, config.vocab_size, (1, _TEXT_LENGTH), generator=generator),)


def _digest(path: Path) -> str:
    """sha256 over the files that define the model (config, weights, GGUF), streamed."""
    from splitc.core.manifest import sha256_file

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix in (".safetensors", ".bin", ".gguf")))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{sha256_file(file)}".encode())
    return digest.hexdigest()


def _require(*packages: str) -> None:
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelLoadError(f"reading GGUF needs {' and '.join(missing)}: pip install {' '.join(missing)}")
