"""The tuning record database: one MetaSchedule JSONDatabase per target key, in the cache.

Layout (in the cache directory of backends/emulation.py):

    $SPLITC_CACHE/tuning/<target-key>/
        database_workload.json         MetaSchedule JSONDatabase: one workload (TIR function) a line
        database_tuning_record.json    one measured schedule a line, appended as it is measured
        target.json                    the TVM target the records were measured for
        origin.json                    where they were measured: this host, or a device over RPC
        logs/                          MetaSchedule's per-task logs of the last tuning run
        .lock                          held while a tuning run (or an import) writes
        .best-1.jsonl                  the best-records index (`BestRecords`), rebuilt when the files change
    $SPLITC_CACHE/tuning/<target-key>--host-tuned/
        the same files: schedules tuned and timed on this host for *its* target, re-keyed for a
        target of another ISA (`splitc tune --target rpi4 --from-host`); origin.json says so

Records are keyed by workload (the structural hash of a fused TIR function: operator + shapes, not
weights) and by target (the directory, backends/tvm/target_keys.py), so any model with the same
operator shapes reuses them.

A tuning run appends to the files as it measures and may be stopped mid-line: every reader here
takes whole lines only, up to the first bad one, and `repair_database` rewrites the files so.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from splitc.backends.tvm.target_keys import target_key
from splitc.core.errors import InputError

TUNING_SUBDIR = "tuning"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
ORIGIN_FILE = "origin.json"
TARGET_FILE = "target.json"
HOST_TUNED_SUFFIX = "--host-tuned"
FAILED_RUN = 1e10  # MetaSchedule's stub run time of a failed measurement


# ------------------------------------------------------------------------------- where databases live


def tuning_root(cache_dir: Path | None = None) -> Path:
    from splitc.backends.emulation import cache_subdir

    return cache_subdir(TUNING_SUBDIR, cache_dir)


def database_dir(target_json: dict[str, Any], cache_dir: Path | None = None) -> Path:
    return tuning_root(cache_dir) / target_key(target_json)


def host_tuned_dir(target_json: dict[str, Any], cache_dir: Path | None = None) -> Path:
    """Schedules tuned on this host, re-keyed for `target_json` (another ISA)."""
    return tuning_root(cache_dir) / (target_key(target_json) + HOST_TUNED_SUFFIX)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_origin(directory: Path) -> dict[str, Any]:
    return read_json(directory / ORIGIN_FILE)


def write_origin(directory: Path, origin: dict[str, Any]) -> None:
    tmp = directory / f".{ORIGIN_FILE}.tmp"
    tmp.write_text(json.dumps(origin, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / ORIGIN_FILE)


def schedules_label(directory: Path, default: str) -> str:
    """How the database's schedules were obtained, in words, from the point of view of this host:
    records imported from another machine say which one instead of "this host"."""
    origin = read_origin(directory)
    label = str(origin.get("schedules") or default)
    host = origin.get("host")
    return label.replace("this host", f"host {host}") if host and host != socket.gethostname() else label


# ------------------------------------------------------------------------------- the files


def _valid_lines(text: str, check: Callable[[Any], bool]) -> tuple[list[str], int]:
    """Lines of `text` that parse as JSON and pass `check`, up to the first bad one; and the count
    of lines dropped (a line cut short by a kill, and whatever follows it)."""
    lines = text.splitlines()
    good: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            break
        if not check(value):
            break
        good.append(line)
    return good, len([ln for ln in lines if ln.strip()]) - len(good)


def _is_workload(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2


def _parse_database(workload_text: str, record_text: str) -> tuple[list[str], list[str], int]:
    workloads, dropped_w = _valid_lines(workload_text, _is_workload)
    n = len(workloads)
    records, dropped_r = _valid_lines(
        record_text, lambda v: isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and 0 <= v[0] < n
    )
    return workloads, records, dropped_w + dropped_r


def read_database(directory: Path) -> tuple[list[str], list[str], int]:
    texts = [(directory / name).read_text(errors="replace") if (directory / name).is_file() else ""
             for name in (WORKLOAD_FILE, RECORD_FILE)]
    return _parse_database(*texts)


def repair_database(directory: Path) -> int:
    """Rewrite the database files keeping only whole lines (atomically); return lines dropped."""
    workloads, records, dropped = read_database(directory)
    if dropped:
        for name, lines in ((WORKLOAD_FILE, workloads), (RECORD_FILE, records)):
            write_lines(directory / name, lines)
    return dropped


def write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def rewrite_run_times(directory: Path, records: list[str], times: dict[int, list[float]],
                      factors: dict[int, float]) -> int:
    """Rewrite the record file from `records` (the valid lines `read_database` returned), atomically:
    the record at position p gets the run times `times[p]`; every other record of a workload index
    in `factors` is multiplied by its factor. Failed measurements keep their marker. Returns how
    many records changed."""
    changed, lines = 0, []
    for position, line in enumerate(records):
        index, record = json.loads(line)
        runs = record[1] if isinstance(record, list) and len(record) > 1 else None
        if runs and all(float(v) < FAILED_RUN for v in runs) and (position in times or index in factors):
            record[1] = times[position] if position in times else [float(v) * factors[index] for v in runs]
            line = json.dumps([index, record], separators=(",", ":"))
            changed += 1
        lines.append(line)
    if changed:
        write_lines(directory / RECORD_FILE, lines)
    return changed


def database_stats(directory: Path) -> dict[str, int]:
    workloads, records, _ = read_database(directory)
    return {"workloads": len(workloads), "records": len(records)}


def ranked_records(records: list[str]) -> dict[int, list[tuple[float, int]]]:
    """Per workload index, its measured records as (mean run time, position in `records`), fastest
    first; failed measurements left out."""
    ranked: dict[int, list[tuple[float, int]]] = {}
    for position, line in enumerate(records):
        index, record = json.loads(line)
        runs = [float(v) for v in (record[1] or [])] if isinstance(record, list) and len(record) > 1 else []
        if not runs or any(v >= FAILED_RUN for v in runs):
            continue
        ranked.setdefault(index, []).append((sum(runs) / len(runs), position))
    return {index: sorted(entries) for index, entries in ranked.items()}


@contextlib.contextmanager
def readable_copy(directory: Path, best: int | None = 1) -> Iterator[Path | None]:
    """A consistent snapshot of the database (whole lines only) in a temporary directory, so an
    export can read while a tuning run appends; with `best`, only each workload's `best` fastest
    records. Yields None when there is no database."""
    if best is None:
        workloads, records, _ = read_database(directory)
    else:
        workloads, records = _read_best(directory, best)
    if not workloads:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="splitc-tunedb-") as tmp:
        _write_database(Path(tmp), workloads, records)
        yield Path(tmp)


def _write_database(directory: Path, workloads: list[str], records: list[str]) -> None:
    (directory / WORKLOAD_FILE).write_text("".join(line + "\n" for line in workloads))
    (directory / RECORD_FILE).write_text("".join(line + "\n" for line in records))


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another `splitc tune` is writing {directory}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_database(directory: Path):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(str(directory / WORKLOAD_FILE), str(directory / RECORD_FILE), allow_missing=True)


def is_untuned(record) -> bool:
    """A record whose schedule changes nothing (one `get_sblock("root")`, the least MetaSchedule
    accepts as a valid record): the task's untuned code, measured as a baseline."""
    return all(inst.kind.name == "GetSBlock" for inst in record.trace.insts)


def mean_run_time(run_secs) -> float:
    """A record's mean run time in seconds; infinite when it has none."""
    values = [float(v) for v in (run_secs or [])]
    return sum(values) / len(values) if values else float("inf")


# ------------------------------------------------------------------------------- the best-records index


def _best_lines(records: list[str], keep: int) -> list[str]:
    """The `keep` fastest records of each workload, in file order. MetaSchedule replays every
    record's trace when it opens a database (~14 ms each: 13 s for a 15-minute ResNet-18 run),
    while applying a database reads only each workload's best record."""
    chosen = sorted(position for entries in ranked_records(records).values() for _, position in entries[:keep])
    return [records[position] for position in chosen]


def _best_index(directory: Path, best: int) -> Path:
    return directory / f".best-{best}.jsonl"


def _read_best(directory: Path, best: int) -> tuple[list[str], list[str]]:
    """The database's workloads and each workload's `best` fastest records. Ranking parses every
    record (25 MB, 0.3 s after a 15-minute ResNet-18 run), in every compile; the result is kept
    beside the database in an index file, keyed by the SHA-256 of both database files (15 ms), so
    a compile of an unchanged database parses only the index."""
    texts = {}
    for name in (WORKLOAD_FILE, RECORD_FILE):
        try:
            texts[name] = (directory / name).read_bytes()
        except FileNotFoundError:
            texts[name] = b""
    source = {name: hashlib.sha256(text).hexdigest() for name, text in texts.items()}
    index = _best_index(directory, best)
    try:
        header, *records = index.read_text().splitlines()
        known = json.loads(header)
        if known["source"] == source:
            return _valid_lines(texts[WORKLOAD_FILE].decode("utf-8", errors="replace"), _is_workload)[0], records
    except (OSError, ValueError, KeyError, TypeError):  # no index yet, or a stale or damaged one: rank again
        pass
    workloads, records, _ = _parse_database(*(text.decode("utf-8", errors="replace") for text in texts.values()))
    records = _best_lines(records, best)
    if workloads:
        tmp = None
        try:
            handle, tmp = tempfile.mkstemp(prefix=".best-", suffix=".tmp", dir=directory)
            with os.fdopen(handle, "w") as out:
                out.write("".join(line + "\n" for line in [json.dumps({"source": source}), *records]))
            os.chmod(tmp, (directory / RECORD_FILE).stat().st_mode & 0o777)  # readable by whoever reads the database
            os.replace(tmp, index)
        except OSError:  # a database this user may read but not write: rank again next time
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    return workloads, records


class BestRecords:
    """Each workload's best record in a database (read through its index, `_read_best`), from which
    a MetaSchedule database is opened for the workloads of given tasks only. Opening parses every
    workload and record it is handed (~3 ms a workload): a database shared by many models would
    otherwise make every compile pay for all of them."""

    def __init__(self, directory: Path):
        self.workloads, self.records = _read_best(directory, 1)

    def __bool__(self) -> bool:
        return bool(self.workloads)

    def open(self, tasks) -> Any:
        """A database of the best record of each of `tasks`' workloads that has one; None when
        none has. JSONDatabase reads its files when it opens and queries from memory, so the
        temporary copy it opens is gone when this returns."""
        from tvm_ffi import structural_hash

        # MetaSchedule files a workload under the structural hash of its module (JSONDatabase's
        # default "structural" equality), the first field of its line.
        wanted = {str(structural_hash(task.dispatched[0])) for task in tasks}
        renumbered: dict[int, int] = {}
        for index, line in enumerate(self.workloads):
            if json.loads(line[:line.index(",")] + "]")[0] in wanted:
                renumbered[index] = len(renumbered)
        if not renumbered:
            return None
        records = []
        for line in self.records:
            head, rest = line.split(",", 1)
            index = int(head.lstrip("[ "))
            if index in renumbered:
                records.append(f"[{renumbered[index]},{rest}")
        with tempfile.TemporaryDirectory(prefix="splitc-tunedb-") as tmp:
            _write_database(Path(tmp), [self.workloads[i] for i in renumbered], records)
            return open_database(Path(tmp))
