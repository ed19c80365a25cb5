"""Host-tuned schedules for a target of another ISA (`splitc tune --target rpi4 --from-host`).

The best schedule tuned on this host for its own target is replayed on each task of the device
target's module and kept when it builds for the device; records go to the device's
`<key>--host-tuned` database (backends/tvm/database.py), which compile applies and labels as
host-tuned: their timings are this host's, never the device's.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitc.backends.tvm.database import (
    TARGET_FILE,
    BestRecords,
    database_dir,
    host_tuned_dir,
    is_untuned,
    locked,
    mean_run_time,
    open_database,
    repair_database,
    write_origin,
)
from splitc.backends.tvm.prepare import extract_tasks, prepare
from splitc.backends.tvm.target_keys import host_target_json, resolve_target, target_arch, target_key, vector_bits
from splitc.core.errors import first_line


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
    with locked(destination):
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
            if current is not None and mean_run_time(current.run_secs) <= mean_run_time(record.run_secs):
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
        write_origin(destination, {"measured_on": f"this host ({target_arch(host_json)})", "host": socket.gethostname(),
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
