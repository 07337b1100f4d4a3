"""The Helm chart: lint, render, Kubernetes schema validation and the properties users rely on."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deployutil import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    RULES,
    VALUES_FILES,
    Rendered,
    load_values,
    render,
    run_tool,
)

# Kinds the chart may emit. kubernetes-validate has schemas for the built-in ones; the Prometheus
# Operator kinds are checked by the assertions below instead.
BUILTIN_KINDS = {
    "ConfigMap",
    "Deployment",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "Secret",
    "Service",
    "ServiceAccount",
    "StatefulSet",
}
# Custom resources: the Prometheus Operator's and KEDA's, by API group.
CRD_KINDS = {
    "PodMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}

SERVICE_SECRET_ENV = {"LPREG_AUTH_TOKEN", "LPREG_REDIS_PASSWORD"}


def pod_specs(r: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [
        (o["metadata"]["name"], o["spec"]["template"]["spec"])
        for o in r.objects
        if o["kind"] in ("Deployment", "StatefulSet")
    ]


def pod_template(r: Rendered, component: str) -> dict[str, Any]:
    kind = "StatefulSet" if component in ("learner", "redis") else "Deployment"
    return r.one(kind, f"-{component}")["spec"]["template"]


def container(r: Rendered, component: str) -> dict[str, Any]:
    return pod_template(r, component)["spec"]["containers"][0]


def config_of(r: Rendered) -> dict[str, Any]:
    return yaml.safe_load(config_text(r))


def config_text(r: Rendered) -> str:
    return r.one("ConfigMap", "-config")["data"]["config.yaml"]


def containers(r: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{name}/{c['name']}", c)
        for name, spec in pod_specs(r)
        for c in spec.get("containers", []) + spec.get("initContainers", [])
    ]


@pytest.mark.parametrize("key", sorted(VALUES_FILES))
def test_lint_strict(key: str) -> None:
    import helm_python

    report = helm_python.lint(
        CHART, load_values(key), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, f"helm lint --strict ({key}): {problems}"


@pytest.mark.parametrize("key", sorted(VALUES_FILES))
def test_install_dry_run(key: str) -> None:
    import helm_python

    with helm_python.Config(storage_driver="memory", namespace=NAMESPACE) as cfg:
        release = cfg.install(
            CHART, RELEASE, load_values(key), namespace=NAMESPACE, dry_run="client"
        )
    kinds = {doc["kind"] for doc in yaml.safe_load_all(release["manifest"]) if doc}
    assert {"StatefulSet", "Deployment", "ConfigMap", "Secret"} <= kinds
    assert "lpreg-test-learner" in release["notes"]


def test_objects_validate_against_kubernetes_schemas(rendered: Rendered) -> None:
    validate_objects(rendered)


def validate_objects(rendered: Rendered) -> None:
    """Strict Kubernetes schema validation of every built-in object; API groups of the others."""
    import kubernetes_validate

    kinds = {o["kind"] for o in rendered.objects}
    assert kinds <= BUILTIN_KINDS | set(CRD_KINDS), (
        f"unexpected kinds {kinds - BUILTIN_KINDS - set(CRD_KINDS)}"
    )
    for obj in rendered.objects:
        if obj["kind"] in CRD_KINDS:
            assert obj["apiVersion"] == CRD_KINDS[obj["kind"]]
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def test_every_object_is_in_the_release_namespace(rendered: Rendered) -> None:
    # The chart emits namespaced kinds only.
    for obj in rendered.objects:
        assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]


def test_every_template_sets_namespace_from_release() -> None:
    for path in (CHART / "templates").glob("*.yaml"):
        text = path.read_text()
        docs = [d for d in re.split(r"^---\s*$", text, flags=re.M) if "kind:" in d]
        for doc in docs:
            assert "namespace: {{ .Release.Namespace }}" in doc or (
                "namespace: {{ $.Release.Namespace }}" in doc
            ), f"{path.name} has an object without .Release.Namespace"


def test_generator_replicas_follow_values() -> None:
    r = render({"generator": {"replicas": 5}})
    assert r.one("Deployment", "-generator")["spec"]["replicas"] == 5
    assert not r.of_kind("HorizontalPodAutoscaler")


def test_hpa_only_when_enabled(rendered: Rendered) -> None:
    enabled = rendered.values.get("generator", {}).get("autoscaling", {}).get("enabled", False)
    hpas = rendered.of_kind("HorizontalPodAutoscaler")
    deployment = rendered.one("Deployment", "-generator")
    if not enabled:
        assert not hpas
        assert "replicas" in deployment["spec"]
        return
    (hpa,) = hpas
    # The HPA owns the replica count; a fixed one would fight it on every upgrade.
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    backlog, wait_share = hpa["spec"]["metrics"]
    run_id = rendered.values["config"]["run_id"]
    # Not the stream length: it counts prompts generators already hold, which admission caps.
    assert backlog["type"] == "External"
    assert backlog["external"]["metric"]["name"] == "lpreg_redis_stream_undelivered"
    assert backlog["external"]["metric"]["selector"]["matchLabels"] == {
        "stream": "prompts",
        "run": run_id,
    }
    assert backlog["external"]["target"]["type"] == "AverageValue"
    assert wait_share["external"]["metric"]["name"] == "lpreg_learner_wait_rollouts_share"
    assert wait_share["external"]["metric"]["selector"]["matchLabels"] == {"run": run_id}
    assert wait_share["external"]["target"]["type"] == "Value"


def test_gpu_example_scales_eight_gpu_generators_with_nccl() -> None:
    values = load_values("gpu")
    r = render(values)
    gen = container(r, "generator")
    learner = container(r, "learner")
    assert gen["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert learner["resources"]["limits"]["nvidia.com/gpu"] == 1
    # With the HPA on, it owns the count: eight generators is its floor.
    assert r.one("HorizontalPodAutoscaler", "-generator")["spec"]["minReplicas"] == 8
    config = config_of(r)
    assert config["learner"]["device"] == "cuda"
    assert config["broadcast"]["backend"] == "nccl"
    assert config["generator"]["backend"]["type"] == "vllm"
    for component in ("learner", "generator"):
        spec = pod_template(r, component)["spec"]
        assert spec["runtimeClassName"] == "nvidia", component
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, component
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ], component
        env = {e["name"]: e.get("value") for e in container(r, component)["env"]}
        assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0", component
    # The pods spread over nodes, so the model claim must attach to several.
    assert values["modelStorage"]["accessMode"] in ("ReadOnlyMany", "ReadWriteMany")


def test_pdb_selects_generators(rendered: Rendered) -> None:
    (pdb,) = rendered.of_kind("PodDisruptionBudget")
    deployment = rendered.one("Deployment", "-generator")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_secrets_are_referenced_never_inlined(rendered: Rendered) -> None:
    secret_values = set()
    for secret in rendered.of_kind("Secret"):
        for encoded in secret.get("data", {}).values():
            secret_values |= {encoded, base64.b64decode(encoded).decode()}
        secret_values |= set(secret.get("stringData", {}).values())
    assert secret_values, "the chart generates the auth token and the Redis password"
    for name, c in containers(rendered):
        for env in c.get("env", []):
            if env["name"] in SERVICE_SECRET_ENV | {"REDIS_PASSWORD", "REDISCLI_AUTH"}:
                assert "value" not in env, f"{name}: {env['name']} is inlined"
                assert "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']}"
    for name, c in containers(rendered):
        if c["name"] in ("learner", "generator"):
            names = {e["name"] for e in c["env"]}
            assert names >= SERVICE_SECRET_ENV, f"{name} lacks {SERVICE_SECRET_ENV - names}"
    others = json.dumps([o for o in rendered.objects if o["kind"] != "Secret"])
    for value in secret_values:
        assert value not in others, "a secret value appears outside its Secret"


def test_secrets_can_come_from_existing_secrets() -> None:
    r = render(
        {
            "auth": {"existingSecret": "my-token", "secretKey": "tok"},
            "redis": {"auth": {"existingSecret": "my-redis", "existingSecretPasswordKey": "pw"}},
        }
    )
    assert not r.of_kind("Secret")
    env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container(r, "generator")["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert env["LPREG_AUTH_TOKEN"] == {"name": "my-token", "key": "tok"}
    assert env["LPREG_REDIS_PASSWORD"] == {"name": "my-redis", "key": "pw"}


def test_external_redis() -> None:
    r = render(
        {
            "redis": {
                "enabled": False,
                "external": {"url": "rediss://redis.example.internal:6380/2"},
                "auth": {"existingSecret": "ext-redis"},
            }
        }
    )
    assert not [o for o in r.objects if o["metadata"]["name"].endswith("-redis")]
    assert config_of(r)["redis"]["url"] == "rediss://redis.example.internal:6380/2"
    env = {e["name"]: e for e in container(r, "generator")["env"]}
    assert env["LPREG_REDIS_URL"]["value"] == "rediss://redis.example.internal:6380/2"
    assert env["LPREG_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ext-redis"


def test_every_port_is_tcp(rendered: Rendered) -> None:
    for name, c in containers(rendered):
        for port in c.get("ports", []):
            assert port.get("protocol") == "TCP", f"{name} port {port}"
    for svc in rendered.of_kind("Service"):
        for port in svc["spec"]["ports"]:
            assert port.get("protocol") == "TCP", f"Service {svc['metadata']['name']} {port}"
    for pol in rendered.of_kind("NetworkPolicy"):
        for rule in pol["spec"]["ingress"]:
            for port in rule["ports"]:
                assert port.get("protocol") == "TCP", pol["metadata"]["name"]


def test_every_pod_runs_as_non_root_with_no_capabilities(rendered: Rendered) -> None:
    for name, spec in pod_specs(rendered):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] > 0, name
        assert spec.get("automountServiceAccountToken") is False, name
    for name, c in containers(rendered):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert sc["readOnlyRootFilesystem"] is True, name
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"


def test_image_tags_are_pinned(rendered: Rendered) -> None:
    for name, c in containers(rendered):
        image, _, digest = c["image"].partition("@")
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{name}: {digest}"


def test_learner_statefulset(rendered: Rendered) -> None:
    sts = rendered.one("StatefulSet", "-learner")
    spec = sts["spec"]
    assert spec["replicas"] == 1
    headless = rendered.one("Service", "-learner-headless")
    assert spec["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    c = spec["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["learner", "/etc/lpreg/config.yaml"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "store": 29500, "metrics": 9400}
    assert c["readinessProbe"]["grpc"]["port"] == 50051
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    persistence = rendered.values.get("learner", {}).get("persistence", {}).get("enabled", True)
    if persistence:
        (claim,) = spec["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["data"] == "/data"
    assert config_of(rendered)["local"]["run_dir"] == "/data/runs/{run_id}"
    svc = rendered.one("Service", "-learner")
    assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "store", "metrics"}


def test_generator_deployment_points_at_the_learner(rendered: Rendered) -> None:
    c = container(rendered, "generator")
    env = {e["name"]: e for e in c["env"]}
    assert env["LPREG_GENERATOR_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    host = f"{RELEASE}-learner.{NAMESPACE}.svc.cluster.local"
    assert env["LPREG_LEARNER_ADDRESS"]["value"] == f"{host}:50051"
    assert env["LPREG_BROADCAST_STORE_HOST"]["value"] == host
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    config = config_of(rendered)
    assert config["control"]["learner_address"] == f"{host}:50051"
    # The learner binds its store on every interface and tells generators to dial its Service.
    assert config["broadcast"]["store_host"] == "0.0.0.0"
    assert config["broadcast"]["advertise_host"] == host
    assert config["metrics"]["host"] == config["control"]["host"] == "0.0.0.0"


def test_redis_persists_with_aof_and_a_password(rendered: Rendered) -> None:
    sts = rendered.one("StatefulSet", "-redis")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(c["command"])
    assert "--appendonly yes" in command
    assert '--requirepass "$REDIS_PASSWORD"' in command
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/data"}


def test_network_policies(rendered: Rendered) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in rendered.of_kind("NetworkPolicy")}
    learner = policies[f"{RELEASE}-learner"]
    froms = [peer for rule in learner["ingress"] for peer in rule["from"]]
    components = {
        peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
        for peer in froms
        if "namespaceSelector" not in peer
    }
    assert components == {"generator"}, "only generators (and Prometheus) may reach the learner"
    # Collective backends use ephemeral ports: generators need every TCP port of the learner.
    assert {"protocol": "TCP"} in learner["ingress"][0]["ports"]
    redis = policies[f"{RELEASE}-redis"]
    rule, *metrics_rules = redis["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchExpressions"][0]["values"] == ["learner", "generator"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    exporter = rendered.values.get("redis", {}).get("metrics", {}).get("enabled", False)
    assert len(metrics_rules) == (1 if exporter else 0)
    for metrics_rule in metrics_rules:
        assert metrics_rule["ports"] == [{"port": 9121, "protocol": "TCP"}]
    # Prometheus peers are scoped to a namespace, never "any namespace's pod labelled prometheus".
    for name, policy in policies.items():
        for rule in policy["ingress"]:
            for peer in rule["from"]:
                if "namespaceSelector" in peer:
                    assert peer["namespaceSelector"], f"{name}: any namespace may scrape"


def test_monitors_attach_run_and_instance_labels() -> None:
    for kind in ("podMonitor", "serviceMonitor"):
        r = render({"monitoring": {kind: {"enabled": True, "labels": {"release": "prom"}}}})
        (mon,) = r.of_kind(kind[0].upper() + kind[1:])
        assert mon["metadata"]["labels"]["release"] == "prom"
        endpoints = mon["spec"].get("podMetricsEndpoints") or mon["spec"]["endpoints"]
        targets = {rl["targetLabel"]: rl["sourceLabels"] for rl in endpoints[0]["relabelings"]}
        assert targets["run"] == ["__meta_kubernetes_pod_label_lpreg_io_run"]
        assert targets["namespace"] == ["__meta_kubernetes_namespace"]
        assert targets["instance"] == ["__meta_kubernetes_pod_name"]
        for component in ("learner", "generator"):
            assert pod_template(r, component)["metadata"]["labels"]["lpreg.io/run"] == "tiny"


def test_pod_and_service_monitor_are_exclusive() -> None:
    import helm_python

    both = {"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}}
    with pytest.raises(helm_python.HelmError, match="scrape every pod twice"):
        render(both)


def test_prometheus_rule_only_when_enabled(rendered: Rendered) -> None:
    monitoring = rendered.values.get("monitoring", {})
    enabled = monitoring.get("prometheusRule", {}).get("enabled", False)
    rules = rendered.of_kind("PrometheusRule")
    assert len(rules) == (1 if enabled else 0)


def test_prometheus_rule_is_the_rules_file(promtool: str, tmp_path: Path) -> None:
    r = render({"monitoring": {"prometheusRule": {"enabled": True, "labels": {"release": "p"}}}})
    (rule,) = r.of_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "p"
    assert set(rule["spec"]) == {"groups"}
    # Verbatim, so Prometheus's own {{ $labels.* }} templates survive Helm's rendering.
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    shipped = tmp_path / "shipped.rules.yml"
    shipped.write_text(yaml.safe_dump(rule["spec"]))
    run_tool([promtool, "check", "rules", str(shipped)])


def test_finished_learner_stays_up(rendered: Rendered, tmp_path: Path) -> None:
    """The StatefulSet restarts a learner that exits, so the chart keeps it up after its steps."""
    from lpreg_core.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(config_text(rendered))
    assert load_config(path).learner.exit_when_done is False
    forced = render({"config": {"learner": {"exit_when_done": True, "steps": 7}}})
    assert config_of(forced)["learner"]["exit_when_done"] is False
    assert config_of(forced)["learner"]["steps"] == 7


def test_dashboards_are_configmaps_from_the_chart_files(rendered: Rendered) -> None:
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert files
    maps = [
        cm
        for cm in rendered.of_kind("ConfigMap")
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    shipped = sorted(key for cm in maps for key in cm["data"])
    assert shipped == files
    for cm in maps:
        for key, text in cm["data"].items():
            assert json.loads(text) == json.loads((CHART / "dashboards" / key).read_text())


def test_configmap_config_loads(rendered: Rendered, tmp_path: Path) -> None:
    from lpreg_core.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(config_text(rendered))
    config = load_config(path)
    assert config.control.port == 50051
    assert config.run_id == rendered.values.get("config", {}).get("run_id", "tiny")


def test_schema_rejects_bad_values() -> None:
    import helm_python

    bad_values = [
        {"generator": {"replicas": "two"}},
        {"generator": {"replicaCount": 2}},
        {"image": {"tag": "latest"}},
        {"learner": {"ports": {"grpc": 70000}}},
        {"podSecurityContext": {"runAsNonRoot": False}},
        {"image": {"digest": "sha256:123"}},
        {"redis": {"image": {"digest": "md5:" + "0" * 32}}},
        {"tls": {"enabled": True}},
        {"tls": {"enabled": True, "existingSecret": "certs", "mountPath": "/etc/lpreg"}},
        {"nccl": {"env": {"LD_PRELOAD": "/x.so"}}},
        {"nccl": {"rdma": {"resourceName": "rdma/hca", "count": 0}}},
        {"modelStorage": {"accessMode": "ReadOnce"}},
        {"nccl": {"debug": "LOUD"}},
        {"generator": {"autoscaling": {"waitShare": {"target": "1.5"}}}},
        {"generator": {"autoscaling": {"metric": {"name": "lpreg_redis_stream_length"}}}},
        {"generator": {"tmpSizeLimit": "lots"}},
        {"learner": {"extraVolumeMounts": [{"name": "certs"}]}},
        {"generator": {"initContainers": [{"name": "fetch"}]}},
    ]
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values({}))
        for values in bad_values:
            with pytest.raises(helm_python.HelmError):
                chart.validate_schema(chart.merge_values(values))
            with pytest.raises(helm_python.HelmError):
                chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_every_value_is_documented() -> None:
    """Each key in values.yaml has a comment on the line(s) above it or on its parent block."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    config_indent = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("config:"):
            config_indent = indent
        elif config_indent is not None and indent > config_indent:
            continue  # the lpreg config is documented by lpreg_core/config.py
        else:
            config_indent = None
        if ":" not in stripped:
            continue
        previous = lines[i - 1].strip() if i else ""
        parent_documented = indent > 0 and _parent_has_comment(lines, i, indent)
        if not previous.startswith("#") and not parent_documented:
            undocumented.append(f"line {i + 1}: {stripped}")
    assert not undocumented, "undocumented values:\n" + "\n".join(undocumented)


def _parent_has_comment(lines: list[str], i: int, indent: int) -> bool:
    """A leaf inside a small self-explanatory block (e.g. resources.requests) counts as documented
    when the nearest enclosing key with a comment is at most four levels up."""
    levels = 0
    for j in range(i - 1, -1, -1):
        line = lines[j]
        if not line.strip() or line.strip().startswith("#"):
            continue
        parent_indent = len(line) - len(line.lstrip())
        if parent_indent < indent:
            levels += 1
            indent = parent_indent
            if j and lines[j - 1].strip().startswith("#"):
                return True
            if levels >= 4 or parent_indent == 0:
                return False
    return False
