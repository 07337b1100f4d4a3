"""The generator loop driven without processes: in-memory transport, a scripted backend and a
fake control link."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from lpreg_core.config import RunConfig
from lpreg_core.weights import WeightManifest, build_manifest, manifest_to_proto
from lpreg_core.wire.lpreg.v1 import control_pb2, rollout_pb2
from services.generator.backends import SampledCompletion, SampleRequest, WeightsUnusable
from services.generator.loop import GeneratorLoop
from services.generator.metrics import GeneratorMetrics
from services.transport import InMemoryStreams

RUN = "gen-loop"


class ScriptedBackend:
    """Answers every prompt with "4" (token 4) or a truncated "4 4 4"; loads any manifest."""

    vocab_size = 10
    num_workers = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.version = 0
        self.loaded: list[int] = []

    def tokenize(self, text: str) -> list[int]:
        return [1, 2]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(str(t) for t in token_ids)

    def generate(self, requests: list[SampleRequest]) -> list[list[SampledCompletion]]:
        out = []
        for r in requests:
            out.append(
                [
                    SampledCompletion([4], [-0.1], [self.version], finished=True)
                    if i % 2 == 0
                    else SampledCompletion([4, 4, 4], [-0.1] * 3, [self.version] * 3)
                    for i in range(r.num_samples)
                ]
            )
        return out

    def join_group(self, join: control_pb2.JoinGroup) -> None:
        pass

    def update_weights(self, manifest: WeightManifest, timeout_s: float) -> str:
        self.version = manifest.version
        self.loaded.append(manifest.version)
        return "checksum"

    def leave_group(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeControl:
    def __init__(self, events: list[control_pb2.ControlEvent]) -> None:
        self._events = events
        self.learner_version = 0
        self.seconds_since_contact = 0.0
        self.reports: list[tuple[int, bool]] = []

    def register(self) -> control_pb2.RegisterResponse:
        return control_pb2.RegisterResponse(session_id="s", run_id=RUN, current_version=0)

    def start_heartbeats(
        self, get_state: Callable[[], tuple[int, int, int]], interval_s: float | None = None
    ) -> None:
        pass

    def events(self) -> Iterator[control_pb2.ControlEvent]:
        yield from self._events

    def report_loaded(
        self, version: int, checksum: str, ok: bool = True, error: str = "", load_s: float = 0.0
    ) -> bool:
        self.reports.append((version, ok))
        return True

    def close(self) -> None:
        pass


def make_loop(events: list[control_pb2.ControlEvent] | None = None) -> tuple[GeneratorLoop, Any]:
    config = RunConfig.model_validate(
        {"run_id": RUN, "learner": {"max_staleness": 1}, "redis": {"block_ms": 1}}
    )
    learner = InMemoryStreams(RUN, "learner")
    loop = GeneratorLoop(
        config,
        "gen-0",
        backend=ScriptedBackend(),
        transport=learner.for_consumer("gen-0"),
        control=FakeControl(events or []),
        metrics=GeneratorMetrics(CollectorRegistry(), RUN),
    )
    return loop, learner


def task(task_id: str) -> rollout_pb2.PromptTask:
    return rollout_pb2.PromptTask(
        run_id=RUN,
        task_id=task_id,
        prompt_id="p",
        prompt="2+2=",
        answer="4",
        num_samples=2,
        temperature=1.0,
        max_new_tokens=3,
    )


def test_tasks_become_scored_groups_with_per_token_versions() -> None:
    loop, learner = make_loop()
    learner.issue_tasks([task("a"), task("b")])
    loop._sample_once()
    groups = learner.read_groups(10, 1, vocab_size=10)
    assert [d.value.task_id for d in groups] == ["a", "b"]
    g = groups[0].value
    assert [c.reward for c in g.completions] == [1.0, 0.0]
    assert [c.finish_reason for c in g.completions] == [
        rollout_pb2.FINISH_REASON_STOP,
        rollout_pb2.FINISH_REASON_LENGTH,
    ]
    assert list(g.completions[1].versions) == [0, 0, 0]
    assert learner.pending_counts()["prompts"] == 0  # each task acked with its group


def test_generators_wait_instead_of_sampling_what_would_arrive_stale() -> None:
    loop, _ = make_loop()
    loop.control.learner_version = 1  # type: ignore[misc]
    assert not loop._too_far_behind()  # one version behind is within max_staleness 1
    loop.control.learner_version = 2  # type: ignore[misc]
    assert loop._too_far_behind()
    loop.control.learner_version = 0  # type: ignore[misc]
    loop.control.seconds_since_contact = 1e6  # type: ignore[misc]
    assert loop._too_far_behind()  # cut off from the learner


def test_control_events_load_weights_report_and_shut_down() -> None:
    manifest = manifest_to_proto(build_manifest(3, [("w", torch.zeros(4))], 1 << 20)[0])
    loop, _ = make_loop(
        [
            control_pb2.ControlEvent(join=control_pb2.JoinGroup(epoch=1, rank_offset=1)),
            control_pb2.ControlEvent(
                publish=control_pb2.PublishWeights(version=3, epoch=1, manifest=manifest)
            ),
            control_pb2.ControlEvent(shutdown=control_pb2.Shutdown(reason="done")),
        ]
    )
    loop._control_loop()
    assert loop.backend.version == 3
    assert loop.control.reports == [(3, True)]  # type: ignore[attr-defined]
    assert loop.weights_current.is_set()
    assert loop.stop.is_set()


def test_a_half_loaded_model_samples_nothing_and_gives_its_tasks_back() -> None:
    loop, learner = make_loop()

    def unusable(requests: list[SampleRequest]) -> list[list[SampledCompletion]]:
        raise WeightsUnusable("loading v3 stopped after 2 tensors")

    loop.backend.generate = unusable  # type: ignore[method-assign]
    loop.weights_current.set()
    learner.issue_tasks([task("a")])
    loop._sample_once()  # no exception: the generator lives on
    assert not loop.weights_current.is_set()
    assert learner.read_groups(10, 1, vocab_size=10) == []
    assert learner.pending_counts()["prompts"] == 1  # released: reclaimed once idle
