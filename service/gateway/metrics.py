"""Prometheus metrics of one gateway app (its own CollectorRegistry, so apps never collide).

- `reward_gateway_requests_total{endpoint,method,status}` and
  `reward_gateway_request_seconds{endpoint,method,status}`: every HTTP request, by route template;
- `reward_gateway_images_scored_total{endpoint}`;
- `reward_gateway_embedding_cache_hits_total` / `_misses_total` / `_entries`;
- `reward_gateway_backend_seconds{call,outcome}`: round trip of each backend call;
- `reward_gateway_textnorm{prompt_set}`: returned TextNorm values, labelled by the prompt-set id
  they were computed with, or "rule" / "explicit" (trainers alert on drift); ids past the first
  `MAX_SET_LABELS` share the label "other", so clients cannot grow the series without bound;
- `reward_gateway_prompts_truncated_total`;
- `reward_gateway_admission_in_use{limit}` / `reward_gateway_admission_limit{limit}` (each
  admission budget), `reward_gateway_refusals_total{cause}` (each refusal cause) and
  `reward_gateway_idempotent_replays_total`;
- `reward_gateway_triton_restarts_total{cause}` (exited / hung / stub_died) and
  `reward_gateway_rate_limited_total` (per-key rate limit 429s).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TEXTNORM_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
MAX_SET_LABELS = 200
REFUSAL_CAUSES = (
    "requests_in_flight",
    "body_bytes_in_flight",
    "images_in_flight",
    "decoded_bytes_in_flight",
    "backend_timeout",
    "backend_unavailable",
    "model_mismatch",
    "request_id_conflict",
)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._set_labels: set[str] = {"rule", "explicit"}
        r = self.registry
        self.requests = Counter(
            "reward_gateway_requests",
            "HTTP requests by endpoint (route template), method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "reward_gateway_request_seconds",
            "HTTP request latency in seconds",
            ["endpoint", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images_scored = Counter(
            "reward_gateway_images_scored", "images scored", ["endpoint"], registry=r
        )
        self.cache_hits = Counter(
            "reward_gateway_embedding_cache_hits", "text-embedding cache hits", registry=r
        )
        self.cache_misses = Counter(
            "reward_gateway_embedding_cache_misses", "text-embedding cache misses", registry=r
        )
        self.cache_entries = Gauge(
            "reward_gateway_embedding_cache_entries", "text embeddings held", registry=r
        )
        self.model_mismatch = Gauge(
            "reward_gateway_model_mismatch",
            "1 while the backend serves another export than the provenance names (no scoring)",
            registry=r,
        )
        self.backend_seconds = Histogram(
            "reward_gateway_backend_seconds",
            "round trip of backend calls in seconds",
            ["call", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.merged_calls = Histogram(
            "reward_gateway_backend_merged_calls",
            "callers per backend call sent (concurrent calls merged: coalescing.py)",
            ["call"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.textnorm = Histogram(
            "reward_gateway_textnorm",
            "returned TextNorm rewards by prompt-set id (or 'rule' / 'explicit')",
            ["prompt_set"],
            buckets=_TEXTNORM_BUCKETS,
            registry=r,
        )
        self.prompts_truncated = Counter(
            "reward_gateway_prompts_truncated",
            "prompts truncated to CLIP's context length",
            registry=r,
        )
        # -- admission control (service/gateway/admission.py) and refusals ---------------------
        self.admission_in_use = Gauge(
            "reward_gateway_admission_in_use",
            "current use of each admission budget (requests, body_bytes, images, "
            "decoded_bytes, backend_calls)",
            ["limit"],
            registry=r,
        )
        self.admission_limit = Gauge(
            "reward_gateway_admission_limit",
            "each admission budget's limit (past it: 429 with Retry-After; backend_calls, "
            "the calls out to Triton, queues instead)",
            ["limit"],
            registry=r,
        )
        self.refusals = Counter(
            "reward_gateway_refusals",
            "requests refused, by cause (requests_in_flight, body_bytes_in_flight, "
            "images_in_flight, decoded_bytes_in_flight: 429; backend_timeout: 504; "
            "backend_unavailable, model_mismatch: 503; request_id_conflict: 409)",
            ["cause"],
            registry=r,
        )
        for cause in REFUSAL_CAUSES:  # every cause in /metrics from the start, at 0
            self.refusals.labels(cause)
        self.idempotent_replays = Counter(
            "reward_gateway_idempotent_replays",
            "requests answered from the request_id cache (a client's retry)",
            registry=r,
        )
        # -- security helper (issue 13): supervision and per-key rate limits -------------------
        self.triton_restarts = Counter(
            "reward_gateway_triton_restarts",
            "restarts of the bundled Triton by the `serve` supervisor, by cause (exited, hung, "
            "stub_died)",
            ["cause"],
            registry=r,
        )
        self.rate_limited = Counter(
            "reward_gateway_rate_limited",
            "requests refused with 429 by the per-key rate limit (rate_limit_per_key_rps)",
            registry=r,
        )

    def observe_textnorm(self, label: str, value: float) -> None:
        if label not in self._set_labels:
            if len(self._set_labels) >= MAX_SET_LABELS:
                label = "other"
            else:
                self._set_labels.add(label)
        self.textnorm.labels(label).observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
