"""The variant index: `variants.json` of a variant directory (`splitc compile --variants K`).

A variant directory holds K ordinary bundles v0/ … v{K-1}/, each the same model split at another
place (device-only and cloud-only included), and `variants.json` indexing them: per variant its
directory, the model name its cloud part is served under (`splitc serve` serves each as
`<model>-v<k>` on one server), its cuts and placement, the bytes it sends and receives per request,
the planner's predicted compute, and the sha256 of its manifest. drivers/variants.py writes it;
this module reads and checks it, for the adaptive session (runtime/adaptive.py), the server and the
CLI.

Numpy and the stdlib only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitc.core.errors import BundleError
from splitc.core.manifest import MANIFEST_NAME, VARIANTS_NAME, Manifest, TensorSpec, read_manifest, sha256_file
from splitc.runtime.v2protocol import model_name_for

FORMAT = "splitc-variants"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Variant:
    index: int
    directory: str                      # relative to the variant directory
    model_name: str                     # the name its cloud part is served under
    cuts: tuple[str, ...]               # node names between consecutive active tiers
    placement: tuple[str | None, ...]   # per tier of the chain: the target running something, or None
    first_remote: int | None            # first partition the server runs; None: device-only
    bytes_up: int                       # tensors sent per request (0 when device-only)
    bytes_down: int                     # tensors received per request
    device_ms: float                    # the planner's prediction (analytic or profiled)
    remote_ms: float
    wins: dict[str, Any]                # where in the compile-time sweep it is the best variant
    manifest_sha256: str

    @property
    def device_only(self) -> bool:
        return self.first_remote is None


@dataclass(frozen=True)
class VariantIndex:
    path: Path
    model: dict[str, Any]
    link: dict[str, Any]                # the link the compile assumed: the estimator's prior
    default: int                        # the best variant on that link
    variants: tuple[Variant, ...]
    document: dict[str, Any] = field(repr=False, default_factory=dict)

    def bundle_path(self, index: int) -> Path:
        return self.path / self.variants[index].directory


def is_variant_dir(path: str | Path) -> bool:
    return (Path(path) / VARIANTS_NAME).is_file()


def read_variants(path: str | Path) -> VariantIndex:
    """Read and check `variants.json`: format, schema version, and every variant's manifest against
    its recorded sha256 (each bundle's own artifacts are checked when it is opened)."""
    root = Path(path)
    index_path = root / VARIANTS_NAME
    if not index_path.is_file():
        what = "a single bundle" if (root / MANIFEST_NAME).is_file() else "not a splitc output"
        raise BundleError(f"{root} has no {VARIANTS_NAME} ({what}); compile one with `splitc compile ... --variants K -o {root}`")
    try:
        document = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{index_path} cannot be read as JSON ({type(exc).__name__}); recompile with --variants") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BundleError(f"{index_path} is not a splitc variant index; recompile with `splitc compile --variants K`")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"variant index schema version {document.get('schema_version')!r} is not supported "
                          f"(this runtime reads {SCHEMA_VERSION}); recompile with a matching splitc")
    try:
        variants = tuple(_variant(i, entry) for i, entry in enumerate(document["variants"]))
        model, link, default = dict(document["model"]), dict(document.get("link") or {}), int(document.get("default", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{index_path} is malformed ({type(exc).__name__}: {exc}); recompile with --variants") from None
    if not variants or not 0 <= default < len(variants):
        raise BundleError(f"{index_path} lists no variants or a default outside them; recompile with --variants")
    for variant in variants:
        manifest = root / variant.directory / MANIFEST_NAME
        if not manifest.is_file():
            raise BundleError(f"variant {variant.index} ({variant.directory}/{MANIFEST_NAME}) is missing; recompile with --variants")
        if sha256_file(manifest) != variant.manifest_sha256:
            raise BundleError(f"{variant.directory}/{MANIFEST_NAME} differs from the sha256 in {VARIANTS_NAME}; "
                              "it was modified after compilation, refusing to use it")
    return VariantIndex(root, model, link, default, variants, document)


def _variant(position: int, entry: Mapping[str, Any]) -> Variant:
    index = int(entry["index"])
    if index != position:
        raise ValueError(f"variant {position} is numbered {index}")
    directory = str(entry["directory"])
    if "/" in directory or "\\" in directory or directory in ("", ".", ".."):
        raise ValueError(f"variant directory {directory!r} is not a plain name")
    first = entry.get("first_remote")
    predicted = entry.get("predicted_ms") or {}
    return Variant(
        index=index, directory=directory, model_name=str(entry["model_name"]),
        cuts=tuple(entry.get("cuts") or ()), placement=tuple(entry.get("placement") or ()),
        first_remote=None if first is None else int(first),
        bytes_up=int(entry.get("bytes_up") or 0), bytes_down=int(entry.get("bytes_down") or 0),
        device_ms=float(predicted.get("device", 0.0)), remote_ms=float(predicted.get("remote", 0.0)),
        wins=dict(entry.get("wins") or {}), manifest_sha256=str(entry["manifest_sha256"]),
    )


def variant_model_name(model: str, index: int) -> str:
    return f"{model_name_for(model)}-v{index}"


def served_bytes(manifest: Manifest, first_remote: int | None) -> tuple[int, int]:
    """Tensor bytes sent and received per request by a variant whose server starts at `first_remote`."""
    if first_remote is None:
        return 0, 0
    sent: Sequence[TensorSpec] = manifest.inputs if first_remote == 0 else manifest.boundaries[first_remote - 1]
    return sum(t.nbytes for t in sent), sum(t.nbytes for t in manifest.outputs)


def local_bundle_path(path: str | Path) -> Path:
    """What runs on one host for `path`: the bundle itself, or a variant directory's variant 0
    (every variant computes the same model; v0 sends the least, so it is the local one)."""
    return read_variants(path).bundle_path(0) if is_variant_dir(path) else Path(path)


def read_any_manifest(path: str | Path) -> Manifest:
    """The manifest of a bundle, or of a variant directory's variant 0 (all take the same inputs)."""
    return read_manifest(local_bundle_path(path))


__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "VARIANTS_NAME",
    "Variant",
    "VariantIndex",
    "is_variant_dir",
    "local_bundle_path",
    "read_any_manifest",
    "read_variants",
    "served_bytes",
    "variant_model_name",
]
