"""Prometheus metrics, one registry per app (so several apps can live in one process, as in tests).

Names follow vLLM's where one exists, under the `ernie_serve_` prefix.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # the *_created series only double the output; nothing here reads them

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ernie_serve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("ernie_serve_sequences_finished", "Generated sequences by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("ernie_serve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("ernie_serve_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("ernie_serve_time_to_first_token_seconds",
                              "Arrival to first generated token, queueing included", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.latency = Histogram("ernie_serve_e2e_request_latency_seconds", "Arrival to last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("ernie_serve_decode_batch_size", "Sequences in each decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.running = Gauge("ernie_serve_num_requests_running", "Requests in the decode batch", registry=r)
        self.waiting = Gauge("ernie_serve_num_requests_waiting", "Requests waiting for a batch slot", registry=r)

    def watch_engine(self, engine) -> None:
        """Read running/waiting from the engine at scrape time."""
        self.running.set_function(lambda: engine.num_running)
        self.waiting.set_function(lambda: engine.num_waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
