"""The generator's loop: take prompt tasks, sample and score completions, publish rollout
groups; follow the learner's control events (join a weight-sync epoch, load a publish, shut down).

The loop takes its transport (``lpreg_core.transport``), control link and backend as arguments and
imports no Redis, gRPC or socket module; ``services.generator.main`` wires the real ones
(RedisStreams, the gRPC ControlClient, the hf or vllm backend).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Protocol

from lpreg_core.config import RunConfig
from lpreg_core.rewards import make_verifier
from lpreg_core.rollout import SCHEMA_VERSION
from lpreg_core.staleness import StalenessPolicy
from lpreg_core.transport import Delivery, GeneratorTransport
from lpreg_core.weights import manifest_from_proto
from lpreg_core.wire.lpreg.v1 import control_pb2, rollout_pb2
from services.common.errors import ControlError
from services.generator.backends import GeneratorBackend, SampleRequest, WeightsUnusable
from services.generator.metrics import GeneratorMetrics

log = logging.getLogger("lpreg.generator")


class ControlLink(Protocol):
    """The generator's side of the control plane, as the loop uses it."""

    @property
    def learner_version(self) -> int:
        """The newest policy version the learner reported (heartbeat replies)."""
        ...

    @property
    def seconds_since_contact(self) -> float: ...

    def register(self) -> control_pb2.RegisterResponse: ...

    def start_heartbeats(
        self, get_state: Callable[[], tuple[int, int, int]], interval_s: float | None = None
    ) -> None: ...

    def events(self) -> Iterator[control_pb2.ControlEvent]:
        """Control events until Shutdown or close; reconnects on its own."""
        ...

    def report_loaded(
        self, version: int, checksum: str, ok: bool = True, error: str = "", load_s: float = 0.0
    ) -> bool: ...

    def close(self) -> None: ...


class GeneratorLoop:
    """One generator: a sampling loop and a control loop sharing one backend."""

    def __init__(
        self,
        config: RunConfig,
        generator_id: str,
        *,
        backend: GeneratorBackend,
        transport: GeneratorTransport,
        control: ControlLink,
        metrics: GeneratorMetrics,
        store_host: str | None = None,
    ) -> None:
        self.config = config
        self.id = generator_id
        self.backend = backend
        self.streams = transport
        self.control = control
        self.metrics = metrics
        # Address to dial for the learner's TCPStore instead of the one it advertises.
        self.store_host = store_host
        self.policy = StalenessPolicy(config.learner.prompts_per_step, config.learner.max_staleness)
        self.verifier = make_verifier(config.task.verifier)
        self.stop = threading.Event()
        # Set while this generator holds older weights than the learner's current version, so
        # it does not spend compute on rollouts that would be dropped as stale.
        self.weights_current = threading.Event()
        self.tokens_generated = 0
        self.failed = False
        # Newest policy version the learner announced (publish events, heartbeat replies).
        self.announced_version = 0
        self.in_flight = 0

    # -- control loop -------------------------------------------------------------------------
    def _control_loop(self) -> None:
        try:
            self._follow_events()
        except ControlError as e:
            log.error("lost the learner for good: %s", e)
            self.failed = True
            self.stop.set()

    def _report(self, version: int, checksum: str, ok: bool, error: str, load_s: float) -> None:
        try:
            self.control.report_loaded(version, checksum, ok, error, load_s)
        except ControlError as e:  # a superseded session re-registers and rejoins
            log.warning("could not report v%d loaded: %s", version, e)

    def _follow_events(self) -> None:
        for event in self.control.events():
            kind = event.WhichOneof("event")
            if kind == "join":
                self._join(event.join)
            elif kind == "publish":
                self._load(event.publish)
            elif kind == "shutdown":
                log.info("learner asked to shut down: %s", event.shutdown.reason)
                self.stop.set()
                break
            if self.stop.is_set():
                break

    def _join(self, join: control_pb2.JoinGroup) -> None:
        if self.store_host:
            join.store_host = self.store_host
        start = time.monotonic()
        try:
            self.backend.leave_group()
            self.backend.join_group(join)
        except Exception as e:  # a failed join only costs this epoch; the learner starts another
            log.warning("joining broadcast epoch %d failed: %s", join.epoch, e)
            return
        self.metrics.weight_sync_seconds.labels(phase="join").observe(time.monotonic() - start)
        log.info(
            "joined broadcast epoch %d as rank %d/%d", join.epoch, join.rank_offset, join.world_size
        )

    def _load(self, publish: control_pb2.PublishWeights) -> None:
        self.announced_version = max(self.announced_version, publish.version)
        manifest = manifest_from_proto(publish.manifest)
        start = time.monotonic()
        try:
            checksum = self.backend.update_weights(manifest, self.config.learner.publish_timeout_s)
        except Exception as e:  # the learner drops us from the epoch; we rejoin the next one
            log.warning("loading weights v%d failed: %s", publish.version, e)
            # The backend may hold a half-loaded model: sample nothing until a good publish.
            self.weights_current.clear()
            self._report(publish.version, "", False, str(e), time.monotonic() - start)
            return
        load_s = time.monotonic() - start
        self.metrics.weight_sync_seconds.labels(phase="receive_apply").observe(load_s)
        self.metrics.weight_version.set(publish.version)
        self._report(publish.version, checksum, True, "", load_s)
        self.weights_current.set()
        log.info("loaded weights v%d (%.3fs, checksum %s)", publish.version, load_s, checksum[:12])

    # -- sampling loop ------------------------------------------------------------------------
    def _build_group(
        self,
        delivery: Delivery[rollout_pb2.PromptTask],
        prompt_ids: list[int],
        completions,
        gen_s: float,
    ) -> rollout_pb2.RolloutGroup:
        task = delivery.value
        score_start = time.monotonic()
        group = rollout_pb2.RolloutGroup(
            schema_version=SCHEMA_VERSION,
            run_id=task.run_id,
            rollout_id=uuid.uuid4().hex,
            task_id=task.task_id,
            prompt_id=task.prompt_id,
            generator_id=self.id,
            data_index=task.data_index,
            issue_version=task.issue_version,
            prompt_token_ids=prompt_ids,
            vocab_size=self.backend.vocab_size,
        )
        for c in completions:
            text = self.backend.decode(c.token_ids)
            group.completions.append(
                rollout_pb2.Completion(
                    token_ids=c.token_ids,
                    logprobs=c.logprobs,
                    versions=c.versions,
                    reward=self.verifier.score(text, task.answer),
                    finish_reason=rollout_pb2.FINISH_REASON_STOP
                    if c.finished
                    else rollout_pb2.FINISH_REASON_LENGTH,
                    text=text,
                )
            )
        group.timings.queue_s = max(0.0, time.time() - task.issued_at - gen_s)
        group.timings.generate_s = gen_s
        group.timings.score_s = time.monotonic() - score_start
        group.created_at = time.time()
        return group

    def _sample_once(self) -> None:
        deliveries = self.streams.read_tasks(
            self.config.generator.max_tasks_in_flight, self.config.redis.block_ms
        )
        if not deliveries:
            return
        self.metrics.tasks_reclaimed.inc(sum(1 for d in deliveries if d.redelivered))
        by_temp: dict[float, list[Delivery[rollout_pb2.PromptTask]]] = {}
        for d in deliveries:
            by_temp.setdefault(round(d.value.temperature, 6), []).append(d)
        for temperature, batch in by_temp.items():
            prompts = [self.backend.tokenize(d.value.prompt) for d in batch]
            requests = [
                SampleRequest(p, d.value.num_samples, temperature, d.value.max_new_tokens)
                for p, d in zip(prompts, batch, strict=True)
            ]
            self.in_flight = len(batch)
            self.metrics.tasks_in_flight.set(self.in_flight)
            start = time.monotonic()
            try:
                results = self.backend.generate(requests)
            except WeightsUnusable as e:
                # A publish died half way (a member or the learner vanished mid-broadcast): give
                # the tasks back and sample again once a complete publish has loaded.
                log.warning("not sampling until the next complete publish: %s", e)
                self.weights_current.clear()
                self.streams.release_tasks([d.entry_id for d in deliveries])
                self.in_flight = 0
                self.metrics.tasks_in_flight.set(0)
                return
            gen_s = time.monotonic() - start
            for d, p, completions in zip(batch, prompts, results, strict=True):
                group = self._build_group(d, p, completions, gen_s)
                if self.streams.publish_group_and_ack_task(group, d.entry_id) is None:
                    # Our task was reclaimed and another generator published it first.
                    log.info(
                        "task %s was already completed elsewhere; dropped ours", d.value.task_id
                    )
                    continue
                for c in group.completions:
                    self.metrics.observe_response(
                        len(c.token_ids),
                        truncated=c.finish_reason == rollout_pb2.FINISH_REASON_LENGTH,
                    )
                num_tokens = sum(len(c.token_ids) for c in completions)
                self.tokens_generated += num_tokens
                self.metrics.tokens.inc(num_tokens)
                self.metrics.groups.inc()
                self.metrics.generate_seconds.observe(gen_s)
                rewards = [c.reward for c in group.completions]
                self.metrics.reward_mean.set(sum(rewards) / len(rewards))
            self.in_flight = 0
            self.metrics.tasks_in_flight.set(0)

    def _too_far_behind(self) -> bool:
        """Everything sampled now would likely be dropped as stale: wait for newer weights (or
        for the learner to come back) instead of spending compute on it."""
        if self.control.seconds_since_contact > self.config.generator.heartbeat_ttl_s:
            return True
        learner = max(self.announced_version, self.control.learner_version or 0)
        return self.policy.generator_should_wait(learner, self.backend.version)

    def _heartbeat_state(self) -> tuple[int, int, int]:
        try:
            self.streams.heartbeat(self.id, self.config.generator.heartbeat_ttl_s)
        except Exception as e:  # Redis being down must not stop gRPC heartbeats
            log.warning("redis heartbeat failed: %s", e)
        return self.backend.version, self.tokens_generated, self.in_flight

    def run(self) -> None:
        self.streams.connect()
        reply = self.control.register()
        if reply.current_version == self.backend.version:
            self.weights_current.set()
        else:
            log.info("learner is at v%d; waiting for its weights", reply.current_version)
        self.control.start_heartbeats(
            self._heartbeat_state, self.config.generator.heartbeat_interval_s
        )
        control = threading.Thread(target=self._control_loop, name="control", daemon=True)
        control.start()
        log.info("generator %s serving run %s", self.id, self.config.run_id)
        while not self.stop.is_set():
            if not self.weights_current.wait(timeout=0.5) or self._too_far_behind():
                time.sleep(0.05)
                continue
            self._sample_once()
        log.info("generator %s stopping", self.id)
        self.control.close()
        self.backend.close()
        self.streams.close()
