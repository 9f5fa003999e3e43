"""``GET /metrics``: the server's Prometheus metrics (``prometheus-client``), in a registry of their own so two
servers in one process (tests, benches) never share counters. Names start with ``steerscale_``; the engine
loop's queue depth, running batch size and decoding steps are read from the scheduler at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """Counters and histograms one server updates; ``render()`` is the ``/metrics`` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("steerscale_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("steerscale_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("steerscale_generation_tokens", "tokens generated for served requests",
                                         registry=r)
        self.ttft = Histogram("steerscale_time_to_first_token_seconds",
                              "from a generation request's arrival to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("steerscale_e2e_request_latency_seconds",
                                 "from a generation request's arrival to its last byte", buckets=LATENCY_BUCKETS,
                                 registry=r)
        Gauge("steerscale_queue_depth", "requests waiting to join the running batch",
              registry=r).set_function(lambda: scheduler.queue_depth)
        Gauge("steerscale_running_rows", "rows in the running batch", registry=r).set_function(
            lambda: scheduler.running)
        Gauge("steerscale_decoding_steps", "forward passes of the running batch since start",
              registry=r).set_function(lambda: scheduler.steps)
        self.in_flight = Gauge("steerscale_requests_in_flight", "generation requests admitted and not answered",
                               registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
