"""Prometheus metrics of one `vce serve` app, in its own registry (so two apps in one process,
as in the tests, never share counters)."""
from __future__ import annotations

from typing import Callable


class ServeMetrics:
    def __init__(self, queue_depth: Callable[[], float]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("vce_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.errors = Counter("vce_errors", "Requests refused or failed, by route and error code",
                              ["route", "code"], registry=self.registry)
        self.latency = Histogram("vce_request_seconds", "Time from the first byte read to the answer, by route",
                                 ["route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_rows = Histogram("vce_batch_rows", "Engine rows (samples) per merged batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_requests = Histogram("vce_batch_requests", "Requests per merged batch", registry=self.registry,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_depth = Gauge("vce_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.in_flight = Gauge("vce_in_flight", "Requests being answered now", registry=self.registry)

    def on_batch(self, rows: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
