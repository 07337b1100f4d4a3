"""Every Prometheus Operator resource of the chart is guarded by the CRD check."""

from __future__ import annotations

from deployutil import CHART


def test_every_operator_resource_checks_for_the_crds() -> None:
    guarded = []
    for path in sorted((CHART / "templates").glob("*.yaml")):
        text = path.read_text()
        if "apiVersion: monitoring.coreos.com/v1" in text:
            assert 'include "lpreg.monitoring.checkCRDs"' in text, path.name
            guarded.append(path.name)
    assert guarded == ["podmonitor.yaml", "prometheusrule.yaml", "servicemonitor.yaml"]


def test_the_check_fails_with_what_to_do() -> None:
    text = (CHART / "templates" / "_monitoring.tpl").read_text()
    assert '.Capabilities.APIVersions.Has "monitoring.coreos.com/v1"' in text
    assert "Install the Prometheus Operator" in text
    assert "monitoring.podMonitor.enabled=false" in text
