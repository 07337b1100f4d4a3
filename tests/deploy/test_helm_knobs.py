"""Chart knobs for real clusters: extra volumes and init containers, TLS, NCCL, GPU and storage
checks, Redis headroom, digests, and the autoscaler's signals with their adapter and KEDA forms."""

from __future__ import annotations

import datetime
import ipaddress
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml
from deployutil import NAMESPACE, PROMETHEUS, RELEASE, Rendered, load_values, render, run_tool
from test_helm import config_of, container, containers, pod_template, validate_objects

DIGEST = "sha256:" + "ab" * 32
LEARNER_HOST = f"{RELEASE}-learner.{NAMESPACE}.svc.cluster.local"
ADAPTER_VALUES = PROMETHEUS / "prometheus-adapter-values.yaml"


def render_error(values: dict[str, Any]) -> str:
    import helm_python

    with pytest.raises(helm_python.HelmError) as excinfo:
        render(values)
    return str(excinfo.value)


def gpu_values(**overrides: Any) -> dict[str, Any]:
    """The GPU example with top-level blocks replaced or deep-merged."""
    values = load_values("gpu")

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(values, overrides)
    return values


def test_extra_volumes_mounts_env_and_init_containers() -> None:
    component_values = {
        "extraEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "extraVolumes": [{"name": "cache", "emptyDir": {"sizeLimit": "50Gi"}}],
        "extraVolumeMounts": [{"name": "cache", "mountPath": "/cache"}],
        "initContainers": [
            {
                "name": "fetch-model",
                "image": "registry.example.com/tools/fetch:1.2.3",
                "args": ["--to", "/cache/model"],
                "volumeMounts": [
                    {"name": "cache", "mountPath": "/cache"},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }
        ],
    }
    r = render({"learner": component_values, "generator": component_values})
    validate_objects(r)
    for component in ("learner", "generator"):
        spec = pod_template(r, component)["spec"]
        c = container(r, component)
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]
        assert {"name": "cache", "mountPath": "/cache"} in c["volumeMounts"]
        assert {"name": "cache", "emptyDir": {"sizeLimit": "50Gi"}} in spec["volumes"]
        (init,) = spec["initContainers"]
        assert init["name"] == "fetch-model"
        # The chart's hardened security context unless the init container brings its own.
        assert init["securityContext"]["readOnlyRootFilesystem"] is True
        assert init["securityContext"]["capabilities"]["drop"] == ["ALL"]
    own = {"name": "chown", "image": "busybox:1.37.0", "securityContext": {"runAsUser": 10001}}
    r = render({"generator": {"initContainers": [own]}})
    (init,) = pod_template(r, "generator")["spec"]["initContainers"]
    assert init["securityContext"] == {"runAsUser": 10001}
    assert "initContainers" not in pod_template(render({}), "learner")["spec"]


def test_every_emptydir_scratch_volume_is_sized(rendered: Rendered) -> None:
    """An unbounded /tmp can fill the node's disk and get every pod on the node evicted."""
    for obj in rendered.of_kind("Deployment") + rendered.of_kind("StatefulSet"):
        volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tmp"]["emptyDir"]["sizeLimit"], obj["metadata"]["name"]
    gen = {v["name"]: v for v in pod_template(render(gpu_values()), "generator")["spec"]["volumes"]}
    assert gen["tmp"]["emptyDir"]["sizeLimit"] == "20Gi"


def test_image_digests_pin_every_image() -> None:
    r = render(
        {
            "image": {"tag": "0.1.0", "digest": DIGEST},
            "redis": {
                "image": {"digest": DIGEST},
                "metrics": {"enabled": True, "image": {"digest": DIGEST}},
            },
        }
    )
    images = {name: c["image"] for name, c in containers(r)}
    assert images[f"{RELEASE}-learner/learner"] == f"lpreg:0.1.0@{DIGEST}"
    assert images[f"{RELEASE}-generator/generator"] == f"lpreg:0.1.0@{DIGEST}"
    assert images[f"{RELEASE}-redis/redis"] == f"redis:7.4.2-bookworm@{DIGEST}"
    assert images[f"{RELEASE}-redis/metrics"].endswith(f"@{DIGEST}")
    assert all("@" not in c["image"] for _, c in containers(render({})))


# --- TLS


def tls_values() -> dict[str, Any]:
    return {"tls": {"enabled": True, "existingSecret": "lpreg-tls"}}


def test_tls_from_a_secret_reaches_config_mounts_and_probe(tmp_path: Path) -> None:
    from lpreg_core.config import load_config

    r = render(tls_values())
    validate_objects(r)
    config = config_of(r)["control"]
    assert config["tls_cert_file"] == "/etc/lpreg-tls/tls.crt"
    assert config["tls_key_file"] == "/etc/lpreg-tls/tls.key"
    assert config["tls_ca_file"] == "/etc/lpreg-tls/ca.crt"
    path = tmp_path / "config.yaml"
    path.write_text(r.one("ConfigMap", "-config")["data"]["config.yaml"])
    assert load_config(path).control.tls_ca_file == "/etc/lpreg-tls/ca.crt"
    for component in ("learner", "generator"):
        volumes = {v["name"]: v for v in pod_template(r, component)["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "lpreg-tls"
        mounts = {m["name"]: m for m in container(r, component)["volumeMounts"]}
        assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/lpreg-tls", "readOnly": True}
    learner_volumes = {v["name"]: v for v in pod_template(r, "learner")["spec"]["volumes"]}
    generator_volumes = {v["name"]: v for v in pod_template(r, "generator")["spec"]["volumes"]}
    assert "items" not in learner_volumes["tls"]["secret"]
    # Generators verify the learner with the CA; the private key never reaches them.
    assert generator_volumes["tls"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    probe = container(r, "learner")["readinessProbe"]
    assert "grpc" not in probe, "the kubelet's gRPC probe cannot speak TLS"
    assert probe["exec"]["command"][-4:] == [
        "127.0.0.1:50051",
        "/etc/lpreg-tls/ca.crt",
        LEARNER_HOST,
        "4",
    ]
    assert container(render({}), "learner")["readinessProbe"]["grpc"] == {"port": 50051}


def _certificates(tmp_path: Path, server_name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for server_name, as a cert-manager Secret would hold."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lpreg test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(server_name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


@pytest.mark.parametrize("serving", [True, False], ids=["serving", "not-serving"])
def test_tls_readiness_probe_checks_a_real_tls_health_service(
    tmp_path: Path, serving: bool
) -> None:
    """The rendered exec probe, run as the kubelet would, against grpc.health.v1 over TLS."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    cert, key, ca = _certificates(tmp_path, LEARNER_HOST)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    servicer.set("", status)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        command = container(render(tls_values()), "learner")["readinessProbe"]["exec"]["command"]
        assert command[0] == "python"
        argv = [sys.executable, *command[1:]]
        argv[-4] = f"127.0.0.1:{port}"
        argv[-3] = str(ca)
        proc = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        assert (proc.returncode == 0) is serving, proc.stderr.decode()
        # A certificate for another name fails the probe: it checks what generators will check.
        argv[-2] = "someone-else.example.com"
        proc = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        assert proc.returncode != 0
    finally:
        server.stop(0)


# --- NCCL, GPUs, storage


def test_nccl_block_sets_interfaces_rdma_devices_and_ipc_lock() -> None:
    nccl = {
        "socketIfname": "eth0",
        "glooSocketIfname": "eth0",
        "ibHca": "mlx5_0,mlx5_1",
        "debug": "INFO",
        "env": {"NCCL_IB_GID_INDEX": 3},
        "rdma": {"resourceName": "rdma/rdma_shared_device_a", "count": 1},
        "ipcLock": True,
    }
    r = render({"nccl": nccl})
    validate_objects(r)
    for component in ("learner", "generator"):
        c = container(r, component)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert env["GLOO_SOCKET_IFNAME"] == "eth0"
        assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
        assert env["NCCL_DEBUG"] == "INFO"
        assert env["NCCL_IB_GID_INDEX"] == "3"
        resources = c["resources"]
        assert resources["limits"]["rdma/rdma_shared_device_a"] == 1
        assert resources["requests"]["rdma/rdma_shared_device_a"] == 1
        assert resources["limits"]["memory"] == "4Gi", "the component's own resources stay"
        capabilities = c["securityContext"]["capabilities"]
        assert capabilities == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    # Redis is no collective member.
    redis = container(r, "redis")
    assert "add" not in redis["securityContext"]["capabilities"]
    plain = container(render({}), "generator")
    assert not {e["name"] for e in plain["env"]} & {"NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"}
    assert "add" not in plain["securityContext"]["capabilities"]


def test_generator_gpus_must_match_tensor_parallel_size() -> None:
    two_gpus = {"generator": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}
    message = render_error(gpu_values(**two_gpus))
    assert "tensor_parallel_size is 1" in message
    tp2 = {"config": {"generator": {"backend": {"tensor_parallel_size": 2}}}}
    message = render_error(gpu_values(**tp2))
    assert "one GPU per tensor-parallel worker" in message
    both = gpu_values(
        **tp2,
        generator={
            "resources": {"limits": {"nvidia.com/gpu": 2}, "requests": {"nvidia.com/gpu": 2}}
        },
    )
    gen = container(render(both), "generator")
    assert gen["resources"]["limits"]["nvidia.com/gpu"] == 2
    # The hf backend and CPU vLLM runs request no GPU: nothing to check.
    render({"config": {"generator": {"backend": {"type": "vllm", "tensor_parallel_size": 2}}}})


def test_cuda_learner_needs_a_gpu() -> None:
    values = gpu_values()
    del values["learner"]["resources"]["limits"]["nvidia.com/gpu"]
    del values["learner"]["resources"]["requests"]["nvidia.com/gpu"]
    assert "the learner pod would get no GPU" in render_error(values)


@pytest.mark.parametrize("mode", ["ReadOnlyMany", "ReadWriteMany"])
def test_shared_model_claims_are_accepted(mode: str) -> None:
    r = render(gpu_values(modelStorage={"accessMode": mode}))
    volumes = {v["name"]: v for v in pod_template(r, "generator")["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {
        "claimName": "lpreg-models",
        "readOnly": True,
    }


def test_single_node_model_claims_are_refused_unless_pods_share_a_node() -> None:
    message = render_error(gpu_values(modelStorage={"accessMode": "ReadWriteOnce"}))
    assert "Multi-Attach" in message
    message = render_error(gpu_values(modelStorage={"accessMode": "ReadWriteOncePod"}))
    assert "admits one pod" in message
    node = {"kubernetes.io/hostname": "gpu-node-1"}
    pinned = gpu_values(
        modelStorage={"accessMode": "ReadWriteOnce"},
        learner={"nodeSelector": node},
        generator={"nodeSelector": node},
    )
    render(pinned)
    pinned["generator"]["nodeSelector"] = {"kubernetes.io/hostname": "gpu-node-2"}
    assert "Multi-Attach" in render_error(pinned)


# --- Redis


def test_redis_memory_leaves_room_for_the_aof_rewrite() -> None:
    # The original GPU example: 12gb of a 16Gi limit.
    tight = gpu_values(redis={"maxmemory": "12gb"})
    message = render_error(tight)
    assert "redis.maxmemory 12gb is above 60% of redis.resources.limits.memory 16Gi" in message
    assert "OOM" in message
    render(gpu_values(redis={"maxmemory": "9gb"}))
    assert "above 60%" in render_error({"redis": {"maxmemory": "1300mb"}})
    assert "above 60%" in render_error({"redis": {"maxmemory": "1300000k"}})
    render({"redis": {"maxmemory": "1200mb"}})
    # A bare number is bytes, as Redis reads it.
    render({"redis": {"maxmemory": str(1024**3)}})
    for values in (load_values("default"), load_values("gpu"), load_values("cpu-tiny")):
        render(values)


def test_redis_exporter_sidecar_is_scraped() -> None:
    r = render(
        {
            "redis": {"metrics": {"enabled": True}},
            "monitoring": {"podMonitor": {"enabled": True}},
        }
    )
    validate_objects(r)
    exporter = pod_template(r, "redis")["spec"]["containers"][1]
    assert exporter["name"] == "metrics"
    assert exporter["ports"] == [{"name": "metrics", "containerPort": 9121, "protocol": "TCP"}]
    env = {e["name"]: e for e in exporter["env"]}
    assert env["REDIS_ADDR"]["value"] == "redis://127.0.0.1:6379"
    assert "secretKeyRef" in env["REDIS_PASSWORD"]["valueFrom"]
    (monitor,) = r.of_kind("PodMonitor")
    components = monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    assert components == ["learner", "generator", "redis"]
    service = r.one("Service", "-redis")
    assert {p["name"] for p in service["spec"]["ports"]} == {"redis", "metrics"}
    (monitor,) = render({"monitoring": {"podMonitor": {"enabled": True}}}).of_kind("PodMonitor")
    assert monitor["spec"]["selector"]["matchExpressions"][0]["values"] == ["learner", "generator"]


# --- Autoscaling


def test_autoscaling_refuses_settings_that_hide_the_backlog() -> None:
    """Admission caps prompt groups out at (max_staleness + 1) x prompts_per_step; generators
    holding all of them leave an undelivered backlog of 0, whatever the load."""
    # The original GPU example: 8 generators x 64 in flight = 512 = (1 + 1) x 256.
    hidden = gpu_values(config={"generator": {"max_tasks_in_flight": 64}})
    message = render_error(hidden)
    assert "= 512 prompt groups" in message
    assert "minReplicas (8) x config.generator.max_tasks_in_flight (64)" in message
    # The wait share alone does not depend on the backlog.
    render(
        gpu_values(
            config={"generator": {"max_tasks_in_flight": 64}},
            generator={"autoscaling": {"backlog": {"enabled": False}}},
        )
    )
    message = render_error(
        {
            "generator": {
                "autoscaling": {
                    "enabled": True,
                    "backlog": {"enabled": False},
                    "waitShare": {"enabled": False},
                }
            }
        }
    )
    assert "needs a signal" in message


def test_gpu_example_backlog_can_reach_max_replicas() -> None:
    values = load_values("gpu")
    config, autoscaling = values["config"], values["generator"]["autoscaling"]
    cap = (config["learner"]["max_staleness"] + 1) * config["learner"]["prompts_per_step"]
    held = config["generator"]["max_tasks_in_flight"]
    target = float(autoscaling["backlog"]["targetPerReplica"])
    # Saturated, N generators leave cap - N x held unread; the HPA asks for that / target.
    assert cap - autoscaling["minReplicas"] * held > 0
    assert cap >= autoscaling["maxReplicas"] * (held + target)
    # And every engine keeps all its tasks' samples in one batch.
    num_samples = config["sampling"]["num_samples"]
    assert held * num_samples <= config["generator"]["backend"]["max_num_seqs"]


def adapter_rules() -> list[dict[str, Any]]:
    return list(yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["external"])


def adapter_query(rule: dict[str, Any], matchers: str) -> str:
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)  # type: ignore[union-attr]
    return (
        rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
    )


def check_promql(promtool: str, tmp_path: Path, exprs: list[str]) -> None:
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "check.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    out = run_tool([promtool, "check", "rules", str(path)])
    assert f"{len(rules)} rules found" in out


def test_adapter_rules_serve_the_hpa_metrics(
    promtool: str, tmp_path: Path, series_names: set[str]
) -> None:
    """Each External metric of the HPA is named by a prometheus-adapter rule whose query parses
    and reads a series the services export."""
    hpa = render(gpu_values()).one("HorizontalPodAutoscaler", "-generator")
    wanted = {m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    rules = {rule["name"]["as"]: rule for rule in adapter_rules()}
    assert wanted <= set(rules)
    exprs = []
    for name in wanted:
        rule = rules[name]
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        selector = rule["seriesQuery"].split("{")[0]
        assert selector in series_names, f"{name}: {selector} is not exported"
        exprs.append(adapter_query(rule, 'namespace="ns",run="r",stream="prompts"'))
    check_promql(promtool, tmp_path, exprs)


def test_keda_scaled_object_replaces_the_hpa(
    promtool: str, tmp_path: Path, series_names: set[str]
) -> None:
    r = render(gpu_values(generator={"autoscaling": {"keda": {"enabled": True}}}))
    validate_objects(r)
    assert not r.of_kind("HorizontalPodAutoscaler"), "KEDA creates and owns the HPA"
    assert "replicas" not in r.one("Deployment", "-generator")["spec"]
    (scaled,) = r.of_kind("ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == f"{RELEASE}-generator"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (8, 16)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    backlog, wait_share = spec["triggers"]
    assert (backlog["type"], backlog["metricType"]) == ("prometheus", "AverageValue")
    assert (wait_share["type"], wait_share["metricType"]) == ("prometheus", "Value")
    assert backlog["metadata"]["threshold"] == "8"
    assert wait_share["metadata"]["threshold"] == "0.3"
    queries = [t["metadata"]["query"] for t in spec["triggers"]]
    for query in queries:
        assert f'namespace="{NAMESPACE}"' in query and 'run="qwen3-1.7b-dapo"' in query
        for name in re.findall(r"\blpreg_[a-z0-9_]+", query):
            assert name in series_names, name
    check_promql(promtool, tmp_path, queries)
    message = render_error({"generator": {"autoscaling": {"keda": {"enabled": True}}}})
    assert "needs generator.autoscaling.enabled" in message


def test_headless_service_comment_matches_the_advertised_address(rendered: Rendered) -> None:
    """Generators dial the ClusterIP Service; the headless one only governs the pod's DNS name."""
    config = config_of(rendered)
    assert config["broadcast"]["advertise_host"] == LEARNER_HOST
    assert config["control"]["learner_address"] == f"{LEARNER_HOST}:50051"
    text = rendered.templates["lpreg/templates/learner-service.yaml"]
    comment = text.split("kind: Service", 2)[1]
    assert "does not advertise it" in comment
