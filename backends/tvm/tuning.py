"""MetaSchedule tuning for the TVM backend, with a tuning database that outlives one compile.

Layout (one JSON database per target, in the cache directory of backends/emulation.py):

    $SPLITC_CACHE/tuning/<target-key>/
        database_workload.json         MetaSchedule JSONDatabase: one workload (TIR function) a line
        database_tuning_record.json    one measured schedule a line, appended as it is measured
        target.json                    the TVM target the records were measured for
        origin.json                    where they were measured: this host, or a device over RPC
        logs/                          MetaSchedule's per-task logs of the last tuning run
        .lock                          held while a tuning run (or an import) writes
    $SPLITC_CACHE/tuning/<target-key>--host-tuned/
        the same files: schedules tuned and timed on this host for *its* target, re-keyed for a
        target of another ISA (`splitc tune --target rpi4 --from-host`); origin.json says so

Sharing (`splitc tuning export/import`): an archive (.tar.gz) holds, per target key, each
workload's fastest records and the target and origin files; importing merges it into this cache's
database of the same key (workloads matched by content, duplicates skipped), so records measured
on one machine serve every machine with the same target key (CPU model, core count, format).

Records are keyed by workload (the structural hash of a fused TIR function: operator + shapes, not
weights) and by target (the directory), so any model with the same operator shapes reuses them.

What is tuned (`prepare`) is the partition after splitc's pre-tuning rewrites
(backends/tvm/relax_rewrites.py): batch norm folded into the preceding convolution's weights and bias,
zero padding folded into the convolution, clip written as max/min, and, on CPU targets, 2-D
convolutions converted to NHWC (channels innermost, so the output-channel loop vectorizes for any
spatial size), weight transposes folded in numpy, and 3x3 stride-1 convolutions rewritten as
Winograd (backends/tvm/winograd.py; SPLITC_WINOGRAD=0: not). Then
TVM's zero pipeline (legalize, fuse) and, by default, weight pre-packing (`cpu_weight_prepack`:
layout-free weight buffers whose layout each schedule chooses, rewritten once at compile time by
constant folding, since splitc binds weights as constants).

Best of tuned and untuned, per task: before searching, a tuning run measures every task's untuned
code and stores it as a record with an empty schedule, and, for 1x1 convolutions, splitc's own
schedules (backends/tvm/pointwise.py, one per tile shape) as more records. MetaSchedule applies the
fastest record of each task, so a task whose tuned schedules are all slower than its untuned code
stays untuned.

Tuning runs in a child process in its own session. The parent enforces the wall-clock budget and
turns Ctrl-C into stopping the child; MetaSchedule appends each measured batch to the database as it
goes, and `repair_database` drops a line cut short by the stop, so an interrupted run leaves a
readable database with every finished record. The child also stops itself at the deadline between
measurement batches (see _DeadlineSearch), so a budgeted run normally ends cleanly.

Measuring: on this host (LocalRunner) for targets of this host's ISA, or on the device through TVM
RPC (`rpc="HOST:PORT"` of `python -m tvm.exec.rpc_server`, or a tracker with `rpc_key`), candidates
cross-compiled into shared libraries here. Timings from the build host are never stored for a
target of another ISA except in the `--host-tuned` database, which says what it is. Every candidate
is timed with its weights and output flushed from the caches (as they arrive in a whole model) and
with the thread count the deployed build runs with.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from splitc.core.errors import (
    BackendError,
    InputError,
    TargetError,
    ToolchainError,
    first_line,
)

TUNING_SUBDIR = "tuning"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
ORIGIN_FILE = "origin.json"
TARGET_FILE = "target.json"
RETIMED_FILE = "retimed.json"  # in a run's temporary directory: the child's re-timing factors, for the report
FINALISTS_FILE = "finalists.json"  # in a run's temporary directory: what the final re-timing changed, for the report
FINALISTS = 3     # records per task timed again, side by side, after the search
FINAL_ROUNDS = 3  # rounds of that re-timing (each candidate once per round)
HOST_TUNED_SUFFIX = "--host-tuned"
_FORMAT = 3  # bump when the key, the pre-tuning passes or the measurement change (old records would not match or compare)
_DIRECT_KEY = "splitc-direct"  # RPCConfig key meaning "connect to the server itself, no tracker"


# ------------------------------------------------------------------------------- target and paths


def host_arch_name() -> str:
    from splitc.runtime.executors import host_arch

    return host_arch()


def host_target_json() -> dict[str, Any]:
    """This build host's own CPU target (what the builtin x86 target resolves to on an x86 host)."""
    return {"kind": "llvm", "mtriple": f"{host_arch_name()}-linux-gnu", "mcpu": "host"}


def target_arch(target_json: dict[str, Any]) -> str:
    triple = str(target_json.get("mtriple") or "")
    return triple.split("-")[0] if triple else host_arch_name()


def resolve_target(target_json: dict[str, Any]) -> dict[str, Any]:
    """The target JSON with `mcpu = "host"` replaced by this machine's CPU name (LLVM's), and
    `num-cores` filled in with this host's core count when the target is this host's ISA."""
    resolved = dict(target_json)
    if resolved.get("mcpu") == "host":
        from tvm.target.codegen import llvm_get_system_cpu

        resolved["mcpu"] = str(llvm_get_system_cpu())
        resolved.setdefault("num-cores", _physical_cores())
    return resolved


def _physical_cores() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return int(os.cpu_count() or 1)


def target_key(target_json: dict[str, Any]) -> str:
    """A directory name for a target: readable prefix + hash of the canonical JSON."""
    canon = json.dumps({"format": _FORMAT, **target_json}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canon.encode()).hexdigest()[:10]
    parts = [str(target_json.get("kind", "llvm")), str(target_json.get("mtriple", "")).split("-")[0],
             str(target_json.get("mcpu", "generic")), f"{target_json.get('num-cores', 'n')}c"]
    return "-".join(p for p in parts if p) + "-" + digest


def tuning_root(cache_dir: Path | None = None) -> Path:
    from splitc.backends.emulation import cache_subdir

    return cache_subdir(TUNING_SUBDIR, cache_dir)


def database_dir(target_json: dict[str, Any], cache_dir: Path | None = None) -> Path:
    return tuning_root(cache_dir) / target_key(target_json)


def host_tuned_dir(target_json: dict[str, Any], cache_dir: Path | None = None) -> Path:
    """Schedules tuned on this host, re-keyed for `target_json` (another ISA)."""
    return tuning_root(cache_dir) / (target_key(target_json) + HOST_TUNED_SUFFIX)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_origin(directory: Path) -> dict[str, Any]:
    return _read_json(directory / ORIGIN_FILE)


def schedules_label(directory: Path, default: str) -> str:
    """How the database's schedules were obtained, in words, from the point of view of this host:
    records imported from another machine say which one instead of "this host"."""
    origin = read_origin(directory)
    label = str(origin.get("schedules") or default)
    host = origin.get("host")
    return label.replace("this host", f"host {host}") if host and host != socket.gethostname() else label


def vector_bits(target_json: dict[str, Any]) -> int | None:
    """The width in bits of the widest vectors the target's CPU runs, from its features: 512 with
    AVX-512, 256 with AVX, 128 with SSE2 or NEON (SVE: its minimum); None when unknown. What
    splitc's own schedules vectorize by. LLVM's preference for 256-bit vectors on Intel's AVX-512
    CPUs (`prefer-256-bit`) only steers its auto-vectorizer: the explicit 16-lane vectors of a TIR
    schedule still become 512-bit instructions, as MetaSchedule's records already do there, and on an
    Emerald Rapids host 16 lanes ran MobileNetV2's 1x1 convolutions 1.5-2x faster than 8 (depthwise
    layers, bound by memory, the same). TVM's `llvm_get_vector_width` is not used: it answers 512
    for every x86 CPU, AVX2-only ones included."""
    if target_json.get("kind") != "llvm":
        return None
    try:
        import tvm
        from tvm.target.codegen import llvm_get_cpu_features

        features = set(llvm_get_cpu_features(tvm.target.Target(target_json)))
    except Exception:  # noqa: BLE001 - an LLVM without the target's backend, or an older TVM: width unknown
        return None
    if "avx512f" in features:
        return 512
    if "avx" in features:
        return 256
    if features & {"sse2", "neon", "sve"}:
        return 128
    return None


# ------------------------------------------------------------------------------- database files


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


def _read_database(directory: Path) -> tuple[list[str], list[str], int]:
    texts = [(directory / name).read_text(errors="replace") if (directory / name).is_file() else ""
             for name in (WORKLOAD_FILE, RECORD_FILE)]
    return _parse_database(*texts)


def repair_database(directory: Path) -> int:
    """Rewrite the database files keeping only whole lines (atomically); return lines dropped."""
    workloads, records, dropped = _read_database(directory)
    if dropped:
        for name, lines in ((WORKLOAD_FILE, workloads), (RECORD_FILE, records)):
            _write_lines(directory / name, lines)
    return dropped


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def _rewrite_run_times(directory: Path, records: list[str], times: dict[int, list[float]],
                       factors: dict[int, float]) -> int:
    """Rewrite the record file from `records` (the valid lines `_read_database` returned), atomically:
    the record at position p gets the run times `times[p]`; every other record of a workload index
    in `factors` is multiplied by its factor. Failed measurements keep their marker. Returns how
    many records changed."""
    changed, lines = 0, []
    for position, line in enumerate(records):
        index, record = json.loads(line)
        runs = record[1] if isinstance(record, list) and len(record) > 1 else None
        if runs and all(float(v) < _FAILED_RUN for v in runs) and (position in times or index in factors):
            record[1] = times[position] if position in times else [float(v) * factors[index] for v in runs]
            line = json.dumps([index, record], separators=(",", ":"))
            changed += 1
        lines.append(line)
    if changed:
        _write_lines(directory / RECORD_FILE, lines)
    return changed


def database_stats(directory: Path) -> dict[str, int]:
    workloads, records, _ = _read_database(directory)
    return {"workloads": len(workloads), "records": len(records)}


_FAILED_RUN = 1e10  # MetaSchedule's stub run time of a failed measurement


def _ranked(records: list[str]) -> dict[int, list[tuple[float, int]]]:
    """Per workload index, its measured records as (mean run time, position in `records`), fastest
    first; failed measurements left out."""
    ranked: dict[int, list[tuple[float, int]]] = {}
    for position, line in enumerate(records):
        index, record = json.loads(line)
        runs = [float(v) for v in (record[1] or [])] if isinstance(record, list) and len(record) > 1 else []
        if not runs or any(v >= _FAILED_RUN for v in runs):
            continue
        ranked.setdefault(index, []).append((sum(runs) / len(runs), position))
    return {index: sorted(entries) for index, entries in ranked.items()}


def _best_lines(records: list[str], keep: int) -> list[str]:
    """The `keep` fastest records of each workload, in file order. MetaSchedule replays every
    record's trace when it opens a database (~14 ms each: 13 s for a 15-minute ResNet-18 run),
    while applying a database reads only each workload's best record."""
    chosen = sorted(position for entries in _ranked(records).values() for _, position in entries[:keep])
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


@contextlib.contextmanager
def readable_copy(directory: Path, best: int | None = 1) -> Iterator[Path | None]:
    """A consistent snapshot of the database (whole lines only) in a temporary directory, so an
    export can read while a tuning run appends; with `best`, only each workload's `best` fastest
    records. Yields None when there is no database."""
    if best is None:
        workloads, records, _ = _read_database(directory)
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
def _locked(directory: Path) -> Iterator[None]:
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


def _untuned_trace(func_mod):
    import tvm

    schedule = tvm.s_tir.Schedule(func_mod)
    schedule.get_sblock("root")
    return schedule.trace


# ------------------------------------------------------------------------------- sharing

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
            found.append(DatabaseInfo(directory.name, _read_json(directory / TARGET_FILE), read_origin(directory),
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
        theirs_w, theirs_r, dropped = _read_database(Path(tmp))
        theirs_origin = _read_json(Path(tmp) / ORIGIN_FILE)
    if dropped:
        raise InputError(f"{source}: database {directory.name} has {dropped} malformed line(s); export it again")
    with _locked(directory):
        ours_w, ours_r, _ = _read_database(directory)
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
            _write_lines(directory / name, lines)
        for name in (TARGET_FILE, ORIGIN_FILE):  # a new database takes the archive's description
            if files.get(name) and not (directory / name).is_file():
                (directory / name).write_text(files[name])
    return ImportResult(directory.name, len(new_w), len(new_r), known, theirs_origin)


# ------------------------------------------------------------------------------- relax pipeline


def check_tuning_deps() -> None:
    missing = []
    for name in ("xgboost", "psutil"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ToolchainError(f"MetaSchedule tuning needs {' and '.join(missing)}; pip install {' '.join(missing)} (or pip install -e '.[compiler]')")


def winograd_enabled() -> bool:
    """Whether 3x3 convolutions become Winograd on CPU targets (backends/tvm/winograd.py): yes, unless
    SPLITC_WINOGRAD=0 (direct convolutions only: results closer to PyTorch's, and the workloads
    of databases tuned before Winograd existed)."""
    return os.environ.get("SPLITC_WINOGRAD", "1") != "0"


def prepare(mod, target_json: dict[str, Any], prepack: bool, winograd: bool | None = None):
    """The pre-tuning passes: what tasks are extracted from and what the database is applied to.
    Deterministic for a given module, target and variant, so tune and compile see the same
    workloads. `winograd` None: `winograd_enabled()`."""
    import tvm
    from tvm import relax

    from splitc.backends.tvm.relax_rewrites import constant_permute_folding, pre_tuning_rewrites

    transform = relax.transform
    head = [pre_tuning_rewrites(), transform.CanonicalizeBindings(), transform.DecomposeOpsForInference(),
            transform.CanonicalizeBindings()]
    nhwc = [transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}), transform.Normalize(),
            constant_permute_folding(), transform.CanonicalizeBindings()]
    if winograd_enabled() if winograd is None else winograd:
        from splitc.backends.tvm.winograd import rewrite_winograd

        nhwc += [rewrite_winograd(vector_bits(target_json))]
    tail = [relax.get_pipeline("zero")] + ([transform.AttachAttrLayoutFreeBuffers()] if prepack else [])
    cpu = str(target_json.get("kind", "llvm")) == "llvm"
    if cpu:
        from splitc.backends.tvm.depthwise import schedule_depthwise_functions

        tail += [schedule_depthwise_functions(vector_bits(target_json))]
    with tvm.target.Target(target_json):
        mod = tvm.transform.Sequential(head)(mod)
        if cpu:
            try:
                mod = tvm.transform.Sequential(nhwc)(mod)
            except Exception:  # noqa: BLE001, S110 - an operator ConvertLayout cannot handle: tune the NCHW graph (same choice every time)
                pass
        return tvm.transform.Sequential(tail)(mod)


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


def apply_database(prepared, target_json: dict[str, Any], prepack: bool, database):
    """Replace every TIR function that has a record in `database` (from `best_variant`) with its best
    schedule; with pre-packing, the weight layout rewrites are split out and folded into the
    (constant) weights."""
    import tvm
    from tvm import relax

    transform = relax.transform
    with tvm.target.Target(target_json), database:
        passes = [transform.MetaScheduleApplyDatabase()]
        if prepack:
            passes += [transform.SplitLayoutRewritePreproc(), transform.LiftTransformParams(), _fold_weight_prepack(),
                       transform.CanonicalizeBindings(), transform.FoldConstant(), transform.DeadCodeElimination()]
        return tvm.transform.Sequential(passes)(prepared)


def _fold_weight_prepack():
    """Run every `*_weight_prepack` layout rewrite of constant weights once, here, and bind the
    results as constants: what FoldConstant does, without building a library per function (~1.5 s
    of a ResNet-18 compile): tile copies as numpy reshapes, any other rewrite built for this host.
    Pure data movement, so running them here gives the device's layout too (cross targets).
    ResNet-18: 0.43 s with every rewrite compiled, 0.09 s with numpy (all 16 are tile copies)."""
    import numpy as np
    import tvm
    from tvm import relax
    from splitc.backends.tvm.relax_rewrites import constant_array, rewrite_calls, tensor_of
    from splitc.backends.tvm.build import deal
    from splitc.backends.tvm.weight_layout import layout_copy
    from splitc.runtime.executors import available_cpus

    def foldable(mod, call) -> bool:
        if not isinstance(call, relax.Call) or len(call.args) < 2:
            return False
        callee, args = call.args[0], call.args[1]
        return (isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint.endswith("_weight_prepack")
                and isinstance(mod[callee], tvm.tirx.PrimFunc) and isinstance(args, tvm.ir.expr.Tuple)
                and all(isinstance(a, tvm.ir.expr.Constant) for a in args.fields))

    def key(call):  # constants compare by identity: the same weights through the same rewrite
        return call.args[0].name_hint, tuple(call.args[1].fields)

    @tvm.transform.module_pass(opt_level=0, name="splitc.FoldWeightPrepack")
    def fold(mod, _ctx):
        calls: dict[Any, Any] = {}
        functions = [(gvar, func) for gvar, func in mod.functions.items() if isinstance(func, relax.Function)]
        for _, func in functions:
            for block in getattr(func.body, "blocks", []):
                for binding in block.bindings:
                    if foldable(mod, binding.value):
                        calls[key(binding.value)] = binding.value
        if not calls:
            return mod
        found = {call.args[0].name_hint: mod[call.args[0]] for call in calls.values()}
        copies = {name: copy for name, func in found.items() if (copy := layout_copy(func)) is not None}

        def outputs(call):
            out = call.ty
            return list(out.fields) if isinstance(out, relax.TupleType) else [out]

        def run(library, call):
            # Zeroed, not empty: a layout with padded tiles (1000 classes packed as 16 x 64) leaves
            # the padding unwritten, and garbage there would make every compile's constants, the
            # bundle's bytes and the build cache's key differ.
            results = [tvm.runtime.tensor(np.zeros([int(d) for d in t.shape], str(t.dtype))) for t in outputs(call)]
            library[call.args[0].name_hint](*[a.value for a in call.args[1].fields], *results)
            return results

        def build_and_run(group):
            library = tvm.tirx.build(tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in group.items()}),
                                     # -O0: code that runs once over the weights is not worth LLVM's optimisation time
                                     target=tvm.target.Target({"kind": "llvm", "opt-level": 0}))
            return {k: run(library, call) for k, call in calls.items() if call.args[0].name_hint in group}

        # Rewrites that are plain tile copies run as numpy reshapes (backends/tvm/weight_layout.py);
        # the others are compiled, one library per thread (TVM releases the GIL): most of their
        # cost is LLVM compiling the library at its first call.
        computed: dict[Any, Any] = {k: [tensor_of(a) for a in copies[call.args[0].name_hint]([constant_array(c) for c in k[1]])]
                                    for k, call in calls.items() if call.args[0].name_hint in copies}
        compiled = {name: func for name, func in found.items() if name not in copies}
        if compiled:
            with ThreadPoolExecutor(available_cpus()) as pool:
                for part in pool.map(build_and_run, deal(compiled, available_cpus())):
                    computed.update(part)

        def evaluate(call, _value_of):
            results = computed.get(key(call)) if foldable(mod, call) else None
            if results is None:  # not a weight rewrite, or one the scan above did not reach: FoldConstant's
                return call
            consts = [relax.const(r) for r in results]
            return relax.Tuple(consts) if isinstance(call.ty, relax.TupleType) else consts[0]

        mod = mod.clone()  # assigning into the module handed in would change the caller's
        for gvar, func in functions:
            mod[gvar] = rewrite_calls(func, {"relax.call_tir": evaluate})
        return mod

    return fold


def extract_tasks(prepared, target_json: dict[str, Any]):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    # A function scheduled by splitc itself (backends/tvm/winograd.py) says so on the function, not the module.
    return [t for t in ms.relax_integration.extract_tasks(prepared, tvm.target.Target(target_json))
            if not t.mod.attrs.get("tirx.is_scheduled", False) and not t.mod["main"].attrs.get("tirx.is_scheduled", False)]


def uses_winograd(prepared) -> bool:
    """Whether `prepare` rewrote any convolution of this module as Winograd."""
    return any("winograd" in gvar.name_hint for gvar in prepared.functions)


@dataclass
class Coverage:
    tasks: int
    with_record: int            # tasks with any measured record (tuned or the untuned baseline)
    prepack: bool
    names: list[str] = field(default_factory=list)  # tasks with a record
    untuned_best: int = 0       # tasks whose fastest record is their untuned code
    winograd: bool = False      # whether these tasks are of a module with Winograd convolutions

    @property
    def complete(self) -> bool:
        return self.tasks > 0 and self.with_record == self.tasks

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def coverage(prepared, target_json: dict[str, Any], directory: Path, prepack: bool, winograd: bool = False) -> Coverage:
    """How many of `prepared`'s tasks have a record in the database at `directory`."""
    tasks = extract_tasks(prepared, target_json)
    return _coverage(tasks, target_json, BestRecords(directory).open(tasks), prepack, winograd)


def _coverage(tasks, target_json: dict[str, Any], database, prepack: bool, winograd: bool) -> Coverage:
    import tvm

    covered: list[str] = []
    untuned = 0
    target = tvm.target.Target(target_json)
    for task in tasks if database is not None else []:
        record = database.query_tuning_record(task.dispatched[0], target, task.task_name)
        if record is not None:
            covered.append(task.task_name)
            untuned += is_untuned(record)
    return Coverage(len(tasks), len(covered), prepack, covered, untuned, winograd)


@dataclass
class Variant:
    prepared: Any        # the module `prepare` made
    coverage: Coverage
    database: Any        # its tasks' best records, for `apply_database` (None: no task has one)


def best_variant(mod, target_json: dict[str, Any], directory: Path) -> Variant:
    """The first variant of `mod` whose tasks all have a record in the database at `directory`,
    else the one with the most records (the first of equals). Variants, in order of preference:
    with and without pre-packing, and, unless Winograd is off, the same again without Winograd (so
    a database tuned before Winograd existed still applies in full). Without any record, only the
    preferred variant is prepared."""
    best_records = BestRecords(directory)
    best = None
    winograd = winograd_enabled()
    variants = [(True, winograd), (False, winograd)] + ([(True, False), (False, False)] if winograd else [])
    applies = True  # False once a Winograd variant rewrote nothing: the variants without it are the same modules
    for prepack, with_winograd in variants if best_records else variants[:1]:
        if winograd and not with_winograd and not applies:
            continue
        prepared = prepare(mod, target_json, prepack, with_winograd)
        if with_winograd and not uses_winograd(prepared):
            applies = with_winograd = False
        tasks = extract_tasks(prepared, target_json)
        database = best_records.open(tasks) if best_records else None
        variant = Variant(prepared, _coverage(tasks, target_json, database, prepack, with_winograd), database)
        if variant.coverage.complete:
            return variant
        if best is None or variant.coverage.with_record > best.coverage.with_record:
            best = variant
    return best


# ------------------------------------------------------------------------------- RPC


@dataclass(frozen=True)
class RPCEndpoint:
    host: str
    port: int
    key: str | None = None      # with a key, host:port is a tracker; without, the server itself

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (f" (tracker key {self.key})" if self.key else "")


def parse_rpc(rpc: str, key: str | None = None) -> RPCEndpoint:
    from splitc.drivers.profile import _parse_rpc  # one HOST:PORT parser for profile and tune

    host, port = _parse_rpc(rpc)
    return RPCEndpoint(host, port, key or None)


def check_rpc(endpoint: RPCEndpoint, timeout: float = 10.0) -> None:
    """Refuse early, in one line, when the RPC server (or tracker) cannot be reached."""
    from tvm import rpc

    try:
        if endpoint.key:
            tracker = rpc.connect_tracker(endpoint.host, endpoint.port)
            tracker.request(endpoint.key, session_timeout=timeout).remove("")
        else:
            rpc.connect(endpoint.host, endpoint.port, session_timeout=timeout)
    except Exception as exc:  # TVM raises its own error types
        what = f"tracker at {endpoint.host}:{endpoint.port} (key {endpoint.key})" if endpoint.key else f"server at {endpoint}"
        raise TargetError(f"cannot reach the TVM RPC {what} ({first_line(exc)}); start `python -m tvm.exec.rpc_server "
                          f"--host 0.0.0.0 --port {endpoint.port}` on the device") from exc


def _direct_session(config):
    """MetaSchedule RPCRunner session factory for a server without a tracker (runs in its workers)."""
    from tvm import rpc

    return rpc.connect(config.tracker_host, int(config.tracker_port), session_timeout=config.session_timeout_sec)


def _alloc_arguments(session, device, args_info, alloc_repeat: int):
    """MetaSchedule RPCRunner argument allocation that fills the inputs here and copies them over,
    instead of calling `tvm.contrib.random.random_fill_for_measure` on the device: a device running
    the TVM runtime library only (what splitc ships to a device) does not have that function."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            if info[0] != "TENSOR":
                raise NotImplementedError(info)
            _, dtype, shape = info
            tensor = tvm.runtime.empty(shape=[int(d) for d in shape], dtype=dtype, device=device)
            try:
                kind = np.dtype(dtype).kind
            except TypeError:  # bfloat16 and other types numpy does not know: left as allocated
                kind = None
            if kind == "f":
                tensor.copyfrom(rng.standard_normal([int(d) for d in shape]).astype(dtype))
            elif kind is not None:
                tensor.copyfrom(np.zeros([int(d) for d in shape], dtype=dtype))  # valid indices, masks
            args.append(tensor)
        repeated.append(args)
    return repeated


def _export_shared_library(mod) -> str:
    """MetaSchedule builder export: a shared library the device loads itself (cross-linked with
    $SPLITC_TUNE_CC when set), instead of the default tar that the loading side must link."""
    from tvm.support import cc

    directory = tempfile.mkdtemp(prefix="ms-", dir=os.environ.get("SPLITC_TUNE_TMP") or None)
    path = os.path.join(directory, "tvm_tmp_mod.so")
    compiler = os.environ.get("SPLITC_TUNE_CC")
    if compiler:
        mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    else:
        mod.export_library(path)
    return path


# ------------------------------------------------------------------------------- tuning


@dataclass
class TuneProgress:
    elapsed_s: float
    budget_s: float | None  # wall-clock budget, None when only trials bound the run
    measured: int           # records this run has added so far
    trials: int             # the trial budget

    @property
    def fraction(self) -> float:
        """How far through its budget the run is (whichever budget ends it first)."""
        by_time = self.elapsed_s / self.budget_s if self.budget_s else 0.0
        return min(1.0, max(by_time, self.measured / max(self.trials, 1)))


@dataclass
class TuneReport:
    directory: Path
    tasks: int
    trials: int                 # trial budget given to MetaSchedule
    seconds: float
    records_before: int
    records_after: int
    stopped: str                # "finished", "deadline", "interrupted"
    dropped_lines: int = 0
    coverage: Coverage | None = None
    measured_on: str = "this host"
    retimed: list[float] = field(default_factory=list)  # per task with records: now / recorded time of its best (sorted)
    final_tasks: int = 0         # tasks whose fastest records were re-timed side by side after the search
    final_best_changed: int = 0  # of those, tasks whose best record changed

    @property
    def new_records(self) -> int:
        return self.records_after - self.records_before


def tune_module(
    mod,
    target_json: dict[str, Any],
    *,
    seconds: float | None = None,
    trials: int | None = None,
    trials_per_task: int = 256,
    trials_per_iter: int = 16,
    prepack: bool = True,
    population: int | None = None,
    rpc: RPCEndpoint | None = None,
    cross_compiler: str | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
    progress: Callable[[TuneProgress], None] | None = None,
) -> TuneReport:
    """Tune the TIR functions of a Relax module for `target_json` within a wall-clock budget
    (`seconds`) and/or a trial budget (`trials`), appending records to the database. Candidates
    are measured on this host, or on the device behind `rpc` (required for another ISA).
    `progress` is called about once a second while the search runs."""
    import tvm

    check_tuning_deps()
    if seconds is None and trials is None:
        raise InputError("give a tuning budget: --budget 10m (wall clock) and/or --trials N")
    target_json = resolve_target(target_json)
    target = tvm.target.Target(target_json)
    if target.kind.name != "llvm":
        raise InputError(f"tuning supports CPU (llvm) targets only, not {target.kind.name}")
    arch = target_arch(target_json)
    if arch != host_arch_name() and rpc is None:
        raise InputError(f"target {target_key(target_json)} is {arch} code and this host is {host_arch_name()}: tune on the device "
                         "with --rpc HOST:PORT, or apply schedules tuned on this host with --from-host")
    if rpc is not None:
        if arch != host_arch_name():
            cross_compiler = cross_compiler or f"{arch}-linux-gnu-gcc"
            if shutil.which(cross_compiler) is None:
                raise ToolchainError(f"cross compiler {cross_compiler} not found; install it (Debian: apt-get install gcc-{arch}-linux-gnu)")
        else:
            cross_compiler = None
        check_rpc(rpc)
    directory = database_dir(target_json, cache_dir)
    prepared = prepare(mod, target_json, prepack)
    tasks = extract_tasks(prepared, target_json)
    if trials is None:
        trials = trials_per_task * len(tasks) * 100  # the clock ends it first
    if population is None:
        # The evolutionary search's candidate generation (~45 s per task round at MetaSchedule's
        # default population of 512 on 2 cores) cannot be interrupted; keep rounds short on small budgets.
        population = 512 if seconds is None or seconds / max(len(tasks), 1) >= 120 else 128
    measured_on = f"rpc {rpc}" if rpc else "this host"
    started = time.perf_counter()
    with _locked(directory):
        dropped = repair_database(directory)
        before = database_stats(directory)["records"]
        (directory / TARGET_FILE).write_text(json.dumps(target_json, indent=2, sort_keys=True) + "\n")
        _write_origin(directory, {"measured_on": "device (rpc)" if rpc else f"this host ({host_arch_name()})",
                                  "host": socket.gethostname(),
                                  "schedules": "tuned on the device over RPC" if rpc else "tuned on this host"})
        if not tasks:
            return TuneReport(directory, 0, 0, 0.0, before, before, "finished", dropped, measured_on=measured_on)
        log(f"tuning {len(tasks)} task(s) for {target_key(target_json)} measured on {measured_on}: "
            f"{f'{seconds:.0f} s' if seconds else 'no time limit'}, at most {trials} trials; database {directory}")
        with tempfile.TemporaryDirectory(prefix="splitc-tune-") as tmp:
            spec = Path(tmp) / "spec.json"
            # The tasks' TIR functions only: the Relax module with its weights is ~100x larger to
            # serialize, load and re-extract in the child.
            (Path(tmp) / "tasks.json").write_text(json.dumps([
                {"name": t.task_name, "weight": int(t.weight), "mod": tvm.ir.save_json(t.dispatched[0])} for t in tasks]))
            spec.write_text(json.dumps({
                "tasks": str(Path(tmp) / "tasks.json"), "target": target_json, "directory": str(directory),
                "trials": int(trials), "trials_per_task": int(trials_per_task), "trials_per_iter": int(trials_per_iter),
                "population": int(population), "tmp": tmp,
                "rpc": None if rpc is None else {"host": rpc.host, "port": rpc.port, "key": rpc.key},
                "cross_compiler": cross_compiler,
                # The search ends early enough to leave the final re-timing its share of the budget.
                "deadline": (time.time() + seconds - _final_reserve(seconds, len(tasks))) if seconds else None,
                "end": (time.time() + seconds) if seconds else None,
            }))
            begun = time.monotonic()
            tick = None if progress is None else lambda: progress(
                TuneProgress(time.monotonic() - begun, seconds, max(_line_count(directory / RECORD_FILE) - before, 0), int(trials)))
            stopped = _run_worker(spec, seconds, directory, log, tick)
            retimed = Path(tmp) / RETIMED_FILE
            retiming = json.loads(retimed.read_text()) if retimed.is_file() else {"factors": [], "seconds": 0.0}
            final_file = Path(tmp) / FINALISTS_FILE
            final = json.loads(final_file.read_text()) if final_file.is_file() else {"tasks": 0, "best_changed": 0}
        factors = retiming["factors"]
        if factors:
            log(f"re-timed the best record of {len(factors)} task(s) first ({retiming['seconds']:.0f} s): now x{factors[0]:.2f}-"
                f"x{factors[-1]:.2f} of their recorded times (median x{factors[len(factors) // 2]:.2f}); their records were "
                "rescaled so new candidates compete with timings from this run")
        if final["tasks"]:
            log(f"re-timed the {FINALISTS} fastest records of {final['tasks']} task(s) side by side ({final['seconds']:.0f} s): "
                f"the best changed in {final['best_changed']}")
        dropped += repair_database(directory)
        after = database_stats(directory)["records"]
    report = TuneReport(directory, len(tasks), int(trials), time.perf_counter() - started, before, after, stopped, dropped,
                        measured_on=measured_on, retimed=factors, final_tasks=final["tasks"], final_best_changed=final["best_changed"])
    report.coverage = coverage(prepared, target_json, directory, prepack, winograd=uses_winograd(prepared))
    return report


def _final_reserve(seconds: float, tasks: int) -> float:
    """Seconds of a wall-clock budget kept for re-timing each task's fastest records after the
    search: building and timing 3 candidates three times took ~2 s per task on a 2-core host
    (34 MobileNetV2 tasks: 60-80 s), and never more than a tenth of the budget."""
    return min(0.1 * seconds, 2.5 * tasks)


def _write_origin(directory: Path, origin: dict[str, Any]) -> None:
    tmp = directory / f".{ORIGIN_FILE}.tmp"
    tmp.write_text(json.dumps(origin, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / ORIGIN_FILE)


def _line_count(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return 0


def _run_worker(spec: Path, seconds: float | None, directory: Path, log: Callable[[str], None],
                tick: Callable[[], None] | None = None) -> str:
    """Run the tuning child; stop it at the hard deadline or on Ctrl-C. Returns how it ended."""
    log_path = directory / "logs" / "tune.out"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The child finishes the batch it is measuring past its own deadline; allow that much more.
    hard = None if seconds is None else seconds + max(60.0, 0.25 * seconds)
    entry = "import sys; from splitc.backends.tvm.tuning import _worker; _worker(sys.argv[1])"
    # Ctrl-C sets a flag this loop reads, rather than raising KeyboardInterrupt wherever the main
    # thread happens to be: raised inside the progress bar's lock, it left the lock held, and the
    # bar's refresh thread (and with it the exit) hung for good.
    interrupted = threading.Event()
    previous = (signal.signal(signal.SIGINT, lambda *_: interrupted.set())
                if threading.current_thread() is threading.main_thread() else None)
    with open(log_path, "w") as out:
        child = subprocess.Popen([sys.executable, "-c", entry, str(spec)], stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        begun = time.monotonic()
        try:
            while True:
                if interrupted.is_set():
                    raise KeyboardInterrupt
                try:
                    code = child.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if tick is not None and not interrupted.is_set():
                        tick()
                    if hard is not None and time.monotonic() - begun > hard:
                        log("tuning ran past its budget; stopping it (finished records are kept)")
                        _stop(child)
                        return "deadline"
        except KeyboardInterrupt:  # from the flag above
            log("interrupted: stopping the tuning run (finished records are kept)")
            _stop(child)
            return "interrupted"
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    text = log_path.read_text(errors="replace")
    failure = [line for line in text.splitlines() if line.startswith("splitc: error: ")]
    if failure:
        raise BackendError(failure[-1].removeprefix("splitc: error: ")[:300] + f"; full log: {log_path}")
    if code != 0:
        tail = text.strip().splitlines()[-1:] or ["(no output)"]
        raise BackendError(f"MetaSchedule tuning failed (exit {code}): {tail[0][:200]}; full log: {log_path}")
    return "deadline" if "splitc: deadline reached" in text else "finished"


def _stop(child: subprocess.Popen) -> None:
    """End the tuning child and its builder/runner workers (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------- host-tuned schedules for another ISA


@dataclass
class TransferReport:
    directory: Path
    source: Path
    tasks: int
    applied: int = 0            # schedules re-keyed for the device target (trace applied and built)
    already: int = 0            # the device database already held this schedule or a faster one
    failed: int = 0             # traces that no longer apply, or do not build for the device target
    untuned_best: int = 0       # tasks whose fastest code on this host is the untuned one: left untuned
    missing: int = 0            # tasks with no record on this host
    label: str = ""
    errors: list[str] = field(default_factory=list)


def host_tuned_label(host_json: dict[str, Any], device_json: dict[str, Any]) -> str:
    host_bits, device_bits = vector_bits(host_json), vector_bits(device_json)
    widths = f": {host_bits}-bit vs {device_bits}-bit" if host_bits and device_bits and host_bits != device_bits else ""
    return f"host-tuned ({target_arch(host_json)} {host_json.get('mcpu', '')}, vector width differs{widths}; not timed on the device)"


def transfer_host_records(
    mod,
    device_json: dict[str, Any],
    *,
    host_json: dict[str, Any] | None = None,
    prepack: bool = True,
    cache_dir: Path | None = None,
) -> TransferReport:
    """Re-key the best schedule tuned on this host (for its own target) of each task of `mod` for
    `device_json`, a target of another ISA: the trace is replayed on the task's function and the
    result must build for the device target, else it is counted as failed and skipped. Records go to
    the device's `--host-tuned` database, which compile applies and labels; their timings are this
    host's, never the device's."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    device_json = resolve_target(device_json)
    host_json = resolve_target(host_json or host_target_json())
    source = database_dir(host_json, cache_dir)
    destination = host_tuned_dir(device_json, cache_dir)
    prepared = prepare(mod, device_json, prepack)
    tasks = extract_tasks(prepared, device_json)
    report = TransferReport(destination, source, len(tasks), label=host_tuned_label(host_json, device_json))
    device, host = tvm.target.Target(device_json), tvm.target.Target(host_json)
    with _locked(destination):
        repair_database(destination)
        src = BestRecords(source).open(tasks)
        if src is None:
            report.missing = len(tasks)
            return report
        dst = open_database(destination)
        for task in tasks:
            func_mod = task.dispatched[0]
            record = src.query_tuning_record(func_mod, host, task.task_name)
            if record is None:
                report.missing += 1
                continue
            if is_untuned(record):
                report.untuned_best += 1
                continue
            current = dst.query_tuning_record(func_mod, device, task.task_name)
            if current is not None and _mean(current.run_secs) <= _mean(record.run_secs):
                report.already += 1
                continue
            error = replay_error(record.trace, func_mod, device)
            if error is not None:
                report.failed += 1
                report.errors.append(f"{task.task_name}: {error}")
                continue
            dst.commit_tuning_record(ms.database.TuningRecord(record.trace, dst.commit_workload(func_mod), record.run_secs, device,
                                                              record.args_info))
            report.applied += 1
        (destination / TARGET_FILE).write_text(json.dumps(device_json, indent=2, sort_keys=True) + "\n")
        _write_origin(destination, {"measured_on": f"this host ({target_arch(host_json)})", "host": socket.gethostname(),
                                    "schedules": report.label,
                                    "host_target": host_json, "host_database": target_key(host_json)})
    return report


def replay_error(trace, func_mod, target) -> str | None:
    """Why `trace` cannot serve `func_mod` on `target` (it does not replay on the function, or the
    scheduled function does not build for the target), or None when it can."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    try:
        schedule = tvm.s_tir.Schedule(func_mod)
        trace.apply_to_schedule(schedule, remove_postproc=False)
        tvm.driver.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(schedule.mod), target=target)
    except Exception as exc:  # noqa: BLE001 - TVM raises its own error types; the reason is returned
        return first_line(exc, 160)
    return None


def _mean(run_secs) -> float:
    values = [float(v) for v in (run_secs or [])]
    return sum(values) / len(values) if values else float("inf")


# ------------------------------------------------------------------------------- the child process


def _fast_build(mod, target, _params):
    """MetaSchedule's default_build without `import tvm.s_tir.tensor_intrin`, which takes ~20 s
    (CUDA/ROCm/Hexagon intrinsic tables) in every fresh builder process and made 30 s build
    timeouts fail most trials on this 2-core host. Float32 CPU schedules use no tensor intrinsic.
    Unrolling is capped and LLVM's options are set as compile sets them (`cap_unrolling_in`,
    `codegen_target`), so a candidate is timed as built."""
    import tvm
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from splitc.backends.tvm.build import cap_unrolling_in, codegen_target

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(cap_unrolling_in(mod)[0], target=tvm.target.Target(codegen_target(dict(target.export()))))


def _worker(spec_path: str) -> None:
    try:
        _tune(spec_path)
    except Exception as exc:
        print(f"splitc: error: {first_line(exc)}", flush=True)
        raise


def _tune(spec_path: str) -> None:
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params
    from tvm.s_tir.meta_schedule.builder.local_builder import _worker_func as _build_one
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig, RPCConfig
    from tvm.s_tir.meta_schedule.utils import fork_seed
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    spec = json.loads(Path(spec_path).read_text())
    directory = Path(spec["directory"])
    log_dir = str(directory / "logs")
    tasks = json.loads(Path(spec["tasks"]).read_text())
    target = tvm.target.Target(spec["target"])
    deadline = spec["deadline"]
    rpc = spec.get("rpc")
    os.environ["SPLITC_TUNE_TMP"] = spec["tmp"]
    # The runner's worker processes inherit this: candidates are timed with the thread count the
    # deployed build runs with (TVM's own default on x86 is half the hardware threads).
    from splitc.runtime.executors import available_cpus, target_threads

    os.environ["TVM_NUM_THREADS"] = str(target_threads(spec["target"]) or available_cpus())
    if spec.get("cross_compiler"):
        os.environ["SPLITC_TUNE_CC"] = spec["cross_compiler"]
    search_threads = int(os.cpu_count() or 1)  # the search runs here, whatever the target's core count
    _cpu_tensor_intrinsics()

    @derived_object
    class _DeadlineSearch(ms.search_strategy.PySearchStrategy):
        """MetaSchedule's evolutionary search that proposes nothing once the wall-clock deadline has
        passed: the task scheduler then ends each task itself after joining (and recording) what it
        already measured."""

        def __init__(self, inner):
            self.inner = inner

        def _initialize_with_tune_context(self, context) -> None:
            self.inner._initialize_with_tune_context(context)

        def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
            self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

        def post_tuning(self) -> None:
            self.inner.post_tuning()

        def generate_measure_candidates(self):
            if deadline is not None and time.time() >= deadline:
                print("splitc: deadline reached, ending tuning", flush=True)
                return None
            return self.inner.generate_measure_candidates()

        def notify_runner_results(self, measure_candidates, results) -> None:
            self.inner.notify_runner_results(measure_candidates, results)

        def clone(self):
            return _DeadlineSearch(self.inner.clone())

    @derived_object
    class _PoolBuilder(ms.builder.PyBuilder):
        """LocalBuilder with worker processes kept across batches. LocalBuilder starts a fresh pool
        per batch; each worker's `import tvm` cost ~2.5 s of a 2-core host's time per batch of 16
        (a third of the build stage). Workers are recycled after 64 builds each instead
        (LocalBuilder's reason for fresh pools is a slow leak in long-lived workers)."""

        # A candidate whose code LLVM needs more than 15 s for is rejected, not measured: kernels
        # build in 0.1-3 s here, but ResNet-18's classifier with 40-lane vectors took 30 s to
        # generate code for (at every compile that applies it: 35 of a 44 s warm-database compile)
        # and cost its tuning batch 40 s of the budget, all for a 0.1 ms kernel.
        def __init__(self, f_export=None, timeout_sec: float = 15.0):
            super().__init__()
            self.f_export = f_export
            self.timeout_sec = timeout_sec
            self.pool = PopenPoolExecutor(max_workers=search_threads, timeout=timeout_sec, maximum_process_uses=64)

        def build(self, build_inputs):
            results = []
            jobs = [(_fast_build, self.f_export, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            for outcome in self.pool.map_with_error_catching(lambda job: _build_one(*job), jobs):
                if outcome.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(outcome.value, None))
                elif outcome.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(None, f"LocalBuilder: Timeout, killed after {self.timeout_sec} seconds"))
                else:
                    results.append(ms.builder.BuilderResult(None, "LocalBuilder: An exception occurred\n" + str(outcome.value)))
            return results

    # Weights and outputs flushed from the caches before every timed call (the input stays warm, as
    # the previous layer just wrote it): in a model, each kernel's weights arrive cold, and a schedule
    # chosen on warm-cache timings can lose to another once its weights come from memory. One call
    # per sample, ten samples, as Ansor's CPU measurements do with flushing.
    cold = EvaluatorConfig(number=1, repeat=10, min_repeat_ms=0, enable_cpu_cache_flush=True)

    def make_runner(evaluator: EvaluatorConfig = cold):
        if rpc is None:
            return ms.runner.LocalRunner(timeout_sec=30.0, evaluator_config=evaluator)
        config = RPCConfig(tracker_host=rpc["host"], tracker_port=int(rpc["port"]), tracker_key=rpc["key"] or _DIRECT_KEY,
                           session_timeout_sec=120)
        return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1,
                                   f_create_session=None if rpc["key"] else _direct_session, f_alloc_argument=_alloc_arguments)

    builder = _PoolBuilder(f_export=_export_shared_library if rpc else None)
    task_mods = [(t["name"], tvm.ir.load_json(t["mod"])) for t in tasks]
    begun = time.monotonic()
    retimed = _remeasure_top(task_mods, builder, make_runner(cold._replace(repeat=3)), directory, target, keep=1, rounds=1)
    if retimed:
        factors = sorted(r.factor for r in retimed)
        print(f"splitc: re-timed the best record of {len(factors)} task(s): now x{factors[0]:.2f}-x{factors[-1]:.2f} of their "
              f"recorded times (median x{factors[len(factors) // 2]:.2f})", flush=True)
    (Path(spec["tmp"]) / RETIMED_FILE).write_text(json.dumps({"factors": sorted(r.factor for r in retimed),
                                                              "seconds": time.monotonic() - begun}))
    database = open_database(directory)
    population = int(spec.get("population") or 512)
    contexts, weights = [], []
    names = [t["name"] for t in tasks]
    for task, logger, rand_state in zip(tasks, get_loggers_from_work_dir(log_dir, names), fork_seed(None, n=len(tasks))):
        strategy = _DeadlineSearch(ms.search_strategy.EvolutionarySearch(
            population_size=population, init_min_unmeasured=min(50, population // 2),
            genetic_num_iters=4 if population >= 256 else 2))
        contexts.append(ms.TuneContext(mod=tvm.ir.load_json(task["mod"]), target=target, space_generator="post-order-apply",
                                       search_strategy=strategy, task_name=task["name"], logger=logger,
                                       rand_state=rand_state, num_threads=search_threads).clone())
        weights.append(task["weight"])

    # One untuned run per task (first run only: resumed runs keep theirs) as a record with an empty
    # schedule, and splitc's schedule where it has one: the database's best record of a task is then
    # the best of tuned, untuned and splitc's.
    _measure_baselines(contexts, builder, make_runner(cold._replace(repeat=3)), database, target, vector_bits(spec["target"]),
                     over_rpc=rpc is not None)
    ms.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=log_dir,
        max_trials_global=int(spec["trials"]),
        max_trials_per_task=int(spec["trials_per_task"]),
        num_trials_per_iter=int(spec["trials_per_iter"]),
        builder=builder,
        runner=make_runner(),
        database=database,
    )
    end = spec.get("end")
    if end is None or time.time() < end:
        begun = time.monotonic()
        print(f"splitc: re-timing the {FINALISTS} fastest records of each task side by side", flush=True)
        final = _remeasure_top(task_mods, builder, make_runner(cold._replace(repeat=3)), directory, target,
                               keep=FINALISTS, rounds=FINAL_ROUNDS, end=end)
        (Path(spec["tmp"]) / FINALISTS_FILE).write_text(json.dumps({
            "tasks": len(final), "best_changed": sum(r.best_changed for r in final), "seconds": time.monotonic() - begun}))
    print("splitc: tuning finished", flush=True)


def _cpu_tensor_intrinsics() -> None:
    """Register the CPU tensor intrinsics only. TuneContext imports `tvm.s_tir.tensor_intrin`, whose
    CUDA/ROCm/Hexagon tables take 15-35 s to build on a 2-core host before any tuning starts; the
    CPU schedule rules (MultiLevelTilingWithIntrin) need only the x86 and Arm ones."""
    import importlib
    import types

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    package.__package__ = name
    sys.modules[name] = package
    try:
        for sub in ("dot_product_common", "x86", "arm_cpu", "riscv_cpu"):
            importlib.import_module(f"{name}.{sub}")
    except Exception:  # noqa: BLE001 - a TVM whose layout differs: fall back to the full import
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        importlib.import_module(name)


def _time_candidates(candidates, builder, runner, target, *, rounds: int = 1,
                     end: float | None = None) -> tuple[list[list[float]], list[str | None]]:
    """Build each (TIR module, args info) once and time it in `rounds` rounds, every candidate once
    per round (alternating the order), so that candidates compared with each other share the host's
    state rather than each meeting it at a different minute. Rounds after the first start only
    before `end` (time.time()). Returns each candidate's mean time per round, and why it has none."""
    from tvm.s_tir import meta_schedule as ms

    built = builder.build([ms.builder.BuilderInput(mod, target) for mod, _ in candidates])
    times: list[list[float]] = [[] for _ in candidates]
    errors: list[str | None] = [None] * len(candidates)
    inputs = {}
    for i, ((_, args), result) in enumerate(zip(candidates, built)):
        if result.error_msg:
            errors[i] = f"build: {result.error_msg.strip().splitlines()[-1][:200]}"
        else:
            inputs[i] = ms.runner.RunnerInput(result.artifact_path, "cpu", args)
    for round_ in range(rounds):
        if round_ and end is not None and time.time() >= end:
            break
        order = [i for i in inputs if errors[i] is None][:: 1 if round_ % 2 == 0 else -1]
        for i, future in zip(order, runner.run([inputs[i] for i in order])):
            result = future.result()
            if result.error_msg or not result.run_secs:
                errors[i], times[i] = f"run: {(result.error_msg or 'no timing').strip().splitlines()[-1][:200]}", []
            else:
                times[i].append(_mean(result.run_secs))
    return times, errors


@dataclass
class Remeasured:
    """One task's top records timed again (`_remeasure_top`)."""

    factor: float        # median over its re-timed records of now / recorded
    best_changed: bool   # whether a record other than the recorded best is now the task's best


def _remeasure_top(task_mods, builder, runner, directory: Path, target, *, keep: int, rounds: int,
                   end: float | None = None) -> list[Remeasured]:
    """Time each task's `keep` fastest records again, side by side, and write the new times into
    the database; the task's other records are scaled by the median now/recorded of those.
    Two uses (`_tune`): before a resumed search (keep=1), because a database mixes timings from
    other runs and machines of the same target key, and on a host that is slower today old records
    would beat every new candidate by the difference (a MobileNetV2 database's best records ran
    x1.1-x2.4 slower, median x1.55, an hour after they were recorded); and after the search
    (keep=3), against the winner's curse: a task's recorded best is the minimum of many noisy
    timings, taken minutes apart, and is often not the fastest (held out, re-timing the top 3 of
    a 30-minute MobileNetV2 database changed the pick in 21 of 34 tasks and cut the summed kernel
    time by 4.9 %). Scaling the rest by one factor keeps their order."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    workloads, records, _ = _read_database(directory)
    index_of = {json.loads(line)[0]: index for index, line in enumerate(workloads)}
    ranked = _ranked(records)
    finalists = []  # (workload index, position, scheduled module, args info, recorded mean)
    indices = {index_of.get(ms.database.Workload(mod).as_json()[0]) for _, mod in task_mods}
    for index in sorted(indices & ranked.keys()):
        workload = ms.database.Workload.from_json(json.loads(workloads[index]))
        for recorded, position in ranked[index][:keep]:
            try:
                record = ms.database.TuningRecord.from_json(json.loads(records[position])[1], workload)
                schedule = tvm.s_tir.Schedule(workload.mod)
                record.trace.apply_to_schedule(schedule, remove_postproc=False)
            except Exception:  # noqa: BLE001 - a record that no longer replays: scaled like the rest
                continue
            finalists.append((index, position, schedule.mod, record.args_info, recorded))
    if not finalists:
        return []
    times, _ = _time_candidates([(f[2], f[3]) for f in finalists], builder, runner, target, rounds=rounds, end=end)
    new_times: dict[int, list[float]] = {}
    ratios: dict[int, list[float]] = {}
    for (index, position, _, _, recorded), measured in zip(finalists, times):
        if measured:
            new_times[position] = measured
            ratios.setdefault(index, []).append(_mean(measured) / recorded)
    factors = {index: statistics.median(values) for index, values in ratios.items()}
    _rewrite_run_times(directory, records, new_times, factors)
    results = []
    for index, factor in factors.items():
        now = min((_mean(new_times[p]) if p in new_times else mean * factor, p) for mean, p in ranked[index])
        results.append(Remeasured(factor, now[1] != ranked[index][0][1]))
    return results


def _measure_baselines(contexts, builder, runner, database, target, vector_bits: int | None, *, over_rpc: bool) -> None:
    """Time and store, for each task without an untuned record yet, its untuned code and, where
    they apply (backends/tvm/pointwise.py), splitc's own schedules: records the search starts from and
    must beat."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from splitc.backends.tvm.pointwise import pointwise_schedules

    have = {r.workload.as_json()[0] for r in database.get_all_tuning_records() if is_untuned(r)}
    todo = [(ctx, database.commit_workload(ctx.mod)) for ctx in contexts]
    todo = [(ctx, workload) for ctx, workload in todo if workload.as_json()[0] not in have]
    if not todo:
        return
    jobs = []  # (task context, workload, trace, scheduled module, is the untuned code)
    for ctx, workload in todo:
        jobs.append((ctx, workload, _untuned_trace(ctx.mod), ctx.mod, True))
        jobs += [(ctx, workload, own.trace, own.mod, False) for own in pointwise_schedules(ctx.mod["main"], vector_bits)]
    print(f"splitc: measuring the untuned code of {len(todo)} task(s) and {len(jobs) - len(todo)} schedule(s) of splitc's own", flush=True)
    # Arguments as the kernel takes them: a schedule that packs its weights reads them packed (the
    # builder drops the layout rewrite and the runner passes the weights in the new layout).
    candidates = [(mod, ArgInfo.from_entry_func(mod, remove_preproc=True)) for _, _, _, mod, _ in jobs]
    times, failures = _time_candidates(candidates, builder, runner, target)
    measured, errors = 0, []
    for (ctx, workload, trace, _, untuned), (_, args), runs, failure in zip(jobs, candidates, times, failures):
        if failure or not runs:
            if untuned:
                errors.append(f"{ctx.task_name}: {failure or 'no timing'}")
            continue
        database.commit_tuning_record(ms.database.TuningRecord(trace, workload, runs, target, args))
        measured += untuned
    for line in errors:
        print(f"splitc: untuned baseline failed: {line}", flush=True)
    if measured == 0 and over_rpc:
        raise BackendError(f"the RPC device could not run any untuned task built for {target.attrs.get('mtriple', target.kind.name)} "
                           f"({errors[0] if errors else 'no result'}); "
                           "is it the target's ISA, with a TVM runtime of the same version?")
