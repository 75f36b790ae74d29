"""The engine's statistics as prometheus_client metrics.

:class:`StatsCollector` reads a ``stats`` dict (``Engine.stats()`` plus the server's fields, as a
``stats`` request returns it) at each collection and yields Prometheus metric families. The
server's ``GET /metrics`` collects the live statistics; ``qllm stats --prometheus`` collects the
ones it fetched over the socket. Both go through :func:`registry`, so they print the same metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from qllm.kernel.stats import COUNTERS, HISTOGRAMS

PREFIX = "qllm"
# Per-request histograms whose plain names would clash with the counters of the same name.
HISTOGRAM_NAMES = {"preemptions": "request_preemptions", "tokens": "request_tokens"}
# The numbers of the memory, kernel and server sections that only go up (since the process
# started; the kernel's since Engine.reset_stats): Prometheus counters, exposed with ``_total``.
# Every other number there is a gauge.
COUNTS = {
    "kernel": {"batches", "ops", "rows", "decisions", "policy_errors"},
    "memory": {"offloads", "restores", "prefetches", "over_budget_events"},
    "memory_kv_blocks": {"blocks_allocated"},
    "prefix": {
        "lookups",
        "hits",
        "tokens_looked_up",
        "tokens_hit",
        "published",
        "evictions",
        "evicted_bytes",
    },
    "expert_parallel": {"remote_calls", "bytes_exchanged", "remote_wait_s", "moe_ops_remote"},
    "server": {
        "connections_accepted",
        "connections_refused",
        "tcp_connections_refused",
        "tcp_connections_shed",
    },
}


def metric_name(section: str, key: str) -> str:
    """The metric of ``stats[section][key]``: units spelled out (``uptime_s``: ``uptime_seconds``)."""
    if key.endswith("_s"):
        key = key.removesuffix("_s") + "_seconds"
    return f"{PREFIX}_{section}_{key}"


def _number_family(section: str, key: str, help_text: str, value: float) -> Any:
    """One unlabelled sample: a counter if the key is one of ``COUNTS[section]``, else a gauge."""
    name = metric_name(section, key)
    if key in COUNTS.get(section, ()):
        family = CounterMetricFamily(name, help_text)
        family.add_metric([], value)
        return family
    return GaugeMetricFamily(name, help_text, value=value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class StatsCollector(Collector):
    """Prometheus metric families of the ``stats`` dict that ``source`` returns."""

    def __init__(self, source: Callable[[], Mapping[str, Any]]):
        self.source = source

    def collect(self) -> Iterator[Any]:
        stats = self.source()
        metrics = stats.get("metrics", {})
        classes = [c for c, m in metrics.items() if isinstance(m, Mapping) and "histograms" in m]
        yield from self._per_class(metrics, classes)
        yield from self._gauges(stats)
        yield from self._tenants(stats)

    def _per_class(self, metrics: Mapping[str, Any], classes: list[str]) -> Iterator[Any]:
        requests = CounterMetricFamily(
            f"{PREFIX}_requests", "Finished requests by class and status.", labels=["class", "status"]
        )
        for c in classes:
            for status, n in metrics[c]["requests"].items():
                requests.add_metric([c, status], n)
        yield requests
        for counter, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"{PREFIX}_{counter}", help_text, labels=["class"])
            for c in classes:
                family.add_metric([c], metrics[c].get(counter, 0))
            yield family
        for name, (help_text, _) in HISTOGRAMS.items():
            family = HistogramMetricFamily(
                f"{PREFIX}_{HISTOGRAM_NAMES.get(name, name)}", help_text, labels=["class"]
            )
            for c in classes:
                h = metrics[c]["histograms"].get(name)
                if h is None:
                    continue
                buckets = [(repr(float(bound)), n) for bound, n in h["buckets"]]
                buckets.append(("+Inf", h["count"]))
                family.add_metric([c], buckets, h["sum"])
            yield family

    def _gauges(self, stats: Mapping[str, Any]) -> Iterator[Any]:
        live = GaugeMetricFamily(
            f"{PREFIX}_live_requests", "Live requests by class and status.", labels=["class", "status"]
        )
        for c, by_status in (stats.get("live") or {}).items():
            for status, n in by_status.items():
                live.add_metric([c, status], n)
        yield live
        queues = GaugeMetricFamily(
            f"{PREFIX}_queue_length", "Requests in each kernel queue.", labels=["queue"]
        )
        for queue, n in (stats.get("queues") or {}).items():
            if _number(n):
                queues.add_metric([str(queue)], n)
        yield queues
        sections = (
            ("memory", "Tensor manager"),
            ("prefix", "Prefix cache"),
            ("kernel", "Kernel"),
            ("expert_parallel", "Expert parallel"),
            ("server", "Server"),
        )
        for section, what in sections:
            values = stats.get(section)
            if not isinstance(values, Mapping):
                continue
            for key, value in values.items():
                if _number(value):
                    help_text = f"{what}: {key.replace('_', ' ')}."
                    yield _number_family(section, key, help_text, value)
                elif section == "expert_parallel" and key == "healthy":
                    yield GaugeMetricFamily(
                        metric_name(section, key),
                        "Expert parallel: 1 while every rank answers.",
                        value=int(value),
                    )
                elif section == "expert_parallel" and key == "expert_bytes":
                    family = GaugeMetricFamily(
                        metric_name(section, key),
                        "Expert parallel: routed-expert weight bytes by rank.",
                        labels=["rank"],
                    )
                    for rank, n in enumerate(value):
                        family.add_metric([str(rank)], n)
                    yield family
                elif section == "memory" and isinstance(value, Mapping):  # the KV block pool's counts
                    for sub, v in value.items():
                        if _number(v):
                            help_text = f"{what}: {key.replace('_', ' ')}, {sub.replace('_', ' ')}."
                            yield _number_family(f"{section}_{key}", sub, help_text, v)

    def _tenants(self, stats: Mapping[str, Any]) -> Iterator[Any]:
        tenants = stats.get("tenants")
        if isinstance(tenants, Mapping):
            yield from _tenant_families(tenants)
        fairness = stats.get("fairness")
        if isinstance(fairness, Mapping):
            for key, help_text in (
                ("jain_index", "Jain's fairness index of the backlogged tenants' recent weighted service."),
                ("backlogged", "Tenants with requests waiting or running."),
            ):
                if _number(fairness.get(key)):
                    yield GaugeMetricFamily(f"{PREFIX}_fairness_{key}", help_text, value=fairness[key])


# Per-tenant figures of ``stats["tenants"]``: (metric, key, help, counter?). The ``tenant`` label
# is bounded: the ledger tracks at most ``max_tenants`` tenants besides the named ones.
TENANT_METRICS = (
    ("tenant_service_seconds", "service_s", "Op seconds the tenant's requests received.", True),
    ("tenant_requests", "requests", "Requests accepted for the tenant.", True),
    ("tenant_rejected", "rejected", "Requests refused over the tenant's quota.", True),
    ("tenant_tokens", "tokens", "Tokens generated for the tenant.", True),
    ("tenant_weight", "weight", "The tenant's weight.", False),
    ("tenant_counter_seconds", "counter", "The tenant's weighted service (op seconds / weight).", False),
    ("tenant_live_requests", "live", "The tenant's requests waiting or running.", False),
)


def _tenant_families(tenants: Mapping[str, Any]) -> Iterator[Any]:
    for name, key, help_text, counter in TENANT_METRICS:
        kind = CounterMetricFamily if counter else GaugeMetricFamily
        family = kind(f"{PREFIX}_{name}", help_text, labels=["tenant"])
        for tenant, figures in tenants.items():
            if isinstance(figures, Mapping) and _number(figures.get(key)):
                family.add_metric([str(tenant)], figures[key])
        yield family


def registry(source: Callable[[], Mapping[str, Any]]) -> CollectorRegistry:
    """A registry holding one :class:`StatsCollector` over ``source``."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(source))
    return reg


def exposition(stats: Mapping[str, Any]) -> bytes:
    """The Prometheus text format (0.0.4) of a ``stats`` dict."""
    return generate_latest(registry(lambda: stats))
