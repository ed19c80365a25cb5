"""MetaSchedule tuning for the TVM backend, with a tuning database that outlives one compile.

Layout (one JSON database per target, in the cache directory of backends/emulation.py):

    $SPLITC_CACHE/tuning/<target-key>/
        database_workload.json         MetaSchedule JSONDatabase: one workload (TIR function) a line
        database_tuning_record.json    one measured schedule a line, appended as it is measured
        target.json                    the TVM target the records were measured for
        logs/                          MetaSchedule's per-task logs of the last tuning run
        .lock                          held while a tuning run writes

Records are keyed by workload (the structural hash of a fused TIR function: operator + shapes, not
weights) and by target (the directory), so any model with the same operator shapes reuses them.

Tuning runs in a child process in its own session. The parent enforces the wall-clock budget and
turns Ctrl-C into stopping the child; MetaSchedule appends each measured batch to the database as it
goes, and `repair_database` drops a line cut short by the stop, so an interrupted run leaves a
readable database with every finished record. The child also stops itself at the deadline between
measurement batches (see _DeadlineCallback), so a budgeted run normally ends cleanly.

Two workload variants exist per function: plain, and with weight pre-packing
(`cpu_weight_prepack`: layout-free weight buffers, rewritten at compile time by constant folding,
since splitc binds weights as constants). Tuning uses pre-packing on CPU targets by default; compile
applies whichever variant has more tasks covered.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from splitc.errors import BackendError, InputError, ToolchainError

TUNING_SUBDIR = "tuning"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
_FORMAT = 1  # bump when the key or the pre-tuning passes change (old records would not match)


# ------------------------------------------------------------------------------- target and paths


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
    from splitc.backends.emulation import default_cache_dir

    return (default_cache_dir() if cache_dir is None else Path(cache_dir)) / TUNING_SUBDIR


def database_dir(target_json: dict[str, Any], cache_dir: Path | None = None) -> Path:
    return tuning_root(cache_dir) / target_key(target_json)


# ------------------------------------------------------------------------------- database files


def _valid_lines(path: Path, check: Callable[[Any], bool]) -> tuple[list[str], int]:
    """Lines of `path` that parse as JSON and pass `check`, up to the first bad one; and the count
    of lines dropped (a line cut short by a kill, and whatever follows it)."""
    if not path.is_file():
        return [], 0
    lines = path.read_text(errors="replace").splitlines()
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


def _read_database(directory: Path) -> tuple[list[str], list[str], int]:
    workloads, dropped_w = _valid_lines(directory / WORKLOAD_FILE, lambda v: isinstance(v, list) and len(v) == 2)
    n = len(workloads)
    records, dropped_r = _valid_lines(
        directory / RECORD_FILE, lambda v: isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and 0 <= v[0] < n
    )
    return workloads, records, dropped_w + dropped_r


def repair_database(directory: Path) -> int:
    """Rewrite the database files keeping only whole lines (atomically); return lines dropped."""
    workloads, records, dropped = _read_database(directory)
    if dropped:
        for name, lines in ((WORKLOAD_FILE, workloads), (RECORD_FILE, records)):
            tmp = directory / f".{name}.tmp"
            tmp.write_text("".join(line + "\n" for line in lines))
            os.replace(tmp, directory / name)
    return dropped


def database_stats(directory: Path) -> dict[str, int]:
    workloads, records, _ = _read_database(directory)
    return {"workloads": len(workloads), "records": len(records)}


@contextlib.contextmanager
def readable_copy(directory: Path) -> Iterator[Path | None]:
    """A consistent snapshot of the database (whole lines only) in a temporary directory, so a
    compile can read while a tuning run appends. Yields None when there is no database."""
    workloads, records, _ = _read_database(directory)
    if not workloads:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="splitc-tunedb-") as tmp:
        (Path(tmp) / WORKLOAD_FILE).write_text("".join(line + "\n" for line in workloads))
        (Path(tmp) / RECORD_FILE).write_text("".join(line + "\n" for line in records))
        yield Path(tmp)


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


def prepare(mod, target_json: dict[str, Any], prepack: bool):
    """The pre-tuning passes of TVM's static_shape_tuning pipeline: what tasks are extracted from
    and what the database is applied to."""
    import tvm
    from tvm import relax

    transform = relax.transform
    passes = [transform.DecomposeOpsForInference(), transform.CanonicalizeBindings(), relax.get_pipeline("zero")]
    if prepack:
        passes.append(transform.AttachAttrLayoutFreeBuffers())
    with tvm.target.Target(target_json):
        return tvm.transform.Sequential(passes)(mod)


def apply_database(prepared, target_json: dict[str, Any], directory: Path, prepack: bool):
    """Replace every TIR function that has a record with its best schedule; with pre-packing, the
    weight layout rewrites are split out and folded into the (constant) weights."""
    import tvm
    from tvm import relax

    transform = relax.transform
    with readable_copy(directory) as snapshot:
        if snapshot is None:
            return prepared
        with tvm.target.Target(target_json), open_database(snapshot):
            passes = [transform.MetaScheduleApplyDatabase()]
            if prepack:
                passes += [transform.SplitLayoutRewritePreproc(), transform.LiftTransformParams(), transform.FoldConstant()]
            return tvm.transform.Sequential(passes)(prepared)


def extract_tasks(prepared, target_json: dict[str, Any]):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    return [t for t in ms.relax_integration.extract_tasks(prepared, tvm.target.Target(target_json))
            if not t.mod.attrs.get("tirx.is_scheduled", False)]


@dataclass
class Coverage:
    tasks: int
    with_record: int
    prepack: bool
    names: list[str] = field(default_factory=list)  # tasks with a record

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def coverage(prepared, target_json: dict[str, Any], directory: Path, prepack: bool) -> Coverage:
    import tvm

    tasks = extract_tasks(prepared, target_json)
    covered: list[str] = []
    with readable_copy(directory) as snapshot:
        if snapshot is not None:
            database = open_database(snapshot)
            target = tvm.target.Target(target_json)
            for task in tasks:
                if database.query_tuning_record(task.dispatched[0], target, task.task_name) is not None:
                    covered.append(task.task_name)
    return Coverage(len(tasks), len(covered), prepack, covered)


def best_variant(mod, target_json: dict[str, Any], directory: Path) -> tuple[Any, Coverage]:
    """The prepared module (with or without pre-packing) whose tasks have more records."""
    best = None
    variants = (True, False) if database_stats(directory)["records"] else (True,)
    for prepack in variants:
        prepared = prepare(mod, target_json, prepack)
        cov = coverage(prepared, target_json, directory, prepack)
        if best is None or cov.with_record > best[1].with_record:
            best = (prepared, cov)
    return best


# ------------------------------------------------------------------------------- tuning


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

    @property
    def new_records(self) -> int:
        return self.records_after - self.records_before


def tune_module(
    mod,
    target_json: dict[str, Any],
    *,
    seconds: float | None = None,
    trials: int | None = None,
    trials_per_task: int = 64,
    trials_per_iter: int = 16,
    prepack: bool = True,
    population: int | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> TuneReport:
    """Tune the TIR functions of a Relax module for `target_json` on this host, within a wall-clock
    budget (`seconds`) and/or a trial budget (`trials`), appending records to the database."""
    import tvm

    check_tuning_deps()
    if seconds is None and trials is None:
        raise InputError("give a tuning budget: --budget 10m (wall clock) and/or --trials N")
    target_json = resolve_target(target_json)
    target = tvm.target.Target(target_json)
    if target.kind.name != "llvm":
        raise InputError(f"tuning supports CPU (llvm) targets only, not {target.kind.name}")
    directory = database_dir(target_json, cache_dir)
    prepared = prepare(mod, target_json, prepack)
    tasks = extract_tasks(prepared, target_json)
    if trials is None:
        trials = trials_per_task * len(tasks) * 100  # the clock ends it first
    if population is None:
        # The evolutionary search's candidate generation (~45 s per task round at MetaSchedule's
        # default population of 512 on 2 cores) cannot be interrupted; keep rounds short on small budgets.
        population = 512 if seconds is None or seconds / max(len(tasks), 1) >= 120 else 128
    started = time.perf_counter()
    with _locked(directory):
        dropped = repair_database(directory)
        before = database_stats(directory)["records"]
        (directory / "target.json").write_text(json.dumps(target_json, indent=2, sort_keys=True) + "\n")
        if not tasks:
            return TuneReport(directory, 0, 0, 0.0, before, before, "finished", dropped)
        log(f"tuning {len(tasks)} task(s) for {target_key(target_json)}: "
            f"{f'{seconds:.0f} s' if seconds else 'no time limit'}, at most {trials} trials; database {directory}")
        with tempfile.TemporaryDirectory(prefix="splitc-tune-") as tmp:
            spec = Path(tmp) / "spec.json"
            (Path(tmp) / "mod.json").write_text(tvm.ir.save_json(prepared))
            spec.write_text(json.dumps({
                "module": str(Path(tmp) / "mod.json"), "target": target_json, "directory": str(directory),
                "trials": int(trials), "trials_per_task": int(trials_per_task), "trials_per_iter": int(trials_per_iter),
                "population": int(population),
                "deadline": (time.time() + seconds) if seconds else None,
            }))
            stopped = _run_worker(spec, seconds, directory, log)
        dropped += repair_database(directory)
        after = database_stats(directory)["records"]
    report = TuneReport(directory, len(tasks), int(trials), time.perf_counter() - started, before, after, stopped, dropped)
    report.coverage = coverage(prepared, target_json, directory, prepack)
    return report


def _run_worker(spec: Path, seconds: float | None, directory: Path, log: Callable[[str], None]) -> str:
    """Run the tuning child; stop it at the hard deadline or on Ctrl-C. Returns how it ended."""
    log_path = directory / "logs" / "tune.out"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The child finishes the batch it is measuring past its own deadline; allow that much more.
    hard = None if seconds is None else seconds + max(60.0, 0.25 * seconds)
    with open(log_path, "w") as out:
        child = subprocess.Popen([sys.executable, "-m", "splitc.backends.tuning", str(spec)], stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        begun = time.monotonic()
        try:
            while True:
                try:
                    code = child.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if hard is not None and time.monotonic() - begun > hard:
                        log("tuning ran past its budget; stopping it (finished records are kept)")
                        _stop(child)
                        return "deadline"
        except KeyboardInterrupt:
            log("interrupted: stopping the tuning run (finished records are kept)")
            _stop(child)
            return "interrupted"
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise BackendError(f"MetaSchedule tuning failed (exit {code}): {tail[0][:200]}; full log: {log_path}")
    text = log_path.read_text(errors="replace")
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


# ------------------------------------------------------------------------------- the child process


def _fast_build(mod, target, _params):
    """MetaSchedule's default_build without `import tvm.s_tir.tensor_intrin`, which takes ~20 s
    (CUDA/ROCm/Hexagon intrinsic tables) in every fresh builder process and made 30 s build
    timeouts fail most trials on this 2-core host. Float32 CPU schedules use no tensor intrinsic."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _worker(spec_path: str) -> None:
    import tvm
    from splitc.backends.tuning import (
        _fast_build,  # by module reference, not by value from __main__
    )
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    spec = json.loads(Path(spec_path).read_text())
    directory = Path(spec["directory"])
    log_dir = str(directory / "logs")
    mod = tvm.ir.load_json(Path(spec["module"]).read_text())
    target = tvm.target.Target(spec["target"])
    deadline = spec["deadline"]
    threads = int(spec["target"].get("num-cores") or os.cpu_count() or 1)

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

    population = int(spec.get("population") or 512)
    extracted = ms.relax_integration.extract_tasks(mod, target)
    contexts, weights = [], []
    names = [t.task_name for t in extracted]
    for task, logger, rand_state in zip(extracted, get_loggers_from_work_dir(log_dir, names), fork_seed(None, n=len(extracted))):
        if task.mod.attrs.get("tirx.is_scheduled", False):
            continue
        strategy = _DeadlineSearch(ms.search_strategy.EvolutionarySearch(
            population_size=population, init_min_unmeasured=min(50, population // 2),
            genetic_num_iters=4 if population >= 256 else 2))
        contexts.append(ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                                       search_strategy=strategy, task_name=task.task_name, logger=logger,
                                       rand_state=rand_state, num_threads=threads).clone())
        weights.append(task.weight)
    ms.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=log_dir,
        max_trials_global=int(spec["trials"]),
        max_trials_per_task=int(spec["trials_per_task"]),
        num_trials_per_iter=int(spec["trials_per_iter"]),
        builder=ms.builder.LocalBuilder(f_build=_fast_build, timeout_sec=60.0),
        runner=ms.runner.LocalRunner(timeout_sec=30.0),
        database=open_database(directory),
    )
    print("splitc: tuning finished", flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
