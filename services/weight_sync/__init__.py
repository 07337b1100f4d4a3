"""Weight sync adapters: the bucketed collective broadcast (Gloo on CPU, NCCL on GPU).

``WeightSender`` (learner, rank 0) and ``WeightReceiver`` (each generator worker) speak the
protocol described in ``services.weight_sync.group``; the learner fills and sends a publish bucket
by bucket (``WeightSender.send_weights``, planned by ``lpreg_core.weight_sync.plan_manifest``), a
worker receives and loads it bucket by bucket (``WeightReceiver.receive_buckets``), and every
bucket is authenticated under the epoch secret (``services.weight_sync.integrity``). Other transports (CUDA IPC, a shared filesystem path) fit behind the same
``lpreg_core.weight_sync`` interfaces.
"""

from services.weight_sync.group import (
    BroadcastError,
    BroadcastFailed,
    ChecksumMismatch,
    GroupBackend,
    MembersMissing,
    check_member_backend,
    check_receive_target,
    resolve_backend,
)
from services.weight_sync.receiver import BucketStream, WeightReceiver
from services.weight_sync.sender import WeightSender

__all__ = [
    "BroadcastError",
    "BroadcastFailed",
    "BucketStream",
    "ChecksumMismatch",
    "GroupBackend",
    "MembersMissing",
    "WeightReceiver",
    "WeightSender",
    "check_member_backend",
    "check_receive_target",
    "resolve_backend",
]
