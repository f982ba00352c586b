"""Prometheus' text exposition format, shared by the router's /metrics and each node's.

`header` and `sample` write the lines of a family; `process_families()` the standard process_* /
python_* families of this process (prometheus_client's collectors, as vLLM's servers expose).
"""

from __future__ import annotations

import functools
import math

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest

Labels = tuple[tuple[str, str], ...]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def labels_text(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}" if labels else ""


def number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if value != int(value) or abs(value) >= 1e15 else str(int(value))


def header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def sample(name: str, labels: Labels, value: float) -> str:
    return f"{name}{labels_text(labels)} {number(value)}"


@functools.cache
def _process_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    return registry


def process_families() -> str:
    return generate_latest(_process_registry()).decode()
