"""What the agent reports about itself: capabilities at birth, and periodic telemetry.

Inference figures come from the inference server's Prometheus registry
(:class:`MetricsSampler`): cumulative request and error counts, and latency p50/p95 and
tokens/s over the interval since the previous sample (quantiles interpolated within histogram
buckets, as Prometheus' ``histogram_quantile`` does). System figures come from psutil, and the
temperature from ``/sys/class/thermal`` where the board exposes it.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge.protocol.messages import Capabilities

THERMAL_ROOT = Path("/sys/class/thermal")
# Prometheus names of the inference server's metrics (edge.agent.server.metrics).
SUCCESS = "edge_inference_request_success_total"
FAILURE = "edge_inference_request_failure_total"
DURATION_BUCKET = "edge_inference_request_duration_seconds_bucket"
TOKENS = "edge_generation_tokens_total"
MODEL_INFO = "edge_model_info"


@dataclass(frozen=True)
class InferenceStats:
    """Inference figures for one telemetry message."""

    requests: int = 0  # since the agent started
    errors: int = 0  # since the agent started
    latency_p50_ms: float | None = None  # over the last interval
    latency_p95_ms: float | None = None
    tokens_per_s: float | None = None
    providers: dict[str, str] = field(default_factory=dict)  # model -> execution provider in use
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)


MetricsSource = Callable[[], InferenceStats]


@dataclass(frozen=True)
class SystemStats:
    """Machine figures for one telemetry message."""

    cpu_percent: float | None
    ram_used_mb: float | None
    ram_total_mb: float | None
    disk_free_mb: float | None
    temperature_c: float | None


def capabilities(data_dir: Path) -> Capabilities:
    """Describe what this device can run: architecture, providers, RAM, disk, CPUs."""
    import psutil

    from edge.runtime.session import available_providers

    return Capabilities(
        architecture=platform.machine(),
        providers=tuple(available_providers()),
        ram_mb=int(psutil.virtual_memory().total >> 20),
        disk_mb=int(psutil.disk_usage(str(data_dir)).total >> 20),
        cpu_count=os.cpu_count() or 0,
    )


def read_temperature(root: Path = THERMAL_ROOT) -> float | None:
    """Return the hottest thermal zone in °C, or None where the board exposes none."""
    hottest = None
    for zone in sorted(root.glob("thermal_zone*/temp")):
        try:
            millis = int(zone.read_text().strip())
        except (OSError, ValueError):
            continue
        celsius = millis / 1000.0
        if -50.0 < celsius < 200.0:  # some zones report garbage (e.g. -273 or 0x7fffffff)
            hottest = celsius if hottest is None else max(hottest, celsius)
    return hottest


def system_stats(data_dir: Path) -> SystemStats:
    """Measure CPU, memory, disk and temperature now."""
    import psutil

    mem = psutil.virtual_memory()
    try:
        free = psutil.disk_usage(str(data_dir)).free / 2**20
    except OSError:
        free = None
    return SystemStats(
        cpu_percent=psutil.cpu_percent(interval=None),  # since the previous call
        ram_used_mb=round((mem.total - mem.available) / 2**20, 1),
        ram_total_mb=round(mem.total / 2**20, 1),
        disk_free_mb=None if free is None else round(free, 1),
        temperature_c=read_temperature(),
    )


def process_uptime() -> float:
    """Return seconds since this process started."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Return the ``q`` quantile from cumulative (upper bound, count) buckets, or None if empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # beyond the largest finite bucket: its bound is the best guess
            span = count - prev_count
            frac = 0.0 if span <= 0 else (rank - prev_count) / span
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


class MetricsSampler:
    """Read the inference server's Prometheus registry; windowed figures since the last sample."""

    def __init__(self, registry: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self._clock = clock
        self._last_t = clock()
        self._last_buckets: dict[str, dict[float, float]] = {}
        self._last_tokens = 0.0

    def __call__(self) -> InferenceStats:
        """Return the figures now."""
        success: dict[str, float] = {}
        failure: dict[str, float] = {}
        buckets: dict[str, dict[float, float]] = {}
        providers: dict[str, str] = {}
        tokens = 0.0
        for family in self.registry.collect():
            for s in family.samples:
                model = s.labels.get("model", "")
                if s.name == SUCCESS:
                    success[model] = success.get(model, 0.0) + s.value
                elif s.name == FAILURE:
                    failure[model] = failure.get(model, 0.0) + s.value
                elif s.name == DURATION_BUCKET:
                    le = float(s.labels["le"])
                    per = buckets.setdefault(model, {})
                    per[le] = per.get(le, 0.0) + s.value
                elif s.name == TOKENS:
                    tokens += s.value
                elif s.name == MODEL_INFO and s.value:
                    providers[model] = s.labels.get("provider", "")
        now = self._clock()
        elapsed = max(now - self._last_t, 1e-9)
        window: dict[str, list[tuple[float, float]]] = {}
        for model, per in buckets.items():
            before = self._last_buckets.get(model, {})
            window[model] = [(le, per[le] - before.get(le, 0.0)) for le in sorted(per)]
        overall = _merge(window.values())
        per_model: dict[str, dict[str, float]] = {}
        for model in sorted(set(success) | set(failure) | set(window)):
            if not model:
                continue  # requests for unknown models: counted overall only
            row = {"requests": success.get(model, 0.0) + failure.get(model, 0.0), "errors": failure.get(model, 0.0)}
            for name, q in (("latency_p50_ms", 0.5), ("latency_p95_ms", 0.95)):
                v = quantile(q, window.get(model, []))
                if v is not None:
                    row[name] = round(v * 1000, 3)
            per_model[model] = row
        p50, p95 = quantile(0.5, overall), quantile(0.95, overall)
        token_rate = (tokens - self._last_tokens) / elapsed if tokens or self._last_tokens else None
        self._last_t, self._last_buckets, self._last_tokens = now, buckets, tokens
        return InferenceStats(
            requests=int(sum(success.values()) + sum(failure.values())),
            errors=int(sum(failure.values())),
            latency_p50_ms=None if p50 is None else round(p50 * 1000, 3),
            latency_p95_ms=None if p95 is None else round(p95 * 1000, 3),
            tokens_per_s=None if token_rate is None else round(token_rate, 2),
            providers=providers,
            per_model=per_model,
        )


def _merge(histograms: Any) -> list[tuple[float, float]]:
    total: dict[float, float] = {}
    for h in histograms:
        for le, count in h:
            total[le] = total.get(le, 0.0) + count
    return sorted(total.items())
