"""The MetaSchedule driver: `tune_module`, the parent side of a tuning run.

Tuning runs in a child process in its own session (backends/tvm/search.py). The parent checks the
request, prepares the module and extracts its tasks, hands the child their TIR functions, enforces
the wall-clock budget and turns Ctrl-C into stopping the child; MetaSchedule appends each measured
batch to the database as it goes, and `repair_database` drops a line cut short by the stop, so an
interrupted run leaves a readable database with every finished record. The child also stops
itself at the deadline between measurement batches, so a budgeted run normally ends cleanly.

Measuring: on this host (LocalRunner) for targets of this host's ISA, or on the device through TVM
RPC (backends/tvm/rpc.py), candidates cross-compiled into shared libraries here. Timings from the
build host are never stored for a target of another ISA except in the `--host-tuned` database
(backends/tvm/host_records.py), which says what it is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitc.backends.tvm.coverage import Coverage, coverage
from splitc.backends.tvm.database import (
    RECORD_FILE,
    TARGET_FILE,
    database_dir,
    database_stats,
    locked,
    repair_database,
    write_origin,
)
from splitc.backends.tvm.prepare import extract_tasks, prepare, uses_winograd
from splitc.backends.tvm.rpc import RPCEndpoint, check_rpc
from splitc.backends.tvm.search import FINALISTS, FINALISTS_FILE, RETIMED_FILE
from splitc.backends.tvm.target_keys import host_arch_name, resolve_target, target_arch, target_key
from splitc.core.errors import BackendError, InputError, ToolchainError


def check_tuning_deps() -> None:
    missing = []
    for name in ("xgboost", "psutil"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ToolchainError(f"MetaSchedule tuning needs {' and '.join(missing)}; pip install {' '.join(missing)} (or pip install -e '.[compiler]')")


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
    with locked(directory):
        dropped = repair_database(directory)
        before = database_stats(directory)["records"]
        (directory / TARGET_FILE).write_text(json.dumps(target_json, indent=2, sort_keys=True) + "\n")
        write_origin(directory, {"measured_on": "device (rpc)" if rpc else f"this host ({host_arch_name()})",
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
    entry = "import sys; from splitc.backends.tvm.search import run_search; run_search(sys.argv[1])"
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
