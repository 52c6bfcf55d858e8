"""Prometheus metrics of the inference server, in their own registry (never the global one).

Names follow Triton (request success/failure and duration per model and version) and vLLM
(time to first token, inter-token latency, tokens/s). Labels never carry client-chosen
strings: a request for an unknown model is counted under ``model=""``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Request latency buckets in seconds: 100 µs (a tiny model) to 60 s (a long generation).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # fmt: skip
# Time to first token: prefill of a short prompt (~10 ms) to a long one on a slow board (~10 s).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Inter-token latency: 1000 tok/s down to 1 tok/s.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.25, 0.5, 1.0)
# Decode speed of one request, tokens per second, for boards from a Pi to a GPU.
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000)
# Items per model call; powers of two up to the largest batch an encoder accepts.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class RequestTimer:
    """The metric children of one (model, version, endpoint), bound once for speed."""

    success: Any
    duration: Any
    model: str
    version: str
    endpoint: str


class Metrics:
    """Every metric the server exports, registered in one private CollectorRegistry."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.process_collector import ProcessCollector

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        mv = ["model", "version"]
        self.success = Counter("edge_inference_request_success", "Inference requests that succeeded.",
                               [*mv, "endpoint"], registry=r)
        self.failure = Counter("edge_inference_request_failure", "Inference requests that failed, by error code.",
                               [*mv, "endpoint", "code"], registry=r)
        self.duration = Histogram("edge_inference_request_duration_seconds",
                                  "End-to-end handling time of successful requests.",
                                  [*mv, "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_errors = Counter("edge_http_errors", "Error responses, by status.", ["status"], registry=r)
        self.ttft = Histogram("edge_time_to_first_token_seconds", "Time from request to first generated token.",
                              mv, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("edge_inter_token_latency_seconds", "Time between two generated tokens.",
                             mv, buckets=ITL_BUCKETS, registry=r)
        self.tokens_per_s = Histogram("edge_generation_tokens_per_second", "Decode speed of each finished request.",
                                      mv, buckets=TOKENS_PER_S_BUCKETS, registry=r)
        self.prompt_tokens = Counter("edge_prompt_tokens", "Prompt tokens processed.", mv, registry=r)
        self.generation_tokens = Counter("edge_generation_tokens", "Tokens generated.", mv, registry=r)
        self.queue_depth = Gauge("edge_queue_depth", "Requests waiting for the model.", mv, registry=r)
        self.active = Gauge("edge_active_requests", "Requests the model is working on.", mv, registry=r)
        self.batch_size = Histogram("edge_batch_size", "Items per model call of the dynamic batcher.",
                                    mv, buckets=BATCH_BUCKETS, registry=r)
        self.model_info = Gauge("edge_model_info", "Loaded models with their task and the execution provider in use.",
                                [*mv, "task", "provider"], registry=r)
        self.model_ready = Gauge("edge_model_ready", "1 when the model serves requests.", mv, registry=r)
        self.load_seconds = Gauge("edge_model_load_seconds", "Time the model took to load.", mv, registry=r)
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds, start time.
        ProcessCollector(registry=r)
        self._timers: dict[tuple[str, str, str], RequestTimer] = {}
        self._info: dict[tuple[str, str], tuple[str, str, str, str]] = {}

    def timer(self, model: str, version: str, endpoint: str) -> RequestTimer:
        """Return the bound metric children of one model version and endpoint."""
        key = (model, version, endpoint)
        t = self._timers.get(key)
        if t is None:
            t = RequestTimer(self.success.labels(*key), self.duration.labels(*key), *key)
            self._timers[key] = t
        return t

    def observe_success(self, t: RequestTimer, seconds: float) -> None:
        """Count one successful request and its duration."""
        t.success.inc()
        t.duration.observe(seconds)

    def observe_failure(self, model: str, version: str, endpoint: str, code: str) -> None:
        """Count one failed request under its model."""
        self.failure.labels(model, version, endpoint, code).inc()

    def observe_http_error(self, status: int) -> None:
        """Count one error response (every one passes through the error handlers)."""
        self.http_errors.labels(str(status)).inc()

    def model_loaded(self, model: str, version: str, task: str, provider: str, seconds: float) -> None:
        """Record a model that finished loading, with the provider ORT actually chose."""
        self.model_gone(model, version)
        self._info[(model, version)] = (model, version, task, provider)
        self.model_info.labels(model, version, task, provider).set(1)
        self.model_ready.labels(model, version).set(1)
        self.load_seconds.labels(model, version).set(seconds)

    def model_gone(self, model: str, version: str) -> None:
        """Record a model that was unloaded or failed."""
        self.model_ready.labels(model, version).set(0)
        labels = self._info.pop((model, version), None)
        if labels is not None:
            self.model_info.remove(*labels)

    def render(self) -> tuple[bytes, str]:
        """Return the exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
