"""The tuning child process: MetaSchedule's search, run by backends/tvm/driver.py.

Best of tuned and untuned, per task: before searching, the child measures every task's untuned
code and stores it as a record with an empty schedule, and, for 1x1 convolutions, splitc's own
schedules (backends/tvm/pointwise.py, one per tile shape) as more records. MetaSchedule applies the
fastest record of each task, so a task whose tuned schedules are all slower than its untuned code
stays untuned. Every candidate is timed with its weights and output flushed from the caches (as they
arrive in a whole model) and with the thread count the deployed build runs with. Records already in
the database are timed again before a resumed search and the fastest few of each task side by side
after it (`_remeasure_top`). The child stops proposing candidates at its deadline (`_DeadlineSearch`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from splitc.backends.tvm.database import (
    is_untuned,
    mean_run_time,
    open_database,
    ranked_records,
    read_database,
    rewrite_run_times,
)
from splitc.backends.tvm.rpc import DIRECT_KEY, alloc_arguments, direct_session, export_shared_library
from splitc.backends.tvm.target_keys import vector_bits
from splitc.core.errors import BackendError, first_line

RETIMED_FILE = "retimed.json"  # in a run's temporary directory: the child's re-timing factors, for the report
FINALISTS_FILE = "finalists.json"  # in a run's temporary directory: what the final re-timing changed, for the report
FINALISTS = 3     # records per task timed again, side by side, after the search
FINAL_ROUNDS = 3  # rounds of that re-timing (each candidate once per round)


def fast_build(mod, target, _params):
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


def run_search(spec_path: str) -> None:
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
            jobs = [(fast_build, self.f_export, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
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
        config = RPCConfig(tracker_host=rpc["host"], tracker_port=int(rpc["port"]), tracker_key=rpc["key"] or DIRECT_KEY,
                           session_timeout_sec=120)
        return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1,
                                   f_create_session=None if rpc["key"] else direct_session, f_alloc_argument=alloc_arguments)

    builder = _PoolBuilder(f_export=export_shared_library if rpc else None)
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
                times[i].append(mean_run_time(result.run_secs))
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

    workloads, records, _ = read_database(directory)
    index_of = {json.loads(line)[0]: index for index, line in enumerate(workloads)}
    ranked = ranked_records(records)
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
            ratios.setdefault(index, []).append(mean_run_time(measured) / recorded)
    factors = {index: statistics.median(values) for index, values in ratios.items()}
    rewrite_run_times(directory, records, new_times, factors)
    results = []
    for index, factor in factors.items():
        now = min((mean_run_time(new_times[p]) if p in new_times else mean * factor, p) for mean, p in ranked[index])
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


def _untuned_trace(func_mod):
    import tvm

    schedule = tvm.s_tir.Schedule(func_mod)
    schedule.get_sblock("root")
    return schedule.trace
