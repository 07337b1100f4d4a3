"""The project's weight publish vs a raw Gloo broadcast of the same bytes; prints one JSON object.

The learner side runs in this process, two generator-side members run as processes of their own
(this script with --worker), all on loopback Gloo:

  project  what the learner pays per publish (services.learner.publisher): plan_manifest lays
           out a model-shaped state dict from its (cached) names, shapes and dtypes, the manifest
           goes to the members, WeightSender.send_weights packs each bucket from the state dict
           while the previous one is on the wire, authenticates it, and waits for every member's
           confirmation. Each member receives with WeightReceiver.receive_buckets and copies each
           tensor into its own copy of the model as it arrives.
  raw      torch.distributed broadcast of one flat buffer of the same bytes, already packed,
           into a preallocated buffer on each member, then the same one-element all-reduce that
           confirms the project's publish.

project_s and raw_s are medians of --repeats (after one warm-up of each, alternating);
efficiency = raw_s / project_s. pause_s is how long a member spends in a publish (from the
start of its receive until the last tensor is loaded and verified), the larger of the two
members, median. sender_peak_growth_bytes is the most the learner's resident memory grew in a
timed publish (the first publish, which allocates the reused bucket buffers, is reported apart):
buckets, never the model. project_plan_s (planning and sending the manifest) and project_broadcast_s
(packing, sending, authenticating, confirming) split project_s.

The default state dict is 1 GB, the issue's size (every process holds the model once more plus
its buffers: about 7 GB in all); --bytes 256e6 on a smaller machine.

    .venv/bin/python benchmarks/bench_weight_sync.py [--bytes 1e9] [--repeats 3]
    .venv/bin/python benchmarks/bench_weight_sync.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from lpreg_core.config import BroadcastConfig  # noqa: E402
from lpreg_core.weight_sync import layout_of, plan_manifest  # noqa: E402
from lpreg_core.weights import manifest_from_proto, manifest_to_proto  # noqa: E402
from lpreg_core.wire.lpreg.v1 import control_pb2  # noqa: E402
from services.weight_sync import WeightReceiver, WeightSender  # noqa: E402

NUM_MEMBERS = 2
HIDDEN = 1024
"""Model-shaped tensors: (H, H) and (4 H, H) matrices with H-sized norms, H = HIDDEN (smaller
when one layer of that width would not fit the requested bytes)."""
JOIN_TIMEOUT_S = 60.0
SEND_TIMEOUT_S = 300.0
WORKER_START_TIMEOUT_S = 120.0


def rss_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM at most)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_state(num_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A float32 transformer-like state dict of num_bytes (at least one layer's worth)."""
    gen = torch.Generator().manual_seed(seed)
    h = HIDDEN
    while h > 64 and 4 * 16 * h * h > num_bytes:
        h //= 2
    layer = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (4 * h, h),
        "mlp.up_proj.weight": (4 * h, h),
        "mlp.down_proj.weight": (h, 4 * h),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    layer_bytes = 4 * sum(torch.Size(s).numel() for s in layer.values())
    state: dict[str, torch.Tensor] = {}
    i = 0
    while i == 0 or sum(t.numel() * 4 for t in state.values()) + layer_bytes <= num_bytes:
        for name, shape in layer.items():
            state[f"model.layers.{i}.{name}"] = torch.randn(*shape, generator=gen)
        i += 1
    # The embedding takes what is left, so the total is within one row of num_bytes.
    rows = (num_bytes - sum(t.numel() * 4 for t in state.values())) // (4 * h)
    if rows > 0:
        state["model.embed_tokens.weight"] = torch.randn(rows, h, generator=gen)
    return state


# ---------------------------------------------------------------------------------------------
# Member process
# ---------------------------------------------------------------------------------------------


def _raw_group(rank: int, world_size: int, port: int, is_master: bool) -> Any:
    store = dist.TCPStore(
        "127.0.0.1", port, world_size, is_master, timeout=timedelta(seconds=JOIN_TIMEOUT_S)
    )
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timedelta(seconds=SEND_TIMEOUT_S)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._threads = 1
    return store, dist.ProcessGroupGloo(store, rank, world_size, options)


def _confirm(pg: Any) -> None:
    pg.allreduce([torch.zeros(1, dtype=torch.int32)]).wait()


def _worker(rank: int, store_port: int, raw_port: int, num_bytes: int) -> None:
    torch.set_num_threads(1)
    world_size = NUM_MEMBERS + 1
    receiver = WeightReceiver(device_host="127.0.0.1")
    # The epoch's rendezvous secret comes first on stdin (the benchmark's stand-in for the
    # JoinGroup event over gRPC), never on the command line.
    secret = bytes.fromhex(json.loads(sys.stdin.readline())["secret"])
    join_extra: dict[str, Any] = {"secret": secret} if secret else {}
    receiver.join(
        1, rank, world_size, "127.0.0.1", store_port, "gloo", JOIN_TIMEOUT_S, **join_extra
    )
    _store, raw_pg = _raw_group(rank, world_size, raw_port, False)
    raw_buffer = torch.empty(num_bytes, dtype=torch.uint8)
    model: dict[str, torch.Tensor] = {}
    print(json.dumps({"ok": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        start = time.perf_counter()
        if command["op"] == "exit":
            break
        if command["op"] == "project":
            proto = control_pb2.WeightManifest.FromString(bytes.fromhex(command["manifest"]))
            manifest = manifest_from_proto(proto)
            with receiver.receive_buckets(manifest, "cpu", SEND_TIMEOUT_S) as stream:
                for name, tensor in stream:
                    if name not in model:
                        model[name] = torch.empty_like(tensor)
                    model[name].copy_(tensor)
            if stream.error is not None:
                raise RuntimeError(f"rank {rank}: publish failed: {stream.error}")
        else:
            raw_pg.broadcast([raw_buffer], dist.BroadcastOptions()).wait()
            _confirm(raw_pg)
        print(json.dumps({"ok": True, "pause_s": time.perf_counter() - start}), flush=True)
    receiver.close()


# ---------------------------------------------------------------------------------------------
# Learner side
# ---------------------------------------------------------------------------------------------


class Member:
    def __init__(self, rank: int, store_port: int, raw_port: int, num_bytes: int, log: IO) -> None:
        argv = [
            sys.executable, str(Path(__file__).resolve()), "--worker", str(rank),
            "--store-port", str(store_port), "--raw-port", str(raw_port),
            "--bytes", str(num_bytes),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"member {self.proc.pid} exited ({self.proc.wait()}): see its log")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="exit")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def run(num_bytes: int, repeats: int, bucket_bytes: int, log: IO) -> dict[str, Any]:
    state = model_state(num_bytes)
    total_bytes = sum(t.numel() * t.element_size() for t in state.values())
    flat = torch.cat([t.reshape(-1) for t in state.values()]).view(torch.uint8)
    config = BroadcastConfig.model_validate(
        {"store_host": "127.0.0.1", "store_port": 0, "bucket_bytes": bucket_bytes}
    )
    raw_port = free_port()
    members: list[Member] = []
    with WeightSender(config, "cpu", device_host="127.0.0.1") as sender:
        try:
            draw = getattr(sender, "epoch_secret", None)
            secret = bytes(draw(1)) if draw is not None else b""
            members = [
                Member(rank, sender.port, raw_port, total_bytes, log)
                for rank in range(1, NUM_MEMBERS + 1)
            ]
            for m in members:
                m.send(secret=secret.hex())
            sender.open_epoch(1, NUM_MEMBERS + 1, JOIN_TIMEOUT_S)
            _store, raw_pg = _raw_group(0, NUM_MEMBERS + 1, raw_port, True)
            for m in members:
                if not m.reply()["ok"]:
                    raise RuntimeError("a member failed to start")

            layout = layout_of(state.items())  # the publisher learns it once
            sender_growth: list[int] = []

            def project(version: int) -> tuple[float, float, float]:
                # Restart the peak resident set (Linux) to see what the publish adds on the learner.
                Path("/proc/self/clear_refs").write_text("5")
                rss_before = rss_bytes("VmRSS")
                start = time.perf_counter()
                manifest = plan_manifest(version, layout, bucket_bytes)
                text = manifest_to_proto(manifest).SerializeToString().hex()
                for m in members:
                    m.send(op="project", manifest=text)
                planned = time.perf_counter()
                with torch.no_grad():
                    sender.send_weights(manifest, state.items(), SEND_TIMEOUT_S)
                end = time.perf_counter()
                sender_growth.append(rss_bytes("VmHWM") - rss_before)
                pause = max(m.reply()["pause_s"] for m in members)
                return end - start, planned - start, pause

            def raw() -> tuple[float, float]:
                for m in members:
                    m.send(op="raw")
                start = time.perf_counter()
                raw_pg.broadcast([flat], dist.BroadcastOptions()).wait()
                _confirm(raw_pg)
                end = time.perf_counter()
                pause = max(m.reply()["pause_s"] for m in members)
                return end - start, pause

            project(0)
            raw()
            project_runs, raw_runs = [], []
            for version in range(1, repeats + 1):
                project_runs.append(project(version))
                raw_runs.append(raw())
        finally:
            for m in members:
                m.stop()
    project_s = statistics.median(r[0] for r in project_runs)
    raw_s = statistics.median(r[0] for r in raw_runs)
    plan_s = statistics.median(r[1] for r in project_runs)
    return {
        "bytes": total_bytes,
        "num_tensors": len(state),
        "bucket_bytes": bucket_bytes,
        "num_members": NUM_MEMBERS,
        "backend": "gloo",
        "repeats": repeats,
        "project_s": project_s,
        "raw_s": raw_s,
        "efficiency": raw_s / project_s,
        "pause_s": statistics.median(r[2] for r in project_runs),
        "raw_pause_s": statistics.median(r[1] for r in raw_runs),
        "project_plan_s": plan_s,
        "project_broadcast_s": statistics.median(r[0] - r[1] for r in project_runs),
        "efficiency_broadcast_only": raw_s / statistics.median(r[0] - r[1] for r in project_runs),
        "project_all_s": [r[0] for r in project_runs],
        # Most the learner's resident memory grew during one publish (its reused bucket buffers
        # are allocated in the warm-up): never a copy of the model.
        "sender_peak_growth_bytes": max(sender_growth[1:]),
        "sender_first_publish_growth_bytes": sender_growth[0],
        "raw_all_s": [r[0] for r in raw_runs],
        "load_average_1m": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bytes", type=float, default=1e9, help="state dict size (default 1e9)")
    parser.add_argument("--repeats", type=int, default=3, help="timed publishes of each kind")
    parser.add_argument(
        "--bucket-bytes",
        type=int,
        default=BroadcastConfig.model_fields["bucket_bytes"].default,
        help="the project's bucket size (default: broadcast.bucket_bytes's default)",
    )
    parser.add_argument("--smoke", action="store_true", help="16 MB, 1 repeat, 4 MB buckets")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--raw-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.store_port, args.raw_port, int(args.bytes))
        return 0
    if args.smoke:
        args.bytes, args.repeats, args.bucket_bytes = 16e6, 1, 4 * 1024 * 1024
    torch.set_num_threads(1)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_weight_sync-{os.getpid()}.log"
    with log_path.open("w") as log:
        try:
            result = run(int(args.bytes), args.repeats, args.bucket_bytes, log)
        except Exception:
            print(f"member logs: {log_path}", file=sys.stderr)
            raise
    log_path.unlink(missing_ok=True)
    text = json.dumps(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
