"""Admission control, a worker pool and an optional dynamic batcher between a server's protocol
front ends (HTTP, gRPC) and the partitions it runs.

    scheduler = Scheduler(run_one, workers=2, max_queue=64)               # per-request execution
    scheduler = Scheduler(run_one, run_batch=run_many, max_batch=8, max_delay_ms=2)
    future = scheduler.submit(arrays)   # concurrent.futures.Future; raises Overloaded when full
    scheduler.close()                   # finishes what was admitted, then stops the workers

Why a bounded queue: past the compute bound, every extra client only lengthens the queue, so
p99 grows with the number of clients. Refusing at once (503 + Retry-After) keeps the latency of
admitted requests bounded by max_queue x service time / workers, and tells clients to back off.

Why workers and not one lock: ONNX Runtime (and the other backends) release the GIL while they
compute, so with one worker per core a process computes as many requests at once as it has
cores. The partition runner must be safe to call from `workers` threads (PartitionServer is).

The batcher (run_batch given, max_batch > 1): a worker that takes a request waits up to
max_delay_ms for more, up to max_batch, and runs them as one batch. Only for partitions that
take a batch dimension; whether it helps is measured (bench/serve_load.py), not assumed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class Overloaded(Exception):
    """The queue is full: answer 503 with Retry-After."""


@dataclass
class _Job:
    payload: Any
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


_STOP = object()


class Scheduler:
    def __init__(self, run_one: Callable[[Any], Any], *, workers: int = 1, max_queue: int = 64,
                 run_batch: Callable[[Sequence[Any]], Sequence[Any]] | None = None, max_batch: int = 1,
                 max_delay_ms: float = 2.0, on_batch: Callable[[int, float], None] | None = None, name: str = "splitc"):
        if workers < 1 or max_queue < 1 or max_batch < 1 or max_delay_ms < 0:
            raise ValueError("workers, max_queue and max_batch must be >= 1, max_delay_ms >= 0")
        self.run_one, self.run_batch = run_one, run_batch
        self.max_batch = max_batch if run_batch is not None else 1
        self.max_delay = max_delay_ms / 1e3
        self.on_batch = on_batch  # (batch size, seconds the oldest request waited): for metrics
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-worker-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, payload: Any) -> Future:
        if self._closed:
            raise Overloaded("the server is shutting down")
        job = _Job(payload)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self.max_queue} requests are already queued") from None
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Run what was admitted, then stop the workers."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------------------ workers

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            jobs = [job]
            stop = self._collect(jobs) if self.max_batch > 1 else False
            self._run(jobs)
            if stop:
                return

    def _collect(self, jobs: list[_Job]) -> bool:
        """Add queued jobs to `jobs` until max_batch or max_delay after the first; True when a
        stop marker was taken (run this batch, then exit)."""
        deadline = jobs[0].queued + self.max_delay
        while len(jobs) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is _STOP:
                return True
            jobs.append(job)
        return False

    def _run(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        if self.on_batch is not None:
            self.on_batch(len(jobs), time.perf_counter() - jobs[0].queued)
        if len(jobs) > 1:
            try:
                results = self.run_batch([j.payload for j in jobs])
            except BaseException:  # noqa: BLE001 - one bad request must not fail the others: run each alone
                pass
            else:
                for job, result in zip(jobs, results, strict=True):
                    job.future.set_result(result)
                return
        for job in jobs:
            try:
                job.future.set_result(self.run_one(job.payload))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                job.future.set_exception(exc)
