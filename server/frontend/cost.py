"""Running cost for /metrics under `--cost-per-hour USD`.

Cost is wall time since the server started times the hourly rate (what a rented GPU node
bills), whether or not requests came. Divided by the output tokens and finished requests
so far it gives the unit costs a capacity planner compares across models and batch
settings. The per-unit gauges appear once there is something to divide by.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass
class Usage:
    """What the cost is spread over; the request trackers add to it."""

    output_tokens: int = 0
    finished_requests: int = 0


class CostCollector(Collector):
    """cost_usd_total, cost_per_hour_usd, cost_per_1k_output_tokens_usd and
    cost_per_10k_requests_usd, computed when scraped."""

    def __init__(self, prefixes: list[str], model: str, usd_per_hour: float, usage: Usage,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if usd_per_hour < 0:
            raise ValueError(f"cost per hour must be >= 0, got {usd_per_hour}")
        self.prefixes = prefixes
        self.model = model
        self.usd_per_hour = usd_per_hour
        self.usage = usage
        self.clock = clock
        self.start = clock()

    def describe(self) -> Iterable[Metric]:
        # Without this the registry would collect() at registration to learn the names.
        return []

    def spent_usd(self) -> float:
        return (self.clock() - self.start) / 3600.0 * self.usd_per_hour

    def collect(self) -> Iterable[Metric]:
        spent = self.spent_usd()
        tokens, requests = self.usage.output_tokens, self.usage.finished_requests
        series: list[tuple[type, str, str, float]] = [
            (CounterMetricFamily, "cost_usd",
             "Cost since the server started: hours x --cost-per-hour.", spent),
            (GaugeMetricFamily, "cost_per_hour_usd", "The --cost-per-hour rate.",
             self.usd_per_hour),
        ]
        if tokens:
            series.append((GaugeMetricFamily, "cost_per_1k_output_tokens_usd",
                           "Cost so far per 1000 generated tokens.", spent * 1000.0 / tokens))
        if requests:
            series.append((GaugeMetricFamily, "cost_per_10k_requests_usd",
                           "Cost so far per 10000 finished engine requests.",
                           spent * 10000.0 / requests))
        for p in self.prefixes:
            for family, name, doc, value in series:
                m = family(p + name, doc, labels=["model_name"])
                m.add_metric([self.model], value)
                yield m
