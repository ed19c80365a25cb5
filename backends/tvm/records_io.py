"""Sharing tuning databases between machines (`splitc tuning list/export/import`).

An archive (.tar.gz) holds, per target key, each workload's fastest records and the target and
origin files; importing merges it into this cache's database of the same key (workloads matched by
content, duplicates skipped), so records measured on one machine serve every machine with the same
target key (CPU model, core count, format).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from splitc.backends.tvm.database import (
    ORIGIN_FILE,
    RECORD_FILE,
    TARGET_FILE,
    WORKLOAD_FILE,
    database_stats,
    locked,
    read_database,
    read_json,
    read_origin,
    readable_copy,
    tuning_root,
    write_lines,
)
from splitc.core.errors import InputError, first_line

_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_SHARED_FILES = (WORKLOAD_FILE, RECORD_FILE, TARGET_FILE, ORIGIN_FILE)


@dataclass
class DatabaseInfo:
    key: str              # directory name under the tuning root
    target: dict[str, Any]
    origin: dict[str, Any]
    workloads: int
    records: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def list_databases(cache_dir: Path | None = None) -> list[DatabaseInfo]:
    """Every tuning database in the cache, by key."""
    root = tuning_root(cache_dir)
    found = []
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if directory.is_dir() and (directory / WORKLOAD_FILE).is_file():
            stats = database_stats(directory)
            found.append(DatabaseInfo(directory.name, read_json(directory / TARGET_FILE), read_origin(directory),
                                      stats["workloads"], stats["records"]))
    return found


def export_databases(out: Path, keys: list[str] | None = None, cache_dir: Path | None = None,
                     best: int | None = 1) -> list[DatabaseInfo]:
    """Write the databases (all, or those of `keys`) to a .tar.gz archive at `out`, atomically:
    per workload its `best` fastest records (None: every record), plus target and origin."""
    import tarfile

    available = {info.key: info for info in list_databases(cache_dir)}
    if not available:
        raise InputError(f"no tuning database in {tuning_root(cache_dir)}; run `splitc tune` first, or pass --cache-dir")
    chosen = list(available) if not keys else keys
    unknown = [k for k in chosen if k not in available]
    if unknown:
        raise InputError(f"no tuning database {', '.join(unknown)} in {tuning_root(cache_dir)}; "
                         f"known: {', '.join(available)} (see `splitc tuning list`)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    exported = []
    try:
        with tarfile.open(tmp, "w:gz") as archive:
            for key in chosen:
                directory = tuning_root(cache_dir) / key
                with readable_copy(directory, best) as snapshot:
                    assert snapshot is not None  # listed databases have workloads
                    for name in (WORKLOAD_FILE, RECORD_FILE):
                        archive.add(snapshot / name, arcname=f"{key}/{name}")
                    records = database_stats(snapshot)["records"]
                for name in (TARGET_FILE, ORIGIN_FILE):
                    if (directory / name).is_file():
                        archive.add(directory / name, arcname=f"{key}/{name}")
                exported.append(DatabaseInfo(key, available[key].target, available[key].origin, available[key].workloads, records))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return exported


@dataclass
class ImportResult:
    key: str
    new_workloads: int
    new_records: int
    known_records: int   # already in this cache's database
    origin: dict[str, Any]


def import_databases(archive_path: Path, cache_dir: Path | None = None) -> list[ImportResult]:
    """Merge every database in a `splitc tuning export` archive into this cache's database of the
    same key. Nothing but the known files under a valid key is read from the archive."""
    import tarfile

    archive_path = Path(archive_path)
    contents: dict[str, dict[str, str]] = {}
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            for member in archive.getmembers():
                key, _, name = member.name.partition("/")
                if member.isdir() and not name:
                    continue
                if not (member.isfile() and _KEY_PATTERN.fullmatch(key) and name in _SHARED_FILES):
                    raise InputError(f"{archive_path} holds {member.name!r}, which no tuning archive has; "
                                     "make archives with `splitc tuning export`")
                handle = archive.extractfile(member)
                contents.setdefault(key, {})[name] = handle.read().decode("utf-8", errors="replace") if handle else ""
    except (OSError, EOFError, tarfile.TarError) as exc:  # not a tar, or a truncated / corrupt one
        raise InputError(f"{archive_path} is not a tuning archive ({first_line(exc)}); make one with `splitc tuning export`") from exc
    if not contents:
        raise InputError(f"{archive_path} holds no tuning database; make one with `splitc tuning export`")
    results = []
    for key, files in sorted(contents.items()):
        if WORKLOAD_FILE not in files or RECORD_FILE not in files:
            raise InputError(f"{archive_path}: database {key} lacks {WORKLOAD_FILE} or {RECORD_FILE}; export it again")
        results.append(_merge_database(tuning_root(cache_dir) / key, files, archive_path))
    return results


def _canonical(line: str) -> str:
    return json.dumps(json.loads(line), sort_keys=True, separators=(",", ":"))


def _merge_database(directory: Path, files: dict[str, str], source: Path) -> ImportResult:
    with tempfile.TemporaryDirectory(prefix="splitc-tunedb-import-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        theirs_w, theirs_r, dropped = read_database(Path(tmp))
        theirs_origin = read_json(Path(tmp) / ORIGIN_FILE)
    if dropped:
        raise InputError(f"{source}: database {directory.name} has {dropped} malformed line(s); export it again")
    with locked(directory):
        ours_w, ours_r, _ = read_database(directory)
        position = {_canonical(line): i for i, line in enumerate(ours_w)}
        remap: dict[int, int] = {}
        new_w = []
        for i, line in enumerate(theirs_w):
            canonical = _canonical(line)
            if canonical not in position:
                position[canonical] = len(ours_w) + len(new_w)
                new_w.append(line)
            remap[i] = position[canonical]
        seen = {_canonical(line) for line in ours_r}
        new_r, known = [], 0
        for line in theirs_r:
            index, record = json.loads(line)
            moved = json.dumps([remap[index], record], separators=(",", ":"))
            if _canonical(moved) in seen:
                known += 1
                continue
            seen.add(_canonical(moved))
            new_r.append(moved)
        for name, lines in ((WORKLOAD_FILE, ours_w + new_w), (RECORD_FILE, ours_r + new_r)):
            write_lines(directory / name, lines)
        for name in (TARGET_FILE, ORIGIN_FILE):  # a new database takes the archive's description
            if files.get(name) and not (directory / name).is_file():
                (directory / name).write_text(files[name])
    return ImportResult(directory.name, len(new_w), len(new_r), known, theirs_origin)
