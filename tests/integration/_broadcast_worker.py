"""A generator-side broadcast member for the integration tests, driven over stdin/stdout.

Run as ``python tests/integration/_broadcast_worker.py`` from the repository root. Each stdin line
is one JSON command; each produces one JSON line on stdout:

- ``{"op": "join", "epoch", "rank", "world_size", "port", "timeout_s"}``
- ``{"op": "receive", "manifest": <hex of control_pb2.WeightManifest>, "timeout_s",
  "die_after_buckets": k (optional)}``: answers ``{"ok", "checksum", "tensors": {name: [sha256
  of the tensor's bytes, shape, dtype]}}``; with ``die_after_buckets`` it receives k buckets through
  the group and then SIGKILLs itself mid-publish.
- ``{"op": "leave"}``, ``{"op": "resources"}`` (open descriptors and threads), ``{"op": "exit"}``.

Errors come back as ``{"ok": false, "error": <class name>, "message": ...}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lpreg_core.weights import manifest_from_proto  # noqa: E402
from lpreg_core.wire.lpreg.v1 import control_pb2  # noqa: E402
from services.common.broadcast import BroadcastError, WeightReceiver, _Deadline  # noqa: E402


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(
        tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data
    ).hexdigest()


def handle(receiver: WeightReceiver, command: dict[str, Any]) -> dict[str, Any]:
    op = command["op"]
    if op == "join":
        receiver.join(
            command["epoch"],
            command["rank"],
            command["world_size"],
            "127.0.0.1",
            command["port"],
            "gloo",
            command["timeout_s"],
        )
        return {"ok": True, "epoch": command["epoch"]}
    if op == "receive":
        proto = control_pb2.WeightManifest.FromString(bytes.fromhex(command["manifest"]))
        manifest = manifest_from_proto(proto)
        die_after = command.get("die_after_buckets")
        if die_after is not None:
            # A crash in the middle of a publish, at a point the test controls.
            group = receiver._group
            assert group is not None
            deadline = _Deadline(command["timeout_s"])
            for bucket in manifest.buckets[:die_after]:
                flat = torch.empty(bucket.numel, dtype=getattr(torch, bucket.dtype))
                group.broadcast(flat, deadline, f"bucket {bucket.index}")
            os.kill(os.getpid(), signal.SIGKILL)
        named = receiver.receive(manifest, "cpu", command["timeout_s"])
        return {
            "ok": True,
            "version": manifest.version,
            "checksum": manifest.checksum,
            "tensors": {
                name: [tensor_digest(t), list(t.shape), str(t.dtype).removeprefix("torch.")]
                for name, t in named
            },
        }
    if op == "leave":
        receiver.leave()
        return {"ok": True}
    if op == "resources":
        return {
            "ok": True,
            "fds": len(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(),
            "os_threads": len(os.listdir("/proc/self/task")),
        }
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    torch.set_num_threads(1)
    receiver = WeightReceiver()
    print(json.dumps({"ok": True, "ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            break
        try:
            reply = handle(receiver, command)
        except (BroadcastError, ValueError, RuntimeError) as e:
            reply = {"ok": False, "error": type(e).__name__, "message": str(e)}
        print(json.dumps(reply), flush=True)
    receiver.close()


if __name__ == "__main__":
    main()
