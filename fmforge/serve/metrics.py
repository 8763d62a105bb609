"""Prometheus metrics of the server (text format at GET /metrics), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

ROUTES = ("/", "/health", "/metrics", "/openapi.json", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/v1/embeddings", "/v1/images/generations")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("fmforge_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=registry)
        self.latency = Histogram("fmforge_request_seconds", "Time from request to the end of the response "
                                 "(the last byte of a stream)", ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token = Histogram("fmforge_time_to_first_token_seconds", "Time from a sequence's admission "
                                     "to the queue to its first generated token", buckets=LATENCY_BUCKETS,
                                     registry=registry)
        self.prompt_tokens = Counter("fmforge_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.completion_tokens = Counter("fmforge_completion_tokens", "Tokens generated for finished requests",
                                         registry=registry)
        self.cancelled = Counter("fmforge_cancelled_sequences", "Sequences stopped unfinished: the client went away, "
                                 "a sibling sequence failed, or the drain deadline passed",
                                 registry=registry)
        self.rejected = Counter("fmforge_rejected_requests", "Requests refused with 429 (queue full)",
                                registry=registry)
        self.refused = Counter("fmforge_refused_connections", "Requests refused with 503 because more than "
                               "--max-connections connections were open", registry=registry)
        Gauge("fmforge_queue_depth", "Sequences waiting for a slot", registry=registry).set_function(
            lambda: engine.waiting)
        Gauge("fmforge_running_sequences", "Sequences in the KV cache (prefilling or decoding)", registry=registry).set_function(
            lambda: engine.running)
        Gauge("fmforge_batch_slots", "Sequences decoded together at most", registry=registry).set(engine.max_batch)
        Gauge("fmforge_kv_cache_bytes_per_token", "KV-cache bytes one token takes: 2 x layers x KV heads x head_dim "
              "x the dtype's size", registry=registry).set(engine.cache.bytes_per_token)
        Gauge("fmforge_kv_cache_bytes_per_sequence", "KV-cache bytes one sequence may take at most (its context, or "
              "a sliding window's ring)", registry=registry).set(engine.cache.bytes_per_token * engine.cache.capacity)
        registry.register(_EngineCounters(engine))
        engine.on_first_token = self.first_token.observe

    def route(self, path: str) -> str:
        return path if path in ROUTES else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCounters:
    """Counters the engine thread keeps itself, read at scrape time."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily("fmforge_decode_steps", "Batched decode forwards", value=self.engine.steps)
        yield CounterMetricFamily("fmforge_speculative_steps", "Decode forwards that verified drafted tokens",
                                  value=self.engine.speculative_steps)
        yield CounterMetricFamily("fmforge_accepted_draft_tokens", "Drafted tokens accepted by verification",
                                  value=self.engine.accepted_draft_tokens)
        yield CounterMetricFamily("fmforge_engine_generated_tokens", "Tokens sampled by the engine (finished or not)",
                                  value=self.engine.generated_tokens)
