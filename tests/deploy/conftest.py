"""Fixtures of the deploy tests: the chart rendered per values file, tools, the real metric names."""

from __future__ import annotations

import pytest
from deployutil import VALUES_FILES, Rendered, load_values, render, tool


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool", venv=False)


@pytest.fixture(scope="session", params=sorted(VALUES_FILES))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    """The chart rendered with each shipped values file."""
    return render(load_values(request.param))


@pytest.fixture(scope="session")
def metric_families() -> dict[str, str]:
    """Every metric family the services register: name -> type (counter, gauge, histogram, info)."""
    from prometheus_client import CollectorRegistry

    from services.generator.metrics import GeneratorMetrics
    from services.learner.metrics import LearnerMetrics

    families: dict[str, str] = {}
    for cls in (LearnerMetrics, GeneratorMetrics):
        registry = CollectorRegistry()
        cls(registry, run_id="tiny")
        for family in registry.collect():
            families[family.name] = family.type
    return families


@pytest.fixture(scope="session")
def series_names(metric_families: dict[str, str]) -> set[str]:
    """Every series name a query may use: family names plus their exposition suffixes."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names: set[str] = set()
    for name, kind in metric_families.items():
        for suffix in suffixes.get(kind, ("",)):
            names.add(name + suffix)
    return names
