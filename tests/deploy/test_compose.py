"""The local stack: docker-compose.yml and its lpreg config."""

from __future__ import annotations

from pathlib import Path

import yaml
from deployutil import COMPOSE_CONFIG, COMPOSE_FILE, REPO, run_tool, tool


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_config_is_valid() -> None:
    run_tool([tool("docker-compose", venv=True), "-f", str(COMPOSE_FILE), "config", "-q"])


def test_compose_lpreg_config_loads(tmp_path: Path) -> None:
    from lpreg_core.config import load_config

    config = load_config(COMPOSE_CONFIG)
    assert config.generator.backend.type == "hf"
    assert config.task.type == "arithmetic"
    assert config.control.host == config.metrics.host == "0.0.0.0"
    assert config.redis.url == "redis://redis:6379/0"
    assert config.control.learner_address == "learner:50051"
    assert config.broadcast.advertise_host == "learner"


def test_finished_learner_stays_down() -> None:
    from lpreg_core.config import load_config

    # Exit 0 after the last step plus on-failure: done means stopped, not restarted.
    assert load_config(COMPOSE_CONFIG).learner.exit_when_done is True
    assert compose()["services"]["learner"]["restart"] == "on-failure"


def test_prometheus_loads_the_chart_rules() -> None:
    volumes = compose()["services"]["prometheus"]["volumes"]
    assert "./deploy/helm/lpreg/rules:/etc/prometheus/rules:ro" in volumes


def test_generator_scales() -> None:
    generator = compose()["services"]["generator"]
    # --scale generator=N: a fixed name or host port would collide between replicas.
    assert "container_name" not in generator
    assert "ports" not in generator


def test_services_share_one_image_built_from_deploy_dockerfile() -> None:
    services = compose()["services"]
    for name in ("learner", "generator"):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert services[name]["image"] == services["learner"]["image"]
        assert ":latest" not in services[name]["image"]
    for name in ("redis", "prometheus", "grafana"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image


def test_grafana_uses_the_chart_dashboards() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in grafana["volumes"] if m.startswith("./")}
    assert mounts["./deploy/helm/lpreg/dashboards"].startswith("/var/lib/grafana/dashboards")
    provider = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/dashboards/lpreg.yml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] == mounts["./deploy/helm/lpreg/dashboards"]
    for mount in mounts:
        assert (REPO / mount).exists(), mount


def test_no_secret_in_files_beyond_local_defaults() -> None:
    text = COMPOSE_FILE.read_text()
    # Every credential is an env substitution with a local-only default, overridable from .env.
    assert "${LPREG_AUTH_TOKEN:-" in text
    assert "${LPREG_REDIS_PASSWORD:-" in text
    assert "LPREG_AUTH_TOKEN" not in COMPOSE_CONFIG.read_text()
