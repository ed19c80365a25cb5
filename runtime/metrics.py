"""Prometheus metrics of a serving process (GET /metrics on the REST port).

Each server owns its registry (no module-level collectors), so several servers in one process,
as in the tests, count separately. Series, labelled by model (and protocol, HTTP status or gRPC
code where it applies):

    splitc_requests_total{model,protocol,code}      every answered request, refusals included
    splitc_request_seconds{model,protocol}          latency of answered infer requests (histogram)
    splitc_errors_total{model,protocol,kind}        4xx / 5xx / shed (503 from admission control)
    splitc_batch_size{model}                        requests run together per backend call
    splitc_queue_seconds{model}                     time the oldest request of a batch waited
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("splitc_requests", "Requests answered", ["model", "protocol", "code"], registry=self.registry)
        self.latency = Histogram("splitc_request_seconds", "Infer latency, request received to answer sent",
                                 ["model", "protocol"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("splitc_errors", "Refused or failed requests", ["model", "protocol", "kind"], registry=self.registry)
        self.batch = Histogram("splitc_batch_size", "Requests per backend call", ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queued = Histogram("splitc_queue_seconds", "Wait of a batch's oldest request for a worker", ["model"],
                                buckets=LATENCY_BUCKETS, registry=self.registry)

    def answered(self, model: str, protocol: str, code: int | str, seconds: float | None = None) -> None:
        self.requests.labels(model, protocol, str(code)).inc()
        if seconds is not None:
            self.latency.labels(model, protocol).observe(seconds)
        if code == 503 or code == "RESOURCE_EXHAUSTED":
            self.errors.labels(model, protocol, "shed").inc()
        elif isinstance(code, int) and code >= 400:
            self.errors.labels(model, protocol, "4xx" if code < 500 else "5xx").inc()
        elif isinstance(code, str) and code != "OK":
            self.errors.labels(model, protocol, code).inc()

    def batch_observer(self, model: str):
        batch, queued = self.batch.labels(model), self.queued.labels(model)

        def observe(size: int, waited: float) -> None:
            batch.observe(size)
            queued.observe(waited)

        return observe

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
