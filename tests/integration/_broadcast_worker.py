"""A generator-side broadcast member for the integration tests, driven over stdin/stdout.

Run as ``python tests/integration/_broadcast_worker.py`` from the repository root. Each stdin line
is one JSON command; each produces one JSON line on stdout:

- ``{"op": "join", "epoch", "rank", "world_size", "port", "timeout_s", "secret": <hex>}``
- ``{"op": "receive", "manifest": <hex of control_pb2.WeightManifest>, "timeout_s",
  "die_after_buckets": k, "close_after_buckets": k, "measure_rss": bool, "keep_tensors": bool
  (all optional)}``: receives bucket by bucket, hashing each tensor as it arrives and keeping none
  (``keep_tensors``: keeping all of them until the reply, as a whole-model receive would), and
  answers
  ``{"ok", "checksum", "tensors": {name: [sha256 of the tensor's bytes, shape, dtype]},
  "buckets_received", "peak_buffer_bytes", "live_buffer_bytes", "rss_before_bytes",
  "rss_peak_bytes"}``
  (with ``error`` and ``message`` when the stream failed). With ``die_after_buckets`` it
  SIGKILLs itself once k buckets arrived, mid-publish; with ``close_after_buckets`` it stops
  consuming there and closes the stream, which drains the rest of the publish. ``measure_rss``
  restarts the kernel's peak-RSS counter first, so ``rss_peak_bytes`` is the largest resident set
  during this receive (``rss_before_bytes``: the resident set when it started).
- ``{"op": "leave"}``, ``{"op": "resources"}`` (open descriptors, threads, resident set),
  ``{"op": "exit"}``.

An outsider, which has the store's address but no secret, uses the raw store instead:

- ``{"op": "raw", "port", "actions": [[name, *args], ...]}`` runs each action on a plain
  TCPStore client and answers ``{"ok", "results": [...]}``: ``["list"]`` (every key in the store),
  ``["get", key]`` (hex), ``["set", key, text]``, ``["copy", source_key, target_key]`` (the raw
  bytes, sealed or not).
- ``{"op": "intrude", "port", "epoch", "rank", "world_size", "timeout_s"}`` finds the epoch's
  keys with ``list_keys``, waits for ``rank``'s Gloo address there, builds a Gloo group as that
  rank over the same keys and waits for a broadcast from rank 0; answers with the tensor it got,
  or the error.

Errors come back as ``{"ok": false, "error": <class name>, "message": ...}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from datetime import timedelta  # noqa: E402

import torch.distributed as dist  # noqa: E402

from lpreg_core.weights import manifest_from_proto  # noqa: E402
from lpreg_core.wire.lpreg.v1 import control_pb2  # noqa: E402
from services.weight_sync.group import BroadcastError  # noqa: E402
from services.weight_sync.receiver import BucketStream, WeightReceiver  # noqa: E402


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(
        tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data
    ).hexdigest()


def rss_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM at most)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def consume(
    stream: BucketStream,
    die_after: int | None,
    close_after: int | None,
    kept: list[torch.Tensor] | None,
) -> dict[str, list[Any]]:
    """Load each tensor as it arrives (here: hash it); keep it only into ``kept``."""
    tensors: dict[str, list[Any]] = {}
    for name, tensor in stream:
        tensors[name] = [
            tensor_digest(tensor),
            list(tensor.shape),
            str(tensor.dtype).removeprefix("torch."),
        ]
        if kept is not None:
            kept.append(tensor)
        if die_after is not None and stream.num_buckets_received >= die_after:
            # A crash in the middle of a publish, at a point the test controls.
            os.kill(os.getpid(), signal.SIGKILL)
        if close_after is not None and stream.num_buckets_received >= close_after:
            break
    return tensors


def raw_store(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))


def raw_actions(port: int, actions: list[list[str]]) -> list[Any]:
    store = raw_store(port)
    results: list[Any] = []
    for name, *args in actions:
        if name == "list":
            results.append(sorted(store.list_keys()))
        elif name == "get":
            results.append(store.get(args[0]).hex())
        elif name == "set":
            store.set(args[0], args[1])
            results.append(None)
        elif name == "copy":
            store.set(args[1], store.get(args[0]))  # type: ignore[arg-type]
            results.append(None)
        else:
            raise ValueError(f"unknown raw action {name!r}")
    return results


def intrude(command: dict[str, Any]) -> dict[str, Any]:
    """Join the collective directly through the store, as a process without the secret would.

    Watches the store for the epoch's keys (``list_keys``), waits until the member of ``rank``
    published its Gloo address, then builds a Gloo group as that rank, overwriting it, and waits
    for rank 0's broadcast.
    """
    store = raw_store(command["port"])
    epoch_keys = f"epoch/{command['epoch']}/"
    prefix = None
    while prefix is None:
        for key in store.list_keys():
            if key.startswith(epoch_keys) and "/pg/" in key and key.endswith(f"/{command['rank']}"):
                prefix = key.split("/pg/", 1)[0]
        time.sleep(0.002)
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timedelta(seconds=command["timeout_s"])
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    got = torch.zeros(8)
    try:
        pg = dist.ProcessGroupGloo(
            dist.PrefixStore(prefix + "/pg", store), command["rank"], command["world_size"], options
        )
        pg.broadcast([got]).wait()
    except Exception as e:  # whatever Gloo makes of sealed addresses: the intrusion failed
        return {"ok": False, "prefix": prefix, "error": type(e).__name__, "message": str(e)}
    return {"ok": True, "prefix": prefix, "received": got.tolist()}


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
            secret=bytes.fromhex(command.get("secret", "")),
        )
        return {"ok": True, "epoch": command["epoch"]}
    if op == "raw":
        return {"ok": True, "results": raw_actions(command["port"], command["actions"])}
    if op == "intrude":
        return intrude(command)
    if op == "receive":
        proto = control_pb2.WeightManifest.FromString(bytes.fromhex(command["manifest"]))
        manifest = manifest_from_proto(proto)
        die_after = command.get("die_after_buckets")
        close_after = command.get("close_after_buckets")
        # Holds on to every tensor, as a whole-model receive would (the measurements' control).
        kept: list[torch.Tensor] | None = [] if command.get("keep_tensors") else None
        if command.get("measure_rss"):
            reset_peak_rss()
        rss_before = rss_bytes("VmRSS")
        with receiver.receive_buckets(manifest, "cpu", command["timeout_s"]) as stream:
            tensors = consume(stream, die_after, close_after, kept)
        reply: dict[str, Any] = {
            "ok": stream.error is None,
            "version": manifest.version,
            "checksum": manifest.checksum,
            "tensors": tensors,
            "buckets_received": stream.num_buckets_received,
            "peak_buffer_bytes": receiver.peak_buffer_bytes,
            "live_buffer_bytes": receiver.live_buffer_bytes,
            "rss_before_bytes": rss_before,
            "rss_peak_bytes": rss_bytes("VmHWM"),
        }
        if stream.error is not None:
            reply.update(error=type(stream.error).__name__, message=str(stream.error))
        return reply
    if op == "leave":
        receiver.leave()
        return {"ok": True}
    if op == "resources":
        return {
            "ok": True,
            "fds": len(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(),
            "os_threads": len(os.listdir("/proc/self/task")),
            "rss_bytes": rss_bytes("VmRSS"),
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
