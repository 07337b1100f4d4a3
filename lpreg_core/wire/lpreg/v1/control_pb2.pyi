from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("generator_id", "backend", "num_workers", "host", "vocab_size", "device", "run_id")
    GENERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    generator_id: str
    backend: str
    num_workers: int
    host: str
    vocab_size: int
    device: str
    run_id: str
    def __init__(self, generator_id: _Optional[str] = ..., backend: _Optional[str] = ..., num_workers: _Optional[int] = ..., host: _Optional[str] = ..., vocab_size: _Optional[int] = ..., device: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("session_id", "run_id", "current_version", "heartbeat_interval_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    run_id: str
    current_version: int
    heartbeat_interval_s: float
    def __init__(self, session_id: _Optional[str] = ..., run_id: _Optional[str] = ..., current_version: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("generator_id", "session_id", "loaded_version", "tokens_generated", "in_flight")
    GENERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    generator_id: str
    session_id: str
    loaded_version: int
    tokens_generated: int
    in_flight: int
    def __init__(self, generator_id: _Optional[str] = ..., session_id: _Optional[str] = ..., loaded_version: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("current_version",)
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    current_version: int
    def __init__(self, current_version: _Optional[int] = ...) -> None: ...

class ControlRequest(_message.Message):
    __slots__ = ("generator_id", "session_id")
    GENERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    generator_id: str
    session_id: str
    def __init__(self, generator_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class JoinGroup(_message.Message):
    __slots__ = ("epoch", "rank_offset", "world_size", "store_host", "store_port", "backend", "timeout_s", "secret")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RANK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    rank_offset: int
    world_size: int
    store_host: str
    store_port: int
    backend: str
    timeout_s: float
    secret: bytes
    def __init__(self, epoch: _Optional[int] = ..., rank_offset: _Optional[int] = ..., world_size: _Optional[int] = ..., store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., backend: _Optional[str] = ..., timeout_s: _Optional[float] = ..., secret: _Optional[bytes] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "bucket", "offset", "numel")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    bucket: int
    offset: int
    numel: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., bucket: _Optional[int] = ..., offset: _Optional[int] = ..., numel: _Optional[int] = ...) -> None: ...

class Bucket(_message.Message):
    __slots__ = ("index", "dtype", "numel", "nbytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    dtype: str
    numel: int
    nbytes: int
    def __init__(self, index: _Optional[int] = ..., dtype: _Optional[str] = ..., numel: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class WeightManifest(_message.Message):
    __slots__ = ("version", "tensors", "buckets", "checksum", "total_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    buckets: _containers.RepeatedCompositeFieldContainer[Bucket]
    checksum: str
    total_bytes: int
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., buckets: _Optional[_Iterable[_Union[Bucket, _Mapping]]] = ..., checksum: _Optional[str] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class PublishWeights(_message.Message):
    __slots__ = ("version", "epoch", "manifest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    version: int
    epoch: int
    manifest: WeightManifest
    def __init__(self, version: _Optional[int] = ..., epoch: _Optional[int] = ..., manifest: _Optional[_Union[WeightManifest, _Mapping]] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ControlEvent(_message.Message):
    __slots__ = ("seq", "join", "publish", "shutdown")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    seq: int
    join: JoinGroup
    publish: PublishWeights
    shutdown: Shutdown
    def __init__(self, seq: _Optional[int] = ..., join: _Optional[_Union[JoinGroup, _Mapping]] = ..., publish: _Optional[_Union[PublishWeights, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ...) -> None: ...

class WeightsLoadedReport(_message.Message):
    __slots__ = ("generator_id", "session_id", "version", "checksum", "load_s", "ok", "error")
    GENERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    generator_id: str
    session_id: str
    version: int
    checksum: str
    load_s: float
    ok: bool
    error: str
    def __init__(self, generator_id: _Optional[str] = ..., session_id: _Optional[str] = ..., version: _Optional[int] = ..., checksum: _Optional[str] = ..., load_s: _Optional[float] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GeneratorStatus(_message.Message):
    __slots__ = ("generator_id", "loaded_version", "alive", "last_heartbeat_age_s", "member", "backend")
    GENERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    generator_id: str
    loaded_version: int
    alive: bool
    last_heartbeat_age_s: float
    member: bool
    backend: str
    def __init__(self, generator_id: _Optional[str] = ..., loaded_version: _Optional[int] = ..., alive: _Optional[bool] = ..., last_heartbeat_age_s: _Optional[float] = ..., member: _Optional[bool] = ..., backend: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("run_id", "policy_version", "step", "epoch", "generators", "prompts_issued", "groups_trained", "groups_dropped_stale", "rollouts_in_dlq", "done")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GENERATORS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_ISSUED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_IN_DLQ_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    policy_version: int
    step: int
    epoch: int
    generators: _containers.RepeatedCompositeFieldContainer[GeneratorStatus]
    prompts_issued: int
    groups_trained: int
    groups_dropped_stale: int
    rollouts_in_dlq: int
    done: bool
    def __init__(self, run_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., generators: _Optional[_Iterable[_Union[GeneratorStatus, _Mapping]]] = ..., prompts_issued: _Optional[int] = ..., groups_trained: _Optional[int] = ..., groups_dropped_stale: _Optional[int] = ..., rollouts_in_dlq: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...
