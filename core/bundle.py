"""Writing bundles atomically.

Everything is written into a staging directory beside the output path and renamed into place only
when complete, so a failed or interrupted compile leaves nothing at the output path (and an older
bundle there survives until the new one is whole).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from splitc.core.errors import BundleError
from splitc.core.manifest import MANIFEST_NAME, VARIANTS_NAME, Artifact, Manifest, sha256_file


def check_output_path(out: Path) -> None:
    """Refuse to replace anything that is not a splitc bundle or variant directory (a user's
    directory, a file)."""
    ours = out.is_dir() and ((out / MANIFEST_NAME).is_file() or (out / VARIANTS_NAME).is_file())
    if out.exists() and not ours:
        raise BundleError(f"{out} exists and is not a splitc bundle; choose another -o path or remove it")


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces `out`, on failure it vanishes."""
    out = Path(out)
    check_output_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    try:
        yield staging
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rmdir(backup)
    os.rename(out, backup)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def record_artifact(bundle_dir: Path, path: Path, **fields) -> Artifact:
    """Describe a file already placed inside the bundle directory."""
    return Artifact(
        path=path.relative_to(bundle_dir).as_posix(),
        sha256=sha256_file(path),
        size=path.stat().st_size,
        **fields,
    )


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    path = bundle_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return path


@contextlib.contextmanager
def rewritten_bundle(bundle_dir: Path) -> Iterator[Path]:
    """Yield a staging copy of an existing bundle; on success the copy atomically replaces it."""
    bundle_dir = Path(bundle_dir)
    with staged_directory(bundle_dir) as staging:
        shutil.copytree(bundle_dir, staging, dirs_exist_ok=True)
        yield staging
