"""Coverage: how many of a prepared module's tasks the database holds a record for, and the
variant of preparation (pre-packing, Winograd) that the database covers best.

Best of tuned and untuned, per task: a tuning run stores every task's untuned code as a record
(backends/tvm/search.py), so a task whose fastest record is its untuned code is counted as covered
and stays untuned when the database is applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from splitc.backends.tvm.database import BestRecords, is_untuned
from splitc.backends.tvm.prepare import extract_tasks, prepare, uses_winograd, winograd_enabled


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
