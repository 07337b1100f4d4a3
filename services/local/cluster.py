"""A whole lpreg deployment on one machine, as real processes: redis-server, the learner and
generators. `lpreg local`, the fault-injection benchmark and the fault tests drive it; each
component can be started, killed and restarted on its own.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import redis as redis_lib

log = logging.getLogger("lpreg.local")

# SIGTERM first; whatever is still alive after this is killed.
TERMINATE_GRACE_S = 10.0
REDIS_START_TIMEOUT_S = 15.0


# prctl(2) option: the signal a child gets when the thread that started it dies.
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a forked child before exec: SIGTERM me when the launcher dies, even by SIGKILL (Linux;
    elsewhere the launcher's own Ctrl-C handling is all there is)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


# Where free_port looks first: above the well-known and most registered service ports.
_FIXED_PORTS_FROM = 20000


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; else IANA's)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, below the ephemeral range when there is room: services are
    restarted on the ports first picked, and a port of that range could meanwhile become the
    local end of some outgoing connection (a generator reconnecting, a client), which makes the
    restart fail with "address in use"."""
    low, _high = _ephemeral_ports()
    if low > _FIXED_PORTS_FROM + 1000:
        rng = random.SystemRandom()
        for _ in range(100):
            port = rng.randrange(_FIXED_PORTS_FROM, low)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """Processes of one run. Ports are picked once, so restarted components come back on the
    same addresses (a restarted learner is found again by the generators)."""

    def __init__(
        self,
        config_path: str | Path,
        run_dir: Path,
        overrides: list[str] | None = None,
        *,
        redis_server: str = "redis-server",
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
        learner_procs: int = 1,
    ) -> None:
        self.config_path = str(config_path)
        self.learner_procs = learner_procs
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_binary = redis_server
        self.redis_url = redis_url
        self.redis_port: int | None = None
        self.grpc_port, self.store_port, self.metrics_port = free_port(), free_port(), free_port()
        self.env = dict(os.environ)
        self.env.update(
            LPREG_AUTH_TOKEN=secrets.token_hex(16), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"
        )
        self.env.update(env or {})
        self.overrides = [
            *(overrides or []),
            f"local.run_dir={run_dir}",
            f"control.port={self.grpc_port}",
            f"control.learner_address=127.0.0.1:{self.grpc_port}",
            f"broadcast.store_port={self.store_port}",
            f"metrics.learner_port={self.metrics_port}",
        ]
        self.redis: subprocess.Popen[bytes] | None = None
        self.learner: subprocess.Popen[bytes] | None = None
        self.generators: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    # -- processes ----------------------------------------------------------------------------
    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        out = open(self.logs / log_name, "ab")  # noqa: SIM115 - closed in stop_all
        self._files.append(out)
        # A session of its own: Ctrl-C reaches only the launcher, which stops children in order;
        # a launcher that dies without stopping them (SIGKILL) takes them with it.
        parent = os.getpid()
        return subprocess.Popen(
            argv,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(parent),
        )

    def _lpreg(self, *args: str, extra: list[str] | None = None) -> list[str]:
        sets = [a for o in [*self.overrides, *(extra or [])] for a in ("--set", o)]
        return [sys.executable, "-m", "services.cli", *args, self.config_path, *sets]

    def start_redis(self) -> str:
        binary = shutil.which(self.redis_binary)
        if binary is None:
            raise RuntimeError(
                f"{self.redis_binary!r} not found on PATH: install Redis "
                "(Debian/Ubuntu: `sudo apt-get install redis-server`, or `make setup` as root)"
            )
        if self.redis_port is None:
            self.redis_port = free_port()
        data = self.run_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(data),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        ]  # fmt: skip
        self.redis = self._spawn(argv, "redis.log")
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self._wait_redis()
        self.env["LPREG_REDIS_URL"] = self.redis_url
        return self.redis_url

    def _wait_redis(self) -> None:
        assert self.redis_url is not None
        client = redis_lib.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis_lib.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server did not answer at {self.redis_url}; see {self.logs}/redis.log"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def restart_redis(self) -> None:
        """Stop redis-server (it flushes its append-only file) and start it again in place."""
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(timeout=TERMINATE_GRACE_S)
        self.start_redis()

    def use_redis(self, url: str) -> None:
        self.redis_url = url
        self.env["LPREG_REDIS_URL"] = url

    def start_learner(self, *, resume: bool = False) -> subprocess.Popen[bytes]:
        argv = self._lpreg("learner")
        if self.learner_procs > 1:
            # local.learner_procs ranks on this machine (FSDP2 over Gloo on the CPU).
            torchrun = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={self.learner_procs}",
            ]  # fmt: skip
            argv = [*torchrun, *argv[1:]]
        if resume:
            argv.append("--resume")
        self.learner = self._spawn(argv, "learner.log")
        return self.learner

    def start_generator(self, generator_id: str) -> subprocess.Popen[bytes]:
        argv = self._lpreg("generator", extra=[f"metrics.generator_port={free_port()}"]) + [
            "--id",
            generator_id,
        ]
        proc = self._spawn(argv, f"{generator_id}.log")
        self.generators[generator_id] = proc
        return proc

    def kill(self, proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=TERMINATE_GRACE_S)

    def all_processes(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        procs = [(gid, p) for gid, p in self.generators.items()]
        if self.learner is not None:
            procs.append(("learner", self.learner))
        if self.redis is not None:
            procs.append(("redis-server", self.redis))
        return procs

    def stop_all(self) -> None:
        """SIGTERM the services, then redis-server (they drain through it), then SIGKILL."""
        services = [(n, p) for n, p in self.all_processes() if p is not self.redis]
        self._stop(services)
        if self.redis is not None:
            self._stop([("redis-server", self.redis)])
        for f in self._files:
            f.close()
        self._files = []

    def _stop(self, procs: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
        for _name, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for name, proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                proc.kill()
                proc.wait()


def read_metrics(run_dir: Path) -> list[dict[str, object]]:
    """The learner's per-step records so far (a resumed learner appends replayed steps)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []

    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def wait_for_step(
    cluster: LocalCluster, step: int, timeout_s: float, poll_s: float = 0.2
) -> list[dict[str, object]]:
    """Block until the learner logged `step` (or fail, naming the logs to read)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = read_metrics(cluster.run_dir)
        if any(int(r["step"]) >= step for r in rows):  # type: ignore[call-overload]
            return rows
        if cluster.learner is not None and cluster.learner.poll() is not None:
            raise RuntimeError(
                f"learner exited ({cluster.learner.returncode}) before step {step}; "
                f"see {cluster.logs}/learner.log"
            )
        time.sleep(poll_s)
    raise TimeoutError(f"no step {step} within {timeout_s}s; see {cluster.logs}")
