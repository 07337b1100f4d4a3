"""The learner's LearnerControl servicer: proto in, GeneratorRegistry call, proto out.

Domain errors raised by the registry (UnknownGenerator, InvalidArgument, Unavailable) become
status codes in services.common.grpc_status.ControlInterceptor; nothing here touches the context
except to learn whether a Control stream is still wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc

from lpreg_core.wire.lpreg.v1 import control_pb2, control_pb2_grpc
from services.common.errors import InvalidArgument
from services.learner.registry import GeneratorInfo, GeneratorRegistry


def generator_status(info: GeneratorInfo) -> control_pb2.GeneratorStatus:
    """The GetStatus entry of one generator (for the learner's status provider)."""
    return control_pb2.GeneratorStatus(
        generator_id=info.generator_id,
        loaded_version=info.loaded_version,
        alive=info.alive,
        last_heartbeat_age_s=info.last_heartbeat_age_s,
        member=info.member,
        backend=info.backend,
    )


class LearnerControlServicer(control_pb2_grpc.LearnerControlServicer):
    def __init__(
        self,
        registry: GeneratorRegistry,
        status_provider: Callable[[], control_pb2.StatusResponse],
        run_id: str,
        current_version: Callable[[], int],
        heartbeat_interval_s: float,
    ) -> None:
        self._registry = registry
        self._status_provider = status_provider
        self._run_id = run_id
        self._current_version = current_version
        self._heartbeat_interval_s = heartbeat_interval_s

    def Register(
        self, request: control_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> control_pb2.RegisterResponse:
        if request.run_id and request.run_id != self._run_id:
            raise InvalidArgument(
                f"generator {request.generator_id} is configured for run {request.run_id!r} but "
                f"this learner runs {self._run_id!r}: give both the same run_id"
            )
        info = self._registry.register(
            request.generator_id,
            request.backend,
            request.num_workers,
            request.vocab_size,
            request.device,
            host=request.host,
        )
        return control_pb2.RegisterResponse(
            session_id=info.session_id,
            run_id=self._run_id,
            current_version=self._current_version(),
            heartbeat_interval_s=self._heartbeat_interval_s,
        )

    def Heartbeat(
        self, request: control_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> control_pb2.HeartbeatResponse:
        self._registry.heartbeat(
            request.generator_id,
            request.session_id,
            request.loaded_version,
            request.tokens_generated,
            request.in_flight,
        )
        return control_pb2.HeartbeatResponse(current_version=self._current_version())

    def Control(
        self, request: control_pb2.ControlRequest, context: grpc.ServicerContext
    ) -> Iterator[control_pb2.ControlEvent]:
        events = self._registry.events(request.generator_id, request.session_id, context.is_active)
        # Headers now tell the client its stream is attached, before any event is due.
        context.send_initial_metadata(())
        yield from events

    def ReportWeightsLoaded(
        self, request: control_pb2.WeightsLoadedReport, context: grpc.ServicerContext
    ) -> control_pb2.ReportAck:
        self._registry.report_loaded(
            request.generator_id,
            request.session_id,
            request.version,
            request.checksum,
            request.ok,
            request.error,
            request.load_s,
        )
        return control_pb2.ReportAck(accepted=True)

    def GetStatus(
        self, request: control_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> control_pb2.StatusResponse:
        return self._status_provider()
