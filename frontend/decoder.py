"""Load a causal decoder LM and its tokenizer from what the user has.

Three sources:
  * a GGUF file (`model.gguf`): transformers dequantises it to float32 (needs `gguf` and `accelerate`);
  * a Hugging Face folder (config.json + weights, tokenizer files beside them);
  * `package.module:factory`, returning a causal LM, or a (model, tokenizer) pair.

The tokenizer, when there is one, is saved with `save_pretrained` into a folder the compiler copies
into the bundle: tokenizer.json for the `tokenizers` package and tokenizer_config.json, which carries
the chat template.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitc.core.errors import InputError, ModelLoadError, first_line
from splitc.core.manifest import sha256_file

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class LoadedDecoder:
    model: nn.Module          # a transformers causal LM, eval mode, float32
    tokenizer: Any | None     # a transformers fast tokenizer, or None (token ids only)
    name: str
    source: str
    sha256: str               # of the weights file, or of the parameters for a factory


def is_decoder_source(source: str, *, has_input_shapes: bool) -> bool:
    """Whether `splitc compile` should take `source` as a decoder: a GGUF file, a folder with a
    config.json, or a factory given without input shapes (other factories need --input-shape)."""
    path = Path(source)
    if path.suffix == ".gguf":
        return True
    if path.is_dir() and (path / "config.json").is_file():
        return True
    return bool(_FACTORY.match(source)) and not has_input_shapes


def load_decoder(source: str) -> LoadedDecoder:
    path = Path(source)
    if path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        return _load_folder(path)
    if _FACTORY.match(source):
        return _load_factory(source)
    raise ModelLoadError(f"decoder source {source!r} is neither a .gguf file, a Hugging Face folder nor package.module:factory")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(f"loading a decoder needs transformers ({exc}); pip install 'splitc[decoder]'") from exc
    transformers.logging.set_verbosity_error()
    return transformers


def _load_gguf(path: Path) -> LoadedDecoder:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF needs the gguf and accelerate packages ({first_line(exc)}); pip install 'splitc[decoder]'") from exc
    except Exception as exc:
        raise ModelLoadError(f"transformers cannot load {path.name} as a causal LM: {first_line(exc)}") from exc
    return LoadedDecoder(model.eval(), tokenizer, path.stem, str(path), sha256_file(path))


def _load_folder(path: Path) -> LoadedDecoder:
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"transformers cannot load {path} as a causal LM: {first_line(exc)}") from exc
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise ModelLoadError(f"the tokenizer in {path} cannot be loaded: {first_line(exc)}") from exc
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    digest = hashlib.sha256(b"".join(sha256_file(w).encode() for w in weights)).hexdigest()
    return LoadedDecoder(model.eval(), tokenizer, path.name, str(path), digest)


def _load_factory(spec: str) -> LoadedDecoder:
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")  # factories in the working directory, as `python -m` finds them
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
        made = target()
    except Exception as exc:
        raise ModelLoadError(f"factory {spec} failed: {first_line(exc)}") from exc
    model, tokenizer = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, nn.Module) or not hasattr(model, "lm_head") or not hasattr(model, "config"):
        # Not a decoder: what is missing is the input shape an ordinary model needs.
        raise InputError(f"factory {spec} returned {type(model).__name__}, not a causal LM: pass --input-shape "
                         "(or --example-input) to export it as an ordinary model")
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return LoadedDecoder(model.float().eval(), tokenizer, attr.split(".")[-1], spec, digest.hexdigest())


def save_tokenizer(tokenizer: Any, folder: Path) -> list[Path]:
    """Write the tokenizer files the runtime reads (tokenizer.json, tokenizer_config.json) into
    `folder`; refuses a slow tokenizer, which has no tokenizer.json."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"the model's tokenizer ({type(tokenizer).__name__}) has no fast form; the runtime reads tokenizer.json")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name in ("tokenizer.json", "tokenizer_config.json"):
            source = Path(tmp) / name
            if source.is_file():
                target = folder / name
                target.write_bytes(source.read_bytes())
                written.append(target)
    if not any(p.name == "tokenizer.json" for p in written):
        raise ModelLoadError("the model's tokenizer did not write a tokenizer.json; the runtime cannot read it")
    return written
