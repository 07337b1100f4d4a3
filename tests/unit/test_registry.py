"""GeneratorRegistry: sessions, liveness, event streams and load reports, with a fake clock."""

from __future__ import annotations

import threading

import pytest

from lpreg_core.wire.lpreg.v1 import control_pb2
from services.common.errors import InvalidArgument, Unavailable, UnknownGenerator
from services.learner.registry import EventStream, GeneratorRegistry

TTL_S = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> GeneratorRegistry:
    return GeneratorRegistry(heartbeat_ttl_s=TTL_S, clock=clock, expected_vocab_size=32)


def register(registry: GeneratorRegistry, generator_id: str = "gen-0") -> str:
    return registry.register(generator_id, "hf", 1, 32, "cpu").session_id


def join(epoch: int) -> control_pb2.ControlEvent:
    return control_pb2.ControlEvent(join=control_pb2.JoinGroup(epoch=epoch, world_size=2))


def publish(version: int) -> control_pb2.ControlEvent:
    return control_pb2.ControlEvent(publish=control_pb2.PublishWeights(version=version))


def always_active() -> bool:
    return True


def attach(registry: GeneratorRegistry, generator_id: str, session_id: str) -> EventStream:
    """Open a stream and run it up to the point where it is attached (connected)."""
    stream = registry.events(generator_id, session_id, always_active)
    registry.send(
        generator_id, control_pb2.ControlEvent(shutdown=control_pb2.Shutdown(reason="probe"))
    )
    assert next(stream).shutdown.reason == "probe"
    return stream


def test_register_returns_new_session_each_time(registry: GeneratorRegistry) -> None:
    first = register(registry)
    second = register(registry)
    assert len(first) == 32 and len(second) == 32
    assert first != second
    assert [info.session_id for info in registry.snapshot()] == [second]


@pytest.mark.parametrize(
    ("generator_id", "num_workers", "vocab_size"),
    [("gen-0", 1, 31), ("", 1, 32), ("gen 0", 1, 32), ("gen-0", 0, 32)],
)
def test_register_rejects_invalid_arguments(
    registry: GeneratorRegistry, generator_id: str, num_workers: int, vocab_size: int
) -> None:
    with pytest.raises(InvalidArgument):
        registry.register(generator_id, "hf", num_workers, vocab_size, "cpu")
    assert registry.snapshot() == []


def test_vocab_mismatch_message_names_both_sizes(registry: GeneratorRegistry) -> None:
    with pytest.raises(InvalidArgument, match="vocab_size 50.*32"):
        registry.register("gen-0", "hf", 1, 50, "cpu")


def test_heartbeat_unknown_or_stale_session_is_refused(registry: GeneratorRegistry) -> None:
    with pytest.raises(UnknownGenerator, match="not registered"):
        registry.heartbeat("nobody", "x", 0, 0, 0)
    stale = register(registry)
    current = register(registry)
    with pytest.raises(UnknownGenerator, match="replaced"):
        registry.heartbeat("gen-0", stale, 0, 0, 0)
    with pytest.raises(UnknownGenerator):
        registry.report_loaded("gen-0", stale, 1, "abc", True, "", 0.1)
    with pytest.raises(UnknownGenerator):
        registry.events("gen-0", stale, always_active)
    registry.heartbeat("gen-0", current, 3, 100, 2)
    info = registry.snapshot()[0]
    assert (info.loaded_version, info.tokens_generated, info.in_flight) == (3, 100, 2)


def test_alive_needs_fresh_heartbeat_and_connected_stream(
    registry: GeneratorRegistry, clock: FakeClock
) -> None:
    session = register(registry)
    assert registry.alive() == []  # registered but no Control stream yet
    stream = attach(registry, "gen-0", session)
    assert [info.generator_id for info in registry.alive()] == ["gen-0"]

    clock.advance(TTL_S + 1)
    assert registry.alive() == []
    assert registry.snapshot()[0].last_heartbeat_age_s == pytest.approx(TTL_S + 1)

    registry.heartbeat("gen-0", session, 0, 0, 0)
    assert [info.generator_id for info in registry.alive()] == ["gen-0"]

    stream.close()
    info = registry.snapshot()[0]
    assert not info.connected and not info.alive


def test_events_are_delivered_in_order_with_monotonic_seq(registry: GeneratorRegistry) -> None:
    a = register(registry, "gen-a")
    register(registry, "gen-b")
    seq_join = registry.send("gen-a", join(1))
    queued = registry.send_all(publish(1), ["gen-a", "gen-b", "gone"])
    assert queued == ["gen-a", "gen-b"]
    stream = registry.events("gen-a", a, always_active)
    first, second = next(stream), next(stream)
    assert first.join.epoch == 1 and first.seq == seq_join
    assert second.publish.version == 1 and second.seq > first.seq


def test_send_to_unknown_generator_raises(registry: GeneratorRegistry) -> None:
    with pytest.raises(UnknownGenerator):
        registry.send("nobody", join(1))


def test_reregistration_supersedes_stream_and_membership(registry: GeneratorRegistry) -> None:
    old = register(registry)
    stream = attach(registry, "gen-0", old)
    registry.mark_members(["gen-0"], epoch=4)
    registry.send("gen-0", publish(7))  # queued for the old session, dropped with it

    new = register(registry)
    # The old stream ends instead of delivering the old session's events.
    assert list(stream) == []
    info = registry.snapshot()[0]
    assert info.session_id == new
    assert not info.member
    assert registry.members() == []

    new_stream = registry.events("gen-0", new, always_active)
    registry.send("gen-0", join(5))
    assert next(new_stream).join.epoch == 5


def test_second_stream_of_a_session_replaces_the_first(registry: GeneratorRegistry) -> None:
    session = register(registry)
    first = attach(registry, "gen-0", session)
    second = attach(registry, "gen-0", session)
    assert list(first) == []
    registry.send("gen-0", join(2))
    assert next(second).join.epoch == 2
    assert registry.snapshot()[0].connected


def test_stream_ends_when_rpc_is_no_longer_active(registry: GeneratorRegistry) -> None:
    session = register(registry)
    active = threading.Event()
    active.set()
    stream = registry.events("gen-0", session, active.is_set)
    active.clear()
    assert list(stream) == []
    assert not registry.snapshot()[0].connected


def test_close_delivers_pending_events_then_shutdown_then_ends(registry: GeneratorRegistry) -> None:
    session = register(registry)
    stream = registry.events("gen-0", session, always_active)
    registry.send("gen-0", publish(3))
    registry.close("run finished")
    events = list(stream)
    assert [e.WhichOneof("event") for e in events] == ["publish", "shutdown"]
    assert events[1].shutdown.reason == "run finished"
    assert registry.closed
    with pytest.raises(Unavailable, match="run finished"):
        register(registry, "gen-1")
    registry.close("again")  # idempotent: no second Shutdown
    assert list(registry.events("gen-0", session, always_active)) == []


def test_close_wakes_a_blocked_stream(registry: GeneratorRegistry) -> None:
    session = register(registry)
    stream = registry.events("gen-0", session, always_active)
    received: list[control_pb2.ControlEvent] = []
    consumer = threading.Thread(target=lambda: received.extend(stream))
    consumer.start()
    registry.close("stop")
    consumer.join(timeout=10)
    assert not consumer.is_alive()
    assert [e.shutdown.reason for e in received] == ["stop"]


def test_remove_ends_stream_and_forgets(registry: GeneratorRegistry) -> None:
    session = register(registry)
    stream = registry.events("gen-0", session, always_active)
    assert registry.remove("gen-0")
    assert not registry.remove("gen-0")
    assert list(stream) == []
    assert registry.snapshot() == []
    with pytest.raises(UnknownGenerator):
        registry.heartbeat("gen-0", session, 0, 0, 0)


def test_report_loaded_updates_version_and_checksum(registry: GeneratorRegistry) -> None:
    session = register(registry)
    registry.report_loaded("gen-0", session, 2, "c2", True, "", 0.5)
    registry.report_loaded("gen-0", session, 3, "", False, "checksum mismatch", 0.1)
    assert registry.loaded_versions() == {"gen-0": 2}
    info = registry.snapshot()[0]
    assert info.loaded_checksum == "c2"
    reports = registry.wait_loaded(3, ["gen-0"], timeout_s=0)
    assert not reports["gen-0"].ok and reports["gen-0"].error == "checksum mismatch"


def test_wait_loaded_returns_once_all_reported(registry: GeneratorRegistry) -> None:
    a = register(registry, "gen-a")
    b = register(registry, "gen-b")
    registry.report_loaded("gen-a", a, 5, "x", True, "", 0.1)
    registry.report_loaded("gen-b", b, 6, "y", True, "", 0.1)  # newer also counts
    reports = registry.wait_loaded(5, ["gen-a", "gen-b"], timeout_s=1e9)
    assert {gid: r.version for gid, r in reports.items()} == {"gen-a": 5, "gen-b": 6}


def test_wait_loaded_wakes_on_a_report_from_another_thread(registry: GeneratorRegistry) -> None:
    a = register(registry, "gen-a")
    result: dict[str, object] = {}
    waiter = threading.Thread(
        target=lambda: result.update(registry.wait_loaded(1, ["gen-a"], timeout_s=1e9))
    )
    waiter.start()
    registry.report_loaded("gen-a", a, 1, "x", True, "", 0.1)
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert list(result) == ["gen-a"]


def test_wait_loaded_stops_at_the_deadline(registry: GeneratorRegistry, clock: FakeClock) -> None:
    a = register(registry, "gen-a")
    register(registry, "gen-b")
    registry.report_loaded("gen-a", a, 1, "x", True, "", 0.1)
    result: dict[str, object] = {}
    waiter = threading.Thread(
        target=lambda: result.update(registry.wait_loaded(1, ["gen-a", "gen-b"], timeout_s=30))
    )
    waiter.start()
    clock.advance(31)
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert list(result) == ["gen-a"]  # gen-b missed the deadline


def test_wait_loaded_does_not_wait_for_a_generator_that_can_no_longer_report(
    registry: GeneratorRegistry,
) -> None:
    register(registry, "gen-a")
    result: dict[str, object] = {"done": False}

    def wait() -> None:
        result.update(registry.wait_loaded(1, ["gen-a", "never-registered"], timeout_s=1e9))
        result["done"] = True

    waiter = threading.Thread(target=wait)
    waiter.start()
    register(registry, "gen-a")  # new session: not a member, will not ack this publish
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert result == {"done": True}


def test_mark_members_sets_the_exact_member_set(registry: GeneratorRegistry) -> None:
    for gid in ("gen-a", "gen-b", "gen-c"):
        register(registry, gid)
    assert registry.mark_members(["gen-b", "gen-a", "ghost"], epoch=1) == ["gen-a", "gen-b"]
    assert [m.generator_id for m in registry.members()] == ["gen-a", "gen-b"]
    assert all(m.epoch == 1 for m in registry.members())
    registry.mark_members(["gen-c"], epoch=2)
    assert [m.generator_id for m in registry.members()] == ["gen-c"]
    assert registry.epoch == 2


def test_snapshot_is_sorted_and_complete(registry: GeneratorRegistry, clock: FakeClock) -> None:
    register(registry, "gen-b")
    clock.advance(2)
    register(registry, "gen-a")
    snap = registry.snapshot()
    assert [i.generator_id for i in snap] == ["gen-a", "gen-b"]
    assert snap[1].last_heartbeat_age_s == pytest.approx(2)
    assert (snap[0].backend, snap[0].num_workers, snap[0].device) == ("hf", 1, "cpu")
    assert registry.get("gen-a") == snap[0]
    assert registry.get("nobody") is None
