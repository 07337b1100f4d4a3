"""The gRPC control plane over real loopback sockets: learner server, generator client."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lpreg_core.config import ControlConfig
from lpreg_core.wire.lpreg.v1 import control_pb2, control_pb2_grpc
from services.common.auth import (
    AuthConfigError,
    bearer_metadata,
    bearer_token_error,
    load_auth_token,
)
from services.common.errors import (
    ControlError,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
    UnknownGenerator,
)
from services.generator.control_client import ControlClient
from services.learner.control import LearnerControlServicer, generator_status
from services.learner.registry import GeneratorRegistry
from services.learner.server import ControlServer, build_server

TOKEN = "s3cret-token-for-tests"
VOCAB = 32
# Generous bounds for things that happen at once on a healthy machine; never asserted as timings.
WAIT_S = 20.0
RPC_TIMEOUT_S = 10.0


@dataclass
class Learner:
    server: ControlServer
    port: int
    registry: GeneratorRegistry

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.registry.close("test teardown")
        self.server.stop(0).wait(WAIT_S)


@pytest.fixture
def start_learner() -> Iterator[Callable[..., Learner]]:
    """``start(port=0, **control_fields)`` starts a learner control server (registry, servicer,
    gRPC server) on loopback; every one is stopped at teardown."""
    learners: list[Learner] = []

    def start(port: int = 0, version: int = 0, **fields: object) -> Learner:
        config = ControlConfig(host="127.0.0.1", port=port, **fields)  # type: ignore[arg-type]
        registry = GeneratorRegistry(heartbeat_ttl_s=30.0, expected_vocab_size=VOCAB)

        def status() -> control_pb2.StatusResponse:
            return control_pb2.StatusResponse(
                run_id="test",
                policy_version=version,
                generators=[generator_status(info) for info in registry.snapshot()],
            )

        servicer = LearnerControlServicer(
            registry,
            status,
            run_id="test",
            current_version=lambda: version,
            heartbeat_interval_s=0.05,
        )
        token = TOKEN if config.require_auth else None
        server, bound = build_server(config, servicer, token)
        learner = Learner(server, bound, registry)
        learners.append(learner)
        return learner

    yield start
    for learner in learners:
        learner.stop()


@pytest.fixture
def make_client() -> Iterator[Callable[..., ControlClient]]:
    clients: list[ControlClient] = []

    def make(address: str, generator_id: str = "gen-0", **kwargs: object) -> ControlClient:
        settings: dict[str, object] = {
            "retry_attempts": 5,
            "retry_backoff_s": 0.05,
            "retry_backoff_max_s": 0.5,
        }
        for name in ("retry_attempts", "tls_ca_file", "max_message_bytes"):
            if name in kwargs:
                settings[name] = kwargs.pop(name)
        options: dict[str, object] = {
            "backend": "hf",
            "num_workers": 1,
            "vocab_size": VOCAB,
            "device": "cpu",
            "auth_token": TOKEN,
            "rpc_timeout_s": RPC_TIMEOUT_S,
        }
        options.update(kwargs)
        client = ControlClient(
            ControlConfig(**settings),  # type: ignore[arg-type]
            address=address,
            generator_id=generator_id,
            **options,  # type: ignore[arg-type]
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


class EventConsumer:
    """Runs ``client.events()`` on a thread, as the generator service does, into a queue."""

    def __init__(self, client: ControlClient) -> None:
        self.events: queue.Queue[control_pb2.ControlEvent] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(client,), daemon=True)
        self.thread.start()

    def _run(self, client: ControlClient) -> None:
        try:
            for event in client.events():
                self.events.put(event)
        except ControlError as e:
            self.error = e

    def next(self) -> control_pb2.ControlEvent:
        return self.events.get(timeout=WAIT_S)

    def join(self) -> None:
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive(), "event iterator did not end"


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def connected(learner: Learner, generator_id: str) -> Callable[[], bool]:
    def check() -> bool:
        info = learner.registry.get(generator_id)
        return info is not None and info.connected

    return check


def join_event(epoch: int) -> control_pb2.ControlEvent:
    return control_pb2.ControlEvent(
        join=control_pb2.JoinGroup(epoch=epoch, rank_offset=1, world_size=2, backend="gloo")
    )


def raw_stub(learner: Learner) -> tuple[grpc.Channel, control_pb2_grpc.LearnerControlStub]:
    channel = grpc.insecure_channel(learner.address)
    return channel, control_pb2_grpc.LearnerControlStub(channel)


def rpc_code(fn: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()  # type: ignore[attr-defined]


def heartbeat_threads(generator_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"lpreg-heartbeat-{generator_id}"]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_register_heartbeat_events_report_round_trip(start_learner, make_client) -> None:
    learner = start_learner(version=7)
    client = make_client(learner.address)
    response = client.register()
    assert response.run_id == "test" and response.current_version == 7
    assert response.heartbeat_interval_s == pytest.approx(0.05)

    client.start_heartbeats(lambda: (3, 120, 2))
    wait_until(lambda: learner.registry.loaded_versions() == {"gen-0": 3}, "a heartbeat")
    info = learner.registry.get("gen-0")
    assert info is not None and (info.tokens_generated, info.in_flight) == (120, 2)
    assert client.learner_version == 7

    consumer = EventConsumer(client)
    wait_until(connected(learner, "gen-0"), "the Control stream")
    assert [i.generator_id for i in learner.registry.alive()] == ["gen-0"]
    learner.registry.send("gen-0", join_event(1))
    learner.registry.mark_members(["gen-0"], epoch=1)
    event = consumer.next()
    assert event.join.epoch == 1 and event.join.backend == "gloo" and event.seq > 0

    learner.registry.send_all(
        control_pb2.ControlEvent(publish=control_pb2.PublishWeights(version=8, epoch=1)), ["gen-0"]
    )
    assert consumer.next().publish.version == 8
    assert client.report_loaded(8, "abcd", ok=True, load_s=0.25)
    reports = learner.registry.wait_loaded(8, ["gen-0"], timeout_s=WAIT_S)
    assert reports["gen-0"].checksum == "abcd" and reports["gen-0"].ok

    status = client.status()
    assert status.policy_version == 7
    assert [(g.generator_id, g.member, g.backend) for g in status.generators] == [
        ("gen-0", True, "hf")
    ]

    learner.registry.close("run finished")
    shutdown = consumer.next()
    assert shutdown.shutdown.reason == "run finished"
    consumer.join()
    assert consumer.error is None
    assert client.closed
    assert heartbeat_threads("gen-0") == []


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_unknown_generator_and_stale_session_get_not_found(start_learner, make_client) -> None:
    learner = start_learner()
    channel, stub = raw_stub(learner)
    md = bearer_metadata(TOKEN)
    with channel:
        never = control_pb2.HeartbeatRequest(generator_id="ghost", session_id="nope")
        assert rpc_code(lambda: stub.Heartbeat(never, metadata=md)) is grpc.StatusCode.NOT_FOUND
        report = control_pb2.WeightsLoadedReport(generator_id="ghost", session_id="nope", version=1)
        assert (
            rpc_code(lambda: stub.ReportWeightsLoaded(report, metadata=md))
            is grpc.StatusCode.NOT_FOUND
        )
        control = control_pb2.ControlRequest(generator_id="ghost", session_id="nope")
        assert (
            rpc_code(lambda: list(stub.Control(control, metadata=md))) is grpc.StatusCode.NOT_FOUND
        )

        register = control_pb2.RegisterRequest(
            generator_id="gen-0", backend="hf", num_workers=1, vocab_size=VOCAB, device="cpu"
        )
        stale = stub.Register(register, metadata=md).session_id
        stub.Register(register, metadata=md)
        stale_beat = control_pb2.HeartbeatRequest(generator_id="gen-0", session_id=stale)
        with pytest.raises(grpc.RpcError) as info:
            stub.Heartbeat(stale_beat, metadata=md)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        assert "replaced" in info.value.details()  # type: ignore[attr-defined]
        stale_control = control_pb2.ControlRequest(generator_id="gen-0", session_id=stale)
        assert (
            rpc_code(lambda: list(stub.Control(stale_control, metadata=md)))
            is grpc.StatusCode.NOT_FOUND
        )

    # The client turns the codes back into domain errors.
    client = make_client(learner.address, generator_id="gen-1")
    client.register()
    learner.registry.register("gen-1", "hf", 1, VOCAB, "cpu")  # someone else replaces the session
    with pytest.raises(UnknownGenerator, match="replaced"):
        client.report_loaded(1, "abcd")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_invalid_registration_is_refused_without_retrying(start_learner, make_client) -> None:
    learner = start_learner()
    client = make_client(learner.address, vocab_size=VOCAB + 1, retry_attempts=50)
    with pytest.raises(InvalidArgument, match="vocab_size"):
        client.register()
    assert learner.registry.snapshot() == []


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_bearer_token_is_required_except_for_health(start_learner, make_client) -> None:
    learner = start_learner()
    channel, stub = raw_stub(learner)
    register = control_pb2.RegisterRequest(
        generator_id="gen-0", backend="hf", num_workers=1, vocab_size=VOCAB, device="cpu"
    )
    with channel:
        assert rpc_code(lambda: stub.Register(register)) is grpc.StatusCode.UNAUTHENTICATED
        wrong = bearer_metadata("not-the-token")
        assert (
            rpc_code(lambda: stub.Register(register, metadata=wrong))
            is grpc.StatusCode.UNAUTHENTICATED
        )
        basic = (("authorization", f"Basic {TOKEN}"),)
        assert (
            rpc_code(lambda: stub.Register(register, metadata=basic))
            is grpc.StatusCode.UNAUTHENTICATED
        )
        status = control_pb2.StatusRequest()
        assert rpc_code(lambda: stub.GetStatus(status)) is grpc.StatusCode.UNAUTHENTICATED
        control = control_pb2.ControlRequest(generator_id="gen-0", session_id="x")
        assert rpc_code(lambda: list(stub.Control(control))) is grpc.StatusCode.UNAUTHENTICATED

        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lpreg.v1.LearnerControl"):
            reply = health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        assert stub.Register(register, metadata=bearer_metadata(TOKEN)).session_id

    with pytest.raises(Unauthenticated, match="invalid bearer token"):
        make_client(
            learner.address, generator_id="gen-1", auth_token="wrong", retry_attempts=50
        ).register()
    assert [i.generator_id for i in learner.registry.snapshot()] == ["gen-0"]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_auth_can_be_disabled(start_learner, make_client) -> None:
    learner = start_learner(require_auth=False)
    assert make_client(learner.address, auth_token=None).register().session_id


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_messages_over_the_size_limit_are_refused(start_learner, make_client) -> None:
    learner = start_learner(max_message_bytes=1024)
    client = make_client(learner.address, generator_id="x" * 60, max_message_bytes=1024)
    client.register()
    for i in range(40):
        learner.registry.register(f"gen-{i:02d}-{'y' * 40}", "hf", 1, VOCAB, "cpu")
    with pytest.raises(ControlError, match="RESOURCE_EXHAUSTED"):
        client.status()


def _self_signed_with_cryptography(directory: Path) -> tuple[Path, Path] | None:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _self_signed_with_openssl(directory: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key_path), "-out", str(cert_path), "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert_path, key_path


@pytest.fixture
def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """(cert, key) PEM files of a self-signed certificate for 127.0.0.1 and localhost."""
    return _self_signed_with_cryptography(tmp_path) or _self_signed_with_openssl(tmp_path)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_tls_on_loopback(start_learner, make_client, self_signed_cert) -> None:
    cert, key = self_signed_cert
    learner = start_learner(tls_cert_file=str(cert), tls_key_file=str(key))
    client = make_client(learner.address, tls_ca_file=str(cert))
    assert client.register().session_id
    consumer = EventConsumer(client)
    wait_until(connected(learner, "gen-0"), "the Control stream over TLS")
    learner.registry.send("gen-0", join_event(1))
    assert consumer.next().join.epoch == 1

    with grpc.secure_channel(
        learner.address, grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    ) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    plaintext = make_client(learner.address, generator_id="gen-plain", retry_attempts=2)
    with pytest.raises(Unavailable, match="unreachable after 2 tries"):
        plaintext.register()
    assert learner.registry.get("gen-plain") is None


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("heartbeats", [True, False], ids=["with-heartbeats", "events-only"])
def test_client_survives_a_learner_restart(
    start_learner, make_client, caplog: pytest.LogCaptureFixture, heartbeats: bool
) -> None:
    caplog.set_level(logging.INFO, logger="services.generator.control_client")
    first = start_learner()
    client = make_client(first.address, retry_attempts=200)
    old_session = client.register().session_id
    if heartbeats:
        client.start_heartbeats(lambda: (0, 0, 0))
    consumer = EventConsumer(client)
    wait_until(connected(first, "gen-0"), "the first Control stream")
    first.registry.send("gen-0", join_event(1))
    assert consumer.next().join.epoch == 1

    # A crash: the server goes away without sending Shutdown.
    first.server.stop(0).wait(WAIT_S)
    # Start the new learner only once the client has found the old one gone and is retrying.
    wait_until(
        lambda: any("not reachable" in r.getMessage() for r in caplog.records),
        "the client to retry registration",
    )

    second = start_learner(port=first.port)
    wait_until(connected(second, "gen-0"), "the Control stream to the restarted learner")
    info = second.registry.get("gen-0")
    assert info is not None and info.session_id != old_session
    assert client.session_id == info.session_id
    second.registry.send("gen-0", join_event(1))
    event = consumer.next()
    assert event.join.epoch == 1
    assert consumer.error is None

    client.close()
    consumer.join()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_close_ends_event_iterator_and_heartbeats(start_learner, make_client) -> None:
    learner = start_learner()
    client = make_client(learner.address, generator_id="gen-close")
    client.register()
    client.start_heartbeats(lambda: (0, 0, 0))
    consumer = EventConsumer(client)
    wait_until(connected(learner, "gen-close"), "the Control stream")

    client.close()
    consumer.join()
    assert consumer.error is None
    assert heartbeat_threads("gen-close") == []
    # The server notices the cancelled stream and frees its worker.
    wait_until(lambda: not connected(learner, "gen-close")(), "the server to drop the stream")
    client.close()  # idempotent


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_client_gives_up_with_a_clear_error_when_nobody_listens(make_client, free_port) -> None:
    client = make_client(f"127.0.0.1:{free_port()}", retry_attempts=3)
    with pytest.raises(Unavailable, match=r"unreachable after 3 tries"):
        client.register()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_server_stop_reports_not_serving_to_health_watchers(start_learner) -> None:
    learner = start_learner()
    with grpc.insecure_channel(learner.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        learner.registry.close("draining")
        done = learner.server.stop(WAIT_S)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert done.wait(WAIT_S)


def test_load_auth_token_reads_the_configured_variable() -> None:
    config = ControlConfig(auth_token_env="MY_TOKEN")
    assert load_auth_token(config, {"MY_TOKEN": " abc \n"}) == "abc"
    with pytest.raises(AuthConfigError, match="MY_TOKEN.*require_auth=false"):
        load_auth_token(config, {})
    with pytest.raises(AuthConfigError, match="printable ASCII"):
        load_auth_token(config, {"MY_TOKEN": "two words"})
    assert load_auth_token(ControlConfig(require_auth=False), {}) is None


def test_bearer_token_check() -> None:
    assert bearer_token_error(bearer_metadata("tok"), "tok") is None
    assert bearer_token_error((("authorization", "bearer tok"),), "tok") is None
    assert bearer_token_error((("authorization", b"Bearer tok"),), "tok") is None
    assert "missing" in (bearer_token_error((), "tok") or "")
    assert "invalid" in (bearer_token_error(bearer_metadata("tok2"), "tok") or "")
    assert "Bearer <token>" in (bearer_token_error((("authorization", "Bearer "),), "tok") or "")
    twice = bearer_metadata("tok") + bearer_metadata("tok")
    assert "more than one" in (bearer_token_error(twice, "tok") or "")
